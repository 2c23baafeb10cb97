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

from ._bucket import FlatBucket
from ._stage import ShardedStage


class Stage1(ShardedStage):
    stage = 1

    def __init__(self, model, buckets, group, stats, policy=None) -> None:
        super().__init__(model, buckets, group, stats, policy)
        self.flat_grads = [torch.zeros_like(bucket.flat) for bucket in self.buckets]
        for bucket, flat_grad in zip(self.buckets, self.flat_grads):
            for index, param in enumerate(bucket.params):
                param.grad = bucket.param_view(flat_grad, index)
        self._scale_before_accumulating: torch.Tensor | None = None  # clipped since cleared
        self._versions_reduced = [flat_grad._version for flat_grad in self.flat_grads]

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        previous = self._scale_before_accumulating
        self._scale_before_accumulating = factor if previous is None else previous * factor

    def before_backward(self) -> None:
        if self._scale_before_accumulating is not None:
            for flat_grad in self.flat_grads:
                flat_grad.mul_(self._scale_before_accumulating.to(flat_grad.dtype))
            self._scale_before_accumulating = None

    def after_backward(self) -> None:
        self._versions_reduced = [flat_grad._version for flat_grad in self.flat_grads]

    def claim_gradients(self) -> None:
        """Before a step or clipping: what was done to ``p.grad`` since the last reduction
        reaches the shards as it would reach DDP's gradients (Note [gradient markers] in
        _grad_markers.py, for the local gradients stage 1 keeps in ``p.grad``): a gradient
        set to None or zeroed clears its part of the shard; one changed in place
        otherwise (``torch.nn.utils.clip_grad_norm_(model.parameters())``) is refused."""
        cleared = []
        for position, bucket in enumerate(self.buckets):
            changed = self._versions_reduced[position] != self.flat_grads[position]._version
            for index, param in enumerate(bucket.params):
                view = self._grad_view(bucket, index)
                replaced = param.grad is not None and param.grad.data_ptr() != view.data_ptr()
                if param.grad is None or (changed and not replaced and not view.any()):
                    cleared.append((bucket, index))
                elif replaced or changed:
                    what = "was given a new tensor" if replaced else "was changed in place"
                    raise RuntimeError(
                        f"zeroshard stage1: {bucket.param_names[index]}.grad {what} after "
                        "backward; it holds this rank's local, unreduced gradient and the step "
                        "uses the reduced one in the optimizer's shards. Clip with "
                        "opt.clip_grad_norm_(max_norm) instead of torch.nn.utils.clip_grad_norm_("
                        "model.parameters()); clear gradients with opt.zero_grad() or "
                        "model.zero_grad()")
        for bucket, index in cleared:
            overlap = bucket.layout.overlap(index, bucket.rank)
            if overlap is not None and bucket.grad_shard is not None:
                bucket.grad_shard[overlap.shard_span].zero_()
            self._grad_view(bucket, index).zero_()
            bucket.params[index].grad = self._grad_view(bucket, index)
        self.after_backward()

    def _grad_view(self, bucket: FlatBucket, index: int) -> torch.Tensor:
        return bucket.param_view(self.flat_grads[self._position[id(bucket)]], index)

    def collect(self, bucket: FlatBucket, index: int) -> None:
        # Autograd accumulates into the view in place; only if the user replaced or
        # cleared .grad (e.g. model.zero_grad()) is the gradient elsewhere.
        param, view = bucket.params[index], self._grad_view(bucket, index)
        if param.grad is not view and param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)
            param.grad = view

    def fill_missing(self, bucket: FlatBucket, index: int) -> None:
        param, view = bucket.params[index], self._grad_view(bucket, index)
        if param.grad is None:
            view.zero_()
        elif param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)
        param.grad = view

    def launch(self, bucket: FlatBucket):
        # The buffer keeps the local gradient (p.grad views it): not consumable.
        return self.reduce_scatter(bucket, self.flat_grads[self._position[id(bucket)]],
                                   consumable=False)

    def finalize(self, bucket: FlatBucket, reduced: torch.Tensor) -> None:
        bucket.set_grad_shard(self.as_gradient_shard(bucket, reduced))

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place (``p.grad`` stays a zero view, never None)."""
        self.wait_in_flight()
        self._scale_before_accumulating = None
        for bucket, flat_grad in zip(self.buckets, self.flat_grads):
            flat_grad.zero_()
            bucket.set_grad_shard(None)
            for index, param in enumerate(bucket.params):
                param.grad = bucket.param_view(flat_grad, index)
        self.after_backward()  # nothing to claim

    def gradient_tensors(self) -> list[torch.Tensor]:
        shards = [b.grad_shard for b in self.buckets if b.grad_shard is not None]
        return self.flat_grads + shards
