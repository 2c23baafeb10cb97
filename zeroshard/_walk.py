"""Stage 3's walk: one rank's way through the gather schedule, forward and backward
(Note [gather schedule] in _schedule.py). Each step issues the same gathers, and in
backward the same reductions, whether this rank runs the unit or passes over it
(Note [one order] in stage3.py). The gatherer's hooks (stage3.py) call ``reach`` as
units run, ``pass_over`` for what a pass skipped, ``finish`` and ``end_backward``
as a backward ends; until the first backward ends the walk also records the order
units run in, which the ranks then adopt (Note [recorded order]).

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

Note [frozen units backward never reads]:
    The backward walk gathers every unit once per pass on every rank, also units no
    rank's backward reads: a frozen embedding and frozen first blocks when fine-tuning
    the rest, a frozen vision tower feeding a trained projector. Nothing of theirs is
    in the graph, so each was gathered and released at once for nothing (a helper's
    probe: 2 of 5 units frozen, 22% of a step's all-gather bytes). A rank alone cannot
    leave one out, as another rank's backward may read it. So after each synced
    backward the ranks compare, with the flags of Note [ran on no rank] in stage3.py,
    one flag per unit with only frozen parameters: whether a forward since the last
    comparison left something backward may read its parameters through here (an output
    that requires grad, a saved view of its parameters, its own or taken by another
    unit, a run under activation checkpointing or no_grad inside a training forward,
    which backward may run again), or ever kept gathered for a pass or read through a
    custom Function's ctx (Note [frozen parameters kept on a ctx] in _frozen_reads.py):
    what a rank knows alone goes into the flag, so every rank decides alike (decided
    apart, a rank that once ran a frozen unit under reentrant checkpointing kept walking
    it and the others did not: gloo aborted, helper-97). The units no rank flagged are
    then left out of every rank's backward walk (``Unit.skipped_in_backward``): no
    gather, no prefetch; the reductions due at their place launch at the walk's next
    step. With ``reshard_after_forward=False`` backward gathers nothing anyway, and this
    is off.
    A later forward may flag such a unit on some rank (its input now requires grad,
    through a branch its data took): that rank keeps the unit gathered from that
    forward to the end of the next synced backward (``Unit.kept_here``; a backward
    inside ``no_sync()`` may leave a retained graph or another forward's for a later
    one: released there, the later one found it released, helper-97), while every
    collective it issues for the unit follows the state the unit has on the ranks that
    released it (joined into a scratch buffer), so the ranks' collectives stay one
    sequence, and what is written to it meanwhile reaches its shards at each release as
    for any unit, since the others' gathers read them (helper-97: a frozen bias scaled
    in its forward twice a step was 3e-4 from DDP). That synced backward's comparison
    puts the unit back into the walk. The flag is set while the unit is gathered, so a
    unit is kept before it is released. Not seen: a frozen unit's parameters read by
    backward through none of those (a tensor requiring grad that its forward left on an
    attribute, not among its outputs): backward then finds it released and the rank
    raises, naming the unit.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import _agreement
from ._hooks import LoopSwitches, Phase
from ._schedule import ReductionPoints, Schedule
from ._unit import ShardState, Unit


@dataclasses.dataclass
class BackwardPass:
    """The next backward: the training forwards it will go through, how it walks the
    schedule once it begins, and the reductions it holds back. ``end_backward`` is the
    one place a new one starts (and each unit's record, ``Unit.end_backward``)."""
    training_forwards: int = 0  # training forward passes since the last backward
    # a module ran in them as activation checkpointing runs it, so this backward will
    # recompute (Note [released once backward has read it] in stage3.py)
    checkpointed: bool = False
    walking: bool = False  # it walks the schedule (Note [one order]); set as it begins
    launch_at_walk: bool = False  # reductions launch at the walk's steps; set as it begins
    # by launch position: reductions of units that did not run here (``holds``)
    held: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    got_gradient_somewhere: set[int] = dataclasses.field(default_factory=set)  # unit ids (agree_on_late)


class Walk:
    """The schedules, where this rank is in them, and what the next backward records
    (``backward_pass``), over ``units``; ``reducer`` is the stage's GradientReducer (a
    weak proxy), ``store`` its gradient store."""

    def __init__(self, units: list[Unit], forward_order: list[Unit], backward_order: list[Unit],
                 reducer, store, switches: LoopSwitches, group, stats, label: str,
                 device: torch.device, reshard_after_forward: bool) -> None:
        self.units = units
        self.reducer = reducer
        self.store = store
        self.switches = switches
        self.group = group
        self.stats = stats
        self.label = label
        self.device = device
        self.reshard_after_forward = reshard_after_forward
        self._index = {id(u): i for i, u in enumerate(units)}
        self.forward = Schedule(forward_order)
        self.backward = Schedule(backward_order)
        # The latest forward of the root: units run outside one (called directly) follow it.
        self.last_forward = Phase.FORWARD_NO_GRAD
        self.finished: list[Unit] = []  # Note [runs before the walk moves on]
        self._order_warned = False
        self.backward_pass = BackwardPass()
        # Note [one order]: when each bucket's reduction is due in the backward walk
        self._points = ReductionPoints(units, self.backward.units, reducer, reshard_after_forward)

    @property
    def training_forward(self) -> bool:
        """The latest forward of the root began with grad enabled."""
        return self.last_forward is Phase.FORWARD

    def end_backward(self, whole: bool = True) -> None:
        """A backward ended: adopt the first step's recording (every rank ends its first
        backward here), start the next pass's record; the one place it starts again.
        One that raised (not ``whole``, Note [a backward that raised] in _reducer.py)
        recorded only up to where it raised: the next whole backward records afresh
        (adopted, every bucket it never reached was due at that point, for good: 93% more
        reduce-scatter bytes per step, a reviewer's probe)."""
        if self.forward.entered is not None:
            if whole:
                self.adopt_recorded_orders()
            else:
                self.backward.forget_record()
                self._points.forget()
        self.backward.restart()
        self.backward_pass = BackwardPass()

    def gather_for_backward(self, unit: Unit) -> None:
        if self._skipped_here(unit):
            return
        if self.backward_pass.walking:
            self.reach(self.backward, unit)
        else:
            self.gather_now(unit)  # kept gathered since forward: no collective

    def _skipped_here(self, unit: Unit) -> bool:
        """Whether backward needs ``unit`` gathered where every rank leaves it out of the
        backward walk (Note [frozen units backward never reads]): it was kept gathered
        here for this, and needs no collective."""
        if not (unit.skipped_in_backward and self.switches.phase is Phase.BACKWARD):
            return False
        if unit.state is not ShardState.GATHERED:  # a read no forward hook saw coming
            raise RuntimeError(
                f"zeroshard stage 3: backward reads the parameters of unit {unit.name}, which "
                "every rank has left out of the backward walk (no rank's backward read it in "
                "an earlier step): the graph comes from before a step or a load (backward "
                "through it would compute with weights it was not built with; run the "
                "forward again after them), or this rank's forward did not see it would need "
                "the unit (Note [frozen units backward never reads] in zeroshard/_walk.py; "
                "please report it, with the model)")
        return True

    def _launching_at_steps(self) -> bool:
        """Reductions launch at the backward walk's steps (Note [one order]); a walk
        that launches at its steps walks (``launch_at_walk`` implies ``walking``)."""
        return self.backward_pass.launch_at_walk and self.switches.require_sync

    def past_last_launch_point(self) -> bool:
        """The backward walk has taken its last step, where reductions launch at its steps:
        none launches until backward ends (Note [after the walk's last step] in stage3.py)."""
        return self._launching_at_steps() and self.backward.next_unit() is None

    def _launch_due(self, position: int) -> None:
        """Note [one order]: the backward walk reaches the unit at ``position`` of its
        schedule: launch the buckets at the front of the list that are due by then."""
        if not self._launching_at_steps():
            return
        self._points.launch_due(position)

    def finish(self) -> None:
        """The end of backward, before its reductions are flushed: the gathers of the
        rest of the walk first, as other ranks may be waiting for them."""
        if self.backward_pass.walking:
            for skipped in self.backward.walk_to_end():
                self.pass_over(skipped)
            # Note [first-step agreement]: every rank ends the walk here. (Without a walk,
            # reductions launch as they become ready, so no comparison fits in between.)
            self._agree_while_recording(None)

    def adopt_recorded_orders(self) -> None:
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
            first_entries(self.forward), first_entries(self.backward),
            [u in self.forward.repeated for u in self.units],
            self._points.recorded(default=len(self.backward.entered)),
            device=self.device, group=self.group, stats=self.stats, label=self.label)
        recorded = self.backward.entered
        guessed = self.forward.stop_recording(adopt=orders.agreed)
        self.backward.stop_recording(adopt=orders.agreed)
        if guessed:  # on every rank alike: they agreed on the record
            _warn_placed_by_guess(guessed)
        self._points.adopt(orders.agreed, orders.entered_before_ready, recorded,
                           self.backward.units,
                           reversed(self.forward.units) if orders.agreed else reversed(self.units))
        for unit, repeated in zip(self.units, orders.repeated):
            unit.held_for_pass = repeated

    def note_ready(self, bucket) -> None:
        """While the first backward records: how many units had been entered when this
        bucket's latest gradient came (or its unit was passed over)."""
        if self.backward.entered is not None:
            self._points.note_ready(bucket, len(self.backward.entered))

    # -- gather, walk the schedule ----------------------------------------------------

    def gather_now(self, unit: Unit) -> None:
        self._start_gather(unit)
        unit.wait()

    def _start_gather(self, unit: Unit) -> None:
        unit.gather(self.group, self.stats, self.label)

    def gather_outside_walk(self, unit: Unit) -> None:
        """A gather that is not a step of the walk (a unit run again after the walk passed
        it, or needed again after its release): every rank must issue it alike (Note [one
        order]), which the first step checks (Note [first-step agreement])."""
        if self._skipped_here(unit):
            return
        if unit.awaits_gather() and unit.buckets:  # (kept here: as it is elsewhere, helper-98)
            self._agree_while_recording(unit)
        self.gather_now(unit)

    def _agree_while_recording(self, unit: Unit | None) -> None:
        """Note [first-step agreement]: until the orders are recorded, every rank is about
        to take the same step of a walk (or gather the same unit outside it, or end the
        backward: None), or every rank raises. The ranks compare the unit's position
        (``_agreement.next_gather``)."""
        if self.forward.entered is None or self.group.size == 1:
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
            "the first step, run it on every rank or inside opt.summon_full_params()); or a "
            "collective of the model's own (an all_reduce of routing statistics, a "
            "SyncBatchNorm) met this comparison on another rank, which then reads as "
            "something else: a unit skipped on some ranks before it. The first "
            "step records the order in which units run, and until its backward ends every rank "
            "must run the units in one order and each as often (from the second step on, a unit "
            "some rank runs twice stays gathered for the pass, and units may run on some ranks "
            "only). Make the first step take the same path on every rank, e.g. a first batch "
            "that runs every unit alike (Note [first-step agreement] in zeroshard/_walk.py)")

    def reach(self, schedule: Schedule, unit: Unit) -> None:
        """Note [gather schedule]: walk to ``unit``, gather it, prefetch the next one."""
        run_again = schedule.entered_in_pass(unit)
        # Note [evaluation before the first step]:
        #     The first step records the order training runs the units in. An evaluation
        #     under no_grad before it (on every rank, as the first-step agreement asks) was
        #     recorded too, first: a model that trains its blocks in order but evaluated
        #     only the last was walked in the order (last block, the others) for good,
        #     warning and gathering a unit twice a pass, and a rank that later skipped a
        #     block hung (a helper's probe). Forwards under no_grad walk but do not record.
        passed = schedule.walk_to(unit, record=schedule is self.backward or self.training_forward)
        if passed is not None and schedule is self.forward:  # the walk moves on
            self._release_finished()
        if (passed is None and schedule.was_passed_over(unit) and schedule.entered is None
                and unit.state is ShardState.SHARDED  # held gathered: no second gather
                and not self._order_warned):  # out of the order all ranks recorded
            self._order_warned = True
            warnings.warn(f"zeroshard stage 3: unit {unit.name} ran after units that follow it in "
                          "the gather schedule, so it is gathered twice in this pass; every rank "
                          "must do the same (Note [recorded order] in zeroshard/_walk.py)")
        for skipped in passed or []:
            self.pass_over(skipped)
        if passed is None:  # run again after the walk passed it: not a step of the walk
            if run_again and unit.state is ShardState.SHARDED and schedule.entered is None:
                _warn_run_again_after_release(unit)
            self.gather_outside_walk(unit)
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
        if schedule is self.backward:
            self._launch_due(schedule.position_of(unit))
            if unit.skipped_in_backward:  # Note [frozen units backward never reads]
                return
        if unit.awaits_gather():
            self._start_gather(unit)
        following = schedule.following(unit)
        while (following is not None and schedule is self.backward
               and following.skipped_in_backward):
            following = schedule.following(following)
        if following is not None and following.awaits_gather() and schedule.entered is None:
            self._start_gather(following)

    def _release_finished(self) -> None:
        """Note [runs before the walk moves on]: release the units whose forward ended."""
        for finished in self.finished:
            finished.release()
        self.finished.clear()

    def pass_over(self, unit: Unit) -> None:
        """A unit this rank skips in this pass: gather it for the ranks that run it."""
        schedule = self.backward if self.switches.phase is Phase.BACKWARD else self.forward
        self._step(schedule, unit)
        unit.wait()
        if self.switches.phase is Phase.BACKWARD:
            if unit.held_for_pass and self.forward.entered_in_pass(unit):
                # Held for the pass and run in its forward, but not where the walk expected
                # it (run twice in the first step, once here: its other run skipped): its
                # gradient is still to come, through a backward that reads it gathered
                # (Note [runs before the walk moves on]; released and marked ready here, it
                # was gathered again on this rank alone, and gloo aborted: a helper's probe)
                return
            # After two training forwards, a unit that ran in one of them may still get
            # gradient through its graph (the unit skipped in the other): kept gathered
            # for it, it needs no gather that other ranks would not issue.
            if not (unit.record.ran and self.backward_pass.training_forwards > 1):
                unit.release()
            if self.switches.require_sync:
                self._mark_skipped_ready(unit)
        elif (self.reshard_after_forward or not self.training_forward) and not unit.held_for_pass:
            unit.release()
        # else: kept gathered until the end of backward (or, held for the pass, until the
        # pass ends), like on the ranks that ran it, so that every rank holds the same units
        # gathered when the next pass begins, or when this one runs it later (Note [runs
        # before the walk moves on]: released here, a held unit this rank ran only later in
        # the pass was gathered again on this rank alone, and gloo aborted: a helper's probe)

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
            self.note_ready(bucket)
            for index in range(len(bucket.params)):
                if index not in bucket.ready:
                    self.store.fill_missing(bucket, index)
                    self.reducer.mark_ready(bucket, index)


