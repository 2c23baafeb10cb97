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
    buckets number about 1,100. Now (0.24 / 0.43 / 1.12 s, 0.19x to 0.29x FSDP2's in
    the same run) each file is opened and unpickled once, when the
    load checks everything before it changes anything (so no file is opened once the
    load has begun to change the model), and of its pieces the load keeps those that
    overlap the ranges this rank loads (``ranges_to_load``): all of every file's (P +
    R * B, about 3.8 KB of host memory each: helper-130) would be gigabytes for a
    checkpoint of a thousand ranks. The mapping lives to the load's end, so the pages
    read would add up to this rank's whole share of the checkpoint (108 MiB where the
    phase test's bound is 20); before each bucket ``drop`` hands back to the kernel
    the pages of the pieces the previous one read (``madvise(MADV_DONTNEED)``, piece
    by piece: over a whole file's span each call walked its page tables, helper-130),
    and the load's peak stays at a bucket's (16-18 MiB, as before). That is only
    right for pages no one wrote to: a later read faults them in from the file again.
    ``torch.load`` writes them where the file's byte order is not this machine's (it
    swaps every storage in place); handing such pages back brought the unswapped bytes
    back, silently (helper-130: values of 1e36 and NaN), so those files keep their
    pages until the load ends (``read_in_place``). Where the C library's ``madvise``
    cannot be found (Windows) nothing is handed back either: the resident pages rise
    to the share, and the values are the same.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import zipfile

import torch

_PAGE = mmap.PAGESIZE


def _find_madvise():
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return None
    try:  # (on Windows CDLL(None) raises TypeError)
        function = ctypes.CDLL(None).madvise
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return lambda start, length: function(start, length, advice)


_madvise = _find_madvise()


def read_in_place(file) -> bool:
    """Whether ``torch.load(file, mmap=True)`` leaves its tensors' pages as the file
    holds them: saved in this machine's byte order. Otherwise the load swapped every
    storage's bytes in place, writing the pages (a checkpoint from a big-endian host),
    and handing them back would undo the swap, silently (helper-130)."""
    try:
        with zipfile.ZipFile(file) as archive:
            record = next((name for name in archive.namelist()
                           if name.endswith("/byteorder")), None)
            return record is not None and archive.read(record).decode() == sys.byteorder
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return False


def drop(tensor: torch.Tensor) -> None:
    """Hand the pages holding ``tensor``'s data back to the kernel; best effort. Only
    for a tensor of a file mapping no one writes to (``read_in_place``): a page written
    to would lose what was written. Its neighbours on the same pages are read again
    from the file if asked for. A saved piece is often a view of its bucket's shard, one
    storage in the file: a contiguous one hands back its own pages only."""
    if _madvise is None or tensor.numel() == 0:
        return
    if tensor.is_contiguous():
        start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    else:
        start, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
    first = start // _PAGE * _PAGE
    _madvise(first, -(-(start + size) // _PAGE) * _PAGE - first)
