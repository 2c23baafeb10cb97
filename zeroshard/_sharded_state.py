"""What a rank owns of each parameter, as plain ranges: saved from one layout, loaded into any.

A shard is a slice of a padded flat bucket, so it cuts across parameters, and which
slice a rank owns depends on the stage, the bucket sizes, the units and the world
size. Saved state therefore never mentions buckets: a rank saves, for every
parameter it owns elements of, the *piece* ``[start, stop)`` of the flattened
parameter, its values and the per-element optimizer states over the same range.
"Flattened" means in the parameter's memory order (Note [memory order] in
_bucket.py): sources serve ranges in this run's order (``memory_orders``).
Loading asks a source for the ranges the new layout needs, wherever the old pieces
lie, so any world size, stage and bucketing can load what any other saved.

Values are the fp32 masters of the parameters the optimizer updates (with mixed
precision, not their low-precision casts) and the parameters' own values for the
frozen ones. Per-element states are the inner optimizer's tensors shaped like its
shard (Adam's ``exp_avg``); the rest of its state (Adam's ``step``) is per shard
tensor, so it is saved per parameter and a new bucket takes its first parameter's;
a bucket whose parameters were saved with different scalars (Adam's ``step`` of a
stage-3 unit that no rank ran in some step, loaded where one bucket holds it and
others) is refused before anything changes (``check_one_scalar_per_bucket``): it
took the first's, and the resumed run drifted 5e-3 from the one that never stopped
(a helper's probe). Not where those scalars do not change the class's step (Note
[scalars that do not change the step] in _inner.py: Adagrad without ``lr_decay``).
A parameter stepped whole (Note [whole-parameter ownership] in _layout.py) is one
piece on its owner; its per-element states are those shaped like it (Muon's
momentum), and the rest (Adafactor's row and column statistics) are saved whole
with its scalars.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ._bucket import from_memory_order, is_row_major, to_memory_order
from ._cleared import give_fresh_state
from ._inner import hyperparameters, scalars_change_the_step, split_state


@dataclass
class Piece:
    """Elements ``[start, start + values.numel())`` of one flattened parameter."""

    start: int
    values: torch.Tensor
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # same range, per element

    @property
    def stop(self) -> int:
        return self.start + self.values.numel()


class Source(Protocol):
    """Where loading finds the values and optimizer state of any parameter range, the
    range counted in this run's memory order of the parameter (``memory_orders``)."""

    def values(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def states(self, name: str, start: int, stop: int) -> dict[str, torch.Tensor]: ...

    def optimizer_layout(self, name: str) -> tuple[dict, list[str]] | None:
        """(scalar states, names of per-element states) of a parameter, None if it has none."""

    def prepare(self, params: list[nn.Parameter], dtype: torch.dtype) -> None:
        """Called on every rank before ``params``' ranges are asked for (one bucket, or one
        parameter outside the buckets): a source that sends them from one rank does it here."""


def parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def outside_buckets(view) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of each parameter no bucket holds (stages 1-2: the frozen ones,
    whole on every rank), in model order."""
    bucketed = {id(p) for b in view.every_bucket for p in b.params}
    return [(name, p) for name, p in view.model.named_parameters() if id(p) not in bucketed]


def memory_orders(opt) -> dict[str, tuple[int, ...]]:
    """Parameter name -> the order its bucket holds it in (Note [memory order]), for
    each parameter not held row-major. The rest, and the parameters outside buckets
    (saved and loaded whole, ``reshape(-1)``), are row-major."""
    names = parameter_names(opt.model)
    return {names[id(param)]: order for bucket in opt.sharding.every_bucket
            for param, order in zip(bucket.params, bucket.orders)
            if not is_row_major(order)}


def stepped_states(opt, bucket):
    """(indices of the parameters, tensor the inner optimizer steps, its scalar states,
    its per-element states) for each such tensor of an updated bucket that has state:
    the master shard for every parameter of the bucket, or each parameter this rank
    owns whole (per-element states then in its memory order, 1-D)."""
    if not bucket.owns_whole_parameters:
        state = opt.sharding.inner.state.find(bucket.master)
        if state:
            yield (range(len(bucket.params)), bucket.master, *split_state(state, bucket.master))
        return
    for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped):
        state = opt.sharding.inner.state.find(stepped)
        if state:
            scalars, per_element = split_state(state, stepped)
            yield ([index], stepped, scalars,
                   {k: to_memory_order(v, bucket.orders[index]) for k, v in per_element.items()})


def owned_pieces(opt) -> dict[str, list[Piece]]:
    """Every piece of every parameter this rank owns (stages 1-2: rank 0 owns the
    parameters outside buckets, which every rank holds whole)."""
    view = opt.sharding
    names = parameter_names(view.model)
    pieces: dict[str, list[Piece]] = {}
    for bucket in view.every_bucket:
        source = bucket.master if bucket.master is not None else bucket.shard
        if bucket.owns_whole_parameters:
            states = {i: per_element for indices, _, _, per_element in stepped_states(opt, bucket)
                      for i in indices}
            for index in bucket.layout.owned(bucket.rank):
                span = bucket.layout.overlap(index, bucket.rank)
                values = _part(source, span.shard_span) if span else source[:0].clone()
                pieces[names[id(bucket.params[index])]] = [Piece(
                    0, values, {k: v.clone() for k, v in states.get(index, {}).items()})]
            continue
        _, per_element = split_state(view.inner.state.find(source, {}), source)
        for index, param in enumerate(bucket.params):
            overlap = bucket.layout.overlap(index, bucket.rank)
            if overlap is None:
                continue
            span = overlap.shard_span
            pieces.setdefault(names[id(param)], []).append(Piece(
                overlap.param_start, _part(source, span),
                {key: _part(value, span) for key, value in per_element.items()}))
    if view.rank == 0:
        for name, param in outside_buckets(view):
            pieces[name] = [Piece(0, param.detach().reshape(-1).clone())]
    return pieces


def _part(tensor: torch.Tensor, span: slice) -> torch.Tensor:
    """``tensor[span]`` to be saved now. ``torch.save`` writes a view's whole storage, once
    for all views of it: a view of a tensor that is its storage's sole content (a stage-3
    shard, an fp32 master, an optimizer state) saves just that tensor, with no copy on
    the device; a view into a whole flat buffer (stages 1-2 without mixed precision)
    would save the whole buffer, so that one is copied."""
    owns_storage = (tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes()
                    == tensor.numel() * tensor.element_size())
    return tensor[span] if owns_storage else tensor[span].clone()


def optimizer_layouts(opt) -> dict[str, tuple[dict, list[str]]]:
    """Parameter name -> (scalar states, per-element state names) of the state of the
    tensor that steps it, for every parameter this rank steps (part of)."""
    names = parameter_names(opt.model)
    layouts = {}
    for bucket in opt.sharding.buckets:
        for indices, stepped, scalars, per_element in stepped_states(opt, bucket):
            # Note [a fresh state inside a shard's]: ``without_state`` have none of their
            # own yet, as torch keeps none
            for index in set(indices) - bucket.without_state:
                layouts[names[id(bucket.params[index])]] = (
                    scalars, sorted(per_element), state_dtypes(per_element, stepped.dtype))
    return layouts


def state_dtypes(per_element: dict, stepped: torch.dtype) -> dict:
    """Note [per-element states of their own dtype]:
        A class may keep a per-element state in another dtype than the tensor it steps
        (pytorch_optimizer's AdaFactor a bf16 momentum, SPAM a boolean mask). A load built
        every state in the dtype of the tensor it steps, so such a state came back
        widened, and the class's next step raised its raw error (bf16 ``lerp``, boolean
        indexing: a helper's sweep). So a layout records the dtype of each per-element
        state that differs from the stepped tensor's where it was saved (the third entry,
        absent from a checkpoint saved before), a load builds the state in the wider of
        the two (the pieces travel in the stepped tensor's dtype, which holds a bf16 or
        boolean value exactly), and gives it back in its own dtype. A state in its
        tensor's dtype follows the new one, as torch's ``load_state_dict`` casts it: an
        fp32 DDP run's Adam state loaded into an fp64 model (recording every dtype, a
        first version gave it fp32 moments beside fp64 parameters, and the step raised:
        a reviewer's probe)."""
    return {key: value.dtype for key, value in per_element.items() if value.dtype != stepped}


