"""ZeroOptimizer: validate → plan → broadcast and place → inner optimizer → stage; then
the training loop's calls, state dicts and reports."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch
import torch.distributed as dist
from torch import nn

from . import _clip, _comm, _full_state, _materialize, _validate
from ._bucket import Ownership, grad_shards
from ._buffers import BufferFollower
from ._cleared import HeldStill
from ._ddp_guard import DDPGuard
from ._hooks import EagerOnlyHook, WeakHook, levels_to_the_caller
from ._inference_mode import outside_inference_mode
from ._inner import InnerOptimizers, SettingsBothWays, class_of, hyperparameters, step_cost
from ._masters import masters_for
from ._masters_shown import MastersShown
from ._module_hooks import GatherFirst
from ._other_optimizers import refuse_other_optimizers_over
from ._per_sample_gradients import refuse_per_sample_gradients
from ._placement import Placement
from ._plan import ShardingView, plan_sharding, work_balance
from ._ranks import job_ranks, mesh_as_read, ranks_from
from ._reducer import GradientReducer
from ._stage import Stage
from ._transforms import GradientTransformRefusal
from .memory import live_report
from .mixed_precision import (MixedPrecision, full_precision_parameters, holds_param_dtype_values,
                              install_forward_casts)

_STATE_DICT_VERSION = 1

# id(parameter) -> (weak reference to it, weak reference to the ZeroOptimizer that
# manages it until its close()). Keyed by id: tensors compare element-wise, so they
# make poor dict keys, and a marker on the parameter would follow copy.deepcopy.
_owners: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _run_eagerly_under_torch_compile() -> None:
    """Note [the optimizer under torch.compile]:
        torch's recipes compile the optimizer's step (``torch.compile`` over a function
        that calls ``opt.step()``, or over the whole training step). Dynamo traced into
        ZeroOptimizer's methods and failed there with internal errors of its own
        (``InternalTorchDynamoError``, an AttributeError at stage 1 and a RecursionError
        at stages 2-3, in ``outside_inference_mode``: helper-116), the step's
        collectives and the stage's bookkeeping being nothing it traces. So ``step``,
        ``zero_grad`` and ``clip_grad_norm_`` run outside any compiled graph
        (``torch.compiler.disable``, as torch runs its own optimizers' ``zero_grad``): a
        compiled function breaks its graph at the call and runs them eagerly;
        ``fullgraph=True`` raises dynamo's error naming the call. So do the stage's
        hooks (every ``WeakHook``, stage 3's ``GatherFirst``) and the backward's end
        (``GradientReducer._on_backward_end``): dynamo compiles each Python frame
        entered while a compiled function runs, also the hooks and callbacks autograd
        calls from a ``backward()`` inside it, and stage 3's (a unit released, its
        parameters changing class) failed there (helper-116: the forward and
        ``loss.backward()`` in one compiled function; helper-119: with a frozen
        parameter or a backward hook in a unit, the units kept to the backward's end);
        a hook that dynamo meets while tracing a forward splits the graph there, as its
        weak reference did before, and runs outside it (stage 3's unit hooks must: Note
        [stage 3 under torch.compile] in stage3.py; they were marked one by one).
        ``EagerOnlyHook`` stays traced, so that it does nothing under a trace (so its
        checks are not seen there), and so do the saved-tensor hooks. About 0.35 us a
        call. Marked once per process, as the first ZeroOptimizer is built (dynamo is
        imported by then), after torch's ``Optimizer.__init__`` has wrapped ``step`` for
        its step hooks."""
    if ZeroOptimizer.eager_under_compile:
        return
    for owner, name in ((ZeroOptimizer, "step"), (ZeroOptimizer, "zero_grad"),
                        (ZeroOptimizer, "clip_grad_norm_"), (WeakHook, "__call__"),
                        (GatherFirst, "__call__"), (GradientReducer, "_on_backward_end")):
        setattr(owner, name, torch.compiler.disable(getattr(owner, name)))
    ZeroOptimizer.eager_under_compile = True


class ZeroOptimizer(torch.optim.Optimizer):
    """Data-parallel training with ZeRO-partitioned model states, as a drop-in optimizer.

    Build it over a plain ``nn.Module`` (not wrapped in DDP) on every rank; it
    broadcasts rank 0's parameters and buffers, then shards across the ranks of
    ``process_group`` the optimizer states of ``optimizer_class`` (stage 1), the
    gradients too (stage 2), and the parameters too (stage 3). Gradients are
    averaged over ranks during ``backward()``, as with DistributedDataParallel, and
    after ``step()`` every rank holds the same parameters.

    ``mesh=`` (a ``DeviceMesh``, instead of ``process_group``) shards over a 1-D
    mesh, or hybrid-shards over a 2-D one of replicas × shards
    (``init_device_mesh(device, (R, S), mesh_dim_names=("replicate", "shard"))``):
    each replica holds the model states sharded S ways; gradients are
    reduce-scattered within the replica and then averaged across replicas on the
    shard only, and stage 3 gathers within the replica only (Note [collectives on
    a mesh] in _comm.py).

    Where the reduced gradient lives: in the shards, not in ``p.grad``. Stage 1
    keeps full-size gradient buffers (its memory profile), but after backward
    ``p.grad`` holds this rank's local, unreduced gradient (a view of that buffer;
    ``zero_grad()`` sets it to None, or to zero in place with ``set_to_none=False``);
    at stages 2 and 3 ``p.grad`` holds a NaN
    marker that carries ``model.zero_grad()`` to the shards (Note [gradient markers]
    in _grad_markers.py). Use ``clip_grad_norm_`` of this optimizer for the global
    gradient norm: ``torch.nn.utils.clip_grad_norm_(model.parameters())`` is refused.

    Stage 3 gathers parameters per unit: ``units`` (module classes, or a predicate
    ``module -> bool``; None groups submodules of about ``bucket_size_mb``) picks
    the modules whose parameters are gathered before their forward and released
    after it (``reshard_after_forward=True``, else kept until backward is done
    with them). Between forward passes parameters hold NaN placeholders of their
    shape (Note [stage-3 placeholders] in _bucket.py): read or write them, or call
    ``model.state_dict()``, inside ``opt.summon_full_params()``.
    A unit may run, or reach the loss, on some ranks only; units should run in
    one order on every rank (Note [gather schedule] in _schedule.py).

    A model too big for one device can be built under ``torch.device("meta")`` and
    passed with ``device=`` (where the shards live): the optimizer materializes it
    there one unit at a time at stage 3 (all of it at stages 1-2), initialising the
    modules in place, children before parents as ``model.apply`` does: each by
    ``init_fn(module)`` when given (a Hugging Face model: ``model._init_weights``),
    else each that has one by ``reset_parameters()``. A model on another device (CPU,
    ``device="cuda"``) moves the same way (Note [one unit at a time] in _materialize.py).

    ``mixed_precision=zeroshard.MixedPrecision(...)`` casts the parameters to its
    ``param_dtype`` and keeps fp32 master weights of this rank's shard only; the
    inner optimizer steps those, and the cast result is all-gathered. With
    mixed precision, ``model.load_state_dict()`` loads the fp32 masters exactly, and
    other writes to the parameters reach the masters at their low-precision value.
    ``torch.amp.GradScaler`` works unchanged (``scaler.scale(loss).backward()``,
    ``scaler.unscale_(opt)``, ``opt.clip_grad_norm_``, ``scaler.step(opt)``,
    ``scaler.update()``); after an fp16 backward the ranks agree whether any
    gradient is inf or NaN, so all of them skip the step or none does (Note
    [non-finite gradients] in _reducer.py).

    With ``broadcast_buffers`` (the default, as DDP's) a forward with grad enabled
    that follows one outside ``no_sync()`` starts from rank 0's buffers (BatchNorm
    running statistics), as under DDP; a forward under ``torch.no_grad()`` issues no
    collective (Note [buffers follow rank 0] in _buffers.py).

    ``param_groups`` are live: ``torch.optim.lr_scheduler`` works unchanged, and a
    change to a group's hyper-parameters applies to the next ``step()``. Their
    ``"params"`` are the tensors this optimizer steps: this rank's 1-D fp32 master
    shards, whose ``.grad`` is the reduced gradient shard, or, for a class that is not
    element-wise, the whole parameters this rank owns (below). Keyword
    arguments other than the ones below go to ``optimizer_class``. Gradients are
    cleared by ``zero_grad()`` of this optimizer or of the model, as under DDP.

    A param group may name its own ``"optimizer_class"`` (Muon for the hidden matrices
    beside the positional AdamW); its hyper-parameters come from the group, the
    missing ones from that class's defaults. Element-wise classes step flat shards;
    any other class (Muon, Adafactor, one zeroshard does not know) steps whole
    parameters, each on one owner rank that sends the result to the others (Note
    [whole-parameter ownership] in _layout.py; ``sharding_report()`` says how evenly).

    A parameter that gets no gradient on any rank in a step counts as having a zero
    gradient at stages 1 and 2 (its bucket is reduced all the same), so weight decay
    and momentum still move it, where plain PyTorch would skip it; stage 3 skips a
    unit that got a gradient on no rank, as torch does (Note [ran on no rank]), unless
    it had one before and ``zero_grad(set_to_none=False)`` left it a zero shard, as
    torch steps a zeroed gradient.

    ``close()`` (or leaving ``with ZeroOptimizer(...) as opt:``) hands the model back
    as an ordinary module holding its full current parameters, in the dtypes it had
    before; until then a second ZeroOptimizer over the same model is refused. A
    script that just ends with ``dist.destroy_process_group()`` needs neither: no
    hook holds this optimizer alive, so it is freed with its last reference.
    """

    eager_under_compile = False  # Note [the optimizer under torch.compile]

    @outside_inference_mode  # Note [inference mode] in _inference_mode.py
    def __init__(self, model: nn.Module, optimizer_class: type[torch.optim.Optimizer], stage: int = 1,
                 param_groups=None, process_group=None, mesh=None, units=None, reshard_after_forward: bool = True,
                 mixed_precision: MixedPrecision | None = None, broadcast_buffers: bool = True,
                 bucket_size_mb: float = 25, device=None, init_fn=None, **optimizer_kwargs) -> None:
        self._constructed = False
        self._stage = None  # set near the end: close() finds it unset if __init__ raised
        # 1. Validate. Every check is local, so every rank raises the same error before
        #    the first collective.
        _validate.check_model(model)
        _validate.check_not_managed(model, _current_owner(model.parameters()))
        _validate.check_stage(stage)
        _validate.check_memory_not_shared(model, stage)  # Note [memory two tensors share]
        _validate.check_units(units, stage)
        _validate.check_optimizer_class(optimizer_class)
        _validate.check_bucket_size(bucket_size_mb)
        _validate.check_devices(model)
        if not isinstance(broadcast_buffers, bool):
            raise TypeError(f"broadcast_buffers must be True or False, got {broadcast_buffers!r}")
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
            raise TypeError(f"mixed_precision must be a zeroshard.MixedPrecision or None, "
                            f"got {mixed_precision!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group(...) before ZeroOptimizer")
        ranks = ranks_from(process_group, mesh)
        groups = _validate.normalize_param_groups(model, param_groups)
        _validate.check_optimizer_arguments(groups, optimizer_class, optimizer_kwargs)
        device = _materialize.target_device(model, device)
        initialisation = _materialize.plan_initialisation(model, init_fn)
        self._remember_model(model)
        self._group = ranks  # every collective of this optimizer goes along it (_comm.py)
        self.stage = stage
        self.mixed_precision = mixed_precision
        self._masters = masters_for(mixed_precision)  # what the inner optimizer steps
        self._places: dict | None = None  # for _load_into_masters
        self._warned_of_param_dtype_state_dict = False  # Note [a state dict in param_dtype]
        self._masters_shown = None  # a MastersShown, inside summon_full_params(full_precision=True)
        self.comm_stats = _comm.CommStats()

        # 2. Plan: buckets, units, owners of parameters stepped whole (no collective).
        classes = [class_of(g, optimizer_class) for g in groups]
        ownership = Ownership({i: step_cost(cls) for i, cls in enumerate(classes)
                               if not _validate.is_elementwise(cls)}, ranks.shard_size)
        plan = plan_sharding(model, groups, stage, units, int(bucket_size_mb * 2**20), ranks,
                             frozenset(full_precision_parameters(model, mixed_precision)), ownership)
        self._plan = plan

        # 3. Broadcast rank 0's values and place this rank's shards (collectives from here).
        placement = Placement(model, plan, self._masters, mixed_precision, self.comm_stats)
        placement.refuse_layouts_that_differ_across_ranks(classes, device, {
            "stage": stage, "mixed_precision": mixed_precision,
            "reshard_after_forward": reshard_after_forward, "broadcast_buffers": broadcast_buffers,
            "mesh": mesh_as_read(mesh)}, across=job_ranks(ranks, mesh))
        placement.place(device, initialisation)

        # 4. The inner optimizers over this rank's shards; the outer groups schedulers see.
        self._inner = InnerOptimizers(
            groups, [[t for b in plan.buckets if b.group_index == i for t in b.stepped]
                     for i in range(len(groups))], optimizer_class, optimizer_kwargs,
            part_bytes=int(bucket_size_mb * 2**20))
        super().__init__(self._outer_groups(), self._inner.defaults)
        _run_eagerly_under_torch_compile()  # after torch's own wrapping of step
        self._settings = SettingsBothWays(self.param_groups)
        self._mode = None  # "train" / "eval" once asked for: Note [a mode switch of the optimizer]

        # 5. The stage: gradient reducer and store, parameters gathered; the model's hooks.
        self._stage = Stage(stage, model, list(plan.buckets), list(plan.units), self._group,
                            self.comm_stats, mixed_precision, self._masters, reshard_after_forward)
        self._view = ShardingView(self, optimizer_class)
        self._install_model_hooks(broadcast_buffers)
        for param in model.parameters():
            _owners[id(param)] = (weakref.ref(param), weakref.ref(self))
        refuse_other_optimizers_over(_owners, _owner_of)  # Note [another optimizer over managed parameters]
        self._constructed = True

    def _remember_model(self, model: nn.Module) -> None:
        self._model = model
        # What close() restores: the policy casts parameters and replaces buffers.
        self._param_dtypes = {id(p): p.dtype for p in model.parameters()}
        # The sharding follows requires_grad as it is now (step() checks it stays so).
        self._trainable_at_construction = [(p, p.requires_grad) for p in model.parameters()]
        self._parameter_ids = frozenset(id(p) for p, _ in self._trainable_at_construction)
        self._buffer_dtypes = {(id(m), name): b.dtype for m in model.modules()
                               for name, b in m._buffers.items() if b is not None}

    def _outer_groups(self) -> list[dict]:
        """The outer groups hold this rank's master shards (their .grad is the reduced
        gradient shard; the inner optimizers step them, or views of the parameters this
        rank owns whole) with every hyper-parameter of the inner groups, defaults filled
        in. Schedulers find the hyper-parameters they expect, and torch.amp.GradScaler
        unscales and checks exactly the gradients the step will use, once each, on every
        rank (a rank that owns no parameter whole still holds each bucket's shard: Note
        [non-finite gradients] fills those)."""
        return [{**hyperparameters(inner), "params": [b.master for b in self._plan.buckets
                                                      if b.group_index == i]}
                for i, inner in enumerate(self._inner.param_groups)]

    def _install_model_hooks(self, broadcast_buffers: bool) -> None:
        """The hooks on the model beside the stage's own (each removed with the stage's)."""
        model, handles = self._model, self._stage.handles
        if self.mixed_precision is not None:
            handles += install_forward_casts(model, self.mixed_precision)
            # model.load_state_dict() gives the fp32 masters the loaded values exactly;
            # so does a submodule's (model.blocks[0].load_state_dict(...)), whose load
            # calls no hook of the modules above it: one hook per module over its own
            for module in model.modules():
                if any(p is not None for p in module._parameters.values()):
                    handles.append(module.register_load_state_dict_pre_hook(
                        WeakHook(self._load_into_masters)))
            # the model's and its children's (a wrapper's `wrapper.model.save_pretrained`)
            for module in [model, *model.children()]:
                handles.append(module.register_state_dict_post_hook(
                    WeakHook(self._warn_of_a_state_dict_in_param_dtype)))
        if broadcast_buffers and self._world_size > 1:  # Note [buffers follow rank 0]
            self._buffer_follower = BufferFollower(model, self._stage.switches, self._group,
                                                   self.comm_stats)
            handles.append(model.register_forward_pre_hook(
                WeakHook(self._buffer_follower.before_forward)))
        # Note [a backward that raised] in _reducer.py: before any hook of the stage
        handles.append(model.register_forward_pre_hook(
            EagerOnlyHook(self._stage.refuse_abandoned_backward_before_forward), prepend=True))
        # Note [refusing DistributedDataParallel]
        self._ddp_guard = DDPGuard(model, handles)
        # Note [gradient transforms]: first, before any hook of the stage gathers (stage 3:
        # on every unit, which a transform may call alone)
        refusal = GradientTransformRefusal(self.stage)
        for module in [model] + [u.module for u in self._plan.units if u.module is not model]:
            handles.append(module.register_forward_pre_hook(refusal, prepend=True))

    # -- lifetime ---------------------------------------------------------------------

    def __enter__(self) -> ZeroOptimizer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # the other ranks may not be leaving too: no collective, only local cleanup
            _comm.drop_pending()  # Note [collectives on a mesh]: never launched late
            self._detach()

    @outside_inference_mode
    @torch.no_grad()
    def close(self) -> None:
        """Hand the model back as an ordinary module and free this optimizer's buffers.

        Every hook is removed; every parameter holds its full current value (stage 3
        gathers them; with mixed precision the fp32 masters) in the dtype it had when
        this optimizer was built, and so does every buffer. With mixed precision a
        frozen parameter has no master: it comes back as its ``param_dtype`` value,
        cast to its old dtype (what it computed with). Collective at stage 3 or
        with mixed precision: call it on every rank. Idempotent; the optimizer cannot
        step afterwards, and a new ZeroOptimizer may be built over the model.
        """
        if self._stage is None:
            return
        if self._stage.switches.summoned:
            raise RuntimeError("close() inside `with opt.summon_full_params():` would hand back "
                               "parameters that the end of the block frees again; call it after "
                               "the block")
        self._stage.reducer.end_abandoned_backward()  # Note [a backward that raised]: dropped
        self._stage.wait_in_flight()
        self._inner.state.clear()  # first: room for the whole parameters (Note [parameters handed back])
        self._stage.unshard()  # stage 3: every unit gathered, and kept
        self._hand_back_parameters()
        restored: dict[int, torch.Tensor] = {}  # a buffer of several modules stays one
        for module in self._model.modules():
            for name, buffer in module._buffers.items():
                dtype = self._buffer_dtypes.get((id(module), name))
                if buffer is not None and dtype is not None and buffer.dtype != dtype:
                    module._buffers[name] = restored.setdefault(id(buffer), buffer.to(dtype))
        self._detach()
        _comm.release_finished()  # what the last collectives held (Note [finished work])

    @torch.no_grad()
    def _hand_back_parameters(self) -> None:
        """Note [parameters handed back]:
            Under a policy ``close()`` leaves every parameter its full current value, the
            fp32 master's (all-gathered bucket by bucket, in one order on every rank), in
            the dtype it was built with, with its strides and in memory of its own, as in
            any module. Each bucket's gathered master is freed as soon as its parameters
            are copied out, and zeroshard lets go of the bucket's ``param_dtype`` buffer
            then, and of the optimizer's state (with or without a policy) before any of
            it, so close() needs no memory beyond training's (``benchmarks/close_memory.py``,
            a 98M GPT, 2 ranks, AdamW: the RSS rises 0 MiB above its level before
            close(), where it rose 373 MiB at stages 1-2 with a policy, 348 and 547 MiB
            at stage 3 without and with one before: every master gathered at once, the
            state freed last). Until this change the parameters were views of each
            bucket's gathered master, a bucket's sharing one storage: Accelerate's
            ``save_model``, which keeps one tensor per storage, wrote 1 of 16 tensors
            with a warning only (helper-118), and safetensors refused the state dict.
            The ``param_dtype`` buffer is let go of, not emptied: the parameters viewed
            it, and so does what the loop took from them (a state dict taken before
            close(), which warns under a policy, or at stage 3 inside the last
            ``summon_full_params()``: that gather regrew the same storage). Emptied, as
            a first version and the release before it did, their next read was a
            segmentation fault on both ranks, at every stage (my probe under
            ``MALLOC_PERTURB_``; BatchNorm's fp32 bucket under a policy: helper-126).
            Nothing else holds it but the last collectives' works, which the gathers
            after it let go of (Note [finished work] in _comm.py): the RSS rose 0 MiB at
            every stage, stage 3 with a policy too (28 MiB when the buffers were emptied).

            Without a policy the parameters stay views of their buckets' buffers, which
            tensors the loop took from them view too: at stages 1-2 the parameters'
            memory from construction on (``final = model.state_dict()`` inside a ``with
            ZeroOptimizer(...)`` block, ``p.detach()``), at stage 3 a unit's gathered
            buffer, whose storage every gather grows again, close()'s too (a state dict
            taken inside the last ``summon_full_params()``). Freeing a storage under a
            view makes its next read a segmentation fault (helper-122's and helper-126's
            reviews of a first version: both ranks killed at stages 1-2, and at stage 3);
            leaving the buffers to reference counting would hold them beside the copies
            while the last collectives' works keep them (Note [finished work] in
            _comm.py): the parameters twice, above the training peak (stage 2 from 3
            ranks on; stage 3's close() holds the whole model already)."""
        if self.mixed_precision is not None:  # without one they stay views (above)
            self._view.take_outside_writes()  # the masters take what was written since
            trainable = {id(bucket) for bucket in self._plan.buckets}
            for bucket in self._plan.every_bucket:
                full = self._view.gather_shard(bucket.master) if id(bucket) in trainable else None
                for index, param in enumerate(bucket.params):
                    value = param.data if full is None else bucket.param_view(full, index)
                    param.data = value.to(self._param_dtypes.get(id(param), value.dtype), copy=True)
                if full is not None:  # the gathered master: nothing else views it
                    _comm.release([full])
                # the parameters' old memory: a state dict the loop took may view it
                bucket.flat = bucket.shard = None
        for param in self._model.parameters():  # the rest (frozen ones at stages 1-2)
            param.data = param.data.to(self._param_dtypes.get(id(param), param.dtype))
            param.grad = None  # stage 1's local gradient views its buffers

    def _detach(self) -> None:
        """Remove every hook and drop every buffer and state of this optimizer (local)."""
        if self._stage is None:
            return
        self._stage.remove_hooks()
        self._stage = None
        if self._constructed:
            self._ddp_guard.remove()
        self._plan, self._view, self._places = self._plan.emptied(), None, None
        self._inner.state.clear()
        for group in self.param_groups + self._inner.param_groups:
            group["params"] = []
        for param in self._model.parameters():
            entry = _owners.get(id(param))
            if entry is not None and entry[1]() is self:
                del _owners[id(param)]

    def _warn_of_a_state_dict_in_param_dtype(self, module, state_dict, *args) -> None:
        """Once per optimizer (Note [a state dict in param_dtype] in mixed_precision.py)."""
        if self._warned_of_param_dtype_state_dict or self._stage is None \
                or not holds_param_dtype_values(state_dict, self._plan.buckets):
            return
        self._warned_of_param_dtype_state_dict = True
        warnings.warn(
            f"zeroshard: model.state_dict() under a MixedPrecision policy holds the parameters' "
            f"{self.mixed_precision.param_dtype} values, not the fp32 masters the optimizer "
            "steps, so a checkpoint saved from it (save_pretrained, torch.save) loses their "
            "precision. For fp32 call zeroshard.save_full_model(path, model, opt) or "
            "opt.full_state_dict(), or read model.state_dict() inside `with "
            "opt.summon_full_params(full_precision=True):`, on every rank",
            stacklevel=levels_to_the_caller())

    @torch.no_grad()
    def _load_into_masters(self, module, state_dict, prefix, *args) -> None:
        """A pre-hook of ``load_state_dict`` on each module with parameters of its own:
        the masters take the loaded values of ``module``'s parameters at full precision;
        the parameters then receive their cast as usual."""
        if self._places is None:  # id(parameter) -> (bucket, index), once
            self._places = {id(p): (b, i) for b in self._plan.buckets
                            for i, p in enumerate(b.params)}
        for name, param in module._parameters.items():
            value = state_dict.get(prefix + name)
            if (param is not None and id(param) in self._places
                    and isinstance(value, torch.Tensor) and value.numel() == param.numel()):
                self._masters.load(*self._places[id(param)], value.reshape(param.shape))

    @property
    def state(self):
        """torch's ``opt.state``: every inner optimizer's state, keyed as torch's is by the
        tensors in ``param_groups`` (``_RoutedState`` in _inner.py)."""
        return self._inner.state

    @state.setter
    def state(self, value) -> None:
        """Note [the state assigned anew]:
            torch's way to reset every parameter's state (a momentum reset after a loss
            spike) assigns a new mapping, ``opt.state = collections.defaultdict(dict)``;
            torch's ``__init__`` makes its first one so. An attribute of the
            ``ZeroOptimizer``'s own took it while the inner optimizers kept their
            moments and went on from them, silently (helper-125: 1.8e-2 from DDP one step
            after the reset). An empty mapping clears the inner optimizers' state, as
            ``opt.state.clear()`` does; one with entries cannot be routed to the shards,
            and is refused."""
        if value is self._inner.state:
            return
        if len(value):
            raise TypeError(
                f"zeroshard: opt.state = {type(value).__name__} with {len(value)} entries: "
                "opt.state is this rank's shards' state, routed to the inner optimizers, and "
                "cannot be replaced. Assign an empty mapping or call opt.state.clear() to "
                "reset every parameter's state; set entries with opt.state[t] = {...} for t in "
                "opt.param_groups[i]['params'], or load a state with opt.load_state_dict")
        self._inner.state.clear()

    @property
    def model(self) -> nn.Module:
        """The module this optimizer was built over (and manages until ``close()``)."""
        return self._model

    @property
    def sharding(self) -> ShardingView:
        """A read-only view of what this optimizer shards and this rank's part of it
        (``zeroshard._plan.ShardingView``): the plan, the model, the shards and the
        inner optimizer, for checkpoint code and tests."""
        self._require_open()
        return self._view

    def _require_open(self) -> None:
        if self._stage is None:
            raise RuntimeError("this ZeroOptimizer was closed (close() or the end of its `with` "
                               "block); build a new one over the model to keep training")

    @property
    def _live(self):
        """The stage, or a clear error once ``close()`` has run."""
        self._require_open()
        return self._stage

    # -- the training loop ------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward calls inside accumulate gradients locally, with no communication.

        Same meaning as DDP's ``no_sync``: the first backward after the block reduces
        everything accumulated since ``zero_grad()``.
        """
        stage = self._live
        previous, stage.switches.require_sync = stage.switches.require_sync, False
        try:
            yield
        finally:
            stage.switches.require_sync = previous

    @contextlib.contextmanager
    def summon_full_params(self, full_precision: bool = False):
        """Inside, every parameter holds its full current value.

        Stage 3 gathers every unit and, on exit, keeps each rank's own slice of what
        the parameters hold then (so writes persist) and frees the full buffers.
        Stages 1 and 2 keep parameters whole anyway. Write the same value on every
        rank: each rank keeps only its own slice of a write. Blocks may nest.

        With a MixedPrecision policy the parameters hold their ``param_dtype`` casts;
        ``full_precision=True`` shows the fp32 masters instead, and writes made inside
        reach them exactly (an EMA teacher's update; collective at every stage: Note
        [full precision inside summon_full_params] in _masters_shown.py).
        """
        stage = self._live
        if not isinstance(full_precision, bool):
            raise TypeError(f"full_precision must be True or False, got {full_precision!r}")
        stage.refuse_abandoned_backward("opt.summon_full_params()")
        nested = stage.switches.summoned > 0  # the outermost gathers, and keeps writes on exit
        show = full_precision and self.mixed_precision is not None and not self._masters_shown
        stage.switches.summoned += 1
        try:
            with contextlib.nullcontext() if nested else stage.summon_full_params():
                shown = MastersShown(self._view, self._masters) if show else None
                try:
                    with shown or contextlib.nullcontext():
                        self._masters_shown = self._masters_shown or shown
                        try:
                            yield
                        finally:
                            if show:
                                self._masters_shown = None
                finally:
                    if show:  # the parameters changed dtype twice
                        stage.reducer.hook_new_accumulators()
        finally:
            stage.switches.summoned -= 1

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the reduced gradients by their global norm over all shards; return that norm.

        Returns the value ``torch.nn.utils.clip_grad_norm_`` would return on the
        DDP-reduced gradients of the model's parameters.
        """
        norm_type = float(norm_type)
        if not (norm_type > 0):
            raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
        _validate.check_trainable_unchanged(self._model, self._trainable_at_construction)
        _validate.check_parameters_unreplaced(self._model, self._parameter_ids)
        self._live.refuse_abandoned_backward("opt.clip_grad_norm_()")
        self._live.refuse_local_gradients("opt.clip_grad_norm_()")
        # 1. The reduced gradient shards, complete and in fp32 (the step uses fp32 anyway).
        self._live.wait_in_flight()
        self._live.claim_gradients()  # Note [gradient markers]
        for bucket in self._plan.buckets:
            bucket.claim_shown_gradient()  # Note [gradients the param groups show]
            self._masters.widen_gradient(bucket)
        grads = grad_shards(self._plan.buckets)
        # 2. This rank's term of the norm, combined over one replica's shard group (every
        #    replica holds the same shards) in one all-reduce.
        term = _clip.shard_norm_term(grads, norm_type, self._device)
        _comm.all_reduce(term, group=self._group.shard_only(), stats=self.comm_stats,
                         label=self._live.label, op=_clip.combine_op(norm_type))
        total = _clip.total_norm(term, norm_type)
        # 3. Scale the shards, and the local gradients a user may read.
        clip_coef = _clip.clip_coefficient(total, max_norm)
        _clip.scale_(grads, clip_coef)
        self._live.scale_local_gradients(clip_coef)
        return total

    @outside_inference_mode
    @torch.no_grad()
    def step(self, closure=None):
        """Step the inner optimizer on this rank's shards, then all-gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._live.switches.summoned and (self.stage == 3 or self._masters_shown):
            # stage 3's step releases the units the block holds gathered (torch's raw
            # "setStorage" error, or a crash with the masters shown: a reviewer's probe);
            # with the masters shown the parameters hold copies the block's end writes back
            raise RuntimeError(f"zeroshard stage {self.stage}: opt.step() inside `with "
                               "opt.summon_full_params():` would step parameters the block "
                               "holds; call it after the block")
        _validate.check_trainable_unchanged(self._model, self._trainable_at_construction)
        _validate.check_parameters_unreplaced(self._model, self._parameter_ids)
        refuse_per_sample_gradients(self._plan.buckets)  # Note [per-sample gradients]
        self._live.check_before_step()
        self._live.refuse_abandoned_backward("opt.step()")
        self._live.refuse_local_gradients("opt.step()")
        # 1. The reduced gradient shards, complete, in the masters' dtype.
        self._live.wait_in_flight()
        self._live.claim_gradients()  # Note [gradient markers]
        for bucket in self._plan.buckets:
            bucket.claim_shown_gradient()  # Note [gradients the param groups show]
            self._masters.widen_gradient(bucket)
        # 2. The masters: the hyper-parameters schedulers set on the outer groups (Note
        #    [settings both ways] in _inner.py), and (mixed precision) what was written to
        #    the parameters since the last step.
        self._settings.to_inner(self.param_groups, self._inner.param_groups)
        self._view.take_outside_writes()
        # 3. Step this rank's shards (the gradients as plain tensors: Note [a norm of a
        #    shard]), keeping still the parameters whose gradient the loop set to None
        #    since backward (Note [a gradient cleared before the step] in _cleared.py).
        held = HeldStill(self._plan.buckets, self._inner)
        with torch._C.DisableTorchFunctionSubclass():
            self._inner.step(then=held.restore)
        self._settings.to_outer(self.param_groups, self._inner.param_groups)
        # 4. Parameters follow: the masters' cast into the shards, then the stage's
        #    gathers (stages 1-2: every bucket; stage 3: none until the next forward).
        for bucket in self._plan.buckets:
            self._masters.to_shard(bucket)
        self._live.after_step()
        return loss

    def _take_loaded_settings(self, saved_groups: list[dict]) -> None:
        """A checkpoint's or full state dict's hyper-parameters, into the outer and the
        inner groups. A schedule-free class is then in the mode it was saved in, which
        ``_mode`` does not know: the next switch follows the shards whatever it asks (it
        skipped that once the mode asked for matched the one before the load, and the
        parameters stayed at the other point: a reviewer's probe, 2.6e-3 from DDP)."""
        for group, inner, saved in zip(self.param_groups, self._inner.param_groups, saved_groups):
            group.update(saved)
            inner.update(saved)
        self._mode = None

    def train(self) -> None:
        """Put an optimizer with a training mode (schedule-free AdamW and SGD) in it; Note
        [a mode switch of the optimizer]. Call it on every rank, as ``step()``."""
        self._switch_mode("train")

    def eval(self) -> None:
        """Put an optimizer with an evaluation mode (schedule-free: the parameters become
        the averaged point to evaluate) in it; Note [a mode switch of the optimizer]."""
        self._switch_mode("eval")

    @torch.no_grad()
    def _switch_mode(self, mode: str) -> None:
        """Note [a mode switch of the optimizer]:
            schedulefree's optimizers (``AdamWScheduleFree``, ``SGDScheduleFree``, and
            pytorch_optimizer's) step one point and evaluate another: ``opt.train()`` and
            ``opt.eval()`` move the parameters between them in place and flip the group's
            ``train_mode``. transformers' Trainer calls them in every training step and
            before evaluating, and schedulefree's ``step()`` refuses to run in eval mode.
            Here they call that method of each inner optimizer that has one, over this
            rank's shards and owned parameters, and where the mode asked for is another
            than the last one asked for (alike on every rank: whether a class flips a
            flag on its groups or on itself, as schedule-free wrappers do, whose switch a
            first version of this missed, a reviewer's probe), the parameters follow the
            shards as after a step (stages 1-2 all-gather, so call them on every rank;
            stage 3 gathers at the next forward; the masters' cast first under a policy),
            which is not counted as one. Called again in the mode it is in, it moves
            nothing and issues no collective; after a load the mode is unknown, and the
            next call follows the shards. Without these methods a user of such a class
            had no way to switch (an ``AttributeError``), and switching the inner
            optimizers by hand was refused at stages 1-2 or drifted (a helper's probes,
            1.6e-2 from DDP)."""
        self._require_open()
        switches = [getattr(o, mode) for o in self._inner.optimizers
                    if callable(getattr(o, mode, None))]
        if not switches:
            return
        self._run_on_inner(mode, switches)
        if mode == self._mode:
            return  # already in that mode: nothing moved
        self._mode = mode
        self._follow_shards()

    # Note [methods of the optimizer class]: the methods run through the ZeroOptimizer;
    # each writes its parameters element by element and returns nothing
    FORWARDED_METHODS = frozenset({
        "sync_lookahead",  # timm's Lookahead: the slow weights, at each epoch's end
    })

    def __getattr__(self, name: str):
        """Note [methods of the optimizer class]:
            A public method the optimizer class has beyond torch's ``Optimizer`` was not
            there: timm's ``Lookahead.sync_lookahead()``, which timm's training loop calls
            at each epoch's end where ``hasattr`` finds it, was skipped, silently (a
            helper's probe: 5.1e-3 from DDP after an epoch, 1.0e-2 after two). Such
            methods (``FORWARDED_METHODS``: element-wise writes of the parameters, nothing
            returned) now run on each inner optimizer whose class has them, over this
            rank's shards, and the parameters follow the shards as after a step, as
            ``train()`` / ``eval()`` do (stages 1-2 all-gather: call them on every rank).
            Any other public method of the class is refused where it is looked up,
            ``hasattr`` included (not an ``AttributeError``, which ``hasattr``
            would turn into a silent False): run over this rank's shards, a method that
            reads (pytorch_optimizer's ``get_global_gradient_norm()``, a count of the
            parameters) answers for this rank's shards, not DDP's, and a first version
            that ran them all then all-gathered hung when logging code called one on
            rank 0 alone (a reviewer's probe)."""
        inner = self.__dict__.get("_inner")  # unset while __init__ runs
        holders = [] if inner is None or name.startswith("_") else [
            o for o in inner.optimizers if callable(getattr(type(o), name, None))]
        if not holders:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name not in self.FORWARDED_METHODS:
            raise NotImplementedError(
                f"zeroshard: {type(holders[0]).__name__}.{name} is not run through a "
                "ZeroOptimizer: its inner optimizers hold this rank's shards, so the method "
                "would see those only (a value computed from them is not DDP's, and a write "
                "reaches the other ranks only through a collective). ZeroOptimizer runs "
                f"{', '.join(sorted(self.FORWARDED_METHODS))}, train() and eval() of the "
                "class; for the global gradient norm use opt.clip_grad_norm_(float('inf')) "
                "(Note [methods of the optimizer class] in zeroshard/optimizer.py)")

        def run_on_every_inner_optimizer(*args, **kwargs) -> None:
            self._run_method_of_inner(name, args, kwargs)
        run_on_every_inner_optimizer.__name__ = name
        return run_on_every_inner_optimizer

    def _run_method_of_inner(self, name: str, args: tuple, kwargs: dict) -> None:
        """Note [methods of the optimizer class]: ``opt.name()``."""
        self._require_open()
        if args or kwargs:
            raise TypeError(
                f"zeroshard: opt.{name}() runs {name} of the optimizer class on each inner "
                "optimizer, over this rank's shards, and takes no arguments: an argument (a "
                "param group, a tensor) would be one of the ZeroOptimizer's objects, which "
                "the inner optimizers do not hold (Note [methods of the optimizer class] in "
                "zeroshard/optimizer.py)")
        calls = [getattr(o, name) for o in self._inner.optimizers
                 if callable(getattr(type(o), name, None))]
        self._run_on_inner(name, calls)
        self._follow_shards()

    @torch.no_grad()
    def _run_on_inner(self, name: str, calls: list) -> None:
        """Methods of the inner optimizers that may move the shards: the settings synced
        both ways around them, the writes made outside a step taken first."""
        if self._live.switches.summoned and (self.stage == 3 or self._masters_shown):
            raise RuntimeError(f"zeroshard stage {self.stage}: opt.{name}() inside `with "
                               "opt.summon_full_params():` would move parameters the block "
                               "holds; call it after the block")
        self._live.wait_in_flight()
        self._settings.to_inner(self.param_groups, self._inner.param_groups)
        self._view.take_outside_writes()
        for call in calls:
            call()
        self._settings.to_outer(self.param_groups, self._inner.param_groups)

    @torch.no_grad()
    def _follow_shards(self) -> None:
        """The shards moved outside a step: the parameters follow, as after one."""
        for bucket in self._plan.buckets:
            self._masters.to_shard(bucket)
        self._live.follow_shards()

    @outside_inference_mode
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the reduced gradient shards and the parameters' local gradients.

        As torch's, ``p.grad`` becomes None, or with ``set_to_none=False`` zero where
        it was not None; stage 1 keeps that zero in its gradient buffers, stages 2 and
        3, which keep no full gradients, leave None, or with ``set_to_none=False`` a
        marker reading zero where the zeroed shard is (Note [gradient markers]:
        ``model.zero_grad()`` after it still clears the shard). The gradient shards
        that exist become zeros; a bucket with none yet keeps none, and the step skips
        it (Note [zeros only where a gradient was] in mixed_precision.py).
        """
        self._live.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Refused once constructed (torch's docstring, shown here before, said frozen
        layers could be added as training progresses): pass every group through
        ``param_groups=``, or ``close()`` and build a new ZeroOptimizer."""
        if self._constructed:
            raise NotImplementedError(
                "ZeroOptimizer cannot add param groups after construction (the shards are "
                "laid out then); pass every group through param_groups= when building it. To "
                "train parameters it does not train yet (unfreezing a backbone), opt.close() "
                "and build a new ZeroOptimizer over the model once they are unfrozen (passing "
                "them frozen at construction does not help: the step refuses parameters "
                "unfrozen after it)")
        super().add_param_group(param_group)

    def join_hook(self, **kwargs):
        """torch's ``Join`` (uneven numbers of batches across ranks) is refused on every
        rank, as ``Join`` builds its hooks, before any collective: it raised a bare
        AttributeError (a helper's probe)."""
        raise NotImplementedError(
            "ZeroOptimizer does not support torch.distributed.algorithms.Join: a rank out of "
            "batches would have to shadow every other rank's gathers and reductions. Give every "
            "rank the same number of batches (DistributedSampler(drop_last=True), or pad the "
            "last one), or stop every rank together once one runs out (all-reduce a flag each "
            "step)")

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state; loads back on the same world size (on
        a mesh: the same shard size and shard rank, in any replica)."""
        self._require_open()
        # torch's state-dict hooks (register_state_dict_pre_hook, ..._post_hook) run as in
        # torch's state_dict(); they were accepted and never called (a helper's probe).
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {
            "zeroshard_version": _STATE_DICT_VERSION,
            "stage": self.stage,
            "world_size": self._group.shard_size,  # every replica holds the same shards
            "rank": self._group.shard_rank,
            "bucket_numels": [list(b.layout.numels) for b in self._plan.buckets],
            "bucket_params": [list(b.param_names) for b in self._plan.buckets],
            "bucket_orders": _orders(self._plan.buckets),  # Note [memory order] in _bucket.py
            "param_groups": [hyperparameters(g) for g in self.param_groups],
            "inner": self._inner.state_dict(),
            # With mixed precision the fp32 masters are state the model's parameters
            # (their casts) cannot restore.
            "masters": [b.master.clone() for b in self._view.take_outside_writes()]
            if self.mixed_precision else None,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            changed = post_hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        return state_dict

    @outside_inference_mode
    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's ``state_dict()``; collective, call it on every rank. A rank
        that refuses its state dict makes every rank raise (one 4-byte all-reduce), so no
        rank is left alone in the gather below or in the next step's collectives."""
        self._require_open()
        loaded = {}

        def prepare_and_check() -> None:
            # torch's load hooks run as in torch's load_state_dict() (they were accepted
            # and never called: a helper's probe): the pre-hooks on a shallow copy, before
            # anything is checked (a hook that sets the resumed run's lr), inside the
            # shared check, so a hook that raises on one rank raises on every rank.
            loaded["state_dict"] = dict(state_dict) if isinstance(state_dict, dict) else state_dict
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                changed = pre_hook(self, loaded["state_dict"])
                if changed is not None:
                    loaded["state_dict"] = changed
            self._check_state_dict(loaded["state_dict"])

        _comm.run_and_share(prepare_and_check, group=self._group, stats=self.comm_stats,
                            label="load_state_dict", device=self._device)
        self._load_checked(loaded["state_dict"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checked(self, state_dict: dict) -> None:
        masters = state_dict.get("masters")
        self._inner.load_state_dict(state_dict["inner"])
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved_group)
        self._mode = None  # unknown: the loaded one (Note [a mode switch of the optimizer])
        if masters is None:
            return  # the parameters' shards are the masters: loading moved no weight
        with torch.no_grad():
            for bucket, master in zip(self._plan.buckets, masters):
                bucket.master.copy_(master)
                self._masters.to_shard(bucket)
        # The parameters follow the loaded masters on every rank, as after a step (stages
        # 1-2 gather; stage 3 gathers on demand). Only this rank's slice followed them
        # before, and until the next step the ranks ran different weights (a helper's probe).
        self._stage.after_step()

    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuse a state dict that this rank cannot load, naming why and the fix."""
        if not isinstance(state_dict, dict) or "zeroshard_version" not in state_dict:
            raise ValueError("not a ZeroOptimizer state dict (no 'zeroshard_version' key); "
                             "a plain torch optimizer state dict loads with load_full_state_dict")
        saved = (state_dict["world_size"], state_dict["rank"], state_dict["bucket_numels"])
        mine = (self._group.shard_size, self._group.shard_rank,
                [list(b.layout.numels) for b in self._plan.buckets])
        if saved != mine:
            raise ValueError(
                f"state dict was saved by rank {saved[1]} of {saved[0]} with bucket layout "
                f"{_summary(saved[2])}; this is rank {mine[1]} of {mine[0]} with layout "
                f"{_summary(mine[2])}. Load with as many shards (the world size, or the mesh's "
                "shard dimension), the same model and bucket_size_mb, or "
                "use zeroshard checkpoints to reshard")
        # Stages fill their buckets in other orders (stages 1-2 backward's, stage 3 the
        # units'), so equal sizes can hold other parameters: a probe loaded a stage-2
        # state into stage 3 and stepped the wrong parameters' state, silently. A state
        # dict from before the names were saved is checked by its stage instead.
        saved_params = state_dict.get("bucket_params")
        mine_params = [list(b.param_names) for b in self._plan.buckets]
        if (saved_params != mine_params if saved_params is not None
                else state_dict.get("stage", self.stage) != self.stage):
            raise ValueError(
                f"state dict was saved by a stage-{state_dict.get('stage')} optimizer whose "
                "buckets hold other parameters than this stage-"
                f"{self.stage} optimizer's (another stage, units= or parameter order); load "
                "it with the saving run's stage, units and model, or use zeroshard "
                "checkpoints to reshard across stages")
        # a state dict from before the orders held every parameter row-major
        saved_orders = state_dict.get("bucket_orders") or _orders(self._plan.buckets, row_major=True)
        if saved_orders != _orders(self._plan.buckets):
            raise ValueError(
                "state dict was saved from a model whose parameters had other memory formats "
                "(channels_last or row-major, Note [memory order] in zeroshard/_bucket.py); "
                "give the model the saving run's memory format, or use zeroshard checkpoints")
        masters = state_dict.get("masters")
        if (masters is not None) != (self.mixed_precision is not None):
            raise ValueError("state dict was saved with mixed_precision="
                             f"{'a policy' if masters is not None else 'None'}, this optimizer "
                             f"has {self.mixed_precision}; use zeroshard checkpoints to change it")
        if masters is not None and self._stage.switches.summoned:
            raise RuntimeError("opt.load_state_dict() with mixed precision inside `with "
                               "opt.summon_full_params():` loads the fp32 masters, which the end "
                               "of the block would overwrite with the gathered parameters' old "
                               "values (stage 3); call it after the block")

    def full_state_dict(self) -> tuple[dict, dict] | None:
        """``(model_state_dict, optimizer_state_dict)`` on rank 0 (None elsewhere), in
        plain PyTorch formats; collective, call it on every rank.

        The model state dict has the model's own keys, with the fp32 master values for
        the parameters this optimizer updates. The optimizer state dict is what
        ``optimizer_class`` over the same param groups (``model.parameters()`` by
        default) would hold, keyed the same way. Loading both into a plain model and
        ``optimizer_class`` continues training as this optimizer would.
        """
        self._live.refuse_abandoned_backward("opt.full_state_dict()")
        return _full_state.gather_full_state(self)

    @outside_inference_mode
    def load_full_state_dict(self, model_state_dict: dict | str | os.PathLike | None,
                             optimizer_state_dict: dict | None = None) -> None:
        """The reverse of ``full_state_dict``, on any world size and stage; collective.

        Pass the dicts on every rank, or on rank 0 only with None on the others: rank 0
        then sends them one bucket at a time, so no rank holds more than one bucket of
        the full model on its device (Note [full state from rank 0] in _full_state.py).
        ``optimizer_state_dict=None`` loads the model only (pretrained weights) and
        keeps the optimizer state. ``model_state_dict`` may be the path of a
        safetensors file or folder (``save_pretrained``'s, or ``zeroshard.save_full_model``'s):
        each rank reads only its ranges. Also loads a plain model's and a plain
        ``optimizer_class``'s state dicts. Checks both before changing anything."""
        self._refuse_load("opt.load_full_state_dict()")
        _full_state.load_full_state(self, model_state_dict, optimizer_state_dict)

    def _refuse_load(self, action: str) -> None:
        """Before a load (``action``), on every rank alike (no collective yet): after a
        backward that raised (Note [a backward that raised] in _reducer.py), and inside
        ``summon_full_params()`` at stage 3 or with the masters shown, where the load
        fills the shards (masters) and the end of the block wrote the parameters' values
        back over them (torch's raw "setStorage" error at stage 3, a helper's probe; at
        stages 1-2 with ``full_precision=True`` the load was undone silently, a
        reviewer's)."""
        self._live.refuse_abandoned_backward(action)
        if (self.stage == 3 or self._masters_shown) and self._live.switches.summoned:
            raise RuntimeError(f"zeroshard stage {self.stage}: {action} inside `with "
                               "opt.summon_full_params():` loads into the shards, which the end "
                               "of the block overwrites with the parameters; call it after the "
                               "block")

    @property
    def _rank(self) -> int:
        """This rank among every rank of the job, every replica's (``Ranks.rank``)."""
        return self._group.rank

    @property
    def _world_size(self) -> int:
        """Every rank of the job, every replica's (``Ranks.size``)."""
        return self._group.size

    @property
    def _device(self) -> torch.device:
        """Where this optimizer's tensors (and its small collectives' tensors) live."""
        return self._plan.device

    def sharding_report(self) -> dict:
        """How evenly the ranks of one shard group share the optimizer's work, from the
        layout (the same on every rank; no communication). Per shard rank:
        ``elements`` it steps, ``stored`` elements of its shards (with padding: memory
        and collective bytes follow these), and ``work`` per optimizer class (elements,
        or for a class stepped whole its cost, e.g. Muon's m * n * min(m, n) per matrix,
        Note [whole-parameter ownership] in _layout.py). ``imbalance`` is max/mean of
        each; ``padding`` is stored over stepped elements, summed over ranks."""
        self._require_open()
        return work_balance(self._plan, self._inner.classes)

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds now, from the real storages (each storage counted once)."""
        return live_report(self._model, self._plan.every_bucket, self._live, self._inner.state)


def _owner_of(param) -> ZeroOptimizer | None:
    """The ZeroOptimizer that manages ``param`` now (not closed, not freed), if any."""
    entry = _owners.get(id(param))
    return entry[1]() if entry is not None and entry[0]() is param else None


def _current_owner(params) -> ZeroOptimizer | None:
    """A ZeroOptimizer that manages one of ``params`` now (not closed, not freed), if any."""
    for stale in [k for k, (param, owner) in _owners.items() if param() is None or owner() is None]:
        del _owners[stale]  # a freed parameter's id may be reused
    return next((owner for owner in map(_owner_of, params) if owner is not None), None)


def _orders(buckets, row_major: bool = False) -> list[list[list[int]]]:
    """Each bucket's parameters' memory orders (``row_major``: as if all were row-major)."""
    return [[list(range(len(order))) if row_major else list(order) for order in b.orders]
            for b in buckets]


def _summary(bucket_numels: list) -> str:
    return f"{len(bucket_numels)} buckets, {sum(map(sum, bucket_numels))} elements"
