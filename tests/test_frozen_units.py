"""Note [frozen units backward never reads] (zeroshard/_walk.py): at stage 3 a frozen
embedding and frozen leading blocks, which nothing in the graph reads, are gathered in
every forward but, from the second step on, in no backward; where some rank's backward
does read them (a branch its data took, on one rank or all, in one of two forwards, in a
no_sync micro-batch, with an evaluation in between), the ranks still issue one sequence
of collectives and train equal to DDP, and the next step puts them back into the walk."""

import pytest

import cases_frozen

WAYS = ["plain", "one_rank", "every_rank", "eval_between", "two_forwards", "no_sync",
        "non_reentrant", "reentrant", "checkpointed_on_one_rank", "retained_in_no_sync",
        "written_while_kept", "loaded_after_a_forward"]


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("way", WAYS)
def test_frozen_units_no_backward_reads_are_not_gathered_in_backward(pool, way,
                                                                   reshard_after_forward):
    n = 2
    results = pool.run(cases_frozen.train, n, way, reshard_after_forward)
    for rank, (differences, backward, _, sizes, frozen_sizes, block_1_sizes) in enumerate(results):
        where = (way, rank, differences, backward)
        assert all(d < 1e-12 for d in differences), where
        for step, gathers in enumerate(backward):
            skipped = cases_frozen.skipped_in_backward(gathers, sizes)
            if not reshard_after_forward:  # kept gathered from forward: nothing to skip,
                if way in ("eval_between", "retained_in_no_sync"):  # but what the evaluation
                    assert not skipped, (step, skipped, where)  # or a backward released
                else:
                    assert gathers == [], where
            elif step >= 1 and not cases_frozen.reads_anywhere(way, step - 1, n) and \
                    way not in ("non_reentrant", "reentrant"):
                # Note [frozen units backward never reads]: every unit but the frozen ones;
                # block 1, once run under reentrant checkpointing (on one rank), counts as
                # kept on a custom Function's ctx for good, on every rank (Note [frozen
                # parameters kept on a ctx] in zeroshard/_frozen_reads.py)
                expected = cases_frozen.Counter(frozen_sizes)
                if way == "checkpointed_on_one_rank" and step >= 3:
                    expected -= cases_frozen.Counter(block_1_sizes)
                assert skipped == expected, (step, skipped, where)
            elif way != "non_reentrant":  # (checkpointed: walked whole, its runs may recompute)
                assert not skipped, (step, skipped, where)
    # the ranks issue one sequence of collectives (Note [one order] in zeroshard/stage3.py)
    assert all(r[2] == results[0][2] for r in results), [r[2] for r in results]
