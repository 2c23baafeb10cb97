"""Ordinary training-loop variations give DDP's numbers or a clear error on every rank."""

import math

import pytest

import cases_loops


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_load_state_dict_mid_run_with_mixed_precision_is_kept_by_the_step(pool, stage):
    for diffs in pool.run(cases_loops.load_state_dict_mid_run, 2, stage):
        assert diffs == (0, 0, 0, 0), diffs  # exact: loaded values, not their bf16 casts


@pytest.mark.parametrize("unfreeze", [True, False])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_changing_requires_grad_after_construction_is_refused_then_close_and_rebuild(
        pool, stage, unfreeze):
    for refusal, probe, diffs in pool.run(cases_loops.trainable_changed_after_construction, 2,
                                          stage, unfreeze):
        name = "body.0.weight" if unfreeze else "body.0.bias"
        assert name in refusal and "opt.close()" in refusal, refusal
        assert ("unfrozen" if unfreeze else "frozen") in refusal, refusal
        assert probe == 2
        assert max(diffs.values()) < 1e-6, diffs


def test_stage3_parameters_between_steps_read_as_nan_and_refuse_writes(pool):
    for reads, text, count, diffs, writes in pool.run(
            cases_loops.touch_stage3_parameters_between_steps, 2):
        for name, (norm, shape, device) in reads.items():
            assert math.isnan(norm) and device == "cpu" and all(shape), (name, norm, shape)
        assert "nan" in text
        assert count[0] == count[1]
        assert max(diffs.values()) < 1e-6, diffs  # the reads changed nothing
        assert "more than one element" in writes[0], writes[0]  # refused at once
        for write in writes[1:]:  # p.zero_(), p.data = ...: found at the next gather
            assert "was written while its unit was released" in write, write
            assert "summon_full_params" in write


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_second_backward_through_a_retained_graph_gives_ddp_gradients(pool, stage):
    for diffs in pool.run(cases_loops.retained_graph_backward_twice, 2, stage):
        assert max(diffs.values()) < 1e-6, diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_evaluation_inside_summon_on_one_rank_issues_no_collective(pool, stage):
    for output_diff, issued, diffs, refusal in pool.run(cases_loops.forward_inside_summon, 2,
                                                        stage):
        assert output_diff < 1e-6, output_diff
        assert issued == 0, issued
        assert max(diffs.values()) < 1e-6, diffs
        if stage == 3:
            assert "torch.no_grad()" in refusal and "summon_full_params" in refusal, refusal