def _own_dtype(layout, key: str, like: torch.Tensor) -> torch.dtype:
    """Note [per-element states of their own dtype]: state ``key``'s saved dtype."""
    saved = layout[2] if layout is not None and len(layout) > 2 else {}
    return saved.get(key, like.dtype)


def check_one_scalar_per_bucket(opt, layout_of, saved_groups: list[dict] | None = None) -> None:
    """Raise unless the parameters of each bucket this optimizer steps in shards were
    saved with the same scalar states (``layout_of(name)``: ``Source.optimizer_layout``),
    or none, or with scalars that do not change the step of their class with the
    settings the load gives their group (``saved_groups``, the saved hyper-parameters
    per param group; None: the groups' own): Note [scalars that do not change the step]
    in _inner.py. The same answer on every rank (the layouts of the whole bucket)."""
    view = opt.sharding
    names = parameter_names(view.model)
    counted_without_state = []  # Note [a fresh state inside a shard's], under a count
    for bucket in view.every_bucket:
        if bucket.master is None or bucket.owns_whole_parameters:
            continue
        first = None
        stateless = []
        layouts = [layout_of(names[id(param)]) for param in bucket.params]
        counted = _counting_layout(layouts)
        optimizer_class = view.inner.classes[bucket.group_index]
        settings = {**hyperparameters(view.inner.param_groups[bucket.group_index]),
                    **(hyperparameters(saved_groups[bucket.group_index]) if saved_groups else {})}
        for param, layout in zip(bucket.params, layouts):
            if layout is None or (_never_stepped(layout) and not _never_stepped(counted)
                                  and not scalars_change_the_step(optimizer_class, settings,
                                                                  counted[0], layout[0])):
                stateless.append(names[id(param)])
                continue  # never had a gradient: a fresh state, under the bucket's scalars
            if first is None:
                first = names[id(param)], layout[0]
            elif not _same_scalars(first[1], layout[0]) and scalars_change_the_step(
                    optimizer_class, settings, first[1], layout[0]):
                raise ValueError(
                    f"the optimizer state to load has {_scalars(first[1])} for {first[0]!r} "
                    f"and {_scalars(layout[0])} for {names[id(param)]!r}, which this "
                    f"optimizer steps in one bucket with one such state (a stage-3 unit that no "
                    "rank ran in some step falls behind the others). Load it where they are in "
                    "different buckets: the stage and units= it was saved with, or a "
                    "bucket_size_mb small enough to part them")
        if first is not None and first[1]:
            counted_without_state += [(name, first) for name in stateless]
    if counted_without_state:
        shown = counted_without_state[:6]
        warnings.warn(
            f"zeroshard: the optimizer state to load holds no state, or one never stepped, for "
            f"{len(counted_without_state)} "
            f"parameter(s) ({', '.join(f'{name!r} beside {mate!r}' for name, (mate, _) in shown)}"
            f"{', ...' if len(counted_without_state) > len(shown) else ''}), which this optimizer "
            f"steps in one bucket with parameters that have one ({_scalars(shown[0][1][1])}): "
            "they get a fresh state's values under the bucket's counts, so once they get "
            "gradients an Adam bias correction is the bucket's, not their own first step's "
            "(parameters that never get one: no matter). Load where they are in buckets of "
            "their own (the stage and units= the state was saved with, or a smaller "
            "bucket_size_mb) to follow torch exactly", stacklevel=3)


