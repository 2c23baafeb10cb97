"""What an operation does to a tensor whose values are not here: a gradient marker
(Note [gradient markers] in _grad_markers.py) or a released stage-3 parameter (Note
[released parameters] in _released.py). Both are ``torch.Tensor`` subclasses whose
``__torch_function__`` asks this module whether an operation reads their values, writes
them, or only looks (shape, dtype, a view, a template), and refuses what would compute
with the NaN they hold.

An operation reads values when its result has new memory it did not take from an
argument (``norm``, ``clone``, ``+``, ``==``), except the ``*_like`` and ``new_*``
constructors; or when it hands values to Python or another library (``item()``,
``tolist()``, ``bool()``, numpy, dlpack, pickling). A view (``.data``, ``[rows]``,
``unbind``, ``detach``) and a conversion of the tensor itself (``.half()``, ``.to(dtype)``)
read nothing and keep what the tensor is; a tensor converted like it (``x.to(t)``)
reads nothing. An attribute (``.grad``, ``.shape``) reads nothing.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

# Python's in-place operators, named as dunders (``t[rows] = 0``, ``t += g``); the other
# in-place operations end in one underscore
_IN_PLACE_DUNDERS = {f"__{op}__" for op in (
    "setitem", "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
    "iand", "ior", "ixor", "ilshift", "irshift")}
# Operations whose result has new memory without reading the values; autograd's
# ``torch.autograd.grad(loss, params)`` and ``backward`` take the tensors as graph inputs.
READ_NO_VALUES = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
                  "randn_like", "randint_like", "new_empty", "new_empty_strided", "new_zeros",
                  "new_ones", "new_full", "new_tensor", "__deepcopy__", "grad", "backward"}
# Operations that give the values to Python, or to another library.
_READ_TO_PYTHON = {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__",
                   "__complex__", "__index__", "__contains__", "is_nonzero", "equal", "allclose",
                   "__dlpack__", "__reduce_ex__"}
# The tensor converted to another dtype or device stays what it is (``model.half()``
# converts parameters and ``p.grad``); another tensor converted like it reads nothing.
_CONVERSIONS = {"to", "type", "half", "float", "double", "bfloat16", "cpu", "cuda", "_to_copy",
                "type_as"}
# An attribute's getter, setter or deleter (``t.grad``, ``t.data = x``): reads no values.
_ATTRIBUTE = {"__get__", "__set__", "__delete__"}
SHOWN = {"__repr__", "__str__", "__format__"}


def name_of(func) -> str:
    return getattr(func, "__name__", "")


def is_in_place(name: str, kwargs: dict | None, touched: bool) -> bool:
    """``name`` writes its first argument (or ``out=``, when ``touched``: one of ours is among
    the arguments, as in ``torch.add(ema, p.grad, out=ema)``)."""
    if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
        return True
    return touched and (kwargs or {}).get("out") is not None


def first_argument(args: tuple, kwargs: dict) -> list:
    """What an in-place operation writes, unless it takes ``out=``: its first argument (a
    list for the ``_foreach_`` ones), which ``torch.nn.init``'s functions pass by keyword
    to ``__torch_function__``."""
    return list(args[:1]) or [kwargs[k] for k in ("tensor", "input", "self") if k in kwargs][:1]


def written(cls: type, args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The tensors of class ``cls`` an in-place operation writes: ``first_argument``, or
    ``out=``."""
    kwargs = kwargs or {}
    target = kwargs.get("out")
    if target is None:
        target = first_argument(args, kwargs)
    return [t for t in tree_flatten(target)[0] if isinstance(t, cls)]


def run(func, name: str, args: tuple, kwargs: dict | None, ours: list[torch.Tensor]):
    """Run ``func`` as on ordinary tensors. Returns its result, the ids of the result's
    tensors that are views or conversions of ``ours`` (to be made ours in turn), and
    whether it read the values of ``ours``."""
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*args, **(kwargs or {}))
        if not ours or any(result is t for t in ours) or (
                name in _ATTRIBUTE and not isinstance(result, torch.Tensor)):
            return result, set(), False  # the tensor itself (an in-place op, ``to`` a no-op)
        homes = {t.untyped_storage().data_ptr() for t in ours}
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                 if isinstance(t, torch.Tensor)}
        tensors = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        views = {id(t) for t in tensors if t.untyped_storage().data_ptr() in homes}
        new = [t for t in tensors if t.untyped_storage().data_ptr() not in given]
    if name in _CONVERSIONS:
        if args and any(args[0] is t for t in ours):
            views.update(id(t) for t in new)
        new = []
    if name in _ATTRIBUTE:
        new = []
    reads = name in _READ_TO_PYTHON or (bool(new) and name not in READ_NO_VALUES)
    if name == "new_tensor":  # x.new_tensor(t) copies t's values: a read of t, not of x
        reads = any(t is o for t in tree_flatten((args[1:], kwargs))[0] for o in ours)
    return result, views, reads
