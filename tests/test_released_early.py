"""Note [released once backward has read it] (zeroshard/stage3.py): a stage-3 unit whose
parameters backward has finished reading is released then, not when its last gradient
arrives; where something could still read them behind the saved-tensor hooks' back
(a recomputation, a view saved by another unit's forward), it is kept, and the numbers
stay those of plain data parallel."""

import pytest

import cases_release


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_a_tied_embedding_is_released_once_the_head_has_read_it(pool, reshard_after_forward):
    """Before, the root unit (the token embedding, read by the tied head at the start
    of backward) stayed gathered until its own gradient came at the end of backward:
    ``gathered`` was True at every step (and on the 100M GPT, 48 MiB of the peak)."""
    for rank, (differences, gathered, gather_bytes) in enumerate(
            pool.run(cases_release.train_tied_lm, 2, "plain", reshard_after_forward)):
        where = (rank, differences, gathered, gather_bytes)
        assert max(differences) < 1e-6, where
        assert gathered[0], where  # the first backward only watches
        assert not any(gathered[1:]), where
        assert len(set(gather_bytes)) == 1, where  # released with no gather added


@pytest.mark.parametrize("variant", ["checkpointed", "checkpointed_reentrant", "shared_with_block"])
def test_a_unit_read_behind_the_saved_tensor_hooks_is_kept_to_its_last_gradient(pool, variant):
    """The embedding recomputed in backward (checkpointed) reads its weight after the
    head's read, and block 0 reads a weight the root owns; released after the head,
    they would compute with NaN placeholders."""
    for rank, (differences, gathered, gather_bytes) in enumerate(
            pool.run(cases_release.train_tied_lm, 2, variant, True)):
        where = (rank, differences, gathered, gather_bytes)
        assert max(differences) < 1e-6, where
        assert all(gathered), where
        assert len(set(gather_bytes)) == 1, where
