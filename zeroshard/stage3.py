"""ZeRO stage 3: stage 2 plus parameters partitioned, gathered per unit on demand.

A stage-3 stage is stage 2's gradient store and the gradient reducer, plus the
``UnitGatherer`` here, which gathers and releases units around their forward and
backward and tells the reducer when each reduction is due (Note [one order]).

At rest a rank holds only its shard of every parameter; the parameters themselves
are views of full buffers whose storage is freed. Around each unit's forward the
unit's buffers are all-gathered and (with ``reshard_after_forward``) freed again;
in backward they are gathered again when the unit's outputs receive their
gradient, and freed once all the unit's parameter gradients are accumulated.
Gradients are handled exactly as in stage 2 (``ShardedGradients``): reduce-scattered into
shards in one fixed bucket order, full gradients freed as their bucket is reduced.

Note [gather schedule]:
    Every rank must issue the same all-gathers in the same order, even when its data
    runs other units than another rank's (a branch taken on some ranks only). So
    gathers follow a fixed schedule, not the units a rank happens to run: one order
    of units for forward passes and one for backward passes (with
    ``reshard_after_forward``). Entering a unit walks the schedule up to it, and
    the units walked past, which this rank skipped, are gathered and released at
    once; the end of the pass walks the rest. So every rank gathers every unit once
    per pass, at the same point of the schedule, and the next unit of the schedule
    is prefetched while the current one computes.

    The first step walks the module tree's order: pre-order for forward (a unit
    before the units inside it, siblings in registration order) and reverse
    post-order for backward. Meanwhile each rank records the order in which it
    enters the units; at the end of the first backward the ranks compare their
    records (one all-reduce), and if all recorded the same order, later steps walk
    that one, so a model that calls its units in another order than it registers
    them still gathers each unit once. A unit entered after the walk passed it
    (out of order) is gathered a second time, with a warning; every rank must then
    do the same. A unit run twice in one pass is gathered again on its second run
    (every rank must run it twice), unless it runs again before the walk moves on
    (Note [runs before the walk moves on]).

    In backward, a unit the walk passes over got no gradient on this rank (it did not
    run here, or its outputs did not reach this rank's loss), and none can come: its
    parameters count as ready with a zero gradient when the walk passes it. So backward
    must reach units in the schedule's order; a unit whose gradient arrives after its
    reduce-scatter was launched is reduced a second time (Note [late gradients]).

    Which units ran on no rank at all (their gradient is absent, not zero, and the
    optimizer skips them as torch skips a parameter whose gradient is None) is no
    longer something a rank can know alone: after each synced backward the ranks
    all-reduce one 4-byte flag per unit other than the root, and one per bucket
    for the late ones (``agree_on_late``).
    A parameter must be used
    inside the forward of a module that holds it (in ``_parameters``), or of one of
    that module's ancestor units.

Note [one order]:
    Every collective runs on the optimizer's one process group (on a mesh: its
    shard group, and the replicate group for what spans replicas, Note
    [collectives on a mesh] in _comm.py), so every rank must
    issue the same collectives in the same order (NCCL requires it of one
    communicator; gloo aborts on a mismatch). Gathers follow the walk (Note [gather
    schedule]), but a reduce-scatter launched when a unit's last gradient arrives
    would interleave with them in an order that depends on the data: a rank that ran
    a unit reduces it while computing, one that skipped it when the walk passes it.
    So in a backward walk (with ``reshard_after_forward``) reductions launch only at
    the walk's steps, and each step issues the same collectives whether this rank
    runs the unit or passes over it (``_step``): first the reduce-scatters of the
    buckets due by that point, in list order, then the unit's gather, then the next
    unit's prefetch. A bucket is due at a fixed point of the walk, the same on every
    rank: once as many units have been entered as when its last gradient came in the
    first backward, on the rank where that was latest (agreed with the recorded orders,
    ``_adopt_recorded_orders``); where the ranks recorded different orders, once the
    walk has passed its unit and every unit inside it (``_due_when_walked_past``, also
    the first backward's rule). The list of buckets is sorted by that point, so due
    buckets are at its front. A bucket due before its gradient is complete (data that
    runs units in another order than the first step) launches with what it has, and
    what comes later is reduced again at the end of backward (Note [late gradients]),
    where the ranks agree on which buckets are late; the numbers stay right and
    only the bytes grow. After more than one training forward pass, whose backwards
    interleave, every reduction waits for the end of backward. Without resharding,
    backward walks only if the units were released since the forward (a no_grad
    forward or ``summon_full_params()`` in between, a second backward through a
    retained graph: every rank holds all units or none), and then every reduction
    waits for the end; otherwise it issues no gather (the units stay gathered) and
    reductions launch as their buckets become ready, in list order. Gathers outside
    the walk are avoided where ranks would differ: a unit some rank runs twice is not
    released when its gradients are done (reentrant checkpointing recomputes its
    second run later), nor, after two forwards, a unit the walk passes that ran in
    one of them (the other forward's backward still needs it). As every
    rank issues the same sequence, a rank may wait on any collective it issued (a
    new reduce buffer waits for the reductions in flight): the others issue it too
    before anything that could wait on this rank. ``comm_stats.trace`` records the
    sequence; the tests compare it across ranks for every case they train.

Note [runs before the walk moves on]:
    A unit run again in the same pass must not need a gather that ranks which did
    not run it (or ran it once) would not issue: their collectives would no longer
    match, and gloo aborts (NCCL hangs). So a unit whose forward ends is not
    released at once but when the forward walk next moves on to a later unit, or
    when the pass ends. A unit run twice in a row (a block reused, ALBERT-style), its
    nested units included, runs the second time on what is still gathered, with no
    collective, whatever other ranks run. Parameters held at once do not grow:
    the unit the walk moves on to was prefetched while the finished one computed, and
    the last unit of the schedule, with nothing to move on to, is released at once
    (what follows it, a model's head and loss, is often the forward's peak).
    A unit run twice with other units between (a shared layer, or a layer of a
    reused block that is not a unit itself) would be released in between; so the
    ranks note in the first step which units some rank entered twice in one pass
    (``_adopt_recorded_orders``), and from then on those stay gathered until the
    pass ends. In that first step, before anything is known, every rank must run
    such a unit the same number of times (Note [first-step agreement] refuses a rank
    that does not).

Note [first-step agreement]:
    Until the first backward ends, nothing tells the ranks which units repeat or in
    which order the model runs them (Note [gather schedule]), so a rank whose data runs
    a unit twice, or units in another order, would gather what the others do not:
    gloo aborts both processes, NCCL hangs. So in that first step every gather of a
    pass is preceded by one 8-byte all-reduce in which the ranks compare which unit
    they are about to gather; if they differ, every rank raises the same error there,
    before the mismatched gather, naming the units and the rule. A comparison waits
    for its answer, and a prefetch that waits is none, so the first step gathers a
    unit only when it is needed. The comparisons stop
    with the recording (``_adopt_recorded_orders``), so later steps pay nothing;
    ``comm_stats`` counts them under ``all_reduce``. The error ends the run, not the
    step: the optimizer is left mid-pass (a rank that raised inside backward may have
    reductions in flight that the others never join), so fix the first step and build
    the optimizer, and if needed the process group, again.

Note [saved tensors]:
    Backward gathers a unit when a tensor its forward returned gets its gradient,
    which needs the forward hook to find those tensors: it looks inside tuples,
    lists and dicts, not inside a dataclass or any other object. So during each
    unit's training forward a pair of saved-tensor hooks is active too: when backward
    unpacks a view of the unit's own parameters that forward saved (a weight for a
    matmul's input gradient), the unit is gathered first if it is not already.
    Backward reads parameters only through such saved views, so it never computes
    with a released unit's placeholders, whatever the unit returns. An activation the
    unit saved needs no gather (gathering for one gathered again a unit released
    once its gradients were done: one all-gather too many, found by the thorough
    profile). The hooks cost one Python call per saved tensor on save and on use.
    Inside another
    pair of saved-tensor hooks (non-reentrant activation checkpointing, offloading)
    none are added: those must see every tensor saved inside them, and a checkpointed
    unit is gathered by its recomputation (Note [recomputation]).

Note [autocast casts]:
    Under ``torch.autocast`` without a MixedPrecision policy, each op casts the
    parameters it uses (fp32 -> bf16), and what the op saves for backward is that
    cast. Kept as they are, those casts would hold a low-precision copy of every
    unit's parameters from forward until backward, and the sharding of parameters
    would be lost there. So the unit's saved-tensor hooks (Note [saved tensors]) save
    a cast of one of the unit's own parameters as a recipe instead (the parameter,
    the dtype and the view's geometry): backward gathers the unit and casts again,
    which gives the same values because the shards do not change between forward
    and backward. A cast is recognised by its autograd history (a copy of the
    parameter's AccumulateGrad leaf), so casts of frozen parameters, which have none,
    are saved as they are: a model with large frozen parts (LoRA) should use a policy.
    Autocast's own cache is left alone: it keeps one cast of each parameter until the
    autocast region ends, so during the forward the casts of every unit run so far
    are alive (a policy avoids that too), but a parameter used twice shares one cast
    whose gradients add up in low precision, as under DDP; emptying the cache after
    each unit gave each use its own cast, and gradients 2e-4 off DDP's in bf16.

Note [recomputation]:
    Activation checkpointing runs a unit's forward again during backward. The
    hooks recognise it by the BACKWARD state: they gather as usual but neither
    release (backward is about to use the parameters) nor arm backward hooks.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from . import _comm
from ._hooks import LoopSwitches, WeakHook
from ._reducer import GradientReducer, Phase
from ._unit import Schedule, ShardState, Unit, forward_and_backward_orders
from .mixed_precision import GradientDtypes
from .stage2 import ShardedGradients


def trainable_buckets(units: list[Unit]):
    """The reducer's first launch order: units from the last to the root (roughly
    backward's order), until Note [one order] sorts them by when the backward walk is
    done with them."""
    return [b for u in reversed(units) for b in u.buckets if b.params[0].requires_grad]


class UnitGatherer:
    """Gathers and releases stage 3's units around their forward and backward passes,
    walking one schedule on every rank (Note [gather schedule]), and decides for the
    reducer when each bucket's reduction is due (Note [one order])."""

    def __init__(self, model, units: list[Unit], reducer: GradientReducer,
                 store: ShardedGradients, dtypes: GradientDtypes, switches: LoopSwitches,
                 group, stats, label: str, reshard_after_forward: bool, handles: list) -> None:
        self.reducer = weakref.proxy(reducer)  # it holds this (Note [no reference cycles])
        self.store = store
        self.dtypes = dtypes
        self.switches = switches
        self.group = group
        self.stats = stats
        self.label = label
        self.units = units
        self.root = units[0]
        self.reshard_after_forward = reshard_after_forward
        self._unit_of = {id(p): u for u in units for b in u.buckets for p in b.params}
        self._index = {id(u): i for i, u in enumerate(units)}
        # Units some rank may skip (the root always runs) that have gradients to reduce:
        # one "ran" flag each is all-reduced after a synced backward (agree_on_late).
        self._flagged = [u for u in units[1:] if u.trainable_ids]
        self._ran_somewhere: set[int] = set()
        forward_order, backward_order = forward_and_backward_orders(model, units)
        self._forward = Schedule(forward_order)  # Note [gather schedule]
        self._backward = Schedule(backward_order)
        self._training_forward = False  # the current forward began with grad enabled
        self._finished: list[Unit] = []  # Note [runs before the walk moves on]
        self._watching: list[tuple[Unit, object]] = []  # Note [saved tensors]: open hook pairs
        self._order_warned = False
        # Note [one order]: the units inside each unit (itself included); when each bucket
        # is due in the backward walk; this backward's way of launching reductions; the
        # training forward passes since the last backward; and, while the first backward
        # records, how many units had been entered when each bucket's last gradient came.
        module_unit = {id(u.module): u for u in units}
        self._inside = {id(u): [module_unit[id(m)] for m in u.module.modules() if id(m) in module_unit]
                        for u in units}
        self._due = self._due_when_walked_past()
        self._sort_launch_list(reversed(units))
        self._walking = False  # this backward walks the schedule (Note [one order])
        self._launch_at_walk = False
        self._training_passes = 0
        self._entered_before_ready: dict[int, int] = {}
        self._reading_structure = 0  # inside reading_structure(): state_dict() reads no values
        self.device = next((b.flat.device for u in units for b in u.buckets), torch.device("cpu"))
        self._unclaimed: dict[int, torch.Tensor] = {}  # reductions of units that did not run here
        for module in model.modules():
            owners = {id(self._unit_of[id(p)]): self._unit_of[id(p)]
                      for p in module._parameters.values() if p is not None}
            if owners:
                guard = WeakHook(self._refuse_if_sharded, list(owners.values()))
                handles.append(module.register_state_dict_pre_hook(guard))
                handles.append(module.register_load_state_dict_pre_hook(guard))
        for unit in units:
            handles.append(unit.module.register_forward_pre_hook(
                WeakHook(self._pre_forward, unit)))
            handles.append(unit.module.register_forward_hook(
                WeakHook(self._post_forward, unit)))
            unit.release()  # the shards hold rank 0's values (broadcast, then placed)
        # Note [saved tensors]: a released parameter's storage is its bucket's placeholders
        self._placeholder_owner = {b.placeholders.untyped_storage().data_ptr(): (u, b)
                                   for u in units for b in u.buckets}

    # -- forward --------------------------------------------------------------------

    def _pre_forward(self, unit: Unit, module, args) -> None:
        if self.switches.summoned:  # Note [forward inside summon]
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"zeroshard stage 3: unit {unit.name} ran a forward with grad enabled inside "
                    "`with opt.summon_full_params():`; there every parameter is gathered and "
                    "backward cannot reduce and release units. Run forwards there under "
                    "torch.no_grad() (evaluation, generate()), or train outside the block")
            return
        if self.reducer.phase is Phase.BACKWARD:  # Note [recomputation]
            if self._walking:
                self._walk(self._backward, unit)
            else:
                self._gather_now(unit)  # kept gathered since forward
            return
        if unit is self.root:  # a new forward pass
            self._training_forward = torch.is_grad_enabled()
            self._training_passes += self._training_forward
            self._forward.restart()
            self._stop_watching(None)  # pairs a forward that raised left open
        if self._training_forward:
            unit.ran_since_backward = True
        self._walk(self._forward, unit)
        if torch.is_grad_enabled() and _may_watch_saved_tensors():  # Note [saved tensors]
            watch = SavedTensorWatch(self, unit)
            hooks = torch.autograd.graph.saved_tensors_hooks(watch.pack, watch.unpack)
            hooks.__enter__()
            self._watching.append((unit, hooks))

    def _post_forward(self, unit: Unit, module, args, output) -> None:
        if self.switches.summoned:  # Note [forward inside summon]
            return
        if self.reducer.phase is Phase.BACKWARD:
            return  # Note [recomputation]
        self._stop_watching(unit)
        if torch.is_grad_enabled():
            for tensor in tree_flatten(output)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    self._arm_pre_backward(tensor, unit)
        # Without resharding, a unit run under no_grad inside a training forward
        # (reentrant checkpointing) stays gathered for its recomputation in backward.
        if (self.reshard_after_forward or not self._training_forward) and not unit.held_for_pass:
            if self._forward.next_unit() is None:  # nothing to move on to: release now
                unit.release()
            else:
                self._finished.append(unit)  # Note [runs before the walk moves on]
        if unit is self.root:  # the end of forward
            for skipped in self._forward.walk_to_end():
                self._pass_over(skipped)
            if self.reshard_after_forward or not self._training_forward:
                self._finished.clear()
                for other in self.units:  # finished, or a prefetch the forward did not use
                    other.release()

    def _stop_watching(self, unit: Unit | None) -> None:
        """Close the saved-tensor hooks opened for ``unit`` (and any opened inside it and
        left open by a forward that raised); None closes every pair."""
        if unit is not None and all(u is not unit for u, _ in self._watching):
            return
        while self._watching:
            opened_for, hooks = self._watching.pop()
            hooks.__exit__(None, None, None)
            if opened_for is unit:
                return

    # -- backward -------------------------------------------------------------------

    def begin_backward(self) -> None:
        """A backward begins (the reducer's first hook in it)."""
        if torch.is_grad_enabled():  # the engine runs with create_graph=True
            raise RuntimeError(
                "zeroshard stage 3: a backward with create_graph=True (a gradient penalty "
                "through torch.autograd.grad(..., create_graph=True), a double backward) "
                "builds a graph over gathered parameters that stage 3 releases when the "
                "backward ends; train such a loss with stage 1 or 2")
        # Note [one order]: backward walks the schedule where it must gather: with
        # resharding, or when the units were released since the forward (a no_grad
        # forward or summon_full_params() in between, a second backward through a
        # retained graph); every rank holds all units gathered or none at this point.
        self._walking = self.reshard_after_forward or any(
            u.state is not ShardState.GATHERED for u in self.units if u.buckets)
        # Reductions launch as the walk reaches them only where the list is sorted for
        # it (with resharding) and after exactly one training forward; after two (their
        # backwards interleave) they wait for the end of backward.
        self._launch_at_walk = self.reshard_after_forward and self._training_passes == 1

    @property
    def launches_as_ready(self) -> bool:
        """Note [one order]: with a backward walk, reductions launch at its steps, not
        as gradients happen to arrive; without one, backward issues no gather, and they
        launch as they become ready, in list order."""
        return not self._walking

    def _launch_due(self, position: int) -> None:
        """Note [one order]: the backward walk reaches the unit at ``position`` of its
        schedule: launch the buckets at the front of the list that are due by then."""
        if not (self._launch_at_walk and self.switches.require_sync):
            return
        count = self.reducer.next_launch
        while count < len(self.reducer.buckets) and self._due[id(self.reducer.buckets[count])] <= position:
            count += 1
        self.reducer.launch_front(count)

    def check_saved_parameter(self, unit: Unit, tensor: torch.Tensor, storage: int) -> None:
        """Note [saved tensors]: ``unit``'s forward saves ``tensor`` (its storage at address
        ``storage``) for backward. If it is (a view of) a released unit's placeholder (a
        weight tied functionally, ``F.linear(h, self.emb.weight)`` with ``emb`` a unit of
        its own), the forward has just computed with NaN: refuse, on every rank alike."""
        owner = self._placeholder_owner.get(storage)
        if owner is None:
            return
        released, bucket = owner
        # parameter i's placeholder is element i of the bucket's placeholders, expanded
        name = bucket.param_names[tensor.storage_offset()]
        raise RuntimeError(
            f"zeroshard stage 3: the forward of unit {unit.name} used parameter {name!r}, "
            f"which belongs to unit {released.name} and is released outside that unit's "
            "forward (a weight tied functionally, such as F.linear(h, self.emb.weight)), so "
            "it computed with a NaN placeholder. Choose units so that the module using a "
            "parameter holds it or is an ancestor of its unit: pass units= without "
            f"{type(released.module).__name__} (e.g. the block class), or tie the weight "
            "by assignment (head.weight = emb.weight)")

    def recast_of(self, unit: Unit, tensor: torch.Tensor) -> Recast | None:
        """Note [autocast casts]: a recipe for ``tensor`` if it is (a view of) a cast of one
        of ``unit``'s own parameters, else None."""
        cast = tensor if tensor._base is None else tensor._base
        node = cast.grad_fn
        if node is None or node.name() != "ToCopyBackward0":
            return None
        source = node.next_functions[0][0]
        param = getattr(source, "variable", None)  # an AccumulateGrad node: a leaf's cast
        if param is None or self._unit_of.get(id(param)) is not unit:
            return None
        return Recast(param, cast.dtype, tensor.shape, tensor.stride(), tensor.storage_offset())

    def gather_for_saved_tensor(self, unit: Unit) -> None:
        """Note [saved tensors]: backward is about to use a tensor ``unit``'s forward saved."""
        if unit.state is ShardState.GATHERED or self.switches.summoned:
            return
        if unit.backward_armed:  # gathered for this backward and released since
            self._gather_outside_walk(unit)
        else:
            self._pre_backward(unit, None)

    def _arm_pre_backward(self, tensor: torch.Tensor, unit: Unit) -> None:
        """Call ``_pre_backward(unit)`` when ``tensor`` gets its gradient.

        A tensor can be the output of nested units (a model returning its head's
        output): the outer unit's forward ends last, so it is the earlier of them in
        the backward schedule, and its hook must run first (tensor hooks run in the
        order they were registered). One hook per tensor calls the units outermost first.
        """
        units = getattr(tensor, "_zeroshard_units", None)
        if units is None:
            tensor._zeroshard_units = units = []
            tensor.register_hook(WeakHook(self._pre_backward_all, units))
        units.insert(0, unit)

    def _pre_backward_all(self, units: list[Unit], grad: torch.Tensor) -> None:
        for unit in units:
            self._pre_backward(unit, grad)

    def _pre_backward(self, unit: Unit, grad: torch.Tensor) -> None:
        self.reducer.on_backward_start(grad)
        if unit.backward_armed:
            return
        unit.backward_armed = True
        if self._walking:
            self._walk(self._backward, unit)
        else:
            self._gather_now(unit)  # kept gathered since forward: no collective

    def on_gradient(self, bucket, index: int) -> None:
        """The store has collected parameter ``index`` of ``bucket``'s gradient."""
        param = bucket.params[index]
        unit = self._unit_of[id(param)]
        # A gradient arrived, so a forward ran the unit, even one before the last synced
        # backward: a second backward through a retained graph.
        unit.ran_since_backward = True
        unit.grads_arrived.add(id(param))
        self._note_ready(bucket)
        # A unit some rank runs twice stays gathered until backward ends: with reentrant
        # checkpointing its second run's recomputation would gather it again, on that rank
        # only (Note [runs before the walk moves on]).
        if (unit.release_when_grads_done and not unit.held_for_pass
                and unit.grads_arrived >= unit.trainable_ids):
            unit.release()  # all its gradients are accumulated: backward is done with it
            # A nested backward (Note [late gradients]) may gather it again: count afresh.
            unit.grads_arrived.clear()

    def holds(self, bucket, reduced: torch.Tensor) -> bool:
        """Whether to hold ``bucket``'s reduction instead of installing it: a unit that
        did not run here may have run nowhere, so it waits until the ranks have compared
        notes (``install_held``)."""
        if bucket.grad_shard is not None or self._unit_of[id(bucket.params[0])].ran_since_backward:
            return False
        position = self.reducer.position_of(bucket)
        held = self._unclaimed.get(position)  # reduced again (Note [late gradients])
        self._unclaimed[position] = reduced if held is None else held.add_(reduced)
        return True

    def agree_on_late(self, late: set[int]) -> list[int]:
        """Note [gather schedule]: the ranks compare notes in one all-reduce (MAX) of a
        flag per unit but the root (it ran here) and per bucket (it got gradient after
        the walk passed its unit, Note [late gradients]). Every rank reduces again the
        buckets late on any rank."""
        flags = torch.zeros(len(self._flagged) + len(self.reducer.buckets), device=self.device)
        for i, unit in enumerate(self._flagged):
            flags[i] = float(unit.ran_since_backward)
        for position in late:
            flags[len(self._flagged) + position] = 1.0
        _comm.all_reduce(flags, group=self.group, stats=self.stats, label=self.label,
                         op=dist.ReduceOp.MAX)
        flags = flags.tolist()
        self._ran_somewhere = {id(u) for u, flag in zip(self._flagged, flags) if flag}
        return [p for p, late in enumerate(flags[len(self._flagged):]) if late]

    def install_held(self) -> None:
        """Note [gather schedule]: units that ran on no rank get no gradient at all, as
        torch leaves .grad None for a parameter no rank used; the others get theirs."""
        for position, reduced in self._unclaimed.items():
            bucket = self.reducer.buckets[position]
            if id(self._unit_of[id(bucket.params[0])]) in self._ran_somewhere:
                bucket.set_grad_shard(self.dtypes.as_gradient_shard(bucket, reduced))
        self._unclaimed.clear()

    def finish_walk(self) -> None:
        """The end of backward, before its reductions are flushed: the gathers of the
        rest of the walk first, as other ranks may be waiting for them."""
        if self._walking:
            for skipped in self._backward.walk_to_end():
                self._pass_over(skipped)
            # Note [first-step agreement]: every rank ends the walk here. (Without a walk,
            # reductions launch as they become ready, so no comparison fits in between.)
            self._agree_while_recording(None)

    def end_backward(self, synced: bool) -> None:
        """The reducer has finished the backward (``synced``: outside no_sync())."""
        if self._forward.entered is not None:  # the first backward: every rank ends it here
            self._adopt_recorded_orders()
        self._backward.restart()
        self._training_passes = 0
        for unit in self.units:
            unit.release()
            unit.grads_arrived.clear()
            unit.backward_armed = False
            if synced:
                unit.ran_since_backward = False

    def _adopt_recorded_orders(self) -> None:
        """Note [gather schedule]: walk later steps in the order the first step entered
        the units, where every rank recorded the same order; else keep the module tree's.
        Note [runs before the walk moves on]: a unit some rank entered twice in one
        forward pass is held gathered until the end of each later pass.

        Note [one order]: where the ranks agreed, each bucket is due in later backward
        walks once as many units have been entered as when its last gradient came in
        the first backward, on the rank where that was latest; else when the walk has
        passed its unit.

        One all-reduce (MAX) of each unit's first-entry position in forward and in
        backward (-1: not entered), of their negations (the orders agree exactly when
        the maximum equals the minimum everywhere), of a flag per unit entered twice,
        and of each bucket's count of units entered before it was ready."""
        n_units = len(self.units)
        notes = torch.full((5 * n_units + len(self.reducer.buckets),), -1.0, device=self.device)
        positions = notes[:5 * n_units].view(5, n_units)
        for row, schedule in enumerate((self._forward, self._backward)):
            for position, unit in enumerate(schedule.entered):
                positions[row, self._index[id(unit)]] = position
        positions[2:4] = -positions[:2]
        for unit in self._forward.repeated:
            positions[4, self._index[id(unit)]] = 1.0
        entered_before_ready = notes[5 * n_units:]
        for position, bucket in enumerate(self.reducer.buckets):
            entered_before_ready[position] = self._entered_before_ready.get(
                id(bucket), len(self._backward.entered))
        self._entered_before_ready.clear()
        _comm.all_reduce(notes, group=self.group, stats=self.stats, label=self.label,
                         op=dist.ReduceOp.MAX)
        agreed = torch.equal(positions[:2], -positions[2:4])
        self._forward.stop_recording(adopt=agreed)
        self._backward.stop_recording(adopt=agreed)
        if agreed and self.reshard_after_forward:
            self._due = {id(b): int(n) for b, n in zip(self.reducer.buckets, entered_before_ready.tolist())}
        else:
            self._due = self._due_when_walked_past()
        self._sort_launch_list(reversed(self._forward.units) if agreed else reversed(self.units))
        for unit, repeated in zip(self.units, positions[4].tolist()):
            unit.held_for_pass = repeated > 0

    def _sort_launch_list(self, last_unit_first) -> None:
        """Note [launch order]: by when each bucket is due (Note [one order]); among
        equals, and without resharding (buckets launch as they become ready) by that
        alone, the units in ``last_unit_first``'s order."""
        rank = {id(b): i for i, b in enumerate(b for u in last_unit_first for b in u.buckets)}
        due = self._due if self.reshard_after_forward else dict.fromkeys(self._due, 0)
        self.reducer.launch_in_order(sorted(range(len(self.reducer.buckets)), key=lambda p: (
            due[id(self.reducer.buckets[p])], rank[id(self.reducer.buckets[p])])))

    def _due_when_walked_past(self) -> dict[int, int]:
        """Note [one order]: each bucket is due in the backward walk once the walk has
        passed its unit and every unit inside it."""
        position = {id(u): i for i, u in enumerate(self._backward.units)}
        return {id(b): 1 + max(position[id(inner)] for inner in self._inside[id(unit)])
                for unit in self.units for b in unit.buckets}

    def _note_ready(self, bucket) -> None:
        """While the first backward records: how many units had been entered when this
        bucket's latest gradient came (or its unit was passed over)."""
        if self._backward.entered is not None:
            self._entered_before_ready[id(bucket)] = len(self._backward.entered)

    # -- gather, walk the schedule ----------------------------------------------------

    def _gather_now(self, unit: Unit) -> None:
        self._start_gather(unit)
        unit.wait()

    def _start_gather(self, unit: Unit) -> None:
        unit.gather(self.group, self.stats, self.label)

    def _gather_outside_walk(self, unit: Unit) -> None:
        """A gather that is not a step of the walk (a unit run again after the walk passed
        it, or needed again after its release): every rank must issue it alike (Note [one
        order]), which the first step checks (Note [first-step agreement])."""
        if unit.state is ShardState.SHARDED and unit.buckets:
            self._agree_while_recording(unit)
        self._gather_now(unit)

    def _agree_while_recording(self, unit: Unit | None) -> None:
        """Note [first-step agreement]: until the orders are recorded, every rank is about
        to take the same step of a walk (or gather the same unit outside it, or end the
        backward: None), or every rank raises. The ranks compare the unit's position in
        one all-reduce."""
        if self._forward.entered is None or self.group.size == 1:
            return
        code = 0.0 if unit is None else float(self._index[id(unit)] + 1)
        highest, lowest = (float(t) for t in _comm.extremes(
            torch.tensor([code], device=self.device), group=self.group,
            stats=self.stats, label=self.label))
        if highest == lowest:
            return
        here = "end its backward" if unit is None else f"gather unit {unit.name}"
        others = {"ends its backward" if c == 0 else f"gathers {self.units[int(c) - 1].name}"
                  for c in (highest, lowest) if c != code}
        raise RuntimeError(
            f"zeroshard stage 3: in the first step this rank is about to {here} while another "
            f"rank {', '.join(sorted(others))}: the ranks ran "
            "units in another order, or one of them a different number of times, or some "
            "ranks ran a forward the others did not (an evaluation on some ranks only: before "
            "the first step, run it on every rank or inside opt.summon_full_params()). The first "
            "step records the order in which units run, and until its backward ends every rank "
            "must run the units in one order and each as often (from the second step on, a unit "
            "some rank runs twice stays gathered for the pass, and units may run on some ranks "
            "only). Make the first step take the same path on every rank, e.g. a first batch "
            "that runs every unit alike (Note [first-step agreement] in zeroshard/stage3.py)")

    def _walk(self, schedule: Schedule, unit: Unit) -> None:
        """Note [gather schedule]: walk to ``unit``, gather it, prefetch the next one."""
        passed = schedule.walk_to(unit)
        if passed is not None and schedule is self._forward:  # the walk moves on
            self._release_finished()
        if (passed is None and schedule.was_passed_over(unit) and schedule.entered is None
                and not self._order_warned):  # out of the order all ranks recorded
            self._order_warned = True
            warnings.warn(f"zeroshard stage 3: unit {unit.name} ran after units that follow it in "
                          "the gather schedule, so it is gathered twice in this pass; every rank "
                          "must do the same (Note [gather schedule] in zeroshard/stage3.py)")
        for skipped in passed or []:
            self._pass_over(skipped)
        if passed is None:  # run again after the walk passed it: not a step of the walk
            self._gather_outside_walk(unit)
            return
        self._step(schedule, unit)
        unit.wait()

    def _step(self, schedule: Schedule, unit: Unit) -> None:
        """Note [one order]: one step of a walk, the same collectives whether this rank
        runs ``unit`` or passes over it: in backward the reductions due by now, then
        ``unit``'s gather and the next unit's prefetch (none while the first step
        records: a gather waits for its agreement, and a prefetch must not wait, Note
        [first-step agreement])."""
        self._agree_while_recording(unit)
        if schedule is self._backward:
            self._launch_due(schedule.position_of(unit))
        if unit.state is ShardState.SHARDED:
            self._start_gather(unit)
        following = schedule.following(unit)
        if (following is not None and following.state is ShardState.SHARDED
                and schedule.entered is None):
            self._start_gather(following)

    def _release_finished(self) -> None:
        """Note [runs before the walk moves on]: release the units whose forward ended."""
        for finished in self._finished:
            finished.release()
        self._finished.clear()

    def _pass_over(self, unit: Unit) -> None:
        """A unit this rank skips in this pass: gather it for the ranks that run it."""
        schedule = self._backward if self.reducer.phase is Phase.BACKWARD else self._forward
        self._step(schedule, unit)
        unit.wait()
        if self.reducer.phase is Phase.BACKWARD:
            # After two training forwards, a unit that ran in one of them may still get
            # gradient through its graph (the unit skipped in the other): kept gathered
            # for it, it needs no gather that other ranks would not issue.
            if not (unit.ran_since_backward and self._training_passes > 1):
                unit.release()
            if self.switches.require_sync:
                self._mark_skipped_ready(unit)
        elif self.reshard_after_forward or not self._training_forward:
            unit.release()
        # else: kept gathered until the end of backward, like on the ranks that ran it, so
        # that every rank holds the same units gathered when the next pass begins

    def _mark_skipped_ready(self, unit: Unit) -> None:
        """The backward walk passed a unit whose outputs got no gradient here (it did not
        run, or its outputs did not reach the loss): no gradient can reach its
        parameters, so they are ready (with a zero gradient, or what no_sync left) and
        its buckets launch in order now."""
        for bucket in unit.buckets:
            if not bucket.params[0].requires_grad:
                continue
            self._note_ready(bucket)
            for index in range(len(bucket.params)):
                if index not in bucket.ready:
                    self.store.fill_missing(bucket, index)
                    self.reducer.mark_ready(bucket, index)

    @contextlib.contextmanager
    def reading_structure(self):
        self._reading_structure += 1
        try:
            yield
        finally:
            self._reading_structure -= 1

    def _refuse_if_sharded(self, units: list[Unit], module, *args) -> None:
        """Reading or loading a freed buffer would read or write memory that is not there."""
        if self._reading_structure:
            return
        if any(u.state is not ShardState.GATHERED for u in units):
            raise RuntimeError(
                "stage 3 keeps parameters sharded between forward and backward, so "
                "model.state_dict() and model.load_state_dict() must run inside "
                "`with opt.summon_full_params():` (on every rank)")

    # -- around the optimizer step ----------------------------------------------------

    def after_step(self, launch_order) -> None:
        """Parameters stay sharded after a step; free anything still gathered (stale now)."""
        for unit in self.units:
            unit.release()

    def unshard(self) -> None:
        """Gather every unit, in the same order on every rank, and keep it gathered
        (``close()``, ``summon_full_params``)."""
        for unit in self.units:
            self._gather_now(unit)

    def parameter_tensors(self) -> list[torch.Tensor]:
        return [b.shard for u in self.units for b in u.buckets]

    def master_tensors(self) -> list[torch.Tensor]:
        return [b.master for u in self.units for b in u.buckets if b.master is not None]

    @contextlib.contextmanager
    def summon_full_params(self):
        """Gather every unit; on exit write each rank's own slice back into its shard.

        Note [forward inside summon]: inside, the forward hooks stand aside (every unit
        is gathered already), so a forward under ``torch.no_grad()`` (evaluation,
        ``generate()``) issues no collective and may run on some ranks only, e.g. rank 0
        sampling text. A forward with grad enabled is refused: its backward would
        reduce and release units in the middle of the block (``summoned`` is counted
        by ``ZeroOptimizer.summon_full_params``)."""
        self.unshard()
        try:
            yield
        finally:
            with torch.no_grad():
                for unit in self.units:
                    for bucket in unit.buckets:
                        bucket.load_shard()
                    unit.release()


