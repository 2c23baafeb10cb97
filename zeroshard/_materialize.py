"""Placing a model on the device its shards live on, without building it whole there.

Note [one unit at a time]: ``ZeroOptimizer`` places the model in batches of buckets:
at stage 3 one batch per unit, at stages 1-2 one batch of every bucket (those stages
keep every full parameter anyway). For each batch, in order:

1. its buckets get their full buffers on the target device (``FlatBucket.materialize``):
   copies of the parameters, or NaN for parameters built under ``torch.device("meta")``;
2. the modules whose turn it is are initialised in place, by ``init_fn(module)`` or
   their ``reset_parameters()``, children before parents (as ``model.apply`` does,
   so a parent's init that overrides its children's, as Hugging Face's does, wins);
3. each batch whose modules are all initialised is finished: every parameter built
   on meta must hold a value now (a NaN left means no init gave it one: an error
   naming it, not a silent zero), rank 0's values are broadcast, each bucket keeps
   its shard and, at stage 3, the full buffers are freed.

A module's turn comes once every batch holding a parameter of its subtree is
materialized, and those batches stay full until then. A module whose subtree spans
several units (a model's root, a head tied to an embedding) would keep them all
full, so it is initialised with the batches of its own parameters instead, and
must not write into the parameters of the units inside it: that is checked (their
version counters) and refused, on every rank alike. So at stage 3 the device holds
the shards plus about one unit while the model is placed, and a model bigger than
one device can be built on meta. A model already on another device (a CPU model,
``device="cuda"``) moves the same way, unit by unit, and is not initialised.

Every rank walks the same batches in the same order, so the broadcasts match; the
values are rank 0's (any seed per rank is fine, as with DDP). Buffers and
parameters outside every bucket (frozen ones at stages 1-2) are small or kept whole
anyway: they are placed first, all at once, and broadcast at the end. If anything
raises while the model is placed, what was built on meta goes back to meta, so the
model can be passed again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import _absent_values as absent_values


def target_device(model: nn.Module, device) -> torch.device:
    """Where the shards live: ``device``, or the parameters' device when it is None."""
    current = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is None:
        if current.type == "meta":
            raise ValueError(
                "the model is on the meta device and device=None; pass device= (for example "
                "device='cuda' or device='cpu'), where ZeroOptimizer materializes its shards")
        return current
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cuda' or 'cpu', got "
                         f"{device!r}") from error
    if device.type == "meta":
        raise ValueError("device='meta' would leave the shards without values; pass the device "
                         "they should live on (for example 'cuda' or 'cpu')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _post_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module once, children before their parent (``model.apply``'s order)."""
    order: list[tuple[str, nn.Module]] = []
    _visit("", model, order, set())
    return order


def _visit(name: str, module: nn.Module, order: list, seen: set[int]) -> None:
    """``_post_order``'s walk (module-level: no recursive closure cycle)."""
    seen.add(id(module))
    for child_name, child in module.named_children():
        if id(child) not in seen:
            _visit(f"{name}.{child_name}" if name else child_name, child, order, seen)
    order.append((name or "<root>", module))


@dataclasses.dataclass
class Initialisation:
    """What placing a meta model initialises, and how (``plan_initialisation``)."""

    model: nn.Module
    modules: list[nn.Module]  # called in this order (children first)
    names: dict[int, str]  # id(module) -> its name, for messages
    init_fn: Callable | None
    meta_params: list[nn.Parameter]  # built on meta: each must get a value
    meta_buffers: list[tuple[nn.Module, str]]

    def __post_init__(self) -> None:
        self.slots = [(m, name, p) for m in self.model.modules()
                      for name, p in m._parameters.items()]
        self.trainable = {id(p): p.requires_grad for _, _, p in self.slots if p is not None}
        # name -> (integer tensor placed from meta, its version then): must be written
        self.placed_integers: dict[str, tuple[torch.Tensor, int]] = {}

    def run(self, module: nn.Module, guard=None) -> None:
        """Initialise ``module`` (inside ``guard``, a context manager, if given)."""
        with torch.no_grad(), guard or contextlib.nullcontext():
            if self.init_fn is not None:
                self.init_fn(module)
            else:
                module.reset_parameters()
        replaced, refrozen = [], []  # one pass over every slot, after each module's init
        for m, name, p in self.slots:
            if m._parameters.get(name) is not p:
                replaced.append(f"{self.names[id(m)]}.{name}")
            if p is not None and p.requires_grad != self.trainable[id(p)]:
                refrozen.append(f"{self.names[id(m)]}.{name}".lstrip("."))
        if refrozen:  # the plan sharded them as they were (a raw AttributeError came later)
            raise ValueError(
                f"initialising module {self.names[id(module)]!r} ({type(module).__name__}) "
                f"changed requires_grad of parameters {refrozen[:3]}, which ZeroOptimizer had "
                "already sharded as they were; freeze or unfreeze parameters before passing the "
                "model to ZeroOptimizer(...)")
        if replaced:
            raise ValueError(
                f"initialising module {self.names[id(module)]!r} ({type(module).__name__}) "
                f"replaced parameters {replaced[:3]} with new objects, which ZeroOptimizer does not "
                "manage; write the values into the parameters in place (torch.nn.init.*, "
                "p.copy_(...)) instead")


def plan_initialisation(model: nn.Module, init_fn: Callable | None) -> Initialisation:
    """Which modules a model built on meta needs initialised; checks, before any
    collective (every rank checks the same model), that it can be done."""
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be a function module -> None, got {init_fn!r}")
    order = _post_order(model)
    names = {id(m): name for name, m in order}
    tensors = [t for _, m in order for t in _own_tensors(m)]
    if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
        on_meta = [names[id(m)] for _, m in order if any(t.is_meta for t in _own_tensors(m))]
        elsewhere = [names[id(m)] for _, m in order if any(not t.is_meta for t in _own_tensors(m))]
        raise ValueError(
            f"some of the model's tensors are on the meta device (in {on_meta[:3]}) and some are "
            f"not (in {elsewhere[:3]}); build the whole model under torch.device('meta'), or "
            "none of it")
    meta_params = [p for p in model.parameters() if p.is_meta]
    for param in meta_params:
        if param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
            raise ValueError("a parameter built on the meta device has hooks; they would not "
                             "survive its materialization: register them after ZeroOptimizer(...)")
    meta_buffers = [(m, name) for _, m in order for name, b in m._buffers.items()
                    if b is not None and b.is_meta]
    if not meta_params and not meta_buffers:
        if init_fn is not None:
            raise ValueError("init_fn is given but no tensor of the model is on the meta device, "
                             "so nothing would call it; initialise the model before "
                             "ZeroOptimizer, or build it under torch.device('meta')")
        return Initialisation(model, [], names, None, [], [])
    if init_fn is not None:
        return Initialisation(model, [m for _, m in order], names, init_fn, meta_params,
                              meta_buffers)
    resettable = {id(m) for _, m in order if callable(getattr(m, "reset_parameters", None))}
    covered = set(resettable)
    for _, module in reversed(order):  # parents first: a resettable ancestor covers its subtree
        if id(module) in covered:
            covered.update(id(m) for m in module.modules())
    for name, module in order:
        if _own_tensors(module) and id(module) not in covered:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) holds tensors on the meta device but "
                "neither it nor a module above it has a reset_parameters() to give them values; "
                "pass init_fn=fn, called as fn(module) under torch.no_grad() for every module, "
                "children first (for a Hugging Face model: init_fn=model._init_weights)")
    return Initialisation(model, [m for _, m in order if id(m) in resettable], names, None,
                          meta_params, meta_buffers)


