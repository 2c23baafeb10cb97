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

The walk itself is Note [gather schedule] in _schedule.py; the Notes on how the
ranks learn the order, treat skipped units and agree on them are beside their code
below (Note [recorded order], Note [passed over in backward], Note [ran on no rank]).

Note [one order]:
    Every collective runs on the optimizer's one process group (on a mesh: its shard
    group, and the replicate group for what spans replicas, Note [collectives on a mesh]
    in _comm.py), so every rank must issue the same collectives in the same order (NCCL
    requires it of one communicator; gloo aborts on a mismatch). Gathers follow the walk
    (Note [gather schedule]), but a reduce-scatter launched when a unit's last gradient
    arrives would interleave with them in an order that depends on the data: a rank that
    ran a unit reduces it while computing, one that skipped it when the walk passes it.
    So in a backward walk (with ``reshard_after_forward``) reductions launch only at the
    walk's steps, and each step issues the same collectives whether this rank runs the
    unit or passes over it (``_step``): first the reduce-scatters of the buckets due by
    that point, in list order, then the unit's gather, then the next unit's prefetch. A
    bucket is due at a fixed point of the walk, the same on every rank: once as many
    units have been entered as when its last gradient came in the first backward, on the
    rank where that was latest (agreed with the recorded orders,
    ``_adopt_recorded_orders``); where the ranks recorded different orders, once the
    walk has passed its unit and every unit inside it (``due_when_walked_past``, also
    the first backward's rule; ``ReductionPoints`` in _schedule.py). The list of buckets
    is sorted by that point, so due buckets are at its front. A bucket due before its
    gradient is complete (data that runs units in another order than the first step)
    launches with what it has, and what comes later is reduced again at the end of
    backward (Note [late gradients]), where the ranks agree on which buckets are late;
    the numbers stay right and only the bytes grow. After more than one training forward
    pass, whose backwards interleave, every reduction waits for the end of backward.
    Without resharding, backward walks only if the units were released since the forward
    (a no_grad forward or ``summon_full_params()`` in between, a second backward through
    a retained graph: every rank holds all units or none), and then every reduction
    waits for the end; otherwise it issues no gather (the units stay gathered) and
    reductions launch as their buckets become ready, in list order. Gathers outside the
    walk are avoided where ranks would differ: a unit some rank runs twice is not
    released when its gradients are done (reentrant checkpointing recomputes its second
    run later), nor, after two forwards, a unit the walk passes that ran in one of them
    (the other forward's backward still needs it). As every rank issues the same
    sequence, a rank may wait on any collective it issued (a new reduce buffer waits for
    the reductions in flight): the others issue it too before anything that could wait
    on this rank. ``comm_stats.trace`` records the sequence; the tests compare it across
    ranks for every case they train.

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
    which order the model runs them (Note [recorded order]), so a rank whose data runs
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

Note [recomputation]:
    Activation checkpointing runs a unit's forward again during backward. The
    hooks recognise it by the BACKWARD state: they gather as usual but neither
    release (backward is about to use the parameters) nor arm backward hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref

import torch
from torch.utils._pytree import tree_flatten

from . import _agreement
from ._hooks import LoopSwitches, Phase, WeakHook
from ._masters import ShardMasters
from ._reducer import GradientReducer
from ._saved_tensors import SavedTensorWatches
from ._schedule import ReductionPoints, Schedule, forward_and_backward_orders
from ._unit import ShardState, Unit
from .mixed_precision import GradientDtypes
from .stage2 import ShardedGradients


def trainable_buckets(units: list[Unit]):
    """The reducer's first launch order: units from the last to the root (roughly
    backward's order), until Note [one order] sorts them by when the backward walk is
    done with them."""
    return [b for u in reversed(units) for b in u.buckets if b.params[0].requires_grad]


@dataclasses.dataclass
class BackwardPass:
    """The next backward: the training forwards it will go through, how it walks the
    schedule once it begins, and the reductions it holds back. ``end_backward`` is the
    one place a new one starts (and each unit's record, ``Unit.end_backward``)."""
    training_forwards: int = 0  # training forward passes since the last backward
    walking: bool = False  # it walks the schedule (Note [one order]); set as it begins
    launch_at_walk: bool = False  # reductions launch at the walk's steps; set as it begins
    # by launch position: reductions of units that did not run here (``holds``)
    held: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    ran_somewhere: set[int] = dataclasses.field(default_factory=set)  # unit ids (agree_on_late)


class UnitGatherer:
    """Gathers and releases stage 3's units around their forward and backward passes,
    walking one schedule on every rank (Note [gather schedule]), and decides for the
    reducer when each bucket's reduction is due (Note [one order])."""

    def __init__(self, model, units: list[Unit], reducer: GradientReducer,
                 store: ShardedGradients, dtypes: GradientDtypes, masters: ShardMasters,
                 switches: LoopSwitches, group, stats, label: str, reshard_after_forward: bool,
                 handles: list) -> None:
        self.reducer = weakref.proxy(reducer)  # it holds this (Note [no reference cycles])
        self.store = store
        self.dtypes = dtypes
        self.masters = masters
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
        forward_order, backward_order = forward_and_backward_orders(model, units)
        self._forward = Schedule(forward_order)  # Note [gather schedule]
        self._backward = Schedule(backward_order)
        # The latest forward of the root: units run outside one (called directly) follow it.
        self._last_forward = Phase.FORWARD_NO_GRAD
        self._finished: list[Unit] = []  # Note [runs before the walk moves on]
        self._order_warned = False
        self._backward_pass = BackwardPass()
        # Note [one order]: when each bucket's reduction is due in the backward walk
        self._points = ReductionPoints(units, self._backward.units, self.reducer,
                                       reshard_after_forward)
        self._reading_structure = 0  # inside reading_structure(): state_dict() reads no values
        self.device = next((b.flat.device for u in units for b in u.buckets), torch.device("cpu"))
        for module in model.modules():
            owners = {id(self._unit_of[id(p)]): self._unit_of[id(p)]
                      for p in module._parameters.values() if p is not None}
            if owners:
                guard = WeakHook(self._refuse_if_sharded, list(owners.values()))
                handles.append(module.register_state_dict_pre_hook(guard))
                handles.append(module.register_load_state_dict_pre_hook(guard))
        for unit in units:
            handles.append(unit.module.register_forward_pre_hook(
                WeakHook(self.pre_forward, unit)))
            handles.append(unit.module.register_forward_hook(
                WeakHook(self.post_forward, unit)))
            unit.release()  # the shards hold rank 0's values (broadcast, then placed)
        # Note [saved tensors] in _saved_tensors.py
        self._saved = SavedTensorWatches(units, self._unit_of, WeakHook(self.gather_for_saved_tensor))

    # -- the four hooks: before and after each unit's forward and backward -----------

    def pre_forward(self, unit: Unit, module, args) -> None:
        """Gather ``unit`` for its forward, walking the schedule (Note [gather schedule])."""
        if self._forward_inside_summon(unit):
            return
        if self.switches.phase is Phase.BACKWARD:  # Note [recomputation]
            self._gather_for_backward(unit)
            return
        if unit is self.root:
            self._begin_forward_pass()
        if self._training_forward:
            unit.record.ran = True
        self._walk(self._forward, unit)
        self._saved.open(unit)

    def post_forward(self, unit: Unit, module, args, output) -> None:
        """Arm ``unit``'s pre-backward on its outputs; release it when the walk moves on."""
        if self.switches.summoned or self.switches.phase is Phase.BACKWARD:
            return  # Note [forward inside summon], Note [recomputation]
        self._saved.close(unit)
        if torch.is_grad_enabled():
            self._arm_pre_backward(output, unit)
        # Without resharding, a unit run under no_grad inside a training forward
        # (reentrant checkpointing) stays gathered for its recomputation in backward.
        if (self.reshard_after_forward or not self._training_forward) and not unit.held_for_pass:
            if self._forward.next_unit() is None:  # nothing to move on to: release now
                unit.release()
            else:
                self._finished.append(unit)  # Note [runs before the walk moves on]
        if unit is self.root:
            self._end_forward_pass()

    def pre_backward(self, unit: Unit, grad: torch.Tensor | None) -> None:
        """``unit``'s outputs get their gradient: gather it for its backward (once)."""
        self.reducer.on_backward_start(grad)
        if unit.record.armed:
            return
        unit.record.armed = True
        self._gather_for_backward(unit)

    def post_backward(self, bucket, index: int) -> None:
        """The store has collected parameter ``index`` of ``bucket``'s gradient; once the
        unit's last one is in, backward is done with the unit: release it."""
        param = bucket.params[index]
        unit = self._unit_of[id(param)]
        # A gradient arrived, so a forward ran the unit, even one before the last synced
        # backward: a second backward through a retained graph.
        unit.record.ran = True
        unit.record.grads_arrived.add(id(param))
        self._note_ready(bucket)
        # A unit some rank runs twice stays gathered until backward ends: with reentrant
        # checkpointing its second run's recomputation would gather it again, on that rank
        # only (Note [runs before the walk moves on]).
        if (unit.release_when_grads_done and not unit.held_for_pass
                and unit.record.grads_arrived >= unit.trainable_ids):
            unit.release()
            # A nested backward (Note [late gradients]) may gather it again: count afresh.
            unit.record.grads_arrived.clear()

    # -- forward passes -------------------------------------------------------------

    @property
    def _training_forward(self) -> bool:
        return self._last_forward is Phase.FORWARD

    def _forward_inside_summon(self, unit: Unit) -> bool:
        """Note [forward inside summon]: every unit is gathered; the hooks stand aside."""
        if self.switches.summoned and torch.is_grad_enabled():
            raise RuntimeError(
                f"zeroshard stage 3: unit {unit.name} ran a forward with grad enabled inside "
                "`with opt.summon_full_params():`; there every parameter is gathered and "
                "backward cannot reduce and release units. Run forwards there under "
                "torch.no_grad() (evaluation, generate()), or train outside the block")
        return bool(self.switches.summoned)

    def _begin_forward_pass(self) -> None:
        self._last_forward = Phase.FORWARD if torch.is_grad_enabled() else Phase.FORWARD_NO_GRAD
        self.switches.enter(self._last_forward)
        self._backward_pass.training_forwards += self._training_forward
        self._forward.restart()
        self._saved.close(None)  # pairs a forward that raised left open

    def _end_forward_pass(self) -> None:
        """The root's forward ends: walk the rest of the schedule, release what is due."""
        for skipped in self._forward.walk_to_end():
            self._pass_over(skipped)
        if self.reshard_after_forward or not self._training_forward:
            self._finished.clear()
            for other in self.units:  # finished, or a prefetch the forward did not use
                other.release()
        if self.switches.phase is not Phase.IDLE:  # (a backward inside the forward ended it)
            self.switches.enter(Phase.IDLE)

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
        self._backward_pass.walking = self.reshard_after_forward or any(
            u.state is not ShardState.GATHERED for u in self.units if u.buckets)
        # Reductions launch as the walk reaches them only where the list is sorted for
        # it (with resharding) and after exactly one training forward; after two (their
        # backwards interleave) they wait for the end of backward.
        self._backward_pass.launch_at_walk = (self.reshard_after_forward
                                              and self._backward_pass.training_forwards == 1)

    def _gather_for_backward(self, unit: Unit) -> None:
        if self._backward_pass.walking:
            self._walk(self._backward, unit)
        else:
            self._gather_now(unit)  # kept gathered since forward: no collective

    @property
    def launches_as_ready(self) -> bool:
        """Note [one order]: with a backward walk, reductions launch at its steps, not
        as gradients happen to arrive; without one, backward issues no gather, and they
        launch as they become ready, in list order."""
        return not self._backward_pass.walking

    def _launch_due(self, position: int) -> None:
        """Note [one order]: the backward walk reaches the unit at ``position`` of its
        schedule: launch the buckets at the front of the list that are due by then."""
        if not (self._backward_pass.launch_at_walk and self.switches.require_sync):
            return
        self._points.launch_due(position)

    def gather_for_saved_tensor(self, unit: Unit) -> None:
        """Note [saved tensors] in _saved_tensors.py: backward is about to use a tensor
        ``unit``'s forward saved."""
        if unit.state is ShardState.GATHERED or self.switches.summoned:
            return
        if unit.record.armed:  # gathered for this backward and released since
            self._gather_outside_walk(unit)
        else:
            self.pre_backward(unit, None)

    def _arm_pre_backward(self, output, unit: Unit) -> None:
        """Call ``pre_backward(unit)`` when a tensor of ``output`` gets its gradient.

        A tensor can be the output of nested units (a model returning its head's
        output): the outer unit's forward ends last, so it is the earlier of them in
        the backward schedule, and its hook must run first (tensor hooks run in the
        order they were registered). One hook per tensor calls the units outermost first.
        """
        for tensor in tree_flatten(output)[0]:
            if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad):
                continue
            units = getattr(tensor, "_zeroshard_units", None)
            if units is None:
                tensor._zeroshard_units = units = []
                tensor.register_hook(WeakHook(self._pre_backward_all, units))
            units.insert(0, unit)

    def _pre_backward_all(self, units: list[Unit], grad: torch.Tensor) -> None:
        for unit in units:
            self.pre_backward(unit, grad)

    def holds(self, bucket, reduced: torch.Tensor) -> bool:
        """Whether to hold ``bucket``'s reduction instead of installing it: a unit that
        did not run here may have run nowhere, so it waits until the ranks have compared
        notes (``install_held``)."""
        if bucket.grad_shard is not None or self._unit_of[id(bucket.params[0])].record.ran:
            return False
        position = self.reducer.position_of(bucket)
        held = self._backward_pass.held  # reduced again: added up (Note [late gradients])
        held[position] = reduced if position not in held else held[position].add_(reduced)
        return True

    def agree_on_late(self, late: set[int]) -> list[int]:
        """Note [ran on no rank]:
            Which units ran on no rank at all (their gradient is absent, not zero, and
            the optimizer skips them as torch skips a parameter whose gradient is None)
            is not something a rank can know alone. A rank holds back the reductions of
            units it did not run (``holds``); after each synced backward the ranks
            all-reduce one 4-byte flag per unit other than the root, and one per bucket
            for the late ones, and then install what they held (``install_held``).

        The ranks compare notes (``_agreement.ran_and_late``):
        which units but the root (it ran here) ran on some rank, and which buckets got
        gradient after the walk passed their unit on some rank (Note [late gradients]).
        Every rank reduces again the buckets late on any rank."""
        ran, late_anywhere = _agreement.ran_and_late(
            [u.record.ran for u in self._flagged],
            [p in late for p in range(len(self.reducer.buckets))],
            device=self.device, group=self.group, stats=self.stats, label=self.label)
        self._backward_pass.ran_somewhere = {id(u) for u, flag in zip(self._flagged, ran) if flag}
        return [p for p, flag in enumerate(late_anywhere) if flag]

    def install_held(self) -> None:
        """Note [ran on no rank]: units that ran on no rank get no gradient at all, as
        torch leaves .grad None for a parameter no rank used; the others get theirs."""
        for position, reduced in self._backward_pass.held.items():
            bucket = self.reducer.buckets[position]
            if id(self._unit_of[id(bucket.params[0])]) in self._backward_pass.ran_somewhere:
                bucket.set_grad_shard(self.dtypes.as_gradient_shard(bucket, reduced))

    def finish_walk(self) -> None:
        """The end of backward, before its reductions are flushed: the gathers of the
        rest of the walk first, as other ranks may be waiting for them."""
        if self._backward_pass.walking:
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
        self._backward_pass = BackwardPass()  # the one place it starts again
        for unit in self.units:
            unit.end_backward(synced)

    def _adopt_recorded_orders(self) -> None:
        """Note [recorded order]:
            The first step walks the module tree's order: pre-order for forward (a unit
            before the units inside it, siblings in registration order) and reverse
            post-order for backward (``forward_and_backward_orders``). Meanwhile each
            rank records the order in which it enters the units; at the end of the
            first backward the ranks compare their records (one all-reduce), and if all
            recorded the same order, later steps walk that one, so a model that calls
            its units in another order than it registers them still gathers each unit
            once. A unit entered after the walk passed it (out of order) is gathered a
            second time, with a warning; every rank must then do the same. A unit run
            twice in one pass is gathered again on its second run (every rank must run
            it twice), unless it runs again before the walk moves on (Note [runs before
            the walk moves on]).

        So: walk later steps in the order the first step entered the units, where every
        rank recorded the same order; else keep the module tree's.
        Note [runs before the walk moves on]: a unit some rank entered twice in one
        forward pass is held gathered until the end of each later pass.

        Note [one order]: where the ranks agreed, each bucket is due in later backward
        walks once as many units have been entered as when its last gradient came in
        the first backward, on the rank where that was latest; else when the walk has
        passed its unit.

        The ranks compare what they recorded (``_agreement.recorded_orders``)."""
        def first_entries(schedule: Schedule) -> list[int]:
            position = {id(u): p for p, u in enumerate(schedule.entered)}
            return [position.get(id(u), -1) for u in self.units]

        orders = _agreement.recorded_orders(
            first_entries(self._forward), first_entries(self._backward),
            [u in self._forward.repeated for u in self.units],
            self._points.recorded(default=len(self._backward.entered)),
            device=self.device, group=self.group, stats=self.stats, label=self.label)
        self._forward.stop_recording(adopt=orders.agreed)
        self._backward.stop_recording(adopt=orders.agreed)
        self._points.adopt(orders.agreed, orders.entered_before_ready, self._backward.units,
                           reversed(self._forward.units) if orders.agreed else reversed(self.units))
        for unit, repeated in zip(self.units, orders.repeated):
            unit.held_for_pass = repeated

    def _note_ready(self, bucket) -> None:
        """While the first backward records: how many units had been entered when this
        bucket's latest gradient came (or its unit was passed over)."""
        if self._backward.entered is not None:
            self._points.note_ready(bucket, len(self._backward.entered))

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
        backward: None), or every rank raises. The ranks compare the unit's position
        (``_agreement.next_gather``)."""
        if self._forward.entered is None or self.group.size == 1:
            return
        code = 0 if unit is None else self._index[id(unit)] + 1
        highest, lowest = _agreement.next_gather(code, device=self.device, group=self.group,
                                                 stats=self.stats, label=self.label)
        if highest == lowest:
            return
        here = "end its backward" if unit is None else f"gather unit {unit.name}"
        others = {"ends its backward" if c == 0 else f"gathers {self.units[c - 1].name}"
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
                          "must do the same (Note [recorded order] in zeroshard/stage3.py)")
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
        schedule = self._backward if self.switches.phase is Phase.BACKWARD else self._forward
        self._step(schedule, unit)
        unit.wait()
        if self.switches.phase is Phase.BACKWARD:
            # After two training forwards, a unit that ran in one of them may still get
            # gradient through its graph (the unit skipped in the other): kept gathered
            # for it, it needs no gather that other ranks would not issue.
            if not (unit.record.ran and self._backward_pass.training_forwards > 1):
                unit.release()
            if self.switches.require_sync:
                self._mark_skipped_ready(unit)
        elif self.reshard_after_forward or not self._training_forward:
            unit.release()
        # else: kept gathered until the end of backward, like on the ranks that ran it, so
        # that every rank holds the same units gathered when the next pass begins

    def _mark_skipped_ready(self, unit: Unit) -> None:
        """Note [passed over in backward]:
            A unit the backward walk passes over got no gradient on this rank (it did
            not run here, or its outputs did not reach this rank's loss), and none can
            come: its parameters count as ready, with a zero gradient (or what no_sync
            left), and its buckets launch in order now. So backward must reach units in
            the schedule's order; a unit whose gradient arrives after its reduce-scatter
            was launched is reduced a second time (Note [late gradients] in
            _reducer.py)."""
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

    def after_step(self) -> None:
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
                    for bucket in unit.buckets:  # writes made inside reach the masters too
                        self.masters.absorb_writes(bucket, bucket.own_slice())
                        bucket.load_shard()
                    unit.release()
