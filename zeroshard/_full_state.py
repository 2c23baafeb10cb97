"""Full state dicts in plain PyTorch formats: gathered from the shards, and loaded into them.

The optimizer state dict follows ``torch.optim.Optimizer.state_dict()``: ``state``
keyed by the index of each parameter in the param groups taken in order (what a
plain ``optimizer_class`` over the same groups would use), per-element states
shaped like their parameter, and ``param_groups`` with their hyper-parameters and
those indices.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from . import _comm
from . import _extra_state as extra_state
from ._bucket import to_memory_order
from ._inner import _step_without_global_hooks, hyperparameters, split_state, standin_optimizer
from ._sharded_state import (check_one_scalar_per_bucket, load_from, memory_orders,
                             outside_buckets, parameter_names, state_dtypes)


@torch.no_grad()
def gather_full_state(opt) -> tuple[dict, dict] | None:
    """Note [streaming export]: the full state is built on rank 0, on CPU, one bucket at
    a time: each bucket's shards (and per-element optimizer states) are all-gathered,
    rank 0 copies its parameters out to CPU and every rank frees the gathered buffer
    before the next bucket. So no rank holds more than one bucket of the full model
    on its device, and only rank 0 builds the result (in host memory)."""
    view = opt.sharding
    if extra_state.modules_with_extra_state(view.model):  # alike on every rank
        # Note [modules' extra state]: rank 0's state_dict() below calls get_extra_state;
        # one that fails (reading a released stage-3 parameter) failed there alone, after
        # the gathers, and the other ranks went on (helper-103): try it on every rank first
        _comm.run_and_share(lambda: extra_state.collect(view.model), group=view.ranks,
                            stats=opt.comm_stats, label="full_state", device=view.device)
    values, states = {}, {}
    for param, value, state in stream_parameters(opt):
        if value is not None:
            values[id(param)] = value
        if state is not None:
            states[id(param)] = state
    if view.rank != 0:
        return None
    with view.reading_structure():  # names and objects only: nothing is gathered
        structure = view.model.state_dict(keep_vars=True)
    placeholders = {b.placeholders.untyped_storage().data_ptr() for b in view.every_bucket
                    if b.placeholders is not None}
    for key, item in structure.items():
        if id(item) not in values and isinstance(item, torch.Tensor) \
                and item.untyped_storage().data_ptr() in placeholders:
            raise RuntimeError(  # a state dict hook derived it from a released parameter
                f"full_state_dict: model.state_dict()[{key!r}] is computed from a stage-3 "
                "parameter between uses (a NaN placeholder), not the parameter itself; "
                "read it with model.state_dict() inside opt.summon_full_params()")
    model_sd = {key: values[id(item)] if id(item) in values else _to_cpu(item)
                for key, item in structure.items()}
    index_state, groups, index = {}, [], 0
    for members, group in zip(view.group_members, opt.param_groups):
        indices = []
        for param in members:
            if id(param) in states:
                index_state[index] = states[id(param)]
            indices.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    for _, entries in view.inner.own_entries():  # Note [state under an optimizer's own keys]
        index_state.update(entries)
    return model_sd, {"state": index_state, "param_groups": groups}


def _to_cpu(item):
    return item.detach().to("cpu", copy=True) if isinstance(item, torch.Tensor) else item


def stream_parameters(opt, with_states: bool = True):
    """Yield ``(parameter, full value, optimizer state)`` for every parameter, one bucket at
    a time (Note [streaming export]): on rank 0 the value is a CPU copy (the fp32 master
    of an updated parameter) and the state is in the plain layout (None if it has none);
    on the other ranks both are None. Collective: every rank must run it to the end."""
    view = opt.sharding
    rank0 = view.rank == 0
    view.take_outside_writes()
    for bucket in view.every_bucket:
        source = bucket.master if bucket.master is not None else bucket.shard
        gathered = view.gather_shard(source)
        values = [_to_cpu(bucket.param_view(gathered, i)) if rank0 else None
                  for i in range(len(bucket.params))]
        _comm.release([gathered])  # finished works still refer to it (Note [finished work])
        param_states = [None] * len(bucket.params)
        state = view.inner.state.find(bucket.master) if bucket.master is not None else None
        if with_states and bucket.owns_whole_parameters:
            # Note [whole-parameter ownership]: each state lives whole on its owner
            mine = {index: {k: _to_cpu(v) for k, v in view.inner.state[stepped].items()}
                    for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped)
                    if stepped in view.inner.state}
            for owned in _comm.all_gather_object(mine, group=view.ranks, stats=opt.comm_stats,
                                                 label="state", device=view.device):
                for index, owned_state in owned.items() if rank0 else ():
                    param_states[index] = owned_state
        elif with_states and state:
            scalars, per_element = split_state(state, bucket.master)
            for key, tensor in sorted(per_element.items()):
                gathered = view.gather_shard(tensor)
                for index in range(len(bucket.params)) if rank0 else ():
                    if param_states[index] is None:
                        param_states[index] = {k: _to_cpu(v) for k, v in scalars.items()}
                    param_states[index][key] = _to_cpu(bucket.param_view(gathered, index))
                _comm.release([gathered])
            if rank0 and not per_element:
                param_states = [{k: _to_cpu(v) for k, v in scalars.items()} for _ in bucket.params]
            for index in bucket.without_state:  # Note [a fresh state inside a shard's]:
                param_states[index] = None  # none of their own yet, as torch keeps none
        yield from zip(bucket.params, values, param_states)
    for _, param in outside_buckets(view):  # stages 1-2: frozen, whole on every rank
        yield param, _to_cpu(param) if rank0 else None, None


class FullStateSource:
    """Serves ``load_from`` ranges of full (unsharded) tensors held on this rank. They
    come in plain PyTorch form (row-major files, or any strides); a parameter held in
    another memory order (Note [memory order] in _bucket.py) is read whole and served
    in that order."""

    def __init__(self, opt, model_sd: dict, optim_sd: dict | None) -> None:
        view = opt.sharding
        self.params = dict(view.model.named_parameters())
        self.orders = memory_orders(opt)
        self.model_sd = model_sd
        self.key_of = _stored_names(view.model, model_sd)
        members = [p for group in view.group_members for p in group]
        names = parameter_names(view.model)
        self.state_of = {} if optim_sd is None else {
            names[id(p)]: optim_sd["state"].get(i, optim_sd["state"].get(str(i)))
            for i, p in enumerate(members)}
        # a parameter stepped whole keeps its states whole, of any shape (Adafactor's
        # factored row_var / col_var): Note [whole-parameter ownership] in _layout.py
        whole = {name for b in view.every_bucket if b.owns_whole_parameters
                 for name in b.param_names}
        # Note [states of a 0-dim parameter]: which keys are per tensor, as the parameters
        # of more dimensions show it (None: none has a state, each 0-dim one's class tells)
        shown = (_shown_scalar_keys(self.state_of, self.params)
                 if any(state and self.params[n].dim() > 0 for n, state in self.state_of.items())
                 else None)
        group_of = {names[id(p)]: i for i, group in enumerate(view.group_members) for p in group}
        asked: dict[int, set[str] | None] = {}  # group -> its class's answer, asked once
        self.split = {}
        for name, state in self.state_of.items():
            if not state:
                continue
            if name in whole:
                self.split[name] = split_state(state, self.params[name])
                continue
            scalar_keys = shown
            if scalar_keys is None:
                group = group_of[name]
                if group not in asked:
                    asked[group] = _scalar_keys_of(view.inner.classes[group],
                                                   optim_sd["param_groups"][group])
                scalar_keys = asked[group]
            self.split[name] = _split_full_state(name, state, self.params[name], scalar_keys)

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        order = self.orders.get(name)
        if order is not None:  # a range in memory order is scattered over the row-major tensor
            return to_memory_order(self.model_sd[self.key_of[name]], order)[start:stop]
        read_range = getattr(self.model_sd, "read_range", None)  # files: read only the range
        if read_range is not None:
            return read_range(self.key_of[name], start, stop)
        return self.model_sd[self.key_of[name]].reshape(-1)[start:stop]

    def states(self, name: str, start: int, stop: int) -> dict:
        _, per_element = self.split.get(name, ({}, {}))
        order = self.orders.get(name, tuple(range(self.params[name].dim())))
        return {k: to_memory_order(v, order)[start:stop] for k, v in per_element.items()}

    def optimizer_layout(self, name: str):
        if name not in self.split:
            return None
        scalars, per_element = self.split[name]
        # the dtype of the parameter's values in these dicts: Note [per-element states of
        # their own dtype]
        return scalars, sorted(per_element), state_dtypes(per_element, self.values(name, 0, 0).dtype)

    def optimizer_layouts(self) -> dict:
        """Every parameter's ``optimizer_layout``, its tensors on CPU (to be pickled)."""
        return {name: None if layout is None else (
                    {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in layout[0].items()},
                    *layout[1:])
                for name, layout in ((n, self.optimizer_layout(n)) for n in self.params)}

    def prepare(self, params, dtype) -> None:
        pass  # this rank holds everything


