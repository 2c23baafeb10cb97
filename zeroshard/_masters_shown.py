"""``summon_full_params(full_precision=True)``: the fp32 masters in the parameters' place.

Note [full precision inside summon_full_params]:
    With a MixedPrecision policy the parameters hold their ``param_dtype`` casts, and so
    they do inside ``summon_full_params()``: an EMA teacher copied or updated there
    (DINO's, ``AveragedModel``'s, FSDP1's recipe, whose block shows full precision) was a
    bf16 model whose 0.004 steps fell below bf16's resolution, so 4831 of 5042 elements
    never moved in 6 steps (a helper's probe), silently. With ``full_precision=True``
    each trainable parameter holds, inside the block, its fp32 value all-gathered from
    the masters (one all-gather per bucket, on every rank, at every stage). On exit, the
    masters take this rank's part of what the parameters then hold, exactly, and the
    parameters their cast again, the shards too, so the writes made inside reach the
    next step in full precision (write the same on every rank, as ever). Frozen
    parameters have no master and keep their low-precision value; a module kept in
    full precision (BatchNorm) is fp32 anyway. A forward inside still has its inputs
    cast to ``param_dtype`` by the policy: evaluate in another block, or under
    ``torch.autocast``. If the block raises, the parameters get their casts back and
    the masters are left as they were. A master written inside the block (through
    ``opt.param_groups``) keeps that write: its bucket's parameters are not loaded over
    it, where the block's end undid it, silently (helper-112); written on both sides, the
    master's write wins (not seen). Whatever reads the masters inside the block (a
    save, ``full_state_dict()``) takes the writes made so far first (``flush``, called by
    ``ShardingView.take_outside_writes``); loads and ``step()`` inside are refused, as
    the block's end would write the parameters' values back over theirs.
"""

from __future__ import annotations

import contextlib

import torch


class MastersShown:
    """Inside (a context manager), every parameter with a separate fp32 master holds its
    full fp32 value (``view``: the optimizer's ShardingView; ``masters``: its
    Fp32Masters)."""

    def __init__(self, view, masters) -> None:
        self._view, self._masters = view, masters
        self._buckets = []
        self._shown = []  # (bucket, index, parameter, the cast it held)
        # id(bucket) -> the master's version counter when the parameters last showed it
        self._versions: dict[int, int] = {}
        self._followed_before: dict[int, bool] = {}

    @torch.no_grad()
    def __enter__(self) -> MastersShown:
        self._buckets = [b for b in self._view.take_outside_writes()
                         if b.has_separate_master]
        for bucket in self._buckets:
            full = self._view.gather_shard(bucket.master)
            for index, param in enumerate(bucket.params):
                self._shown.append((bucket, index, param, param.data))
                param.data = bucket.param_view(full, index)
            # Note [masters written between steps]: the parameters show every master now,
            # written or not, so a forward inside runs the model DDP would
            written = self._masters.written_since_parameters_followed(bucket)
            self._followed_before[id(bucket)] = not written
            self._masters.note_parameters_follow(bucket)
            self._versions[id(bucket)] = bucket.master._version
        return self

    def _master_written(self, bucket) -> bool:
        return bucket.master._version != self._versions[id(bucket)]

    def _misfits(self) -> list[str]:
        return [bucket.param_names[index] for bucket, index, param, cast in self._shown
                if param.shape != cast.shape]

    @torch.no_grad()
    def flush(self) -> None:
        """The masters take what the parameters hold now, exactly; the casts and the
        shards follow (a parameter given data of another shape waits for the exit)."""
        written = {id(bucket) for bucket in self._buckets if self._master_written(bucket)}
        for bucket, index, param, cast in self._shown:
            if param.shape == cast.shape and id(bucket) not in written:
                self._masters.load(bucket, index, param.data)
                cast.copy_(param.data)
        for bucket in self._buckets:
            self._masters.to_shard(bucket)
            if id(bucket) in written:  # the casts hold no write made to the master
                if bucket.shard_owns_storage and bucket.is_gathered:
                    # stage 3: nor does this rank's slice of the gathered casts, which the
                    # block's end would take for a write to the parameters
                    bucket.own_slice().copy_(bucket.shard)
                self._masters.forget_parameters_follow(bucket)
            else:  # every rank's parameters hold the casts of every rank's masters now
                self._masters.note_parameters_follow(bucket)
            self._versions[id(bucket)] = bucket.master._version

    @contextlib.contextmanager
    def casts_in_place(self):
        """The parameters hold their casts for a moment (after ``flush``: what the block
        wrote), so that stage 3's look at the gathered parameters sees its own buffers."""
        values = [param.data for _, _, param, _ in self._shown]
        with torch.no_grad():
            for _, _, param, cast in self._shown:
                param.data = cast
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, _, param, _), value in zip(self._shown, values):
                    param.data = value

    @torch.no_grad()
    def __exit__(self, exc_type, exc, traceback) -> None:
        misfits = self._misfits()
        if exc_type is None and not misfits:
            self.flush()
        else:  # the casts come back as they were
            for bucket in self._buckets:
                if not self._followed_before[id(bucket)]:
                    self._masters.forget_parameters_follow(bucket)
        for _, _, param, cast in self._shown:
            param.data = cast
        self._shown = []
        if exc_type is None and misfits:
            raise ValueError(f"parameters {misfits[:3]} were given new data of another shape "
                             "inside summon_full_params(full_precision=True); nothing was kept. "
                             "To change a shape, opt.close(), change the model, then build a "
                             "new ZeroOptimizer")
