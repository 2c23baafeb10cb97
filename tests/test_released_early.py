"""Note [released once backward has read it] (zeroshard/stage3.py): a stage-3 unit whose
parameters backward has finished reading is released then, not when its last gradient
arrives, if all it still awaits is an embedding's gradient; where something could
still read them behind the saved-tensor hooks' back (a recomputation, a view saved by
another unit's forward, a weight kept on a custom Function's ctx, a parameter hook), it
is kept, and the numbers stay those of plain data parallel. Differences are checked
step by step (``all``): Python's ``max`` drops a NaN that does not come first."""

import pytest

import cases_release


def _runs(pool, variant: str, reshard_after_forward: bool = True):
    for rank, (differences, embedding, block, last_block, gather_bytes, warned) in enumerate(
            pool.run(cases_release.train_tied_lm, 2, variant, reshard_after_forward)):
        where = (rank, differences, embedding, block, last_block, gather_bytes, warned)
        assert not warned, where
        assert all(d < 1e-6 for d in differences), where
        assert len(set(gather_bytes)) == 1, where  # nothing gathered again for it
        yield embedding, block, last_block, where


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_a_tied_embedding_is_released_once_the_head_has_read_it(pool, reshard_after_forward):
    """Before, the root unit (the token embedding, read by the tied head at the start
    of backward) stayed gathered until its own gradient came at the end of backward:
    ``embedding`` was True at every step (and on the 100M GPT, 48 MiB of the peak)."""
    for embedding, _, _, where in _runs(pool, "plain", reshard_after_forward):
        assert embedding[0], where  # the first backward only watches
        assert not any(embedding[1:]), where


@pytest.mark.parametrize("variant", ["checkpointed", "checkpointed_reentrant", "shared_with_block",
                                     "parameter_hook"])
def test_a_unit_read_behind_the_saved_tensor_hooks_is_kept_to_its_last_gradient(pool, variant):
    """The layer recomputed in backward (checkpointed) reads its weight after the head's
    read, block 0 reads a weight the root owns, and a hook reads the embedding when its
    gradient comes; released after the head, they computed with NaN placeholders (the
    hook's case: a reviewer's probe, NaN loss at the third step)."""
    for embedding, _, _, where in _runs(pool, variant):
        assert all(embedding), where


@pytest.mark.parametrize("variant", ["module_hook_on_block", "module_hook_on_layer"])
def test_module_backward_hooks_read_gathered_parameters(pool, variant):
    """Note [module backward hooks] (zeroshard/stage3.py): a module's full backward hook
    runs after its parameters' gradients; released by then, the unit gave the hook NaN
    (a helper's probes: a block's pre-hook reading the tied embedding, and a layer's hook
    reading its own weight, trained NaN from the second step). A hooked unit is released
    once backward is past its inputs, and no unit is released early: the last block by
    the time backward reaches block 0's output (it was kept to the end of backward, so
    a hook on every block gathered the whole model there), the root (given token ids)
    at the end."""
    for embedding, _, last_block, where in _runs(pool, variant):
        assert all(embedding), where
        if variant == "module_hook_on_layer":
            assert not any(last_block), where


@pytest.mark.parametrize("reshard_after_forward", [True, False])
@pytest.mark.parametrize("variant", ["pre_hook_on_own_block", "post_hook_keyword_input",
                                     "pre_hook_on_root", "hooks_during_forward"])
def test_a_units_own_module_hooks_read_it_gathered(pool, variant, reshard_after_forward):
    """Note [gathered before a unit's own module hooks] (zeroshard/_module_hooks.py):
    torch calls a module's backward pre-hooks (and, for a unit called with its input as
    a keyword, its post-hooks) from a node wrapping its output, which ran before
    zeroshard's gather: a block's pre-hook scaling its gradient by the block's weight, a
    model's by its embedding, trained NaN from the first step, and a keyword-called
    block's hook logged NaN (a helper's probes). And a hook removed after the forward,
    before its backward, which torch still calls, read its block released (the block
    asked for hooks at backward's start: none)."""
    for _ in _runs(pool, variant, reshard_after_forward):
        pass


def test_a_root_hook_registered_after_the_optimizer_warns_once_then_reads_it_gathered(pool):
    """torch takes a module's backward hooks as its call begins, before zeroshard's
    forward pre-hook can put its gather first: for the root's own module, registered
    after the optimizer, that is the first forward's call. Its backward reads
    placeholders, with a warning; from the second step on, the embedding's norm the hook
    logs is the reference's."""
    for rank, (differences, _, _, _, _, warned) in enumerate(pool.run(
            cases_release.train_tied_lm, 2, "root_hook_after_optimizer", True)):
        assert len(warned) == 1 and "unit <root>" in warned[0], (rank, warned)
        assert all(d < 1e-6 for d in differences[1:]), (rank, differences)


