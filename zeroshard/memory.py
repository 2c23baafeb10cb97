"""Memory: the ZeRO paper's formula, and a live count of what a rank really holds.

``estimate_memory`` is Table 1 / §7 of Rajbhandari et al. (2020): per-rank bytes of
model states for plain data parallel and ZeRO stages 1-3. ``storage_bytes`` counts
real tensor storages, each storage once; ``live_report`` counts a rank's by category,
which is what ``memory_report()`` reports.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

CATEGORIES = ("parameters", "gradients", "optimizer_states", "master_parameters")


def estimate_memory(num_params: float, world_size: int, stage: int | None = None, *,
                    param_bytes: float = 2, grad_bytes: float = 2,
                    optimizer_bytes: float = 12, shard_size: int | None = None,
                    frozen_params: float = 0) -> dict:
    """Per-rank bytes of model states, by the ZeRO paper's formula.

    The defaults are mixed-precision Adam: 2-byte parameters and gradients and K=12
    bytes of optimizer state per parameter (fp32 master weight, momentum, variance).
    For fp32 Adam pass ``param_bytes=4, grad_bytes=4, optimizer_bytes=8``.

    With ``stage=None`` returns ``{"dp": ..., 1: ..., 2: ..., 3: ...}``; with a stage,
    that stage's figure alone (``stage=0`` is plain data parallel).

    ``shard_size`` S: hybrid sharding (``mesh=`` of world_size / S replicas × S
    shards), where every replica holds the model states divided by S, not by the
    world size.

    ``frozen_params``: parameters on top of ``num_params`` that do not train (a LoRA
    model's base weights): their weights only, ``param_bytes`` each (with mixed
    precision they are kept in the low precision, with no master), whole on every rank
    but at stage 3. Counted as trainable, a LoRA GPT-2's estimate read 2.4 to 3.8 times
    its run's ``memory_report()`` (a helper's probe).
    """
    num_params = _check_count("num_params", num_params, real=True)
    frozen_params = _check_count("frozen_params", frozen_params, real=True)
    world_size = _check_count("world_size", world_size, smallest=1)
    if shard_size is not None:
        shard_size = _check_count("shard_size", shard_size, smallest=1)
    # bytes per parameter may be fractional: 4-bit weights are 0.5
    param_bytes, grad_bytes, optimizer_bytes = (
        _check_count(name, value, real=True) for name, value in (
            ("param_bytes", param_bytes), ("grad_bytes", grad_bytes),
            ("optimizer_bytes", optimizer_bytes)))
    if stage is not None:  # read as the counts are: a whole float (2.0) or a tensor is its stage
        try:
            number = _check_count("stage", stage)
        except ValueError:
            number = None
        if number not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0 (plain data parallel), 1, 2 or 3; got {stage!r}")
        stage = number
    n = world_size if shard_size is None else shard_size
    if not (1 <= n <= world_size and world_size % n == 0):
        raise ValueError(f"shard_size must divide world_size ({world_size}) into replicas of "
                         f"equal size, got {shard_size}")
    psi = float(num_params)
    params, grads, states = param_bytes * psi, grad_bytes * psi, optimizer_bytes * psi
    frozen = param_bytes * float(frozen_params)
    table = {
        "dp": params + grads + states + frozen,
        1: params + grads + states / n + frozen,
        2: params + (grads + states) / n + frozen,
        3: (params + grads + states + frozen) / n,
    }
    if stage is None:
        return table
    return table["dp" if stage == 0 else stage]


def _check_count(name: str, value, smallest: int = 0, real: bool = False):
    """``value`` as a number of at least ``smallest``: a whole one (8.0 is 8) unless
    ``real`` (7.5e9 parameters, 0.5 bytes); a 0-dim tensor (a sum of ``numel()``) is its
    number. A bool, NaN, a negative count or a fraction of a rank gave nonsense figures
    (a helper's probe: negative bytes, "nan B")."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number < smallest or \
            (not real and number != int(number)):
        whole = "a finite number" if real else "a whole number"
        raise ValueError(f"{name} must be {whole} >= {smallest}, got {value!r}")
    return number if real else int(number)


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors``, skipping those already in ``seen``.

    ``seen`` is updated, so one set passed to several calls counts each storage once
    across all of them.
    """
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        key = storage_key(tensor)
        if key[1] and key not in seen:
            seen.add(key)
            total += key[1]
    return total


def live_report(model, every_bucket, stage, inner_state: dict) -> dict[str, int]:
    """``ZeroOptimizer.memory_report``: bytes this rank holds now per category, from the
    real storages (each storage counted once). ``stage`` is the assembled stage.

    Reading a storage's address and size reads no values, so released stage-3
    parameters' guard (Note [released parameters] in _released.py) is skipped: through
    it a report took 1.7 ms on 8 small blocks, 80 us without, and the suite's drawn
    cases, whose peak recorders report from every module's hooks, ran a fifth faster."""
    with torch._C.DisableTorchFunctionSubclass():
        return _live_report(model, every_bucket, stage, inner_state)


def _live_report(model, every_bucket, stage, inner_state: dict) -> dict[str, int]:
    # Released stage-3 parameters repeat one element each (Note [stage-3
    # placeholders]): a few bytes per bucket, not parameter memory.
    seen = {storage_key(b.placeholders) for b in every_bucket if b.placeholders is not None}
    params = list(model.parameters())
    report = {"parameters": storage_bytes(params + stage.parameter_tensors(), seen)}
    grads = [p.grad for p in params  # a marker of the gradient shards is not one
             if p.grad is not None and not stage.is_gradient_marker(p.grad)]
    grads += stage.gradient_tensors()
    report["gradients"] = storage_bytes(grads, seen)
    # Without mixed precision the masters are the parameters' own shards (counted above).
    report["master_parameters"] = storage_bytes(stage.master_tensors(), seen)
    # per-tensor entries, and what a class keeps under keys of its own (MADGRAD's count)
    states = [t for s in inner_state.values()
              for t in (s.values() if isinstance(s, dict) else [s]) if isinstance(t, torch.Tensor)]
    report["optimizer_states"] = storage_bytes(states, seen)
    return report
