"""Handing back the pages of a memory-mapped checkpoint file that a load has read.

Note [a checkpoint file read once]:
    ``load_checkpoint`` reads the pieces of every saving rank's file for each bucket it
    fills. It opened (``torch.load(mmap=True)``) and unpickled every rank file again
    for every bucket, so that the pages a bucket read left the memory with it: B
    buckets made B times R file openings, each unpickling every piece of its file
    (about P/R + B for P parameters), so a load's time grew with the square of the
    buckets: 1.9 / 5.4 / 26.4 s for 16 / 32 / 64 buckets, 2.7x to 5.9x FSDP2's load
    through torch.distributed.checkpoint on the same model (``python
    benchmarks/checkpoint_load.py``, results/checkpoint_load_ws2); a 7B model's 25 MB
    buckets number about 1,100. Now each file is opened and unpickled once, when the
    load checks everything before it changes anything (so no file is opened once the
    load has begun to change the model), and the pieces are found by name: 0.25 / 0.49
    / 0.93 s, 0.25x to 0.30x FSDP2's. The mapping lives to the load's end, so the
    pages read would add up to this rank's whole share of the checkpoint (108 MiB
    where the phase test's bound is 20); ``drop`` hands them back to the kernel
    before the next bucket (``madvise(MADV_DONTNEED)``: the file's pages are only
    read here, so a later read faults them in from the file again, unchanged), and
    the load's peak stays at a bucket's (16-18 MiB, as before). The unpickled pieces
    (P + R * B small tensor views) are held to the load's end.
    Where the C library's ``madvise`` cannot be found (not Linux or macOS) nothing is
    handed back until the load ends: the resident pages rise to the share, and the
    values are the same.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

_PAGE = mmap.PAGESIZE


def _find_madvise():
    advice = getattr(mmap, "MADV_DONTNEED", None)
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return None if advice is None else (lambda start, length: function(start, length, advice))


_madvise = _find_madvise()


def mapped_span(tensors) -> tuple[int, int] | None:
    """The page-aligned address range [start, stop) that holds the data of ``tensors``,
    all read from one memory-mapped file (they are views of its one mapping, whose
    pages start at the file's start); None where there is none."""
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
             for t in tensors if t.untyped_storage().nbytes() > 0]
    if not spans:
        return None
    start = min(address for address, _ in spans) // _PAGE * _PAGE
    stop = max(address + size for address, size in spans)
    return start, -(-stop // _PAGE) * _PAGE


def drop(span: tuple[int, int] | None) -> None:
    """Hand the pages of ``span`` (from ``mapped_span``) back to the kernel; best effort.
    Only for mappings no one writes to: a page written to would lose what was written."""
    if span is not None and _madvise is not None:
        _madvise(span[0], span[1] - span[0])


def tensors_in(obj):
    """Every tensor in a nest of dicts, lists and tuples (a torch.load result)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)