def _shown_scalar_keys(state_of: dict, params: dict) -> set[str]:
    """Note [states of a 0-dim parameter]: a torch optimizer keeps some states per element
    (Adam's ``exp_avg``: the parameter's shape) and some per tensor (``step``, ASGD's
    ``eta``: 0-dim, or a number). For a 0-dim parameter (a learnt temperature) both are
    0-dim, so its own state cannot tell them apart; the other parameters' can: the
    keys that hold a 0-dim tensor or a number for some parameter of one or more
    dimensions are per tensor, and a 0-dim parameter's other states are per element
    (a state only its own group has, amsgrad's ``max_exp_avg_sq`` or SGD's momentum
    there alone, is one; a None, SGD's buffer without momentum, tells nothing). Taken
    for scalars, a 0-dim parameter's moments were refused as a bucket's differing step
    counts, or, in a bucket of their own, loaded 0-dim onto a 1-D shard, and the next
    step failed with torch's raw broadcast error (a helper's probe; a reviewer's, for a
    state of one group alone)."""
    return {key for name, state in state_of.items() if state and params[name].dim() > 0
            for key, value in state.items()
            if isinstance(value, (int, float)) or
            (isinstance(value, torch.Tensor) and value.dim() == 0)}


def _scalar_keys_of(optimizer_class: type, saved_group: dict) -> set[str] | None:
    """The states ``optimizer_class`` keeps per tensor, with ``saved_group``'s
    hyper-parameters: one step on a 2-element stand-in (torch's global step hooks left
    out, as for the inner optimizers); None if it fails."""
    standin = torch.zeros(2, requires_grad=True)
    standin.grad = torch.ones(2)
    try:
        probe = standin_optimizer(optimizer_class, saved_group, standin)
        _step_without_global_hooks(probe)
    except Exception:  # noqa: BLE001 -- any failure: the states stay unknown (refused)
        return None
    return {k for k, v in probe.state[standin].items()
            if not (isinstance(v, torch.Tensor) and v.shape == standin.shape)}


