"""The gradient reducer: ready marks, one launch order, the end of backward.

Every stage reduces gradients the same way; what differs is where they live, which
the stage gives the reducer as its store (``FullGradients``, stage 1: full buffers;
``ShardedGradients``, stages 2 and 3: shards). Stage 3 also gives it its unit
gatherer (``gatherer``), whose backward walk decides when reductions launch (Note [one
order] in stage3.py). The order in which collectives are issued is fixed here, once.

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
    at its end (one all-reduce of two numbers per bucket, which also carries Note
    [late gradients]'s flags), and if all recorded the same order the list takes it,
    buckets that were never ready last (``_compare_late_and_order``).
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
    ``_on_backward_end`` is the whole sequence, in one place: finish the walk
    (stage 3), flush the waiting buckets, wait, agree on the late ones across
    ranks, reduce those again, install what was held, check for non-finite values.

Note [a backward that raised]:
    A backward can raise before it ends: a hook or a module's backward raises, the
    device runs out of memory, and a loop catches it to skip the batch (fairseq's way
    with out-of-memory errors). The engine then never runs the end-of-backward callback,
    so the stage stayed in its backward: some buckets reduced, others waiting, stage 3's
    units gathered. The next backward carried on from there with no error, and
    skipping the batch gave parameters 0.1 from skipping it under DDP at stages 2 and 3
    (stage 1 raised a misleading error at the next step); DDP itself refuses the next
    forward. Now ``opt.zero_grad()`` ends such a backward as the callback would have
    (gradients that never came count as zero, so every rank issues the same collectives,
    even where the ranks raised at different points of it), and drops its gradients: the batch is
    skipped, as DDP skips it with zeroed gradients (one that began inside ``no_sync()``
    ends as inside it, with no reduction); ``opt.close()`` ends it too. Before that,
    whatever would issue a collective refuses, naming ``opt.zero_grad()``: a step,
    clipping, a forward of the model or of a stage-3 unit, ``summon_full_params()``,
    full state dicts and checkpoints (ranks that raised at different points have
    launched different reductions, which a collective would pair up wrongly: hangs, and
    a reviewer's probe read parameters 0.73 off inside ``summon_full_params()``). The
    orders the abandoned backward recorded are not adopted (Note [launch order]; at
    stage 3, Note [recorded order] in _walk.py): the next whole one records afresh.
    Ranks that did not all raise (out of memory on one), or of which some raised
    before the model's backward began (at the loss) and some inside it, are left in
    different collectives, as under DDP.

Note [late gradients]:
    Reentrant activation checkpointing runs a nested backward per checkpointed
    call, so a parameter used in two such calls (a block run twice, or two
    forwards before one backward) gets gradient twice in one backward, the second
    time after its bucket was reduced. Such a bucket is reduced once more at the
    end of backward: stage 1 reduces its whole buffer again (it holds the total),
    stages 2 and 3 reduce the late part and add it to the shard. Every rank must
    issue the same extra reduce-scatters, and which buckets are late can differ
    between ranks: stage 3's backward walk can make a bucket late on some ranks
    only, and a block whose repeats depend on the data (a shared block run twice on
    one rank, once on another) does so at any stage. A helper's probe of that hung
    stages 1 and 2: one rank in the extra reduce-scatter, the other past it. So the
    ranks agree on the set first, in one all-reduce (MAX) of a flag per bucket: at
    stage 3 after every synced backward (``UnitGatherer.agree_on_late``); at stages 1
    and 2 in the first synced backward, folded into the comparison of launch orders
    (Note [launch order]), and after every synced backward from then on if some
    rank's first backward ran a nested one (a gradient came in another graph task
    than the backward's own: reentrant checkpointing). Not agreed: nested backwards
    that no rank ran before its first synced backward ended, and that make buckets
    late on some ranks only.

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
    A GradScaler can also run where the hooks see no fp16 forward: over fp32 or
    bf16 compute, or under an autocast that wraps ``model.forward`` itself (the way
    Accelerate, and so HF Trainer with fp16, applies it): an inf on one rank hung
    stages 1 and 2 (one rank skipped the step, the others waited in its all-gather)
    and left stage 3's ranks with different loss scales (a helper's probes). So
    GradScaler's check itself, ``torch._amp_foreach_non_finite_check_and_unscale_``
    over the param groups' gradient shards (Note [a norm of a shard] in
    _gradient_shards.py), all-reduces its ``found_inf`` (MAX, 4 bytes), unless this
    backward's shards already carry the finding. Every rank holds a shard of every
    bucket, so every rank makes the same checks, and the same all-reduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten

from . import _comm
from ._bucket import FlatBucket, grad_shards, is_row_major
from ._gradient_sums import InPlaceSums
from ._hooks import LoopSwitches, Phase, WeakHook
from ._reduce_slots import ReduceSlots
from ._transforms import inside_a_gradient_transform
from .mixed_precision import GradientDtypes, MixedPrecision, fp16_compute


# Note [reductions in flight]:
#     A reduction's input stays alive until the reduction is waited for, so the number
#     in flight bounds backward's gradient memory, and each launch waits for the oldest
#     once the store's ``reductions_in_flight`` are running. The wait comes at the next
#     launch, not earlier: the reduction overlaps the whole backward of the next bucket.
#     Stage 1 reduces its persistent buffers, of which each reduction in flight holds a
#     copy (Note [collectives on gloo]): two in flight, two copies. Stages 2 and 3 reduce
#     a buffer the next bucket's gradients do not fill, so one in flight, while the next
#     bucket fills its own: two buffers. Either way at most two buckets' worth (stage
#     1's copies on CPU: two buffers reused, Note [reduce slots] in _reduce_slots.py).


def abandoned_backward_refusal(action: str) -> RuntimeError:
    """Note [a backward that raised]: the error for ``action`` before ``opt.zero_grad()``."""
    return RuntimeError(
        f"zeroshard: {action} after a backward that raised before it ended (an error in a "
        "hook or a module's backward, out of memory, caught): some of its gradients were "
        "reduced across ranks, others never came. Call opt.zero_grad() to drop them on every "
        "rank (model.zero_grad() is not enough) and go on with the next batch, which skips "
        "this one")


class GradientReducer:
    """Reduce-scatters the gradients of ``buckets`` (trainable) into ``store``."""

    def __init__(self, model: nn.Module, buckets: Sequence[FlatBucket], store, group,
                 stats: _comm.CommStats, label: str, dtypes: GradientDtypes,
                 policy: MixedPrecision | None, switches: LoopSwitches, handles: list,
                 record_ready_order: bool = True) -> None:
        self.buckets = list(buckets)  # the launch list (Note [launch order])
        self.store = store
        self.slots: ReduceSlots | None = None  # stage 1's, set with its store (Note [reduce slots])
        self.gatherer = None  # stage 3's UnitGatherer, set once it is built
        # stages 1 and 2: refuses parameters whose memory was replaced (Note [memory
        # replaced inside a forward] in _stage.py)
        self.at_backward_start = None
        self.group = group
        self.world_size = group.size  # every rank, over every replica (a _ranks.Ranks)
        self.stats = stats
        self.label = label
        self.dtypes = dtypes
        self.policy = policy
        self.switches = switches
        self.next_launch = 0  # index of the first bucket not yet launched this backward
        # (bucket, work, output shard, input to free once done or None), in launch order
        self._in_flight: list[tuple[FlatBucket, object, torch.Tensor, torch.Tensor | None]] = []
        self._position = {id(bucket): i for i, bucket in enumerate(self.buckets)}
        # Note [launch order]: positions as they became ready, until adopted (or never)
        self._ready_order: list[int] | None = [] if record_ready_order else None
        self.late: set[int] = set()  # positions of buckets that got gradient after launching
        self._check_non_finite = False  # Note [non-finite gradients]
        self._non_finite_spread = False  # ... and this backward's shards carry it
        # Note [late gradients]: stages 1-2; the graph task of the backward running, whether
        # a gradient came in another (nested) one, and whether the ranks agree on late
        # buckets after every synced backward
        self._graph_task: int | None = None
        self._began_synced = True  # the backward running began outside no_sync()
        self._nested_backward = False
        self._late_agreed_each_backward = False
        # The last backward to accumulate into the parameters ran inside no_sync():
        # what it accumulated is this rank's alone until a synced backward reduces it
        # (Stage.refuse_local_gradients). A torch.autograd.grad(loss, inputs) call
        # accumulates nothing and leaves it as it was.
        self.local_only = False
        self._local_gradient_came = False  # in this backward, inside no_sync()
        handles.append(model.register_forward_hook(WeakHook(self._arm_backward_end)))
        # Note [after the user's gradient hooks]: (bucket, index) -> (the parameter's
        # accumulator node, kept alive here, and the handle of the hook on it)
        self._accumulators: dict[tuple[FlatBucket, int], tuple[object, object]] = {}
        handles.append(_HooksOnAccumulators(self._accumulators))
        for bucket in self.buckets:
            bucket.agree_on_non_finite = WeakHook(self.agree_on_non_finite)
            for index in range(len(bucket.params)):
                self._hook_accumulator(bucket, index)
        self._in_place_sums = InPlaceSums(  # Note [contributions summed in place]
            node for (bucket, index), (node, _) in self._accumulators.items()
            if is_row_major(bucket.orders[index]))

    def _hook_accumulator(self, bucket: FlatBucket, index: int):
        """Hook the accumulator node of ``bucket``'s parameter ``index``; the node."""
        node = _gradient_accumulator(bucket.params[index])
        handle = node.register_hook(WeakHook(self._on_gradient, bucket, index))
        self._accumulators[(bucket, index)] = (node, handle)
        return node

    def hook_new_accumulators(self) -> None:
        """Note [a new accumulator after a change of dtype]:
            Torch gives a parameter a new accumulator node when its ``.data`` is set to
            another dtype or device; the old node, hooked here, then runs only for
            graphs built before.
            ``summon_full_params(full_precision=True)`` does that twice (the fp32
            masters in, the casts back): from then on no gradient reached the reducer
            as it came. Each waited in ``.grad`` at full size until the backward walk
            or backward's end took it (stages 2 and 3 held every full gradient at
            once), and at stage 3 no unit was released as its gradients came, silently
            (found while agreeing on which units got a gradient, Note [ran on no rank]
            in stage3.py). So after such a block every parameter whose node changed
            is hooked again. The old node keeps its hook: a graph built before the
            block (a forward, the block, then its backward) accumulates through it,
            and those gradients must reach the reducer too (with the hook removed,
            stage 3 took them for none and stepped no unit: a reviewer's probe). Only
            the reference to it goes, so it goes with the last graph using it."""
        for (bucket, index), (node, _) in list(self._accumulators.items()):
            current = _gradient_accumulator(bucket.params[index])
            if current is not node:
                self._in_place_sums.replace(node, self._hook_accumulator(bucket, index))

    # -- backward's hooks -------------------------------------------------------------

    def _arm_backward_end(self, module, inputs, output) -> None:
        if inside_a_gradient_transform():  # Note [gradient transforms]
            return
        if self.buckets and fp16_compute(self.buckets[0].flat.device, self.policy):
            self._check_non_finite = True
        tensors = [t for t in tree_flatten(output)[0]
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        for tensor in tensors:
            tensor.register_hook(WeakHook(self.on_backward_start))
        self._in_place_sums.arm(tensors)

    def on_backward_start(self, grad: torch.Tensor | None = None) -> None:
        if self.switches.phase is not Phase.BACKWARD:
            if self.at_backward_start is not None:  # before anything starts: it may refuse
                self.at_backward_start()
            if self.gatherer is not None:
                self.gatherer.begin_backward()
            self.store.before_backward()
            self._non_finite_spread = False
            self.switches.enter(Phase.BACKWARD)
            self._began_synced = self.switches.require_sync  # Note [a backward that raised]
            self._graph_task = torch._C._current_graph_task_id()
            Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_gradient(self, bucket: FlatBucket, index: int, grad_inputs, grad_outputs) -> None:
        """The accumulator node's post-hook (Note [after the user's gradient hooks]);
        ``grad_outputs`` holds the gradient it accumulated, which may be ``.grad``."""
        param = bucket.params[index]
        if torch.is_grad_enabled():  # the engine runs with create_graph=True
            # Every rank runs the same backward, and this is its first gradient, before
            # any reduction: every rank raises here, none is left in a collective.
            raise RuntimeError(
                f"zeroshard: {bucket.param_names[index]} got a gradient in a backward with "
                "create_graph=True (loss.backward(create_graph=True), a double backward "
                "through the parameters' gradients); zeroshard reduces gradients across "
                "ranks as plain tensors, so no stage can keep their graph. A penalty on "
                "the inputs' gradient works at stages 1 and 2: (g,) = torch.autograd.grad("
                "loss, inputs, create_graph=True), then (loss + penalty(g)).backward()")
        self.on_backward_start(param.grad)
        if torch._C._current_graph_task_id() != self._graph_task:
            self._nested_backward = True  # Note [late gradients]
        self.store.collect(bucket, index, launched=self.launched(bucket), engine_holds=grad_outputs)
        if self.gatherer is not None:
            self.gatherer.post_backward(bucket, index)
        if self.switches.require_sync:
            self.mark_ready(bucket, index)
        else:
            self._local_gradient_came = True

    def launched(self, bucket: FlatBucket) -> bool:
        """The bucket's reduction was launched in this backward."""
        return self._position[id(bucket)] < self.next_launch

    def mark_ready(self, bucket: FlatBucket, index: int) -> None:
        if self.launched(bucket):
            self.late.add(self._position[id(bucket)])  # Note [late gradients]
            return
        bucket.ready.add(index)
        if self._ready_order is not None and bucket.all_ready:
            self._ready_order.append(self._position[id(bucket)])
        if self.gatherer is None or self.gatherer.launches_as_ready:
            self._launch_ready()

    # -- launching --------------------------------------------------------------------

    def _launch_ready(self) -> None:
        """Note [launch order]: launch every bucket at the front of the list that is ready."""
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].all_ready:
            self._launch_next()

    def launch_front(self, count: int) -> None:
        """Launch the list's buckets up to position ``count``, ready or not: a gradient
        that never came counts as zero (what ``.grad`` holds), and one that comes later
        is late (Note [late gradients])."""
        while self.next_launch < count:
            bucket = self.buckets[self.next_launch]
            for index in range(len(bucket.params)):
                if index not in bucket.ready:
                    self.store.fill_missing(bucket, index)
                    bucket.ready.add(index)
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self.next_launch]
        self.next_launch += 1
        if len(self._in_flight) >= self.store.reductions_in_flight:  # Note [reductions in flight]
            self._finish_oldest()  # its inputs and temporaries go before the next one's come
        self._launch(bucket)
        if self.slots is not None and self.slots.wanted:  # Note [reduce slots]
            remaining = itertools.islice(self.buckets, self.next_launch, None)
            if not any(map(self.slots.takes, remaining)):
                self.slots.none_wanted()

    def _launch(self, bucket: FlatBucket) -> None:
        flat_grad, consumable = self.store.launch(bucket)
        self._in_flight.append((bucket, *self._reduce_scatter(bucket, flat_grad, consumable)))

    def _reduce_scatter(self, bucket: FlatBucket, flat_grad: torch.Tensor, consumable: bool):
        """Average ``flat_grad`` over ranks; this rank's shard lands in a new tensor.

        ``flat_grad`` is cast to the reduce dtype first; if it needs no cast and the
        caller keeps it (not ``consumable``), it is copied on a slot if there is one
        (Note [reduce slots]). In fp16 (or bf16: ``_divided_first``) it is divided by
        the world size first and then summed; that division happens in place only if
        ``consumable`` (the caller is done with it). Returns (work, output shard,
        consumed): ``consumed`` is the tensor reduced if nobody needs it afterwards
        (``flat_grad`` if consumable, else a copy: cast, on a slot or divided; else None);
        ``wait_in_flight`` frees its memory once the work is done.
        """
        dtype = self.dtypes.reduce_dtype(bucket)
        if flat_grad.dtype != dtype:
            flat_grad, consumable = flat_grad.to(dtype), True
        elif not consumable and self.slots is not None:
            copy = self.slots.take(bucket)
            if copy is not None:
                flat_grad, consumable = copy.copy_(flat_grad), True
        op = dist.ReduceOp.AVG
        if _divided_first(dtype, self.world_size):
            flat_grad = flat_grad.div_(self.world_size) if consumable else flat_grad / self.world_size
            consumable, op = True, dist.ReduceOp.SUM
        reduced = torch.empty(bucket.shard.numel(), dtype=dtype, device=flat_grad.device)
        work = _comm.reduce_scatter(reduced, flat_grad, group=self.group, stats=self.stats,
                                    label=self.label, op=op, async_op=True,
                                    input_is_scratch=consumable)
        return work, reduced, flat_grad if consumable else None

    def wait_in_flight(self) -> None:
        """Wait for launched reduce-scatters and hand their results to the store (idempotent)."""
        while self._in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        bucket, work, reduced, consumed = self._in_flight.pop(0)
        _comm.wait(work)
        on_slot = self.slots is not None and consumed is not None and self.slots.give_back(consumed)
        if consumed is not None and not on_slot:
            _comm.release([consumed])  # its work handle outlives it (Note [finished work])
        self.store.landed(bucket)
        if self.gatherer is None or not self.gatherer.holds(bucket, reduced):
            self.store.install(bucket, reduced)

    # -- the end of backward ----------------------------------------------------------

    @property
    def backward_abandoned(self) -> bool:
        """Note [a backward that raised]: the stage is in a backward that no longer runs
        (its callback, queued at its start, never ran); no hook of the engine asks."""
        return self.switches.phase is Phase.BACKWARD and torch._C._current_graph_task_id() == -1

    def end_abandoned_backward(self) -> None:
        """Note [a backward that raised]: end the backward abandoned, if there is one, as
        its callback would have, inside or outside ``no_sync()`` as it began."""
        if not self.backward_abandoned:
            return
        recording = self._ready_order is not None
        now_synced, self.switches.require_sync = self.switches.require_sync, self._began_synced
        try:
            self._on_backward_end(abandoned=True)
        finally:
            self.switches.require_sync = now_synced
        if recording:
            self._ready_order = []

    def _on_backward_end(self, abandoned: bool = False) -> None:
        """Note [end of backward]: the whole sequence, in order."""
        synced = self.switches.require_sync
        if self.gatherer is not None:
            self.gatherer.finish_walk()  # gathers first: other ranks may be waiting for them
        if synced:
            self.launch_front(len(self.buckets))  # the buckets still waiting
            self.wait_in_flight()
            if self.gatherer is not None:
                late, adopted = self.gatherer.agree_on_late(self.late), None
            else:
                late, adopted = self._compare_late_and_order()
            for position in late:  # Note [late gradients]
                self._launch(self.buckets[position])
                self.wait_in_flight()
            if self.gatherer is not None:
                self.gatherer.install_held()
            for bucket in self.buckets:  # Note [a gradient cleared before the step]
                if self.gatherer is None or not self.gatherer.got_no_gradient_anywhere(bucket):
                    bucket.cleared.clear()
            if self._check_non_finite:
                self._spread_non_finite()
                self._check_non_finite = False
                self._non_finite_spread = True
            self.store.after_backward()
            if adopted is not None and not abandoned:
                self.launch_in_order(adopted)
        if synced or self._local_gradient_came:
            self.local_only = not synced
        self._local_gradient_came = False
        self.late.clear()
        if self.slots is not None:
            self.slots.reset()
        for bucket in self.buckets:
            bucket.ready.clear()
        self.next_launch = 0
        self.switches.enter(Phase.IDLE)
        if self.gatherer is not None:
            self.gatherer.end_backward(whole=not abandoned)

    def _spread_non_finite(self) -> None:
        """Note [non-finite gradients]: one rank's inf or NaN makes every rank's shards NaN."""
        shards = grad_shards(self.buckets)
        device = self.buckets[0].flat.device
        found = torch.zeros((), dtype=torch.float32, device=device)
        for shard in shards:
            found = torch.maximum(found, (~torch.isfinite(shard)).any().float())
        _comm.all_reduce(found, group=self.group, stats=self.stats, label=self.label,
                         op=dist.ReduceOp.MAX)
        if found.item():
            for shard in shards:
                shard.fill_(float("nan"))

    def agree_on_non_finite(self, found_inf: torch.Tensor) -> None:
        """Note [non-finite gradients]: GradScaler has checked this rank's gradient shards
        into ``found_inf``; any rank's finding becomes every rank's."""
        if not self._non_finite_spread:  # (if it was, every rank's shards show it)
            _comm.all_reduce(found_inf, group=self.group, stats=self.stats, label=self.label,
                             op=dist.ReduceOp.MAX)

    def _compare_late_and_order(self) -> tuple[list[int], list[int] | None]:
        """Stages 1 and 2, after a synced backward: the positions of the buckets late on
        some rank (Note [late gradients]), and, after the first, the launch order to
        adopt (Note [launch order]: the order that backward made buckets ready, if every
        rank recorded the same one), or None.

        The first synced backward compares, in one all-reduce (MAX) of the values and
        their negation (``_comm.extremes``), each bucket's place in the record (-1: never
        ready), a late flag per bucket and whether a nested backward ran; later ones
        all-reduce the late flags only if one did on some rank."""
        first = self._ready_order is not None
        order = list(dict.fromkeys(self._ready_order)) if first else None
        self._ready_order = None
        nested, self._nested_backward = self._nested_backward, False
        if self.world_size == 1 or not self.buckets:
            return sorted(self.late), order
        if not first and not self._late_agreed_each_backward:
            return sorted(self.late), None
        n = len(self.buckets)
        device = self.buckets[0].flat.device
        flags = torch.tensor([float(p in self.late) for p in range(n)] + [float(nested)], device=device)
        if first:
            places = torch.full((n,), -1.0, device=device)
            for place, position in enumerate(order):
                places[position] = place
            highest, lowest = _comm.extremes(torch.cat([places, flags]), group=self.group,
                                             stats=self.stats, label=self.label)
            if not torch.equal(highest[:n], lowest[:n]):
                order = None
            flags = highest[n:]
        else:
            _comm.all_reduce(flags, group=self.group, stats=self.stats, label=self.label,
                             op=dist.ReduceOp.MAX)
        values = flags.tolist()
        if first and values[-1] > 0:
            self._late_agreed_each_backward = True
        return [p for p in range(n) if values[p] > 0], order

    def launch_in_order(self, order: list[int]) -> None:
        """Launch the buckets now at positions ``order`` first, in that order, then the
        others as they are (between backwards: nothing is in flight)."""
        chosen = set(order)
        rest = [position for position in range(len(self.buckets)) if position not in chosen]
        permutation = order + rest  # new position -> old position
        if permutation != list(range(len(self.buckets))):
            self.buckets = [self.buckets[old] for old in permutation]
            self._position = {id(bucket): i for i, bucket in enumerate(self.buckets)}

    def position_of(self, bucket: FlatBucket) -> int:
        return self._position[id(bucket)]


