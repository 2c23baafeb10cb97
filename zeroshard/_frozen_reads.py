"""Stage 3: when backward is done with a unit's frozen parameters, which give no gradient.

Note [frozen parameters kept on a ctx]:
    A unit with frozen parameters (LoRA's base weights beside trainable adapters) was
    kept gathered to the end of backward: a frozen weight gives no gradient to wait
    for, and a frozen layer that opens a unit computes its input gradient after the
    unit's last trainable gradient has come. On a LoRA-like model (8 blocks of 32 MiB
    of frozen weights, a unit each, 2 ranks: ``benchmarks/lora_backward.py``)
    backward's peak rose 236 MiB above its start, every block gathered at once (82
    with what follows; FSDP2's 104). Backward reads a frozen
    weight through what the unit's forward saved, as any other (Note [saved tensors]
    in _saved_tensors.py), so such a unit is released once backward has read all of
    it (Note [released once backward has read it] in stage3.py), unless a node may
    read a frozen weight behind the saved-tensor hooks' back: a custom autograd
    Function that keeps it on its ctx (``ctx.weight = weight``, ``ctx.module = self``),
    as some kernels do. A trainable weight kept so is read by the node that gives its
    gradient, which the unit waits for; a frozen one, by a node nothing waits for.

    So after each training forward the graph is walked from the model's outputs, and
    each custom Function node's ctx is looked into: a frozen unit's parameter, a view
    of its buffers, or a module holding one marks that unit, which is kept to the end
    of backward from then on; something the walk cannot look into (an object of
    another kind: a function, reentrant checkpointing's) marks them all. The walk
    runs after every training forward while some unit with frozen parameters is
    unmarked. Not seen: a custom Function outside the graph of the model's outputs
    (an auxiliary loss a module keeps as an attribute) that keeps a frozen weight on
    its ctx.

Note [backward past a unit's inputs]:
    Under activation checkpointing backward reads parameters that the recomputation
    saved, unseen (a unit's saved-tensor hooks stand aside inside checkpointing's),
    and once a recomputation has been seen no unit is released by its reads (Note
    [released once backward has read it]). A unit without frozen parameters is still
    released at its last gradient; one with them was kept to the end of backward: a
    checkpointed LoRA model gathered its whole frozen base at once
    (``benchmarks/lora_backward.py --checkpointing``: backward's peak 270 MiB above its
    start for 256 MiB of frozen weights; 86 with what follows, FSDP2's 104).

    Every node that reads a unit's frozen weight in backward computes a gradient that
    flows on, towards the unit's trainable parameters, its inputs or another unit's
    parameters (a node whose gradient flows nowhere does not run). A hook on an input
    made by an earlier node runs just before that node, and autograd runs, of the
    nodes ready, the one made last in forward first (on one device's queue; a
    gradient's accumulator before any): so by then every node the unit's forward made
    has run, whatever its gradient feeds. So once each input of the unit's training
    forward that requires grad has had its whole gradient and every trainable
    gradient of the unit has come, backward is done with the unit, as FSDP2 decides by
    its inputs too. An input that is a leaf (an embedding output detached for
    adversarial training) is hooked at its accumulator, which runs as soon as it is
    ready, before nodes made later that feed another unit's parameter: a reviewer's
    probe whose unit read a frozen weight into the root's trainable embedding crashed
    on the released buffer. A unit given a leaf is not released so, nor is one whose
    forward took no input that requires grad (the root, given token ids: its own
    layers run between the nested units' in backward); nor
    is one with a forward since the last backward whose graph was dropped (its inputs'
    gradients never come), nor one whose forward ran only in a recomputation
    (reentrant checkpointing runs the forward under no_grad first). An input the
    unit shares with later units (a cross-attention's encoder states) has its whole
    gradient only once they are done too: released late, not early. Not seen: a
    tensor the unit computes with that is not among its arguments (one another
    module left on an attribute, or inside an object that is not a tuple, list or
    dict), whose gradient a node reading a frozen weight gives after the inputs'.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.utils._pytree import tree_flatten

from ._graph import nodes_below, roots_of
from ._unit import Unit

# What a ctx may hold that reads no parameter.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), enum.Enum, slice, range,
          torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size,
          torch.SymInt, torch.SymFloat, torch.SymBool)
_DEPTH = 4  # containers nested deeper than this are not looked into


class FrozenOnContexts:
    """Marks the units whose frozen parameters some custom Function keeps on its ctx
    (``Unit.frozen_on_a_ctx``; Note [frozen parameters kept on a ctx])."""

    def __init__(self, units: list[Unit]) -> None:
        self._unmarked = [u for u in units if not u.release_when_grads_done]

    def look(self, outputs: Iterable) -> None:
        """After a training forward: look into the ctx of every custom Function node in
        the graph below ``outputs``."""
        if not self._unmarked:
            return
        roots = roots_of(outputs)
        if not roots:
            return
        unit_of = {id(p): u for u in self._unmarked for b in u.buckets for p in b.params}
        storages = {b.flat.untyped_storage()._cdata: u for u in self._unmarked for b in u.buckets}
        found: set[Unit] = set()
        for node in nodes_below(roots):
            if isinstance(node, BackwardCFunction):
                for value in vars(node).values():
                    if not _find(value, unit_of, storages, found, _DEPTH):
                        found.update(self._unmarked)  # something it cannot look into
                        break
            if len(found) == len(self._unmarked):
                break
        for unit in found:
            unit.frozen_on_a_ctx = True
        self._unmarked = [u for u in self._unmarked if u not in found]


def _find(value, unit_of: dict, storages: dict, found: set, depth: int) -> bool:
    """Add to ``found`` the units whose parameters ``value`` holds; False if it holds
    something that cannot be looked into."""
    if isinstance(value, torch.Tensor):
        unit = unit_of.get(id(value))
        if unit is None and value.layout == torch.strided:
            try:
                unit = storages.get(value.untyped_storage()._cdata)
            except (RuntimeError, NotImplementedError):  # a subclass without one storage
                return False
        if unit is not None:
            found.add(unit)
        return True
    if isinstance(value, nn.Module):
        found.update(unit_of[id(p)] for p in value.parameters() if id(p) in unit_of)
        return True
    if isinstance(value, _PLAIN):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_find(v, unit_of, storages, found, depth - 1) for v in value)
    return False


def watch_inputs(unit: Unit, inputs, on_gradient) -> None:
    """Note [backward past a unit's inputs]: hook each tensor of ``inputs`` (a training
    forward's arguments) that requires grad; ``on_gradient(unit)`` when its gradient is
    whole. Removed when the backward ends (``Unit.end_backward``)."""
    unit.record.inputs_watched = True
    for tensor in tree_flatten(inputs)[0]:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            unit.record.leaf_input |= tensor.grad_fn is None
            unit.record.input_hooks.append(tensor.register_hook(on_gradient))


def past_inputs(unit: Unit) -> bool:
    """Whether backward has given every watched input of ``unit`` its gradient and every
    trainable parameter its own (Note [backward past a unit's inputs])."""
    record = unit.record
    return (record.inputs_watched and not record.leaf_input
            and 0 < len(record.input_hooks) <= record.inputs_reached
            and record.grads_arrived >= unit.trainable_ids)
