"""Pure partition math: where each parameter lives in a flat buffer and which rank owns what.

No torch.distributed and no tensors here, only integers, so every property of the
partitioning can be tested alone (tests/test_layout.py).

A bucket's parameters are laid end to end in one flat buffer, which is padded with
zeros to a multiple of the world size N. Rank r owns the elements
``[r * S, (r + 1) * S)`` where ``S = padded_numel // N``: every shard has the same
size, which is what reduce-scatter and all-gather into flat tensors require.
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


@dataclass(frozen=True)
class FlatLayout:
    """The positions of ``numels`` (one entry per parameter) in a flat buffer split N ways."""

    numels: tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if any(n < 0 for n in self.numels):
            raise ValueError(f"parameter sizes must be >= 0, got {self.numels}")

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat buffer."""
        starts, position = [], 0
        for numel in self.numels:
            starts.append(position)
            position += numel
        return tuple(starts)

    @property
    def numel(self) -> int:
        """Elements that belong to parameters (no padding)."""
        return sum(self.numels)

    @property
    def padded_numel(self) -> int:
        """Size of the flat buffer: ``numel`` rounded up to a multiple of the world size."""
        return math.ceil(self.numel / self.world_size) * self.world_size

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

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