def _split_full_state(name: str, state: dict, param: torch.Tensor,
                      scalar_keys: set[str] | None) -> tuple[dict, dict]:
    """``state`` (of the parameter ``name``, stepped in shards, in a plain optimizer state
    dict) as (scalars, per-element tensors); raise, naming it, where a tensor fits
    neither (a state dict of another model, or over the parameters in another order: it
    was refused as differing step counts, a helper's probe)."""
    if param.dim() > 0:
        scalars, per_element = split_state(state, param)
        wrong = {k: v for k, v in scalars.items()
                 if isinstance(v, torch.Tensor) and v.dim() > 0}
    else:
        if scalar_keys is None:
            raise ValueError(
                f"optimizer_state_dict: the states of the 0-dim parameter {name!r} ("
                f"{', '.join(state)}) cannot be told per element or per tensor: no "
                "parameter of more dimensions has a state to show which, and a step of its "
                "optimizer class on a stand-in failed. Load the model alone "
                "(load_full_state_dict(model_state_dict)) and let the optimizer start "
                "afresh, or keep zeroshard checkpoints (save_checkpoint), which record it")
        per_element = {k: v for k, v in state.items()
                       if k not in scalar_keys and isinstance(v, torch.Tensor)}
        scalars = {k: v.clone() if isinstance(v, torch.Tensor) else v
                   for k, v in state.items() if k not in per_element}
        wrong = {k: v for k, v in per_element.items() if v.dim() > 0}
    if wrong:
        key, value = next(iter(wrong.items()))
        raise ValueError(
            f"optimizer_state_dict holds {key!r} of shape {tuple(value.shape)} for parameter "
            f"{name!r} of shape {tuple(param.shape)}: it is another model's, or lists the "
            "parameters in another order than this optimizer's param groups (torch numbers "
            "them group by group, in the order each group lists them)")
    return scalars, per_element


