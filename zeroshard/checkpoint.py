"""Sharded checkpoints: every rank writes what it owns, any world size and stage loads it.

On disk, ``path`` is a folder that holds one complete checkpoint and a pointer to it:

    path/LATEST            the name of the complete version ("v000003"), replaced atomically
    path/v000003/meta.pt   the model and optimizer it came from (names, shapes, memory
                           orders, groups, per-parameter optimizer scalars) and every
                           file's size
    path/v000003/rank00001.pt   shard 1's pieces of the parameters (see _sharded_state.py):
                           fp32 master values and per-element optimizer states; rank
                           0's file also holds the buffers and the modules' extra
                           state (Note [modules' extra state] in _extra_state.py)
    path/v000003/extra00001.pt  rank 1's ``extra``
    path/v000003/crc00001.txt   the CRC-32 of each file rank 1 wrote (Note [checksums])
    path/v000003/meta.crc32     the CRC-32 of meta.pt
    path/v000004.partial/  a save in progress, or one that crashed: never loaded,
                           removed by the next save (as is a version folder that a
                           crash left unnamed by LATEST)

Note [atomic publish]:
    A save writes a new version into a ``.partial`` folder. Once every rank has
    written and fsynced its files, rank 0 writes ``meta.pt``, renames the folder to
    its final name and then replaces ``LATEST`` (write a temporary file, fsync,
    ``os.replace``): the one step that makes the new version current. Only then is
    the previous version deleted. A crash at any point before the replace leaves
    ``LATEST`` naming the previous complete version; after it, the new one. Loading
    follows ``LATEST`` only, and checks every file's size against ``meta.pt`` before
    it changes anything. ``path`` must be on a filesystem every rank sees.

Note [checksums]:
    A file of the right size can still hold the wrong bytes (a disk or a copy that
    flipped some), and torch.load reads them without complaint: a resume would carry
    on from damaged weights or moments, silently. So each rank takes the CRC-32 of
    every byte it writes, as torch.save hands them to the file (no second read), and
    writes them beside its files; rank 0 puts them all in ``meta.pt``. A load checks
    them before it changes anything, the files dealt out across the loading ranks
    (each reads its share once, in chunks); a mismatch raises on the rank that found
    it, naming the file, and "another rank failed" on the others. A checkpoint saved
    before checksums has none, and loads as before (sizes checked only).

    ``meta.pt`` cannot hold its own CRC-32, and it holds what a resume reads as numbers:
    the per-parameter optimizer scalars (Adam's ``step``) and the hyper-parameters. Its
    bytes went unchecked: a helper's probe changed a saved ``step`` from 3 to 1 and the
    resume loaded it without a word, 2.8e-3 to 5.3e-3 from the run that never stopped.
    So rank 0 writes its CRC-32 to ``meta.crc32`` beside it, and every rank checks it
    before unpickling ``meta.pt`` (a small file, read whole by each). ``meta.pt`` says
    it has one (``"meta_checksum"``), so a checkpoint that lost the file is refused; one
    saved before has neither, and loads as before.

Note [why not torch.distributed.checkpoint]:
    DCP reshards tensors that describe their own sharding (DTensor, ShardedTensor).
    A zeroshard shard is a range of a padded flat buffer that cuts across
    parameters, so each rank would have to describe one chunk per parameter piece
    (DTensor cannot express uneven ranges; ShardedTensor is deprecated), and DCP's
    planner would exchange those plans collectively. Plain per-rank files of
    parameter pieces, read back with ``mmap``, reshard to any layout with range
    arithmetic and no collective on the read path; that is simpler to check.
"""

from __future__ import annotations

import bisect
import io
import os
import shutil
import zlib
from pathlib import Path

import torch

from . import _comm
from . import _file_pages as file_pages
from . import _extra_state as extra_state
from ._bucket import from_memory_order, to_memory_order
from ._full_state import SIZED_IN_FORWARD, buffer_aliases
from ._inference_mode import outside_inference_mode
from ._inner import qualname as _qualname
from ._sharded_state import (check_one_scalar_per_bucket, load_from, memory_orders,
                             optimizer_layouts, owned_pieces, parameter_names, ranges_to_load)

