"""Properties of stage 3's gather schedule (zeroshard/_schedule.py). Pure: no
processes needed.

Note [gather schedule]: whatever units a rank's data enters, in whatever order and
however often, one pass of the walk reaches every unit of the schedule exactly once
and in the schedule's order (entered, or passed over for the ranks that run it).
That is what keeps every rank's all-gathers identical, and it is checked here on
random entry sequences, together with the first step's recording and the points
at which reductions become due.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from zeroshard._schedule import (Schedule, due_when_walked_past, forward_and_backward_orders,
                                 launch_positions, units_inside)


class FakeUnit:
    def __init__(self, module, name, n_buckets):
        self.module, self.name = module, name
        self.buckets = [object() for _ in range(n_buckets)]

    def __repr__(self):
        return self.name


@st.composite
def unit_trees(draw):
    """(units, parents): units[0] is the root's; parents[i] is unit i's parent index.
    Each unit is its own module, so the module tree is the unit tree."""
    size = draw(st.integers(1, 8))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, size)]
    modules = [nn.Module() for _ in range(size)]
    for i in range(1, size):
        modules[parents[i]].add_module(f"u{i}", modules[i])
    units = [FakeUnit(m, f"u{i}", draw(st.integers(0, 2))) for i, m in enumerate(modules)]
    return units, parents


def ancestors(i, parents):
    chain = []
    while parents[i] is not None:
        i = parents[i]
        chain.append(i)
    return chain


@given(unit_trees())
def test_forward_and_backward_orders(tree):
    units, parents = tree
    forward, backward = forward_and_backward_orders(units[0].module, units)
    index = {id(u): i for i, u in enumerate(units)}
    for order in (forward, backward):
        assert sorted(index[id(u)] for u in order) == list(range(len(units)))  # each unit once
        assert order[0] is units[0]
        position = {id(u): p for p, u in enumerate(order)}
        for i, unit in enumerate(units):  # a unit comes after every unit it is inside
            assert all(position[id(units[a])] < position[id(unit)] for a in ancestors(i, parents))
    fwd = {id(u): p for p, u in enumerate(forward)}
    bwd = {id(u): p for p, u in enumerate(backward)}
    for i in range(len(units)):
        for j in range(len(units)):
            nested = i in ancestors(j, parents) or j in ancestors(i, parents)
            if i != j and not nested:  # backward reaches disjoint units in reverse
                assert (fwd[id(units[i])] < fwd[id(units[j])]) == (bwd[id(units[i])] > bwd[id(units[j])])


@given(unit_trees(), st.data())
def test_each_pass_reaches_every_unit_once_in_schedule_order(tree, data):
    units, _ = tree
    order = data.draw(st.permutations(units))
    schedule = Schedule(list(order))
    for _ in range(3):  # passes
        schedule.restart()
        entries = data.draw(st.lists(st.sampled_from(units), max_size=12))
        reached, passed_over = [], set()
        for unit in entries:
            seen_before = any(unit is u for u in reached)
            passed = schedule.walk_to(unit)
            # None exactly when the walk had reached the unit already in this pass
            assert (passed is None) == seen_before
            if passed is not None:
                reached += passed + [unit]
                passed_over |= {id(u) for u in passed}
            assert schedule.was_passed_over(unit) == (id(unit) in passed_over)
        rest = schedule.walk_to_end()
        assert schedule.next_unit() is None
        reached += rest
        assert [id(u) for u in reached] == [id(u) for u in schedule.units]


@given(unit_trees(), st.data())
def test_recording_adopts_first_entries_with_the_rest_in_their_tree_places(tree, data):
    """Note [units no rank entered]: the entered units keep the record's order; where the
    record runs the tree's order forwards, each unit it lacks goes right after the
    entered unit nearest before it in the tree (those of one such unit in the tree's
    order). Backwards records: ``test_units_no_rank_entered_follow_a_record_that_runs_backwards``."""
    units, _ = tree
    schedule = Schedule(list(units))
    passes = data.draw(st.lists(st.lists(st.sampled_from(units), max_size=10), min_size=1, max_size=3))
    first_entries, repeated = [], []
    for entries in passes:
        schedule.restart()
        in_pass = []
        for unit in entries:
            if unit in in_pass and unit not in repeated:
                repeated.append(unit)
            in_pass.append(unit)
            if unit not in first_entries:
                first_entries.append(unit)
            schedule.walk_to(unit)
    assert schedule.entered == first_entries
    assert schedule.repeated == repeated
    adopt = data.draw(st.booleans())
    schedule.stop_recording(adopt=adopt)
    assert schedule.entered is None
    walked = schedule.units
    assert sorted(map(id, walked)) == sorted(map(id, units))
    assert [schedule.position_of(u) for u in walked] == list(range(len(units)))
    if not adopt:
        assert walked == units
        return
    assert [u for u in walked if u in first_entries] == first_entries
    if first_entries != sorted(first_entries, key=units.index) or units[0] not in first_entries:
        return  # not a record that runs the tree forwards from its root
    for anchor in first_entries:
        group = [u for u in units if u not in first_entries and anchor == next(
            (v for v in reversed(units[:units.index(u)]) if v in first_entries), None)]
        start = walked.index(anchor) + 1
        assert walked[start:start + len(group)] == group, (anchor, walked)


@pytest.mark.parametrize("record, walked, guessed", [
    ("r b3 b2 b0", "r b3 b2 b1 b0", ""),  # blocks called last to first, b1 by no rank
    ("r b3 b2 b1", "r b3 b2 b1 b0", ""),  # ... b0, the first in the tree
    ("r b2 b1 b0", "r b3 b2 b1 b0", ""),  # ... b3, the last in the tree
    ("r b3 b0", "r b3 b2 b1 b0", ""),  # two in a row
    ("r b0 b2 b3", "r b0 b1 b2 b3", ""),  # forwards, as before
    ("r b3", "r b0 b1 b2 b3", "b0 b1 b2"),  # one block: no direction to read
    ("r b1", "r b0 b1 b2 b3", "b0 b2 b3"),
    ("r", "r b0 b1 b2 b3", "b0 b1 b2 b3"),  # only the root: the tree's order
])
def test_units_no_rank_entered_follow_a_record_that_runs_backwards(record, walked, guessed):
    """A model that calls its blocks last to first, one of them by no rank in the first
    step: placed after its tree predecessor, a rank that ran it later walked to it out of
    order and gloo aborted (a helper's probe). It goes where the record's direction puts
    it; where fewer than two blocks ran, the direction is guessed, and the units so placed
    are named (the stage warns: Note [units no rank entered])."""
    names = "r b0 b1 b2 b3".split()
    units = {name: _Named(name) for name in names}
    schedule = Schedule([units[n] for n in names])
    schedule.restart()
    for name in record.split():
        schedule.walk_to(units[name])
    placed_by_guess = schedule.stop_recording(adopt=True)
    assert " ".join(u.name for u in schedule.units) == walked
    assert " ".join(u.name for u in placed_by_guess) == guessed


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


@given(unit_trees(), st.data())
def test_a_bucket_is_due_once_the_walk_has_passed_its_unit_and_all_inside(tree, data):
    units, _ = tree
    backward = list(data.draw(st.permutations(units)))
    inside = units_inside(units)
    due = due_when_walked_past(units, backward, inside)
    for unit in units:
        needed = {id(u) for u in inside[id(unit)]}
        assert id(unit) in needed
        for bucket in unit.buckets:
            point = due[id(bucket)]
            assert needed <= {id(u) for u in backward[:point]}  # walked past all of them
            assert not needed <= {id(u) for u in backward[:point - 1]}  # and not earlier


@given(unit_trees(), st.data())
def test_launch_positions_sort_buckets_by_when_they_are_due(tree, data):
    units, _ = tree
    buckets = [b for u in units for b in u.buckets]
    buckets = list(data.draw(st.permutations(buckets)))
    due = {id(b): data.draw(st.integers(0, 4)) for b in buckets}
    last_unit_first = list(data.draw(st.permutations(units)))
    positions = launch_positions(buckets, due, last_unit_first)
    assert sorted(positions) == list(range(len(buckets)))
    ordered = [buckets[p] for p in positions]
    unit_rank = {id(b): r for r, u in enumerate(last_unit_first) for b in u.buckets}
    keys = [(due[id(b)], unit_rank[id(b)]) for b in ordered]
    assert keys == sorted(keys)
