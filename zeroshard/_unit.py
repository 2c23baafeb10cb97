"""Stage 3 units: which modules gather and release their parameters together.

A unit is a module plus the buckets of the parameters it owns. Each unit owns the
parameters held by modules inside it but not inside a nested unit; a parameter held
by modules of different units (tied weights) belongs to their lowest common
ancestor unit, so it is gathered whenever any of its users computes. The root
module is always a unit and takes whatever no other unit owns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from torch import nn

from . import _comm
from ._bucket import FlatBucket, Ownership


# Modules that hold others but are never called: their forward hooks never fire.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class ShardState(enum.Enum):
    SHARDED = "sharded"  # full buffers freed; only the shards exist
    GATHERING = "gathering"  # an all-gather is in flight (a prefetch)
    GATHERED = "gathered"  # parameters hold their full values


class Unit:
    """One module's own parameters, gathered and released as one."""

    def __init__(self, module: nn.Module, name: str, buckets: list[FlatBucket]) -> None:
        self.module = module
        self.name = name or "<root>"
        self.buckets = buckets
        self.state = ShardState.GATHERED  # buffers start full; the UnitGatherer frees them
        self._works: list = []
        self.trainable_ids = {id(p) for b in buckets for p in b.params if p.requires_grad}
        # Backward may still need a frozen parameter after every trainable gradient
        # has arrived (a frozen layer that opens the unit computes its input gradient
        # last), so only a unit without frozen parameters can be released early.
        self.release_when_grads_done = all(p.requires_grad for b in buckets for p in b.params)
        self.grads_arrived: set[int] = set()  # this backward's accumulated gradients
        self.backward_armed = False  # gathered for this backward already
        self.ran_since_backward = False  # a forward with grad enabled ran it, or a gradient came
        # Some rank ran it twice in one forward pass of the first step: kept gathered
        # until the pass ends (Note [runs before the walk moves on] in stage3.py).
        self.held_for_pass = False

    def holds_storage(self, storage: int) -> bool:
        """Whether ``storage`` (an address) is one of this unit's gathered buffers: a
        tensor there views its parameters."""
        return any(b.flat.untyped_storage().data_ptr() == storage for b in self.buckets
                   if b.flat.untyped_storage().nbytes() > 0)

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buckets)

    def gather(self, group, stats: _comm.CommStats, label: str) -> None:
        """Start all-gathering every bucket into its full buffer (idempotent)."""
        if self.state is not ShardState.SHARDED:
            return
        for bucket in self.buckets:  # all checked before the first collective
            bucket.refuse_writes_while_released()
        for bucket in self.buckets:
            bucket.allocate()
            self._works.append(_comm.all_gather(bucket.flat, bucket.shard, group=group,
                                                stats=stats, label=label, async_op=True))
        self.state = ShardState.GATHERING

    def wait(self) -> None:
        if self.state is ShardState.GATHERING:
            _comm.wait_all(self._works)
            self._works.clear()
            self.state = ShardState.GATHERED

    def release(self) -> None:
        """Free the full buffers (idempotent); a gather in flight is waited for first."""
        self.wait()
        if self.state is ShardState.GATHERED:
            for bucket in self.buckets:
                bucket.free()
            self.state = ShardState.SHARDED

    def __repr__(self) -> str:
        return f"Unit({self.name}, {self.state.value}, {self.nbytes()} bytes)"


def select_unit_modules(model: nn.Module, units, bucket_bytes: int) -> list[nn.Module]:
    """The modules that become units (the root first, then in ``model.modules()`` order).

    ``units`` is a module class, a collection of classes, a predicate
    ``module -> bool``, or None for the automatic policy.
    """
    if units is None:
        chosen = _auto_units(model, bucket_bytes)
    else:
        predicate = _as_predicate(units)
        chosen = [m for m in model.modules() if m is not model and predicate(m)]
        containers = [type(m).__name__ for m in chosen if isinstance(m, _CONTAINERS)]
        if containers:
            raise ValueError(
                f"units selects {containers[0]} modules, which have no forward of their own, so "
                "their parameters would never be gathered; choose the modules inside them")
    chosen_ids = {id(m) for m in chosen}
    return [model] + [m for m in model.modules() if id(m) in chosen_ids]


