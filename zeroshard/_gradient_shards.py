"""What the optimizer's param groups hold in ``.grad``: this rank's shard of the reduced gradients.

Note [a norm of a shard]:
    ``opt.param_groups`` hold this rank's master shards, and their ``.grad`` is the
    reduced gradient shard the step will use: ``torch.amp.GradScaler`` unscales and
    checks exactly those (Note [non-finite gradients] in _reducer.py), and clipping by
    value (``torch.nn.utils.clip_grad_value_``) or scaling by a constant is the same on
    a shard as on the whole. A norm, a sum or a maximum of a shard is not: it is this
    rank's part of the whole gradient's. Clipping by norm over the optimizer's
    tensors (``torch.nn.utils.clip_grad_norm_(p for g in opt.param_groups for p in
    g["params"])``, the way Lightning clips) would scale each rank's shard by its own
    norm: every rank agrees with itself, nothing fails, and the parameters move away
    from DDP's by the difference in clipping (0.5 clipping, SGD, 4 steps, 2 ranks: a
    norm of 1.25 where DDP's is 1.66). So the shard in ``.grad`` is a
    ``GradientShard``: such a reduction of it, or of anything computed from it
    element by element, raises where it is made, naming ``opt.clip_grad_norm_``
    (``any()`` and ``all()`` too: a rank that skipped its step on a local check would
    leave the others in the step's all-gather). No list of operations can be complete
    (a loop over the elements, numpy); it covers what clipping and logging use.
    Every rank clips the same way, so every rank raises, before any collective.
    zeroshard's own work (the step, its clipping) uses the plain tensor.
"""

from __future__ import annotations

import copy

import torch
from torch.utils._pytree import tree_flatten

_T = torch.Tensor
# Reductions over the whole tensor: on a shard they give this rank's part only.
_PARTIAL = {f for f in (
    torch.norm, _T.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.linalg.matrix_norm,
    getattr(torch, "_foreach_norm", None), getattr(torch, "_foreach_max", None),
    torch.sum, _T.sum, torch.nansum, _T.nansum, torch.mean, _T.mean, torch.nanmean, _T.nanmean,
    torch.prod, _T.prod, torch.amax, _T.amax, torch.amin, _T.amin, torch.aminmax, _T.aminmax,
    torch.dot, _T.dot, torch.vdot, _T.vdot, torch.inner, _T.inner,
    torch.std, _T.std, torch.var, _T.var, torch.std_mean, torch.var_mean,
    torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__, torch.einsum,
    torch.logsumexp, _T.logsumexp, torch.median, _T.median, torch.nanmedian, _T.nanmedian,
    torch.quantile, _T.quantile, torch.nanquantile, _T.nanquantile, torch.topk, _T.topk,
    torch.kthvalue, _T.kthvalue, torch.count_nonzero, _T.count_nonzero,
    torch.any, _T.any, torch.all, _T.all, torch.nn.functional.normalize,
) if f is not None}
_MAX_MIN = {torch.max, _T.max, torch.min, _T.min}  # reductions unless given a second tensor
# torch.amp.GradScaler's check of the gradients for an inf or NaN (Note [non-finite gradients])
_NON_FINITE_CHECK = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
_PRINTING = {_T.__repr__, _T.__str__, _T.__format__}


class GradientShard(torch.Tensor):
    """This rank's shard of a bucket's reduced gradients, as the param groups show it
    (Note [a norm of a shard]). Element-wise use works and gives shards; a whole-tensor
    reduction raises."""

    holds: list[str] = []  # names of the parameters whose elements it holds (its bucket's)
    # (found_inf) -> None: makes a check of this rank's shards the ranks' (the reducer's)
    agree_on_non_finite = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRINTING:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _PARTIAL or (func in _MAX_MIN and not _second_tensor(args, kwargs)):
            raise RuntimeError(_message(func, args, kwargs))
        result = super().__torch_function__(func, types, args, kwargs)
        _pass_on_what_it_holds(args, kwargs, result)
        if func is _NON_FINITE_CHECK:
            agree = next((t.agree_on_non_finite for t in args[0]
                          if isinstance(t, GradientShard) and t.agree_on_non_finite), None)
            if agree is not None:
                agree(args[1] if len(args) > 1 else kwargs["found_inf"])
        return result

    # A copy or a saved gradient is a plain tensor: nothing else should behave as a shard,
    # and torch.load's default (weights only) reads no subclass.
    def __deepcopy__(self, memo):
        return copy.deepcopy(_plain(self), memo)

    def __reduce_ex__(self, protocol):
        return _plain(self).__reduce_ex__(protocol)


def _pass_on_what_it_holds(args, kwargs, result) -> None:
    """A shard made from a shard (``p.grad = p.grad.clamp(-c, c)`` on the param groups'
    tensors) holds the same parameters and keeps the ranks' agreement on non-finite
    gradients: without it, GradScaler's check of the new tensor was this rank's alone,
    one rank skipped the step and the others waited in its all-gather (helper-103)."""
    source = next((t for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, GradientShard) and t.agree_on_non_finite), None)
    if source is None:
        return
    for out in tree_flatten(result)[0]:
        if isinstance(out, GradientShard) and out.agree_on_non_finite is None:
            out.holds, out.agree_on_non_finite = source.holds, source.agree_on_non_finite


def _plain(shard: GradientShard) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return shard.as_subclass(torch.Tensor)


def as_gradient_shard(grad: torch.Tensor, holds: list[str], agree_on_non_finite=None) -> GradientShard:
    shard = grad.as_subclass(GradientShard)
    shard.holds = holds
    shard.agree_on_non_finite = agree_on_non_finite
    return shard


def _second_tensor(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) for a in list(args[1:]) + [kwargs.get("other")])


def _message(func, args, kwargs) -> str:
    names = next((t.holds for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, GradientShard) and t.holds), ["some parameters"])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    holds = ", ".join(map(repr, names[:3])) + more
    name = getattr(func, "__name__", None) or repr(func)
    return (f"zeroshard: {name} over a gradient in opt.param_groups: that tensor is this rank's "
            f"shard of the reduced gradients (of {holds}), so its norm, sum or maximum is this "
            "rank's part only, and clipping by it (torch.nn.utils.clip_grad_norm_ over the "
            "optimizer's tensors, as Lightning clips) would scale each rank's shard "
            "differently from DDP. Use opt.clip_grad_norm_(max_norm, norm_type): it clips by "
            "the global norm and returns it, as torch.nn.utils.clip_grad_norm_ does under DDP "
            "(in Lightning, override configure_gradient_clipping to call it). Clipping by "
            "value (torch.nn.utils.clip_grad_value_) works on the shards as they are; code that "
            "combines the ranks' parts itself (an all-reduce of the squares) can read "
            "grad.as_subclass(torch.Tensor)")