@dataclasses.dataclass
class PlacementStep:
    batch: int  # the batch whose buckets are materialized now
    initialise: list[nn.Module]  # then these modules, in order
    spanning: list[nn.Module]  # those of them whose subtree spans several batches
    finish: list[int]  # then these batches are checked, broadcast, sharded and (stage 3) freed


def placement_steps(batches: Sequence[Sequence], modules: Sequence[nn.Module]) -> list[PlacementStep]:
    """Note [one unit at a time]: which modules to initialise and which batches to
    finish after materializing each batch."""
    batch_of = {id(p): index for index, batch in enumerate(batches)
                for bucket in batch for p in bucket.params}
    ready_at, spans = {}, set()
    finish_at = list(range(len(batches)))
    for module in modules:
        subtree = {batch_of[id(p)] for p in module.parameters() if id(p) in batch_of}
        held = subtree
        if len(subtree) > 1:
            spans.add(id(module))
            held = {batch_of[id(p)] for p in module._parameters.values()
                    if p is not None and id(p) in batch_of}
        ready_at[id(module)] = max(held, default=0)
        for index in held:
            finish_at[index] = max(finish_at[index], ready_at[id(module)])
    steps = []
    for step in range(len(batches)):  # stage 3 has its root unit; stages 1-2 one batch
        now = [m for m in modules if ready_at[id(m)] == step]
        steps.append(PlacementStep(batch=step, initialise=now,
                                   spanning=[m for m in now if id(m) in spans],
                                   finish=[i for i, at in enumerate(finish_at) if at == step]))
    return steps


