"""Ordinary training-loop variations give DDP's numbers or a clear error on every rank."""

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cases_loops


@pytest.mark.parametrize("how", cases_loops.LOADS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_load_state_dict_mid_run_with_mixed_precision_is_kept_by_the_step(pool, stage, how):
    """The fp32 masters take the loaded values exactly, not their bf16 casts; a load
    through a submodule's load_state_dict was cast to bf16 (stage 3) or lost, stepped
    over by the old masters (stages 1 and 2), and so were in-place writes to the
    parameters between steps (a helper's probes: the masters' check read the flat
    buffer's version counter, which neither a write through a parameter nor one
    through its .data moves).
    Written values are bf16 values here, which the masters must then hold."""
    for diffs in pool.run(cases_loops.load_state_dict_mid_run, 2, stage, how):
        assert diffs == (0, 0, 0, 0), diffs


@pytest.mark.parametrize("via_data", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_writes_to_the_optimizers_own_tensors_are_kept_with_mixed_precision(pool, stage, via_data):
    """Note [writes on either side] in zeroshard/_masters.py: the masters take writes to
    the parameters, and keep writes made to themselves (comparing the shard with the
    masters' cast took the old cast back into the masters: a reviewer's probe). Note
    [masters written between steps]: a forward between such a write and the step ran on
    the parameters before it, silently (helper-110: SAM's perturbation changed nothing);
    stage 3 now gathers the written masters' casts, stages 1-2 refuse the forward. A
    write through ``.data``, which moves no version counter, was not seen at all
    (pytorch_optimizer's ``Lookahead`` evaluated the fast weights so): stage 3 now tells
    it by the masters' contents; at stages 1-2 it is still not seen (Note [masters
    written through .data])."""
    for masters, params, seen, refusal in pool.run(
            cases_loops.writes_to_the_stepped_tensors, 2, stage, via_data):
        assert (masters, params) == (0, 0), (masters, params)
        if via_data and stage < 3:  # not seen
            assert seen > 0 and refusal is None, (seen, refusal)
        elif stage == 3:
            assert seen == 0 and refusal is None, (seen, refusal)
        else:
            assert seen > 0 and "opt.param_groups" in refusal and "fp32 copy" in refusal, refusal


@pytest.mark.parametrize("when", cases_loops.WRITES_TO_THE_MASTERS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_masters_written_between_steps_reach_the_next_forward_or_are_refused(pool, stage, when):
    """Note [masters written between steps] (zeroshard/_masters.py), bf16 policy: a write
    to ``opt.param_groups``' fp32 masters (SAM's perturbation, a Lookahead wrapper) never
    reached the next forward, silently, at every stage (helper-110). Stage 3 now computes
    with the write's cast; stages 1-2, where it reaches no parameter until the next step,
    refuse the forward, but inside a full-precision block (whose parameters show every
    master: helper-112 found it refused). A write inside a block was lost at its end
    (helper-112); one between a forward and its backward is refused as torch (DDP)
    refuses it, with the units kept gathered for the backward too, and so is a forward
    inside a block after such a write, which computed with what the block had gathered
    (helper-114). A write through the masters' ``.data`` moved no version counter and
    was not seen at all (an evaluation after pytorch_optimizer's
    ``Lookahead.backup_and_load_cache()`` ran the fast weights): stage 3 now tells it by
    their contents; stages 1-2 still do not (Note [masters written through .data])."""
    for refusal, seen, masters in pool.run(
            cases_loops.masters_written_around_a_forward, 2, stage, when):
        assert masters == 0, masters  # the write is kept, whatever happened
        if when.startswith("between_forward_and_backward"):
            assert refusal is not None and "backward" in refusal, refusal
        elif when.endswith("through_data") and stage < 3:  # not seen
            assert refusal is None and seen > 0, (refusal, seen)
        elif when == "evaluated_inside_summon":  # stage 3: the block gathered before the write
            assert refusal is not None and "opt.param_groups" in refusal, refusal
        elif stage == 3 or when == "evaluated_in_full_precision":
            assert refusal is None and seen == 0, (refusal, seen)
        else:
            assert refusal is not None and "opt.param_groups" in refusal, refusal


@pytest.mark.parametrize("where", ["param_groups", "model", "inside_the_step"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_optimizers_own_tensors_written_after_a_step(pool, stage, where):
    """Note [the optimizer's own tensors written after a step] (zeroshard/_stage.py): at
    stages 1 and 2 (fp32) ``opt.param_groups``' tensors are each rank's shard, and a
    decay written to them after ``opt.step()`` reached only this rank's slice of the
    parameters until the next step: each rank trained a different model (a helper's
    probe, 4e-2 from data parallel). The next forward refuses it, naming the fix; the
    fix (the write inside the step) and a write to the model's parameters equal data
    parallel, and stage 3, which gathers the shards at each forward, takes it as well."""
    for rank, (differences, refusal) in enumerate(
            pool.run(cases_loops.decay_written_after_the_step, 2, stage, where)):
        if where == "param_groups" and stage < 3:  # refused at the second step's forward
            assert refusal is not None and refusal[1] == 1, (rank, differences, refusal)
            assert "opt.param_groups" in refusal[0] and "optimizer_class" in refusal[0], refusal
        else:
            assert refusal is None, (rank, refusal)
            assert len(differences) == 3 and all(d < 1e-6 for d in differences), (rank, differences)


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


def test_stage3_parameters_between_steps_refuse_reads_and_writes_naming_summon(pool):
    for refusals, in_step, looks, count, ema_diff, diffs, writes, freed in pool.run(
            cases_loops.touch_stage3_parameters_between_steps, 2):
        collectives = ("broadcast", "all_reduce", "all_gather")
        for what, refusal in refusals.items():
            if what in collectives:  # Note [collectives into a released parameter]
                assert f"'body.0.weight' was passed to torch.distributed.{what}() while its " \
                    "unit is released" in refusal, refusal
            else:
                assert "between forward passes" in refusal, (what, refusal)
            assert "'body.0.weight'" in refusal and "summon_full_params" in refusal, (what, refusal)
        assert "read into another tensor" in refusals["ema"], refusals["ema"]
        assert in_step == 2
        shape, device, grad, zeros, requires_grad, text = looks
        assert all(shape) and device == "cpu" and grad is None and zeros == 0 and requires_grad
        assert "body.0.weight" in text and "summon_full_params" in text and "nan" not in text, text
        assert count[0] == count[1]
        assert ema_diff < 1e-6, ema_diff
        assert max(diffs.values()) < 1e-6, diffs  # the refused reads changed nothing
        for write, how in zip(writes, ("normal_", "zero_", "clamp_")):  # refused at once
            assert f"'body.0.weight' was written ({how})" in write, write
        # p.data = ...: an attribute, found at the next gather
        assert "was written while its unit was released" in writes[3], writes[3]
        # a collective in a backward hook: refused whatever the phase (helper-92: it crashed)
        assert "'body.2.weight' was passed to torch.distributed.broadcast()" in writes[4], writes[4]
        assert all("summon_full_params" in write for write in writes), writes
        assert "'body.0.weight'" in freed and "freed without close()" in freed, freed


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zeroshard_calls_inside_inference_mode_keep_training_equal_to_ddp(pool, stage):
    for differences, trained_on in pool.run(cases_loops.calls_under_inference_mode, 2, stage):
        assert max(differences.values()) < 1e-6, differences
        assert trained_on


@pytest.mark.parametrize("grad", [True, False])
def test_parameters_read_outside_their_units_forward_are_refused_naming_the_unit(pool, grad):
    for refusal, diff, in_step in pool.run(cases_loops.parameters_read_outside_their_units_forward,
                                           2, "root", grad):
        assert in_step == 2
        assert refusal is not None and "'blocks.0.lin.weight' was read (sum)" in refusal, refusal
        assert "outside the forward of unit blocks.0" in refusal and "units=" in refusal, refusal
    for refusal, diff, in_step in pool.run(cases_loops.parameters_read_outside_their_units_forward,
                                           2, "blocks", grad):
        assert refusal is None and in_step == 2, refusal
        assert diff < 1e-6, diff  # parameters after two steps; evaluation: the losses


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_second_backward_through_a_retained_graph_gives_ddp_gradients(pool, stage):
    for diffs in pool.run(cases_loops.retained_graph_backward_twice, 2, stage):
        assert max(diffs.values()) < 1e-6, diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_module_called_outside_its_units_forward_is_refused_at_stage3(pool, stage):
    """Note [called outside its unit's forward]: at stage 3 the embeddings built before
    ``model(inputs_embeds=...)``, or a loss method calling the submodules, computed with
    the placeholders and trained NaN with no error (a helper's probes); now refused on
    every rank, naming the module; a layer of one unit run by another part of the
    model's forward, naming the units to choose. Stages 1 and 2 keep every parameter
    whole and train them; a wrapper whose forward builds the embeddings equals DDP at
    every stage. A refusal or an error of the user's raised inside a unit's forward
    leaves no saved-tensor hooks behind (Note [a forward that raises]): they were left
    on torch's stack, and a torch.func transform in the same process refused to run."""
    for refusals, hooks_left, transform_ran, every_rank_there, differences in pool.run(
            cases_loops.outside_the_models_forward, 2, stage):
        if stage == 3:
            for refusal in refusals[:2]:
                assert "module 'embed' (Embedding) was called outside the model's forward" \
                    in refusal, refusal
                assert "summon_full_params" in refusal, refusal
            assert "module 'body.0' (Linear) was called by another part of the model's " \
                "forward" in refusals[2], refusals[2]
            assert "pass units= without Sequential" in refusals[2], refusals[2]
        else:
            assert refusals[:3] == ["no error"] * 3, refusals
        assert "cannot be multiplied" in refusals[3], refusals[3]
        assert hooks_left == [False] * 4, hooks_left
        assert transform_ran == ["no error"] * 4, transform_ran
        assert every_rank_there
        assert differences == [0.0] * 3, differences


@pytest.mark.parametrize("how", ["one_point", "points_differ", "after", "inside", "first_step"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_batch_whose_backward_raised_is_skipped_by_zero_grad_as_under_ddp(pool, stage, how):
    """Note [a backward that raised]: a loop that catches an error raised halfway through
    a backward (a hook; out of memory) and skips the batch went on from the abandoned
    backward's state: 0.1 from DDP at stages 2-3 with no error, a misleading "changed in
    place" refusal at stage 1 (found by driving such a loop). Now a step, a clipping and
    a forward (and all that issues collectives: summon_full_params, full state dicts, a
    stage-3 unit's forward) refuse on every rank, naming opt.zero_grad(), which drops the batch, and
    training goes on equal to DDP skipping it, also where the ranks raised at different
    points of the backward, after a no_sync() window, or in the first step, and later
    steps reduce what a run that skipped nothing does; one that began inside no_sync()
    ends with no reduction, as it would have inside no_sync()."""
    for refusals, every_rank_there, zero_grad_bytes, (step_bytes, clean_bytes), differences in pool.run(
            cases_loops.skipped_after_an_abandoned_backward, 2, stage, how):
        actions = ["opt.step()", "opt.clip_grad_norm_()", "opt.summon_full_params()",
                   "opt.full_state_dict()", "a forward of unit body.0", "a forward of the model"]
        if stage != 3:  # a submodule's forward issues no collective there
            assert refusals.pop(4) == "no error"
            actions.pop(4)
        for refusal, action in zip(refusals, actions, strict=True):
            assert refusal.startswith(f"zeroshard: {action} after a backward that raised"), refusal
            assert "opt.zero_grad()" in refusal, refusal
        assert every_rank_there
        assert (zero_grad_bytes == 0) == (how == "inside"), zero_grad_bytes
        # stage 3 adopted the reduction points of a first backward that raised: every
        # bucket it never reached reduced early and again, for good (a reviewer's probe)
        assert step_bytes == clean_bytes, (step_bytes, clean_bytes)
        assert max(differences.values()) < 1e-6, differences


@pytest.mark.parametrize("clear", ["opt", "opt_keep", "model"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_grad_clears_as_torch_does_and_a_branch_left_out_adds_nothing(pool, stage, clear):
    """``opt.zero_grad()`` leaves ``p.grad`` None, as torch's does; with
    ``set_to_none=False`` zero: stage 1 zeroes it, stages 2 and 3 (no full gradients) put
    a marker there that reads zero (it was None, and a ``model.zero_grad()`` after it
    reached no shard: Note [gradient markers]). Stage 1 no longer zeroes its buffers then: the next backward overwrites them,
    and a branch this rank left out in that backward must reduce zero, not the gradient
    of the step before (DDP's parameters, bitwise). A step right after the clearing
    steps on zero gradients with ``set_to_none=False``, as torch's does (a helper's
    probe: it stepped on none, 3e-2 from DDP), and on none without; after
    ``model.zero_grad()`` too (stage 1 stepped on zeros, moving the parameters by AdamW's
    momentum and weight decay where torch skips them: a reviewer's probe, 1.2e-2)."""
    for after_clearing, differences in pool.run(cases_loops.cleared_then_a_branch_left_out, 2,
                                                stage, clear):
        expected = "zero" if clear == "opt_keep" else "None"
        assert all(states == [expected] * 4 for states in after_clearing), after_clearing
        assert differences == [0.0] * 4, differences


@pytest.mark.parametrize("stage", [2, 3])
def test_gradients_zeroed_by_the_optimizer_read_as_zeros_into_other_tensors(pool, stage):
    """helper-64's probe: an EMA of gradients after opt.zero_grad(set_to_none=False) was
    refused as a read "after backward", where DDP reads zeros (the markers then hold the
    gradient's true value); after a backward the read is still refused."""
    for read, refusal in pool.run(cases_loops.gradients_read_into_buffers_after_zero_grad_keeping_zeros,
                                  2, stage):
        assert read == 0.0, read
        assert refusal is not None and "read into another tensor" in refusal, refusal


def test_a_cleared_gradient_stays_none_through_a_backward_that_skips_its_unit(pool):
    for diffs in pool.run(cases_loops.cleared_then_unit_unused_everywhere, 2):
        assert all(d < 1e-6 for d in diffs), diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_layer_cleared_in_two_calls_is_skipped_as_one_cleared_at_once(pool, stage):
    for difference in pool.run(cases_loops.layer_cleared_around_clipping, 2, stage):
        assert difference < 1e-6, difference


@pytest.mark.parametrize("stage", [2, 3])
def test_a_marker_read_through_out_is_refused_and_a_cleared_gradient_stays_none(pool, stage):
    for refusal, finite, stays_none in pool.run(cases_loops.marker_reads_and_cleared_gradients,
                                                2, stage):
        assert "read into another tensor" in refusal and finite, (refusal, finite)
        assert stays_none


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_clipping_a_model_with_float64_parameters_equals_ddp(pool, stage, wide):
    """An fp64 parameter beside fp32 ones, or an all-fp64 model: opt.clip_grad_norm_ took
    every norm in fp32 and torch refused to narrow the fp64 gradient's (a helper's
    probe). Now the norm is fp64 as torch's is, and equal to DDP's up to the rounding of
    the norms it is summed from (zeroshard's over pieces of the shards, torch's per
    parameter): fp64 rounding for an all-fp64 model, fp32's for the fp32 layer's
    gradients (each in fp32 on both sides), where the parameters follow alike."""
    rounding = 1e-12 if wide else 1e-6
    for steps in pool.run(cases_loops.clipping_with_float64_parameters, 2, stage, wide):
        for norm, dtype, ddp_norm, ddp_dtype, difference in steps:
            assert dtype == ddp_dtype == "torch.float64", (dtype, ddp_dtype)
            assert norm > 0.1 and abs(norm - ddp_norm) <= rounding * ddp_norm, (norm, ddp_norm)
            assert difference < rounding, steps


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parameters_of_odd_sizes_start_where_ddps_do_and_train_bitwise_alike(pool, stage):
    """Note [aligned parameters]: laid end to end, the head's weight started 4 bytes past
    a multiple of 64 (stage 3: 56), and F.linear(out=1, in=17) rounded it differently
    on this CPU: outputs 6e-8 and parameters 1.5e-8 from DDP's after 3 steps (a
    helper's probe). Every parameter now starts at a multiple of 64 bytes, as torch's
    allocator places DDP's, and the numbers are DDP's bit for bit."""
    for output_difference, difference, starts in pool.run(cases_loops.odd_sizes_against_ddp,
                                                          2, stage):
        assert starts == [0], starts
        assert output_difference == 0.0 and difference == 0.0, (output_difference, difference)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_block_repeated_more_on_one_rank_reduces_its_late_gradient_everywhere(pool, stage):
    """Note [late gradients]: under reentrant checkpointing a shared block run twice on
    rank 0 only brings its bucket a late gradient on rank 0 only, from the second step
    on. Stages 1 and 2 took the late set as the same on every rank: rank 0 issued an
    extra reduce-scatter, rank 1 went on to the next collective, and both hung (a
    helper's probe). Now the ranks agree on it; stage 3 always did."""
    for rank, differences in enumerate(pool.run(cases_loops.repeats_that_differ_across_ranks,
                                                2, stage)):
        assert all(d < 1e-6 for d in differences), (rank, differences)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_evaluation_inside_summon_on_one_rank_issues_no_collective(pool, stage):
    for output_diff, issued, diffs, refusal in pool.run(cases_loops.forward_inside_summon, 2,
                                                        stage):
        assert output_diff < 1e-6, output_diff
        assert issued == 0, issued
        assert max(diffs.values()) < 1e-6, diffs
        if stage == 3:
            assert "torch.no_grad()" in refusal and "summon_full_params" in refusal, refusal



@pytest.mark.parametrize("clear", ["model", "model_keep", "none"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_clearing_gradients_through_the_model_equals_ddp(pool, stage, clear):
    """``model.zero_grad()`` after ``opt.step()`` (what HF Trainer does), with or without
    set_to_none, or no clearing at all (gradients accumulate into the next step)."""
    plan = {"model": cases_loops.MLP, "weight_decay": 0.0, "autocast": False, "steps": [
        {"micro_batches": 1, "eval": False, "clip": step == 0, "clear": clear}
        for step in range(3)]}
    for diffs in pool.run(cases_loops.drive_loop, 2, stage, plan):
        assert all(d < 1e-6 for d in diffs), diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_clipping_over_model_parameters_is_refused(pool, stage):
    for refusal, probe, diffs in pool.run(cases_loops.torch_clip_over_model_parameters, 2,
                                          stage):
        # stages 2 and 3 refuse the norm's read of the markers, stage 1 the step
        assert re.search("changed in place|was read", refusal), refusal
        assert "opt.clip_grad_norm_" in refusal, refusal
        # by value: stage 1 named the norm only (helper-91)
        assert "clip_grad_value_([p for g in opt.param_groups" in refusal, refusal
        assert re.search(r"body\.\d\.(weight|bias)", refusal), refusal  # names it
        assert probe == 2
        assert max(diffs.values()) < 1e-6, diffs


@pytest.mark.parametrize("stage", [2, 3])
def test_reading_gradient_values_after_backward_is_refused_and_a_finite_guard_equals_ddps(
        pool, stage):
    for refusals, unrefused, probe, difference in pool.run(
            cases_loops.gradient_values_read_after_backward, 2, stage):
        for refusal, read in zip(refusals, ["norm", "isfinite", "clone", "sum",
                                            "__bool__"]):
            assert f"was read ({read})" in refusal and "opt.clip_grad_norm_" in refusal, refusal
            assert "body.0.weight" in refusal, refusal
        assert unrefused["shown"].startswith("GradientMarker(body.0.weight: the reduced"), unrefused
        assert "nan" not in unrefused["shown"], unrefused
        assert tuple(unrefused["template"].shape) == (7, 5), unrefused  # a shape template
        assert unrefused["zeroed"] == 0.0 and unrefused["zeroed, stepped"] == 0.0, unrefused
        assert unrefused.get("converted", "GradientMarker") == "GradientMarker", unrefused
        assert probe == 2
        assert difference < 1e-6, difference


@pytest.mark.parametrize("micro_batches, mesh, n", [(1, None, 2), (3, None, 2), (3, (2, 2), 4)])
@pytest.mark.parametrize("broadcast_buffers", [True, False])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_batchnorm_statistics_follow_ddp(pool, stage, broadcast_buffers, micro_batches, mesh, n):
    """Note [buffers follow rank 0]: with broadcast_buffers a training forward that follows
    one outside no_sync() starts from rank 0's running statistics, as DDP's (with
    accumulation under no_sync(): the first micro-batch's, which a probe found zeroshard
    did at the last one's, 0.087 off DDP's statistics); without, each rank keeps its own.
    Also on a 2x2 mesh, whose rank 0 is one rank of four."""
    for params, buffers, issued in pool.run(cases_loops.batchnorm_statistics, n, stage,
                                            broadcast_buffers, micro_batches, mesh):
        assert params < 1e-6 and buffers < 1e-6, (params, buffers)
        assert issued == 0  # rank 0's evaluation under no_grad


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_stage3_units_returning_a_dataclass_equal_ddp(pool, reshard_after_forward):
    for diffs in pool.run(cases_loops.dataclass_unit_outputs, 2, reshard_after_forward):
        assert all(d < 1e-6 for d in diffs), diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batchnorm_with_bf16_mixed_precision_keeps_its_dtype_and_follows_the_recipe(
        pool, stage, model_dtype):
    """In an fp64 model BatchNorm's inputs were cast to fp32 beside its fp64 parameters:
    torch's raw "mixed dtype" error in the first forward (a helper's probe). A bf16 model
    under a bf16 policy (fp32 masters for a model loaded in bf16) failed to build, with
    torch's raw "setStorage" error: a policy of the model's own dtype freed the buffer
    its parameters view (a reviewer's probe; Linear layers alone failed alike)."""
    for params, buffers, dtypes in pool.run(cases_loops.batchnorm_with_bf16, 2, stage,
                                            model_dtype):
        assert dtypes == [str(model_dtype)], dtypes
        assert params < 1e-6 and buffers < 1e-6, (params, buffers)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_backward_with_create_graph_is_refused_on_every_rank(pool, stage):
    for refusal, probe in pool.run(cases_loops.backward_with_create_graph, 2, stage):
        assert "create_graph=True" in refusal and "torch.autograd.grad" in refusal, refusal
        assert probe == 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_penalty_equals_ddp_or_is_refused_at_stage3(pool, stage):
    for result in pool.run(cases_loops.gradient_penalty, 2, stage):
        if stage == 3:
            refusal, probe = result
            assert "create_graph=True" in refusal and "stage 1 or 2" in refusal, refusal
            assert probe == 2
            continue
        diffs, scattered = result
        assert all(d < 1e-6 for d in diffs), diffs
        # autograd.grad ends a backward too: its reduce-scatter (of zeros) comes on top
        assert scattered[:3] == [2 * scattered[3]] * 3, scattered


def test_functionally_tied_weight_with_automatic_units_is_refused(pool):
    for refusal, diff in pool.run(cases_loops.functionally_tied_weight, 2, None):
        assert diff is None and refusal is not None
        assert "'emb.weight'" in refusal and "units=" in refusal, refusal
    for refusal, diff in pool.run(cases_loops.functionally_tied_weight, 2, torch.nn.Linear):
        assert refusal is None and diff < 1e-6, (refusal, diff)


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("reshard", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_a_units_weight_read_by_its_parent_after_calling_it_trains_like_ddp(
        pool, frozen, reshard, last):
    for differences, gathers in pool.run(cases_loops.unit_weight_read_after_its_call, 2, frozen,
                                         reshard, last):
        assert max(differences) < 1e-6, differences
        assert gathers == [2.0 if reshard else 1.0] * 3, gathers  # forward, backward: no more


@pytest.mark.parametrize("reshard", [True, False])
def test_reversible_blocks_that_recompute_in_backward_train_like_ddp(pool, reshard):
    for differences, gathers, held in pool.run(cases_loops.reversible_blocks, 2, reshard):
        assert max(differences) < 1e-6, differences
        assert gathers == [2.0 if reshard else 1.0] * 3, gathers  # forward, backward: no more
        assert held == [0] * 3, held  # none kept past backward


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_forwards_one_backward_with_a_buffer_saved_for_backward(pool, stage):
    for diff in pool.run(cases_loops.two_forwards_one_backward_with_a_saved_buffer, 2, stage):
        assert diff < 1e-6, diff


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "Muon"])
@pytest.mark.parametrize("how", ["none", "zero_"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_cleared_between_backward_and_step_decide_alike_on_every_rank(
        pool, stage, how, optimizer):
    """Found by review: stage 1 decided from each rank's local gradient values, so ranks
    whose data differed refused or cleared differently (one rank raising while the other
    entered the step's collective). With AdamW, a weight whose gradient was set to None
    was stepped with a zero gradient, its bucket shared with parameters that were not
    (a helper's probe: 5e-4 from DDP after 5 steps), and a Muon matrix alike (2.0e-3
    at stages 1-2): now it is kept still, as torch skips it (Note [a gradient cleared
    before the step])."""
    outcomes = pool.run(cases_loops.grad_cleared_between_backward_and_step, 2, stage, how,
                        optimizer)
    for refusal, probe, diff in outcomes:
        assert probe == 2
        if stage == 1 and how == "zero_":  # stage 1 cannot see which gradient changed
            assert refusal is not None and "changed in place" in refusal, refusal
        else:
            assert refusal is None and diff < 1e-6, (refusal, diff)
    assert len({refusal for refusal, _, _ in outcomes}) == 1


@pytest.mark.parametrize("how", ["cleared_first", "loaded", "resumed", "loaded_adagrad",
                                 "loaded_adagrad_lr_decay"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_parameter_without_state_inside_a_shard_starts_from_a_fresh_state(
        pool, stage, how, tmp_path):
    for differences, said in pool.run(cases_loops.a_parameter_without_state_inside_a_shard, 2,
                                      stage, how, str(tmp_path / "ckpt")):
        if how == "loaded_adagrad_lr_decay":  # Note [a state never stepped]: its count is read
            assert len(said) == 1 and said[0].startswith("refused: "), said
            assert "step=0 for 'body.0.weight'" in said[0] or "and step=0" in said[0], said
            continue
        assert max(differences) < 1e-6, differences
        if how.startswith("loaded"):  # the weight shares its bucket with its bias (and more)
            assert len(said) == 1 and "'body.0.weight' beside" in said[0], said
            assert "step=2" in said[0], said
        else:
            assert said == [], said


@pytest.mark.parametrize("action", ["step", "clip"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_step_after_a_backward_inside_no_sync_is_refused_on_every_rank(pool, stage, action):
    """Found by a probe: stages 2 and 3 stepped without the window's gradients (silently
    nothing moved) and stage 1 refused, blaming a write to .grad."""
    for refusal, probe, diff in pool.run(cases_loops.step_after_a_backward_inside_no_sync, 2,
                                         stage, action):
        assert "inside `opt.no_sync()`" in refusal and "outside" in refusal, refusal
        assert probe == 2
        assert diff < 1e-6, diff


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_input_gradient_inside_no_sync_leaves_the_step_alone(pool, stage):
    """Found by review: torch.autograd.grad(loss, x) inside no_sync() after the step's
    backward made the step refuse, as if a window had ended inside no_sync()."""
    for diff in pool.run(cases_loops.input_gradient_inside_no_sync, 2, stage):
        assert diff < 1e-6, diff


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_parameters_computed_in_a_pre_forward_hook_train_like_ddp(pool, stage):
    """Found by a probe: at stage 3 a pre-forward hook registered before the optimizer
    (legacy weight_norm, prune) ran before the gather and read the placeholders: NaN."""
    for diff in pool.run(cases_loops.parameters_computed_in_a_pre_forward_hook, 2, stage):
        assert diff < 1e-6, diff


@pytest.mark.parametrize("how", cases_loops.FORWARD_HOOKS_AFTER)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_forward_hook_added_after_the_optimizer_trains_like_ddp(pool, stage, how):
    """Found by a reviewer's probe: at stage 3 such a hook ran after the unit's own, so a
    weight it read was NaN (the schedule's last unit is released as its forward ends)
    and a submodule it called failed in backward with torch's raw setStorage error."""
    for diff, same_logs in pool.run(cases_loops.forward_hook_registered_after_the_optimizer, 2,
                                    stage, how):
        assert diff == 0 and same_logs, (diff, same_logs)


@pytest.mark.parametrize("stage, units", [(1, None), (2, None), (3, None), (3, "embedding")])
def test_a_parameter_written_inside_its_forward_keeps_the_write(pool, stage, units):
    """Found by a probe: Embedding(max_norm=...) renormalised rows of the gathered
    buffer at stage 3, and release threw the write away (Note [writes inside a forward])."""
    units = torch.nn.Embedding if units == "embedding" else None
    for diff in pool.run(cases_loops.embedding_with_max_norm, 2, stage, units):
        assert diff < 1e-6, diff


@pytest.mark.parametrize("how", ["assign", "in_place"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_momentum_encoder_written_inside_the_forward_keeps_the_write(pool, stage, how):
    """MoCo's reference update inside its forward (``p_k.data = ...``, "assign") was lost
    at stage 3 (Note [new .data inside a forward] in zeroshard/_bucket.py)."""
    for diff in pool.run(cases_loops.momentum_encoder_written_inside_forward, 2, stage, how):
        assert diff < 1e-12, diff


@pytest.mark.parametrize("clearing", ["opt.zero_grad", "model.zero_grad", "none"])
def test_a_no_sync_window_dropped_by_zero_grad_leaves_no_trace_at_stage3(pool, clearing):
    """Found by review: a unit that ran only in a dropped window was stepped with a zero
    gradient (weight decay moved it) where data parallelism skips it."""
    for diff, moved in pool.run(cases_loops.dropped_no_sync_window, 2, clearing):
        assert diff < 1e-6, diff
        assert (moved > 0) == (clearing == "none"), moved  # the reference tells them apart


@pytest.mark.parametrize("stage, backend, autocast, where", [
    (1, "inductor", False, "model"), (2, "inductor", False, "model"),
    (3, "inductor", False, "model"), (3, "inductor", True, "model"),
    (3, "aot_eager", False, "model"), (3, "aot_eager", False, "blocks"),
    (1, "eager", False, "step"), (2, "eager", False, "step"), (3, "eager", False, "step"),
    (1, "eager", False, "train_step"), (2, "eager", False, "train_step"),
    (3, "eager", False, "train_step"), (3, "eager", False, "train_step_hooked")])
def test_a_compiled_model_trains_like_data_parallel_compiled_alike(
        pool, stage, backend, autocast, where):
    """Found by a probe: stage 3 failed under torch.compile (aot_eager: set_ on a graph
    input; inductor: its stride checks). Bitwise: the reference breaks its graph where
    stage 3's unit hooks do. Also each block compiled in place (``block.compile()``),
    and a compiled function that steps and clears the optimizer, or runs the whole
    training step, which failed inside dynamo at every stage (helper-116; Note [the
    optimizer under torch.compile])."""
    for diff, recompiled in pool.run(cases_loops.compiled_model, 2, stage, backend, autocast,
                                     where):
        assert diff == 0, diff
        assert recompiled == 0, recompiled


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zeroing_some_rows_of_a_gradient_is_refused(pool, stage):
    """Found by review: the write zeroed the shared marker element, and the whole
    parameter's gradient was cleared (or, through .data, nothing was). ``p.grad[rows] =
    0`` and ``p.grad += 1`` at stages 2-3 met torch's raw error about a tensor whose
    elements share memory (a helper's probe), not the refusal naming the fix."""
    for refusals, probe in pool.run(cases_loops.partial_gradient_writes, 2, stage):
        assert probe == 2
        # stage 1 keeps real local gradients: a write through .data has a version
        # counter of its own and is not seen there (README)
        for refusal in [refusals[0]] + refusals[2:] if stage == 1 else refusals:
            assert "changed in place" in refusal and "body." in refusal, refusal


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_set_by_hand_are_refused_on_every_rank_naming_why(pool, stage):
    """PCGrad's gradient surgery (``torch.autograd.grad`` per loss, ``p.grad = a + b``) and
    gradients copied in from elsewhere: refused before and after a normal step, on every
    rank, saying that zeroshard reduces only what backward computes. Stages 2 and 3 took
    most such steps without error and did not move the parameters (a helper's probe and
    mine)."""
    for refusals, probe in pool.run(cases_loops.gradients_set_by_hand, 2, stage):
        assert probe == 2
        assert len(refusals) == 4
        for refusal in refusals:
            assert "was given a new tensor (set by hand" in refusal, refusal
            assert "torch.autograd.grad" in refusal and "p.register_hook" in refusal, refusal


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("policy", [False, True])
def test_gradients_the_param_groups_show_replaced_or_cleared_reach_clip_and_step(pool, stage,
                                                                                   policy):
    """Note [gradients the param groups show]: ``p.grad = p.grad.clamp(...)`` and ``p.grad =
    None`` on ``opt.param_groups``' tensors act as the same changes made in place, in the
    clip's norm and in the step, with and without a bf16 policy; the biases set to None
    stay still. Before, the clip took its norm from the old shard (both), and under the
    policy the step's widening put the old shard back (helper-102's probes)."""
    for per_way in pool.run(cases_loops.param_group_gradients_replaced, 2, stage, policy):
        for way, out in per_way.items():  # ``p.grad.data = ...``: helper-103
            assert out["difference"] == 0, (way, out)
            assert out["norms"][0] == out["norms"][1], (way, out)
            assert out["biases moved"] == (0, 0), (way, out)


@pytest.mark.parametrize("optimizer", ["SGD", "Adafactor"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_cleared_through_the_param_groups_start_the_next_step_afresh(
        pool, stage, micro_batches, optimizer):
    for differences in pool.run(cases_loops.gradients_cleared_through_the_param_groups, 2,
                                stage, micro_batches, optimizer):
        assert max(differences) < 1e-6, differences


def test_stage3_forward_without_backward_frees_its_activations_at_once(pool):
    """Found by review: saved-tensor hooks returning the tensor itself made a cycle."""
    assert pool.run(cases_loops.forward_without_backward_frees_its_activations, 2) == [False, False]


def test_stage3_releases_the_last_unit_before_the_head(pool):
    """Found by review: the last block stayed gathered through the head and the loss."""
    for held, bound, block_bytes in pool.run(cases_loops.parameters_held_at_the_head, 2):
        assert block_bytes > 0  # a block held would exceed the bound
        assert held <= bound, (held, bound)

loop_steps = st.fixed_dictionaries({
    "micro_batches": st.integers(1, 2), "retain": st.booleans(), "eval": st.booleans(),
    "clip": st.booleans(),
    "clear": st.sampled_from(cases_loops.CLEARS),
    "none_before_step": st.booleans(),
    "between": st.sampled_from(cases_loops.BETWEEN_STEPS),
    "abandoned": st.sampled_from(cases_loops.ABANDONED)})
loop_plans = st.fixed_dictionaries({
    "model": st.sampled_from([cases_loops.MLP, cases_loops.TRANSFORMER, cases_loops.REUSED_BLOCK]),
    "weight_decay": st.sampled_from([0.0, 0.01]),
    "optimizer": st.sampled_from(sorted(cases_loops.DRAWN_OPTIMIZERS)),
    "autocast": st.booleans(),  # bf16 autocast over fp32 parameters, both sides alike
    # a mesh of all the ranks: replicas of one shard each, or one replica
    "mesh": st.sampled_from([None, "replicate", "shard"]),
    "steps": st.lists(loop_steps, min_size=2, max_size=3)})


@settings(max_examples=int(os.environ.get("ZEROSHARD_LOOP_EXAMPLES", "150")))
@given(stage=st.sampled_from([1, 2, 3]), world_size=st.sampled_from([2, 3]), plan=loop_plans)
def test_drawn_ways_of_driving_the_loop_equal_ddp(pool, stage, world_size, plan):
    """bf16 autocast or not; a batch skipped because its backward raised (Note [a
    backward that raised]); how gradients are cleared (the optimizer's zero_grad, the
    model's, with or without set_to_none, a subset of parameters, not at all), some set
    to None between backward and step (Note [a gradient cleared before the step]),
    micro-batches, a second backward through a retained graph, evaluation forwards,
    clipping, and between steps an EMA update, evaluation on rank 0 inside
    summon_full_params, load_state_dict, a log line reading the weights (refused at stage 3
    outside summon_full_params, then read inside it), close() and a new optimizer, or a resume (a
    checkpoint loaded at the next stage, or full state dicts from rank 0); SGD with
    momentum, Adagrad or Adadelta; over a process group or a mesh: DDP's parameters after
    every step, and the EMA's (fp32 noise: 1e-6)."""
    shapes = {None: None, "replicate": (world_size, 1), "shard": (1, world_size)}
    plan = {**plan, "mesh": shapes[plan["mesh"]]}
    for diffs in pool.run(cases_loops.drive_loop, world_size, stage, plan):
        assert all(d < 1e-6 for d in diffs), diffs


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_channels_last_conv_weights_keep_their_layout_and_equal_ddp(pool, stage, optimizer):
    """Found by the issue on ordinary loops: the flat buffer made every parameter
    row-major, so a channels_last conv weight came back NCHW (a layout conversion on
    every call on GPU). Note [memory order] in zeroshard/_bucket.py."""
    for rank, (layouts, diffs, exported, closed) in enumerate(
            pool.run(cases_loops.channels_last_conv_weights, 2, stage, optimizer)):
        expected = ["constructed", "forwards", "stepped", "closed"]
        expected += ["stage1_grads"] if stage == 1 else []
        expected += ["exported"] if rank == 0 else []
        assert sorted(layouts) == sorted(expected), layouts
        for when, seen in layouts.items():
            assert seen and all(seen), (when, seen)
        assert all(d < 1e-6 for d in diffs) and exported < 1e-6 and closed < 1e-6, (diffs, exported, closed)


@pytest.mark.parametrize("stage,load_stage", [(1, 3), (2, 1), (3, 2)])
def test_checkpoints_move_between_channels_last_and_row_major_models(pool, tmp_path, stage,
                                                                     load_stage):
    for results, layouts in pool.run(cases_loops.channels_last_checkpoint_round_trip, 2,
                                     stage, load_stage, str(tmp_path)):
        assert max(results.values()) < 1e-6, results
        for when, seen in layouts.items():  # each model keeps its own layout
            assert all(seen) == when.startswith("plain_to_cl"), (when, seen)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_channels_last_load_state_dict_with_mixed_precision_reaches_the_masters(pool, stage):
    for diff, layouts in pool.run(cases_loops.channels_last_load_state_dict_with_bf16, 2, stage):
        assert diff == 0 and all(layouts), (diff, layouts)


def test_memory_formats_that_differ_across_ranks_are_refused(pool):
    refusals = pool.run(cases_loops.memory_formats_differ_across_ranks, 2, 2)
    assert "differ across ranks" in refusals[0] and "conv1.weight" in refusals[0], refusals
    assert "differ across ranks" in refusals[1], refusals


def test_optimizer_state_dict_refuses_another_memory_format(pool):
    for refusal, loaded in pool.run(cases_loops.optimizer_state_dict_across_memory_formats, 1):
        assert "memory formats" in refusal and "zeroshard checkpoints" in refusal, refusal
        assert loaded


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_clipping_through_the_param_groups_by_norm_is_refused_and_by_value_equals_ddp(pool, stage):
    """Note [a norm of a shard]: found by driving the library as Lightning does; before,
    clipping by norm over opt.param_groups clipped each rank's shard by its own norm."""
    for refusal, probe, differences in pool.run(cases_loops.clipping_through_the_param_groups,
                                                2, stage):
        assert "opt.clip_grad_norm_" in refusal and "shard" in refusal, refusal
        assert probe == 2
        assert all(d < 1e-6 for d in differences), differences


@pytest.mark.parametrize("stage, how", [(1, "data"), (2, "data"), (1, "double"), (2, "double"),
                                        (3, "double"), (1, "in_forward"), (2, "in_forward"),
                                        (1, "parameter"), (2, "parameter"), (3, "parameter")])
def test_a_parameter_replaced_after_construction_is_refused_on_every_rank(pool, stage, how):
    """Found by a helper driving the library: stages 1-2 stepped the memory the parameter
    had left (p.data = t, model.double()), and every stage the nn.Parameter a new one had
    replaced, silently. Stage 3 refuses the .data writes itself (Note [stage-3
    placeholders]). A dtype change, by the user or by the module's own forward, failed in
    backward with torch's raw error at stages 1 and 2 (Note [memory replaced inside a
    forward]): now refused as backward begins, before any collective. At stage 3 a dtype
    change was refused as a write to make inside summon_full_params(), which refuses it
    in turn (helper-91): it is named as a conversion."""
    for refusal, probe in pool.run(cases_loops.parameter_replaced_after_construction, 2,
                                   stage, how):
        if stage == 3 and how == "double":  # the first unit gathered
            assert "'body.0.weight' (to torch.float64 on cpu)" in refusal, refusal
            assert "were converted after the ZeroOptimizer was built" in refusal, refusal
        else:
            assert "'body.4.weight'" in refusal or "'body.4.bias'" in refusal, refusal
        assert "opt.close()" in refusal, refusal
        assert probe == 2


@pytest.mark.parametrize("stage", [1, 2])
def test_a_backward_inside_summon_full_params_full_precision_is_refused_naming_it(pool, stage):
    """Note [memory replaced inside a forward] in _stage.py: the masters shown there are
    zeroshard's own doing, and the refusal says so (a reviewer's probe)."""
    for refusal, probe in pool.run(cases_loops.backward_inside_summon_full_precision, 2, stage):
        assert "a backward inside `with opt.summon_full_params(full_precision=True):`" \
            in refusal, refusal
        assert probe == 2


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("variant", list(cases_loops.LOOKUPS))
def test_a_tied_embeddings_rows_summed_into_the_heads_contribution_equal_ddp(pool, stage,
                                                                             variant):
    """Note [an embedding's rows summed into the first contribution]: bit for bit DDP's
    parameters, where the rows go into the head's contribution (a batch with fewer tokens
    than the embedding has rows, repeated rows, the padding row, bf16, two forwards
    before one backward) and where torch's backward of the lookup runs instead (more
    tokens than rows, the embedding looked up twice, ids saved through a checkpoint's
    hooks: reading them in the forward recomputed the region there, one forward more a
    step, a reviewer's probe)."""
    declined = variant in ("more tokens than rows", "looked up twice", "checkpointed")
    for diff, applied, (runs, ddp_runs) in pool.run(cases_loops.tied_lookup_rows, 2, stage,
                                                    variant):
        assert diff == 0.0, diff
        assert (applied == 0) if declined else (applied > 0), applied
        assert runs == ddp_runs, (runs, ddp_runs)


def _both_refused_in_backward(errors: list) -> bool:
    """zeroshard's run and DDP's both raised torch's in-place check in backward."""
    return len(errors) == 2 and all(e is not None and "modified by an inplace operation" in e
                                    for e in errors)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("what", ["token ids", "an input"])
def test_a_saved_tensor_written_after_the_forward_is_refused_as_under_ddp(pool, stage, what):
    for errors in pool.run(cases_loops.saved_input_written_after_forward, 2, stage, what):
        assert _both_refused_in_backward(errors), errors


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("how", ["loss kept", "gan"])
def test_a_graph_from_before_the_step_is_refused_in_backward_as_under_ddp(pool, stage, how):
    for errors in pool.run(cases_loops.backward_of_a_graph_from_before_the_step, 2, stage, how):
        assert _both_refused_in_backward(errors), errors


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_graph_from_before_the_step_under_autocast_runs_as_torch_or_is_refused(pool, stage):
    """Under autocast torch saved its casts, which the step leaves alone: DDP runs the
    backward, and so do stages 1-2; stage 3, which saves how to cast, not the cast,
    refuses, saying so (it cast the new weights, silently)."""
    for mine, ddp in pool.run(cases_loops.backward_of_a_graph_from_before_the_step, 2, stage,
                              "loss kept, autocast"):
        assert ddp is None, ddp
        if stage == 3:
            assert mine is not None and "cannot make the old one again" in mine, mine
        else:
            assert mine is None, mine