FORMAT = "zeroshard-checkpoint"
# 2: meta.pt has "orders" (Note [memory order] in _bucket.py). A checkpoint that holds
# every parameter row-major is written as 1, which any version reads alike; one that
# does not is 2, so a zeroshard from before the orders refuses it instead of loading
# its pieces scrambled.
FORMAT_VERSION = 2
LATEST = "LATEST"
META_CHECKSUM = "meta.crc32"


def save_checkpoint(path, model, opt, extra=None) -> None:
    """Save ``model`` and ``opt`` (a ZeroOptimizer over it) under the folder ``path``.

    Call it on every rank. Each rank writes only what it owns; nothing is gathered
    (on a mesh rank 0's replica writes the shards). ``extra`` is any picklable state
    of this rank (step, RNG states, data position):
    ``load_checkpoint`` returns it. The new checkpoint replaces the previous one in
    ``path`` atomically (Note [atomic publish]): a crash during the save leaves the
    previous one loadable.
    """
    check_arguments(path, model, opt)
    view = opt.sharding
    view.stage.refuse_abandoned_backward("save_checkpoint()")  # Note [a backward that raised]
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint path {str(root)!r} is a file; pass a folder (it is created)")
    view.take_outside_writes()  # with mixed precision, writes to the parameters reach the masters
    layouts = optimizer_layouts(opt)
    # Note [modules' extra state] in _extra_state.py: taken once, on every rank (a
    # get_extra_state that fails fails on every rank, before anything is written); rank
    # 0's is saved, as its buffers are
    module_states = {}

    def check_what_a_load_reads():
        module_states.update(extra_state.collect(model))
        _refuse_what_a_load_refuses(opt, layouts, module_states)
    _share(opt, check_what_a_load_reads)
    version = _agree_on_version(opt, root)
    staging, final = root / f"{version}.partial", root / version
    _share(opt, (lambda: _prepare_staging(root, staging)) if view.rank == 0 else None)
    # Everything rank 0 needs to describe the checkpoint, computed on every rank from
    # local state (inner state is identical across ranks for each bucket).
    # On a mesh every replica holds the same shards: rank 0's replica writes them.
    writes_shard = view.ranks.first_replica
    pieces = owned_pieces(opt) if writes_shard else {}
    whole = {name for b in view.buckets if b.owns_whole_parameters
             for name in b.param_names}
    buffers = _persistent_buffers(model) if view.rank == 0 else {}

    def write_mine():
        _refuse_unseen_staging(staging, view.rank)
        checksums = {}  # Note [checksums]
        if writes_shard:
            shard = {"pieces": {name: [(p.start, p.values, p.states) for p in ps]
                                for name, ps in pieces.items()},
                     # the parameters this rank steps whole: their state is here only
                     "layouts": {name: layout for name, layout in layouts.items()
                                 if name in whole},
                     "buffers": buffers,
                     "module_extra_states": module_states if view.rank == 0 else {}}
            name = _rank_file(view.ranks.shard_rank)
            checksums[name] = _save_synced(shard, staging / name)
        name = _extra_file(view.rank)
        checksums[name] = _save_synced(extra, staging / name)
        _write_text_synced(staging / _checksum_file(view.rank),
                           "".join(f"{name} {crc}\n" for name, crc in checksums.items()))
    _share(opt, write_mine)

    def publish():
        meta = _describe(opt, model, layouts)
        meta["files"] = {f.name: f.stat().st_size for f in sorted(staging.iterdir())}
        meta["checksums"] = _read_checksums(staging)
        meta["meta_checksum"] = True
        crc = _save_synced(meta, staging / "meta.pt")
        _write_text_synced(staging / META_CHECKSUM, f"{crc}\n")  # Note [checksums]
        _fsync_dir(staging)
        os.rename(staging, final)
        _fsync_dir(root)
        _replace_text(root / LATEST, version)  # Note [atomic publish]: the commit point
        _remove_versions_except(root, version, ignore_errors=True)  # published already
    _share(opt, publish if view.rank == 0 else None)