class _HooksOnAccumulators:
    """The stage's handle on the reducer's hooks on accumulator nodes, as they are when
    it closes (Note [a new accumulator after a change of dtype])."""

    def __init__(self, accumulators: dict) -> None:
        self._accumulators = accumulators

    def remove(self) -> None:
        for _, handle in self._accumulators.values():
            handle.remove()


def _gradient_accumulator(param: nn.Parameter):
    """Note [after the user's gradient hooks]:
        DDP reduces a gradient after every post-accumulate-grad hook on its parameter,
        whenever the user registered it: its reducer hooks autograd's accumulator node
        (``AccumulateGrad``), whose post-hooks run once the node has accumulated the
        gradient and run the parameter's own hooks. A post-accumulate-grad hook of
        zeroshard's would instead run in registration order among the user's, so a hook
        registered after the optimizer (a gradient logger, a scaling) would find the
        gradient already taken: None at stages 2 and 3, or a gradient still waiting for
        its buffer, and what it changed would reach the reduction for some gradients
        only (silently different numbers from DDP). So zeroshard hooks the accumulator
        node too. The engine creates that node on demand and keeps it only as long as
        something refers to it, so the reducer keeps it (else the hook would go with
        the first graph that used it). Inside ``torch.inference_mode()`` (the end of a
        ``summon_full_params()`` block entered there) no node is made: left for it (Note
        [inference mode] in _inference_mode.py)."""
    with torch.inference_mode(False), torch.enable_grad():
        return param.view_as(param).grad_fn.next_functions[0][0]


def _divided_first(dtype: torch.dtype, world_size: int) -> bool:
    """Whether a gradient is divided by the world size before a summing reduction rather
    than averaged by it: in fp16, so that the sum cannot overflow; in bf16 where the world
    size is not a power of two, since NCCL averages bf16 by multiplying by 1/N rounded
    to bf16 (0.2% large for N = 3; helper-111's reading of NCCL's enqueue.cc), where a
    division rounds each element once, as DDP's does before its sum. A power of two
    divides exactly either way."""
    if world_size == 1:
        return False
    power_of_two = world_size & (world_size - 1) == 0
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not power_of_two)