def _as_predicate(units) -> Callable[[nn.Module], bool]:
    if isinstance(units, type) and issubclass(units, nn.Module):
        return lambda m: isinstance(m, units)
    if isinstance(units, (list, tuple, set, frozenset)) and units and all(
            isinstance(c, type) and issubclass(c, nn.Module) for c in units):
        classes = tuple(units)
        return lambda m: isinstance(m, classes)
    if callable(units) and not isinstance(units, type):
        return lambda m: bool(units(m))
    raise TypeError(f"units must be an nn.Module class, a collection of them, or a predicate "
                    f"module -> bool; got {units!r}")


def _auto_units(model: nn.Module, bucket_bytes: int) -> list[nn.Module]:
    """Post-order: a module whose not-yet-claimed parameters reach ``bucket_bytes``
    becomes a unit, so units hold about that much and a deep model gets many."""
    chosen: list[nn.Module] = []
    _claim_by_size(model, model, bucket_bytes, chosen)
    return chosen


def _claim_by_size(module: nn.Module, root: nn.Module, bucket_bytes: int,
                   chosen: list[nn.Module]) -> int:
    """``_auto_units``' walk; returns the bytes of ``module``'s parameters left unclaimed.
    A module-level function: a nested recursive one would be a reference cycle."""
    size = sum(p.numel() * p.element_size() for p in module._parameters.values() if p is not None)
    size += sum(_claim_by_size(child, root, bucket_bytes, chosen) for child in module.children())
    if module is not root and size >= bucket_bytes and not isinstance(module, _CONTAINERS):
        chosen.append(module)
        return 0
    return size


def assign_owners(model: nn.Module, unit_modules: list[nn.Module]) -> dict[int, int]:
    """id(parameter) -> index of the unit that owns it (see the module docstring)."""
    index_of = {id(m): i for i, m in enumerate(unit_modules)}
    parent: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parent.setdefault(id(child), module)

    def unit_of(module: nn.Module) -> int:
        while id(module) not in index_of:
            module = parent[id(module)]
        return index_of[id(module)]

    def ancestors(index: int) -> list[int]:  # the unit itself, up to the root
        chain = [index]
        while chain[-1] != 0:
            chain.append(unit_of(parent[id(unit_modules[chain[-1]])]))
        return chain

    owner: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is None:
                continue
            here = unit_of(module)
            if id(param) not in owner:
                owner[id(param)] = here
            else:  # lowest common ancestor of the two units
                mine = set(ancestors(here))
                owner[id(param)] = next(u for u in ancestors(owner[id(param)]) if u in mine)
    return owner


def build_units(model: nn.Module, unit_modules: list[nn.Module], group_of: dict[int, int],
                rank: int, world_size: int, full_precision: frozenset[int] = frozenset(),
                ownership: Ownership | None = None) -> list[Unit]:
    """One bucket per (param group, dtype, device, requires_grad, kept in full precision)
    of each unit's own parameters."""
    owner = assign_owners(model, unit_modules)
    ownership = ownership or Ownership({}, world_size)
    names = {id(m): name for name, m in model.named_modules()}
    units = []
    for index, module in enumerate(unit_modules):
        by_key: dict[tuple, list[nn.Parameter]] = {}
        for param in model.parameters():
            if owner[id(param)] == index:
                key = (group_of.get(id(param), -1), param.dtype, param.device, param.requires_grad,
                       id(param) in full_precision)
                by_key.setdefault(key, []).append(param)
        buckets = [FlatBucket(params, key[0], rank, world_size, full_precision=key[4],
                              owners=ownership.owners(params, key[0]))
                   for key, params in by_key.items()]
        units.append(Unit(module, names.get(id(module), ""), buckets))
    return units


