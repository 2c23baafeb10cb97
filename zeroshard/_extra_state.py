"""Modules' extra state (``get_extra_state`` / ``set_extra_state``) in checkpoints and full
state dicts.

Note [modules' extra state]:
    A module may keep state that is neither a parameter nor a buffer and hand it to
    ``model.state_dict()`` through ``get_extra_state`` (Transformer Engine's FP8 scaling
    metadata, a quantizer's running amax, a step counter), under the key
    ``<module>._extra_state``; ``load_state_dict`` gives it back through
    ``set_extra_state``. ``save_checkpoint`` wrote parameters, optimizer state and
    buffers only, so a resumed run went on with each such module's state as it was
    built, silently (a helper's probe: an amax 1.396 came back 0.0, a counter 3 where the
    run that never stopped had 6), and ``load_full_state_dict`` refused its own
    ``full_state_dict()``'s ``_extra_state`` keys as another model's. Rank 0's state is
    saved, as its buffers are (Note [buffers a checkpoint holds] in checkpoint.py), and
    given to every rank's module by a load. A module registered under two names is
    saved once, under its first. A checkpoint whose extra state is another model's is
    refused, naming the modules. A checkpoint saved before this holds none: it leaves
    the modules' state as it is, and so does a full state dict without a module's key
    (a safetensors file, which holds tensors only). Extra state the weights-only unpickler
    would refuse is refused at the save (Note [a checkpoint that loads] in
    checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

KEY = "_extra_state"


def modules_with_extra_state(model: nn.Module, every_name: bool = False) -> dict[str, nn.Module]:
    """``<module name>._extra_state`` -> module, for each module whose class gives extra
    state (torch's test in ``state_dict``): once each, or under ``every_name`` it is
    registered by (as ``model.state_dict()`` holds it)."""
    return {f"{name}.{KEY}" if name else KEY: module
            for name, module in model.named_modules(remove_duplicate=not every_name)
            if type(module).get_extra_state is not nn.Module.get_extra_state}


def collect(model: nn.Module) -> dict[str, object]:
    return {key: state_of(key, module) for key, module in modules_with_extra_state(model).items()}


def state_of(key: str, module: nn.Module):
    """``module.get_extra_state()``; one that fails says where (a stage-3 module whose
    ``get_extra_state`` reads its parameters, released between passes, failed with the
    released-parameter refusal alone: helper-103)."""
    try:
        return module.get_extra_state()
    except Exception as error:
        raise RuntimeError(
            f"zeroshard: {key}: {type(module).__qualname__}.get_extra_state() raised ({error}). "
            "At stage 3 a module's parameters are released between passes, so a "
            "get_extra_state that reads them runs only inside `with opt.summon_full_params():` "
            "(call save_checkpoint or full_state_dict there)") from error


def to_device(saved: dict, device) -> dict:
    """The tensors of saved extra state on ``device``, in memory of their own (a
    checkpoint's are read memory-mapped to the CPU), as the module had them."""
    return tree_map(lambda value: value.to(device, copy=True)
                    if isinstance(value, torch.Tensor) else value, saved)


def check_saved(saved: dict, model: nn.Module, where: str) -> None:
    """Raise, naming the difference, unless ``saved`` holds exactly the model's modules."""
    mine = set(modules_with_extra_state(model))
    missing, unexpected = sorted(mine - set(saved)), sorted(set(saved) - mine)
    if missing or unexpected:
        raise ValueError(f"{where} does not hold this model's modules' extra state "
                         f"(get_extra_state): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}. Load it into the model it was saved from")


def restore(model: nn.Module, saved) -> None:
    """Give each module its extra state in ``saved`` (a mapping, by any of the module's
    names); modules ``saved`` lacks keep theirs."""
    for key, module in modules_with_extra_state(model, every_name=True).items():
        if key in saved:
            module.set_extra_state(saved[key])