@outside_inference_mode  # Note [inference mode] in _inference_mode.py
def load_checkpoint(path, model, opt):
    """Load the checkpoint in folder ``path`` into ``model`` and ``opt``; return ``extra``.

    Call it on every rank. The checkpoint may come from any world size and stage,
    with or without mixed precision; ``opt`` must be the same optimizer class over
    a model with the same parameter names and shapes, and the same param groups.
    Everything is checked, and every file opened, before anything changes; a bad
    checkpoint raises the same error on every rank. Rank r gets the ``extra`` that
    rank r saved, or rank 0's if the saving run had fewer ranks.
    """
    check_arguments(path, model, opt)
    opt._refuse_load("load_checkpoint()")
    view = opt.sharding
    state = {}

    def read_all():  # every check and every file, on every rank, before anything changes
        # (inside the shared step: a folder one rank cannot see, per-node disks or a copy
        # that did not reach it, left the others waiting in the load's collectives)
        folder = state["folder"] = _resolve_latest(Path(path))
        meta = state["meta"] = _load_meta(folder)
        _check_meta(meta, folder, opt, model)
        _check_contents(meta, folder, view.rank, view.world_size)
        # each opened and unpickled once, keeping what this rank loads: Note [a
        # checkpoint file read once] in _file_pages.py
        source = state["source"] = _CheckpointSource(meta, parameter_names(model),
                                                     memory_orders(opt), ranges_to_load(opt))
        for r in range(meta["world_size"]):
            file_path = folder / _rank_file(r)
            file = _load_file(file_path, weights_only=True, mmap=True)
            source.keep_from(file, file_pages.read_in_place(file_path))
            if r == 0:  # the buffers are rank 0's
                state["buffers"] = file["buffers"]
                # absent from a checkpoint saved before Note [modules' extra state]
                state["module_extra_states"] = file.get("module_extra_states")
        _check_buffers(state["buffers"], folder, model)
        if state["module_extra_states"] is not None:
            extra_state.check_saved(state["module_extra_states"], model, f"checkpoint {folder}")
        check_one_scalar_per_bucket(opt, source.optimizer_layout,
                                    [group["hyperparameters"] for group in meta["param_groups"]])
        extra_rank = view.rank if view.rank < meta.get("ranks", meta["world_size"]) else 0
        state["extra"] = _load_file(folder / _extra_file(extra_rank), weights_only=False)
    _share(opt, read_all)

    meta, buffers = state["meta"], state["buffers"]
    load_from(opt, state["source"])
    aliases = buffer_aliases(model)  # Note [buffers a checkpoint holds]
    with torch.no_grad():
        for name, buffer in model.named_buffers(remove_duplicate=False):
            key = next((a for a in aliases.get(name, []) if a in buffers), None)
            if key is not None:
                buffer.copy_(buffers[key])
    extra_state.restore(model, extra_state.to_device(state["module_extra_states"] or {},
                                                     view.device))
    opt._take_loaded_settings([saved["hyperparameters"] for saved in meta["param_groups"]])
    view.inner.take_own_entries(meta.get("optimizer_own_state", []))
    return state["extra"]


# -- what meta.pt records, and the checks made against it --------------------------------

def _describe(opt, model, layouts: dict) -> dict:
    """What ``meta.pt`` records; ``layouts``: this rank's ``optimizer_layouts``."""
    view = opt.sharding
    names = {id(p): n for n, p in model.named_parameters()}
    orders = memory_orders(opt)  # the order of each piece's elements; absent: row-major
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION if orders else 1,
        "orders": orders,
        # the shard files (one per shard: every replica holds the same), and the extras
        "world_size": view.ranks.shard_size, "ranks": view.world_size, "stage": opt.stage,
        "mixed_precision": repr(opt.mixed_precision),
        "optimizer_class": _qualname(view.optimizer_class),
        "group_classes": [_qualname(c) for c in view.inner.classes],
        "params": {n: tuple(p.shape) for n, p in model.named_parameters()},
        "param_groups": [{"names": [names[id(p)] for p in members], "hyperparameters": settings}
                         for members, settings in zip(view.group_members, _saved_settings(opt))],
        "optimizer": layouts,
        "optimizer_own_state": _saved_own_state(opt),
    }


def _saved_settings(opt) -> list[dict]:
    """Each param group's hyper-parameters, as ``meta.pt`` records them."""
    return [{k: _plain(v) for k, v in group.items() if k != "params"} for group in opt.param_groups]


def _saved_own_state(opt) -> list[tuple[str, dict]]:
    """Note [state under an optimizer's own keys] in _inner.py, as ``meta.pt`` records it."""
    return [(name, {k: _plain(v) for k, v in entries.items()})
            for name, entries in opt.sharding.inner.own_entries()]


