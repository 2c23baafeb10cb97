"""Bad input, state-dict resume, summon_full_params, and what the API refuses
(the collectives layer is tests/test_collectives.py)."""

import pytest
import torch

import cases_api
import cases_torch_api

# which bad input -> (exception, words the message must contain: the value, and the fix)
BAD_INPUTS = {
    "stage": ("ValueError", ["got 4", "1, 2 or 3"]),
    "ddp": ("TypeError", ["DistributedDataParallel", "ddp_model.module"]),
    "lazy_module": ("ValueError", ["'1.weight'", "uninitialized", "Run one forward"]),
    "foreign_param": ("ValueError", ["param_groups[1]['params'][0]", "(2, 3)", "model.parameters()"]),
    "named_params": ("TypeError", ["(name, parameter) pair", "'body.0.weight'", "[p for _, p in pairs]"]),
    "duplicate_param": ("ValueError", ["body.0.weight", "param_groups[0]", "exactly one group"]),
    "set_group": ("TypeError", ["param_groups[0]['params'] is a set", "pass a list"]),
    "set_params": ("TypeError", ["param_groups is a set", "pass a list"]),
    "differentiable": ("ValueError", ["AdamW with differentiable=True", "drop differentiable=True"]),
    "lbfgs": ("TypeError", ["LBFGS", "closure", "steps once per gradient"]),
    "sparse_adam": ("TypeError", ["SparseAdam", "densely", "torch.optim.Adam"]),
    "group_class": ("TypeError", ["param_groups[1]['optimizer_class']", "'Muon'", "the class"]),
    "muon_vector": ("ValueError", ["Muon refuses", "2D", "torch.Size([7])"]),
    "opacus_per_sample": ("TypeError", ["opacus' GradSampleModule", "would not be private",
                                         "opacus' own data parallelism"]),
    "tied_through_memory": ("ValueError", ["parameter 'body.0.weight'", "parameter 'decoder.weight'",
                                           "share memory", "one nn.Parameter object"]),
    "tied_through_memory_on_meta": ("ValueError", ["parameter 'body.0.weight'",
                                                   "parameter 'decoder.weight'", "share memory"]),
    "buffer_views_parameter": ("ValueError", ["'body.0.weight'", "buffer 'body.0.weight_t'",
                                              "share memory", ".clone()"]),
    "overlapping_storages": ("ValueError", ["parameter 'first'", "parameter 'second'",
                                            "share memory"]),
    "buffer_views_frozen_parameter": ("ValueError", ["'body.0.weight'", "buffer 'body.0.weight_t'",
                                                     "share memory"]),
    "expanded_parameter": ("ValueError", ["parameter 'extra'", "expanded", ".clone()"]),
    "devices": ("ValueError", ["cpu", "meta", "model.to(device)", "torch.device('meta')"]),
    "meta_without_device": ("ValueError", ["meta device", "device=None", "device='cuda'"]),
    "meta_without_init": ("ValueError", ["'1'", "ParameterList", "reset_parameters()", "init_fn="]),
    "meta_buffer": ("ValueError", ["norm", "meta device", "build the whole model"]),
    "device_meta": ("ValueError", ["device='meta'", "'cpu'"]),
    "init_fn": ("TypeError", ["init_fn", "'normal'"]),
    "init_fn_not_meta": ("ValueError", ["init_fn", "no tensor", "meta device"]),
    "units": ("ValueError", ["units=", "stage=3"]),
    "bucket_size": ("ValueError", ["bucket_size_mb", "got 0"]),
    "units_container": ("ValueError", ["ModuleList", "no forward", "modules inside"]),
    "units_type": ("TypeError", ["'Linear'", "nn.Module class", "predicate"]),
    "broadcast_buffers": ("TypeError", ["broadcast_buffers", "'yes'", "True or False"]),
    "mesh_and_group": ("ValueError", ["mesh=", "process_group=", "not both"]),
    "mesh_type": ("TypeError", ["DeviceMesh", "tuple", "init_device_mesh"]),
    "mesh_out_of_order": ("ValueError", ["[1, 0]", "increasing order", "shard dimension"]),
}


@pytest.mark.parametrize("which", sorted(BAD_INPUTS))
def test_bad_input_raises_on_every_rank_before_any_collective(pool, which):
    expected_type, words = BAD_INPUTS[which]
    outcomes = pool.run(cases_api.construct_with_bad_input, 2, which)
    for rank, (error_type, message, issued) in enumerate(outcomes):
        assert error_type == expected_type, (rank, error_type, message)
        for word in words:
            assert word in message, (rank, word, message)
        assert issued == [], (rank, issued)


