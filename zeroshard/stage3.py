"""ZeRO stage 3: stage 2 plus parameters partitioned, gathered per unit on demand.

A stage-3 stage is stage 2's gradient store and the gradient reducer, plus the
``UnitGatherer`` here, which gathers and releases units around their forward and
backward and tells the reducer when each reduction is due (Note [one order]).

At rest a rank holds only its shard of every parameter; the parameters themselves
are views of full buffers whose storage is freed. Around each unit's forward the
unit's buffers are all-gathered and (with ``reshard_after_forward``) freed again;
in backward they are gathered again when the unit's outputs receive their
gradient, and freed once all the unit's parameter gradients are accumulated.
Gradients are handled exactly as in stage 2 (``ShardedGradients``): reduce-scattered into
shards in one fixed bucket order, full gradients freed as their bucket is reduced.

The schedule is Note [gather schedule] in _schedule.py; walking it, how the ranks
learn its order and treat the units a rank skips, is _walk.py (Note [recorded order],
Note [passed over in backward], Note [first-step agreement]); which units ran on no
rank is decided below (Note [ran on no rank]).

Note [one order]:
    Every collective runs on the optimizer's one process group (on a mesh: its shard
    group, and the replicate group for what spans replicas, Note [collectives on a mesh]
    in _comm.py), so every rank must issue the same collectives in the same order (NCCL
    requires it of one communicator; gloo aborts on a mismatch). Gathers follow the walk
    (Note [gather schedule]), but a reduce-scatter launched when a unit's last gradient
    arrives would interleave with them in an order that depends on the data: a rank that
    ran a unit reduces it while computing, one that skipped it when the walk passes it.
    So in a backward walk (with ``reshard_after_forward``) reductions launch only at the
    walk's steps, and each step issues the same collectives whether this rank runs the
    unit or passes over it (``Walk._step``): first the reduce-scatters of the buckets
    due by that point, in list order, then the unit's gather, then the next unit's
    prefetch. A bucket is due at a fixed point of the walk, the same on every rank: once
    as many units have been entered as when its last gradient came in the first
    backward, on the rank where that was latest (agreed with the recorded orders,
    ``Walk.adopt_recorded_orders``); where the ranks recorded different orders, once the
    walk has passed its unit and every unit inside it (``due_when_walked_past``, also
    the first backward's rule; ``ReductionPoints`` in _schedule.py). The list of buckets
    is sorted by that point, so due buckets are at its front. A bucket due before its
    gradient is complete (data that runs units in another order than the first step)
    launches with what it has, and what comes later is reduced again at the end of
    backward (Note [late gradients]), where the ranks agree on which buckets are late;
    the numbers stay right and only the bytes grow. After more than one training forward
    pass, whose backwards interleave, every reduction waits for the end of backward.
    Without resharding, backward walks only if the units were released since the forward
    (a no_grad forward or ``summon_full_params()`` in between, a second backward through
    a retained graph: every rank holds all units or none), and then every reduction
    waits for the end; otherwise it issues no gather (the units stay gathered) and
    reductions launch as their buckets become ready, in list order. Gathers outside the
    walk are avoided where ranks would differ: a unit some rank runs twice is not
    released when its gradients are done (reentrant checkpointing recomputes its second
    run later), nor, after two forwards, a unit the walk passes that ran in one of them
    (the other forward's backward still needs it). As every rank issues the same
    sequence, a rank may wait on any collective it issued (a new reduce buffer waits for
    the reductions in flight): the others issue it too before anything that could wait
    on this rank. ``comm_stats.trace`` records the sequence; the tests compare it across
    ranks for every case they train.

Note [runs before the walk moves on]:
    A unit run again in the same pass must not need a gather that ranks which did not
    run it (or ran it once) would not issue: their collectives would no longer match,
    and gloo aborts (NCCL hangs). So a unit whose forward ends is not released at once
    but when the forward walk next moves on to a later unit, or when the pass ends. A
    unit run twice in a row (a block reused, ALBERT-style), its nested units included,
    runs the second time on what is still gathered, with no collective, whatever other
    ranks run. Parameters held at once do not grow: the unit the walk moves on to was
    prefetched while the finished one computed, and the last unit of the schedule, with
    nothing to move on to, is released at once (what follows it, a model's head and
    loss, is often the forward's peak), or with its caller (Note [the last unit
    released with its caller]). A unit run twice with other units between (a
    shared layer, or a layer of a reused block that is not a unit itself) would be
    released in between; so the ranks note in the first step which units some rank
    entered twice in one pass (``Walk.adopt_recorded_orders``), and from then on those
    stay gathered until the pass ends. In that first step, before anything is known,
    every rank must run such a unit the same number of times (Note [first-step
    agreement] refuses a rank that does not).

Note [the last unit released with its caller]:
    A module may read a unit's parameters right after calling it: peft's DoRA calls
    its base layer, then computes with the base layer's weight. Any unit but the last
    is still gathered there (Note [runs before the walk moves on], Note [another unit's
    parameters saved] in _saved_tensors.py); the last one of the schedule was released
    as its forward ended, so the read computed with the NaN placeholders: refused where
    autograd saved it, with a message that did not fit (the reader held the unit), and
    NaN from the first step where it did not (a reviewer's probe, DoRA over every
    linear layer of a Llama with automatic units fine enough to make the last
    ``down_proj`` a unit). So where the module that holds the last unit is one that
    runs (not the root, whose head and loss follow, nor one with no forward of its own,
    a ``ModuleList``: ``has_no_forward`` in _unit_tree.py), the unit is
    released as that module's forward ends, from a forward hook put on it the first
    time; the pass's end releases it in any case (under torch.compile, which skips the
    hook). The memory this holds is one unit, over what is left of its caller's forward.

Note [run twice from the second step on]:
    After the first step a rank may run a unit more often than the others; a second run
    in a row reuses what is still gathered (Note [runs before the walk moves on]), but
    backward may need the unit once more after its gradients seemed to be in: reentrant
    checkpointing recomputes each run in its own nested backward, and the first of them
    delivers the unit's gradients (so does each forward's when two forwards precede one
    backward). Released then, the unit was gathered again for the next recomputation on
    that rank only, and the ranks hung (non-reentrant checkpointing did so too with two
    forwards). So a unit that training forwards ran more than once under checkpointing
    since the last backward (``UnitRecord.checkpointed_runs``: reentrant checkpointing
    runs it without grad, non-reentrant under its saved-tensor hooks) stays gathered
    until backward has recomputed it as often, or ends; this rank's own counts, so no
    collective, and keeping it changes no other rank's. The cost: with two forwards
    before one backward under reentrant checkpointing (a contrastive pair with
    gradient checkpointing), backward recomputes the second forward's units before the
    first's, so nearly every unit is held between them (the whole model in a
    reviewer's probe, where releasing and gathering again alike on every rank held
    29%). A run that is never recomputed (a checkpointed forward whose output is
    dropped) keeps its unit to the end of backward. Without checkpointing, a unit's
    gradients come in once, after its last use, and it is released then.

    What cannot be kept without knowing it in advance is a unit entered again in the
    forward after it was released: one run again with other units between, a unit
    inside a block run twice (its inner units are released as the walk moves through
    the block), or the schedule's last unit run twice in a row (it is released as soon
    as its forward ends). That gather is outside the recorded schedule, and if some
    rank does not issue it, nothing returns; so the rank warns first, naming the unit
    and the fix: run the repeat in one pass of the first step, on every rank, and every
    unit that repeats stays gathered for each later pass, which may then repeat it any
    number of times.

Note [after the walk's last step]:
    Reductions launch at the walk's steps, and each waits for the one before it (Note
    [reductions in flight] in _reducer.py); after the last step nothing launches until
    the end of backward. So the reduction launched there would keep its input alive
    through the rest of backward: the layers outside every unit but the root, a token
    embedding's backward with its dense gradient (the step's peak on a GPT: 27 MiB of
    a block's gradients more on 4 ranks, where the reduction is not done by then). Once
    the walk has taken its last step, a unit whose gradients are all in waits for the
    reductions in flight. The wait adds no collective on the shard group (on a mesh it
    launches the reductions' all-reduces across replicas, in the order a later wait
    would), so the ranks' order is untouched; it costs the overlap of that reduction
    with what is left of backward.

Note [released once backward has read it]:
    A unit is released in backward once all its gradients are in (``post_backward``),
    but backward may be done reading its parameters long before: a GPT's root unit
    holds the token embedding, which the tied output head reads at the very start of
    backward, and whose own gradient comes at the very end (an embedding's backward
    reads no weight). Kept gathered in between, it was 48 MiB of the 100M GPT's peak at
    stage 3 (a Llama's embedding and head, gigabytes). Backward reads a unit's
    parameters through what its forwards saved (Note [saved tensors] in
    _saved_tensors.py): so each unit counts the views and casts of its parameters its
    forwards saved that backward has not read yet (``Unit.saved_unread``, weakly: a
    graph dropped without backward takes its own). Once the last is read, the unit is
    released at a later hook autograd calls between nodes (the node reading it is done
    by then), with no collective, if nothing else can still read it
    (``_release_read_through``): every gradient it still awaits is an embedding
    weight's; it has no frozen parameter and no hook of the user's on a parameter; no
    other unit's forward saved a view of it; no recomputation has been seen; and none
    is expected in this backward (below).
    Those are what reads parameters behind the saved-tensor hooks' back: a node whose
    custom Function kept a weight on its ``ctx`` (it then gives that weight's gradient,
    which the unit awaits, or the weight is frozen; a reviewer's probe trained NaN), a
    parameter hook folding weight decay into the gradient, a parameter shared with a
    nested unit, and a recomputation in backward (activation checkpointing of
    something that is not a unit). A global forward pre-hook, registered only while a
    backward runs, sees recomputations on the backward's thread; the first backward
    only watches, and after one is seen no unit is released early again (one seen
    first later gathers again, before it computes, what this backward released early:
    a collective of that moment, the same on every rank only if every rank
    recomputes alike). A rank that began to checkpoint after the first step (long
    batches only) met its first recomputation with units released early and gathered
    them again alone, a collective the other ranks never issued (gloo aborted on the
    mismatch; NCCL would hang). So a forward that runs a unit, or a module holding
    parameters, as activation checkpointing runs it (without grad, or under saved-tensor
    hooks other than a unit's) keeps that backward from releasing early
    (``BackwardPass.checkpointed``), on that rank alone: releasing is local, so the
    ranks' collectives stay the same. Modules without parameters have no hook in
    forward: a rank that begins to checkpoint only such modules still gathers again,
    alone. Not seen: a checkpointed function that calls no module and reads an
    embedding weight directly, in a model where no recomputation runs a module; and an
    embedding weight kept on a custom Function's ``ctx`` whose backward runs after the
    unit's last saved view is read.

Note [module backward hooks]:
    A module's full backward hook (``register_full_backward_hook``) runs once the
    gradient of the module's inputs is computed: after its parameters' gradients, so
    after the last of them released its unit. A hook reading the module's weight there
    (a gradient-to-weight monitor) read the placeholders' NaN at every step, and one
    using it to change a gradient trained NaN; one reading the root's tied embedding,
    released early (Note [released once backward has read it]), alike (a helper's
    probes). So a unit whose subtree holds a module with a backward hook or pre-hook,
    as its training forward runs or as the backward begins (torch calls the hooks a
    module's call took, even one removed before the backward: asked only then, the unit
    was released at its last gradient and the hook read NaN), is not released at its
    last gradient but once backward is past its inputs as well (Note [backward past a
    unit's inputs] in _frozen_reads.py: by then every node its forward made has run,
    the hooks' nodes among them), and while any module of the model has one, no unit
    is released early.
    Such a unit was kept to the end of backward: a hook on every block (a gradient-norm
    logger that reads no weight) gathered the whole model there (``python
    benchmarks/compare.py --world-size 2 --module-hooks --methods zeroshard3``, a hook
    that does nothing on each of the 100M GPT's 12 blocks: stage 3's peak 1380 MiB, now
    1056; FSDP1 FULL_SHARD's with the same hooks 1058). Still kept to the end: a unit
    whose forward took no input that requires grad (the root, given token ids), or a
    leaf, or whose inputs were not watched, and every unit under torch's global module
    backward hooks. The hooks of a unit's own module run before the node its backward
    begins with: Note [gathered before a unit's own module hooks] in _module_hooks.py.

    Not seen: a hook that reads the parameters of a unit further on in forward (block
    1's hook reading block 2's weight), whose backward is done by then: it reads NaN
    (a reviewer's probes; it read them gathered before only where that unit had a hook
    of its own, which kept it); so does one reading a unit nested in its own (released
    at its last gradient, before the outer module's post-hook), and one reading a unit
    earlier in forward, not yet gathered for backward or being prefetched (Note [not a
    view while gathering] in _bucket.py: it read the half-filled buffer). A hook on an
    activation (``tensor.register_hook``) that reads a parameter is not seen either: it
    reads NaN once the parameter's unit is released.

Note [stage 3 under torch.compile]:
    A unit's forward hooks gather and release its parameters: collectives, and
    parameters whose ``.data`` moves between a placeholder and the gathered buffer.
    Traced by dynamo (``torch.compile(model)`` traces a module's hooks with its
    forward), the compiled graph took the parameters as the placeholders they were
    while tracing, and later calls failed inductor's stride checks. So the hooks run
    outside the graph (every ``WeakHook`` does: Note [the optimizer under
    torch.compile] in optimizer.py): the model compiles into one graph per stretch
    between unit boundaries, each called with its units gathered.

Note [recomputation]:
    Activation checkpointing runs a unit's forward again during backward. The
    hooks recognise it by the BACKWARD state: they gather as usual but neither
    release (backward is about to use the parameters) nor arm backward hooks.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref

import torch
from torch.utils._pytree import tree_flatten

from . import _agreement, _comm
from ._frozen_reads import FrozenOnContexts, past_inputs, watch_inputs
from ._hooks import EagerOnlyHook, LoopSwitches, Phase, WeakHook, levels_to_the_caller
from ._masters import ShardMasters
from ._module_hooks import GatherBeforeModuleHooks
from ._reducer import GradientReducer, abandoned_backward_refusal
from ._saved_tensors import SavedTensorWatches, may_recompute_in_backward
from ._schedule import forward_and_backward_orders
from ._unit import ShardState, Unit
from ._unit_tree import has_no_forward
from ._walk import Walk
from .mixed_precision import GradientDtypes
from .stage2 import ShardedGradients


def _run_last(hooks: dict, hook_ids: tuple[int, int]) -> None:
    """Note [the unit's forward hook runs last]:
        A forward hook of the user's on a unit's module, registered after the optimizer,
        ran after the unit's own, which may release the unit at once (the schedule's last
        unit) and has closed the unit's watch on saved tensors: a hook that read a weight
        (a log line) read the NaN placeholders, and one that called a submodule (an
        adapter, an extra residual) saved views that backward found freed (torch's
        "setStorage ... storage of size 0"; both a reviewer's probes). So before each
        forward of the unit, its own forward hook moves to the end of the module's hooks
        (an O(1) look at the last key, a move when the user added one): whatever the
        user's hooks compute is the unit's forward, gathered and watched, and the hook
        that arms the unit's backward sees their output. Only the hook that closes the
        watch after an error (Note [a forward that raises]) runs after it.

    Note [a forward that raises]:
        A forward of a unit that raises (a stage-3 refusal, a shape error of the user's,
        caught and gone on from) skips the unit's forward hook, which closes the unit's
        saved-tensor hooks: they stayed on torch's stack until the model's next forward,
        watching whatever the process computed meanwhile, and torch.func refused to run
        under them (found when a test of a refusal ran before a test of a transform in
        one worker). So a second forward hook, which torch calls even when the forward
        raises (``always_call``), closes them; after the unit's own forward hook, which
        closes them on the way that does not raise, it finds nothing to close."""
    last_keys = tuple(itertools.islice(reversed(hooks), len(hook_ids)))
    if last_keys != hook_ids[::-1] and all(i in hooks for i in hook_ids):
        for hook_id in hook_ids:
            hooks.move_to_end(hook_id)


def trainable_buckets(units: list[Unit]):
    """The reducer's first launch order: units from the last to the root (roughly
    backward's order), until Note [one order] sorts them by when the backward walk is
    done with them."""
    return [b for u in reversed(units) for b in u.buckets if b.params[0].requires_grad]


class RecomputationWatch:
    """Note [released once backward has read it]: whether any module's forward has run
    inside a backward (a recomputation), watched by a global forward pre-hook that is
    registered only while a backward runs. A handle of the stage: ``remove()`` at close."""

    def __init__(self, hook) -> None:
        self._hook = hook
        self._handle = None
        self._thread = None  # the thread that began the backward being watched
        self.backwards_ended = 0
        self.seen = False

    @property
    def never_seen(self) -> bool:
        """A whole backward has been watched (the first step's) and none was seen."""
        return self.backwards_ended > 0 and not self.seen

    def start(self) -> None:
        self.remove()  # one left by a backward that raised
        self._thread = threading.get_ident()
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def on_backward_thread(self) -> bool:
        """A module running on another thread meanwhile (a data-loading transform) is not
        a recomputation."""
        return threading.get_ident() == self._thread

    def stop(self, counted: bool = True) -> None:
        """The backward ended; ``counted``: it was watched whole."""
        if self._handle is not None and counted:
            self.backwards_ended += 1
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class UnitGatherer:
    """Gathers and releases stage 3's units around their forward and backward passes,
    walking one schedule on every rank (Note [gather schedule]), and decides for the
    reducer when each bucket's reduction is due (Note [one order])."""


    def __init__(self, model, units: list[Unit], reducer: GradientReducer,
                 store: ShardedGradients, dtypes: GradientDtypes, masters: ShardMasters,
                 switches: LoopSwitches, group, stats, label: str, reshard_after_forward: bool,
                 handles: list) -> None:
        self.reducer = weakref.proxy(reducer)  # it holds this (Note [no reference cycles])
        self.dtypes = dtypes
        self.masters = masters
        self.switches = switches
        self.group = group
        self.stats = stats
        self.label = label
        self.units = units
        self.root = units[0]
        self.reshard_after_forward = reshard_after_forward
        self._unit_of = {id(p): u for u in units for b in u.buckets for p in b.params}
        # Units some rank may skip (the root always runs) that have gradients to reduce:
        # one "got a gradient" flag each is all-reduced after a synced backward
        # (agree_on_late).
        self._flagged = [u for u in units[1:] if u.trainable_ids]
        self._flagged_ids = {id(u) for u in self._flagged}
        # Note [frozen units backward never reads] in _walk.py: with resharding, one
        # "backward may read it" flag each too, for the units with only frozen parameters
        self._frozen = [u for u in units[1:] if u.buckets and not u.trainable_ids
                        ] if reshard_after_forward else []
        self._steps, self._steps_differ = 0, False  # Note [steps on some ranks only]
        self._reading_structure = 0  # inside reading_structure(): state_dict() reads no values
        self._warned_of_views_kept = False  # Note [views taken inside summon_full_params]
        self.device = next((b.flat.device for u in units for b in u.buckets), torch.device("cpu"))
        # Note [gather schedule]: the walk, and the schedules it walks
        self.walk = Walk(units, *forward_and_backward_orders(model, units), self.reducer, store,
                         switches, group, stats, label, self.device, reshard_after_forward)
        unit_modules = {id(unit.module) for unit in units}
        for name, module in model.named_modules():
            owners = {id(self._unit_of[id(p)]): self._unit_of[id(p)]
                      for p in module._parameters.values() if p is not None}
            if owners:
                guard = WeakHook(self._refuse_if_sharded, list(owners.values()))
                handles.append(module.register_state_dict_pre_hook(guard))
                handles.append(module.register_load_state_dict_pre_hook(guard))
                if id(module) not in unit_modules:  # a unit's own hooks gather it
                    handles.append(module.register_forward_pre_hook(EagerOnlyHook(
                        self._refuse_outside_its_unit, name, list(owners.values())), prepend=True))
        self._gathered_storages: dict[int, Unit] = {}  # address -> unit (Unit.gathered_storages)
        # Note [the last unit released with its caller]: each unit's parent module, and
        # the hooks put on those that kept one
        parent_of = {id(child): module for module in model.modules() for child in module.children()}
        self._caller_of = {id(u): parent_of.get(id(u.module)) for u in units[1:]}
        self._caller_hooks: dict[int, object] = {}
        self._kept_for_caller: list[Unit] = []  # last units waiting for their caller's end
        self._handles = handles  # a caller's hook goes with the stage's, at close
        for unit in units:
            unit.masters = masters  # Note [writes inside a forward] in _bucket.py
            unit.gathered_storages = self._gathered_storages
            # first among the unit's pre-forward hooks: one registered before this
            # optimizer (legacy weight_norm, torch.nn.utils.prune) computes from the
            # parameters, which must be gathered by then (it read the placeholders' NaN);
            # last among its forward hooks (Note [the unit's forward hook runs last])
            post = unit.module.register_forward_hook(WeakHook(self.post_forward, unit))
            # Note [a forward that raises]
            after_error = unit.module.register_forward_hook(
                WeakHook(self._close_saved_watch, unit), always_call=True)
            handles.append(unit.module.register_forward_pre_hook(
                WeakHook(self.pre_forward, unit, (post.id, after_error.id)), prepend=True))
            handles += [post, after_error]
            # Note [backward past a unit's inputs]; Note [module backward hooks]
            handles.append(unit.module.register_forward_pre_hook(
                WeakHook(self._watch_inputs, unit), with_kwargs=True))
            unit.release()  # the shards hold rank 0's values (broadcast, then placed)
            for bucket in unit.buckets:  # Note [released parameters] in _released.py
                bucket.watch_released(unit.name, switches)
        # Note [saved tensors] in _saved_tensors.py
        self._saved = SavedTensorWatches(units, self._unit_of, self._gathered_storages,
                                         WeakHook(self.gather_for_saved_tensor),
                                         WeakHook(self._all_saved_read))
        # Note [released once backward has read it]
        self._read_through: list[Unit] = []  # in this backward, since the last hook
        self._released_early: list[Unit] = []  # in this backward
        # Note [module backward hooks]: set as each backward begins; with torch's global
        # module backward hooks every unit is kept to its end
        self._global_module_hooks = False
        self._module_hooks_anywhere = False
        self._recomputation = RecomputationWatch(WeakHook(self._module_runs_in_backward))
        self._frozen_on_contexts = FrozenOnContexts(units)
        handles.append(self._recomputation)
        # Note [gathered before a unit's own module hooks] in _module_hooks.py
        self._module_hooks = GatherBeforeModuleHooks(self._gather_before_module_hooks)
        for unit in units:
            self._module_hooks.bring_up_to_date(unit)
        handles.append(self._module_hooks)

    # -- the four hooks: before and after each unit's forward and backward -----------

    def pre_forward(self, unit: Unit, last_hook_ids: tuple[int, int], module, args) -> None:
        """Gather ``unit`` for its forward, walking the schedule (Note [gather schedule])."""
        _run_last(module._forward_hooks, last_hook_ids)
        # Note [gathered before a unit's own module hooks] in _module_hooks.py: first,
        # for every call (a call that arms no output keeps its GatherFirst idle)
        self._module_hooks.take_for_call(unit, training=torch.is_grad_enabled() and not (
            self.switches.summoned or self.switches.phase is Phase.BACKWARD))
        if unit is self.root:  # before any other unit's call takes its hooks
            for other in self.units[1:]:
                self._module_hooks.bring_up_to_date(other)
        if self._forward_inside_summon(unit):
            return
        if self.reducer.backward_abandoned:  # Note [a backward that raised] in _reducer.py
            raise abandoned_backward_refusal(f"a forward of unit {unit.name}")
        if self.switches.phase is Phase.BACKWARD:  # Note [recomputation]
            unit.record.recomputations += 1
            self.walk.gather_for_backward(unit)
            return
        if unit is self.root:
            self._begin_forward_pass()
        if self.walk.training_forward:
            unit.record.ran = True
            # Note [run twice from the second step on]
            if may_recompute_in_backward():
                unit.record.checkpointed_runs += 1
                self.walk.backward_pass.checkpointed = True
        self.walk.reach(self.walk.forward, unit)
        self._saved.open(unit)

    def post_forward(self, unit: Unit, module, args, output) -> None:
        """Arm ``unit``'s pre-backward on its outputs; release it when the walk moves on."""
        if self.switches.summoned or self.switches.phase is Phase.BACKWARD:
            return  # Note [forward inside summon], Note [recomputation]
        self._saved.close(unit)
        armed = torch.is_grad_enabled() and self._arm_pre_backward(output, unit)
        if armed:
            self._module_hooks.arm(unit)  # Note [gathered before a unit's own module hooks]
        if self.walk.training_forward and (armed or unit.record.checkpointed_runs):
            unit.note_backward_may_read()  # Note [frozen units backward never reads]
        # Without resharding, a unit run under no_grad inside a training forward
        # (reentrant checkpointing) stays gathered for its recomputation in backward.
        if (self.reshard_after_forward or not self.walk.training_forward) and not unit.held_for_pass:
            if self.walk.forward.next_unit() is not None:
                self.walk.finished.append(unit)  # Note [runs before the walk moves on]
            elif not self._release_with_caller(unit):  # nothing to move on to: release now
                unit.release()
        if unit is self.root:
            if self.walk.training_forward:  # Note [frozen parameters kept on a ctx]
                self._frozen_on_contexts.look(tree_flatten(output)[0])
            self._end_forward_pass()

    def _release_with_caller(self, unit: Unit) -> bool:
        """Note [the last unit released with its caller]: keep the schedule's last unit
        gathered until the forward of the module that called it ends, where that module
        is one (not the root, nor a module with no forward of its own, which no one
        calls: a ModuleList); whether it is kept."""
        caller = self._caller_of.get(id(unit))
        if caller is None or caller is self.root.module or has_no_forward(caller):
            return False
        if id(caller) not in self._caller_hooks:
            self._caller_hooks[id(caller)] = handle = caller.register_forward_hook(
                EagerOnlyHook(self._release_after_caller), always_call=True)
            self._handles.append(handle)
        self.walk.finished.append(unit)  # the pass's end releases it if the hook does not
        self._kept_for_caller.append(unit)
        return True

    def _release_after_caller(self, caller, args, output) -> None:
        for unit in [u for u in self._kept_for_caller if self._caller_of.get(id(u)) is caller]:
            self._kept_for_caller.remove(unit)
            if unit in self.walk.finished:  # not released by the pass's end meanwhile
                self.walk.finished.remove(unit)
                unit.release()

    def pre_backward(self, unit: Unit, grad: torch.Tensor | None) -> None:
        """``unit``'s outputs get their gradient: gather it for its backward (once)."""
        self.reducer.on_backward_start(grad)
        if unit.record.armed:
            return
        unit.record.armed = True
        self.walk.gather_for_backward(unit)

    def post_backward(self, bucket, index: int) -> None:
        """The store has collected parameter ``index`` of ``bucket``'s gradient; once the
        unit's last one is in, backward is done with the unit: release it."""
        param = bucket.params[index]
        unit = self._unit_of[id(param)]
        # A gradient arrived, so a forward ran the unit, even one before the last synced
        # backward: a second backward through a retained graph.
        unit.record.ran = unit.record.got_gradient = True
        unit.record.grads_arrived.add(id(param))
        self._release_read_through()  # Note [released once backward has read it]
        self.walk.note_ready(bucket)
        if not unit.release_when_grads_done or unit.awaits_module_hooks:
            self._release_once_past_inputs(unit)
        elif unit.record.grads_arrived >= unit.trainable_ids:
            # A nested backward (Note [late gradients]) may gather it again, or use it
            # again if it is kept: count afresh (kept, the next nested backward's first
            # gradient released it while that backward still read it).
            unit.record.grads_arrived.clear()
            # A unit some rank runs twice stays gathered: with reentrant checkpointing
            # its next run's recomputation would gather it again, on that rank only (Note
            # [runs before the walk moves on], Note [run twice from the second step on]).
            if not unit.kept_through_backward() and not self._global_module_hooks:
                unit.release()
                if self.walk.past_last_launch_point():
                    self.reducer.wait_in_flight()  # Note [after the walk's last step]

    def _close_saved_watch(self, unit: Unit, module, args, output) -> None:
        """Note [a forward that raises]: close ``unit``'s saved-tensor hooks if its
        forward raised before its forward hook closed them."""
        self._saved.close(unit)

    # -- forward passes -------------------------------------------------------------

    def _forward_inside_summon(self, unit: Unit) -> bool:
        """Note [forward inside summon]: every unit is gathered; the hooks stand aside."""
        if self.switches.summoned and torch.is_grad_enabled():
            raise RuntimeError(
                f"zeroshard stage 3: unit {unit.name} ran a forward with grad enabled inside "
                "`with opt.summon_full_params():`; there every parameter is gathered and "
                "backward cannot reduce and release units. Run forwards there under "
                "torch.no_grad() (evaluation, generate()), or train outside the block")
        if self.switches.summoned:
            for bucket in unit.buckets:  # Note [masters written between steps] in _masters.py
                self.masters.before_gather(bucket, in_backward=False, gathered=True)
        return bool(self.switches.summoned)

    def _begin_forward_pass(self) -> None:
        self.walk.last_forward = Phase.FORWARD if torch.is_grad_enabled() else Phase.FORWARD_NO_GRAD
        self.switches.enter(self.walk.last_forward)
        self.walk.backward_pass.training_forwards += self.walk.training_forward
        self.walk.forward.restart()
        self._saved.close(None)  # pairs a forward that raised left open

    def _end_forward_pass(self) -> None:
        """The root's forward ends: walk the rest of the schedule, release what is due."""
        for skipped in self.walk.forward.walk_to_end():
            self.walk.pass_over(skipped)
        if self.reshard_after_forward or not self.walk.training_forward:
            self.walk.finished.clear()
            for other in self.units:  # finished, or a prefetch the forward did not use
                other.release()
        self._kept_for_caller.clear()  # released, whether or not its caller's hook ran
        if self.switches.phase in (Phase.FORWARD, Phase.FORWARD_NO_GRAD):  # (not if a
            self.switches.enter(Phase.IDLE)  # backward inside the forward ended it)

    # -- backward -------------------------------------------------------------------

    def begin_backward(self) -> None:
        """A backward begins (the reducer's first hook in it)."""
        if torch.is_grad_enabled():  # the engine runs with create_graph=True
            raise RuntimeError(
                "zeroshard stage 3: a backward with create_graph=True (a gradient penalty "
                "through torch.autograd.grad(..., create_graph=True), a double backward) "
                "builds a graph over gathered parameters that stage 3 releases when the "
                "backward ends; train a penalty on the inputs' gradient with stage 1 or 2 "
                "(loss.backward(create_graph=True), a graph of the parameters' own "
                "gradients, no stage supports)")
        # Note [one order]: backward walks the schedule where it must gather: with
        # resharding, or when the units were released since the forward (a no_grad
        # forward or summon_full_params() in between, a second backward through a
        # retained graph); every rank holds all units gathered or none at this point.
        self.walk.backward_pass.walking = self.reshard_after_forward or any(
            u.state is not ShardState.GATHERED for u in self.units if u.buckets)
        # Reductions launch as the walk reaches them only where the list is sorted for
        # it (with resharding) and after exactly one training forward; after two (their
        # backwards interleave) they wait for the end of backward.
        self.walk.backward_pass.launch_at_walk = (self.reshard_after_forward
                                              and self.walk.backward_pass.training_forwards == 1)
        if self.reducer.local_only:  # the last backward ran inside no_sync()
            for unit in self.units:
                if unit.holds_local_grads():
                    unit.record.ran = unit.record.got_gradient = True
        self._recomputation.start()
        # Note [module backward hooks]: asked anew each backward (hooks come and go), and
        # of the forwards (torch calls the hooks a forward took, even if removed since)
        any_module = bool(torch.nn.modules.module._global_backward_hooks
                          or torch.nn.modules.module._global_backward_pre_hooks)
        self._global_module_hooks = self._module_hooks_anywhere = any_module
        for unit in self.units:
            unit.awaits_module_hooks = not any_module and (
                unit.record.module_hooks_at_forward or unit.modules_have_backward_hooks())
            self._module_hooks_anywhere |= unit.awaits_module_hooks

    @property
    def launches_as_ready(self) -> bool:
        """Note [one order]: with a backward walk, reductions launch at its steps, not
        as gradients happen to arrive; without one, backward issues no gather, and they
        launch as they become ready, in list order."""
        return not self.walk.backward_pass.walking

    def gather_for_saved_tensor(self, unit: Unit) -> None:
        """Note [saved tensors] in _saved_tensors.py: backward is about to use a tensor
        ``unit``'s forward saved."""
        if unit.state is ShardState.GATHERED or self.switches.summoned:
            return
        if unit.record.armed:  # gathered for this backward and released since
            self.walk.gather_outside_walk(unit)
        else:
            self.pre_backward(unit, None)

    def _arm_pre_backward(self, output, unit: Unit) -> bool:
        """Call ``pre_backward(unit)`` when a tensor of ``output`` gets its gradient
        (returns whether one requires grad).

        A tensor can be the output of nested units (a model returning its head's
        output): the outer unit's forward ends last, so it is the earlier of them in
        the backward schedule, and its hook must run first (tensor hooks run in the
        order they were registered). One hook per tensor calls the units outermost first.
        """
        armed = False
        for tensor in tree_flatten(output)[0]:
            if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad):
                continue
            units = getattr(tensor, "_zeroshard_units", None)
            if units is None:
                tensor._zeroshard_units = units = []
                tensor.register_hook(WeakHook(self._pre_backward_all, units))
            units.insert(0, unit)
            armed = True
        return armed

    def _gather_before_module_hooks(self, unit: Unit, module, grad_output) -> None:
        """Note [gathered before a unit's own module hooks] in _module_hooks.py: what the
        gradient hook on ``unit``'s outputs does a node later (it then finds it done)."""
        self._pre_backward_all([unit], None)

    def _pre_backward_all(self, units: list[Unit], grad: torch.Tensor) -> None:
        self._release_read_through()  # Note [released once backward has read it]
        for unit in units:
            self.pre_backward(unit, grad)

    def holds(self, bucket, reduced: torch.Tensor) -> bool:
        """Whether to hold ``bucket``'s reduction instead of installing it: a unit that
        got no gradient here may have got none anywhere, so it waits until the ranks have
        compared notes (``install_held``). Not the root: the ranks compare no note on it."""
        unit = self._unit_of[id(bucket.params[0])]
        if bucket.grad_shard is not None or unit is self.root or unit.record.got_gradient:
            return False
        position = self.reducer.position_of(bucket)
        held = self.walk.backward_pass.held  # reduced again: added up (Note [late gradients])
        held[position] = reduced if position not in held else held[position].add_(reduced)
        return True

    def agree_on_late(self, late: set[int]) -> list[int]:
        """Note [ran on no rank]:
            Which units got a gradient on no rank at all (their gradient is absent, not
            zero, and the optimizer skips them as torch skips a parameter whose gradient
            is None) is not something a rank can know alone. A unit gets none where it
            ran nowhere (a branch, an expert, a layer LayerDrop skipped on every rank),
            or ran and what it computed reached no loss (an encoder whose every consumer
            was skipped): stepped with zeros there, weight decay and momentum moved it,
            where DDP leaves it still (a helper's probe, Whisper with LayerDrop 0.5: its
            encoder layers 1e-4 from DDP after the first step; the flag was "ran" until
            this change). A rank holds back the reductions of units that got no gradient
            here (``holds``); after each synced backward the ranks all-reduce one 4-byte
            flag per unit other than the root, and one per bucket for the late ones, and
            then install what they held (``install_held``). The unit is the grain:
            where only some of a unit's parameters got a gradient anywhere, its others
            are stepped with zeros.

        The ranks compare notes (``_agreement.ran_and_late``):
        which units but the root (it ran here) got a gradient on some rank, and which
        buckets got gradient after the walk passed their unit on some rank (Note [late
        gradients]).
        Every rank reduces again the buckets late on any rank.

        Note [steps on some ranks only]:
            Stage 3's step issues no collective (the next forward gathers), so a rank
            that skipped ``opt.step()`` after a backward every rank ran (``if loss > limit:
            continue`` on one rank's own loss) went on training with no error, each rank's
            shards stepped a different number of times: a mix of models (a helper's probe;
            stages 1-2 wait in the step's gathers there, Note [a collective that fails] in
            _comm.py). So this all-reduce also carries each rank's count of steps, and the
            next step is refused on every rank where they differ."""
        got_gradient, late_anywhere, read_anywhere, steps_agree = _agreement.ran_and_late(
            [u.record.got_gradient for u in self._flagged],
            [p in late for p in range(len(self.reducer.buckets))],
            # what each rank alone knows of a unit, so that all decide alike
            [u.backward_may_read or u.held_for_pass or u.frozen_on_a_ctx
             or u.saved_by_another_unit for u in self._frozen], self._steps,
            device=self.device, group=self.group, stats=self.stats, label=self.label)
        self._steps_differ = self._steps_differ or not steps_agree
        self.walk.backward_pass.got_gradient_somewhere = {
            id(u) for u, flag in zip(self._flagged, got_gradient) if flag}
        for unit, read in zip(self._frozen, read_anywhere):
            unit.skipped_in_backward, unit.backward_may_read = not read, False
        return [p for p, flag in enumerate(late_anywhere) if flag]

    def got_no_gradient_anywhere(self, bucket) -> bool:
        """After the agreement of this backward: whether ``bucket``'s unit got a gradient
        on no rank (Note [ran on no rank]; never said of the root, whose gradient the
        ranks do not compare)."""
        unit = id(self._unit_of[id(bucket.params[0])])
        return unit in self._flagged_ids and unit not in self.walk.backward_pass.got_gradient_somewhere

    def install_held(self) -> None:
        """Note [ran on no rank]: units that got a gradient on no rank get none at all,
        as torch leaves .grad None for a parameter no rank used; the others get theirs."""
        somewhere = self.walk.backward_pass.got_gradient_somewhere
        for position, reduced in self.walk.backward_pass.held.items():
            bucket = self.reducer.buckets[position]
            if id(self._unit_of[id(bucket.params[0])]) in somewhere:
                # added to a shard a late gradient installed (Note [late gradients])
                self.reducer.store.install(bucket, reduced)

    def finish_walk(self) -> None:
        """The end of backward, before its reductions are flushed: the gathers of the
        rest of the walk first, as other ranks may be waiting for them."""
        self.walk.finish()

    def end_backward(self, whole: bool = True) -> None:
        """The reducer has finished the backward (``whole``: not one that raised, Note [a
        backward that raised] in _reducer.py, which may have stopped short of a
        recomputation)."""
        self._recomputation.stop(counted=whole)
        self._read_through.clear()
        self._released_early.clear()
        self.walk.end_backward(whole)
        for unit in self.units:
            unit.end_backward(synced=self.switches.require_sync)

    @contextlib.contextmanager
    def reading_structure(self):
        self._reading_structure += 1
        try:
            yield
        finally:
            self._reading_structure -= 1

    def _refuse_outside_its_unit(self, name: str, units: list[Unit], module, args) -> None:
        """Note [called outside its unit's forward]:
            A unit's parameters are gathered by its forward's hooks, and between its
            forwards they are placeholders: NaN of their shape. A module inside a unit,
            called where that unit's forward does not run it (``emb =
            model.get_input_embeddings()(ids)`` before ``model(inputs_embeds=emb)``, the
            way NEFTune-like noise and multimodal models build their inputs; a loss
            method that calls ``self.head(self.body(x))`` instead of the model) computed
            with those NaN, and trained NaN with no error (a helper's probes). Such a
            call is refused, naming the module, before it reads anything; every rank
            runs the same code, so every rank raises there. Inside summon_full_params
            and in backward's recomputations (activation checkpointing gathers what it
            recomputes) the unit is gathered; a module of a released unit called in
            backward gathers it (Note [a unit's modules called in backward]). Under
            torch.compile the check is not traced (``EagerOnlyHook``: dynamo split the
            graph at every module that holds parameters, a reviewer's probe, 7 -> 19
            graph breaks).

        The same hook notes a module run in a training forward as activation
        checkpointing runs it (Note [released once backward has read it])."""
        if self.switches.summoned:
            return
        if self.switches.phase is Phase.BACKWARD:
            self._gather_for_a_call_in_backward(units)
            return
        if (self.switches.phase is Phase.FORWARD and not self.walk.backward_pass.checkpointed
                and may_recompute_in_backward()):
            self.walk.backward_pass.checkpointed = True
        released = [unit for unit in units if unit.state is not ShardState.GATHERED]
        if not released:
            return
        owner = released[0]
        what = f"zeroshard stage 3: module {name!r} ({type(module).__name__}) was called "
        note = " (Note [called outside its unit's forward] in zeroshard/stage3.py)"
        if owner is not self.root and self.switches.phase is not Phase.IDLE:
            raise RuntimeError(  # inside the model's forward, outside its unit's: shared
                what + f"by another part of the model's forward (a module shared by passing "
                f"it), outside the forward of unit {owner.name}, which holds its parameters "
                "and releases them outside that forward: it would compute with placeholders "
                "(NaN). Choose units so that the module using a parameter holds it or is an "
                f"ancestor of its unit: pass units= without {type(owner.module).__name__} "
                "(e.g. the block class)" + note)
        where = "the model's forward (`model(...)`)" if owner is self.root else \
            f"the forward of unit {owner.name}"
        raise RuntimeError(
            what + f"outside {where}, which gathers its parameters: here they are sharded, "
            "and it would compute with placeholders (NaN). Call it from inside that forward: "
            "e.g. a wrapper module whose forward computes the embeddings and then calls the "
            "model, built before ZeroOptimizer and passed to it, or a loss computed from "
            "`model(...)`'s output; for evaluation or logging, call it under torch.no_grad() "
            "inside `with opt.summon_full_params():`" + note)

    def _gather_for_a_call_in_backward(self, units: list[Unit]) -> None:
        """Note [a unit's modules called in backward]:
            A reversible residual block (RevNet, HF Reformer) runs its forward under
            no_grad inside an autograd Function, and that Function's backward calls the
            block's sub-modules (``block.f``, ``block.g``) to recompute its inputs and
            their gradients, never the block's own forward. Activation checkpointing
            calls the unit's forward, whose hooks gather it; here nothing did, and the
            sub-modules computed with the released unit's placeholders: NaN gradients
            from the first step, silently (a helper's probe, HF Reformer with
            ``units=ReformerLayer``). So a module whose unit is released, called in
            backward, gathers it first: as the unit's outputs getting their gradient
            would (``pre_backward``, a step of the backward walk), where they did not,
            and else outside the walk, as a recomputation does; every rank runs the same
            calls. The unit is released once its gradients are in, as any unit. (Gathered
            outside the walk, it was gathered a third time, at the walk's end, for
            the step no output took: 2.8 times the units' bytes a step, not 2.) Every
            rank must make those calls: one made on some ranks only (a gradient hook that
            logs through a sub-module on rank 0) gathers there alone, refused by the first
            step's agreement, and from the second step on it hangs (a reviewer's probe;
            it hung there before this change too, having computed with NaN)."""
        if self.reducer.backward_abandoned or not self._recomputation.on_backward_thread():
            return
        for unit in units:
            if unit.state is ShardState.GATHERED:
                continue
            if unit.record.armed:
                self.walk.gather_outside_walk(unit)
            else:
                unit.record.armed = True
                self.walk.gather_for_backward(unit)

    def _refuse_if_sharded(self, units: list[Unit], module, *args) -> None:
        """Reading or loading a freed buffer would read or write memory that is not there."""
        if self._reading_structure:
            return
        if any(u.state is not ShardState.GATHERED for u in units):
            raise RuntimeError(
                "stage 3 keeps parameters sharded between forward and backward, so "
                "model.state_dict() and model.load_state_dict() must run inside "
                "`with opt.summon_full_params():` (on every rank)")

    # -- Note [released once backward has read it] --------------------------------------

    def _all_saved_read(self, unit: Unit) -> None:
        """Backward has read every view and cast of ``unit``'s parameters its forwards
        saved; the node reading the last is running, so the unit is released at the next
        hook between nodes (``_release_read_through``), if it may be at all."""
        if (self.switches.phase is Phase.BACKWARD and unit not in self._read_through
                and self._may_release_early(unit)):
            self._read_through.append(unit)

    def _release_read_through(self) -> None:
        """Release the units backward has read through, once it is known that no
        recomputation in backward reads parameters (``RecomputationWatch``) and none is
        expected in this one (``BackwardPass.checkpointed``). Runs only in
        hooks that autograd calls between nodes (a tensor's gradient hook, a parameter's
        accumulation hook), never while a node that read a parameter is running."""
        if (not self._read_through or not self._recomputation.never_seen
                or self.walk.backward_pass.checkpointed):
            return
        for unit in list(self._read_through):
            if unit.state is not ShardState.GATHERED or unit.saved_unread:
                self._read_through.remove(unit)  # released, or a new graph saved views since
            # checked at each hook: every gradient still to come is an embedding weight's
            # (an embedding's backward reads no weight; any other node might read a
            # parameter it kept on its ctx, unseen); the rest again, once, before releasing
            elif (unit.trainable_ids - unit.record.grads_arrived <= unit.embedding_weight_ids
                    and self._may_release_early(unit)):
                self._read_through.remove(unit)
                unit.release()
                self._released_early.append(unit)

    def _may_release_early(self, unit: Unit) -> bool:
        """What does not change as backward runs: no custom Function keeps one of
        ``unit``'s frozen parameters on its ctx (read, unseen, by a node that gives it no
        gradient: Note [frozen parameters kept on a ctx]), no hook of the user's is on a
        parameter (which may read it when the gradient comes), no other unit's forward
        saved a view of it, and it is not held for the pass."""
        return (not unit.frozen_on_a_ctx and not unit.saved_by_another_unit
                and not unit.kept_through_backward() and not self.switches.summoned
                and not unit.parameters_have_user_hooks()
                and not self._module_hooks_anywhere)

    # -- Note [backward past a unit's inputs] in _frozen_reads.py ---------------------------

    def _watch_inputs(self, unit: Unit, module, args, kwargs) -> None:
        """A unit with frozen parameters, or with a module's backward hook in its subtree
        (Note [module backward hooks]), runs a training forward (not a recomputation):
        hook its inputs that require grad."""
        if self.switches.phase is not Phase.FORWARD or not torch.is_grad_enabled():
            return
        inputs = tree_flatten((args, kwargs))[0]
        # Backward is never past the inputs of a unit given none that requires grad, so
        # its subtree is not asked for hooks: the root's is the whole model (a scan of
        # 721 modules took 0.55 ms here).
        if (any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
                and unit.modules_have_backward_hooks()):
            unit.record.module_hooks_at_forward = True
        elif unit.release_when_grads_done:
            return
        watch_inputs(unit, inputs, WeakHook(self._input_gradient_came, unit))

    def _input_gradient_came(self, unit: Unit, grad) -> None:
        unit.record.inputs_reached += 1
        self._release_once_past_inputs(unit)

    def _release_once_past_inputs(self, unit: Unit) -> None:
        """A hook between nodes, for a unit released once backward is past its inputs:
        one awaiting its modules' hooks, or one with frozen parameters."""
        if unit.release_when_grads_done and unit.awaits_module_hooks:
            self._release_past_module_hooks(unit)
        else:
            self._release_past_inputs(unit)

    def _release_past_inputs(self, unit: Unit) -> None:
        """In a hook between nodes: release ``unit`` if backward is past its inputs and its
        trainable gradients, and nothing else may read it (``_may_release_early``)."""
        if (self.switches.phase is Phase.BACKWARD and unit.state is ShardState.GATHERED
                and past_inputs(unit) and self._may_release_early(unit)):
            unit.release()

    def _release_past_module_hooks(self, unit: Unit) -> None:
        """Note [module backward hooks]: release ``unit``, whose subtree holds a module
        with a backward hook, once backward is past its inputs (so past every node its
        forward made, the hooks' among them) and its trainable gradients."""
        if (self.switches.phase is Phase.BACKWARD and unit.state is ShardState.GATHERED
                and past_inputs(unit) and not unit.kept_through_backward()
                and not self.switches.summoned):
            unit.release()
            if self.walk.past_last_launch_point():
                self.reducer.wait_in_flight()  # Note [after the walk's last step]

    def _module_runs_in_backward(self, module, args) -> None:
        """A module's forward runs inside backward: a recomputation (activation
        checkpointing), which may read any unit's parameters, and reads them in the
        backwards to come too. No unit is released early from now on, and those released
        early in this backward are gathered again before the module computes."""
        if self.switches.phase is not Phase.BACKWARD or not self._recomputation.on_backward_thread():
            return
        # Note [a backward that raised] in _reducer.py: not a recomputation, but a forward
        # after it, which its hooks refuse (it gathered here, on some ranks only)
        if self.reducer.backward_abandoned:
            return
        self._recomputation.seen = True
        for unit in self._released_early:
            self.walk.gather_outside_walk(unit)
        self._released_early.clear()

    # -- around the optimizer step ----------------------------------------------------

    def check_before_step(self) -> None:
        """Each gather puts the parameters back on their unit's buffers, so only Note
        [steps on some ranks only] is checked here."""
        if self._steps_differ:
            raise RuntimeError(
                "zeroshard stage 3: the ranks have not all taken the same optimizer steps: some "
                "rank skipped opt.step() after a backward that others stepped after (or called it "
                "more often). Each rank has stepped its own shards that many times, so the model "
                "is now a mix of them (DDP's replicas drift apart silently in the same case). "
                "Step on every rank or on none, deciding from a value the ranks share (the norm "
                "opt.clip_grad_norm_() returns, a loss all-reduced first; GradScaler agrees by "
                "itself), and resume from the last checkpoint")

    def after_step(self) -> None:
        """Parameters stay sharded after a step; free anything still gathered (stale now)."""
        self._steps += 1  # Note [steps on some ranks only]
        self.follow_shards()

    def follow_shards(self) -> None:
        """The shards changed (a step, a schedule-free mode switch): free anything still
        gathered, and refuse a graph from before as a step does."""
        for unit in self.units:
            for bucket in unit.buckets:  # Note [a graph from before the step]
                if bucket.params[0].requires_grad:
                    bucket.steps_taken += 1
            # Note [frozen units backward never reads] in _walk.py: one kept here holds
            # the old shards' values (a load changes frozen ones too): released for real
            # (kept through a load, its old values ran the next forward here alone,
            # helper-98's probe: 3.4e-2 from the reference)
            unit.kept_here = False
            unit.release()

    def unshard(self) -> None:
        """Gather every unit, in the same order on every rank, and keep it gathered
        (``close()``, ``summon_full_params``)."""
        for unit in self.units:
            self.walk.gather_now(unit)

    def parameter_tensors(self) -> list[torch.Tensor]:
        return [b.shard for u in self.units for b in u.buckets]

    def master_tensors(self) -> list[torch.Tensor]:
        return [b.master for u in self.units for b in u.buckets if b.master is not None]

    @contextlib.contextmanager
    def summon_full_params(self):
        """Gather every unit; on exit write each rank's own slice back into its shard.

        Note [forward inside summon]: inside, the forward hooks stand aside (every unit
        is gathered already), so a forward under ``torch.no_grad()`` (evaluation,
        ``generate()``) issues no collective and may run on some ranks only, e.g. rank 0
        sampling text. A forward with grad enabled is refused: its backward would
        reduce and release units in the middle of the block (``summoned`` is counted
        by ``ZeroOptimizer.summon_full_params``)."""
        self.unshard()
        # the gathers' works hold views of the buffers until later waits let them go (a
        # collective inside the block): counted now, those would hide a state dict's
        _comm.let_go_of_finished()
        views = {id(b): b.views_elsewhere() for u in self.units for b in u.buckets if b.is_gathered}
        try:
            yield
        finally:
            self.keep_writes_made_inside()
            left = sum(unit.release(views) for unit in self.units)
            if left and not self._warned_of_views_kept:
                self._warned_of_views_kept = True
                warnings.warn(
                    f"zeroshard: tensors taken inside summon_full_params() (a state dict, "
                    f"p.detach()) still view {left / 2**20:.1f} MiB of gathered parameters "
                    "after the block; that memory stays theirs (their values are the "
                    "block's end) until they are freed. Save inside the block, or del "
                    "them, to free it now", stacklevel=levels_to_the_caller())

    @torch.no_grad()
    def keep_writes_made_inside(self) -> None:
        """Inside ``summon_full_params()`` (at its end, and before anything reads the
        shards or masters inside it: a save, ``full_state_dict()``, which missed the
        block's writes so far, a reviewer's probes): this rank's slice of what each
        gathered parameter holds goes to its shard, frozen ones' too, and the masters take
        the written elements."""
        for unit in self.units:
            for bucket in unit.buckets:
                if not bucket.is_gathered:
                    continue
                # new .data given inside (p.data = t) takes its place first: it was lost,
                # silently, as the place's old values went to the shard
                bucket.adopt_replaced_data(
                    "a write inside summon_full_params()",
                    "to change a shape (resize_token_embeddings), opt.close(), change "
                    "the model, then build a new ZeroOptimizer")
                self.masters.take_gathered_writes(bucket)