def _refuse_what_a_load_refuses(opt, layouts: dict, module_states: dict) -> None:
    """Note [a checkpoint that loads]:
        ``load_checkpoint`` reads every file with torch's weights-only unpickler, which
        refuses Python objects other than tensors, numbers, strings and containers of
        them. Some optimizer classes keep such objects in their state or settings
        (AdaShift a ``deque`` of past gradients, GaLore projectors, SCION an enum setting):
        the save wrote them without a word, and every load of that checkpoint was refused
        (a helper's sweep), found only when a run needed it. So the save tries the
        non-tensor state it is about to write through that unpickler first (small: the
        groups' settings, per-tensor scalars, the classes' own entries, the modules'
        extra state), and refuses on every rank before writing anything, naming the
        state and the class."""
    parts = {f"param_groups[{i}]": settings for i, settings in enumerate(_saved_settings(opt))}
    parts.update({f"the optimizer state of {name!r}": layout[0]
                  for name, layout in layouts.items()})
    parts.update({f"{name}'s own state": entries for name, entries in _saved_own_state(opt)})
    classes = _classes([_qualname(c) for c in opt.sharding.inner.classes])
    # where -> (who keeps it, what else to do)
    holders = dict.fromkeys(parts, (
        f"the optimizer class ({classes}) keeps it in its state",
        ", or save this run with opt.state_dict() and torch.save on each rank (same world "
        "size and stage to load)"))
    modules = extra_state.modules_with_extra_state(opt.sharding.model)
    for key, state in module_states.items():
        where = f"{key} (Note [modules' extra state] in zeroshard/_extra_state.py)"
        parts[where] = state
        holders[where] = (f"{type(modules[key]).__qualname__}.get_extra_state() returns it", "")

    def loads(value) -> Exception | None:
        buffer = io.BytesIO()
        torch.save(_tensors_left_out(value), buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as error:  # noqa: BLE001 (the unpickler's own error, reported)
            return error
        return None

    if loads(parts) is None:
        return
    where, error = next((where, e) for where, part in parts.items() if (e := loads(part)))
    lines = str(error).splitlines()
    why = next((line.strip() for line in lines if "Unsupported" in line), lines[0] if lines else "")
    raise ValueError(
        f"save_checkpoint: {where} holds a Python object that load_checkpoint's weights-only "
        f"read refuses ({why[:300]}): {holders[where][0]}, so no load of this checkpoint "
        "would work. Nothing was written. Allow that type with "
        f"torch.serialization.add_safe_globals([...]) (then save and load work){holders[where][1]}")


def _tensors_left_out(value):
    """``value`` with every tensor replaced by None: what the unpickler is asked about."""
    if isinstance(value, torch.Tensor):
        return None
    if type(value) is dict:  # subclasses (a defaultdict's factory) go as they are
        return {k: _tensors_left_out(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_tensors_left_out(v) for v in value)
    return value


def _plain(value):
    """A hyper-parameter as the weights-only unpickler of ``load_checkpoint`` reads it: a
    numpy scalar (an lr a ``LambdaLR`` computed with ``np.cos``) as the Python number it
    holds. Saved as it was, every load of the checkpoint was refused, on every rank
    ("Weights only load failed"), and the save said nothing (a helper's probe)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(item) for item in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _check_meta(meta, folder: Path, opt, model) -> None:
    """Raise, naming the difference, unless ``meta`` fits ``opt`` and every file is whole."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder / 'meta.pt'} is not a zeroshard checkpoint description")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {meta['format_version']} is newer than this "
                         f"zeroshard reads ({FORMAT_VERSION}); upgrade zeroshard")
    mine = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if meta["params"] != mine:
        missing = sorted(set(mine) - set(meta["params"]))
        unexpected = sorted(set(meta["params"]) - set(mine))
        reshaped = sorted(n for n in set(mine) & set(meta["params"]) if mine[n] != meta["params"][n])
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{reshaped[0]} has shape {meta['params'][reshaped[0]]} there, "
                       f"{mine[reshaped[0]]} here")
        raise ValueError(f"checkpoint {folder} is from a different model ({detail}); load it "
                         "into the model it was saved from")
    names = {id(p): n for n, p in model.named_parameters()}
    my_groups = [[names[id(p)] for p in members] for members in opt.sharding.group_members]
    saved_groups = [g["names"] for g in meta["param_groups"]]
    if saved_groups != my_groups:
        raise ValueError(_groups_differ(folder, saved_groups, my_groups))
    saved_classes = meta.get("group_classes", [meta["optimizer_class"]] * len(saved_groups))
    my_classes = [_qualname(c) for c in opt.sharding.inner.classes]
    if saved_classes != my_classes:
        raise ValueError(f"checkpoint {folder} holds state of {_classes(saved_classes)}; this "
                         f"optimizer steps {_classes(my_classes)}")
    for name, size in meta["files"].items():
        file = folder / name
        actual = file.stat().st_size if file.exists() else None
        if actual != size:
            raise ValueError(f"checkpoint file {file} is {'missing' if actual is None else 'truncated'}"
                             f" ({actual} bytes, {size} written); the checkpoint is damaged")


