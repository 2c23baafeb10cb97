"""Placing a model on the device its shards live on, without building it whole there.

Note [one unit at a time]: ``ZeroOptimizer`` places the model in batches of buckets:
at stage 3 one batch per unit, at stages 1-2 one batch of every bucket (those stages
keep every full parameter anyway). For each batch, in order:

1. its buckets get their full buffers on the target device (``FlatBucket.materialize``):
   copies of the parameters, or zeros for parameters built under ``torch.device("meta")``;
2. every module whose meta tensors are all real now is initialised in place, by its
   ``reset_parameters()`` or the user's ``init_fn(module)``;
3. each batch whose modules are all initialised is finished: rank 0's values are
   broadcast, each bucket keeps its shard and, at stage 3, the full buffers are freed.

So at stage 3 the device holds the shards plus about one unit while the model is
placed (a module whose parameters sit in several units, such as a head tied to an
embedding, keeps those units full until it is initialised), and a model bigger than
one device can be built on meta. A model already on another device (a CPU model,
``device="cuda"``) moves the same way, unit by unit. Every rank walks the same
batches in the same order, so the broadcasts match; the values are rank 0's (any
seed per rank is fine, as with DDP). Buffers and parameters outside every bucket
(frozen ones at stages 1-2) are small or kept whole anyway: they are placed first,
all at once, and broadcast at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn


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


def _has_meta_tensors(module: nn.Module) -> bool:
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return any(t is not None and t.is_meta for t in tensors)


def modules_to_initialise(model: nn.Module, init_fn: Callable | None) -> list[nn.Module]:
    """The modules holding meta parameters or buffers of their own, in model order.

    Raises (before any collective: every rank checks the same model) if one of them
    cannot be initialised: without ``init_fn`` each needs a ``reset_parameters()``.
    """
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be a function module -> None, got {init_fn!r}")
    chosen = [m for m in model.modules() if _has_meta_tensors(m)]
    if init_fn is None:
        names = {id(m): name or "<root>" for name, m in model.named_modules()}
        missing = [m for m in chosen if not callable(getattr(m, "reset_parameters", None))]
        if missing:
            module = missing[0]
            raise ValueError(
                f"module {names[id(module)]!r} ({type(module).__name__}) holds tensors on the "
                "meta device but has no reset_parameters() to give them values; pass "
                "init_fn=fn, called as fn(module) under torch.no_grad() for every module "
                "holding meta tensors (for a Hugging Face model: init_fn=model._init_weights)")
    return chosen


@torch.no_grad()
def place_loose_tensors(model: nn.Module, bucketed: set[int], device: torch.device) -> None:
    """Buffers, and parameters in no bucket, onto ``device`` (empty if on meta)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or id(param) in bucketed or param.device == device:
                continue
            if param.is_meta:
                torch.utils.swap_tensors(param, nn.Parameter(
                    torch.empty_like(param, device=device), param.requires_grad))
            else:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = (torch.empty_like(buffer, device=device) if buffer.is_meta
                                         else buffer.to(device))


@torch.no_grad()
def initialise(modules: Sequence[nn.Module], init_fn: Callable | None) -> None:
    for module in modules:
        if init_fn is not None:
            init_fn(module)
        else:
            module.reset_parameters()


@dataclasses.dataclass
class PlacementStep:
    batch: int | None  # the batch whose buckets are materialized now (None: no buckets)
    initialise: list[nn.Module]  # then these modules, in model order
    finish: list[int]  # then these batches are broadcast, sharded and (stage 3) freed


def placement_steps(batches: Sequence[Sequence], modules: Sequence[nn.Module]) -> list[PlacementStep]:
    """Note [one unit at a time]: which modules to initialise and which batches to
    finish after materializing each batch. A module is initialised once every batch
    holding one of its parameters is materialized; a batch is finished once every
    module writing into it is initialised."""
    batch_of = {id(p): index for index, batch in enumerate(batches)
                for bucket in batch for p in bucket.params}
    ready_at = {}
    finish_at = list(range(len(batches)))
    for module in modules:
        holding = {batch_of[id(p)] for p in module._parameters.values()
                   if p is not None and id(p) in batch_of}
        ready_at[id(module)] = max(holding, default=0)
        for index in holding:
            finish_at[index] = max(finish_at[index], ready_at[id(module)])
    return [PlacementStep(batch=step if step < len(batches) else None,
                          initialise=[m for m in modules if ready_at[id(m)] == step],
                          finish=[index for index, at in enumerate(finish_at) if at == step])
            for step in range(max(1, len(batches)))]
