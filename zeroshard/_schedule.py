"""Stage 3's gather schedule and reduction points: pure (no torch.distributed),
property-tested alone (tests/test_schedule.py).

Note [gather schedule]:
    Every rank must issue the same all-gathers in the same order, even when its data
    runs other units than another rank's (a branch taken on some ranks only). So
    gathers follow a fixed schedule, not the units a rank happens to run: one order
    of units for forward passes and one for backward passes (with
    ``reshard_after_forward``). Entering a unit walks the schedule up to it, and
    the units walked past, which this rank skipped, are gathered and released at
    once; the end of the pass walks the rest. So every rank gathers every unit once
    per pass, at the same point of the schedule, and the next unit of the schedule
    is prefetched while the current one computes. Which order the schedule holds is
    Note [recorded order] in _walk.py.

``Schedule`` is that walk; ``forward_and_backward_orders`` is the first step's order,
from the module tree; ``due_when_walked_past`` and ``launch_positions`` decide when
each bucket's reduction is due in a backward walk and so the reducer's launch order
(Note [one order] in stage3.py). Units are only compared by identity here: anything
with ``module`` and ``buckets`` attributes will do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # for annotations only: this module never imports torch.distributed
    from ._unit import Unit


class Schedule:
    """A fixed order of units that every rank walks once per forward (or backward) pass.

    Walking to a unit passes over the units before it that this rank did not enter;
    the caller gathers and releases those anyway, so every rank issues one gather
    per unit per pass in this order, whichever units its data ran (Note [gather
    schedule]). A unit entered again after the cursor has passed it
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

    def walk_to(self, unit: Unit, record: bool = True) -> list[Unit] | None:
        """Move past ``unit``; return the units passed over before it, or None if the
        walk had already passed ``unit`` in this pass. ``record``: while recording, note
        the entry (not for a forward under no_grad: Note [evaluation before the first
        step] in _walk.py)."""
        if self.entered is not None and record:
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

    def entered_in_pass(self, unit: Unit) -> bool:
        """Whether this pass has entered ``unit`` already."""
        return id(unit) in self._entered_in_pass

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

    def forget_record(self) -> None:
        """Record afresh (while recording)."""
        if self.entered is not None:
            self.entered, self.repeated = [], []

    def stop_recording(self, adopt: bool) -> list[Unit]:
        """With ``adopt``, walk from now on in the recorded order, the units never entered
        put beside their neighbours in the module tree (Note [units no rank entered]).
        Returns the units placed in a direction guessed, not read from the record."""
        guessed: list[Unit] = []
        if adopt:
            self._reorder(_with_the_rest_in_place(self.entered, self.units, guessed))
        self.entered = None
        return guessed