class Rank0Source:
    """Note [full state from rank 0]: rank 0 holds the full state dicts, the other ranks
    None. Before each bucket (``prepare``), rank 0 sends that bucket's parameters whole,
    and their per-element optimizer states, in one broadcast each; every rank keeps
    the ranges it owns and drops the rest. So no rank ever holds more than one bucket
    of the full model on its device, and the result is what loading the same dicts
    on every rank gives."""

    def __init__(self, opt, local: FullStateSource | None, layouts: dict | None,
                 with_states: bool) -> None:
        self.view, self.stats = opt.sharding, opt.comm_stats
        self.local = local  # rank 0's dicts; None elsewhere
        self.names = parameter_names(opt.model)
        self.layouts = self._broadcast_object(layouts) if with_states else None
        self.values_of: dict[str, torch.Tensor] = {}
        self.states_of: dict[str, dict[str, torch.Tensor]] = {}
        self._received: list[torch.Tensor] = []  # this bucket's broadcast buffers

    def _broadcast_object(self, obj):
        return _comm.broadcast_object(obj, group=self.view.ranks, stats=self.stats,
                                      label="load", device=self.view.device)

    def _broadcast_flat(self, pieces, sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """Rank 0's ``pieces()`` (one full tensor per parameter) joined, broadcast, split.
        Each piece is moved to the flat's device first: a state rank 0 loaded onto a GPU
        (``torch.load`` without ``map_location``) beside the CPU zeros ``prepare`` gives a
        parameter without that state made ``torch.cat`` refuse mixed devices (helper-121's
        reading; no GPU here to run it)."""
        flat = torch.empty(sum(sizes), dtype=dtype, device=self.view.device)
        if self.local is not None:
            flat.copy_(torch.cat([piece.reshape(-1).to(device=flat.device, dtype=dtype)
                                  for piece in pieces()]))
        _comm.broadcast(flat, group=self.view.ranks, stats=self.stats, label="load")
        self._received.append(flat)
        return list(flat.split(sizes))

    def release(self) -> None:
        """Free the previous bucket's buffers now: the broadcast's finished work still
        refers to them (Note [finished work] in _comm.py)."""
        _comm.release(self._received)
        self._received = []

    def prepare(self, params, dtype) -> None:
        self.release()
        names = [self.names[id(p)] for p in params]
        sizes = [p.numel() for p in params]
        local = self.local
        self.values_of = dict(zip(names, self._broadcast_flat(
            lambda: [local.values(n, 0, size) for n, size in zip(names, sizes)], sizes, dtype)))
        # every parameter's own per-element states: in a bucket of parameters stepped
        # whole they differ (Adafactor keeps a vector's ``variance``, a matrix's factors),
        # and the first parameter's keys alone left a vector without its variance (the
        # next step failed) or gave a matrix a zero one (a helper's probe)
        own_keys = {n: set(self.layouts[n][1]) for n in names
                    if self.layouts and self.layouts.get(n) is not None}
        self.states_of = {}
        for key in sorted(set().union(*own_keys.values())):
            # a parameter without this state (it never had a gradient) is sent zeros and
            # keeps none: load_from gives it zeros, as from dicts held on every rank
            parts = self._broadcast_flat(
                lambda key=key: [local.states(n, 0, size).get(key, torch.zeros(size))
                                 for n, size in zip(names, sizes)], sizes, dtype)
            for name, part in zip(names, parts):
                if key in own_keys.get(name, ()):
                    self.states_of.setdefault(name, {})[key] = part

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.values_of[name][start:stop]

    def states(self, name: str, start: int, stop: int) -> dict:
        return {k: v[start:stop] for k, v in self.states_of.get(name, {}).items()}

    def optimizer_layout(self, name: str):
        return self.layouts.get(name) if self.layouts else None


def _aliases(model) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied parameter has several)."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return aliases


