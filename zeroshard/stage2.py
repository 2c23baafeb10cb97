"""ZeRO stage 2: stage 1 plus gradients partitioned (also stage 3's gradient store).

No full-size gradient outlives its bucket's reduce-scatter. As each parameter's
gradient is accumulated, it is copied into its bucket's reduce buffer (allocated
when the bucket's first gradient arrives) and ``p.grad`` is set to None, freeing it.
Once the reduce-scatter has consumed the buffer, the result is added into the
bucket's gradient shard and the buffer is dropped. So after backward a rank holds
only gradient shards; during backward, the shards plus at most two buckets (one
filling, one in flight: a new buffer waits for the previous reduce-scatter), plus
the gradient autograd has just produced.

Inside ``no_sync()`` gradients accumulate in ``p.grad`` at full size, as in plain
PyTorch; the first synced backward adds its gradient to them and reduces the total.
After a synced backward ``p.grad`` holds a marker that carries ``model.zero_grad()``
to the shards (Note [gradient markers] in _grad_markers.py).
"""

from __future__ import annotations

import torch

from ._bucket import FlatBucket, grad_shards
from ._grad_markers import GradientMarkers
from ._hooks import LoopSwitches, WeakHook
from .mixed_precision import GradientDtypes


class ShardedGradients:
    """The gradient store of stages 2 and 3: a shard per bucket, and a reduce buffer
    per bucket only while its gradients fill it and it is reduced."""

    def __init__(self, buckets: list[FlatBucket], dtypes: GradientDtypes, switches: LoopSwitches,
                 label: str, wait_in_flight, handles: list) -> None:
        self.buckets = buckets
        self.dtypes = dtypes
        self.switches = switches
        self.wait_in_flight = wait_in_flight  # the reducer's, held weakly (a WeakHook)
        # id(bucket) -> 1-D padded buffer, filling (not yet launched) / being reduced
        self.reduce_buffers: dict[int, torch.Tensor] = {}
        self.buffers_in_flight: dict[int, torch.Tensor] = {}
        self.markers = GradientMarkers(label)  # Note [gradient markers]
        for bucket in self.buckets:
            for param in bucket.params:  # runs before autograd accumulates into .grad
                handles.append(param.register_hook(WeakHook(self._before_accumulate)))

    def _before_accumulate(self, grad: torch.Tensor) -> None:
        self.markers.take_back()  # a backward that does not start at the model's outputs

    def before_backward(self) -> None:
        self.markers.take_back()

    def after_backward(self) -> None:
        self.markers.place(self.buckets)

    def claim_gradients(self) -> None:
        self.markers.take_back(keep=True)  # the shards keep their gradient until cleared

    def is_gradient_marker(self, tensor: torch.Tensor) -> bool:
        return self.markers.is_marker(tensor)

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        """Clipping scaled the shards; no local gradient outlives its reduction here."""

    def _buffer(self, bucket: FlatBucket) -> torch.Tensor:
        if id(bucket) not in self.reduce_buffers:
            self.wait_in_flight()  # bound memory: one bucket filling, at most one in flight
            # In the reduce dtype: gradients are accumulated (and reduced) in it.
            self.reduce_buffers[id(bucket)] = torch.zeros_like(
                bucket.flat, dtype=self.dtypes.reduce_dtype(bucket))
        return self.reduce_buffers[id(bucket)]

    def _move_grad_to_buffer(self, bucket: FlatBucket, index: int) -> None:
        param = bucket.params[index]
        if param.grad is not None:
            bucket.param_view(self._buffer(bucket), index).add_(param.grad)
            param.grad = None

    def collect(self, bucket: FlatBucket, index: int) -> None:
        if self.switches.require_sync:
            self._move_grad_to_buffer(bucket, index)

    def fill_missing(self, bucket: FlatBucket, index: int) -> None:
        self._move_grad_to_buffer(bucket, index)  # a gradient left over from no_sync()

    def launch(self, bucket: FlatBucket) -> tuple[torch.Tensor, bool]:
        """The bucket's buffer, which the reduction consumes. Out of the filling table: a
        late gradient (Note [late gradients]) starts a new buffer."""
        buffer = self._buffer(bucket)
        self.buffers_in_flight[id(bucket)] = self.reduce_buffers.pop(id(bucket))
        return buffer, True

    def landed(self, bucket: FlatBucket) -> None:
        del self.buffers_in_flight[id(bucket)]  # freed by the reducer

    def install(self, bucket: FlatBucket, reduced: torch.Tensor) -> None:
        if bucket.grad_shard is None:
            bucket.set_grad_shard(self.dtypes.as_gradient_shard(bucket, reduced))
        else:
            bucket.grad_shard.add_(reduced)

    def zero_grad(self) -> None:
        self.markers.drop()
        self.reduce_buffers.clear()
        assert not self.buffers_in_flight
        for bucket in self.buckets:
            bucket.set_grad_shard(None)
            for param in bucket.params:
                param.grad = None

    def drop(self) -> None:
        """The stage is going away: no marker stays in ``p.grad``."""
        self.markers.drop()

    def gradient_tensors(self) -> list[torch.Tensor]:
        shards = grad_shards(self.buckets)
        return shards + list(self.reduce_buffers.values()) + list(self.buffers_in_flight.values())