@contextlib.contextmanager
def writes_refused_inside_units(plan: Initialisation, module: nn.Module,
                                materialized: set[int], device: torch.device):
    """Run a spanning module's init (Note [one unit at a time]) refusing its writes into
    the parameters of the units inside it, which are not materialized then.

    Note [sentinels for a spanning init]:
        Those parameters are meta (their unit comes later) or stage-3 placeholders (it
        came before). A write into a meta tensor does nothing, and one through ``.data``
        (``p.data.normal_()``, as Hugging Face's inits of transformers 4 and many
        hand-written ones do) moves no version counter of the parameter: a parent's
        override of its child's init (GPT-2's scaled ``c_proj``) was lost, silently (a
        helper's probe: ``c_proj`` at twice its std with ``units=Conv1D``). So during
        the init the modules hold, in those parameters' places, sentinels: parameters
        of the same class, attributes and shape on ``device``, one element of the
        dtype's placeholder value repeated (stride 0). An in-place operation writing a
        sentinel (through any view, ``.data`` too), or writing another tensor from one (a
        parent copying a child's values into its own parameter), is refused before it
        runs, naming that parameter (``_SentinelWatch``); what escapes it (a write
        through a C++ path that skips ``__torch_function__``) either raises torch's
        overlap error for a stride-0 tensor or changes the one element or the address,
        checked after the init. Then the parameters go back in their places: nothing is
        swapped, so a failed init's traceback holding a sentinel keeps nothing from
        coming back. An init that kept the parameter objects themselves from before
        (a closure over ``model.parameters()``) writes them, not the sentinels: an
        in-place write there moves their version counter and is refused too; one
        through their ``.data`` is not seen."""
    outside = {id(p): name for name, p in module.named_parameters() if id(p) not in materialized}
    sentinels: dict[int, nn.Parameter] = {}
    for param in module.parameters():
        if id(param) in outside:
            one = torch.full((1,) if param.dim() else (), placeholder_value(param.dtype),
                             dtype=param.dtype, device=device)  # a 0-dim one stays 0-dim
            sentinel = nn.Parameter(one.expand(param.shape), param.requires_grad)
            sentinel.__class__ = type(param)
            sentinel.__dict__.update(param.__dict__)
            sentinels[id(param)] = sentinel
    slots = [(m, n, p) for m in module.modules() for n, p in m._parameters.items()
             if p is not None and id(p) in sentinels]
    originals = {id(p): (p, p._version) for _, _, p in slots}  # written if the init held them
    for m, name, param in slots:
        m._parameters[name] = sentinels[id(param)]
    before = {key: (s.untyped_storage().data_ptr(), s._version) for key, s in sentinels.items()}
    watch = _SentinelWatch({before[key][0]: outside[key] for key in sentinels})
    touched = None
    try:
        with watch:
            yield
    except _SentinelTouched as error:
        touched = [error.name], error.how
    except RuntimeError as error:
        if "more than one element of the written-to tensor" not in str(error):
            raise
        touched = sorted(outside.values()), "one of the parameters"
    finally:
        for m, name, param in slots:
            sentinel = sentinels[id(param)]
            if m._parameters.get(name) is sentinel:  # else replaced: run() says so
                m._parameters[name] = param
            # what the init set on it stays (a no_decay tag, requires_grad: a reviewer's
            # probe found them lost), as on a parameter initialised in its own unit
            param.__dict__.update(sentinel.__dict__)
            if param.requires_grad != sentinel.requires_grad:
                param.requires_grad_(sentinel.requires_grad)
    if touched is not None:
        raise ValueError(_written_inside(plan, module, *touched))
    written = [outside[key] for key, s in sentinels.items()
               if (s.untyped_storage().data_ptr(), s._version) != before[key]
               or not _still_placeholder(s.data) or originals[key][0]._version != originals[key][1]]
    if written:
        raise ValueError(_written_inside(plan, module, written))