def _groups_differ(folder: Path, saved: list[list[str]], mine: list[list[str]]) -> str:
    """Why a checkpoint's param groups (parameter names, group by group) do not fit this
    optimizer's: other parameters, or the same ones in another order, which a rebuilt
    model gives when it registers a parameter at another point (``torch.nn.utils.prune``
    applied after building the model moves ``weight_orig`` after ``bias``: helper-95),
    named by its first difference."""
    if [sorted(g) for g in saved] == [sorted(g) for g in mine]:
        group, position = next((g, i) for g, (a, b) in enumerate(zip(saved, mine))
                               for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return (f"checkpoint {folder} holds the same parameters in each param group as this "
                f"optimizer, in another order: param group {group}'s parameter {position} is "
                f"{saved[group][position]!r} there and {mine[group][position]!r} here. The "
                "order is the param groups' (model.parameters() without them), which is the "
                "order the model registered its parameters in: register them as the saving run "
                "did (apply torch.nn.utils.prune or a parametrization at the same point), or "
                "list each group's parameters in the saving run's order")
    return (f"checkpoint {folder} has param groups of sizes {[len(g) for g in saved]} over "
            f"other parameters than this optimizer's ({[len(g) for g in mine]}); build "
            "ZeroOptimizer with the param_groups of the saving run")


def _check_contents(meta: dict, folder: Path, rank: int, world_size: int) -> None:
    """Note [checksums]: this rank's share of the files, read once and checked against
    the CRC-32 taken as they were written."""
    names = sorted(meta.get("checksums", {}))  # none in a checkpoint saved before them
    for name in names[rank::world_size]:
        _check_crc32(folder / name, meta["checksums"][name])


def _check_crc32(file: Path, written: int) -> None:
    found = _crc32_of(file)
    if found != written:
        raise ValueError(f"checkpoint file {file} is corrupted: its CRC-32 is {found:08x}, "
                         f"{written:08x} when it was written: this checkpoint is damaged; "
                         "load another (a copy, or one saved to another folder)")


def _load_meta(folder: Path) -> dict:
    """``meta.pt``, read once its CRC-32 matched ``meta.crc32`` (Note [checksums])."""
    file, checksum = folder / "meta.pt", folder / META_CHECKSUM
    written = checksum.read_text().strip() if checksum.is_file() else None
    if written is not None:
        _check_crc32(file, int(written) if written.isdigit() else -1)
    meta = _load_file(file, weights_only=True)
    if written is None and isinstance(meta, dict) and meta.get("meta_checksum"):
        raise ValueError(f"checkpoint file {checksum} is missing (meta.pt was saved with it): "
                         "this checkpoint is damaged; load another")
    return meta


def _crc32_of(file: Path, chunk_bytes: int = 1 << 24) -> int:
    crc, chunk = 0, bytearray(chunk_bytes)
    with open(file, "rb", buffering=0) as f:
        while read := f.readinto(chunk):
            crc = zlib.crc32(memoryview(chunk)[:read], crc)
    return crc


def _read_checksums(staging: Path) -> dict[str, int]:
    checksums = {}
    for file in sorted(staging.glob("crc*.txt")):
        for line in file.read_text().splitlines():
            name, crc = line.split()
            checksums[name] = int(crc)
    return checksums


def _check_buffers(saved: dict, folder: Path, model) -> None:
    """Raise, naming the buffers, unless the checkpoint holds every persistent buffer of
    the model and no buffer the model lacks, as torch's strict ``load_state_dict`` asks
    (one missing kept its initial value, one unexpected was dropped, silently: a
    helper's probe), and every saved buffer the model has fits its shape (a broadcastable
    one was copied across it, silently; another failed after the parameters had
    changed: a helper's probes).

    Note [buffers a checkpoint holds]:
        The persistent ones, those ``model.state_dict()`` holds, and a load restores
        those only, as torch's ``load_state_dict`` does. A non-persistent buffer is
        computed by the model (a rotary embedding's ``inv_freq``, a causal mask sized by
        the configured length); checkpoints held and restored them all, until this
        change. A helper's probe: a bf16 ``inv_freq`` saved under a ``MixedPrecision``
        policy stayed bf16-rounded in an fp32 resume (1.25e-4 from the fp32 model's), and
        a mask of another length was refused. A checkpoint saved before this change
        holds them; the load skips them, as it skips any name the model computes."""
    aliases = buffer_aliases(model)  # a buffer registered in two modules is saved once
    missing = sorted(name for name, names in aliases.items() if not any(a in saved for a in names))
    unexpected = sorted(set(saved) - {name for name, _ in model.named_buffers(remove_duplicate=False)})
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not hold this model's buffers: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}. Load it into the model "
                         "it was saved from")
    for name, buffer in model.named_buffers(remove_duplicate=False):
        key = next((a for a in aliases.get(name, []) if a in saved), None)
        if key is not None and saved[key].shape != buffer.shape:
            raise ValueError(f"checkpoint {folder} holds buffer {key!r} of shape "
                             f"{tuple(saved[key].shape)}; the model's is {tuple(buffer.shape)}. "
                             "Load it into the model it was saved from" + (
                                 SIZED_IN_FORWARD if buffer.numel() <= 1 else ""))


