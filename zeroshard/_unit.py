"""Stage 3 units: a module's own parameters, gathered and released as one.

Which modules become units and which unit owns each parameter is decided in
_unit_tree.py; here a ``Unit`` holds its buckets and its shard state, whose
transitions are checked.
"""

from __future__ import annotations

import dataclasses
import enum
import weakref

import torch
from torch import nn

from . import _comm
from ._bucket import FlatBucket, Ownership
from ._hooks import WeakHook
from ._masters import ShardMasters
from ._module_hooks import user_backward_hooks
from ._unit_tree import unit_owners


class ShardState(enum.Enum):
    SHARDED = "sharded"  # full buffers freed; only the shards exist
    GATHERING = "gathering"  # an all-gather is in flight (a prefetch)
    GATHERED = "gathered"  # parameters hold their full values


# The only moves a unit's state makes; any other is a bug in the gatherer, refused.
_MOVES = {(ShardState.SHARDED, ShardState.GATHERING), (ShardState.GATHERING, ShardState.GATHERED),
          (ShardState.GATHERED, ShardState.SHARDED)}


@dataclasses.dataclass
class UnitRecord:
    """What the passes since the last backward did with a unit. ``Unit.end_backward``
    is the one place it starts again."""
    armed: bool = False  # gathered for this backward already (its pre-backward ran)
    grads_arrived: set[int] = dataclasses.field(default_factory=set)  # ids, accumulated
    # A forward with grad enabled ran it, or a gradient came, in this backward's passes,
    # or it holds a gradient a no_sync() backward left in .grad (Unit.holds_local_grads).
    ran: bool = False
    # A gradient came in this backward's passes, or a no_sync() backward left one in
    # .grad: what Note [ran on no rank] in stage3.py agrees on (a unit can run and get
    # none, its output reaching no loss)
    got_gradient: bool = False
    # Note [run twice from the second step on]: training forwards' runs of it under
    # activation checkpointing, and its recomputations in this backward
    checkpointed_runs: int = 0
    recomputations: int = 0
    # Note [backward past a unit's inputs] in _frozen_reads.py: a training forward
    # watched its inputs; hooks on those that require grad, and how many have had
    # their gradient in this backward
    inputs_watched: bool = False
    input_hooks: list = dataclasses.field(default_factory=list)
    inputs_reached: int = 0
    leaf_input: bool = False  # an input that requires grad was a leaf: not released so
    # Note [module backward hooks] in stage3.py: a training forward found a module of its
    # subtree with a backward hook (torch calls the hooks it took then, even if removed since)
    module_hooks_at_forward: bool = False


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
        # last), so only a unit without frozen parameters is released at its last
        # gradient; one with them, once backward has read them (Note [frozen
        # parameters kept on a ctx] in _frozen_reads.py), unless a custom Function
        # keeps one on its ctx, unseen.
        self.release_when_grads_done = all(p.requires_grad for b in buckets for p in b.params)
        self.frozen_on_a_ctx = False
        self.record = UnitRecord()
        self.masters: ShardMasters = ShardMasters()  # the stage's, set by the UnitGatherer
        # Some rank ran it twice in one forward pass of the first step: kept gathered
        # until the pass ends (Note [runs before the walk moves on] in stage3.py).
        self.held_for_pass = False
        # Note [frozen units backward never reads] in _walk.py: every rank leaves it out
        # of the backward walk; and, where this rank's backward may read it all the same,
        # it is kept gathered here until that backward ends, while its collectives follow
        # the state it has on the other ranks (``_state_elsewhere``)
        self.skipped_in_backward = False
        self.kept_here = False
        self._state_elsewhere = ShardState.GATHERED
        # since the ranks last compared it: a training forward left something backward
        # may read its parameters through (an output that requires grad, a saved view of
        # them, a run backward may repeat)
        self.backward_may_read = False
        # Note [released once backward has read it] in stage3.py: the views of its
        # parameters its forwards saved that backward has not read yet (they leave with
        # the graph that holds them), and whether another unit's forward saved one.
        self.saved_unread: weakref.WeakSet = weakref.WeakSet()
        self.saved_by_another_unit = False
        # Note [module backward hooks]: set as each backward begins: released once
        # backward is past its inputs (a module of its subtree has a backward hook)
        self.awaits_module_hooks = False
        # address of a gathered buffer's storage -> its unit, shared by a stage's units
        self.gathered_storages: dict[int, Unit] = {}
        # whose gradients come from an embedding's backward, which reads no weight
        self.embedding_weight_ids = {
            id(m.weight) for m in module.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))} & self.trainable_ids

    def kept_through_backward(self) -> bool:
        """Not released once its gradients are in: held for each pass (Note [runs before
        the walk moves on] in stage3.py), or run more than once under checkpointing and
        not yet recomputed as often (Note [run twice from the second step on])."""
        record = self.record
        return self.held_for_pass or (record.checkpointed_runs > 1
                                      and record.recomputations < record.checkpointed_runs)

    def note_backward_may_read(self) -> None:
        """Note [frozen units backward never reads] in _walk.py: a training forward left
        something backward may read this unit's parameters through, while they are
        gathered. Where every rank leaves the unit out of the backward walk, keep them
        gathered here until backward ends."""
        self.backward_may_read = True
        if self.skipped_in_backward and not self.kept_here and self.state is ShardState.GATHERED:
            self.kept_here = True
            self._state_elsewhere = ShardState.GATHERED

    def awaits_gather(self) -> bool:
        """Whether the next step of a walk gathers it: it is released on every rank
        (here too, unless it is only kept here)."""
        return (self._state_elsewhere if self.kept_here else self.state) is ShardState.SHARDED

    def end_backward(self, synced: bool) -> None:
        """A backward ended: release, start a new record. Kept here (Note [frozen units
        backward never reads] in _walk.py), it stays gathered through a backward inside
        no_sync(): a later backward of the window may read it (a retained graph, the
        graph of another forward), and only a synced one's comparison puts it back into
        the walk."""
        if synced:
            self.kept_here = False
        self.release()
        for handle in self.record.input_hooks:
            handle.remove()
        self.record = UnitRecord()

    def holds_local_grads(self) -> bool:
        """Whether a no_sync() backward left a gradient in some parameter's ``.grad``
        that ``zero_grad()`` (the optimizer's or the model's) has not dropped since: then
        the unit ran in this synced backward's window even if not in its own pass."""
        return any(p.grad is not None for b in self.buckets for p in b.params if p.requires_grad)

    def _move(self, to: ShardState) -> None:
        if (self.state, to) not in _MOVES:
            raise RuntimeError(f"zeroshard internal error: unit {self.name} cannot go from "
                               f"{self.state.value} to {to.value}; please report it")
        self.state = to

    def parameters_have_user_hooks(self) -> bool:
        """Whether a hook other than zeroshard's sits on one of its parameters (it may read
        the parameter when the gradient comes)."""
        return any(p._post_accumulate_grad_hooks
                   or any(not isinstance(h, WeakHook) for h in (p._backward_hooks or {}).values())
                   for b in self.buckets for p in b.params)

    def modules_have_backward_hooks(self) -> bool:
        """Whether a module in this unit's subtree has a backward hook or pre-hook
        (``register_full_backward_hook``, ``register_full_backward_pre_hook``): it runs
        after the module's parameters' gradients and may read them (Note [module backward
        hooks] in stage3.py)."""
        return any(m._backward_hooks or (m._backward_pre_hooks and user_backward_hooks(m))
                   for m in self.module.modules())

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buckets)

    def gather(self, group, stats: _comm.CommStats, label: str) -> None:
        """Start all-gathering every bucket into its full buffer (idempotent)."""
        if self.kept_here:
            self._gather_alongside(group, stats, label)
            return
        in_backward = torch._C._current_graph_task_id() != -1
        if self.state is not ShardState.SHARDED:
            for bucket in self.buckets:  # Note [masters written between steps]
                self.masters.before_gather(bucket, in_backward, gathered=True)
            return
        for bucket in self.buckets:  # all checked before the first collective
            bucket.refuse_writes_while_released()
            self.masters.before_gather(bucket, in_backward, gathered=False)
        for bucket in self.buckets:
            bucket.allocate()
            self._works.append(_comm.all_gather(bucket.flat, bucket.shard, group=group,
                                                stats=stats, label=label, async_op=True))
        self._move(ShardState.GATHERING)

    def _gather_alongside(self, group, stats: _comm.CommStats, label: str) -> None:
        """Kept here (Note [frozen units backward never reads] in _walk.py): join the
        all-gathers the other ranks issue where they released it, into a scratch buffer
        (the kept one may be read by this rank's backward), and wait for them."""
        if self._state_elsewhere is not ShardState.SHARDED:
            return
        for bucket in self.buckets:
            scratch = torch.empty_like(bucket.flat)
            _comm.wait_all([_comm.all_gather(scratch, bucket.shard, group=group, stats=stats,
                                             label=label, async_op=True)])
            _comm.release([scratch])  # a finished work holds it a while (Note [finished work])
        self._state_elsewhere = ShardState.GATHERED

    def wait(self) -> None:
        if self.state is ShardState.GATHERING:
            _comm.wait_all(self._works)
            self._works.clear()
            for bucket in self.buckets:
                bucket.view_gathered()  # Note [not a view while gathering] in _bucket.py
                bucket.note_gathered()
                self.gathered_storages[bucket.flat.untyped_storage().data_ptr()] = self
            self._move(ShardState.GATHERED)

    def release(self, views_at_gather: dict[int, int] | None = None) -> int:
        """Free the full buffers (idempotent); a gather in flight is waited for first.
        ``views_at_gather``: id(bucket) -> its ``views_elsewhere()`` after the gather of a
        ``summon_full_params()`` block; the bytes of the buffers left to tensors taken
        inside it are returned (Note [views taken inside summon_full_params]).
        What was written to the parameters meanwhile reaches this rank's shards first
        (Note [writes inside a forward] in _bucket.py). Kept here, it stays gathered,
        released only as far as its collectives go (Note [frozen units backward never
        reads] in _walk.py)."""
        self.wait()
        if self.state is not ShardState.GATHERED:
            return 0
        for bucket in self.buckets:
            # Note [new .data inside a forward] in _bucket.py, then any write in place
            replaced = bucket.adopt_data_replaced_while_gathered()
            if replaced or bucket.written_while_gathered():
                with torch.no_grad():
                    self.masters.take_gathered_writes(bucket)
        if self.kept_here:  # its shards, which the other ranks' gathers read, hold the writes
            self._state_elsewhere = ShardState.SHARDED
            return 0
        left = 0
        for bucket in self.buckets:
            self.gathered_storages.pop(bucket.flat.untyped_storage().data_ptr(), None)
            if bucket.free(None if views_at_gather is None else views_at_gather.get(id(bucket))):
                left += bucket.nbytes()  # the new buffer's size: the one left behind
        self._move(ShardState.SHARDED)
        return left

    def __repr__(self) -> str:
        return f"Unit({self.name}, {self.state.value}, {self.nbytes()} bytes)"


