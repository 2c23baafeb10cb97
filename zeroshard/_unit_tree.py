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

from collections import Counter
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
    ancestor. Each parameter counts once, at the deepest place above every place it
    sits (``unit_owners``' rule): a tied weight at the modules' common ancestor, and a
    module registered in several places (shared by module) above all of them, so it
    and what it holds never count towards one of its parents alone."""
    places: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                places.setdefault(id(param), (param, []))[1].append(path)
    counted: Counter = Counter()
    for param, paths in places.values():
        counted[_common_path(paths)] += param.numel() * param.element_size()
    chosen: list[nn.Module] = []
    _claim_by_size(model, "", model, bucket_bytes, chosen, set(), unclaimable, counted)
    return chosen


def _common_path(paths: list[str]) -> str:
    """The deepest module path above (or at) every one of ``paths``."""
    parts = [path.split(".") if path else [] for path in paths]
    common = []
    for names in zip(*parts):
        if any(name != names[0] for name in names):
            break
        common.append(names[0])
    return ".".join(common)


def _claim_by_size(module: nn.Module, path: str, root: nn.Module, bucket_bytes: int,
                   chosen: list[nn.Module], chosen_ids: set[int], unclaimable,
                   counted: Counter) -> int:
    """``_auto_units``' walk; returns the bytes counted at ``path`` and below that are
    left unclaimed. A module-level function: a nested recursive one would be a
    reference cycle."""
    if id(module) in chosen_ids:  # chosen at another place it is registered
        return 0
    size = counted[path] + sum(
        _claim_by_size(child, f"{path}.{name}" if path else name, root, bucket_bytes, chosen,
                       chosen_ids, unclaimable, counted)
        for name, child in module._modules.items() if child is not None)
    if (module is not root and size >= bucket_bytes and not isinstance(module, CONTAINERS)
            and id(module) not in unclaimable):
        chosen.append(module)
        chosen_ids.add(id(module))
        return 0
    return size


def unit_owners(model: nn.Module, unit_modules: list[nn.Module]) -> dict[int, int]:
    """id(parameter) -> index of the unit that owns it (see the module docstring).

    A module registered in several places (ALBERT-style sharing by module:
    ``blocks[1].attn = blocks[0].attn``) is held at each of them, as a tied parameter
    is held by each module it sits in: its parameters belong to the lowest unit above
    every place. Owned by the unit above its first place only, they were released
    while another unit ran it, and that forward was refused (a helper's probe)."""
    index_of = {id(m): i for i, m in enumerate(unit_modules)}
    owner: dict[int, int] = {}
    # every place a module is registered, by its path (a shared module has several)
    for path, module in model.named_modules(remove_duplicate=False):
        here = _units_above(path, model, index_of)
        for param in module._parameters.values():
            if param is None:
                continue
            if id(param) not in owner:
                owner[id(param)] = here
            else:  # the lowest unit above both: the first of one chain in the other
                mine = set(here)
                owner[id(param)] = [u for u in owner[id(param)] if u in mine]
    return {param_id: chain[0] for param_id, chain in owner.items()}


def _units_above(path: str, model: nn.Module, index_of: dict[int, int]) -> list[int]:
    """The units from the module at ``path`` up to the root (itself first, if a unit)."""
    names = path.split(".") if path else []
    modules = [model]
    for name in names:
        modules.append(modules[-1]._modules[name])
    return [index_of[id(m)] for m in reversed(modules) if id(m) in index_of]
