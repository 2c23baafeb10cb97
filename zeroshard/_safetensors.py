"""Full models as safetensors files, the format Hugging Face and most published models use.

Writing: ``save_full_model`` streams. The safetensors format is an 8-byte header
length, a JSON header naming every tensor's dtype, shape and byte range, then the
raw bytes. Every tensor's name, dtype and shape is known before anything is
gathered, so rank 0 writes each file's header first and then each parameter's
bytes as its bucket arrives (Note [streaming export] in _full_state.py): rank 0
holds one bucket in host memory, every rank at most one bucket on its device.
(``safetensors.torch.save_file`` takes the whole dict at once, and needs numpy.)

Reading: ``SafetensorsFiles`` opens a file, or a folder as Hugging Face writes it
(``model.safetensors``, or shards named by ``model.safetensors.index.json``), and
reads a flat range of a tensor as just those bytes of the file: each rank reads
only the ranges it owns, and nothing is memory-mapped (mapped pages it touched would
count against the rank until the end of the load). Both directions are a few lines
of the format, so zeroshard needs no package for it; the tests read and write the
files with the ``safetensors`` library and Hugging Face to check them.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from . import _comm
from .checkpoint import check_arguments
from ._full_state import persistent_buffer_names, stream_parameters

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64"}


def save_full_model(path, model, opt, dtype: torch.dtype | None = None,
                    max_shard_size_mb: float = 5 * 1024) -> None:
    """Write ``model``'s full state dict as safetensors under the folder ``path``, from
    rank 0, as Hugging Face's ``save_pretrained`` lays it out: ``model.safetensors``,
    or shards of at most ``max_shard_size_mb`` and ``model.safetensors.index.json``.
    ``from_pretrained(path)`` reads it (rank 0 also writes ``model.config`` when the
    model has one with ``save_pretrained``, as Hugging Face models do).

    Parameters hold their current values (the fp32 masters of updated parameters;
    real floating-point ones cast to ``dtype`` when given, as buffers are: a complex
    or integer parameter keeps its dtype); a tied parameter is written once, under its first
    name, as Hugging Face does. Collective: call it on every rank; the full model is
    never built anywhere (Note [streaming export] in _full_state.py).
    """
    check_arguments(path, model, opt)
    view = opt.sharding
    if dtype is not None and not (dtype in _DTYPES and dtype.is_floating_point):
        floating = sorted(str(d) for d in _DTYPES if d.is_floating_point)
        raise ValueError(f"dtype must be one of {floating}, got {dtype}")
    if not max_shard_size_mb > 0:
        raise ValueError(f"max_shard_size_mb must be positive, got {max_shard_size_mb}")
    folder = Path(path)
    names = {id(p): name for name, p in model.named_parameters()}
    entries = [(names[id(p)], dtype if dtype is not None and p.is_floating_point()
                else streamed_dtype, tuple(p.shape)) for p, streamed_dtype in _stream_order(opt)]
    persistent = persistent_buffer_names(model)
    buffers = [(name, b) for name, b in model.named_buffers() if name in persistent]
    entries += [(name, dtype if dtype is not None and b.is_floating_point() else b.dtype,
                 tuple(b.shape)) for name, b in buffers]
    unwritable = [(name, d) for name, d, _ in entries if d not in _DTYPES]
    if unwritable:  # every rank knows every entry: each raises here, before any collective
        raise ValueError(
            f"save_full_model cannot write {unwritable[0][0]!r}: safetensors has no "
            f"{unwritable[0][1]} (it holds {sorted(_DTYPES.values())}); save it with "
            "save_checkpoint, or convert it in the model before saving")
    writer, error = None, None
    if view.rank == 0:
        try:
            writer = _ShardedWriter(folder, entries, int(max_shard_size_mb * 2**20))
        except Exception as exc:  # take part in the gathers all the same; raised below
            error = exc
    for param, value, _ in stream_parameters(opt, with_states=False):
        if writer is not None and error is None:
            try:
                writer.write(names[id(param)], value)
            except Exception as exc:
                error = exc
    if writer is not None and error is None:
        try:
            for name, buffer in buffers:
                writer.write(name, buffer.detach().cpu())
            writer.finish()
            config = getattr(model, "config", None)
            if hasattr(config, "save_pretrained"):
                config.save_pretrained(folder)
        except Exception as exc:
            error = exc

    def report():
        if error is not None:
            raise error
    _comm.run_and_share(report, group=view.ranks, stats=opt.comm_stats, label="export",
                        device=view.device)


def _stream_order(opt) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
    """The parameters in the order ``stream_parameters`` yields them, each with the dtype
    it gives them (an updated parameter's master's: fp32); nothing is gathered."""
    order = []
    for bucket in opt.sharding.every_bucket:
        source = bucket.master if bucket.master is not None else bucket.shard
        order += [(p, source.dtype) for p in bucket.params]
    bucketed = {id(p) for p, _ in order}
    return order + [(p, p.dtype) for p in opt.model.parameters() if id(p) not in bucketed]


class _ShardedWriter:
    """Writes tensors, given in a fixed order, into files of at most ``limit`` bytes."""

    def __init__(self, folder: Path, entries: list[tuple[str, torch.dtype, tuple]], limit: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files: list[list[tuple[str, torch.dtype, tuple]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = _nbytes(entry)
            if self.files[-1] and size + nbytes > limit:
                self.files.append([])
                size = 0
            self.files[-1].append(entry)
            size += nbytes
        count = len(self.files)
        self.names = [SINGLE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.file_of = {name: i for i, file in enumerate(self.files) for name, _, _ in file}
        self.entry_of = {entry[0]: entry for entry in entries}
        self.total = sum(_nbytes(e) for e in entries)
        self.handles: dict[int, object] = {}
        self.written: dict[int, int] = {}

    def _open(self, index: int):
        if index not in self.handles:
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape in self.files[index]:
                size = _nbytes((name, dtype, shape))
                header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + size]}
                offset += size
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            handle = open(self.folder / (self.names[index] + ".partial"), "wb")
            handle.write(struct.pack("<Q", len(text)) + text)
            self.handles[index] = handle
            self.written[index] = 0
        return self.handles[index]

    def write(self, name: str, value: torch.Tensor) -> None:
        """``name``'s value; tensors must come in the order the entries were given."""
        index = self.file_of[name]
        _, dtype, _ = self.entry_of[name]
        handle = self._open(index)
        expected = self.files[index][self.written[index]][0]
        if name != expected:  # the header's byte offsets assume this order
            raise RuntimeError(f"save_full_model wrote {name!r} where the header has {expected!r}")
        data = value.detach().to("cpu", dtype).contiguous()
        handle.write(ctypes.string_at(data.data_ptr(), data.numel() * data.element_size()))
        self.written[index] += 1
        if self.written[index] == len(self.files[index]):
            handle.close()

    def finish(self) -> None:
        """Every tensor is written: give the files their names, then write the index. The
        files of an earlier export into the folder go first, so that none of them (an old
        index) is read in place of the new ones, as save_pretrained does."""
        for index, name in enumerate(self.names):
            if not self.handles[index].closed:
                raise RuntimeError(f"{name}: {len(self.files[index]) - self.written[index]} "
                                   "tensors were never written")
        for old in [*self.folder.glob("model*.safetensors"), self.folder / INDEX]:
            if old.name not in self.names and old.is_file():
                old.unlink()
        for name in self.names:
            os.replace(self.folder / (name + ".partial"), self.folder / name)
        if len(self.names) > 1:
            weight_map = {entry: self.names[i] for entry, i in self.file_of.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))