# Note [units no rank entered]:
#     A unit that no rank entered in the first step (a branch no batch took, an expert no
#     token was routed to) has no recorded place, and the walk must still pass it at one
#     place every rank agrees on. It went after every recorded unit: a rank that later
#     ran it in its tree place walked past the units after it to reach it, then entered
#     those out of order and gathered them again, while the ranks that skipped it walked
#     in order; the sequences differed and gloo aborted (a helper's long-run probe,
#     `test_ranks_that_run_other_units_issue_one_sequence_of_collectives`). Each such unit
#     now goes beside its entered neighbours in the tree's order, on the side their
#     recorded order says: right after the one before it where the record runs the tree
#     forwards there, right before it where the record runs it backwards (blocks called
#     last to first: a helper's probes). The direction is read from the two entered units
#     around it, or, at either end, from the two nearest on one side; the schedule's
#     first unit (the root, entered first in every pass) is never one of them. The ranks
#     agreed on the record and share the tree, so they agree on the result. With fewer
#     than two entered units around it to read the direction from (every block but one
#     dropped in the first step), it goes after, as the tree runs, and the stage warns,
#     naming it: a model calling its blocks last to first then walks to it out of order,
#     and ranks that later skip different blocks hang (a helper's probe, LayerDrop over
#     reversed blocks, one entered in the first step: gloo aborted). A unit whose
#     neighbours disagree with where it really runs (an evaluation-only head registered
#     early and called last; units inside checkpointed blocks, whose backward recomputes
#     them in forward order) is still walked to out of order (README: run every unit in
#     the first step).
def _with_the_rest_in_place(entered: list[Unit], tree_order: list[Unit],
                            guessed: list[Unit]) -> list[Unit]:
    position = {id(u): i for i, u in enumerate(entered)}
    neighbours = [u for u in tree_order[1:] if id(u) in position]  # the root aside
    index = {id(u): i for i, u in enumerate(neighbours)}

    def runs_backwards(earlier, later) -> bool:  # two entered units, in tree order
        return position[id(later)] < position[id(earlier)]
    before: dict[int, list[Unit]] = {}
    after: dict[int | None, list[Unit]] = {}
    previous = None  # the entered unit before, in tree order (None: only the root)
    for unit in tree_order:
        if id(unit) in position:
            previous = unit if id(unit) in index else None
            continue
        k = 0 if previous is None else index[id(previous)] + 1
        following = neighbours[k] if k < len(neighbours) else None
        if previous is not None and following is not None:
            backwards = runs_backwards(previous, following)
        elif previous is not None and k >= 2:
            backwards = runs_backwards(neighbours[k - 2], previous)
        elif following is not None and k + 1 < len(neighbours):
            backwards = runs_backwards(following, neighbours[k + 1])
        else:  # nothing to read the direction from
            backwards = False
            guessed.append(unit)
        if not backwards:  # after the one before it (the root, or the start, if none)
            anchor = previous if previous is not None else tree_order[0]
            after.setdefault(id(anchor) if id(anchor) in position else None, []).append(unit)
        elif previous is not None:  # right before it: the tree's order reversed
            before.setdefault(id(previous), []).insert(0, unit)
        else:  # first in the tree, walked backwards: after the first entered one
            after.setdefault(id(following), []).insert(0, unit)
    order = list(after.get(None, []))
    for unit in entered:
        order.extend(before.get(id(unit), []))
        order.append(unit)
        order.extend(after.get(id(unit), []))
    return order


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


def units_inside(units: list) -> dict[int, list]:
    """id(unit) -> the units inside it, itself included (module-tree order)."""
    unit_of_module = {id(u.module): u for u in units}
    return {id(u): [unit_of_module[id(m)] for m in u.module.modules() if id(m) in unit_of_module]
            for u in units}


def due_when_walked_past(units: list, backward_order: list, inside: dict[int, list]) -> dict[int, int]:
    """Note [one order]: id(bucket) -> the point of the backward walk (units entered) at
    which it is due: once the walk has passed its unit and every unit inside it."""
    position = {id(u): i for i, u in enumerate(backward_order)}
    return {id(b): 1 + max(position[id(inner)] for inner in inside[id(unit)])
            for unit in units for b in unit.buckets}


def due_in_schedule(buckets: list, entered_before_ready: list[int], recorded: list,
                    schedule: list, units: list, inside: dict[int, list]) -> dict[int, int]:
    """Note [due past units no rank entered]:
        A bucket's last gradient came in the first backward once ``count`` units had
        been entered, so it is due when the walk reaches the unit entered next
        (``recorded[count]``), or at the end. The schedule walked from then on also
        holds the units no rank entered (Note [units no rank entered]), so positions in
        it are not counts of entries: taken as positions, a bucket came due one step
        early for each such unit before it. A layer LayerDrop (or a skipped block)
        dropped in the first step on every rank shifted every bucket after it, which
        then launched before its gradients were in and was reduced again at the end of
        backward, in every step from then on (58% more reduce-scatter bytes in the
        suite's two-block transformer; the numbers stayed right). The buckets of a unit
        no rank entered are due no earlier than once the walk has passed it and the
        units inside it, and no earlier than their count says, which was noted where the
        first backward passed over the unit, mostly at the walk's end. So in a step where such units run, their buckets hold
        their reduce buffers to the end of backward: a reviewer's probe, 6 blocks, 3 of
        them dropped in the first step, had 4 reduce buffers alive where a run without
        drops has 1 (the old points held 3, and reduced 50% more). Earlier points (once
        the walk has passed the unit, or at the next unit entered after it) launched
        buckets before their gradients were in, and the suite's automatic units and its
        shared-MLP model with nested units reduced some twice in every step (15-28% more
        reduce-scatter bytes): a unit's gradients can come after the walk has entered
        the next unit, and without a record of when, the end is the point that holds."""
    position = {id(u): i for i, u in enumerate(schedule)}
    entered = {id(u) for u in recorded}
    walked_past = due_when_walked_past(units, schedule, inside)
    never_entered = {id(b) for u in units if id(u) not in entered for b in u.buckets}
    due = {}
    for bucket, count in zip(buckets, entered_before_ready):
        point = position[id(recorded[count])] if count < len(recorded) else len(schedule)
        if id(bucket) in never_entered:
            point = max(point, walked_past[id(bucket)])
        due[id(bucket)] = point
    return due


