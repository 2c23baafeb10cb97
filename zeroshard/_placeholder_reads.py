"""Stage 3's check, in the first step, that no forward computes with a released unit's placeholders.

Note [placeholders read in the first forwards]:
    Outside its unit's forward a stage-3 parameter is a placeholder: NaN of its shape
    (Note [stage-3 placeholders] in _bucket.py). A module that computes with another
    unit's parameters where that unit is released computes with NaN. Where autograd
    saves the parameter for backward, the unit's saved-tensor hooks refuse it (Note
    [saved tensors] in _saved_tensors.py); but a read that autograd does not save (a
    norm of the weight, ``w.detach()``: peft's DoRA reads its base layer's weight so,
    and without LoRA dropout after the base layer's unit was released), and every read
    inside activation checkpointing (whose own saved-tensor hooks take the place of the
    units') or a ``no_grad`` forward, trained NaN from the first step with no error
    (a helper's probes). So while the first step records the schedule (Note [gather
    schedule] in _walk.py), each forward of the model runs under a torch function mode
    that refuses an operation making a new tensor from a placeholder: one whose inputs
    include a tensor on a placeholder's memory and whose tensor outputs are not on that
    memory. Views, metadata (``p.dtype``, ``p.shape``), ``p.data = ...`` and new tensors
    shaped like it (``torch.zeros_like(p)``) pass. The reads a model makes are the same
    in every step but where its data decides them, so the first step sees them; every
    rank runs the same forward, so every rank refuses at the same operation, before its
    next collective. It costs a Python call per operation, in the first step only. A
    forward that ``torch.compile`` runs, or that runs a compiled module, is not
    checked: with the mode on its stack, dynamo traced zeroshard's hooks and HF GPT-2's
    forward into errors (a first version's probes); a function compiled inside the
    forward is run as it is while dynamo traces it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# operations that make a tensor shaped like their input without reading its values
_MADE_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
              torch.rand_like, torch.randn_like, torch.Tensor.new_zeros,
              torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
              torch.Tensor.new_tensor}


def runs_compiled_modules(model: torch.nn.Module) -> bool:
    """``model`` or a module in it was compiled (``torch.compile(m)``, ``m.compile()``)."""
    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


class PlaceholderReads(TorchFunctionMode):
    """Refuses an operation that computes a new tensor from a released unit's
    placeholders. ``owners``: each bucket's placeholder storage address -> (unit,
    bucket), as ``SavedTensorWatches`` keeps them."""

    def __init__(self, owners: dict) -> None:
        super().__init__()
        self._owners = owners

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # a function the forward compiles: dynamo
            return func(*args, **kwargs)  # inlines this, and its graph stays as it was
        out = func(*args, **kwargs)
        if func in _MADE_LIKE:
            return out
        read = _placeholders_in(tree_flatten((args, kwargs))[0], self._owners)
        if read and any(_storage(t) not in read for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor)):
            tensor, (unit, bucket) = next(iter(read.values()))
            name = bucket.param_names[tensor.storage_offset()]
            raise RuntimeError(
                f"zeroshard stage 3: {getattr(func, '__name__', func)} computed with parameter "
                f"{name!r}, which belongs to unit {unit.name} and is released there: outside "
                "that unit's forward it is a NaN placeholder (a weight read by a module "
                "that is not in its unit: a norm of it, w.detach(), an adapter reading its "
                "base layer's weight, a weight tied functionally). Choose units so that the "
                "module reading a parameter holds it or is an ancestor of its unit: pass "
                f"units= without {type(unit.module).__name__} (e.g. the decoder layer class)")
        return out


def _placeholders_in(tensors, owners: dict) -> dict:
    """The placeholder storages among ``tensors``: address -> (a tensor on it, its owner)."""
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            address = _storage(tensor)
            if address in owners:
                found[address] = (tensor, owners[address])
    return found


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested: not a placeholder
        return None
