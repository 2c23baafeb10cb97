"""Full state dicts in plain PyTorch formats: gathered from the shards, and loaded into them.

The optimizer state dict follows ``torch.optim.Optimizer.state_dict()``: ``state``
keyed by the index of each parameter in the param groups taken in order (what a
plain ``optimizer_class`` over the same groups would use), per-element states
shaped like their parameter, and ``param_groups`` with their hyper-parameters and
those indices.
"""

from __future__ import annotations

import torch

from . import _comm
from ._sharded_state import bucket_states, load_from, parameter_names, split_state


@torch.no_grad()
def gather_full_state(opt) -> tuple[dict, dict] | None:
    values, states = _gather_parameters(opt)
    model = opt._model
    with opt.summon_full_params():  # stage 3: model.state_dict() reads gathered parameters
        model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in values:
            model_sd[name] = values[id(param)]
    if opt._rank != 0:
        return None
    index_state, groups, index = {}, [], 0
    for members, group in zip(opt._group_members, opt.param_groups):
        indices = []
        for param in members:
            if id(param) in states:
                index_state[index] = states[id(param)]
            indices.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    return model_sd, {"state": index_state, "param_groups": groups}


def _gather_parameters(opt) -> tuple[dict, dict]:
    """id(param) -> full fp32 master value (updated parameters only), and -> its optimizer
    state in the plain layout; all-gathered, so every rank gets them."""
    gathered = opt._gather_masters()
    values = {key: value.clone() for key, value in gathered.items()}
    # The gathered buffers are copied out; finished works still refer to them, so
    # free them now rather than later (Note [finished work] in _comm.py).
    _comm.release(gathered.values())
    states = {}
    for bucket, scalars, per_element in bucket_states(opt):
        full = {key: opt._gather_shard(tensor) for key, tensor in sorted(per_element.items())}
        for index, param in enumerate(bucket.params):
            states[id(param)] = {**{k: v.clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in scalars.items()},
                                 **{k: bucket.param_view(full[k], index).clone() for k in full}}
        _comm.release(full.values())
    return values, states


class FullStateSource:
    """Serves ``load_from`` ranges of full (unsharded) tensors."""

    def __init__(self, opt, model_sd: dict, optim_sd: dict) -> None:
        names = parameter_names(opt._model)
        self.params = {name: p for name, p in opt._model.named_parameters()}
        self.model_sd = model_sd
        members = [p for group in opt._group_members for p in group]
        self.state_of = {names[id(p)]: optim_sd["state"].get(i, optim_sd["state"].get(str(i)))
                         for i, p in enumerate(members)}

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.model_sd[name].reshape(-1)[start:stop]

    def states(self, name: str, start: int, stop: int) -> dict:
        _, per_element = split_state(self.state_of.get(name) or {}, self.params[name])
        return {k: v.reshape(-1)[start:stop] for k, v in per_element.items()}

    def optimizer_layout(self, name: str):
        if not self.state_of.get(name):
            return None
        scalars, per_element = split_state(self.state_of[name], self.params[name])
        return scalars, sorted(per_element)


def check_full_state(opt, model_sd: dict, optim_sd: dict) -> None:
    """Raise, naming the difference, if the two dicts do not fit this model and optimizer."""
    if not isinstance(model_sd, dict) or not isinstance(optim_sd, dict):
        raise TypeError("load_full_state_dict takes (model_state_dict, optimizer_state_dict), "
                        f"two dicts; got {type(model_sd).__name__}, {type(optim_sd).__name__}")
    expected = {name: tuple(p.shape) for name, p in opt._model.named_parameters(remove_duplicate=False)}
    expected.update({name: tuple(b.shape) for name, b in opt._model.named_buffers()
                     if name in _persistent_buffer_names(opt._model)})
    missing = sorted(set(expected) - set(model_sd))
    unexpected = sorted(set(model_sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"model_state_dict does not fit this model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}; save it from the same model class")
    for name, shape in expected.items():
        if tuple(model_sd[name].shape) != shape:
            raise ValueError(f"model_state_dict[{name!r}] has shape {tuple(model_sd[name].shape)}, "
                             f"this model's has {shape}")
    groups = optim_sd.get("param_groups")
    sizes = [len(g) for g in opt._group_members]
    saved_sizes = [len(g["params"]) for g in groups] if isinstance(groups, list) else None
    if "state" not in optim_sd or saved_sizes != sizes:
        raise ValueError(f"optimizer_state_dict has param groups of sizes {saved_sizes}, this "
                         f"optimizer's are {sizes}; build ZeroOptimizer with the same param_groups")


def _persistent_buffer_names(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


@torch.no_grad()
def load_full_state(opt, model_sd: dict, optim_sd: dict) -> None:
    check_full_state(opt, model_sd, optim_sd)
    load_from(opt, FullStateSource(opt, model_sd, optim_sd))
    for name, buffer in opt._model.named_buffers():
        if name in model_sd:
            buffer.copy_(model_sd[name])
    for group, inner, saved in zip(opt.param_groups, opt._inner.param_groups, optim_sd["param_groups"]):
        hyper = {k: v for k, v in saved.items() if k != "params"}
        group.update(hyper)
        inner.update(hyper)