def buffer_aliases(model) -> dict[str, list[str]]:
    """Each persistent buffer's name -> every persistent name of the same tensor: one
    buffer registered in two modules has two, and ``model.state_dict()`` holds both where
    ``named_buffers()`` (and so a checkpoint, or a safetensors file) names it once (a
    reviewer's probe: such a model's own state dict was refused as unexpected keys)."""
    persistent = persistent_buffer_names(model)
    by_tensor: dict[int, list[str]] = {}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            by_tensor.setdefault(id(buffer), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _stored_names(model, model_sd) -> dict[str, str]:
    """Parameter name -> the key that holds its value in ``model_sd``: its own name, or
    another name of the same (tied) parameter, as files that store a tied weight once
    (safetensors, Hugging Face checkpoints) do."""
    aliases = _aliases(model)
    return {name: next((alias for alias in aliases[id(param)] if alias in model_sd), name)
            for name, param in model.named_parameters()}


# A buffer of one element or none that a saved one does not fit: its module may size it in
# its first forward, as torch's own load_state_dict then resizes it (helper-95: a QAT
# model's resume was refused with advice to load into the model it came from).
SIZED_IN_FORWARD = (". If its module sizes it in its first forward (torch.ao.quantization's "
                    "fake-quant scale and zero_point, observers' min_val and max_val, shaped "
                    "(1,) or (0,) until then), run one forward under torch.no_grad() before "
                    "building the ZeroOptimizer, then load")


def check_full_state(opt, model_sd: dict, optim_sd: dict | None) -> None:
    """Raise, naming the difference, if the two dicts do not fit this model and optimizer."""
    if not isinstance(model_sd, Mapping) or not (optim_sd is None or isinstance(optim_sd, dict)):
        raise TypeError("load_full_state_dict takes (model_state_dict, optimizer_state_dict): a "
                        "dict (or a safetensors file or folder) and a dict or None; got "
                        f"{type(model_sd).__name__}, {type(optim_sd).__name__}")
    model = opt.model
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    buffers = buffer_aliases(model)
    expected.update({name: tuple(b.shape) for name, b in model.named_buffers(remove_duplicate=False)
                     if name in buffers})
    aliases = _aliases(model)
    stored_under_alias = {name for name, param in model.named_parameters(remove_duplicate=False)
                          if any(alias in model_sd for alias in aliases[id(param)])}
    stored_under_alias |= {name for name, names in buffers.items()
                           if any(alias in model_sd for alias in names)}
    missing = sorted(set(expected) - set(model_sd) - stored_under_alias)
    # Note [modules' extra state] in _extra_state.py: loaded where present, optional
    with_extra_state = set(extra_state.modules_with_extra_state(model, every_name=True))
    unexpected = sorted(_not_ignored(model, set(model_sd) - set(expected) - with_extra_state))
    if missing or unexpected:
        raise ValueError(f"model_state_dict does not fit this model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}; save it from the same model class")
    shape_of = getattr(model_sd, "shape", lambda key: tuple(model_sd[key].shape))
    for name, shape in expected.items():
        if name in model_sd and shape_of(name) != shape:
            raise ValueError(f"model_state_dict[{name!r}] has shape {shape_of(name)}, "
                             f"this model's has {shape}" + (
                                 SIZED_IN_FORWARD if name in buffers and math.prod(shape) <= 1 else ""))
    _refuse_tied_names_that_differ(model_sd, aliases)
    if optim_sd is None:
        return
    groups = optim_sd.get("param_groups")
    sizes = [len(g) for g in opt.sharding.group_members]
    saved_sizes = [len(g["params"]) for g in groups] if isinstance(groups, list) else None
    if "state" not in optim_sd or saved_sizes != sizes:
        raise ValueError(f"optimizer_state_dict has param groups of sizes {saved_sizes}, this "
                         f"optimizer's are {sizes}; build ZeroOptimizer with the same param_groups")


def _load_extra_state(opt, model_sd, everywhere: bool) -> None:
    """Note [modules' extra state] in _extra_state.py: what ``model_sd`` holds of it, on
    every rank (sent from rank 0 where the other ranks passed None)."""
    model = opt.sharding.model
    keys = extra_state.modules_with_extra_state(model, every_name=True)
    if not keys:  # (every rank alike: the ranks' models were compared at construction)
        return
    saved = {key: model_sd[key] for key in keys if key in model_sd} if model_sd is not None else None
    if not everywhere:
        saved = _comm.broadcast_object(saved, group=opt.sharding.ranks, stats=opt.comm_stats,
                                       label="load", device=opt.sharding.device)
    extra_state.restore(model, saved)


def _not_ignored(model, keys: set[str]) -> set[str]:
    """``keys`` (the model lacks them) but those a load skips. Note [keys of older
    checkpoints]: a load skips what Hugging Face's from_pretrained skips: the model's
    non-persistent buffers (Bert's ``position_ids``,
    persistent in the files older transformers wrote, as in bert-base-uncased's), a
    buffer of the same role elsewhere (the per-layer ``rotary_emb.inv_freq`` of older
    Llama files, one model-level buffer now: the last two parts of the name match), and
    the patterns the model declares in ``_keys_to_ignore_on_load_unexpected``. Such
    buffers are computed by the model, not loaded (a file's fp16 copy would lose bits);
    any other key the model lacks is refused. Those files were refused as another model
    class's (a helper's probe)."""
    persistent = persistent_buffer_names(model)
    computed = {name for name, _ in model.named_buffers(remove_duplicate=False)} - persistent
    roles = {tuple(name.split(".")[-2:]) for name in computed}
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return {key for key in keys if not (key in computed or tuple(key.split(".")[-2:]) in roles
                                         or any(p.search(key) for p in patterns))}


def _refuse_tied_names_that_differ(model_sd, aliases: dict[int, list[str]]) -> None:
    """Note [tied names holding different values]: a tied parameter is one tensor under
    several names. A dict or file holding two of those names with different values was
    saved from an untied model (an untied checkpoint loaded with tie_word_embeddings=True);
    the load took the first name's and dropped the other's, silently (a helper's probe:
    the file's lm_head 0.097 off, where torch's load_state_dict keeps the last name's and
    Hugging Face unties the model and warns). No value is right for the tied model, so
    it is refused, naming both. Files are compared range by range (one more read of the
    tied weight, only where both names are stored: Hugging Face stores a tied weight
    once); a tied model's own state dict holds one tensor under both names."""
    for names in aliases.values():
        stored = [name for name in names if name in model_sd]
        for other in stored[1:]:
            if not _same_values(model_sd, stored[0], other):
                raise ValueError(
                    f"model_state_dict holds different values under {stored[0]!r} and "
                    f"{other!r}, which this model ties (one parameter): it was saved from an "
                    "untied model. Build this model untied (a Hugging Face config: "
                    "tie_word_embeddings=False), or keep one of the two keys")


def _same_values(model_sd, first: str, second: str, chunk: int = 1 << 24) -> bool:
    read_range = getattr(model_sd, "read_range", None)
    if read_range is None:
        a, b = model_sd[first], model_sd[second]
        if a is b or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
                      and a.dtype == b.dtype):
            return True
        return torch.equal(a, b.to(a.dtype))
    numel = torch.Size(model_sd.shape(first)).numel()
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        a, b = read_range(first, start, stop), read_range(second, start, stop)
        if not torch.equal(a, b.to(a.dtype)):
            return False
    return True


