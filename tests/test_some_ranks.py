"""Stage 3 with a unit that runs, or reaches the loss, on some ranks only.

Every rank must issue the same gathers in the same order although its data runs
other units (Note [gather schedule] in zeroshard/_schedule.py). Each case trains at
stage 3 and at stage 2 beside DDP (``find_unused_parameters``) and single-process
training, and holds every invariant of tests/invariants.py: equal
parameters, ranks in agreement, exactly 3Ψ (2Ψ without resharding) of
communication, memory, and the gathered-parameter peak. A rank left in another
collective fails the case through the pool's timeout rather than hanging.
"""

import pytest

import cases
import cases_order
from invariants import (assert_params_close, check_comm_per_step, check_every_invariant,
                        check_matches_references, check_ranks_agree, update_bounds)

TRANSFORMER = {"kind": "transformer", "vocab": 13, "d": 8, "heads": 2, "layers": 2, "seq": 5,
               "tied": True, "frozen": False, "checkpoint": None, "reuse": False}
MLP = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
       "unused_branch": True, "branch_everywhere": False}
LOOP = {"two_forwards": False, "eval_forward": False, "groups": False, "bucket_mb": 5e-4,
        "scheduler": False, "accum": 1, "no_sync": False, "clip": None, "norm_type": 2.0,
        "steps": 3, "batch": 2, "record_peak": True, "optimizer": "SGD",
        "opt_kwargs": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}}