def _persistent_buffers(model) -> dict[str, torch.Tensor]:
    """Note [buffers a checkpoint holds]: each persistent buffer once, under its first
    persistent name (a tensor registered in two modules, persistent in one only, is
    listed by ``named_buffers()`` under the other: saved by that name, nothing was saved
    and the load refused the model's own checkpoint, a reviewer's probe)."""
    persistent, saved, seen = buffer_aliases(model), {}, set()
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in persistent and id(buffer) not in seen:
            seen.add(id(buffer))
            saved[name] = buffer.detach().clone()
    return saved


class _CheckpointSource:
    """Serves ``load_from`` parameter ranges from the pieces of every saving rank.

    The rank files are memory-mapped and unpickled once each (``keep_from``), keeping
    the pieces that overlap the ranges this rank loads; before each bucket the pages
    of the pieces the previous one read are handed back, so they leave this rank's
    memory with their bucket instead of adding up to its whole share of the checkpoint
    by the end of the load (Note [a checkpoint file read once] in _file_pages.py).

    Pieces count elements in the saving run's memory order of each parameter (Note
    [memory order] in _bucket.py); a parameter this run holds in another order (a
    ``channels_last`` weight saved from a row-major model, or the reverse) is joined
    from all its pieces and moved to this run's order whole."""

    def __init__(self, meta: dict, names: dict[int, str], orders: dict[str, tuple[int, ...]],
                 wanted: dict[str, list[tuple[int, int]]]) -> None:
        self.layouts = meta["optimizer"]
        self.names = names  # id(parameter) -> name
        self.shapes = meta["params"]
        self.saved_orders = meta.get("orders", {})  # format 1: every parameter row-major
        self.orders = orders  # this run's
        self.wanted = wanted  # the ranges this rank loads (ranges_to_load)
        # the saving ranks' pieces this rank reads, of each parameter in order, each with
        # whether its pages may be handed back; the layouts of the parameters stepped
        # whole, from their owner (views of the mapped files)
        self.saved_pieces: dict[str, list[tuple]] = {}
        self.saved_whole_layouts: dict[str, tuple] = {}
        self.pieces: dict[str, list[tuple]] = {}  # of the bucket being loaded
        self.whole_layouts: dict[str, tuple] = {}
        self.served: list[tuple] = []  # pieces read since the last prepare

    def _order(self, name: str, orders: dict) -> tuple[int, ...]:
        return orders.get(name, tuple(range(len(self.shapes[name]))))

    def keep_from(self, file: dict, droppable: bool) -> None:
        """Keep what this rank loads of one rank file (every piece of a parameter to be
        moved to another memory order, which is joined whole)."""
        for name, pieces in file["pieces"].items():
            ranges = self.wanted.get(name)
            if not ranges:
                continue
            whole = self._order(name, self.saved_orders) != self._order(name, self.orders)
            kept = self.saved_pieces.setdefault(name, [])
            for start, values, states in pieces:
                stop = start + values.numel()
                if whole or any(lo < stop and start < hi for lo, hi in ranges):
                    kept.append((start, values, states, droppable))
        # all of them: a bucket's first layout counts for every rank (load_from)
        self.saved_whole_layouts.update(file.get("layouts", {}))

    def prepare(self, params, dtype) -> None:
        for piece in self.served:  # hand back the pages the previous bucket read
            if piece[3]:
                for tensor in (piece[1], *piece[2].values()):
                    file_pages.drop(tensor)
        self.served = []
        wanted = {self.names[id(p)] for p in params}
        self.pieces = {name: self.saved_pieces[name] for name in wanted & self.saved_pieces.keys()}
        self.whole_layouts = {name: self.saved_whole_layouts[name]
                              for name in wanted & self.saved_whole_layouts.keys()}
        for name, pieces in self.pieces.items():
            pieces.sort(key=lambda piece: piece[0])  # from every file, in order
            saved_order, order = self._order(name, self.saved_orders), self._order(name, self.orders)
            if saved_order != order:
                self.served += pieces
                self.pieces[name] = [self._reordered(name, pieces, saved_order, order)]

    def _reordered(self, name: str, pieces: list[tuple], saved_order, order) -> tuple:
        """All of ``name``'s pieces as one, from ``saved_order`` to ``order``."""
        shape = self.shapes[name]
        if sum(piece[1].numel() for piece in pieces) != torch.Size(shape).numel():
            raise ValueError(f"checkpoint pieces of {name!r} do not cover it; the checkpoint "
                             "is damaged")

        def move(flat: torch.Tensor) -> torch.Tensor:
            return to_memory_order(from_memory_order(flat, shape, saved_order), order)

        values = move(torch.cat([piece[1] for piece in pieces]))
        states = {key: move(torch.cat([piece[2][key] for piece in pieces]))
                  for key in pieces[0][2]}
        return 0, values, states, False  # a copy: not the file's pages

    def _ranges(self, name: str, start: int, stop: int):
        """(piece, slice of the piece) for each piece that overlaps [start, stop), in order."""
        pieces = self.pieces[name]
        first = max(0, bisect.bisect_right([p[0] for p in pieces], start) - 1)
        for piece in pieces[first:]:
            piece_start, values = piece[0], piece[1]
            lo, hi = max(start, piece_start), min(stop, piece_start + values.numel())
            if lo < hi:
                self.served.append(piece)
                yield piece, slice(lo - piece_start, hi - piece_start)
            if piece_start >= stop:
                break

    def values(self, name: str, start: int, stop: int) -> torch.Tensor:
        return torch.cat([piece[1][part] for piece, part in self._ranges(name, start, stop)])

    def states(self, name: str, start: int, stop: int) -> dict:
        parts = list(self._ranges(name, start, stop))
        return {key: torch.cat([piece[2][key][part] for piece, part in parts])
                for key in parts[0][0][2]} if parts else {}

    def optimizer_layout(self, name: str):
        return self.whole_layouts.get(name, self.layouts.get(name))