def _counting_layout(layouts: list) -> tuple[dict, list[str]] | None:
    """The saved layout whose scalars a bucket of parameters with ``layouts`` takes: the
    first that was stepped (Note [a state never stepped]), or else the first."""
    present = [layout for layout in layouts if layout is not None]
    return next((layout for layout in present if not _never_stepped(layout)),
                present[0] if present else None)


def _never_stepped(layout: tuple[dict, list[str]]) -> bool:
    """The state of a class that makes one before its first step (Adagrad), saved for a
    parameter that never had a gradient: its counts zero.

    Note [a state never stepped]:
        A torch state dict of Adagrad, which makes every parameter's state when it is
        built, holds ``step`` 0 for a parameter that never had a gradient (an unused
        branch under DDP) beside ``step`` 2 for the rest. A bucket holds one count, so
        such a load was refused as differing counts, naming stage-3 units (a reviewer's
        probe, from a plain DDP run). Such a count is not the parameter's own history
        but the class's starting value: where the count does not change the class's
        step (Note [scalars that do not change the step] in _inner.py: Adagrad without
        ``lr_decay``), the bucket's count takes it, as it takes a parameter with no
        state at all (its per-element states load as saved, the class's own starting
        values), with the same warning; where it does, the load is refused as before (a
        first version of this took it under any count: Adagrad with ``lr_decay`` 0.1
        then drifted 4.0e-2 from DDP, a reviewer's probe). A bucket of parameters that
        none stepped keeps the zero counts."""
    scalars = layout[0]
    return bool(scalars) and all(not torch.as_tensor(v).any() for v in scalars.values())