# (id, model, units, world size, loop options). In the transformer, odd ranks skip block 0
# in odd steps; in the MLP, odd ranks skip the branch (or run it and drop its output).
CASES = [
    ("blocks", TRANSFORMER, "blocks", 3, {"skip_block": "odd_ranks"}),
    ("nested-accum-nosync", TRANSFORMER, "nested", 4,
     {"skip_block": "odd_ranks", "accum": 2, "no_sync": True, "clip": 0.05}),
    ("linear-two-forwards", {**TRANSFORMER, "tied": False, "frozen": True}, "linear", 2,
     {"skip_block": "odd_ranks", "two_forwards": True, "eval_forward": True}),
    ("checkpointed", {**TRANSFORMER, "checkpoint": "nonreentrant"}, "blocks", 4,
     {"skip_block": "odd_ranks", "accum": 2, "optimizer": "AdamW",
      "opt_kwargs": {"lr": 1e-2, "weight_decay": 0.1}}),
    ("branch-skipped", MLP, "linear", 3, {"accum": 2, "clip": 10.0}),
    ("branch-output-unused", {**MLP, "branch_everywhere": True}, "linear", 3, {"groups": True}),
    # No rank runs block 0 in odd steps: DDP leaves its gradients None and the optimizer
    # skips it (no momentum, no weight decay); every rank learns that from the others.
    ("no-rank", TRANSFORMER, "blocks", 3, {"skip_block": "everywhere"}),
]


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("model, units, world_size, options",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unit_run_on_some_ranks_only(pool, model, units, world_size, options,
                                     reshard_after_forward):
    case = {**LOOP, **options, "model": dict(model), "stage": 3, "world_size": world_size,
            "units": units, "reshard_after_forward": reshard_after_forward}
    three = pool.run(cases.train_side_by_side, world_size, case)
    check_every_invariant(three, case)
    if case.get("skip_block") == "everywhere":
        return  # stage 2 steps the skipped block with a zero gradient, as documented
    # Stage 2 on the same case: every parameter has a gradient from some rank, so both
    # step the same parameters; they differ only in how gradients are bucketed.
    two = pool.run(cases.train_side_by_side, world_size, {**case, "stage": 2})
    bounds = update_bounds(three, case)
    for a, b in zip(three, two):
        for step in range(case["steps"]):
            assert_params_close(a.zero[step], b.zero[step], case,
                                None if bounds is None else bounds[step], f"step {step}")


@pytest.mark.parametrize("skip_block", [None, "odd_ranks"])
def test_units_called_out_of_registration_order(pool, skip_block):
    """Blocks called last to first: the first step walks the module tree's order and
    gathers the blocks it enters out of that order twice; every later step walks the
    order recorded on the first one (Note [recorded order]) and gathers each unit
    exactly once per pass: 3Ψ."""
    case = {**LOOP, "model": {**TRANSFORMER, "layers": 3, "reverse": True}, "stage": 3,
            "world_size": 3, "units": "blocks", "reshard_after_forward": True,
            "skip_block": skip_block, "steps": 4}
    results = pool.run(cases.train_side_by_side, 3, case)
    check_matches_references(results, case)
    check_ranks_agree(results, case)
    comm = results[0].comm
    assert comm[0]["all_gather"] > comm[1]["all_gather"], comm
    check_comm_per_step(results, case, first_step=1)


@pytest.mark.parametrize("how", ["twice", "order"])
def test_a_first_step_that_differs_across_ranks_raises_on_every_rank(pool, how):
    """Note [first-step agreement]: before the first backward ends the ranks cannot know
    which units repeat or their order; a rank that differs made gloo abort both processes
    (a gather the others did not issue). Now every rank raises before that gather; found
    in forward, as here, nothing is left in flight and a new optimizer trains on the group."""
    for rank, (error, trained_after) in enumerate(
            pool.run(cases.first_step_that_differs_across_ranks, 2, how)):
        assert error is not None and "first step" in error and "Note [first-step agreement]" in error, \
            (rank, error)
        assert trained_after, rank


@pytest.mark.parametrize("pattern", list(cases_order.PATTERNS))
def test_ranks_that_run_other_units_issue_one_sequence_of_collectives(pool, pattern):
    """Note [one order]: every collective runs on one process group, so the ranks must
    issue the same sequence although rank 0 runs other units than rank 1 (found by a
    review: each of these left the ranks in different collectives, a gloo abort or a
    timeout, NCCL's hang). And the result is single-process training's."""
    results = pool.run(cases_order.one_order_when_ranks_differ, 2, pattern)
    (trace0, difference0), (trace1, difference1) = results
    assert trace0 and trace0 == trace1
    assert difference0 <= 1e-6 and difference1 <= 1e-6, (difference0, difference1)


def _check_one_sequence_single_process_numbers_no_warning(results) -> None:
    """Two ranks' (collectives, distance from single-process training, warnings)."""
    (trace0, difference0, warned0), (trace1, difference1, warned1) = results
    assert trace0 and trace0 == trace1
    assert difference0 <= 1e-6 and difference1 <= 1e-6, (difference0, difference1)
    assert warned0 == warned1 == [], (warned0, warned1)


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("how", list(cases_order.RUN_MORE_OFTEN))
def test_ranks_that_run_a_unit_more_often_after_the_first_step_train_together(
        pool, how, reshard_after_forward):
    """Note [run twice from the second step on]: from the second step on the ranks run a
    unit different numbers of times. Reentrant checkpointing recomputed the extra runs
    in backward, and a rank released the unit between them: its gather again, on that
    rank only, hung (a reviewer's probe; with two forwards per step, non-reentrant
    too). A unit entered twice since the last backward now stays gathered
    until backward ends; so a first step in which one rank runs it twice needs no
    gather the others lack either (every rank raised the first-step agreement's error
    there before). Units repeated with others between, inside a repeated block, or
    the schedule's last unit repeated, train once the first step ran them twice on
    every rank, as the warning advises."""
    results = pool.run(cases_order.run_more_often_from_the_second_step, 2, how,
                       reshard_after_forward)
    _check_one_sequence_single_process_numbers_no_warning(results)


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("skip", ["first", "last"])
def test_a_unit_held_for_the_pass_and_run_once_on_one_rank_trains_together(
        pool, skip, reshard_after_forward):
    """A unit every rank ran twice in the first step is held gathered through each later
    pass; a rank that runs it once there (its other call skipped) keeps it gathered where
    the walk passes over it, as the ranks that run it do, and waits for its gradient:
    one sequence of collectives, single-process training's numbers, no warning."""
    results = pool.run(cases_order.a_held_unit_skipped_once_on_one_rank, 2, skip,
                       reshard_after_forward)
    _check_one_sequence_single_process_numbers_no_warning(results)


@pytest.mark.parametrize("drop", [False, True])
def test_an_evaluation_before_the_first_step_is_not_the_order_training_walks(pool, drop):
    results = pool.run(cases_order.evaluation_before_the_first_step, 2, drop)
    _check_one_sequence_single_process_numbers_no_warning(results)


def test_a_block_of_units_repeated_more_often_later_warns_before_gathering_again(pool):
    """Note [run twice from the second step on]: a block holding units, run twice from
    the second step on, gathers its inner units again outside the schedule; where some
    rank does not, that waits for ever, so each rank says so first, naming the unit and
    the fix. Here every rank repeats it alike, so it also trains."""
    for rank, (difference, warned) in enumerate(
            pool.run(cases_order.every_rank_runs_a_nested_block_more_often_later, 2)):
        assert difference <= 1e-6, (rank, difference)
        assert warned and all("blk.0" in w or "blk.2" in w for w in warned), (rank, warned)
        assert "first step" in warned[0] and "Note [run twice from the second step on]" in warned[0]


@pytest.mark.parametrize("how", ["dropped forward", "reentrant checkpointing"])
def test_units_run_once_per_backward_are_released_as_their_gradients_come(pool, how):
    """Note [run twice from the second step on]: keeping a unit gathered to the end of
    backward is for units that backward recomputes more than once; a first version kept
    every unit entered twice since the last backward, so a training forward whose output
    was dropped held the whole model through the next backward (a reviewer's probe)."""
    for peak, unit_bytes, difference in pool.run(cases_order.gathered_peak_in_backward, 2, how):
        assert difference <= 1e-6, difference
        shards = 6 * unit_bytes / 2  # the unit computing and the one prefetched, on the shards
        assert 0 < peak <= shards + 2 * unit_bytes, (peak, unit_bytes)