# -- files, folders, and agreeing across ranks -------------------------------------------

def check_arguments(path, model, opt) -> None:
    from .optimizer import ZeroOptimizer
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike folder, got {type(path).__name__}")
    if not isinstance(opt, ZeroOptimizer):
        raise TypeError(f"opt must be a zeroshard.ZeroOptimizer, got {type(opt).__name__}")
    if opt.model is not model:
        raise ValueError("model is not the module this ZeroOptimizer was built over; pass that one")
    view = opt.sharding  # a closed optimizer is refused here, with the fix
    present = {id(p) for p in model.parameters()}
    missing = [name for bucket in view.every_bucket
               for param, name in zip(bucket.params, bucket.param_names) if id(param) not in present]
    if missing:  # (a bare KeyError before: a helper's probe merged LoRA, then saved)
        raise ValueError(
            f"{len(missing)} parameter(s) this ZeroOptimizer manages are no longer in the model "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): a module was "
            "replaced or removed after it was built (PEFT's merge_and_unload(), a head swapped). "
            "Save before changing the model, or opt.close() (the parameters come back whole) "
            "and save the changed model as a plain module (save_pretrained, torch.save)")


def _agree_on_version(opt, root: Path) -> str:
    """Rank 0 names the new version (one past LATEST) and tells the others."""
    view = opt.sharding
    number = torch.zeros((), dtype=torch.int64, device=view.device)
    if view.rank == 0:
        latest = root / LATEST
        if latest.exists():
            number.fill_(int(latest.read_text().strip().lstrip("v")) + 1)
    _comm.broadcast(number, group=view.ranks, stats=opt.comm_stats, label="checkpoint")
    return f"v{int(number):06d}"