def build_units(model: nn.Module, unit_modules: list[nn.Module], group_of: dict[int, int],
                rank: int, world_size: int, full_precision: frozenset[int] = frozenset(),
                ownership: Ownership | None = None) -> list[Unit]:
    """One bucket per (param group, dtype, device, requires_grad, kept in full precision)
    of each unit's own parameters."""
    owner = unit_owners(model, unit_modules)
    ownership = ownership or Ownership({}, world_size)
    names = {id(m): name for name, m in model.named_modules()}
    owned: list[list[nn.Parameter]] = [[] for _ in unit_modules]  # in model.parameters() order
    for param in model.parameters():  # once: a walk per unit made building quadratic
        owned[owner[id(param)]].append(param)
    units = []
    for index, module in enumerate(unit_modules):
        by_key: dict[tuple, list[nn.Parameter]] = {}
        for param in owned[index]:
            key = (group_of.get(id(param), -1), param.dtype, param.device, param.requires_grad,
                   id(param) in full_precision)
            by_key.setdefault(key, []).append(param)
        buckets = [FlatBucket(params, key[0], rank, world_size, full_precision=key[4],
                              owners=ownership.owners(params, key[0]))
                   for key, params in by_key.items()]
        units.append(Unit(module, names.get(id(module), ""), buckets))
    return units
