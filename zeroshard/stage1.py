"""ZeRO stage 1: optimizer states partitioned; gradients stay full size on every rank.

Each bucket has a full-size flat gradient buffer and every parameter's ``.grad`` is
a view of it, so autograd accumulates into it in place and ``p.grad`` keeps this
rank's local, unreduced gradient. Each synced backward reduce-scatters the whole
buffer; the average lands in the bucket's gradient shard, replacing the previous
one: the buffer already holds everything accumulated since ``zero_grad()``, so
accumulating over several backward calls (with or without ``no_sync``) needs no
extra bookkeeping. Clipping scales the shards; if the gradients are then not
cleared before the next backward (they accumulate into the next step, as torch
allows), the buffers are scaled alike first, so that the next reduction of the
whole buffer starts from the clipped gradient, as DDP's ``p.grad`` does.
"""

from __future__ import annotations

import torch

from ._bucket import FlatBucket, grad_shards
from ._grad_markers import GIVEN_A_NEW_TENSOR
from .mixed_precision import GradientDtypes


class FullGradients:
    """Stage 1's gradient store: a full-size buffer per bucket that ``p.grad`` views."""

    reductions_in_flight = 2  # each holds a copy of its buffer (Note [reductions in flight])

    def __init__(self, buckets: list[FlatBucket], dtypes: GradientDtypes) -> None:
        self.buckets = buckets
        self.dtypes = dtypes
        self.flat_grads = {id(bucket): torch.zeros_like(bucket.flat) for bucket in buckets}
        for bucket in self.buckets:
            for index, param in enumerate(bucket.params):
                param.grad = self._grad_view(bucket, index)
        self._scale_before_accumulating: torch.Tensor | None = None  # clipped since cleared
        self._record_versions()

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        """Clipping scaled the gradient shards by ``factor``: the buffers follow before
        they next accumulate (the next backward reduces them again)."""
        previous = self._scale_before_accumulating
        self._scale_before_accumulating = factor if previous is None else previous * factor

    def before_backward(self) -> None:
        for bucket in self.buckets:  # Note [gradients the param groups show] in _bucket.py
            bucket.claim_shown_gradient()
            if bucket.shown_gradient_cleared:
                bucket.shown_gradient_cleared = False
                for param in bucket.params:  # this backward overwrites their part (collect)
                    param.grad = None
        if self._scale_before_accumulating is not None:
            for bucket in self.buckets:
                # model.zero_grad() set every .grad of the bucket to None: the backward
                # overwrites the buffer (collect), so scaling it would be a wasted pass
                if any(param.grad is not None for param in bucket.params):
                    flat_grad = self.flat_grads[id(bucket)]
                    flat_grad.mul_(self._scale_before_accumulating.to(flat_grad.dtype))
            self._scale_before_accumulating = None

    def after_backward(self) -> None:
        self._record_versions()

    def _record_versions(self) -> None:
        """What claim_gradients compares with: the buffers as the last reduction left them."""
        self._versions_reduced = {key: flat_grad._version for key, flat_grad in self.flat_grads.items()}

    def claim_gradients(self) -> None:
        """Before a step or clipping: what was done to ``p.grad`` since the last reduction.

        ``p.grad`` holds this rank's local gradient, so nothing here may depend on its
        values (ranks would decide differently, and one would raise while the others
        go on into the step's collective). Only what every rank's loop does alike is
        read: a gradient set to None (``model.zero_grad()``) clears its part of the
        shard, as DDP would skip it; a gradient replaced, or a buffer changed in place
        (``torch.nn.utils.clip_grad_norm_(model.parameters())``,
        ``zero_grad(set_to_none=False)`` between backward and step), cannot reach the
        reduced gradient and is refused."""
        cleared = []  # (bucket, indices of its parameters whose .grad is None)
        for bucket in self.buckets:
            none = []
            for index, param in enumerate(bucket.params):
                if param.grad is None:
                    none.append(index)
                elif param.grad.data_ptr() != self._grad_view(bucket, index).data_ptr():
                    raise RuntimeError(self._refusal(
                        f"{bucket.param_names[index]}.grad {GIVEN_A_NEW_TENSOR}"))
            if self._versions_reduced[id(bucket)] != self.flat_grads[id(bucket)]._version:
                shown = 6  # the buffer's one version counter does not say which parameter
                names = ", ".join(bucket.param_names[:shown]) + (
                    f" (and {len(bucket.params) - shown} more)" if len(bucket.params) > shown else "")
                raise RuntimeError(self._refusal(
                    f"the .grad of a parameter among {names} was changed in place (to drop "
                    "one parameter's gradient, set p.grad = None instead, which the step skips "
                    "as torch's does; a model.zero_grad(set_to_none=False) followed by a step "
                    "with no backward between is one such change: clear with "
                    "opt.zero_grad(set_to_none=False) there, which zeroes the shards too)"))
            if none:
                cleared.append((bucket, none))
        # .grad stays None: the next backward overwrites its part of the buffer (collect,
        # fill_missing)
        for bucket, none in cleared:
            bucket.clear_gradients_of(none)
        self._record_versions()

    def is_gradient_marker(self, tensor: torch.Tensor) -> bool:
        return False

    def _refusal(self, what: str) -> str:
        return (f"zeroshard stage1: {what} after backward; .grad holds this rank's local, "
                "unreduced gradient and the step uses the reduced one in the optimizer's "
                "shards. Clip with opt.clip_grad_norm_(max_norm) instead of "
                "torch.nn.utils.clip_grad_norm_(model.parameters()) (Hugging Face Trainer: "
                "use zeroshard.integrations.hf.ZeroTrainer); clip by value, or change "
                "gradients otherwise, over the reduced ones in opt.param_groups "
                "(torch.nn.utils.clip_grad_value_([p for g in opt.param_groups for p in "
                "g['params']], v)); clear gradients with opt.zero_grad() or "
                "model.zero_grad() after the step")

    def _grad_view(self, bucket: FlatBucket, index: int) -> torch.Tensor:
        return bucket.param_view(self.flat_grads[id(bucket)], index)

    def collect(self, bucket: FlatBucket, index: int, launched: bool,
                engine_holds: tuple = ()) -> None:
        """Parameter ``index`` of ``bucket`` holds its accumulated gradient in ``.grad``.

        Autograd accumulates into the view in place; only if the user replaced or
        cleared .grad (e.g. model.zero_grad()) is the gradient elsewhere."""
        param, view = bucket.params[index], self._grad_view(bucket, index)
        if not _is_memory_of(param.grad, view):
            _copy_into(view, param.grad)
            param.grad = view

    def fill_missing(self, bucket: FlatBucket, index: int) -> None:
        """Backward ended without a gradient for this parameter; its share is what .grad holds."""
        param, view = bucket.params[index], self._grad_view(bucket, index)
        if param.grad is None:
            view.zero_()
        elif not _is_memory_of(param.grad, view):
            _copy_into(view, param.grad)
        param.grad = view

    def launch(self, bucket: FlatBucket) -> tuple[torch.Tensor, bool]:
        """What to reduce-scatter, and whether the reduction may consume it: the buffer,
        which it may not (p.grad views it; the reducer reduces a copy, Note [reduce
        slots])."""
        return self.flat_grads[id(bucket)], False

    def landed(self, bucket: FlatBucket) -> None:
        """The bucket's reduce-scatter has completed (its input is not needed)."""

    def install(self, bucket: FlatBucket, reduced: torch.Tensor) -> None:
        """The reduced gradient replaces the shard: the buffer held everything accumulated."""
        bucket.set_grad_shard(self.dtypes.as_gradient_shard(bucket, reduced))

    def zero_grad(self, set_to_none: bool) -> None:
        """Clear the gradient shards and ``p.grad``: to None, as torch's ``zero_grad()``
        does, or (``set_to_none=False``) to zeros where they exist, ``p.grad`` a view of
        its buffer (a step before the next backward then steps on zero gradients, as
        torch's does, and skips a bucket that had none: Note [zeros only where a
        gradient was] in mixed_precision.py).

        None leaves the buffers as they are: the next backward overwrites each
        parameter's part (``collect`` copies a gradient that is not its view,
        ``fill_missing`` zeroes one that never came), which saves a pass over every
        buffer and makes the first accumulation a copy instead of an addition."""
        self._scale_before_accumulating = None
        for bucket in self.buckets:
            bucket.set_grad_shard(self.dtypes.cleared_gradient_shard(bucket, set_to_none))
            if not set_to_none:
                self.flat_grads[id(bucket)].zero_()
            for index, param in enumerate(bucket.params):
                kept = not set_to_none and param.grad is not None
                param.grad = self._grad_view(bucket, index) if kept else None
        self._record_versions()  # nothing to claim

    def drop(self) -> None:
        """The stage is going away."""

    def gradient_tensors(self) -> list[torch.Tensor]:
        shards = grad_shards(self.buckets)
        return list(self.flat_grads.values()) + shards


def _is_memory_of(grad: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether ``grad`` is ``view``'s memory: autograd accumulated into it in place."""
    return grad is view or (grad.layout == torch.strided and grad.data_ptr() == view.data_ptr())


def _copy_into(view: torch.Tensor, grad: torch.Tensor) -> None:
    """``view.copy_(grad)``, also for a sparse gradient (``nn.Embedding(sparse=True)``),
    which is reduced densely as at stages 2 and 3 (backward crashed on its data pointer)."""
    if grad.layout == torch.strided:
        view.copy_(grad)
    else:
        view.zero_().add_(grad)