def test_a_unit_whose_gather_is_in_flight_shows_placeholders(pool):
    """Note [not a view while gathering] (zeroshard/_bucket.py): the parameters of a
    unit being prefetched were views of the buffer its gather was filling, and a hook
    reading them read values that were neither NaN nor the weights (a helper's probes);
    they are placeholders until the gather is done (before: views from the second step)."""
    for rank, reads in enumerate(pool.run(cases_release.reads_of_a_unit_being_gathered, 2)):
        assert len(reads) == 2 * 3 and all(reads), (rank, reads)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("where", ["blocks", "layer"])
def test_checkpointing_begun_after_the_first_step_on_one_rank_equals_data_parallel(
        pool, where, reentrant):
    """A rank that begins checkpointing after the first step (long batches only) kept
    releasing the tied embedding once the head had read it, then met its first
    recomputation, which gathers again what was released early: a collective the
    other rank never issued (gloo aborted on the mismatch; NCCL would hang). A forward
    that runs a unit or a layer as checkpointing does now keeps that backward from
    releasing early, on that rank alone; the other still releases it. (With the layer
    the root holds, the root awaits that layer's gradient, which comes after block 0's:
    no step releases the embedding by then.)"""
    (differences_0, embedding_0), (differences_1, embedding_1) = pool.run(
        cases_release.checkpointing_begun_later_on_one_rank, 2, where, reentrant)
    assert all(d < 1e-6 for d in differences_0 + differences_1), (differences_0, differences_1)
    if where == "blocks":
        assert embedding_0 == [True, False, False, False], embedding_0  # the first only watches
        assert embedding_1 == [True, False, True, True], embedding_1


def test_a_unit_whose_backward_may_read_an_unsaved_weight_equals_data_parallel(pool):
    """A weight kept on a custom Function's ctx is read unseen, by the node that gives
    its gradient: such a unit waits for its last gradient. Released once its other
    views were read, it trained NaN from the third step (a reviewer's probe)."""
    for _ in _runs(pool, "ctx_weight"):
        pass


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_a_lora_block_is_released_once_backward_has_read_its_frozen_weight(pool, reshard_after_forward):
    """Note [frozen parameters kept on a ctx]: before, a unit with a frozen parameter
    was kept gathered to the end of backward (``block`` True at every step; a LoRA-like
    model's whole frozen base at once)."""
    for _, block, _, where in _runs(pool, "frozen_base", reshard_after_forward):
        assert block[0], where  # the first backward only watches
        assert not any(block[1:]), where


def test_a_frozen_weight_kept_on_a_ctx_keeps_its_unit_to_the_end_of_backward(pool):
    """The frozen weight is read by a node that gives it no gradient, after the block's
    last saved view and last gradient: released then, the block trained NaN."""
    for _, block, _, where in _runs(pool, "frozen_ctx_weight"):
        assert all(block), where


def test_a_checkpointed_lora_block_is_released_once_backward_is_past_its_input(pool):
    """Note [backward past a unit's inputs]: under checkpointing a unit's reads are not
    seen, and a unit with a frozen parameter was kept to the end of backward (block 2
    gathered when backward reached block 0's output, at every step); now it is released
    once its input's gradient is whole, from the first step (block 1 goes a moment
    later: the hook that looks is on its input, before zeroshard's)."""
    for _, _, last_block, where in _runs(pool, "frozen_checkpointed"):
        assert not any(last_block), where


def test_a_reentrant_checkpointed_lora_block_equals_data_parallel(pool):
    """Reentrant checkpointing runs the block's forward under no_grad, so no input is
    watched and the block is kept to the end of backward."""
    for _, block, last_block, where in _runs(pool, "frozen_checkpointed_reentrant"):
        assert all(block) and all(last_block), where


def test_a_lora_block_given_a_leaf_is_kept_until_backward_ends(pool):
    """A reviewer's probe: a checkpointed block given a leaf that requires grad, which also
    reads the root's embedding through a frozen layer, was released at the leaf's
    gradient, before that read, and backward crashed on the released buffer."""
    for rank, differences in enumerate(pool.run(cases_release.leaf_input_under_checkpointing, 2)):
        assert all(d < 1e-6 for d in differences), (rank, differences)