def placeholder_value(dtype: torch.dtype):
    """What a stage-3 placeholder holds (Note [stage-3 placeholders]): NaN where the
    dtype has one; else its smallest value (for a signed integer, one an index or a
    count never holds; 0 for an unsigned one), False for bool. A frozen integer
    parameter's NaN fill failed construction (a helper's probe)."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _still_placeholder(sentinel: torch.Tensor) -> bool:
    """Its one element (stride 0) still holds the placeholder value."""
    if sentinel.numel() == 0:
        return True
    value, expected = sentinel.reshape(-1)[0], placeholder_value(sentinel.dtype)
    return bool(value.isnan()) if expected != expected else bool(value == expected)


class _SentinelTouched(Exception):
    def __init__(self, name: str, how: str) -> None:
        super().__init__(name)
        self.name, self.how = name, how


_NOT_WRITES = {"requires_grad_", "share_memory_"}  # in-place by name, writing no values


class _SentinelWatch(TorchFunctionMode):
    """During a spanning init: an in-place operation writing a sentinel (through any view,
    ``.data`` too), or writing another tensor from one (a parent copying a child's
    values into its own parameter), raises naming that parameter, before it runs."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self._names = names  # storage address -> parameter name

    def _sentinel(self, tensors) -> str | None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                name = self._names.get(tensor.untyped_storage().data_ptr())
                if name is not None:
                    return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self._names and name not in _NOT_WRITES and (name.endswith("_") and not name.endswith("__")
                            or name == "__setitem__" or name.startswith("__i")):
            target = self._sentinel(tree_flatten(absent_values.first_argument(args, kwargs))[0])
            if target is not None:
                raise _SentinelTouched(target, "parameters")
            source = self._sentinel(tree_flatten((args[1:], kwargs))[0])
            if source is not None:
                raise _SentinelTouched(source, "values into its own tensors from parameters")
        return func(*args, **kwargs)


def _written_inside(plan: Initialisation, module: nn.Module, written: list[str],
                    which: str = "parameters") -> str:
    return (f"initialising module {plan.names[id(module)]!r} ({type(module).__name__}) wrote "
            f"{which} {written[:3]} of the units inside it, which are not materialized while "
            "it is initialised (at stage 3 a module whose parameters lie in several units is "
            "initialised with its own parameters only, Note [one unit at a time] in "
            "zeroshard/_materialize.py); initialise those parameters from the modules that hold "
            "them, or choose units that contain the whole module")


@torch.no_grad()
def place_loose_tensors(plan: Initialisation, bucketed: set[int], device: torch.device) -> None:
    """Buffers, and parameters in no bucket, onto ``device``. From meta they hold NaN (0
    if integer: ``plan.placed_integers`` notes their version) until an init writes
    them, and ``refuse_missing_loose_values`` finds what none wrote."""
    placed: dict[int, torch.Tensor] = {}  # a buffer registered in two modules stays one
    for module_name, module in plan.model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is None or id(param) in bucketed or param.device == device:
                continue
            if param.is_meta:
                swap_in(param, _unset_like(param, device))
                if not param.is_floating_point():
                    plan.placed_integers[prefix + name] = (param, param._version)
            else:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is None or buffer.device == device:
                continue
            if id(buffer) not in placed:
                placed[id(buffer)] = _unset_like(buffer, device) if buffer.is_meta \
                    else buffer.to(device)
                if buffer.is_meta and not buffer.is_floating_point():
                    plan.placed_integers[prefix + name] = (placed[id(buffer)], 0)
            module._buffers[name] = placed[id(buffer)]


def _unset_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    value = float("nan") if tensor.is_floating_point() or tensor.is_complex() else 0
    return torch.full_like(tensor, value, device=device)


def swap_in(param: nn.Parameter, value: torch.Tensor) -> None:
    """Make the meta parameter ``param`` hold ``value`` (any device), staying the same
    Python object, of the same class, with the same attributes. Its ``.data`` cannot
    change device from meta, so the tensors are swapped (``torch.utils.swap_tensors``),
    which also swaps the class and ``__dict__``: both are put back."""
    cls, attributes = type(param), dict(param.__dict__)
    try:
        torch.utils.swap_tensors(param, nn.Parameter(value, param.requires_grad))
    except RuntimeError as error:
        if "weakref" not in str(error):
            raise
        raise ValueError(
            f"a parameter of shape {tuple(param.shape)} built on the meta device is held by a "
            "weak reference (a module keeping weakref.ref to its own weights), so it cannot "
            "be given memory in place (torch.utils.swap_tensors refuses it). Build that "
            "module on a real device (outside torch.device('meta')); nn.LSTM, nn.GRU and "
            "nn.RNN are handled (Note [weak references to meta parameters])") from error
    param.__class__ = cls
    param.__dict__.update(attributes)


