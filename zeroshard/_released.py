"""What a stage-3 parameter is while its unit is released.

Note [released parameters]:
    While its unit is released a stage-3 parameter holds a NaN placeholder of its shape
    (Note [stage-3 placeholders] in _bucket.py): each rank keeps only its shard. A read
    of it computed with the NaN and went on silently. Between passes: an EMA of the
    weights (``ema.lerp_(p, 1 - decay)``, ``AveragedModel.update_parameters``) became
    NaN, a regulariser computed after ``model(x)`` (a custom ``compute_loss`` adding
    ``sum(p.pow(2).sum() ...)``) trained NaN while HF ``Trainer`` logged loss 0.0, SAM's
    ``functional_call(model, {n: p + e})`` ran on NaN, and ``copy.deepcopy(model)`` and
    ``torch.save(model)`` kept NaN (the README's rows, helpers' probes). Inside the model's forward: another unit's weight
    read after that unit ran (a loss term from every block's weight computed in the
    root's forward, MAML's inner loop inside the forward with ``units=nn.Linear``), an
    evaluation forward returning NaN and a training forward training NaN (a probe).

    So while its unit is released a parameter takes a class of its own
    (``ReleasedParameter``, a subclass of its class under its name, so ``isinstance``
    and a check of the class's name hold), and a read of its values, a write to them or
    a read into another tensor in place is refused where it is made, naming the
    parameter: between passes (no forward or backward runs, no ``summon_full_params()``
    block) with ``summon_full_params()`` as the fix, inside a forward with its unit and
    ``units=``. What reads no values (shape, dtype, ``numel()``, ``.grad``,
    ``requires_grad_()``, the ``*_like`` constructors) goes on as before
    (_absent_values.py says what reads). A view (``p.data``, ``p.detach()``, ``p[rows]``)
    is a ``ReleasedView``, refused alike whenever it is used: it views the placeholder,
    which stays NaN after the unit is gathered again. Printing either names it instead
    of showing NaN. A gather gives the parameter its class back before it holds values,
    so a unit's own forward and backward run on plain parameters.

    A module of a released unit called outside its unit's forward is refused by its own
    hook first (Note [called outside its unit's forward] in stage3.py). In backward (a
    graph task runs, whatever the stage's phase says yet: a root module's backward hook
    runs before it moves) and inside ``summon_full_params()`` nothing is refused:
    backward gathers what it reads. ``p.data = t`` is an attribute, refused when the
    unit is next gathered (``refuse_writes_while_released`` in _bucket.py), as before.
    A parameter class with a ``__torch_function__`` of its own keeps its class and its
    NaN.

Note [collectives into a released parameter]:
    ``dist.broadcast(p.data, 0)`` or ``dist.all_reduce(p)`` (parameters synced by hand)
    handed c10d the placeholder, one element long under the parameter's shape, and gloo
    wrote every element of the shape there: the heap was corrupted (``malloc_consolidate():
    invalid chunk size``, or a hang; a helper's probe). torch 2.13's collectives hand
    their first tensor argument to its ``__torch_function__`` first, so a released
    parameter or a view of its placeholder given as that tensor is refused here, whatever
    the phase (a backward hook runs while other units are released), on every rank that
    passes one before it joins: the in-place ones (``broadcast``, ``all_reduce``,
    ``reduce``), the inputs of the gathers and scatters, ``send`` and ``recv`` (only the
    rank passing one refuses; its peer waits to the timeout). Not seen: a released
    parameter in a list argument or as a later output (``scatter``'s list,
    ``all_to_all_single``'s output: a helper's probe crashed there, as before); inside
    ``summon_full_params()`` each parameter is whole and goes through.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _absent_values as absent_values
from ._hooks import LoopSwitches, Phase

# on a released parameter: (its name, its unit's name, the stage's switches)
_ATTRIBUTE = "_zeroshard_released"
_ALLOWED_IN_PLACE = {"requires_grad_"}


class ReleasedParameter(nn.Parameter):
    """A stage-3 parameter while its unit is released (Note [released parameters])."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded(func, args, kwargs)


class ReleasedView(torch.Tensor):
    """A view of a released parameter's placeholder (``p.data``, ``p.detach()``,
    ``p[:n]``): refused like the parameter, whenever it is used."""

    released_as = (None, None, None)  # the parameter's (name, unit, switches)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded(func, args, kwargs)