def _nbytes(entry) -> int:
    _, dtype, shape = entry
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class SafetensorsFiles(Mapping):
    """A safetensors file, or a folder of them, as a read-only mapping name -> tensor whose
    ranges can be read alone: ``read_range`` reads just the bytes of a range from the
    file (no memory map, whose touched pages would count against the rank)."""

    def __init__(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            # save_pretrained unsharded over a sharded save removes the shards and leaves
            # the index: read the single file, as from_pretrained does (the index went
            # first, and its missing shards failed with a raw FileNotFoundError: a
            # helper's probe). Sharded over unsharded leaves the old single file beside a
            # whole index, which from_pretrained reads silently: refused (a reviewer's)
            indexed = _indexed_files(path)
            if (path / SINGLE).is_file():
                if indexed not in ([], [SINGLE]) and all((path / f).is_file() for f in indexed):
                    raise ValueError(
                        f"folder {str(path)!r} holds two exports: {SINGLE} and {INDEX} with "
                        "every file it lists (save_pretrained sharded over an unsharded save "
                        f"leaves the old {SINGLE}, and from_pretrained then reads it); remove "
                        "the stale one, or pass the file to load")
                files = [SINGLE]
            elif indexed:
                files = indexed
                missing = [f for f in files if not (path / f).is_file()]
                if missing:
                    raise ValueError(f"{str(path / INDEX)!r} lists files the folder lacks: "
                                     f"{missing[:3]}; copy the whole folder save_full_model or "
                                     "save_pretrained wrote")
            else:
                raise ValueError(f"folder {str(path)!r} holds neither {SINGLE} nor {INDEX}; pass "
                                 "the folder save_full_model or save_pretrained wrote, or a file")
            paths = [path / f for f in files]
        elif path.is_file():
            paths = [path]
        else:
            raise ValueError(f"{str(path)!r} is neither a safetensors file nor a folder")
        self._entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for file in paths:
            self._entries.update(_read_header(file))

    def __contains__(self, key) -> bool:  # Mapping's would read the tensor
        return key in self._entries

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.read_range(key, 0, torch.Size(shape).numel()).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][3]

    def read_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, read from the file alone."""
        file, offset, dtype, _ = self._entries[key]
        size = torch.empty((), dtype=dtype).element_size()
        with open(file, "rb") as handle:
            data = os.pread(handle.fileno(), (stop - start) * size, offset + start * size)
        if len(data) != (stop - start) * size:
            raise ValueError(f"{file} ends inside tensor {key!r}: the file is truncated")
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype)


def _indexed_files(folder: Path) -> list[str]:
    """The files ``folder``'s index lists (none without an index)."""
    if not (folder / INDEX).is_file():
        return []
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))


def _read_header(file: Path) -> dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]]:
    """name -> (file, byte offset of its data, dtype, shape), from a safetensors header."""
    dtypes = {name: dtype for dtype, name in _DTYPES.items()}
    size = file.stat().st_size
    with open(file, "rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        except (struct.error, ValueError) as error:
            raise ValueError(f"{file} is not a safetensors file: {error}") from error
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in dtypes:
            raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which "
                             f"zeroshard does not read (it reads {sorted(dtypes)})")
        dtype, shape = dtypes[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        # Checked here, on every rank that opens the file, before anything is read: a
        # short read later would fail on the ranks that own the missing bytes only.
        if end - begin != _nbytes((name, dtype, shape)) or 8 + length + end > size:
            raise ValueError(f"{file}: tensor {name!r} does not fit in the file (bytes "
                             f"{begin}-{end} of a {size - 8 - length}-byte data section, shape "
                             f"{list(shape)} of {entry['dtype']}): the file is truncated or damaged")
        entries[name] = (file, 8 + length + begin, dtype, shape)
    return entries
