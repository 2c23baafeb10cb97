"""The norm math of ``ZeroOptimizer.clip_grad_norm_``: pure functions of this rank's
gradient shards, one foreach kernel per step of the math (not a few per bucket).

The global norm over the shards of every rank is ``total_norm`` of the sum (the
maximum, for the inf-norm) over ranks of each rank's ``shard_norm_term``.

Note [a norm of a long shard]: on CPU, torch's norm of one long fp32 tensor drifts
with its length (measured, one thread: relative errors of 1e-5 at a million
elements, 6.5e-5 at three million, 3.9e-3 at fifty million, against the fp64 norm),
and a shard is a whole bucket, far longer than the parameters torch's
clip_grad_norm_ takes norms of one by one: clipping scaled by a coefficient that much
off DDP's, silently. So CPU shards are taken in pieces of ``PIECE`` elements (1.6e-7
at fifty million, for 30% more time than one norm) and the pieces' terms summed in
fp64. CUDA's reduction is a tree, whose error does not grow so.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.distributed as dist


def combine_op(norm_type: float) -> dist.ReduceOp:
    """How the ranks' terms combine: the maximum for the inf-norm, else the sum."""
    return dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM


PIECE = 1 << 16  # elements per norm on CPU (Note [a norm of a long shard])


def shard_norm_term(grads: list[torch.Tensor], norm_type: float,
                    device: torch.device) -> torch.Tensor:
    """This rank's share of the norm: max |g| for the inf-norm, else sum ‖g‖_p^p (summed
    in fp64 over the pieces of Note [a norm of a long shard]). In fp32, or in fp64 if a
    gradient is fp64, as torch's norm of the per-parameter norms would be (fp32 could not
    hold an fp64 gradient's norm: torch refuses to narrow it). A complex gradient's norm
    is its moduli's, as torch's ``vector_norm`` takes it (it raised on complex shards)."""
    grads = [grad.abs() if grad.is_complex() else grad for grad in grads]
    term_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    if not grads:
        return torch.zeros((), dtype=term_dtype, device=device)
    if device.type == "cpu" and not math.isinf(norm_type):
        grads = [piece for grad in grads for piece in grad.split(PIECE)]
    narrow = [g for g in grads if g.dtype != torch.float64]
    wide = [g for g in grads if g.dtype == torch.float64]
    norms = torch.cat([torch.stack(torch._foreach_norm(same, norm_type, dtype=dtype)).to(term_dtype)
                       for same, dtype in ((narrow, torch.float32), (wide, torch.float64)) if same])
    if math.isinf(norm_type):
        return norms.max()
    return norms.double().pow_(norm_type).sum().to(term_dtype)


def total_norm(term: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The global norm from the ranks' combined terms."""
    return term if math.isinf(norm_type) else term ** (1.0 / norm_type)


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ scales gradients by (at most 1)."""
    return (float(max_norm) / (total + 1e-6)).clamp(max=1.0)


def scale_(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every gradient by ``factor`` in place, one foreach call per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = collections.defaultdict(list)
    for grad in grads:
        by_dtype[grad.dtype].append(grad)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, factor.to(dtype))
