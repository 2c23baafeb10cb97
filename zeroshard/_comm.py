"""The only module that calls torch.distributed collectives.

Every function here is stateless: it takes the tensors, the process group, the
``CommStats`` to count into and a label, runs one collective, and returns the
async work handle (or None when blocking). Each call is counted and wrapped in a
``torch.profiler.record_function`` named ``zeroshard::<label>::<collective>`` so a
profiler trace shows which stage issued it.

Bytes are the logical size of the full tensor the collective works on
(all-gather: its output; reduce-scatter: its input; all-reduce and broadcast: the
tensor), which is how DESIGN.md's per-step table counts Ψ.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.profiler import record_function

OPS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

# torch 2.13 renamed the flat-tensor collectives; the old names still work but warn.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommStats:
    """Bytes and calls per collective since the last ``reset()``.

    ``bytes`` and ``calls`` are dicts keyed by ``"all_gather"``, ``"reduce_scatter"``,
    ``"all_reduce"`` and ``"broadcast"``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[str, int] = dict.fromkeys(OPS, 0)
        self.calls: dict[str, int] = dict.fromkeys(OPS, 0)

    def record(self, op: str, tensor: torch.Tensor) -> None:
        self.bytes[op] += tensor.numel() * tensor.element_size()
        self.calls[op] += 1

    def __repr__(self) -> str:
        return f"CommStats(bytes={self.bytes}, calls={self.calls})"


def all_gather(output, input, *, group, stats: CommStats, label: str, async_op=False):
    """Gather every rank's ``input`` (1-D, equal sizes) into ``output`` (1-D, N times as long).

    ``input`` may be this rank's slice of ``output`` (an in-place gather).
    """
    stats.record("all_gather", output)
    with record_function(f"zeroshard::{label}::all_gather"):
        return _all_gather_flat(output, input, group=group, async_op=async_op)


def reduce_scatter(output, input, *, group, stats: CommStats, label: str,
                   op=dist.ReduceOp.AVG, async_op=False):
    """Reduce ``input`` (1-D, N shards) over ranks; this rank's shard lands in ``output``."""
    stats.record("reduce_scatter", input)
    with record_function(f"zeroshard::{label}::reduce_scatter"):
        return _reduce_scatter_flat(output, input, op=op, group=group, async_op=async_op)


def all_reduce(tensor, *, group, stats: CommStats, label: str, op=dist.ReduceOp.SUM,
               async_op=False):
    stats.record("all_reduce", tensor)
    with record_function(f"zeroshard::{label}::all_reduce"):
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor, *, group, stats: CommStats, label: str, group_src: int = 0,
              async_op=False):
    """Overwrite ``tensor`` on every rank with the value of rank ``group_src`` of ``group``."""
    stats.record("broadcast", tensor)
    src = dist.get_global_rank(group, group_src)
    with record_function(f"zeroshard::{label}::broadcast"):
        return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


_companions: dict[tuple[int, ...], object] = {}


def companion_group(group):
    """A second process group over the ranks of ``group``, so that two streams of
    collectives (stage 3's gathers and its reduce-scatters) each keep their own order.

    Created once per set of ranks, by the ranks of ``group`` only, and shared by every
    optimizer over those ranks: torch names such a group after its ranks, so a second
    one over the same ranks would collide with the first in the store.
    """
    ranks = tuple(dist.get_process_group_ranks(group))
    if len(ranks) == 1:
        return group
    if ranks not in _companions:
        _companions[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _companions[ranks]


def wait_all(works) -> None:
    for work in works:
        if work is not None:
            work.wait()
