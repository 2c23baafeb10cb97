"""What a stage-3 parameter is between the passes that gather it.

Note [released parameters]:
    Between forward passes a stage-3 parameter holds a NaN placeholder of its shape
    (Note [stage-3 placeholders] in _bucket.py): each rank keeps only its shard. A read
    of it there computed with the NaN and went on silently: an EMA of the weights
    (``ema.lerp_(p, 1 - decay)``, timm's ``ModelEmaV2``, ``AveragedModel.update_parameters``)
    became NaN, a regulariser computed after ``model(x)`` (a custom ``compute_loss``
    adding ``sum(p.pow(2).sum() ...)``) trained NaN while HF ``Trainer`` logged loss 0.0,
    SAM's ``functional_call(model, {n: p + e})`` ran on NaN, and ``copy.deepcopy(model)``
    and ``torch.save(model)`` kept NaN (the README's rows, helpers' probes). So while its
    unit is released, and the model is between passes (no forward or backward of its
    runs, no ``summon_full_params()`` block), a parameter takes a class of its own
    (``ReleasedParameter``, a subclass of its class, so ``isinstance`` holds), and a read
    of its values, a write to them or a read into another tensor in place is refused
    where it is made, naming the parameter and ``summon_full_params()``; what reads no
    values (shape, dtype, ``numel()``, ``.grad``, ``requires_grad_()``, the ``*_like``
    constructors) goes on as before (Note in _absent_values.py for what reads). A view
    (``p.data``, ``p.detach()``, ``p[rows]``) is a ``ReleasedView``, refused alike: it
    views the placeholder, which stays NaN after the unit is gathered again. Printing
    either names it instead of showing NaN. A gather gives the parameter its class back
    before it holds values, so a forward and a backward run on plain parameters.

    Inside a pass nothing changes: a module of a released unit called there is refused
    by its own hook (Note [called outside its unit's forward] in stage3.py), and the
    rest (a hook of the user's reading another unit's weight) is the README's.
    ``p.data = t`` between passes is an attribute, refused when the unit is next gathered
    (``refuse_writes_while_released`` in _bucket.py), as before. A parameter class
    with a ``__torch_function__`` of its own keeps its class and its NaN.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import _absent_values as absent_values
from ._hooks import LoopSwitches, Phase

_ATTRIBUTE = "_zeroshard_released"  # on a released parameter: (its name, the stage's switches)
_ALLOWED_IN_PLACE = {"requires_grad_"}


class ReleasedParameter(nn.Parameter):
    """A stage-3 parameter while its unit is released (Note [released parameters])."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded(func, args, kwargs)


class ReleasedView(torch.Tensor):
    """A view of a released parameter's placeholder (``p.data``, ``p.detach()``): refused
    like the parameter, whenever it is used."""

    parameter_name = ""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _guarded(func, args, kwargs)


def _name_if_refused(tensor) -> str | None:
    """The name of a released parameter (or a view of one) whose values cannot be read now."""
    if isinstance(tensor, ReleasedView):
        return tensor.parameter_name
    if isinstance(tensor, ReleasedParameter):
        name, switches = tensor.__dict__.get(_ATTRIBUTE, (None, None))
        # a hook running in backward reads it before the stage's phase says so (a root
        # module's backward hook, as backward begins): the pass's own rules apply there
        if (name is not None and switches.phase is Phase.IDLE and not switches.summoned
                and torch._C._current_graph_task_id() == -1):
            return name
    return None


def _guarded(func, args, kwargs):
    name = absent_values.name_of(func)
    released = [(t, n) for t in tree_flatten((args, kwargs))[0]
                if (n := _name_if_refused(t)) is not None]
    if not released:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
    first = released[0][1]
    if name in absent_values.SHOWN:  # a print or a log line: no values to show
        return (f"{first} (zeroshard stage 3: released between forward passes, a NaN "
                "placeholder; read it inside `with opt.summon_full_params():`)")
    ours = [t for t, _ in released]
    if absent_values.is_in_place(name, kwargs, True) and name not in _ALLOWED_IN_PLACE:
        written = [t for t in absent_values.written(torch.Tensor, args, kwargs)
                   if any(t is o for o in ours)]
        if written:
            raise RuntimeError(refusal(_name_if_refused(written[0]), f"was written ({name})",
                                       "the write would be lost"))
        raise RuntimeError(refusal(first, f"was read into another tensor in place ({name}: "
                                          "an EMA or a copy of the weights)",
                                   "that tensor would take the NaN"))
    result, views, reads = absent_values.run(func, name, args, kwargs, ours)
    if reads or name == "__deepcopy__":  # a copy of a view holds the NaN
        raise RuntimeError(refusal(first, f"was read ({name})", "it would compute with the NaN"))
    if not views:
        return result
    return tree_map(lambda t: _view_of(first, t) if id(t) in views else t, result)


def _view_of(name: str, view: torch.Tensor) -> ReleasedView:
    """``view`` as a ``ReleasedView``, in its own autograd place: its class changes, where
    ``as_subclass`` would add a node (``p.view_as(p).grad_fn.next_functions[0][0]``, the
    way DDP and hooks find a parameter's accumulator, found another node)."""
    if type(view) is torch.Tensor:
        view.__class__ = ReleasedView
    else:
        view = view.as_subclass(ReleasedView)
    view.parameter_name = name
    return view


def refusal(name: str, what: str, why: str) -> str:
    return (f"zeroshard stage 3: parameter {name!r} {what} between forward passes, where it "
            f"holds a NaN placeholder ({why}): each rank keeps only its shard, and a unit's "
            "parameters are gathered only while a forward or backward runs it (Note [released "
            "parameters] in zeroshard/_released.py). Read or write parameters inside `with "
            "opt.summon_full_params():`, on every rank (a log line, an EMA update, a copy of "
            "the model: copy.deepcopy, AveragedModel, torch.save); compute a term of the loss "
            "from the parameters (a regulariser) inside the model's forward, or a wrapper "
            "module's built before ZeroOptimizer and passed to it; or use stage 1 or 2, which "
            "keep whole parameters")


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


def release(param: nn.Parameter, name: str, switches: LoopSwitches) -> None:
    """``param`` holds its placeholder now: reads of it are refused between passes."""
    if isinstance(param, ReleasedParameter):
        return
    released = _released_class(type(param))
    if released is not None:
        param.__dict__[_ATTRIBUTE] = (name, switches)
        param.__class__ = released


def restore(param: nn.Parameter) -> None:
    """``param`` is about to hold its values: its own class again."""
    if isinstance(param, ReleasedParameter):
        param.__class__ = _original_classes[type(param)]
        del param.__dict__[_ATTRIBUTE]