def launch_positions(buckets: list, due: dict[int, int], last_unit_first) -> list[int]:
    """Note [launch order]: the positions of ``buckets`` sorted by when each is due and,
    among equals, by their units in ``last_unit_first``'s order."""
    rank = {id(b): i for i, b in enumerate(b for u in last_unit_first for b in u.buckets)}
    return sorted(range(len(buckets)), key=lambda p: (due[id(buckets[p])], rank[id(buckets[p])]))


class ReductionPoints:
    """When each bucket's reduction is due in a backward walk (Note [one order] in
    stage3.py), kept as the reducer's launch order: ``reducer`` is anything with
    ``buckets``, ``next_launch``, ``launch_front(count)`` and ``launch_in_order``.

    At first each bucket is due once the walk has passed its unit and every unit
    inside it. While the first backward records, each bucket notes how many units had
    been entered when its latest gradient came; ``adopt`` then makes those the points
    (on the rank where that was latest) where all ranks recorded one order. Without
    resharding buckets launch as they become ready, so the list is only ordered by
    units, from the last."""

    def __init__(self, units: list, backward_order: list, reducer,
                 reshard_after_forward: bool) -> None:
        self._units = units
        self._reducer = reducer
        self._reshard_after_forward = reshard_after_forward
        self._inside = units_inside(units)
        self._entered_before_ready: dict[int, int] = {}  # while the first backward records
        self._due = due_when_walked_past(units, backward_order, self._inside)
        self._sort(reversed(units))

    def note_ready(self, bucket, entered: int) -> None:
        """While the first backward records: ``entered`` units had been entered when
        ``bucket``'s latest gradient came (or its unit was passed over)."""
        self._entered_before_ready[id(bucket)] = entered

    def forget(self) -> None:
        """Record afresh (the backward recording them raised)."""
        self._entered_before_ready.clear()

    def recorded(self, default: int) -> list[int]:
        """Per bucket of the launch list, the count noted (``default`` where none was)."""
        return [self._entered_before_ready.get(id(b), default) for b in self._reducer.buckets]

    def adopt(self, agreed: bool, entered_before_ready: list[int], recorded: list,
              backward_order: list, last_unit_first) -> None:
        """The end of the first backward: due where the ranks' counts of the ``recorded``
        entries say (if they ``agreed`` on one order, with resharding), in the schedule
        ``backward_order`` walks from now on; else when the walk has passed."""
        self._entered_before_ready.clear()
        if agreed and self._reshard_after_forward:
            self._due = due_in_schedule(self._reducer.buckets, entered_before_ready, recorded,
                                        backward_order, self._units, self._inside)
        else:
            self._due = due_when_walked_past(self._units, backward_order, self._inside)
        self._sort(last_unit_first)

    def launch_due(self, position: int) -> None:
        """The backward walk reaches the unit at ``position`` of its schedule: launch
        the buckets at the front of the list that are due by then."""
        buckets, count = self._reducer.buckets, self._reducer.next_launch
        while count < len(buckets) and self._due[id(buckets[count])] <= position:
            count += 1
        self._reducer.launch_front(count)

    def _sort(self, last_unit_first) -> None:
        """Note [launch order] in _reducer.py: by when each bucket is due; among equals
        (and without resharding, alone), by the units in ``last_unit_first``'s order."""
        due = self._due if self._reshard_after_forward else dict.fromkeys(self._due, 0)
        self._reducer.launch_in_order(launch_positions(self._reducer.buckets, due, last_unit_first))
