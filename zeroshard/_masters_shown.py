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
    the masters are left as they were.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def masters_shown(view, masters):
    """Inside, every parameter with a separate fp32 master holds its full fp32 value
    (``view``: the optimizer's ShardingView; ``masters``: its Fp32Masters)."""
    buckets = [b for b in view.take_outside_writes()
               if b.master is not None and b.master is not b.shard]
    shown = []  # (bucket, index, parameter, the cast it held)
    with torch.no_grad():
        for bucket in buckets:
            full = view.gather_shard(bucket.master)
            for index, param in enumerate(bucket.params):
                shown.append((bucket, index, param, param.data))
                param.data = bucket.param_view(full, index)
    completed = False
    try:
        yield
        completed = True
    finally:
        with torch.no_grad():
            misfits = [bucket.param_names[index] for bucket, index, param, cast in shown
                       if param.shape != cast.shape]
            for bucket, index, param, cast in shown:
                value = param.data  # written in place, or given new .data
                param.data = cast
                if completed and not misfits:
                    masters.load(bucket, index, value)
                    cast.copy_(value)
            if completed and not misfits:
                for bucket in buckets:
                    masters.to_shard(bucket)
    if misfits:
        raise ValueError(f"parameters {misfits[:3]} were given new data of another shape inside "
                         "summon_full_params(full_precision=True); nothing was kept. To change "
                         "a shape, opt.close(), change the model, then build a new ZeroOptimizer")