def _open_files(model_sd):
    """A path names a safetensors file or folder: read lazily, range by range."""
    if isinstance(model_sd, (str, os.PathLike)):
        from ._safetensors import SafetensorsFiles
        return SafetensorsFiles(model_sd)
    return model_sd


def persistent_buffer_names(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


@torch.no_grad()
def load_full_state(opt, model_sd: dict | None, optim_sd: dict | None) -> None:
    """Load full state dicts passed on every rank, or on rank 0 only (None elsewhere:
    Note [full state from rank 0]); ``optim_sd`` None loads the model only and keeps
    the optimizer state."""
    view = opt.sharding
    # How many ranks passed each dict, and whether rank 0 did: one all-reduce.
    counts = torch.tensor([model_sd is not None, optim_sd is not None], dtype=torch.float32,
                          device=view.device)
    rank0 = counts.clone() if view.rank == 0 else torch.zeros_like(counts)
    both = torch.cat([counts, rank0])
    _comm.all_reduce(both, group=view.ranks, stats=opt.comm_stats, label="load")
    with_model, with_optim, rank0_model, rank0_optim = (int(v) for v in both.tolist())
    if not rank0_model:
        raise ValueError("load_full_state_dict: rank 0 passed model_state_dict=None; pass the full "
                         "state dict on rank 0 (the other ranks may pass None)")
    if with_optim and not rank0_optim:  # (it was dropped, silently: a helper's probe)
        raise ValueError(f"load_full_state_dict: rank 0 passed optimizer_state_dict=None and "
                         f"{with_optim} other rank(s) passed one; pass it on rank 0 (the other "
                         "ranks may pass None), or None everywhere to keep the optimizer state")
    everywhere = with_model == view.world_size and with_optim in (0, view.world_size)
    holds_dicts = everywhere or view.rank == 0
    with_states = bool(with_optim if everywhere else rank0_optim)
    sources = {}

    def open_and_check():  # every failure here is shared before anything changes
        opened = _open_files(model_sd)
        check_full_state(opt, opened, optim_sd)
        sources["local"] = FullStateSource(opt, opened, optim_sd)
        if with_states:
            check_one_scalar_per_bucket(opt, sources["local"].optimizer_layout,
                                        [hyperparameters(g) for g in optim_sd["param_groups"]])
        if not everywhere and with_states:
            sources["layouts"] = sources["local"].optimizer_layouts()
    _comm.run_and_share(open_and_check if holds_dicts else None, group=view.ranks,
                        stats=opt.comm_stats, label="load", device=view.device)
    local = sources.get("local")
    source = local if everywhere else Rank0Source(opt, local, sources.get("layouts"), with_states)
    load_from(opt, source, with_states)
    if isinstance(source, Rank0Source):
        source.release()
    if holds_dicts:
        aliases = buffer_aliases(view.model)
        for name, buffer in view.model.named_buffers():
            key = next((a for a in aliases.get(name, []) if a in local.model_sd), None)
            if key is not None:
                buffer.copy_(local.model_sd[key])
    if not everywhere:
        for buffer in view.model.buffers():
            _comm.broadcast(buffer, group=view.ranks, stats=opt.comm_stats, label="load")
    _load_extra_state(opt, local.model_sd if holds_dicts else None, everywhere)
    if not with_states:
        return
    # the groups' settings and the state under the optimizer's own keys (Note [state
    # under an optimizer's own keys] in _inner.py): torch's one optimizer's, to every class
    saved = (optim_sd["param_groups"], [("", {k: v for k, v in optim_sd["state"].items()
                                             if isinstance(k, str) and not k.isdigit()})]) \
        if holds_dicts else None
    if not everywhere:
        saved = _comm.broadcast_object(saved, group=view.ranks, stats=opt.comm_stats,
                                       label="load", device=view.device)
    opt._take_loaded_settings([{k: v for k, v in saved_group.items() if k != "params"}
                               for saved_group in saved[0]])
    view.inner.take_own_entries(saved[1], every_class=True)
