"""The only module that calls torch.distributed collectives.

Every collective function here takes the tensors, the process group, the
``CommStats`` to count into and a label, runs one collective, and returns the async
work handle (or None when blocking). Every stage issues all its collectives on the
one process group it was given, in one order on every rank (Note [one order] in
stage3.py), as NCCL requires of the operations of one communicator. Every wait goes
through ``wait``/``wait_all``, which keep finished works referenced for a while (Note
[finished work]). Each call is counted and wrapped in a
``torch.profiler.record_function`` named ``zeroshard::<label>::<collective>`` so a
profiler trace shows which stage issued it.

Bytes are the logical size of the full tensor the collective works on
(all-gather: its output; reduce-scatter: its input; all-reduce and broadcast: the
tensor), which is how DESIGN.md's per-step table counts Ψ.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import pickle
import time

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
    ``"all_reduce"`` and ``"broadcast"``. Set ``trace`` to a list to have each call
    appended to it in the order issued, as ``(process group name, collective, bytes)``:
    the sequence every rank must issue alike (``reset()`` leaves it alone).
    """

    def __init__(self) -> None:
        self.trace: list[tuple[str, str, int]] | None = None
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[str, int] = dict.fromkeys(OPS, 0)
        self.calls: dict[str, int] = dict.fromkeys(OPS, 0)

    def record(self, op: str, tensor: torch.Tensor, group) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes[op] += nbytes
        self.calls[op] += 1
        if self.trace is not None:
            group = group if group is not None else dist.group.WORLD
            self.trace.append((getattr(group, "group_name", repr(group)), op, nbytes))

    def __repr__(self) -> str:
        return f"CommStats(bytes={self.bytes}, calls={self.calls})"


def all_gather(output, input, *, group, stats: CommStats, label: str, async_op=False):
    """Gather every rank's ``input`` (1-D, equal sizes) into ``output`` (1-D, N times as long).

    ``input`` may be this rank's slice of ``output`` (an in-place gather).
    """
    stats.record("all_gather", output, group)
    with record_function(f"zeroshard::{label}::all_gather"):
        work = _all_gather_flat(output, input, group=group, async_op=True)
    return _finish(work, async_op)


def reduce_scatter(output, input, *, group, stats: CommStats, label: str,
                   op=dist.ReduceOp.AVG, async_op=False):
    """Reduce ``input`` (1-D, N shards) over ranks; this rank's shard lands in ``output``."""
    stats.record("reduce_scatter", input, group)
    with record_function(f"zeroshard::{label}::reduce_scatter"):
        work = _reduce_scatter_flat(output, input, op=op, group=group, async_op=True)
    return _finish(work, async_op)


def all_reduce(tensor, *, group, stats: CommStats, label: str, op=dist.ReduceOp.SUM,
               async_op=False):
    stats.record("all_reduce", tensor, group)
    with record_function(f"zeroshard::{label}::all_reduce"):
        work = dist.all_reduce(tensor, op=op, group=group, async_op=True)
    return _finish(work, async_op)


def broadcast(tensor, *, group, stats: CommStats, label: str, group_src: int = 0,
              async_op=False):
    """Overwrite ``tensor`` on every rank with the value of rank ``group_src`` of ``group``."""
    stats.record("broadcast", tensor, group)
    src = dist.get_global_rank(group, group_src)
    with record_function(f"zeroshard::{label}::broadcast"):
        work = dist.broadcast(tensor, src=src, group=group, async_op=True)
    return _finish(work, async_op)


def extremes(values: torch.Tensor, *, group, stats: CommStats, label: str):
    """The largest and the smallest of each element of ``values`` over the ranks, from one
    all-reduce (MAX) of the values and their negation: the ranks hold the same values
    exactly where the two are equal."""
    both = torch.cat([values, -values])
    all_reduce(both, group=group, stats=stats, label=label, op=dist.ReduceOp.MAX)
    highest, negated_lowest = both.chunk(2)
    return highest, -negated_lowest