def _released_as(tensor) -> tuple | None:
    """(the parameter's name, its unit's, the stage's switches) of a released parameter or
    a view of its placeholder; None for any other tensor."""
    if isinstance(tensor, ReleasedView):
        return tensor.released_as
    if isinstance(tensor, ReleasedParameter):
        return tensor.__dict__.get(_ATTRIBUTE)
    return None


def _refused_now(tensor) -> tuple[str, str | None, bool] | None:
    """(the name, the unit whose forward it was read outside (inside a forward), whether its
    optimizer was freed) of a released parameter or a view of one whose values cannot be
    read now; None if they can."""
    released_as = _released_as(tensor)
    if released_as is None:
        return None
    name, unit, switches = released_as
    if isinstance(tensor, ReleasedView):  # the placeholder's, whenever it is read
        inside_a_forward = switches.phase in (Phase.FORWARD, Phase.FORWARD_NO_GRAD)
        return name, unit if inside_a_forward else None, switches.freed
    if name is not None and switches.freed:  # a released parameter from here on
        return name, None, True
    # a hook running in backward reads it before the stage's phase says so (a root
    # module's backward hook, as backward begins): backward's own rules apply there
    if name is None or switches.summoned or torch._C._current_graph_task_id() != -1:
        return None
    if switches.phase is Phase.IDLE:
        return name, None, False
    if switches.phase in (Phase.FORWARD, Phase.FORWARD_NO_GRAD):
        return name, unit, False
    return None


# Attributes whose value is a view of the tensor (made a ReleasedView below); the others
# (``grad``, ``shape``, ``_version``) read no values, and zeroshard's own loops read them
# on every parameter each step (10 calls per parameter: a reviewer's profile), so they
# skip the checks.
_VIEWING_ATTRIBUTES = {"data", "T", "mT", "H", "mH", "real", "imag"}


def _guarded(func, args, kwargs):
    name = absent_values.name_of(func)
    if name == "__set__" or (name == "__get__" and getattr(  # (a Python property has no name)
            func.__self__, "__name__", "data") not in _VIEWING_ATTRIBUTES):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
    if getattr(func, "__module__", None) == "torch.distributed.distributed_c10d":
        _refuse_a_collective_into_a_placeholder(name, args, kwargs)
    released = [(t, r) for t in tree_flatten((args, kwargs))[0] if (r := _refused_now(t)) is not None]
    if not released:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
    (first_tensor, first), ours = released[0], [t for t, _ in released]
    if name in absent_values.SHOWN:  # a print or a log line: no values to show
        return (f"{first[0]} (zeroshard stage 3: released, a NaN placeholder; read it inside "
                "`with opt.summon_full_params():`)")
    if absent_values.is_in_place(name, kwargs, True) and name not in _ALLOWED_IN_PLACE:
        written = [r for t, r in released
                   if any(t is w for w in absent_values.written(torch.Tensor, args, kwargs))]
        if written:
            raise RuntimeError(refusal(written[0], f"was written ({name})", "the write would be lost"))
        raise RuntimeError(refusal(first, f"was read into another tensor in place ({name}: "
                                          "an EMA or a copy of the weights)",
                                   "that tensor would take the NaN"))
    result, views, reads = absent_values.run(func, name, args, kwargs, ours)
    if reads or name == "__deepcopy__":  # a copy of a view holds the NaN
        raise RuntimeError(refusal(first, f"was read ({name})", "it would compute with the NaN"))
    if not views:
        return result
    released_as = _released_as(first_tensor)
    return tree_map(lambda t: _view_of(released_as, t) if id(t) in views else t, result)


_NAMED_BEFORE = {"all_gather_single": "all_gather_into_tensor",  # torch 2.13's new names
                 "reduce_scatter_single": "reduce_scatter_tensor"}


