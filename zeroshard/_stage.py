"""What stages 1 and 2 share: gradient-ready hooks, one launch order, the end-of-backward flush.

A stage module subclasses ``ShardedStage`` and decides only where gradients live
(the ``collect`` / ``fill_missing`` / ``launch`` / ``finalize`` methods); the order
in which collectives are issued is fixed here, once, for every stage.

Note [launch order]:
    Every rank must issue the same collectives in the same order, or they hang.
    Backward may finish parameters in a different order on different ranks (and a
    data-dependent branch may leave a parameter without gradient on one rank only),
    so buckets never launch in the order they become ready. They launch in the
    fixed list order of ``self.buckets``: a bucket that is ready waits until all
    buckets ahead of it have launched. At the end of backward a callback launches
    the buckets still waiting, treating gradients that never arrived as zero. So
    all ranks issue one reduce-scatter per bucket, in list order, every synced
    backward, whatever their data did.

    The list starts in reverse registration order, backward's usual order. A model
    that runs its modules in another order (blocks last to first, a parameter whose
    gradient comes early) would then fill buckets that wait behind one not yet
    ready: gradient memory beyond the one bucket filling and one in flight that
    stage 2 promises, up to every bucket at once. So the first synced backward
    records the order in which buckets become ready, the ranks compare their records
    at its end (one all-reduce of two numbers per bucket), and if all recorded the
    same order the list takes it, buckets that were never ready last (``_adopt_ready_order``).
    Ranks whose data runs other parameters keep the list as it was. Stage 3 launches
    at the steps of its backward walk instead, so there the list is sorted by when
    each bucket is due in the walk (Note [one order] in stage3.py).

Note [end of backward]:
    The end-of-backward callback is queued (``queue_callback``) from a hook on the
    model's forward outputs, which fires at the start of every backward that goes
    through the model, even on a rank where no parameter receives a gradient. A
    parameter hook queues it too, for a backward that does not start at the
    model's outputs. Queued from the outer backward, the callback runs after it,
    not after a nested backward such as reentrant activation checkpointing's.

Note [late gradients]:
    Reentrant activation checkpointing runs a nested backward per checkpointed
    call, so a parameter used in two such calls (a block run twice, or two
    forwards before one backward) gets gradient twice in one backward, the second
    time after its bucket was reduced. Such a bucket is reduced once more at the
    end of backward: stage 1 reduces its whole buffer again (it holds the total),
    stages 2 and 3 reduce the late part and add it to the shard. At stages 1 and 2
    which buckets are late follows from the model's structure, so every rank issues
    the same extra reduce-scatters; stage 3's backward walk can make a bucket late
    on some ranks only, so there the ranks agree on the set first
    (``late_positions``).

Note [no reference cycles]:
    Hooks live on the model and its parameters, and a stage refers to the model, so
    a hook holding its stage strongly would make a reference cycle (model -> hook ->
    stage -> model) that only the garbage collector frees: often during interpreter
    teardown, after ``destroy_process_group()``, with the process group and buffers
    still alive. So every hook reaches its stage through a weak reference
    (``WeakHook``): when the last ``ZeroOptimizer`` reference goes, the stage and
    everything it holds are freed at once, and its hooks are removed with it.

Note [non-finite gradients]:
    With fp16 compute (``MixedPrecision(param_dtype=torch.float16)``, or a forward
    under fp16 autocast) gradients can overflow, and loss scaling skips the step
    when one does. A reduce-scatter carries an inf only to the rank that owns the
    element, so ``torch.amp.GradScaler``, which checks each rank's own gradient
    shards, would skip the step on that rank alone: the ranks would then disagree
    on the parameters, the loss scale and which collectives come next. So after
    such a backward the ranks all-reduce one flag (4 bytes), and if any rank holds
    a non-finite gradient, every rank fills its gradient shards with NaN: every
    rank's check then finds it, and all ranks skip the step and lower the scale.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten

from . import _comm
from ._bucket import FlatBucket
from .mixed_precision import MASTER_DTYPE, MixedPrecision, fp16_compute


# Collectives a stage has launched and not yet waited for, at most: one waited for while
# the next runs. Each holds its input (and on gloo the collective's own temporaries).
REDUCTIONS_IN_FLIGHT = 2
GATHERS_IN_FLIGHT = 2


class WeakHook:
    """A hook calling ``method(*leading, *hook_args)`` that holds ``method``'s object
    weakly (Note [no reference cycles]); once that object is gone it does nothing.

    A copy of the module or parameter it sits on (``copy.deepcopy``: an EMA model,
    ``AveragedModel``; pickling: ``torch.save(model)``) gets an inert hook instead:
    the copy is an ordinary module, not a second way into this stage that would
    issue collectives on the ranks that use the copy only.
    """

    def __init__(self, method, *leading) -> None:
        self._target = weakref.WeakMethod(method)
        self._leading = leading

    def __call__(self, *args, **kwargs):
        bound = self._target()
        return None if bound is None else bound(*self._leading, *args, **kwargs)

    def __deepcopy__(self, memo) -> InertHook:
        return InertHook()

    def __reduce__(self):
        return InertHook, ()


class InertHook:
    """What a copy of a ``WeakHook`` becomes: a hook that does nothing."""

    def __call__(self, *args, **kwargs) -> None:
        return None


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class TrainingState(enum.Enum):
    IDLE = "idle"
    BACKWARD = "backward"  # the end-of-backward callback is queued


class ShardedStage:
    """Buckets of trainable parameters whose gradients are reduce-scattered into shards."""

    stage: int  # set by each subclass

    def __init__(self, model: nn.Module, buckets: Sequence[FlatBucket], group,
                 stats: _comm.CommStats, policy: MixedPrecision | None = None) -> None:
        self.model = model
        self.buckets = list(buckets)
        self.group = group
        self.world_size = group.size  # every rank, over every replica (a _ranks.Ranks)
        self.stats = stats
        self.policy = policy
        # Gradients are reduced in the policy's reduce dtype (else the parameters' own).
        # An fp16 gradient shard is kept in fp32, where loss scaling can unscale it.
        self.reduce_dtype = policy.gradient_reduce_dtype if policy is not None else None
        self.grad_dtype = MASTER_DTYPE if self.reduce_dtype == torch.float16 else self.reduce_dtype
        self._check_non_finite = False  # Note [non-finite gradients]
        self.label = f"stage{self.stage}"
        self.require_sync = True  # False inside ZeroOptimizer.no_sync()
        self.summoned = 0  # depth of ZeroOptimizer.summon_full_params() blocks
        self.state = TrainingState.IDLE
        self._next_launch = 0  # index of the first bucket not yet launched this backward
        # (bucket, work, output shard, input to free once done or None), in launch order
        self._in_flight: list[tuple[FlatBucket, object, torch.Tensor, torch.Tensor | None]] = []
        self._position = {id(bucket): i for i, bucket in enumerate(self.buckets)}
        self._ready_order: list[int] | None = []  # Note [launch order]: until adopted
        self._late: set[int] = set()  # positions of buckets that got gradient after launching
        self._handles = [model.register_forward_hook(WeakHook(self._arm_backward_end))]
        for bucket in self.buckets:
            for index, param in enumerate(bucket.params):
                self._handles.append(param.register_post_accumulate_grad_hook(
                    WeakHook(self._on_gradient, bucket, index)))
        # Note [no reference cycles]: a stage that goes away takes its hooks with it.
        weakref.finalize(self, _remove_handles, self._handles).atexit = False

    # -- what a stage decides ---------------------------------------------------------

    def collect(self, bucket: FlatBucket, index: int) -> None:
        """Parameter ``index`` of ``bucket`` holds its accumulated gradient in ``.grad``."""
        raise NotImplementedError

    def fill_missing(self, bucket: FlatBucket, index: int) -> None:
        """Backward ended without a gradient for this parameter; its share is what .grad holds."""
        raise NotImplementedError

    def launch(self, bucket: FlatBucket) -> tuple[object, torch.Tensor, torch.Tensor | None]:
        """Start the bucket's reduce-scatter; return ``reduce_scatter``'s triple."""
        raise NotImplementedError

    def finalize(self, bucket: FlatBucket, reduced: torch.Tensor) -> None:
        """The reduce-scatter into ``reduced`` has completed."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def before_backward(self) -> None:
        """A backward begins, before any gradient accumulates (a hook for stages 2 and 3)."""

    def after_backward(self) -> None:
        """A synced backward has ended and its gradients are reduced (stages 2 and 3)."""

    def claim_gradients(self) -> None:
        """The gradient shards are about to be used (step, clipping): stages 2 and 3 apply
        what was done to ``p.grad`` since backward (Note [gradient markers])."""

    def is_gradient_marker(self, tensor: torch.Tensor) -> bool:
        return False

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        """Clipping scaled the gradient shards by ``factor`` (stage 1 keeps local gradients
        that the next backward reduces again)."""

    def late_positions(self) -> list[int]:
        """The buckets to reduce once more at the end of a synced backward, in order."""
        return sorted(self._late)

    def after_reductions(self) -> None:
        """Every reduce-scatter of a synced backward has completed (a hook for stage 3)."""

    def gradient_tensors(self) -> list[torch.Tensor]:
        """Every gradient tensor this stage keeps alive, for memory_report()."""
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------

    def _arm_backward_end(self, module, inputs, output) -> None:
        if self.buckets and fp16_compute(self.buckets[0].flat.device, self.policy):
            self._check_non_finite = True
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(WeakHook(self._on_backward_start))

    def _on_backward_start(self, grad: torch.Tensor) -> None:
        if self.state is TrainingState.IDLE:
            self.before_backward()
            self.state = TrainingState.BACKWARD
            Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_gradient(self, bucket: FlatBucket, index: int, param: nn.Parameter) -> None:
        self._on_backward_start(param.grad)
        self.collect(bucket, index)
        if self.require_sync:
            self._mark_ready(bucket, index)

    def _mark_ready(self, bucket: FlatBucket, index: int) -> None:
        if self._position[id(bucket)] < self._next_launch:
            self._late.add(self._position[id(bucket)])  # Note [late gradients]
            return
        bucket.ready.add(index)
        if self._ready_order is not None and bucket.all_ready:
            self._ready_order.append(self._position[id(bucket)])
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Note [launch order]: launch every bucket at the front of the list that is ready."""
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].all_ready:
            self._launch_next()

    def _launch_front(self, count: int) -> None:
        """Launch the list's buckets up to position ``count``, ready or not: a gradient
        that never came counts as zero (what ``.grad`` holds), and one that comes later
        is late (Note [late gradients])."""
        while self._next_launch < count:
            bucket = self.buckets[self._next_launch]
            for index in range(len(bucket.params)):
                if index not in bucket.ready:
                    self.fill_missing(bucket, index)
                    bucket.ready.add(index)
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self._next_launch]
        self._next_launch += 1
        if len(self._in_flight) >= REDUCTIONS_IN_FLIGHT:
            self._finish_oldest()  # its inputs and temporaries go before the next one's come
        self._in_flight.append((bucket, *self.launch(bucket)))

    def _on_backward_end(self) -> None:
        """Note [end of backward]: flush buckets that are still waiting, then wait for all."""
        if self.require_sync:
            self._launch_front(len(self.buckets))
            self.wait_in_flight()
            for position in self.late_positions():  # Note [late gradients]
                bucket = self.buckets[position]
                self._in_flight.append((bucket, *self.launch(bucket)))
                self.wait_in_flight()
            self.after_reductions()
            if self._check_non_finite:
                self._spread_non_finite()
                self._check_non_finite = False
            self.after_backward()
            if self._ready_order is not None:
                self._adopt_ready_order()
        self._late.clear()
        for bucket in self.buckets:
            bucket.ready.clear()
        self._next_launch = 0
        self.state = TrainingState.IDLE

    def _adopt_ready_order(self) -> None:
        """Note [launch order]: launch from now on in the order the first synced backward
        made buckets ready, if every rank recorded the same one: the ranks compare each
        bucket's place in the record (-1: never ready) in one all-reduce."""
        order, self._ready_order = list(dict.fromkeys(self._ready_order)), None
        if not self.buckets:
            return
        if self.world_size > 1:
            places = torch.full((len(self.buckets),), -1.0, device=self.buckets[0].flat.device)
            for place, position in enumerate(order):
                places[position] = place
            highest, lowest = _comm.extremes(places, group=self.group, stats=self.stats,
                                             label=self.label)
            if not torch.equal(highest, lowest):
                return
        self.launch_in_order(order)

    def launch_in_order(self, order: list[int]) -> None:
        """Launch the buckets now at positions ``order`` first, in that order, then the
        others as they are (between backwards: nothing is in flight)."""
        chosen = set(order)
        rest = [position for position in range(len(self.buckets)) if position not in chosen]
        permutation = order + rest  # new position -> old position
        if permutation != list(range(len(self.buckets))):
            self.buckets = [self.buckets[old] for old in permutation]
            self._position = {id(bucket): i for i, bucket in enumerate(self.buckets)}
            self.reorder(permutation)

    def reorder(self, permutation: list[int]) -> None:
        """The launch order changed (``self.buckets[i]`` was at ``permutation[i]``): a
        stage keeping per-position state follows."""

    def _spread_non_finite(self) -> None:
        """Note [non-finite gradients]: one rank's inf or NaN makes every rank's shards NaN."""
        shards = [b.grad_shard for b in self.buckets if b.grad_shard is not None]
        device = self.buckets[0].flat.device
        found = torch.zeros((), dtype=torch.float32, device=device)
        for shard in shards:
            found = torch.maximum(found, (~torch.isfinite(shard)).any().float())
        _comm.all_reduce(found, group=self.group, stats=self.stats, label=self.label,
                         op=dist.ReduceOp.MAX)
        if found.item():
            for shard in shards:
                shard.fill_(float("nan"))

    def reduce_dtype_of(self, bucket: FlatBucket) -> torch.dtype:
        """The policy's reduce dtype; a full-precision bucket (Note [full-precision
        modules] in mixed_precision.py), and any bucket without a policy, its own."""
        if self.reduce_dtype is None or bucket.full_precision:
            return bucket.flat.dtype
        return self.reduce_dtype

    def as_gradient_shard(self, bucket: FlatBucket, reduced: torch.Tensor) -> torch.Tensor:
        """The reduce-scatter's output in the dtype gradient shards are kept in."""
        if self.grad_dtype is None or bucket.full_precision or reduced.dtype == self.grad_dtype:
            return reduced
        return reduced.to(self.grad_dtype)

    def wait_in_flight(self) -> None:
        """Wait for launched reduce-scatters and hand their results to the stage (idempotent)."""
        while self._in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        bucket, work, reduced, consumed = self._in_flight.pop(0)
        _comm.wait(work)
        if consumed is not None:  # its work handle outlives it (Note [finished work])
            _comm.release([consumed])
        self.finalize(bucket, reduced)

    # -- after the optimizer step -----------------------------------------------------

    def after_step(self) -> None:
        """The inner optimizer has updated the shards: make the parameters follow."""
        self.gather_params()
        for bucket in self.buckets:
            bucket.mark_clean()

    def unshard(self) -> None:
        """Make every parameter hold its full value for good (``close()``): at stages 1
        and 2 they always do."""

    def parameter_tensors(self) -> list[torch.Tensor]:
        """Parameter storage beyond the model's own parameters, for memory_report()."""
        return []

    def master_tensors(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps, for memory_report()."""
        return [b.master for b in self.buckets]

    @contextlib.contextmanager
    def summon_full_params(self):
        """Stages 1 and 2 keep parameters whole, so nothing is gathered; with mixed
        precision, writes made inside are copied into the fp32 masters on exit."""
        try:
            yield
        finally:
            with torch.no_grad():
                for bucket in self.buckets:
                    bucket.absorb_outside_writes()

    def reading_structure(self):
        """``model.state_dict(keep_vars=True)`` inside reads names and objects, not values
        (the full-state export fills in the values itself). Stage 3 allows it while sharded."""
        return contextlib.nullcontext()

    def gather_params(self) -> None:
        """All-gather each bucket's updated shard into its flat buffer (the parameters), in
        forward order (the launch order reversed), at most GATHERS_IN_FLIGHT at once: a
        collective's temporaries (Note [collectives on gloo]) stay a bucket's, not the
        model's."""
        in_flight: collections.deque = collections.deque()
        for bucket in reversed(self.buckets):
            if len(in_flight) == GATHERS_IN_FLIGHT:
                _comm.wait(in_flight.popleft())
            in_flight.append(_comm.all_gather(bucket.flat, bucket.shard, group=self.group,
                                              stats=self.stats, label=self.label, async_op=True))
        _comm.wait_all(in_flight)

    def reduce_scatter(self, bucket: FlatBucket, flat_grad: torch.Tensor, consumable: bool):
        """Average ``flat_grad`` over ranks; this rank's shard lands in a new tensor.

        ``flat_grad`` is cast to the reduce dtype first. In fp16 it is divided by the
        world size first and then summed, so that the sum cannot overflow; that
        division happens in place only if ``consumable`` (the caller is done with it).
        Returns (work, output shard, consumed): ``consumed`` is the tensor reduced if
        nobody needs it afterwards (``flat_grad`` if consumable, else a cast or divided
        copy, else None); ``wait_in_flight`` frees its memory once the work is done.
        """
        dtype = self.reduce_dtype_of(bucket)
        if flat_grad.dtype != dtype:
            flat_grad, consumable = flat_grad.to(dtype), True
        op = dist.ReduceOp.AVG
        if dtype == torch.float16 and self.world_size > 1:
            flat_grad = flat_grad.div_(self.world_size) if consumable else flat_grad / self.world_size
            consumable, op = True, dist.ReduceOp.SUM
        reduced = torch.empty(bucket.shard.numel(), dtype=dtype, device=flat_grad.device)
        work = _comm.reduce_scatter(reduced, flat_grad, group=self.group, stats=self.stats,
                                    label=self.label, op=op, async_op=True,
                                    input_is_scratch=consumable)
        return work, reduced, flat_grad if consumable else None

    def remove_hooks(self) -> None:
        _remove_handles(self._handles)
