"""Stage 3's unit tree: which modules become units and which unit owns each parameter.

Pure (no torch.distributed), property-tested alone (tests/test_unit_tree.py).

A unit is a module plus the buckets of the parameters it owns. Each unit owns the
parameters held by modules inside it but not inside a nested unit; a parameter held
by modules of different units (tied weights) belongs to their lowest common
ancestor unit, so it is gathered whenever any of its users computes. The root
module is always a unit and takes whatever no other unit owns. So a parameter must
be used inside the forward of a module that holds it (in ``_parameters``), or of one
of that module's ancestor units (a forward that breaks this is refused:
``check_saved_parameter`` in _saved_tensors.py).

Note [modules in several places]:
    A module may be registered in several places (ALBERT-style sharing by module,
    ``blocks[1].mlp = blocks[0].mlp``; a block keeping ``.prev``, a reference to the
    one before it). Then "inside" means dominated: a unit owns a parameter if every
    path of registrations from the root to every module holding it passes through
    the unit, and the lowest such unit owns it. Owned by the unit above its first
    place only, a shared module's parameters were released while another unit ran
    it, and that forward was refused (a helper's probe). The dominators come from the
    graph of registrations (Cooper, Harvey and Kennedy's iteration), not from listing
    paths, which a chain of back-references multiplies and a cycle makes endless (a
    reviewer's probes); the automatic policy sizes units on the same dominator tree,
    so a shared module can be a unit of its own. (A model whose registrations form a
    cycle still fails elsewhere at stage 3, as torch's own ``model.train()`` does.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

def has_no_forward(module: nn.Module) -> bool:
    """A module that holds others but is never called (``nn.ModuleList``, ``ModuleDict``,
    ``ParameterList``): its forward hooks never fire. A subclass of one with a forward of
    its own (HF SwitchTransformers' experts, an ``nn.ModuleDict`` called by its parent) is
    called, and was refused as a unit naming a forward it has (a helper's probe)."""
    return type(module).forward is nn.Module.forward


def read_by_their_parent(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(module) -> (its name, its parent's name) for modules whose parent's forward
    reads their parameters without calling them: ``nn.MultiheadAttention``'s
    ``out_proj`` (``F.multi_head_attention_forward`` takes ``out_proj.weight``). As a
    unit of its own one is never gathered for that read: with grad enabled the
    forward is refused (``check_saved_parameter``), but under ``torch.no_grad()`` (an
    evaluation before the first step) it computed with NaN placeholders, silently.
    (``nn.TransformerEncoderLayer``'s fused path reads its children's parameters too,
    but torch takes it only when no module inside has forward hooks, and units do.)"""
    return {id(m.out_proj): (f"{name}.out_proj".lstrip("."), name or "<root>")
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def select_unit_modules(model: nn.Module, units, bucket_bytes: int) -> list[nn.Module]:
    """The modules that become units (the root first, then in ``model.modules()`` order).

    ``units`` is a module class, a collection of classes, a predicate
    ``module -> bool``, or None for the automatic policy.
    """
    unclaimable = read_by_their_parent(model)
    if units is None:
        chosen = _auto_units(model, bucket_bytes, unclaimable)
    else:
        predicate = _as_predicate(units)
        chosen = [m for m in model.modules() if m is not model and predicate(m)]
        if not chosen:
            # One unit, the root: the whole model gathered for every forward and
            # backward, with no word of it (a helper's probe: the decoder-layer class of
            # another architecture, Llama's for a Qwen2). Warned, not refused: a model
            # small enough may be meant to be one unit.
            warnings.warn(
                f"zeroshard stage 3: units={units!r} selects no module of this model, so the "
                "root is its only unit: the whole model is gathered for every forward and "
                "backward (a peak as high as stage 2's). Pass the class of its repeated blocks"
                f"{_repeated_classes(model)}, or units=None for the automatic choice",
                stacklevel=4)
        containers = [type(m).__name__ for m in chosen if has_no_forward(m)]
        if containers:
            raise ValueError(
                f"units selects {containers[0]} modules, which have no forward of their own, so "
                "their parameters would never be gathered; choose the modules inside them")
        read_directly = [unclaimable[id(m)] for m in chosen if id(m) in unclaimable]
        if read_directly:
            name, parent = read_directly[0]
            raise ValueError(
                f"units selects {name!r}, the out_proj of nn.MultiheadAttention {parent!r}, "
                "whose forward reads out_proj's parameters without calling it: as a unit of "
                "its own they would be NaN placeholders there. Leave it to the module "
                "holding it: for units=nn.Linear, pass units=lambda m: type(m) is nn.Linear "
                "(out_proj is a subclass), or select the MultiheadAttention or a block")
    chosen_ids = {id(m) for m in chosen}
    return [model] + [m for m in model.modules() if id(m) in chosen_ids]


def _repeated_classes(model: nn.Module) -> str:
    """The suffix ' (here: A, B)' naming the classes of which ``model`` holds several
    modules with parameters (blocks, layers; not containers, not torch.nn's own), most
    numerous first; '' if none."""
    counts: dict[type, int] = {}
    for module in model.modules():
        if (module is not model and not has_no_forward(module)
                and next(module.parameters(), None) is not None):
            counts[type(module)] = counts.get(type(module), 0) + 1
    repeated = sorted((c for c in counts if counts[c] > 1), key=lambda c: -counts[c])
    names = [c.__name__ for c in repeated if not c.__module__.startswith("torch.nn")][:3]
    return f" (here: {', '.join(names)})" if names else ""


def _as_predicate(units) -> Callable[[nn.Module], bool]:
    if isinstance(units, type) and issubclass(units, nn.Module):
        return lambda m: isinstance(m, units)
    if isinstance(units, (list, tuple, set, frozenset)) and units and all(
            isinstance(c, type) and issubclass(c, nn.Module) for c in units):
        classes = tuple(units)
        return lambda m: isinstance(m, classes)
    if callable(units) and not isinstance(units, type):
        return lambda m: bool(units(m))
    raise TypeError(f"units must be an nn.Module class, a collection of them, or a predicate "
                    f"module -> bool; got {units!r}")


def _auto_units(model: nn.Module, bucket_bytes: int, unclaimable) -> list[nn.Module]:
    """Post-order over the dominator tree (Note [modules in several places]): a module
    whose not-yet-claimed parameters reach ``bucket_bytes`` becomes a unit, so units
    hold about that much and a deep model gets many. Each parameter counts once, at the
    lowest module that dominates every module holding it (a tied weight at the common
    ancestor). A module in ``unclaimable`` (``read_by_their_parent``) leaves its
    parameters to an ancestor."""
    tree = _DominatorTree(model)
    counted: dict[int, int] = {}
    for param, holders in _holders(model).values():
        at = tree.lowest_common(holders)
        counted[id(at)] = counted.get(id(at), 0) + param.numel() * param.element_size()
    chosen: list[nn.Module] = []
    left: dict[int, int] = {}  # id(module) -> bytes its dominator subtree leaves unclaimed
    for module in reversed(tree.order):  # children in the dominator tree come first
        size = counted.get(id(module), 0) + left.pop(id(module), 0)
        if (module is not model and size >= bucket_bytes and not has_no_forward(module)
                and id(module) not in unclaimable):
            chosen.append(module)
        elif module is not model:
            parent = tree.idom[id(module)]
            left[id(parent)] = left.get(id(parent), 0) + size
    return chosen


def unit_owners(model: nn.Module, unit_modules: list[nn.Module]) -> dict[int, int]:
    """id(parameter) -> index of the unit that owns it: the lowest unit that dominates
    every module holding it (the module docstring; Note [modules in several places])."""
    index_of = {id(m): i for i, m in enumerate(unit_modules)}
    tree = _DominatorTree(model)
    owner: dict[int, int] = {}
    for param_id, (_, holders) in _holders(model).items():
        module = tree.lowest_common(holders)
        while id(module) not in index_of:
            module = tree.idom[id(module)]
        owner[param_id] = index_of[id(module)]
    return owner


def _holders(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[nn.Module]]]:
    """id(parameter) -> (the parameter, the modules holding it in ``_parameters``)."""
    holders: dict[int, tuple[nn.Parameter, list[nn.Module]]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), (param, []))[1].append(module)
    return holders


class _DominatorTree:
    """The immediate dominator of each module in the graph of registrations (parent ->
    child, every place a module is registered), rooted at the model (Note [modules in
    several places]). In a tree it is the parent."""

    def __init__(self, model: nn.Module) -> None:
        self.order = _reverse_postorder(model)  # the root first; a parent before a child
        rank = {id(m): i for i, m in enumerate(self.order)}
        parents: dict[int, list[nn.Module]] = {}
        for module in self.order:
            for child in module._modules.values():
                if child is not None:
                    parents.setdefault(id(child), []).append(module)
        self._rank = rank
        self.idom: dict[int, nn.Module] = {id(model): model}
        changed = True
        while changed:  # converges in a pass or two on module graphs
            changed = False
            for module in self.order[1:]:
                known = [p for p in parents[id(module)] if id(p) in self.idom]
                dominator = known[0]
                for parent in known[1:]:
                    dominator = self._meet(parent, dominator)
                if self.idom.get(id(module)) is not dominator:
                    self.idom[id(module)] = dominator
                    changed = True

    def _meet(self, a: nn.Module, b: nn.Module) -> nn.Module:
        while a is not b:
            while self._rank[id(a)] > self._rank[id(b)]:
                a = self.idom[id(a)]
            while self._rank[id(b)] > self._rank[id(a)]:
                b = self.idom[id(b)]
        return a

    def lowest_common(self, modules: list[nn.Module]) -> nn.Module:
        """The lowest module that dominates every one of ``modules``."""
        common = modules[0]
        for module in modules[1:]:
            common = self._meet(common, module)
        return common


def _reverse_postorder(model: nn.Module) -> list[nn.Module]:
    """Every module reachable from ``model`` once, parents before children (a reverse
    postorder of a depth-first walk; iterative, and a cycle is walked once)."""
    postorder: list[nn.Module] = []
    seen = {id(model)}
    stack = [(model, iter(model._modules.values()))]
    while stack:
        module, children = stack[-1]
        for child in children:
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append((child, iter(child._modules.values())))
                break
        else:
            postorder.append(module)
            stack.pop()
    return postorder[::-1]