# Note [weak references to meta parameters]:
#     A parameter built on meta gets its memory by ``torch.utils.swap_tensors``
#     (``swap_in``), which refuses a tensor that a weak reference points to. torch's
#     RNNs (nn.LSTM, nn.GRU, nn.RNN) keep one to each weight (``_flat_weight_refs``, to
#     see a weight replaced), so one built on meta failed every stage's construction
#     with torch's raw "Cannot swap t1 because it has weakref associated with it" (a
#     helper's probe). Their references are let go while the model is placed and made
#     again after, as torch's own ``RNNBase._apply`` does around a move; the list of
#     weights itself (``_flat_weights``) holds the same parameter objects throughout.
#     No ``flatten_parameters()``: on CUDA it would move the weights out of their bucket.
@contextlib.contextmanager
def weak_references_let_go(model: nn.Module):
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)
            and any(p.is_meta for p in m.parameters(recurse=False))]
    for rnn in rnns:
        rnn._flat_weight_refs = []
    try:
        yield
    finally:
        for rnn in rnns:
            rnn._flat_weight_refs = [weakref.ref(w) if w is not None else None
                                     for w in rnn._flat_weights]


def refuse_missing_values(plan: Initialisation, buckets: Sequence) -> None:
    """Raise, naming them, if parameters built on meta still hold NaN after their init."""
    built_on_meta = {id(p) for p in plan.meta_params}
    missing = [name for bucket in buckets for name in bucket.missing_values(built_on_meta)]
    if missing:
        raise ValueError(_missing_message(plan, "parameters", missing))


def refuse_missing_loose_values(plan: Initialisation, bucketed: set[int]) -> None:
    """The same for the meta-built parameters outside the buckets (stages 1-2: frozen)
    and for meta-built integer or bool tensors, which hold 0, not NaN, until written:
    those must have been written (their version counter) or replaced."""
    built_on_meta = {id(p) for p in plan.meta_params}
    missing = [name for name, p in plan.model.named_parameters()
               if id(p) not in bucketed and id(p) in built_on_meta and p.is_floating_point()
               and bool(p.isnan().any())]
    missing += [name for name, (tensor, version) in plan.placed_integers.items()
                if _loose_tensor(plan.model, name) is tensor and tensor._version == version]
    if missing:
        raise ValueError(_missing_message(plan, "parameters or buffers", missing))


def _loose_tensor(model: nn.Module, name: str):
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module._parameters.get(attribute, module._buffers.get(attribute))


def refuse_missing_buffer_values(plan: Initialisation) -> None:
    prefix = {id(m): "" if m is plan.model else plan.names[id(m)] + "." for m, _ in plan.meta_buffers}
    missing = [prefix[id(m)] + name for m, name in plan.meta_buffers
               if m._buffers[name].is_floating_point() and bool(m._buffers[name].isnan().any())]
    if missing:
        raise ValueError(_missing_message(plan, "buffers", missing))


def _missing_message(plan: Initialisation, what: str, missing: list[str]) -> str:
    how = "init_fn" if plan.init_fn is not None else "reset_parameters()"
    return (f"{what} {missing[:5]} were built on the meta device and {how} gave them no value "
            "(they would train from garbage); give every parameter and buffer a value in "
            "init_fn(module), called for every module, children first")


@torch.no_grad()
def back_to_meta(plan: Initialisation) -> None:
    """Placing failed: what was built on meta goes back to meta, so the model can be
    passed to ZeroOptimizer again and be placed from the start."""
    for module, name, param in plan.slots:  # parameters an init replaced come back
        module._parameters[name] = param
    for param in plan.meta_params:
        if not param.is_meta:
            swap_in(param, torch.empty_like(param, device="meta"))
    back: dict[int, torch.Tensor] = {}  # a shared buffer stays shared
    for module, name in plan.meta_buffers:
        buffer = module._buffers[name]
        if not buffer.is_meta:
            module._buffers[name] = back.setdefault(id(buffer),
                                                    torch.empty_like(buffer, device="meta"))