def broadcast_object(obj, *, group, stats: CommStats, label: str, device: torch.device):
    """Rank 0's picklable ``obj`` on every rank (a length, then the pickled bytes)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) \
        if dist.get_rank(group) == 0 else torch.empty(0, dtype=torch.uint8)
    length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    broadcast(length, group=group, stats=stats, label=label)
    received = payload.to(device) if payload.numel() else torch.empty(
        int(length.item()), dtype=torch.uint8, device=device)
    broadcast(received, group=group, stats=stats, label=label)
    received = received.cpu()
    return pickle.loads(ctypes.string_at(received.data_ptr(), received.numel()))


def run_and_share(work, *, group, stats: CommStats, label: str, device: torch.device) -> None:
    """Run ``work`` here (None: nothing to do on this rank), then learn whether it failed
    on any rank: every rank raises if one did, so no rank goes on to a collective the
    others never reach. Costs one 4-byte all-reduce."""
    error = None
    try:
        if work is not None:
            work()
    except Exception as exc:  # shared with the other ranks, then raised again below
        error = exc
    failed = torch.tensor(0.0 if error is None else 1.0, device=device)
    all_reduce(failed, group=group, stats=stats, label=label, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("another rank failed (its own error says why); nothing was changed "
                           "here")


def _finish(work, async_op: bool):
    """Hand back an async call's work; wait here for a blocking one (Note [finished work])."""
    if async_op:
        return work
    wait(work)
    return None


# Note [finished work]:
#     A gloo work handle holds the tensors of its collective, and so does the worker
#     thread that ran it, until just after the work completes. Whichever of the two
#     drops the handle last destroys it, and destroying a tensor that has a Python
#     object (every tensor passed from Python) takes the GIL. If that is the worker
#     thread while the interpreter is finalizing (a script whose last collective
#     was a few milliseconds before exit), taking the GIL ends the thread inside a
#     noexcept destructor and the process aborts ("terminate called without an
#     active exception"), after training finished correctly. So finished works stay
#     referenced here: the latest wait's until the next wait, older ones until
#     they have been finished for RETAIN_S. A worker thread lets go of a work
#     microseconds after completing it, so the last reference is dropped by a
#     Python thread holding the GIL (at the latest during interpreter teardown)
#     even when a worker is descheduled for a while on a busy machine. What the
#     works hold lives that much longer, so the stages free the memory of
#     collective inputs and temporaries they are done with themselves
#     (``release``), and ``close()`` lets go of them all (``release_finished``).
#     After ``del opt`` without ``close()`` they are held until the next zeroshard wait.
#     But a work also holds what the backend allocated for it, which ``release``
#     cannot reach (gloo's reduce-scatter keeps a copy of its whole input): held for
#     RETAIN_S, a backward shorter than that kept every bucket's copy, the full
#     gradient size, alive. So only the works of the latest RETAIN_WAITS waits are
#     held for RETAIN_S; older ones are let go at a later wait once they have been
#     finished for RETAIN_MIN_S. Dropping a work while the process goes on running
#     is safe even if a worker still holds it (the worker then takes the GIL as
#     usual); only a drop during teardown aborts, and the works a script's last
#     collectives used are among the latest.
#     A script's own last collectives (a loss all-reduced for a log line) are not
#     ours to hold; so once zeroshard has waited on a collective, an exit handler
#     (``atexit``, which runs before teardown) pauses for RETAIN_S: worker threads
#     finish with their works while the interpreter can still take them back.
RETAIN_S = 0.25
RETAIN_WAITS = 2
RETAIN_MIN_S = 0.005
_exit_pause_registered = False


def _register_exit_pause() -> None:
    global _exit_pause_registered
    atexit.register(_pause_at_exit)
    _exit_pause_registered = True
_finished: collections.deque = collections.deque()  # (time waited, works), oldest first


def release(tensors) -> None:
    """Free the memory of tensors the caller is done with, now, although finished works
    may refer to them for a while longer (Note [finished work]). Only for tensors no
    one else uses: their storage is emptied."""
    for tensor in tensors:
        tensor.untyped_storage().resize_(0)


def release_finished() -> None:
    """Let go of every finished work (``close()``): wait until the latest has been
    finished for RETAIN_S, so no worker thread can still hold one (Note [finished work])."""
    if _finished:
        time.sleep(max(0.0, _finished[-1][0] + RETAIN_S - time.monotonic()))
        _finished.clear()


def wait(work) -> None:
    """Wait for one work handle (None: a blocking call that already finished)."""
    wait_all([work])


def _pause_at_exit() -> None:
    """Note [finished work]: at interpreter exit, before teardown, give gloo's worker
    threads time to let go of the works they ran (a script's own collectives too:
    a loss all-reduced for a log line just before exit), then let go of ours."""
    time.sleep(RETAIN_S)
    _finished.clear()


def wait_all(works) -> None:
    works = [work for work in works if work is not None]
    for work in works:
        work.wait()
    if works:  # Note [finished work]
        if not _exit_pause_registered:
            _register_exit_pause()
        now = time.monotonic()
        while _finished and (now - _finished[0][0] > RETAIN_S or (
                len(_finished) >= RETAIN_WAITS and now - _finished[0][0] > RETAIN_MIN_S)):
            _finished.popleft()
        _finished.append((now, works))