def _refuse_a_collective_into_a_placeholder(name: str, args, kwargs) -> None:
    """Note [collectives into a released parameter]: phase aside, a tensor holding a
    placeholder may not reach c10d."""
    for tensor in tree_flatten((args, kwargs))[0]:
        released_as = _released_as(tensor)
        if released_as is None or released_as[0] is None:
            continue
        parameter, _, switches = released_as
        collective = name + (f"() ({_NAMED_BEFORE[name]}" if name in _NAMED_BEFORE else "(")
        raise RuntimeError(
            f"zeroshard stage 3: parameter {parameter!r} was passed to "
            f"torch.distributed.{collective}) while its unit is released: it holds a NaN "
            "placeholder one element long, where the collective would read or write all its "
            "elements, past the end of that memory (Note [collectives into a released "
            "parameter] in zeroshard/_released.py). "
            + ("Its ZeroOptimizer was freed without close(), so its values are gone"
               if switches.freed else
               "Pass parameters to collectives inside `with opt.summon_full_params():`, on "
               "every rank, where each is whole"))


def _view_of(released_as: tuple, view: torch.Tensor) -> ReleasedView:
    """``view`` as a ``ReleasedView``, in its own autograd place: its class changes, where
    ``as_subclass`` would add a node (``p.view_as(p).grad_fn.next_functions[0][0]``, the
    way DDP and hooks find a parameter's accumulator, found another node)."""
    if type(view) is torch.Tensor:
        view.__class__ = ReleasedView
    else:
        view = view.as_subclass(ReleasedView)
    view.released_as = released_as
    return view


def refusal(refused: tuple[str, str | None, bool], what: str, why: str) -> str:
    name, unit, freed = refused
    note = " (Note [released parameters] in zeroshard/_released.py)"
    if freed:
        return (f"zeroshard stage 3: parameter {name!r} {what}, but the ZeroOptimizer that "
                "held its shards was freed without close(), so its values are gone: it holds "
                f"a NaN placeholder ({why})" + note + ". Call opt.close() before dropping a "
                "stage-3 ZeroOptimizer (it gives the model whole parameters back); build "
                "this model again")
    if unit is not None:
        return (f"zeroshard stage 3: parameter {name!r} {what} inside the model's forward but "
                f"outside the forward of unit {unit}, which holds it and had released it to a "
                f"NaN placeholder ({why}): a unit's parameters are gathered only while its "
                "own forward runs" + note + ". Read a parameter inside the forward of the "
                "module that holds it (a loss term from a block's weights: each block adds "
                "its own), or choose units= so that the module reading it holds its unit "
                "(e.g. the block class, or a module that contains both), or use stage 1 or 2")
    return (f"zeroshard stage 3: parameter {name!r} {what} between forward passes, where it "
            f"holds a NaN placeholder ({why}): each rank keeps only its shard, and a unit's "
            "parameters are gathered only while a forward or backward runs it" + note + ". "
            "Read or write parameters inside `with opt.summon_full_params():`, on every rank "
            "(a log line, an EMA update, a copy of the model: copy.deepcopy, AveragedModel, "
            "torch.save); compute a loss term from the parameters (a regulariser) inside the "
            "forward of the module that holds them (each block adds its own), or use weight "
            "decay; or use stage 1 or 2, which keep whole parameters")


_released_classes: dict[type, type | None] = {}
_original_classes: dict[type, type] = {}


def _released_class(cls: type) -> type | None:
    """The class a released parameter of class ``cls`` takes: ``ReleasedParameter`` mixed
    into ``cls``, under ``cls``'s name (code that checks a parameter's class by name, as
    peft does for bitsandbytes' ``Params4bit``, still finds it); None for a class with a
    ``__torch_function__`` of its own (it keeps its class, and reads NaN)."""
    if cls not in _released_classes:
        own = cls.__torch_function__ is not nn.Parameter.__torch_function__
        released = None if own or not issubclass(cls, nn.Parameter) else type(
            cls.__name__, (ReleasedParameter, cls), {"__qualname__": cls.__qualname__})
        _released_classes[cls] = released
        if released is not None:
            _original_classes[released] = cls
    return _released_classes[cls]


def release(param: nn.Parameter, name: str, unit: str, switches: LoopSwitches) -> None:
    """``param`` (of ``unit``) holds its placeholder now: reads of it are refused."""
    if isinstance(param, ReleasedParameter):
        return
    released = _released_class(type(param))
    if released is not None:
        param.__dict__[_ATTRIBUTE] = (name, unit, switches)
        param.__class__ = released


def restore(param: nn.Parameter) -> None:
    """``param`` is about to hold its values: its own class again."""
    if isinstance(param, ReleasedParameter):
        param.__class__ = _original_classes[type(param)]
        del param.__dict__[_ATTRIBUTE]