def _share(opt, work) -> None:
    """``_comm.run_and_share`` over this optimizer's group."""
    _comm.run_and_share(work, group=opt.sharding.ranks, stats=opt.comm_stats, label="checkpoint",
                        device=opt.sharding.device)


def _refuse_unseen_staging(staging: Path, rank: int) -> None:
    """Rank 0 made ``staging``; a rank that cannot see it was given another folder
    (``f"ckpt_{rank}"``), or one on a disk of its own node. Its write failed with a raw
    FileNotFoundError naming a file it was never asked to make (a probe)."""
    if not staging.is_dir():
        raise ValueError(
            f"save_checkpoint: rank {rank} cannot find {str(staging)!r}, which rank 0 made "
            "for this checkpoint if its `path` is this rank's: pass the same folder on "
            "every rank, on a filesystem every rank sees (one checkpoint is every rank's "
            "files together; per-rank folders or per-node local disks split it)")


def _prepare_staging(root: Path, staging: Path) -> None:
    """Remove what crashed saves left (a .partial folder, or a version renamed but never
    named by LATEST), keeping the complete checkpoint LATEST names; make the staging folder."""
    root.mkdir(parents=True, exist_ok=True)
    latest = root / LATEST
    _remove_versions_except(root, latest.read_text().strip() if latest.is_file() else None)
    staging.mkdir()


def _remove_versions_except(root: Path, keep: str | None, ignore_errors: bool = False) -> None:
    """Remove every version folder (complete, renamed or .partial) but ``keep``."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith("v") and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=ignore_errors)


def _resolve_latest(root: Path) -> Path:
    latest = root / LATEST
    if not latest.is_file():
        raise ValueError(f"{str(root)!r} is not a zeroshard checkpoint folder (it has no {LATEST} "
                         "file); pass the folder given to save_checkpoint")
    folder = root / latest.read_text().strip()
    if not (folder / "meta.pt").is_file():
        raise ValueError(f"checkpoint {folder} named by {latest} has no meta.pt; the checkpoint "
                         "is damaged")
    return folder


def _load_file(file: Path, *, weights_only: bool, mmap: bool = False):
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint file {file}: {exc}") from exc


def _save_synced(obj, file: Path) -> int:
    """Write ``obj`` to ``file`` and fsync it; the CRC-32 of its bytes (Note [checksums])."""
    with open(file, "wb") as f:
        checksummed = _Checksummed(f)
        torch.save(obj, checksummed)
        f.flush()
        os.fsync(f.fileno())
    return checksummed.crc32


class _Checksummed:
    """A file that torch.save writes through, taking the CRC-32 of every byte on the way."""

    def __init__(self, file) -> None:
        self.file = file
        self.crc32 = 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _replace_text(file: Path, text: str) -> None:
    temporary = file.with_name(file.name + ".tmp")
    _write_text_synced(temporary, text)
    os.replace(temporary, file)
    _fsync_dir(file.parent)


def _write_text_synced(file: Path, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _extra_file(rank: int) -> str:
    return f"extra{rank:05d}.pt"


def _checksum_file(rank: int) -> str:
    return f"crc{rank:05d}.txt"


def _classes(names: list[str]) -> str:
    """Optimizer classes per param group, for messages."""
    if len(set(names)) == 1:
        return names[0]
    return ", ".join(f"param_groups[{i}]: {name}" for i, name in enumerate(names))