def _same_scalars(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(torch.as_tensor(a[k]).cpu(), torch.as_tensor(b[k]).cpu()) for k in a)


def _scalars(scalars: dict) -> str:
    return ", ".join(f"{k}={torch.as_tensor(v).item():g}" if torch.as_tensor(v).numel() == 1
                     else k for k, v in scalars.items())


def ranges_to_load(opt) -> dict[str, list[tuple[int, int]]]:
    """Each parameter's element ranges ``load_from`` asks its source for on this rank
    (in this run's memory order): its overlap with this rank's shard of its bucket, the
    whole of a parameter this rank steps whole or one outside the buckets. A source may
    keep only what overlaps them (Note [a checkpoint file read once] in _file_pages.py)."""
    view = opt.sharding
    names = parameter_names(view.model)
    ranges: dict[str, list[tuple[int, int]]] = {}
    for bucket in view.every_bucket:
        if bucket.owns_whole_parameters:  # _load_whole: the parameters this rank owns
            for index in bucket.layout.owned(bucket.rank):
                param = bucket.params[index]
                ranges.setdefault(names[id(param)], []).append((0, param.numel()))
            continue
        for index, param in enumerate(bucket.params):
            overlap = bucket.layout.overlap(index, bucket.rank)
            if overlap is not None:
                ranges.setdefault(names[id(param)], []).append(
                    (overlap.param_start, overlap.param_stop))
    for name, param in outside_buckets(view):
        ranges.setdefault(name, []).append((0, param.numel()))
    return ranges


