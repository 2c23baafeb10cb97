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
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Modules that hold others but are never called: their forward hooks never fire.
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


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
        containers = [type(m).__name__ for m in chosen if isinstance(m, CONTAINERS)]
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
    """Post-order: a module whose not-yet-claimed parameters reach ``bucket_bytes``
    becomes a unit, so units hold about that much and a deep model gets many. A
    module in ``unclaimable`` (``read_by_their_parent``) leaves its parameters to an
    ancestor."""
    chosen: list[nn.Module] = []
    _claim_by_size(model, model, bucket_bytes, chosen, unclaimable)
    return chosen


def _claim_by_size(module: nn.Module, root: nn.Module, bucket_bytes: int,
                   chosen: list[nn.Module], unclaimable) -> int:
    """``_auto_units``' walk; returns the bytes of ``module``'s parameters left unclaimed.
    A module-level function: a nested recursive one would be a reference cycle."""
    size = sum(p.numel() * p.element_size() for p in module._parameters.values() if p is not None)
    size += sum(_claim_by_size(child, root, bucket_bytes, chosen, unclaimable)
                for child in module.children())
    if (module is not root and size >= bucket_bytes and not isinstance(module, CONTAINERS)
            and id(module) not in unclaimable):
        chosen.append(module)
        return 0
    return size


def unit_owners(model: nn.Module, unit_modules: list[nn.Module]) -> dict[int, int]:
    """id(parameter) -> index of the unit that owns it (see the module docstring)."""
    index_of = {id(m): i for i, m in enumerate(unit_modules)}
    parent: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parent.setdefault(id(child), module)

    def unit_of(module: nn.Module) -> int:
        while id(module) not in index_of:
            module = parent[id(module)]
        return index_of[id(module)]

    def ancestors(index: int) -> list[int]:  # the unit itself, up to the root
        chain = [index]
        while chain[-1] != 0:
            chain.append(unit_of(parent[id(unit_modules[chain[-1]])]))
        return chain

    owner: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is None:
                continue
            here = unit_of(module)
            if id(param) not in owner:
                owner[id(param)] = here
            else:  # lowest common ancestor of the two units
                mine = set(ancestors(here))
                owner[id(param)] = next(u for u in ancestors(owner[id(param)]) if u in mine)
    return owner
