"""Note [reductions in flight] (zeroshard/_reducer.py): a reduce-scatter is waited for
when the next one launches, never earlier, so each overlaps the backward of at least
the next bucket. Stages 2 and 3 waited as soon as the next bucket's first gradient
arrived (overlap of one layer); this test failed there."""

import pytest

import cases_overlap


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_reduction_is_waited_for_only_when_the_next_one_launches(pool, stage):
    for rank, steps in enumerate(pool.run(cases_overlap.backward_events, 2, stage)):
        for step, events in enumerate(steps):
            where = f"rank {rank}, step {step}: {events}"
            kinds = [kind for kind, _ in events]
            launches = [i for i, kind in enumerate(kinds) if kind == "launch"]
            waits = [i for i, kind in enumerate(kinds) if kind == "wait"]
            assert len(launches) == len(waits) == cases_overlap.BLOCKS, where
            for launch, wait in zip(launches, waits):  # waited for in launch order
                assert launch < wait, where
            # before the last launch, a wait makes room for the launch right after it
            for wait in waits:
                if wait < launches[-1]:
                    assert kinds[wait + 1] == "launch", where
            # and each reduction but the last ran while gradients kept arriving
            for launch, wait in zip(launches[:-1], waits[:-1]):
                assert "arrive" in kinds[launch:wait], where


def test_stage3_waits_for_its_reductions_once_the_walk_has_taken_its_last_step(pool):
    """Note [after the walk's last step] (zeroshard/stage3.py): once the last unit's
    gradients are in, no reduction stays in flight through the backward of the layers
    outside the units (a token embedding's). This failed before: one reduction (the
    second-to-last block's) was in flight when the input layer's gradient arrived."""
    for rank, steps in enumerate(pool.run(cases_overlap.backward_events, 2, 3, True)):
        for step, events in enumerate(steps):
            where = f"rank {rank}, step {step}: {events}"
            kinds = [kind for kind, _ in events]
            first_input = events.index(("arrive", "input.weight"))
            assert kinds.index("launch") < first_input, where  # reductions ran in backward
            in_flight = kinds[:first_input].count("launch") - kinds[:first_input].count("wait")
            assert in_flight == 0, where
