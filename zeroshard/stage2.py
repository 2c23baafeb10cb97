"""ZeRO stage 2: stage 1 plus gradients partitioned (also stage 3's gradient store).

No full-size gradient outlives its bucket's reduce-scatter. As parameters' gradients
are accumulated, they are copied into their bucket's reduce buffer and ``p.grad`` is
set to None, freeing each (Note [gradients wait for their buffer]: the first few may
wait in ``.grad`` until they add up to a quarter of the bucket). Once the
reduce-scatter has consumed the buffer, the result is added into the bucket's
gradient shard and the buffer is dropped. So after backward a rank holds only
gradient shards; during backward, the shards plus at most two buckets (one filling
while the one before it is reduced: a launch waits for the previous reduce-scatter,
Note [reductions in flight] in _reducer.py), plus the gradient autograd has just
produced, plus the gradients waiting in ``.grad`` for buckets whose buffer is not
made yet (under a quarter of each such bucket, which used to hold a whole buffer).

Note [gradients wait for their buffer]:
    A reduce buffer is as large as its bucket and lives from its first gradient to the
    end of its reduction. A bucket whose first gradient is small and comes early would
    keep the whole buffer through most of backward: stage 3's root unit holds the
    token embedding with the final norm, whose gradient comes first, and on the 100M
    GPT its 48 MiB buffer lived from the start of backward to the end, at the step's
    peak. So a bucket's gradients stay in ``.grad`` as autograd made them until they
    add up to a quarter of the bucket (in elements); then the buffer is made and takes
    them all, and from then on each gradient as it comes. Only on-time gradients wait:
    one that comes after its bucket launched (Note [late gradients] in _reducer.py)
    goes into a buffer at once, as do those the launch finds waiting.

Note [a gradient as its bucket's buffer]:
    A parameter as large as the bucket cap or larger (a token embedding, an output
    head) has a bucket to itself, and its gradient, as autograd made it, holds exactly
    what the buffer would: copying it into a new buffer would hold it twice at the
    moment it arrives, typically the end of backward, when every gradient shard is
    alive (the 100M GPT with its head untied, 2 ranks: stage 2's step peaked there,
    283 MiB above the RSS between steps; without the copy its peak is AdamW's step,
    269 MiB). So the gradient becomes the buffer, and the reduction
    consumes it, when the bucket has that one parameter and no padding, the gradient
    is in the reduce dtype and laid out in the parameter's memory order, and nothing
    but ``param.grad`` refers to it (autograd stole it or made it for ``.grad``; a
    user's hook that kept it, or a view of it, makes it a copy as before: the
    reduction would change what they kept).

Inside ``no_sync()`` gradients accumulate in ``p.grad`` at full size, as in plain
PyTorch; the first synced backward adds its gradient to them and reduces the total.
After a synced backward ``p.grad`` holds a marker that carries ``model.zero_grad()``
to the shards (Note [gradient markers] in _grad_markers.py).
"""

from __future__ import annotations

import functools
import sys

import torch

from ._bucket import FlatBucket, grad_shards, storage_use_count, to_memory_order
from ._grad_markers import GradientMarker, GradientMarkers, refusal_of_a_gradient_set_by_hand
from ._hooks import LoopSwitches, WeakHook
from .mixed_precision import GradientDtypes


def only_the_parameter_holds(param: torch.Tensor, engine_holds: tuple = ()) -> bool:
    """Nothing but ``param.grad`` (and ``engine_holds``: the gradients autograd hands the
    hook now running, which it drops once the hook returns) refers to its gradient: no
    other Python name for the tensor (a hook that kept it) and no other tensor on its
    storage (a kept view). Counted against a tensor made here, which only this frame
    holds, so the count does not depend on how this Python counts a call's references;
    what the engine holds is discounted only where this torch passed the check of
    ``engine_counts_as_expected`` (else such a gradient is copied)."""
    if storage_use_count is None:  # a torch without it: copy, as before
        return False
    if engine_holds and not engine_counts_as_expected(str(param.device)):
        engine_holds = ()
    return _held_by_the_parameter_alone(param, engine_holds)