class Schedule:
    """A fixed order of units that every rank walks once per forward (or backward) pass.

    Walking to a unit passes over the units before it that this rank did not enter;
    the caller gathers and releases those anyway, so every rank issues one gather
    per unit per pass in this order, whichever units its data ran (Note [gather
    schedule] in stage3.py). A unit entered again after the cursor has passed it
    (a unit run twice) is not part of the walk. Until ``stop_recording()`` the
    schedule also records the order in which units are first entered, and which
    units were entered twice in one pass.
    """

    def __init__(self, units: list[Unit]) -> None:
        self.entered: list[Unit] | None = []  # first entries, while recording
        self.repeated: list[Unit] = []  # entered twice in one pass, while recording
        self._reorder(units)
        self.restart()

    def _reorder(self, units: list[Unit]) -> None:
        self.units = units
        self._position = {id(u): i for i, u in enumerate(units)}

    def restart(self) -> None:
        self.cursor = 0
        self._passed_over: set[int] = set()
        self._entered_in_pass: set[int] = set()

    def walk_to(self, unit: Unit) -> list[Unit] | None:
        """Move past ``unit``; return the units passed over before it, or None if the
        walk had already passed ``unit`` in this pass."""
        if self.entered is not None:
            if unit not in self.entered:
                self.entered.append(unit)
            if id(unit) in self._entered_in_pass and unit not in self.repeated:
                self.repeated.append(unit)
        self._entered_in_pass.add(id(unit))
        position = self._position[id(unit)]
        if position < self.cursor:
            return None
        passed = self.units[self.cursor:position]
        self._passed_over.update(id(u) for u in passed)
        self.cursor = position + 1
        return passed

    def was_passed_over(self, unit: Unit) -> bool:
        """Whether this pass walked past ``unit`` without entering it (it runs out of order)."""
        return id(unit) in self._passed_over

    def walk_to_end(self) -> list[Unit]:
        passed = self.units[self.cursor:]
        self._passed_over.update(id(u) for u in passed)
        self.cursor = len(self.units)
        return passed

    def next_unit(self) -> Unit | None:
        return self.units[self.cursor] if self.cursor < len(self.units) else None

    def position_of(self, unit: Unit) -> int:
        return self._position[id(unit)]

    def following(self, unit: Unit) -> Unit | None:
        """The unit after ``unit`` in the schedule, if any."""
        position = self._position[id(unit)] + 1
        return self.units[position] if position < len(self.units) else None

    def stop_recording(self, adopt: bool) -> None:
        """With ``adopt``, walk from now on in the recorded order (units never entered
        keep their relative order, after it)."""
        if adopt:
            self._reorder(self.entered + [u for u in self.units if u not in self.entered])
        self.entered = None


def forward_and_backward_orders(model: nn.Module, units: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    """The units in the order forward enters them (pre-order of the module tree: the
    root first, a unit before the units inside it, siblings in registration order)
    and the order backward reaches their outputs (the reverse of the order forward
    leaves them: the root first, a unit before the units inside it, siblings last
    to first)."""
    unit_of_module = {id(u.module): u for u in units}
    pre, post = [], []
    _tree_orders(model, unit_of_module, pre, post)
    return pre, post[::-1]


def _tree_orders(module: nn.Module, unit_of_module: dict, pre: list, post: list) -> None:
    """``forward_and_backward_orders``' walk (module-level: no recursive closure cycle)."""
    unit = unit_of_module.pop(id(module), None)  # a module registered twice: once
    if unit is not None:
        pre.append(unit)
    for child in module.children():
        _tree_orders(child, unit_of_module, pre, post)
    if unit is not None:
        post.append(unit)