def _warn_placed_by_guess(units: list[Unit]) -> None:
    """Note [units no rank entered] in _schedule.py: too few units ran in the first step
    to tell where these run."""
    names = ", ".join(u.name for u in units[:4]) + (", ..." if len(units) > 4 else "")
    warnings.warn(
        f"zeroshard stage 3: no rank ran unit(s) {names} in the first step, and too few units "
        "ran around them to tell where they run, so the schedule places them as the module "
        "tree runs. If the model calls them in another order (blocks last to first), they "
        "are gathered out of order later, and ranks that then run different ones hang. Run "
        "every unit in the first step (LayerDrop off for it, a batch that reaches every "
        "expert) (Note [units no rank entered] in zeroshard/_schedule.py)", stacklevel=2)


def _warn_run_again_after_release(unit: Unit) -> None:
    """Note [run twice from the second step on] in stage3.py: said before the gather, as
    it may never return."""
    warnings.warn(
        f"zeroshard stage 3: unit {unit.name} runs again in this pass after it was released, "
        "so this rank gathers it again, outside the schedule the first step recorded: unless "
        "every rank does the same now, the ranks wait on each other for ever (NCCL) or gloo "
        "times out. This happens when a unit (or a unit inside it) runs more often than in the "
        "first step, on some ranks only: a block repeated a data-dependent number of times. Run "
        "it at least twice in one pass of the first step, on every rank (e.g. a first batch "
        "that takes the longest path): every unit that repeats then stays gathered for each "
        "later pass, which may repeat it any number of times (Note [run twice from the second "
        "step on] in zeroshard/stage3.py)", stacklevel=2)