@pytest.mark.parametrize("ghost", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_per_sample_gradients_are_refused_at_the_step_on_every_rank(pool, stage, ghost):
    """opacus' DPOptimizer around a ZeroOptimizer clipped and noised nothing (helper-107,
    helper-109: ghost clipping, and a bucket led by a parameter with none)."""
    for message in pool.run(cases_api.per_sample_gradients_at_the_step, 2, stage, ghost):
        assert "(per-sample gradients: opacus" in (message or ""), message
        assert "would not be private" in message, message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_disjoint_views_of_one_storage_are_taken_and_train_like_ddp(pool, stage):
    for differences in pool.run(cases_api.disjoint_views_of_one_storage, 2, stage):
        assert max(differences) < 1e-6, differences


@pytest.mark.parametrize("which,words", [
    ("hidden_size", ["parameter '0.weight'", "shape (8, 5)", "shape (7, 5)"]),
    ("dtype", ["parameter '0.weight'", "torch.float64", "torch.float32"]),
    ("mixed_precision", ["mixed_precision differs", "bfloat16", "None on rank 0"]),
    ("stage", ["stage differs", "2 on this rank, 1 on rank 0"]),
    ("reshard", ["reshard_after_forward differs", "False on this rank"]),
    ("broadcast_buffers", ["broadcast_buffers differs", "False on this rank"])])
def test_models_or_arguments_that_differ_across_ranks_are_refused_naming_the_difference(
        pool, which, words):
    """A per-rank hidden size whose buckets came out the same size trained the ranks'
    models apart, silently; the other differences crashed training with a bare gloo
    abort, or hung (a helper's probes). Rank 1 names the difference, rank 0 points there."""
    rank0, rank1 = pool.run(cases_api.models_or_arguments_that_differ_across_ranks, 2, which)
    assert rank0 is not None and "another rank built a different model" in rank0, rank0
    for word in words + ["same ZeroOptimizer arguments on every rank"]:
        assert rank1 is not None and word in rank1, (word, rank1)


@pytest.mark.parametrize("which, differs", [
    ("names", {3: "'ranks [[0, 1], [2, 3]] sharded along dimension 0' on this rank"}),
    ("shape", {2: "'ranks [[0, 1, 2, 3]] sharded along dimension 1' on this rank",
               3: "'ranks [[0, 1, 2, 3]] sharded along dimension 1' on this rank"}),
    ("none", {2: "None on this rank", 3: "None on this rank"})])
def test_meshes_that_differ_across_ranks_are_refused_naming_the_difference(pool, which, differs):
    for rank, error in enumerate(pool.run(cases_api.meshes_that_differ_across_ranks, 4, which)):
        assert error is not None, rank
        if rank in differs:
            assert "mesh differs across ranks" in error and differs[rank] in error, error
            assert "'ranks [[0, 1], [2, 3]] sharded along dimension 1' on rank 0" in error, error
        else:
            assert "another rank built a different model" in error, error


def test_adding_a_param_group_after_construction_names_close_and_a_new_optimizer(pool):
    for error_type, message in pool.run(cases_api.add_param_group_after_construction, 2):
        assert error_type == "NotImplementedError", (error_type, message)
        assert "param_groups=" in message and "opt.close()" in message, message


@pytest.mark.parametrize("skips", [True, False])
def test_a_step_skipped_on_one_rank_is_refused_at_the_next_step_at_stage_3(pool, skips):
    """Note [steps on some ranks only]: stage 3's step issues no collective, so a step
    one rank skipped trained on with each rank's shards stepped a different number of
    times, with no error (a helper's probe). The next backward's all-reduce carries the
    ranks' step counts, and the step after it is refused on every rank."""
    for rank, raised in enumerate(pool.run(cases_api.a_step_skipped_on_one_rank, 2, skips)):
        assert raised[:2] == [None, None], (rank, raised)
        if skips:
            assert raised[2] is not None and "not all taken the same optimizer steps" in raised[2], \
                (rank, raised)
        else:
            assert raised[2] is None, (rank, raised)


def test_join_for_uneven_batches_is_refused_naming_the_fix(pool):
    for error_type, message in pool.run(cases_api.join_for_uneven_batches, 2):
        assert error_type == "NotImplementedError", (error_type, message)
        assert "Join" in message and "DistributedSampler(drop_last=True)" in message, message


def test_units_that_select_no_module_warn_naming_the_blocks(pool):
    """A unit class the model does not hold made the root the only unit: stage 3 gathered
    the whole model for every forward and backward, silently (a helper's probe: Llama's
    decoder layer given for a Qwen2)."""
    for warned in pool.run(cases_api.units_selecting_no_module, 2):
        assert len(warned) == 1, warned
        assert "TransformerDecoderLayer" in warned[0] and "(here: Block)" in warned[0], warned


@pytest.mark.parametrize("skip_in_first_step", [False, True])
def test_units_placed_in_the_schedule_by_guess_warn_naming_them(pool, skip_in_first_step):
    """Blocks called last to first, block 0 run by no rank in the first step: with one
    block entered there is no direction to read, so the schedule guesses the module
    tree's, and a model that runs them otherwise is walked out of order; ranks that then
    skip different blocks hang (a helper's probe: gloo aborted, with no word before).
    Every rank warns, naming the block; with every block run in the first step, none."""
    for warned in pool.run(cases_api.blocks_placed_by_guess, 2, skip_in_first_step):
        if not skip_in_first_step:
            assert warned == [], warned
            continue
        assert len(warned) == 1 and "blocks.0" in warned[0], warned


def test_attention_evaluated_before_training_at_stage_3_is_the_model_unsharded(pool):
    """Found by a probe: automatic units made MultiheadAttention's out_proj a unit of its
    own, which the attention reads without calling, so evaluation gave NaN, silently."""
    for difference in pool.run(cases_api.evaluation_of_attention_before_training, 2):
        assert difference < 1e-6, difference


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_clipping_norm_of_a_long_shard_does_not_drift_with_its_length(pool, stage):
    """Found while writing a device check: the norm of a whole bucket's shard drifted on
    CPU (4e-5 relative here, 3.9e-3 at fifty million elements), and clipping with it."""
    for ours, torchs in pool.run(cases_api.clip_norm_of_a_long_shard, 2, stage):
        assert ours < 1e-6, (ours, torchs)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_state_dict_resumes_bit_for_bit(pool, stage, optimizer):
    for uninterrupted, resumed in pool.run(cases_api.resume_from_state_dict, 3, stage, optimizer):
        for a, b in zip(uninterrupted, resumed):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_state_dict_resumes_bf16_bit_for_bit(pool, stage):
    for uninterrupted, resumed in pool.run(cases_api.resume_from_state_dict, 2, stage, "AdamW",
                                           True):
        for a, b in zip(uninterrupted, resumed):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_bf16_optimizer_state_alone_resumes_the_weights_on_every_rank(pool, stage):
    """With mixed precision opt.state_dict() holds the fp32 masters. Loaded alone, at
    stages 1-2 only this rank's slice of the parameters took them, and until the next
    step the ranks ran different weights (a helper's probe: outputs 0.24 apart); the
    parameters now follow the masters on every rank, as after a step."""
    for uninterrupted, resumed in pool.run(cases_api.resume_from_state_dict, 2, stage, "AdamW",
                                           True, False):
        for a, b in zip(uninterrupted, resumed):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_state_dict_refused_on_one_rank_is_refused_on_every_rank(pool, stage):
    """Rank 0's state dict loaded everywhere was refused on rank 1 only, and rank 0 went
    on alone (into the gather that now follows a load, or the next step's collectives).
    Inside summon_full_params() a bf16 state dict is refused on every rank: the end of
    the block wrote the old parameters over the loaded masters at stage 3."""
    (raised0, inside0), (raised1, inside1) = pool.run(cases_api.a_state_dict_refused_on_one_rank,
                                                      2, stage)
    assert raised1 is not None and "rank 0 of 2" in raised1 and "rank 1 of 2" in raised1, raised1
    assert raised0 is not None and "another rank failed" in raised0, raised0
    for inside in (inside0, inside1):
        assert inside is not None and "after the block" in inside, inside


@pytest.mark.parametrize("how", ["entries", "assigned"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_state_is_reset_through_its_shards_and_refused_for_a_parameter(pool, stage, how):
    """opt.state holds the inner optimizers' state, keyed by the shards in param_groups:
    resetting a group's entries there, or every entry by assigning an empty mapping (Note
    [the state assigned anew]: it was ignored, helper-125), equals DDP + AdamW resetting
    alike, bit for bit. ``opt.state[p] = {}`` for a model parameter did nothing,
    silently (a helper's probe: 3.8e-2 from DDP), and ``opt.state.get(p)`` answered
    None; both are refused, and so is assigning a mapping with entries. Before the first
    step ``opt.state[t]`` answers ``{}`` as torch's does (it raised KeyError)."""
    for difference, refusals, early_reads in pool.run(cases_api.resetting_state_through_opt_state,
                                                      2, stage, how):
        assert difference == 0, difference
        assert early_reads and all(read is None for read in early_reads), early_reads
        for refusal in refusals:
            assert refusal is not None and "opt.state.clear()" in refusal, refusal


@pytest.mark.parametrize("how", ["save_full_model", "save_checkpoint"])
@pytest.mark.parametrize("stage", [1, 3])
def test_saving_a_model_whose_managed_module_was_replaced_is_refused(pool, stage, how):
    """A helper merged LoRA into the base (merge_and_unload) and saved: a bare KeyError
    of a parameter id. Now every rank refuses before any collective, naming it."""
    for refusal, together in pool.run(cases_api.save_after_a_module_was_removed, 2, stage, how):
        assert refusal is not None and "2.weight" in refusal and "opt.close()" in refusal, refusal
        assert together


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_optimizer_hooks_fire_as_under_ddp(pool, stage):
    """torch's global step hooks fired twice per step (for the ZeroOptimizer and again for
    its inner optimizer: a hook halving gradients halved them twice), and the state-dict
    hooks never fired (a load pre-hook setting a new lr was ignored): a helper's probes,
    7.8e-3 and 1.0e-1 from DDP."""
    outcomes = pool.run(cases_torch_api.optimizer_hooks_as_under_ddp, 2, stage)
    for outcome in outcomes:
        ours, ddps = outcome["zeroshard"], outcome["ddp"]
        assert [what for what, _ in ours["fired"]] == [what for what, _ in ddps["fired"]], outcome
        assert {name for _, name in ours["fired"]} == {"ZeroOptimizer"}, ours["fired"]
        assert ours["epoch"] == ddps["epoch"] == 7, outcome
        assert ours["lr"] == ddps["lr"] == [0.05], outcome
        assert outcome["difference"] < 1e-6, outcome
    refusals = [outcome["refused"] for outcome in outcomes]  # a load pre-hook raising on rank 1
    assert refusals[1] is not None and "this rank's hook refused" in refusals[1], refusals
    assert refusals[0] is not None and "another rank failed" in refusals[0], refusals


@pytest.mark.parametrize("class_name", ["_ClampingSGD", "_ShrinkingAdamW"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_step_hooks_an_optimizer_class_registers_on_itself_run_once_a_step(
        pool, stage, class_name):
    for outcome in pool.run(cases_torch_api.an_optimizer_class_own_hooks_like_ddp, 2, stage,
                            class_name):
        assert max(outcome["differences"]) < 1e-6, outcome
        assert outcome["calls"] == 3, outcome


@pytest.mark.parametrize("stage", [1, 3])
def test_the_global_step_hooks_stay_registered_while_the_inner_optimizers_step(pool, stage):
    for registered, fired in pool.run(cases_torch_api.global_hooks_while_stepping, 2, stage):
        assert registered and all(count >= 1 for count in registered), registered
        assert fired == ["ZeroOptimizer"], fired


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_another_optimizer_over_managed_parameters_is_refused_at_its_step(pool, stage):
    """A plain SGD over the head next to the ZeroOptimizer stepped each rank with its own
    local gradient at stage 1, silently (a probe); at stages 2-3 it was refused as a change
    of p.grad, which it was not."""
    for outcome in pool.run(cases_torch_api.another_optimizer_over_managed_parameters, 2, stage):
        refusal = outcome["refusal"]
        assert refusal is not None and "SGD.step()" in refusal and "2.weight" in refusal, outcome
        assert "'optimizer_class'" in refusal and "opt.close()" in refusal, refusal
        assert outcome["unchanged"] and outcome["stepped_after_close"], outcome
        if stage > 1:
            assert "0.weight.grad was read into another tensor" in outcome["read_refusal"], outcome


@pytest.mark.parametrize("optimizer", ["SGD", "Adagrad"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_sparse_embedding_trains_like_ddp(pool, stage, optimizer):
    for differences in pool.run(cases_torch_api.sparse_embedding_like_ddp, 2, stage, optimizer):
        assert max(differences) < 1e-6, differences


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_forward_inside_a_gradient_transform_is_refused_on_every_rank(pool, stage):
    for refusals, vmapped, differences in pool.run(cases_torch_api.gradient_transform_refused,
                                                   2, stage):
        assert len(refusals) == (2 if stage == 3 else 1), refusals
        for refusal in refusals:
            assert refusal is not None and "torch.func gradient transform" in refusal, refusal
            assert "loss.backward()" in refusal, refusal
        assert vmapped == 0, vmapped
        assert max(differences) < 1e-6, differences


@pytest.mark.parametrize("stage", [1, 3])
def test_saving_a_dtype_safetensors_lacks_is_refused_on_every_rank(pool, stage):
    for refusal in pool.run(cases_torch_api.saving_a_dtype_safetensors_lacks, 2, stage):
        assert refusal is not None and "'spectrum'" in refusal, refusal
        assert "torch.complex128" in refusal and "save_checkpoint" in refusal, refusal


def test_state_dict_from_another_world_size_is_refused(pool):
    for message in pool.run(cases_api.load_state_dict_from_other_world_size, 2):
        assert "rank 0 of 3" in message or "rank 1 of 3" in message, message
        assert "Load with as many shards (the world size" in message, message


@pytest.mark.parametrize("saving, loading", [(2, 3), (3, 1), (1, 2), (2, 2)])
def test_state_dict_from_another_stage_is_refused_where_its_buckets_differ(pool, saving, loading):
    """Found by a probe: a stage-2 state loaded into stage 3 put AdamW's state on other
    parameters (0.23 off the uninterrupted run). Stages 1 and 2 share their buckets."""
    for message in pool.run(cases_api.load_state_dict_from_another_stage, 2, saving, loading):
        if {saving, loading} <= {1, 2}:
            assert message == "no error", message
        else:
            assert f"stage-{saving} optimizer" in message and "zeroshard checkpoints" in message, message


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_summon_full_params_shows_ddp_state_and_keeps_writes(pool, stage):
    n = 3
    for diffs, write_diffs, param_bytes, shard_bytes in pool.run(
            cases_api.summon_full_params_and_state_dict, n, stage):
        assert max(diffs.values()) < 1e-5, diffs  # model.state_dict() inside equals DDP's
        assert max(write_diffs.values()) == 0, write_diffs  # writes inside persist
        if stage == 3:  # released again on exit: shards only
            assert param_bytes == shard_bytes, (param_bytes, shard_bytes)


@pytest.mark.parametrize("policy", [False, True])
def test_a_read_inside_a_stage3_block_sees_the_writes_made_there(pool, policy):
    differences = pool.run(cases_api.reads_inside_a_stage3_block_see_its_writes, 2, policy)[0]
    assert differences == {"0.weight": 0.0, "2.weight": 0.0}, differences


def test_new_data_given_inside_summon_full_params_is_kept_and_a_new_shape_refused(pool):
    """Found by a probe: at stage 3 p.data = t inside summon_full_params() was lost,
    silently, and a new shape (resize_token_embeddings) failed later naming nothing;
    model.double() there came out fp32 again, silently (a helper's probe)."""
    for diff, refusal, dtype_refusal in pool.run(cases_api.new_data_inside_summon, 2):
        assert diff < 1e-6, diff
        assert "'body.2.weight' shape (2, 2)" in refusal and "opt.close()" in refusal, refusal
        assert "dtype torch.float64 on cpu; it is held as torch.float32" in dtype_refusal, dtype_refusal
        assert "p.copy_(t)" in dtype_refusal and "opt.close()" in dtype_refusal, dtype_refusal


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nested_summon_full_params_blocks_keep_the_parameters_and_writes(pool, stage):
    for before, inner, after_inner, after in pool.run(cases_api.nested_summon, 2, stage):
        assert torch.isfinite(before).all()
        assert torch.equal(inner, before)
        written = after_inner - before  # the inner block's write of +1 to the first tensor
        assert written.abs().max() == 1.0 and (written == 0).float().mean() > 0.5, written
        assert torch.equal(after, after_inner)


def test_stage3_state_dict_outside_summon_is_refused_with_the_fix(pool):
    for refused_save, refused_load, keys in pool.run(cases_api.state_dict_outside_summon, 2):
        for message in (refused_save, refused_load):
            assert "opt.summon_full_params()" in message
        assert "body.0.weight" in keys


@pytest.mark.parametrize("bf16", [False, True])
def test_a_stage3_state_dict_taken_inside_summon_stays_readable_after_the_block(pool, bf16):
    """Note [views taken inside summon_full_params]: torch.save of a state dict taken in
    the block, after it, wrote a file torch.load refused, and its tensors read freed
    memory (helper-127). Now they keep the block's values and that memory, with one
    warning saying so; a block that keeps nothing warns of nothing."""
    for outcome in pool.run(cases_api.state_dict_kept_past_summon, 2, bf16):
        assert outcome["saved"] == 0.0 and outcome["read"] == 0.0, outcome
        assert len(outcome["kept_warnings"]) == 1 and "del" in outcome["kept_warnings"][0], outcome
        assert outcome["quiet_warnings"] == [], outcome
        assert outcome["difference"] < (1e-2 if bf16 else 1e-6), outcome


@pytest.mark.parametrize("where", ["summon", "forward"])
def test_a_stage3_weight_read_as_numpy_while_gathered_trains_on(pool, where):
    """Note [a buffer numpy has seen] in zeroshard/_bucket.py: ``.numpy()`` of a gathered
    weight (inside summon_full_params(), or a forward hook's log line) made releasing
    its unit raise (helper-131). Now training goes on like DDP's, and an array kept
    past the block keeps the block's values."""
    for outcome in pool.run(cases_api.numpy_reads_of_stage3_weights, 2, where):
        assert outcome["difference"] < 1e-6, outcome
        if where == "summon":
            assert outcome["kept"] == 0.0, outcome
        else:
            assert outcome["logged"] == 3, outcome  # one forward a step


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_strided_frozen_weights_and_buffers_are_broadcast_contiguous(pool, stage):
    for contiguous, diff in pool.run(cases_api.construct_with_strided_tensors, 2, stage):
        assert contiguous
        assert diff == 0


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("keep", ["tensor", "view"])
def test_a_gradient_a_hook_kept_is_not_reduced_in_place(pool, stage, keep):
    """Note [a gradient as its bucket's buffer]: the reduction consumes a gradient only
    nothing else refers to."""
    for rank, differences in enumerate(pool.run(cases_api.kept_gradients, 2, stage, keep)):
        assert differences == [0.0, 0.0], (rank, differences)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_hook_registered_after_the_optimizer_runs_before_the_reduction(pool, stage):
    """Note [after the user's gradient hooks] (zeroshard/_reducer.py): it failed before at
    every stage (the hook's scaling reached some gradients and not others, or none; at
    stages 2 and 3 an unguarded p.grad.norm() raised on None)."""
    for rank, differences in enumerate(pool.run(cases_api.hook_registered_after_the_optimizer,
                                                 2, stage)):
        assert all(d < 1e-6 for d in differences), (rank, differences)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_gradient_viewing_what_backward_still_passes_on_is_not_reduced_in_place(pool, stage):
    """Note [a gradient as its bucket's buffer]: taking such a gradient as the reduce
    buffer changed the gradient of the Linear before it (4.6e-4 from DDP at stage 2)."""
    for rank, differences in enumerate(pool.run(cases_api.gradient_viewing_what_backward_passes_on,
                                                 2, stage)):
        assert all(d < 1e-6 for d in differences), (rank, differences)


def test_the_check_of_the_engines_counts_passes_here_and_catches_a_wrong_count(monkeypatch):
    """Note [a gradient as its bucket's buffer] discounts what autograd hands the
    accumulator's hook only where ``engine_counts_as_expected`` says this torch counts
    as it reads: here it must (else every lone gradient is copied, and
    test_a_lone_parameters_gradient_is_reduced_without_a_copy fails), and it must catch
    a count that takes any view's base for the view's alone (the reduction then
    overwrote a gradient backward still owed another node)."""
    from zeroshard import stage2
    stage2.engine_counts_as_expected.cache_clear()
    assert stage2.engine_counts_as_expected()
    monkeypatch.setattr(stage2, "_base_holders", lambda view: (0, 0))
    stage2.engine_counts_as_expected.cache_clear()
    try:
        assert not stage2.engine_counts_as_expected()
    finally:
        stage2.engine_counts_as_expected.cache_clear()