def _held_by_the_parameter_alone(param: torch.Tensor, engine_holds: tuple) -> bool:
    grad, fresh = param.grad, torch.empty(1)
    storage = grad.untyped_storage()._cdata
    # Autograd hands the hook the very tensor, or (having stolen it for .grad through a
    # detach) another tensor on its storage; when that is a view, its base holds the
    # storage too, and must be held by that view alone (not, say, by another node's
    # input, which backward has yet to read).
    same, others = 0, 0
    for tensor in engine_holds:
        if tensor is grad:
            same += 1
        elif isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata == storage:
            others += 1
            if tensor._base is not None:
                if _base_holders(tensor) != _base_holders(torch.empty(1).view(1)):
                    return False
                others += 1
    return (sys.getrefcount(grad) == sys.getrefcount(fresh) + 1 + same  # + param's .grad
            and storage_use_count(storage)
            == storage_use_count(fresh.untyped_storage()._cdata) + others)


class _AddGivingAView(torch.autograd.Function):
    """``a + w``, whose backward gives ``w`` a view of what it passes on to ``a``."""

    @staticmethod
    def forward(ctx, a, w):
        return a + w

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.view(grad.shape)


@functools.cache
def engine_counts_as_expected(device: str = "cpu") -> bool:
    """Whether this torch's reference counts say what ``only_the_parameter_holds``
    reads from them, checked once per device on two small backwards: a Linear's
    weight, whose gradient only the node hook's arguments still hold (it may be reduced
    in place), and a parameter given a view of the gradient backward still owes another
    node (it may not). A wrong yes would let a reduction overwrite what backward still
    reads; on the device itself (CUDA's autograd runs on a thread per device, holding
    gradients in its own way), not only on CPU tensors (helper-111's review)."""
    def answer(param: torch.Tensor, loss) -> list[bool]:
        answers: list[bool] = []
        node = param.view_as(param).grad_fn.next_functions[0][0]
        handle = node.register_hook(lambda grad_inputs, grad_outputs: answers.append(
            _held_by_the_parameter_alone(param, grad_outputs)))
        loss(param).backward()
        handle.remove()
        return answers

    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones(2, 4, device=device)  # no random draw: the user's RNG as it was
        alone = answer(torch.nn.Parameter(torch.ones(4, 4, device=device)),
                       lambda w: torch.nn.functional.linear(x, w).square().sum())
        owed = answer(torch.nn.Parameter(torch.ones(2, 4, device=device)),
                      lambda w: _AddGivingAView.apply(x.requires_grad_() * 2.0, w).square().sum())
    return alone == [True] and owed == [False]


def _base_holders(view: torch.Tensor) -> tuple[int, int]:
    """What refers to ``view``'s base: Python names, and C++ holders (the view itself,
    an input autograd has yet to pass on). Compared with a fresh view's, whose base
    only that view holds."""
    base = view._base
    return sys.getrefcount(base), base._use_count()


