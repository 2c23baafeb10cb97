"""ZeRO stage 1: optimizer states partitioned; gradients stay full size on every rank.

Each bucket has a full-size flat gradient buffer and every parameter's ``.grad`` is
a view of it, so autograd accumulates into it in place and ``p.grad`` keeps this
rank's local, unreduced gradient. Each synced backward reduce-scatters the whole
buffer; the average lands in the bucket's gradient shard, replacing the previous
one: the buffer already holds everything accumulated since ``zero_grad()``, so
accumulating over several backward calls (with or without ``no_sync``) needs no
extra bookkeeping.
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
        bucket.set_grad_shard(self.as_gradient_shard(reduced))

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place (``p.grad`` stays a zero view, never None)."""
        self.wait_in_flight()
        for bucket, flat_grad in zip(self.buckets, self.flat_grads):
            flat_grad.zero_()
            bucket.set_grad_shard(None)
            for index, param in enumerate(bucket.params):
                param.grad = bucket.param_view(flat_grad, index)

    def gradient_tensors(self) -> list[torch.Tensor]:
        shards = [b.grad_shard for b in self.buckets if b.grad_shard is not None]
        return self.flat_grads + shards