@torch.no_grad()
def load_from(opt, source: Source, with_states: bool = True) -> None:
    """Fill every shard, master and optimizer state of this rank from ``source`` (without
    ``with_states``: the values only, the optimizer state stays), then rebuild the
    parameters: stages 1-2 all-gather them, stage 3 leaves them sharded. Collective
    (the all-gather); call it on every rank."""
    view = opt.sharding
    names = parameter_names(view.model)
    for bucket in view.every_bucket:
        target = bucket.master if bucket.master is not None else bucket.shard
        source.prepare(bucket.params, target.dtype)
        if bucket.owns_whole_parameters:
            _load_whole(opt, bucket, source, names, with_states)
            continue
        wide = torch.zeros_like(target)
        # a bucket the inner optimizer steps: not a stage-3 bucket of frozen fp32
        # parameters, whose shard is its master (frozen since the save: its saved state
        # goes unused; it raised a KeyError halfway through the load, a helper's probe)
        stepped = bucket.master is not None and view.inner.owner_of(bucket.master) is not None
        layouts = [source.optimizer_layout(names[id(p)]) if stepped and with_states else None
                   for p in bucket.params]
        # the layout of the first parameter that has state (and was stepped: Note [a
        # state never stepped]): one without (no gradient yet) gets a fresh state's
        # values, not the loss of its whole bucket's state
        layout = _counting_layout(layouts)
        states = {key: torch.zeros_like(target, dtype=torch.promote_types(
                      target.dtype, _own_dtype(layout, key, target)))
                  for key in (layout[1] if layout else [])}
        # Note [a fresh state inside a shard's]: the whole bucket's, the same on every rank
        without_state = {index for index, found in enumerate(layouts)
                         if states and found is None}
        for index, param in enumerate(bucket.params):
            overlap = bucket.layout.overlap(index, bucket.rank)
            if overlap is None:
                continue
            name = names[id(param)]
            span = overlap.shard_span
            wide[span] = source.values(name, overlap.param_start, overlap.param_stop)
            if states and index not in without_state:
                for key, value in source.states(name, overlap.param_start, overlap.param_stop).items():
                    states[key][span] = value
        target.copy_(wide)
        view.masters.to_shard(bucket)
        if stepped and with_states:
            view.inner.state.pop(bucket.master, None)
            if layout is not None:
                group = view.inner.param_groups[bucket.group_index]
                scalars = {k: _placed_scalar(k, v, bucket.master, group) for k, v in layout[0].items()}
                view.inner.state[bucket.master] = {**scalars, **{
                    k: v.to(_own_dtype(layout, k, v)) for k, v in states.items()}}
            bucket.without_state = without_state
            give_fresh_state(bucket, without_state, view.inner)
    for name, param in outside_buckets(view):
        source.prepare([param], param.dtype)
        param.copy_(source.values(name, 0, param.numel()).view_as(param))
    view.stage.after_step()  # the shards changed: parameters follow, as after a step


def _load_whole(opt, bucket, source: Source, names: dict[int, str], with_states: bool) -> None:
    """``load_from`` for a bucket of parameters stepped whole: each owner takes its
    parameters' values and their whole state; padding stays zero."""
    view = opt.sharding
    wide = torch.zeros_like(bucket.master)
    states = {}
    for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped):
        name, numel = names[id(bucket.params[index])], bucket.params[index].numel()
        overlap = bucket.layout.overlap(index, bucket.rank)
        if overlap is not None:
            wide[overlap.shard_span] = source.values(name, 0, numel)
        layout = source.optimizer_layout(name) if with_states else None
        if layout is not None:
            group = view.inner.param_groups[bucket.group_index]
            state = {k: _placed_scalar(k, v, stepped, group) for k, v in layout[0].items()}
            for key, flat in source.states(name, 0, numel).items():
                # the parameter's shape and strides, the state's own dtype (Note
                # [per-element states of their own dtype])
                value = torch.empty_like(stepped, dtype=_own_dtype(layout, key, stepped))
                value.copy_(from_memory_order(flat.to(value.dtype), value.shape, bucket.orders[index]))
                state[key] = value
            states[index] = state
    bucket.master.copy_(wide)
    view.masters.to_shard(bucket)
    if with_states:
        for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped):
            view.inner.state.pop(stepped, None)
            if index in states:
                view.inner.state[stepped] = states[index]


def _placed_scalar(key, value, master: torch.Tensor, group: dict):
    """A saved per-tensor state entry, placed where ``torch.optim.Optimizer.load_state_dict``
    puts it (the rule of torch's Note [special device hosting for step]): ``step`` stays a
    CPU tensor unless the group is ``fused`` or ``capturable``, whose kernels read it on
    the parameter's device as fp32; any other tensor follows the master's device and
    dtype. Saved states come from CPU files or rank 0's CPU dicts."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return value.to(dtype=torch.float32, device=master.device, copy=True)
        return value.clone()
    if master.is_floating_point():
        return value.to(dtype=master.dtype, device=master.device, copy=True)
    return value.to(device=master.device, copy=True)
