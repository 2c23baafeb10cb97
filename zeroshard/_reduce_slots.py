"""Memory that stage 1's reductions reuse from bucket to bucket, on CPU.

Note [reduce slots]:
    On more than two ranks stage 1 reduces a copy of each bucket's persistent gradient
    buffer, since gloo's reduces change their input (Note [collectives on gloo] in
    _comm.py) and ``p.grad`` keeps the local gradient (two ranks exchange halves, which
    only reads it: Note [two ranks exchange halves]; there no slot is made). On CPU a
    fresh buffer of a bucket's size costs a page fault for each 4 KiB page the first
    time it is written, and glibc maps large allocations afresh and unmaps them when
    freed (every allocation over 1 MiB under the benchmarks' and tests'
    MALLOC_MMAP_THRESHOLD_): copying 372 MiB into a new tensor took 0.28 s on these
    machines, into an existing one 0.06 s, and a profile of stage 1 on the 100M GPT (2
    ranks) spent 0.33 s a step in those copies. So each copy goes on a slot: one of two
    buffers (the reductions in flight, Note [reductions in flight] in _reducer.py), made
    at the first bucket that needs one in a backward, handed to the next bucket once its
    reduction is done (the launch that waited for it takes it at once), and freed when
    no bucket later in the launch list will take one, and at the end of backward:
    between backwards, and in the step, nothing more is held than before (the profile:
    0.10 s a step in the copies; the 100M GPT's peak 1598 vs 1595 MiB). A slot is as
    large as the largest typical bucket (the largest within 1.5 times the median size);
    the outliers (a token embedding's bucket, twice the others) take a buffer of their
    own, as before, and so does a bucket cast to another dtype for its reduction (the
    cast is the copy). The reducer makes the copy where it makes any other
    (``_reduce_scatter``), and holds slots only for stage 1, the store that keeps the
    buffers it reduces. Stages 2 and 3 take none: given slots for their reduce buffers,
    their peaks rose (1208 -> 1215 and 1080 -> 1107 MiB on the 100M GPT at 2 ranks, one
    run each; why was not found), while their step times moved less than between runs.
    CUDA's caching allocator already reuses memory: there, buckets take buffers of their
    own.
"""

from __future__ import annotations

import statistics

import torch

from . import _comm
from ._bucket import FlatBucket


class ReduceSlots:
    """At most ``count`` reusable CPU buffers of ``nbytes`` each (Note [reduce slots])."""

    def __init__(self, buckets: list[FlatBucket], reduce_dtype, count: int) -> None:
        self.count = count
        self._reduce_dtype = reduce_dtype  # bucket -> the dtype its reduction runs in
        sizes = [self._nbytes_of(bucket) for bucket in buckets if self._may_take(bucket)]
        typical = 1.5 * statistics.median(sizes) if sizes else 0
        self.nbytes = max((size for size in sizes if size <= typical), default=0)
        self._free: list[torch.Tensor] = []
        self._taken: dict[int, torch.Tensor] = {}  # data pointer -> slot
        self.wanted = True  # some bucket may still take a slot in this backward

    def _nbytes_of(self, bucket: FlatBucket) -> int:
        return bucket.flat.numel() * self._reduce_dtype(bucket).itemsize

    def _may_take(self, bucket: FlatBucket) -> bool:
        # on CPU, and not cast to another dtype to be reduced (the cast is a copy anyway)
        return bucket.flat.device.type == "cpu" and bucket.flat.dtype == self._reduce_dtype(bucket)

    def takes(self, bucket: FlatBucket) -> bool:
        """Whether ``bucket``'s reduction takes a slot."""
        return self._may_take(bucket) and 0 < self._nbytes_of(bucket) <= self.nbytes

    def take(self, bucket: FlatBucket) -> torch.Tensor | None:
        """A 1-D tensor of the bucket's size in its reduce dtype on a slot (contents
        undefined), or None if it takes none or every slot is taken."""
        if not self.takes(bucket):
            return None
        if self._free:
            slot = self._free.pop()
        elif len(self._taken) < self.count:
            slot = torch.empty(self.nbytes, dtype=torch.uint8)
        else:
            return None
        self._taken[slot.data_ptr()] = slot
        dtype = self._reduce_dtype(bucket)
        return slot[:bucket.flat.numel() * dtype.itemsize].view(dtype)

    def give_back(self, tensor: torch.Tensor) -> bool:
        """``tensor``'s reduction is done: its slot is free again. False if it is not on a
        slot (the caller frees it)."""
        slot = self._taken.pop(tensor.untyped_storage().data_ptr(), None)
        if slot is None:
            return False
        self._free.append(slot)
        if not self.wanted:
            self._free_unused()
        return True

    def none_wanted(self) -> None:
        """No bucket will take a slot before the end of this backward: free those no
        bucket holds now, and the others as they are given back."""
        self.wanted = False
        self._free_unused()

    def _free_unused(self) -> None:
        # finished works may still refer to them (Note [finished work] in _comm.py)
        _comm.release(self._free)
        self._free.clear()

    def reset(self) -> None:
        """The end of backward: free every slot. One still taken (after an error) may be
        in a reduction that has not finished: it is only let go of."""
        self._free_unused()
        self._taken.clear()
        self.wanted = True
