"""Checks on ZeroOptimizer's arguments.

Every check here is local and deterministic, so each rank raises the same error
before ZeroOptimizer issues its first collective: bad input never leaves one rank
waiting in a broadcast that the others will not join.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from ._per_sample_gradients import refuse_per_sample_gradient_modules

# Optimizers whose update of each element depends only on that element's gradient
# and state (and on scalars such as the step count): running them on a flat 1-D
# shard of many parameters gives the same update as running them per parameter.
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = tuple(
    getattr(torch.optim, name) for name in
    ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop")
    if hasattr(torch.optim, name))


def check_stage(stage) -> None:
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")


def check_model(model) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "model is wrapped in DistributedDataParallel; ZeroOptimizer does the gradient "
            "reduction itself: pass the plain module (ddp_model.module) instead")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_per_sample_gradient_modules(model)  # Note [per-sample gradients]
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            raise ValueError(
                f"{name!r} is uninitialized (a lazy module such as nn.LazyLinear before its "
                "first forward): its shape is not known yet, so it cannot be sharded. Run one "
                "forward on a sample batch first (as DistributedDataParallel requires), then "
                "build the ZeroOptimizer")


# Optimizers that need a closure to re-evaluate the loss several times per step: the
# closure would run the model (and its collectives) on the owner ranks only.
CLOSURE_OPTIMIZERS: tuple[type, ...] = (torch.optim.LBFGS,)


def is_elementwise(optimizer_class: type) -> bool:
    """Whether ``optimizer_class`` may step flat shards that cut across parameters; the
    others step whole parameters (Note [whole-parameter ownership] in _layout.py). A
    subclass of an element-wise class is one only if it keeps that class's ``step``: a
    LARS written as ``class LARS(torch.optim.SGD)`` takes per-parameter norms in its
    own ``step``, and stepping it on flat shards was wrong, silently (a helper's probe:
    4.7e-3 from DDP). ``zeroshard_elementwise = True`` on a class says it is one."""
    if getattr(optimizer_class, "zeroshard_elementwise", False):
        return True
    return _elementwise_base(optimizer_class) is not None


def _elementwise_base(optimizer_class: type) -> type | None:
    """The torch element-wise class whose ``step`` ``optimizer_class`` keeps, if any."""
    step = _unwrapped(optimizer_class, "step")  # torch wraps step in profiling hooks
    return next((base for base in ELEMENTWISE_OPTIMIZERS
                 if issubclass(optimizer_class, base) and step is _unwrapped(base, "step")),
                None)


def steps_as_torch_elementwise(optimizer_class: type) -> bool:
    """Whether ``optimizer_class`` steps as one of torch's element-wise classes, its
    ``step`` and the ``_init_group`` that step calls both torch's: those keep every count
    and moment per tensor, none on the group, so stepping a group's tensors a few at a
    time is stepping them all at once (Note [a step in parts] in _inner.py). Unwrapped:
    torch.compile's first use wraps every torch optimizer class's ``_init_group`` in
    ``torch._dynamo.disable``, on the class itself (``AdamW`` gets a wrapper of its own
    around ``Adam``'s); compared as they were, a compile anywhere in the process turned
    the parts off (the suite's memory test, run after a compiled model's test)."""
    base = _elementwise_base(optimizer_class)
    return base is not None and (_unwrapped(optimizer_class, "_init_group")
                                 is _unwrapped(base, "_init_group"))


def _unwrapped(cls: type, name: str):
    method = getattr(cls, name, None)
    return None if method is None else inspect.unwrap(method)


def check_optimizer_class(optimizer_class, where: str = "optimizer_class") -> None:
    if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
        raise TypeError(
            f"{where} must be a torch.optim.Optimizer subclass such as torch.optim.AdamW "
            f"(the class, not an instance), got {optimizer_class!r}")
    if issubclass(optimizer_class, torch.optim.SparseAdam):
        raise TypeError(
            f"{where} is {optimizer_class.__name__}, which steps only the rows a sparse "
            "gradient touches; ZeroOptimizer reduces every gradient densely (a sparse "
            "embedding's too), and SparseAdam refuses dense gradients. Use torch.optim.Adam "
            "or AdamW: dense Adam, which also moves the rows a batch did not touch, as it "
            "does under DistributedDataParallel")
    if issubclass(optimizer_class, CLOSURE_OPTIMIZERS):
        raise TypeError(
            f"{where} is {optimizer_class.__name__}, which re-evaluates the loss through a "
            "closure several times per step; ZeroOptimizer cannot run that closure on the "
            "ranks that own each parameter only. Use an optimizer that steps once per "
            "gradient (any other torch.optim class)")


def check_optimizer_arguments(groups: list[dict], default: type, default_kwargs: dict) -> None:
    """Build each class's optimizer over stand-ins of its groups' parameters (on the meta
    device: no memory), so a bad hyper-parameter, or a parameter the class refuses
    (Muon takes 2-D matrices only), raises here on every rank, before any collective
    and before the parameters are sharded (a rank that owns none would not see it)."""
    from ._inner import class_of, hyperparameters  # noqa: PLC0415 (_inner imports torch only)
    for index, group in enumerate(groups):
        if group.get("optimizer_class") is not None:  # None: the positional class
            check_optimizer_class(group["optimizer_class"],
                                  f"param_groups[{index}]['optimizer_class']")
    for cls in dict.fromkeys(class_of(g, default) for g in groups):
        specs = [{**hyperparameters(g), "params": [torch.empty(p.shape, device="meta")
                                                   for p in g["params"] if p.requires_grad]}
                 for g in groups if class_of(g, default) is cls]
        if not any(spec["params"] for spec in specs):
            continue
        try:
            built = cls(specs, **(default_kwargs if cls is default else {}))
        except (ValueError, TypeError, RuntimeError) as error:
            message = f"{cls.__name__} refuses its param groups: {error}"
            try:  # the same type where it takes a message (subclasses may not)
                refusal = type(error)(message)
            except Exception:  # noqa: BLE001
                refusal = ValueError(message)
            raise refusal from error
        _refuse_differentiable(built, cls)


def _refuse_differentiable(built, cls: type) -> None:
    """``differentiable=True`` asks for a step autograd can differentiate through; the
    step runs on shards outside the model's graph, so nothing would be, and torch's
    differentiable arithmetic trained other numbers than its plain one (7e-6 off DDP in
    fp64 after 3 AdamW steps, where DDP refuses the in-place step on its leaves: a
    helper's probe)."""
    for index, group in enumerate(getattr(built, "param_groups", [])):
        if group.get("differentiable"):
            raise ValueError(
                f"{cls.__name__} with differentiable=True (param group {index}): zeroshard "
                "steps its shards outside autograd's graph, so no gradient would flow "
                "through the step; drop differentiable=True (to differentiate through "
                "optimizer steps, as in meta-learning, use plain torch or torch.func)")


def check_units(units, stage: int) -> None:
    if units is not None and stage != 3:
        raise ValueError(
            f"units={units!r} only applies to stage 3 (stage {stage} keeps parameters whole); "
            "drop the units argument or use stage=3")


def check_bucket_size(bucket_size_mb) -> None:
    if not isinstance(bucket_size_mb, (int, float)) or not bucket_size_mb > 0:
        raise ValueError(f"bucket_size_mb must be a positive number, got {bucket_size_mb!r}")


def check_not_managed(model: nn.Module, current_owner) -> None:
    """One ZeroOptimizer per parameter: two would both hook it and reduce it twice."""
    if current_owner is not None:
        raise ValueError(
            f"model is already managed by a ZeroOptimizer (stage {current_owner.stage}) that "
            "has not been closed; call opt.close() on it (on every rank) before building "
            "another ZeroOptimizer over the same model (a ZeroTrainer's: "
            "trainer.zero_optimizer.close())")
    for name, param in model.named_parameters():
        if _expanded(param) and not _still_a_placeholder(param):
            raise ValueError(
                f"parameter {name!r} is expanded (stride 0: several of its elements share one "
                "memory location), so no optimizer can update it in place (torch's fail on it "
                "too); make it a tensor of its own, nn.Parameter(t.clone())")
        if _holds_no_values(param):
            raise ValueError(
                f"parameter {name!r} holds no values: a stage-3 ZeroOptimizer was dropped without "
                "opt.close() while the parameters were sharded; close the optimizer (or use "
                "`with zeroshard.ZeroOptimizer(...) as opt:`) so the model gets its full "
                "parameters back, or load them with model.load_state_dict(...)")


def _holds_no_values(param: torch.Tensor) -> bool:
    """A view of freed storage, or a stage-3 placeholder (one element repeated)."""
    if param.device.type == "meta":
        return False
    if param.untyped_storage().nbytes() < param.numel() * param.element_size():
        return True
    return _expanded(param)


def _expanded(param: torch.Tensor) -> bool:
    return param.device.type != "meta" and any(
        stride == 0 and size > 1 for stride, size in zip(param.stride(), param.shape))


def _still_a_placeholder(param: torch.Tensor) -> bool:
    """An expanded parameter holding a stage-3 placeholder's value, from an optimizer
    dropped without ``close()``; another is the user's own ``expand`` (it was refused as
    such a placeholder: a reviewer's probe)."""
    from ._materialize import placeholder_value  # (it imports more than this module needs)
    with torch._C.DisableTorchFunctionSubclass():  # a released one refuses reads otherwise
        value, expected = param.detach().reshape(-1)[0], placeholder_value(param.dtype)
        return bool(value.isnan()) if expected != expected else bool(value == expected)


def check_trainable_unchanged(model: nn.Module, trainable: list[tuple[nn.Parameter, bool]]) -> None:
    """The buckets hold the parameters that required grad at construction: a parameter
    frozen or unfrozen since then would silently keep its old role. Runs every step:
    it compares the parameters recorded at construction and looks up a name only to
    report one."""
    for param, was in trainable:
        if param.requires_grad != was:
            name = next(n for n, p in model.named_parameters() if p is param)
            change = "unfrozen (requires_grad=True)" if param.requires_grad else \
                "frozen (requires_grad=False)"
            raise RuntimeError(
                f"parameter {name!r} was {change} after the ZeroOptimizer was built, which "
                "sharded it as it was; to change which parameters train, call opt.close() "
                "(on every rank) and build a new ZeroOptimizer over the model")


def check_parameters_unreplaced(model: nn.Module, known: frozenset[int]) -> None:
    """Every parameter of the model is one the optimizer was built over: a new
    ``nn.Parameter`` put in a module since (``model.head.weight = nn.Parameter(t)``, or
    one added: a new module, peft's ``add_adapter``) would get no reduction and no step,
    and one it replaced a step with no gradient."""
    new = [p for m in model.modules() for p in m._parameters.values()
           if p is not None and id(p) not in known]  # every step: no names until needed
    if new:
        name = next(n for n, p in model.named_parameters() if p is new[0])
        raise RuntimeError(
            f"parameter {name!r} is a new nn.Parameter put in the model after the "
            "ZeroOptimizer was built (replacing one it shards and steps, or added: a new "
            "module, peft's add_adapter), which it neither reduces nor steps. Write new "
            "values into the existing parameter instead (with torch.no_grad(): p.copy_(t), "
            "or model.load_state_dict); to change the model, opt.close() and build a new "
            "ZeroOptimizer over it")


def check_devices(model: nn.Module) -> None:
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        meta = " (or build all of it under torch.device('meta'))" \
            if any(d.type == "meta" for d in devices) else ""
        raise ValueError(
            f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
            f"ZeroOptimizer shards one device per rank: move the model with model.to(device){meta}")


# Note [memory two tensors share]:
#     ZeroOptimizer gives every parameter memory of its own: a slot of a flat bucket
#     (``FlatBucket.materialize``), a stage-3 shard. Two parameter objects tied through
#     their memory (``dec.weight = nn.Parameter(enc.weight.data.t())``, the old way of
#     tying a transposed weight), or a buffer that is a view of a parameter
#     (``self.register_buffer("wt", self.weight.detach().t())``), stopped sharing it
#     there, and trained apart from DDP's, where the memory stays one, silently (a
#     helper's probe: 9.9e-3 from DDP after 4 SGD steps at every stage; at stage 3 the
#     buffer's broadcast was refused as a write to a released parameter, naming no
#     buffer). So at construction the parameters and buffers are compared by the
#     addresses they cover (across storages: two tensors made by ``torch.from_numpy``
#     from overlapping slices of one array have storages of their own), and an overlap
#     that would train apart is refused, naming both and the fixes: one with a trainable
#     parameter, and at stage 3 also a buffer over a frozen parameter (its broadcast
#     writes the memory the released parameter had). Frozen parameters that share
#     memory with each other or with a buffer otherwise never change, so copies of them
#     hold the same values: a tie split by ``load_state_dict(assign=True)`` under a LoRA
#     model's frozen base was refused by a first version of this check (a reviewer's
#     probe; 0.0 from DDP without it). Disjoint views of one storage (a model loaded
#     with ``torch.load(mmap=True)`` and ``load_state_dict(assign=True)``) are not
#     refused either: each is copied out whole. Not seen: a plain tensor attribute
#     (``self.wt = self.weight.detach().t()``), which the old spectral norm uses for a
#     weight it recomputes in every forward, so refusing those would refuse it.
def check_memory_not_shared(model: nn.Module, stage: int) -> None:
    spans = []
    for what, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            covered = _addresses_covered(tensor)
            if covered is not None:
                trainable = what == "parameter" and tensor.requires_grad
                spans.append(_Span(*covered, what, name, trainable))
    active = []  # the spans seen so far, in this space, that reach past the current start
    for span in sorted(spans, key=lambda span: (span.space, span.first, span.end)):
        active = [other for other in active if other.space == span.space and other.end > span.first]
        for other in active:
            buffer_over_parameter = {other.what, span.what} == {"parameter", "buffer"}
            if other.trainable or span.trainable or (stage == 3 and buffer_over_parameter):
                raise ValueError(_shared_memory_refusal(other, span))
        active.append(span)


class _Span(NamedTuple):
    """The memory a parameter or buffer can read (Note [memory two tensors share])."""
    space: int  # 0 (real addresses), or a meta storage's identity
    first: int
    end: int
    what: str  # "parameter" or "buffer"
    name: str
    trainable: bool


def _addresses_covered(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(address space, first address, end address) of the memory ``tensor`` can read:
    space 0 and real addresses, or on meta, which has no addresses, its storage's
    identity and offsets in it (a tie made under ``torch.device("meta")`` trained apart
    where the same model built on CPU was refused: a reviewer's probe, 6.8e-1). None
    where it holds no memory of its own here (empty, a tensor subclass without it)."""
    if tensor.numel() == 0:
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    try:
        if tensor.device.type == "meta":
            space = tensor.untyped_storage()._cdata
            first = tensor.storage_offset() * tensor.element_size()
        else:
            space, first = 0, tensor.data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return space, first, first + extent * tensor.element_size()


def _shared_memory_refusal(first: _Span, second: _Span) -> str:
    fix = ("share one nn.Parameter object instead (model.b = model.a, as Hugging Face's "
           "tie_weights does), or compute one from the other in forward "
           "(F.linear(x, self.a.weight.t()))")
    if "buffer" in (first.what, second.what):
        fix = ("make the buffer from the parameter in forward, or register a copy of it "
               "(.clone())")
    return (f"{first.what} {first.name!r} and {second.what} {second.name!r} share memory: "
            "ZeroOptimizer gives each parameter memory of its own, so they would no longer "
            "share it and would train apart from DistributedDataParallel's, silently. To "
            f"keep them together, {fix} (Note [memory two tensors share] in "
            "zeroshard/_validate.py)")


def normalize_param_groups(model: nn.Module, param_groups) -> list[dict]:
    """torch-style groups (None, an iterable of parameters, or of dicts) as a list of dicts.

    Every parameter that requires grad must be in exactly one group: a gradient that
    is reduced but never applied would be work for nothing, so it is an error.
    """
    # Keyed by id(): tensors compare element-wise, so they make poor dict keys.
    names = {id(param): name for name, param in model.named_parameters()}
    if param_groups is None:
        return [{"params": list(model.parameters())}]
    _refuse_a_set(param_groups, "param_groups")
    groups = list(param_groups)
    if not groups:
        raise ValueError("param_groups is empty; pass None to optimize all of model's parameters")
    if all(isinstance(g, torch.Tensor) or _is_named(g) for g in groups):
        groups = [{"params": groups}]
    result, owner = [], {}
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param_groups[{index}] must be a dict with a 'params' entry, "
                            f"got {type(group).__name__}")
        params = group["params"]
        _refuse_a_set(params, f"param_groups[{index}]['params']")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for position, param in enumerate(params):
            _check_group_member(param, index, position, names, owner)
        result.append({**group, "params": params})
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(
            f"parameters {missing} require grad but are in no param group; add them to a "
            "group, or call requires_grad_(False) on them")
    return result


def _refuse_a_set(collection, where: str) -> None:
    """As torch's optimizers do: a set's order differs from rank to rank and from launch
    to launch, and a state dict numbers the parameters in it (a helper's probe: a resumed
    run gave same-shaped weights each other's Adam state, silently)."""
    if isinstance(collection, (set, frozenset)):
        raise TypeError(f"{where} is a {type(collection).__name__}, whose order changes "
                        "between ranks and runs, and the optimizer's state is kept in that "
                        "order: pass a list (e.g. [p for p in model.parameters() if ...])")


def _is_named(entry) -> bool:
    return (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], torch.Tensor))


def _check_group_member(param, index: int, position: int, names: dict, owner: dict) -> None:
    where = f"param_groups[{index}]['params'][{position}]"
    if _is_named(param):  # torch's optimizers take model.named_parameters() too
        raise TypeError(
            f"{where} is a (name, parameter) pair ({param[0]!r}), as model.named_parameters() "
            "gives; param_groups takes the parameters themselves: [p for _, p in pairs]")
    if not isinstance(param, torch.Tensor) or id(param) not in names:
        what = (f"shape {tuple(param.shape)}" if isinstance(param, torch.Tensor)
                else f"{type(param).__name__} {param!r}"[:80])
        raise ValueError(
            f"{where} ({what}) is not a parameter of model; param_groups may only name "
            "tensors from model.parameters()")
    if id(param) in owner:
        raise ValueError(
            f"{where} is parameter {names[id(param)]!r}, already named in "
            f"param_groups[{owner[id(param)]}]; list each parameter in exactly one group")
    owner[id(param)] = index

