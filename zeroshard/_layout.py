"""Pure partition math: where each parameter lives in a flat buffer and which rank owns what.

No torch.distributed and no tensors here, only integers, so every property of the
partitioning can be tested alone (tests/test_layout.py).

A bucket's parameters are laid one after another in one flat buffer, each starting
at a multiple of ``align`` elements (Note [aligned parameters]), and the buffer is
padded with zeros to a multiple of the world size N. Rank r owns the elements
``[r * S, (r + 1) * S)`` where ``S = padded_numel // N``: every shard has the same
size, which is what reduce-scatter and all-gather into flat tensors require.

Note [aligned parameters]:
    Some kernels round differently by where a tensor starts in memory: on this
    project's CPU, ``F.linear`` with one output and 17 inputs gives another last bit
    for a weight that does not start at a multiple of 16 bytes (plain torch, no
    zeroshard; found by a helper's probe). Torch's allocator starts every tensor at a
    multiple of 64 bytes, so DDP's parameters always do; laid end to end in a flat
    buffer, a parameter after one of odd size did not, and zeroshard's outputs were
    6e-8 from DDP's (``nn.Sequential(Linear(13, 17), LeakyReLU, Linear(17, 1))``, 2
    ranks, SGD; Adam over a bias before a BatchNorm, whose true gradient is zero,
    grew that to 5e-3 in three steps). So every parameter starts at a multiple of
    ``ALIGN`` elements: 64 bytes for the narrowest dtype a bucket may be cast to
    (2 bytes), 128 for fp32. The gaps hold zeros, like the padding at the end, and
    cost at most ``ALIGN - 1`` elements per parameter.

Note [whole-parameter ownership]: an optimizer that is not element-wise (Muon
orthogonalises each matrix, Adafactor factors its second moment over rows and
columns) must see each parameter whole. A bucket of such parameters gives each
parameter one owner rank (``owners``): the buffer is N equal segments, one per
rank, each holding its owner's parameters one after another (each start aligned)
and padded to the largest owner's load. The same reduce-scatter then leaves each
owner the fully reduced gradient of exactly its parameters, and the same all-gather
sends the result to every rank; the padding is what the imbalance costs in memory
and bytes.
``assign_owners`` balances the owners' loads (longest processing time first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple


class Overlap(NamedTuple):
    """The part of one parameter that falls into one rank's shard.

    ``param_start:param_stop`` indexes the flattened parameter (flattened in its
    memory order: Note [memory order] in _bucket.py);
    ``shard_start`` is where that run begins inside the shard.
    """

    param_start: int
    param_stop: int
    shard_start: int

    @property
    def shard_span(self) -> slice:
        """The run's elements inside the shard."""
        return slice(self.shard_start, self.shard_start + self.param_stop - self.param_start)


ALIGN = 32  # elements: Note [aligned parameters]


def aligned(position: int, align: int) -> int:
    """``position`` rounded up to a multiple of ``align``."""
    return -(-position // align) * align


@dataclass(frozen=True)
class FlatLayout:
    """The positions of ``numels`` (one entry per parameter) in a flat buffer split N ways."""

    numels: tuple[int, ...]
    world_size: int
    owners: tuple[int, ...] | None = None  # Note [whole-parameter ownership]; None: flat
    align: int = ALIGN  # each parameter starts at a multiple of it (Note [aligned parameters])

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")
        if any(n < 0 for n in self.numels):
            raise ValueError(f"parameter sizes must be >= 0, got {self.numels}")
        if self.owners is not None and (
                len(self.owners) != len(self.numels)
                or any(not 0 <= r < self.world_size for r in self.owners)):
            raise ValueError(f"owners {self.owners} must name a rank in [0, {self.world_size}) "
                             f"for each of the {len(self.numels)} parameters")

    @cached_property
    def loads(self) -> tuple[int, ...]:
        """Elements each rank's segment needs for the parameters it owns whole, aligned
        (Note [whole-parameter ownership]); all zero in a flat layout, where nobody owns
        a parameter whole."""
        loads = [0] * self.world_size
        for numel, owner in zip(self.numels, self.owners or ()):
            loads[owner] = aligned(loads[owner], self.align) + numel
        return tuple(loads)

    @cached_property
    def _segment(self) -> int:
        """With owners: each rank's segment, a multiple of ``align`` so that every
        segment starts aligned."""
        return aligned(max(self.loads), self.align)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat buffer, each aligned: one after another,
        or with owners, one after another inside each owner's segment."""
        starts, position = [], 0
        if self.owners is None:
            for numel in self.numels:
                starts.append(aligned(position, self.align))
                position = starts[-1] + numel
            return tuple(starts)
        position = [rank * self._segment for rank in range(self.world_size)]
        for numel, owner in zip(self.numels, self.owners):
            starts.append(aligned(position[owner], self.align))
            position[owner] = starts[-1] + numel
        return tuple(starts)

    @cached_property
    def numel(self) -> int:
        """Elements that belong to parameters (no padding, no gaps)."""
        return sum(self.numels)

    @property
    def padded_numel(self) -> int:
        """Size of the flat buffer: the end of the last parameter rounded up to a
        multiple of the world size, or with owners, a segment times the world size."""
        if self.owners is not None:
            return self._segment * self.world_size
        end = self.offsets[-1] + self.numels[-1] if self.numels else 0
        return math.ceil(end / self.world_size) * self.world_size

    @property
    def padding(self) -> int:
        """Elements of the buffer that belong to no parameter: the gaps that align
        them, and the padding at the end."""
        return self.padded_numel - self.numel

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def owned(self, rank: int) -> list[int]:
        """The parameters ``rank`` owns whole (none in a flat layout)."""
        return [index for index, owner in enumerate(self.owners or ()) if owner == rank]

    def param_range(self, index: int) -> range:
        """Elements of the flat buffer that hold parameter ``index``."""
        start = self.offsets[index]
        return range(start, start + self.numels[index])

    def shard_range(self, rank: int) -> range:
        """Elements of the flat buffer that rank ``rank`` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        return range(rank * self.shard_numel, (rank + 1) * self.shard_numel)

    def overlap(self, index: int, rank: int) -> Overlap | None:
        """The run of parameter ``index`` that rank ``rank`` owns, or None if it owns none."""
        param, shard = self.param_range(index), self.shard_range(rank)
        start, stop = max(param.start, shard.start), min(param.stop, shard.stop)
        if start >= stop:
            return None
        return Overlap(start - param.start, stop - param.start, start - shard.start)


def assign_owners(numels: tuple[int, ...], costs: tuple[float, ...],
                  carried: tuple[float, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """An owner rank for each of one bucket's parameters, and the ranks' work after it.

    Longest processing time first: the largest parameter goes to the rank holding the
    fewest elements of this bucket so far (what sets its segment, hence its padding),
    ties to the rank with the least work (``carried``, each rank's cost from earlier
    buckets: Newton-Schulz time, say), then the lower rank. So a bucket's segments
    are as even as whole parameters allow, and the largest parameter of each bucket
    goes to a different rank in turn. Deterministic: every rank computes the same
    owners alone.
    """
    world_size = len(carried)
    held, work = [0] * world_size, list(carried)
    owners = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], -costs[i], i)):
        rank = min(range(world_size), key=lambda r: (held[r], work[r], r))
        owners[index] = rank
        held[rank] += numels[index]
        work[rank] += costs[index]
    return tuple(owners), tuple(work)
