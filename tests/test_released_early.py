"""Note [released once backward has read it] (zeroshard/stage3.py): a stage-3 unit whose
parameters backward has finished reading is released then, not when its last gradient
arrives; where something could still read them behind the saved-tensor hooks' back
(a recomputation, a view saved by another unit's forward), it is kept, and the numbers
stay those of plain data parallel."""

import pytest

import cases_release


def _runs(pool, variant: str, reshard_after_forward: bool = True):
    for rank, (differences, embedding, block, gather_bytes) in enumerate(
            pool.run(cases_release.train_tied_lm, 2, variant, reshard_after_forward)):
        where = (rank, differences, embedding, block, gather_bytes)
        assert max(differences) < 1e-6, where
        assert len(set(gather_bytes)) == 1, where  # nothing gathered again for it
        yield embedding, block, where


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_a_tied_embedding_is_released_once_the_head_has_read_it(pool, reshard_after_forward):
    """Before, the root unit (the token embedding, read by the tied head at the start
    of backward) stayed gathered until its own gradient came at the end of backward:
    ``embedding`` was True at every step (and on the 100M GPT, 48 MiB of the peak)."""
    for embedding, _, where in _runs(pool, "plain", reshard_after_forward):
        assert embedding[0], where  # the first backward only watches
        assert not any(embedding[1:]), where


def test_a_unit_with_frozen_parameters_is_released_once_backward_has_read_them(pool):
    """A LoRA-like unit (frozen weight, trainable adapter) was kept gathered to the end of
    backward, since backward may read a frozen weight after the unit's last gradient:
    so by then every unit was whole (``block`` True at every step; on 12 blocks of
    2048 x 2048, 192 MiB above backward's start instead of 31)."""
    for _, block, where in _runs(pool, "frozen_base"):
        assert not any(block[1:]), where


@pytest.mark.parametrize("variant", ["checkpointed", "checkpointed_reentrant", "shared_with_block"])
def test_a_unit_read_behind_the_saved_tensor_hooks_is_kept_to_its_last_gradient(pool, variant):
    """The layer recomputed in backward (checkpointed) reads its weight after the head's
    read, and block 0 reads a weight the root owns; released after the head, they
    would compute with NaN placeholders."""
    for embedding, _, where in _runs(pool, variant):
        assert all(embedding), where