class ShardedGradients:
    """The gradient store of stages 2 and 3: a shard per bucket, and a reduce buffer
    per bucket only while its gradients fill it and it is reduced."""

    reductions_in_flight = 1  # the next bucket fills meanwhile (Note [reductions in flight])

    def __init__(self, buckets: list[FlatBucket], dtypes: GradientDtypes, switches: LoopSwitches,
                 label: str, handles: list, masters) -> None:
        self.buckets = buckets
        self.dtypes = dtypes
        self.masters = masters  # the step's widening, here for a second reduction
        self.switches = switches
        # id(bucket) -> 1-D padded buffer, filling (not yet launched) / being reduced
        self.reduce_buffers: dict[int, torch.Tensor] = {}
        self.buffers_in_flight: dict[int, torch.Tensor] = {}
        # Note [gradients wait for their buffer]: id(bucket) -> indices whose gradient
        # waits in .grad
        self.waiting: dict[int, list[int]] = {}
        self.markers = GradientMarkers(label)  # Note [gradient markers]
        for device in {str(bucket.flat.device) for bucket in self.buckets}:
            engine_counts_as_expected(device)  # checked here, once, not inside a backward
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
        self._refuse_gradients_set_by_hand()
        self.markers.take_back(keep=True)  # the shards keep their gradient until cleared

    def _refuse_gradients_set_by_hand(self) -> None:
        """Note [gradient markers]: when the shards are used, a trainable parameter's
        ``.grad`` holds a marker or None (a backward inside ``no_sync()`` is refused
        before this). A tensor the loop put there where no marker was (before the first
        backward, after ``opt.zero_grad()``: PCGrad's surgery, gradients copied in from
        another model) reaches no shard: the step went on without it, and the
        parameters did not move, silently (a helper's probe, stages 2 and 3). A marker
        replaced is refused by ``take_back``."""
        for bucket in self.buckets:
            for name, param in zip(bucket.param_names, bucket.params):
                if (param.grad is not None and param.requires_grad
                        and not isinstance(param.grad, GradientMarker)):
                    raise RuntimeError(refusal_of_a_gradient_set_by_hand(
                        name, self.markers.stage_label))

    def is_gradient_marker(self, tensor: torch.Tensor) -> bool:
        return self.markers.is_marker(tensor)

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        """Clipping scaled the shards; no local gradient outlives its reduction here."""

    def _buffer(self, bucket: FlatBucket) -> torch.Tensor:
        if id(bucket) not in self.reduce_buffers:
            # In the reduce dtype: gradients are accumulated (and reduced) in it.
            self.reduce_buffers[id(bucket)] = torch.zeros_like(
                bucket.flat, dtype=self.dtypes.reduce_dtype(bucket))
        return self.reduce_buffers[id(bucket)]

    def _move_grad_to_buffer(self, bucket: FlatBucket, index: int,
                             engine_holds: tuple = ()) -> None:
        param = bucket.params[index]
        if param.grad is None:
            return
        if (id(bucket) not in self.reduce_buffers and self._is_whole_bucket(bucket, param.grad)
                and only_the_parameter_holds(param, engine_holds)):  # no frame here holds it
            # Note [a gradient as its bucket's buffer]
            self.reduce_buffers[id(bucket)] = to_memory_order(param.grad, bucket.orders[0])
        else:
            bucket.param_view(self._buffer(bucket), index).add_(param.grad)
        param.grad = None

    def _is_whole_bucket(self, bucket: FlatBucket, grad: torch.Tensor) -> bool:
        """Note [a gradient as its bucket's buffer]: ``grad`` is laid out as the bucket's
        buffer would be."""
        return (len(bucket.params) == 1 and bucket.layout.padding == 0
                and grad.dtype == self.dtypes.reduce_dtype(bucket)
                and grad.device == bucket.flat.device and grad.layout == torch.strided
                and not grad.requires_grad
                and grad.permute(bucket.orders[0]).is_contiguous()
                and grad.storage_offset() == 0
                and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())

    def _move_waiting(self, bucket: FlatBucket, engine_holds: tuple = ()) -> None:
        for index in self.waiting.pop(id(bucket), ()):
            self._move_grad_to_buffer(bucket, index, engine_holds)

    def collect(self, bucket: FlatBucket, index: int, launched: bool,
                engine_holds: tuple = ()) -> None:
        """``launched``: the bucket's reduction was launched in this backward (a late
        gradient, Note [late gradients]), so a new buffer takes it at once.
        ``engine_holds``: what autograd hands the hook now running (only the
        parameter's gradient, or a tensor it was accumulated from)."""
        if not self.switches.require_sync:
            return
        if launched or id(bucket) in self.reduce_buffers:
            self._move_grad_to_buffer(bucket, index, engine_holds)
            return
        waiting = self.waiting.setdefault(id(bucket), [])  # Note [gradients wait for
        waiting.append(index)                              # their buffer]
        numels = bucket.layout.numels
        if 4 * sum(numels[i] for i in set(waiting)) >= bucket.layout.numel:
            self._move_waiting(bucket, engine_holds)

    def fill_missing(self, bucket: FlatBucket, index: int) -> None:
        self._move_grad_to_buffer(bucket, index)  # a gradient left over from no_sync()

    def launch(self, bucket: FlatBucket) -> tuple[torch.Tensor, bool]:
        """The bucket's buffer, which the reduction consumes. Out of the filling table: a
        late gradient (Note [late gradients]) starts a new buffer."""
        self._move_waiting(bucket)  # first: a lone parameter's gradient may become the buffer
        buffer = self._buffer(bucket)
        self.buffers_in_flight[id(bucket)] = self.reduce_buffers.pop(id(bucket))
        return buffer, True

    def landed(self, bucket: FlatBucket) -> None:
        del self.buffers_in_flight[id(bucket)]  # freed by the reducer

    def install(self, bucket: FlatBucket, reduced: torch.Tensor) -> None:
        bucket.claim_shown_gradient()  # Note [gradients the param groups show] in _bucket.py
        if bucket.grad_shard is None:
            bucket.set_grad_shard(self.dtypes.as_gradient_shard(bucket, reduced))
            return
        self.masters.widen_gradient(bucket)  # Note [reduced gradients summed in fp32]
        bucket.grad_shard.add_(reduced)

    # Note [reduced gradients summed in fp32]:
    #     Under a policy the reduced gradient of a bucket stays in ``reduce_dtype`` (2
    #     bytes by default) until clipping or the step widens it to the master's fp32.
    #     A second synced backward before the step (accumulation without ``no_sync()``)
    #     added its reduced gradient to that 2-byte shard, so every micro-batch's sum
    #     was rounded to bf16, where FSDP2 widens each reduced gradient and sums in fp32
    #     (helper-102's probe, 16 micro-batches: AdamW 0.02 from FSDP2, 1.1e-4 from fp32
    #     training where FSDP2 was 4e-5). So the shard is widened when a second
    #     reduction comes to it, as the step would widen it anyway: 2 bytes more per
    #     element of the shard from then to the step, in that loop only.

    def zero_grad(self, set_to_none: bool) -> None:
        """``p.grad`` becomes None (stages 2 and 3 keep no full gradient to zero); with
        ``set_to_none=False`` the gradient shards that exist become zeros, so that a step
        before the next backward steps on zero gradients, as torch's does (and the next
        backward adds to them): Note [zeros only where a gradient was] in
        mixed_precision.py. Their parameters get markers reading zero, so that a
        ``model.zero_grad()`` or ``p.grad = None`` that follows clears the shards, as it
        clears torch's zeroed gradients (a helper's probe: with ``p.grad`` None it
        reached nothing, and a stage-3 unit no rank ran next was stepped, 7e-3 from
        DDP)."""
        self.markers.drop()
        self.reduce_buffers.clear()
        self.waiting.clear()
        assert not self.buffers_in_flight
        for bucket in self.buckets:
            bucket.set_grad_shard(self.dtypes.cleared_gradient_shard(bucket, set_to_none))
            for param in bucket.params:
                param.grad = None
        if not set_to_none:  # Note [gradient markers]: reading zero, as torch's would
            self.markers.place(self.buckets, zeros=True)

    def drop(self) -> None:
        """The stage is going away: no marker stays in ``p.grad``."""
        self.markers.drop()

    def gradient_tensors(self) -> list[torch.Tensor]:
        shards = grad_shards(self.buckets)
        return shards + list(self.reduce_buffers.values()) + list(self.buffers_in_flight.values())