class SavedTensorWatch:
    """The saved-tensor hooks of one unit's forward (Note [saved tensors]). Holds the
    stage weakly (Note [no reference cycles]); once it is gone, unpacking does nothing."""

    def __init__(self, stage: UnitGatherer, unit: Unit) -> None:
        self._stage = weakref.ref(stage)
        self._unit = unit

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | Recast | SavedParameter:
        stage = self._stage()
        if stage is not None:
            try:
                storage = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # sparse, nested: not a parameter
                storage = None
            if storage is not None:
                stage.check_saved_parameter(self._unit, tensor, storage)
            recast = stage.recast_of(self._unit, tensor)  # Note [autocast casts]
            if recast is not None:
                return recast
            if storage is not None and self._unit.holds_storage(storage):
                return SavedParameter(tensor.detach())  # a parameter: gathered when used
        # Not the tensor itself: a saved output would then hold its own autograd node, a
        # reference cycle keeping a forward's activations until the garbage collector runs
        return tensor.detach()

    def unpack(self, packed: torch.Tensor | Recast | SavedParameter) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):  # an activation: it needs no gather
            return packed
        stage = self._stage()
        if stage is not None:
            stage.gather_for_saved_tensor(self._unit)
        return packed.rebuild() if isinstance(packed, Recast) else packed.tensor


class SavedParameter:
    """A saved view of a unit's own parameters (Note [saved tensors]): the unit must be
    gathered before backward uses it. Activations the unit saved need no gather: a unit
    released once its gradients were done is not gathered again for one."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class Recast:
    """A saved cast of a parameter, kept as how to make it again (Note [autocast casts])."""

    def __init__(self, param: torch.Tensor, dtype: torch.dtype, shape, stride, offset: int) -> None:
        self.param, self.dtype = param, dtype
        self.shape, self.stride, self.offset = shape, stride, offset

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            cast = self.param.to(self.dtype)
        return cast.as_strided(self.shape, self.stride, self.offset)


def _may_watch_saved_tensors() -> bool:
    """No saved-tensor hooks are active, or only a unit's own (Note [saved tensors])."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is None or isinstance(getattr(top[0], "__self__", None), SavedTensorWatch)
