"""The only module that calls torch.distributed collectives.

Every collective function here takes the tensors, the ranks (a ``_ranks.Ranks``:
the shard group, and on a mesh the replicate group too), the ``CommStats`` to count
into and a label, runs one collective along each dimension it needs (Note
[collectives on a mesh]), and returns the async work handle (or None when
blocking). Every stage issues its collectives in one order on every rank (Note [one
order] in stage3.py), as NCCL requires of the operations of one communicator. Every wait goes
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
import contextlib
import ctypes
import pickle
import threading
import time

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ._ranks import REPLICATE, SHARD, Ranks

OPS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

# torch 2.13 renamed the flat-tensor collectives; the old names still work but warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Note [collectives on gloo]:
#     Gloo's flat-tensor all-gather and reduce-scatter each allocate a temporary as large
#     as the whole flat tensor, and they are slower than collectives that need none: one
#     ``reduce`` of each shard to its rank and one ``broadcast`` of each shard from its
#     rank into its slice of the output. ``benchmarks/gloo_collectives.py`` (64 MiB fp32,
#     RSS high-water above the level before the call, median time), 2 ranks:
#     reduce_scatter_tensor 66 MiB, 107 ms; reduce per shard 4 MiB, 71 ms;
#     all_gather_into_tensor 64 MiB, 92 ms; broadcast per shard 0 MiB, 19 ms; 4 ranks:
#     240 -> 106 ms and 154 -> 52 ms. Worse, a finished work keeps its temporary alive
#     while it is retained (Note [finished work]), into the next step. So for CPU
#     tensors a reduce-scatter is N reduces (two ranks: one exchange, Note [two ranks
#     exchange halves]) and an all-gather N broadcasts, issued in shard order on every
#     rank, one work to wait for; the bytes counted are the same collective's. A
#     reduce leaves other ranks' slices of its input changed (gloo reduces in place
#     along the way), so an input the caller keeps is copied first (one bucket, freed
#     once done). The mean is the sum divided by N once the reduces are done. NCCL's
#     flat collectives need no such temporary: CUDA tensors keep them.


class _Shards:
    """One work for the per-shard collectives of a CPU all-gather or reduce-scatter
    (Note [collectives on gloo]); ``finish`` runs once they are all done."""

    def __init__(self, works: list, finish=None) -> None:
        self.works = works
        self._finish = finish

    def wait(self) -> bool:
        with _failures_explained():  # Note [a collective that fails]
            for work in self.works:
                work.wait()
        if self._finish is not None:
            self._finish()
            self._finish = None
        return True


# Note [a collective that fails]:
#     A collective that some rank never joins fails only after the process group's
#     timeout (30 minutes by default), or once a rank that left closes its connections,
#     in gloo's words ("Timed out waiting 1800000ms for recv operation to complete",
#     "Connection closed by peer"), which say nothing of the cause. With zeroshard the
#     cause is nearly always that the ranks did not make the same calls (a helper's
#     probes: `if rank == 0: opt.full_state_dict()`, a DDP habit; `opt.clip_grad_norm_()`
#     on one rank; one rank out of batches before the others; `opt.no_sync()` around a
#     micro-batch on some ranks), or that another rank failed first. So an error raised
#     while waiting for a collective gets a note saying so (``add_note``: the error keeps
#     its type and its whole message, so `except torch.OutOfMemoryError` and NCCL's
#     `DistBackendError` still match, and NCCL's cause on its later lines stays in view;
#     a reviewer found a first version, a new exception type with the first line only,
#     losing both). Only waits: an error raised as a collective is launched is the
#     backend refusing its arguments (a dtype gloo cannot carry), which every rank meets
#     alike. Under NCCL's defaults a wait does not raise: its watchdog ends the process
#     after the timeout. Python 3.10 has no notes: the error goes on as it was.
_WHY_A_COLLECTIVE_FAILS = (
    "zeroshard: this error came while waiting for a collective. Most often that means the "
    "ranks were not all in it: every rank must make the same zeroshard calls in the same "
    "order: each training forward, backward and opt.step(); opt.clip_grad_norm_(); "
    "opt.no_sync() around the same micro-batches; summon_full_params(); full_state_dict(), "
    "load_full_state_dict(), save_checkpoint() and load_checkpoint(), save_full_model() (all "
    "of them on every rank: `if rank == 0: opt.full_state_dict()` is a DDP habit that cannot "
    "work here; rank 0 alone writes the files). Give every rank the same number of batches "
    "(a DistributedSampler with drop_last=True) and let the ranks skip a step only together. "
    "Or another rank failed or died first: its own log says why")


@contextlib.contextmanager
def _failures_explained():
    try:
        yield
    except Exception as error:
        if hasattr(error, "add_note") and _WHY_A_COLLECTIVE_FAILS not in getattr(
                error, "__notes__", ()):
            error.add_note(_WHY_A_COLLECTIVE_FAILS)
        raise


# Note [complex tensors in collectives]:
#     NCCL has no complex type, and torch views a complex tensor as real for NCCL in
#     its all-reduce, broadcast and list all-gather but not in the flat all-gather and
#     reduce-scatter (torch 2.13's ``reduce_scatter_tensor`` of a complex CUDA tensor
#     raises "Input tensor data type is not supported for NCCL process group:
#     ComplexFloat": helper-111's reading of torch's source; no GPU has run it). A
#     complex tensor's real view holds its real and imaginary parts in turn: summed or
#     averaged element by element they are the complex sum or mean, and the rank's
#     shard of the view is the view of its complex shard (shards are whole elements).
#     So the flat collectives take real views, on every backend (on gloo too, where
#     complex works either way, so that the CPU tests run this path).
def _real(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor).view(-1) if tensor.is_complex() else tensor


def _all_gather_flat(output, input, *, group):
    """``all_gather_into_tensor``, async; on CPU one broadcast per shard (Note
    [collectives on gloo])."""
    output, input = _real(output), _real(input)  # Note [complex tensors in collectives]
    if output.device.type != "cpu":
        return _all_gather_single(output, input, group=group, async_op=True)
    slices = output.chunk(group.size())
    mine = slices[group.rank()]
    if mine.data_ptr() != input.data_ptr():
        mine.copy_(input)
    return _Shards([dist.broadcast(piece, group_src=source, group=group, async_op=True)
                    for source, piece in enumerate(slices)])


# Note [two ranks exchange halves]:
#     Between two ranks a reduce-scatter is one exchange: each rank sends the other the
#     half of its input the other owns, receives the other's half of its own shard
#     straight into the output, and adds its own half there once that has come (the
#     same sum, bitwise: a + b is b + a). Gloo's ``reduce`` takes more than twice as
#     long and changes its input (``benchmarks/gloo_collectives.py``, 64 MiB, 2 ranks:
#     a reduce per shard 59.9 ms, the exchange 24.5 ms); the exchange only reads its
#     input, so stage 1 reduces its gradient buffers without copying them first (Note
#     [reduce slots] in _reduce_slots.py), and it needs no memory beyond the output.
#     Sends and receives between two ranks are matched in the order they are posted,
#     which is the same on both (the reductions' launch order), under a tag of their own.
_EXCHANGE_TAG = 0x2E50


def changes_input(tensor: torch.Tensor, group: Ranks) -> bool:
    """Whether ``reduce_scatter`` over ``group`` changes what ``tensor`` (its input) holds,
    unless the caller copies it first (Notes [collectives on gloo], [two ranks exchange
    halves])."""
    return tensor.device.type == "cpu" and not _exchanges_halves(group.shard)


def _exchanges_halves(group) -> bool:
    return group.size() == 2


def _exchange_halves(output, input, *, op, group) -> _Shards:
    """Note [two ranks exchange halves]: ``reduce_scatter_tensor`` of two ranks, SUM or
    AVG, as a send and a receive; ``input`` is left as it was."""
    rank = group.rank()
    peer = 1 - rank
    halves = input.chunk(2)
    works = [dist.isend(halves[peer], group=group, group_dst=peer, tag=_EXCHANGE_TAG),
             dist.irecv(output, group=group, group_src=peer, tag=_EXCHANGE_TAG)]

    def finish() -> None:
        output.add_(halves[rank])
        if op == dist.ReduceOp.AVG:
            output.div_(2)
    return _Shards(works, finish)


def _reduce_scatter_flat(output, input, *, op, group, input_is_scratch=False):
    """``reduce_scatter_tensor``, async; on CPU one reduce per shard (Note [collectives on
    gloo]), or between two ranks an exchange (Note [two ranks exchange halves])."""
    output, input = _real(output), _real(input)  # Note [complex tensors in collectives]
    if output.device.type != "cpu":
        return _reduce_scatter_single(output, input, op=op, group=group, async_op=True)
    if _exchanges_halves(group) and op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        return _exchange_halves(output, input, op=op, group=group)
    scratch = input if input_is_scratch else input.clone()
    pieces = scratch.chunk(group.size())
    mean = op == dist.ReduceOp.AVG
    works = [dist.reduce(piece, group_dst=owner, group=group, async_op=True,
                         op=dist.ReduceOp.SUM if mean else op)
             for owner, piece in enumerate(pieces)]

    def finish() -> None:
        mine = pieces[group.rank()]
        if mean:
            torch.div(mine, group.size(), out=output)
        else:
            output.copy_(mine)
        if not input_is_scratch:
            release([scratch])
    return _Shards(works, finish)


class CommStats:
    """Bytes and calls per collective since the last ``reset()``.

    ``bytes`` and ``calls`` are dicts keyed by ``"all_gather"``, ``"reduce_scatter"``,
    ``"all_reduce"`` and ``"broadcast"``: the totals over every dimension. ``by_dim``
    splits the bytes by the dimension each call ran along, keyed ``(collective,
    "shard")`` and ``(collective, "replicate")`` (a plain process group is all
    "shard"). Set ``trace`` to a list to have each call appended to it in the order
    issued, as ``(dimension, collective, bytes)``: the sequence every rank must issue
    alike (``reset()`` leaves it alone).
    """

    def __init__(self) -> None:
        self.trace: list[tuple[str, str, int]] | None = None
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[str, int] = dict.fromkeys(OPS, 0)
        self.calls: dict[str, int] = dict.fromkeys(OPS, 0)
        self.by_dim: dict[tuple[str, str], int] = {
            (op, dim): 0 for op in OPS for dim in (SHARD, REPLICATE)}

    def record(self, op: str, tensor: torch.Tensor, dimension: str) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes[op] += nbytes
        self.calls[op] += 1
        self.by_dim[(op, dimension)] += nbytes
        if self.trace is not None:
            self.trace.append((dimension, op, nbytes))

    def __repr__(self) -> str:
        return f"CommStats(bytes={self.bytes}, calls={self.calls})"


def all_gather(output, input, *, group: Ranks, stats: CommStats, label: str, async_op=False):
    """Gather the shard group's ``input``s (1-D, equal sizes) into ``output`` (1-D, S times
    as long); on a mesh each replica gathers within itself.

    ``input`` may be this rank's slice of ``output`` (an in-place gather).
    """
    _launch_pending()
    stats.record("all_gather", output, SHARD)
    with record_function(f"zeroshard::{label}::all_gather"):
        work = _all_gather_flat(output, input, group=group.shard)
    return _finish(work, async_op)


def reduce_scatter(output, input, *, group: Ranks, stats: CommStats, label: str,
                   op=dist.ReduceOp.AVG, async_op=False, input_is_scratch=False):
    """Reduce ``input`` (1-D, S shards) over every rank; this rank's shard lands in
    ``output``: within the shard group, then (a mesh) across replicas on the shard only.

    ``input_is_scratch``: the caller is done with ``input``, whose values the collective
    may then change (Note [collectives on gloo]); else they are kept."""
    def within():
        stats.record("reduce_scatter", input, SHARD)
        with record_function(f"zeroshard::{label}::reduce_scatter"):
            return _reduce_scatter_flat(output, input, op=op, group=group.shard,
                                        input_is_scratch=input_is_scratch)
    _launch_pending()
    launches = [within]
    if group.replicate is not None:
        launches.append(lambda: _all_reduce_along(output, REPLICATE, group.replicate, op,
                                                  stats, label))
    return _finish(_in_turn(launches, output.device), async_op)


def all_reduce(tensor, *, group: Ranks, stats: CommStats, label: str, op=dist.ReduceOp.SUM,
               async_op=False):
    """Reduce ``tensor`` over every rank (a mesh: along each dimension in turn)."""
    _launch_pending()
    launches = [lambda dim=dim, pg=pg: _all_reduce_along(tensor, dim, pg, op, stats, label)
                for dim, pg, _ in group.dimensions()]
    return _finish(_in_turn(launches, tensor.device), async_op)


def broadcast(tensor, *, group: Ranks, stats: CommStats, label: str, async_op=False):
    """Overwrite ``tensor`` on every rank with rank 0's value (a mesh: across each replica
    from the rank in rank 0's place, then across replicas from rank 0's replica)."""
    def along(dim, pg, source):
        stats.record("broadcast", tensor, dim)
        with record_function(f"zeroshard::{label}::broadcast"):
            return dist.broadcast(tensor, src=source, group=pg, async_op=True)
    _launch_pending()
    launches = [lambda dim=dim, pg=pg, source=source: along(dim, pg, source)
                for dim, pg, source in group.dimensions()]
    return _finish(_in_turn(launches, tensor.device), async_op)


def _all_reduce_along(tensor, dim: str, pg, op, stats: CommStats, label: str):
    stats.record("all_reduce", tensor, dim)
    with record_function(f"zeroshard::{label}::all_reduce"):
        return dist.all_reduce(tensor, op=op, group=pg, async_op=True)


# Note [collectives on a mesh]:
#     On a 2-D mesh a job-wide collective runs along the shard dimension and then along
#     the replicate one, the second on the first's result. A reduction over every rank
#     (sum, mean, max) is the reduction across replicas of the reductions within each:
#     a gradient's reduce-scatter within the replica, then the all-reduce of this
#     rank's shard across replicas. A broadcast from rank 0 goes, within each replica,
#     from the rank in rank 0's place along the shard dimension to the others, then
#     from rank 0's replica, which by then holds rank 0's value everywhere, to the
#     other replicas. So no group spanning the whole mesh is needed.
#     The second collective can only start once the first is done. It starts when the
#     first is waited for or just before zeroshard's next collective, whichever comes
#     first (``_pending``, in the order the first ones were issued). Either way it
#     takes the same place in the sequence every rank issues: right after the
#     collectives issued before it, whatever this rank's data made it wait for when.
#     Ranks that issue one sequence cannot wait on each other in a cycle (the rank
#     that has issued the fewest, if blocked, waits on a collective every other rank
#     has issued), so one order (Note [one order] in stage3.py) holds on a mesh too.
#     Starting the second at the first's wait instead would put it wherever this
#     rank happened to wait: a rank that waited early in one replica and late in
#     another could block both. The cost: the next collective waits for the first.
#     On gloo that blocks the host. On CUDA it blocks neither the host nor the
#     compute stream: the wait and the launch run on a side stream, which the second
#     collective's stream follows. (Stage 2's next gradient buffer still waits for
#     the whole pair, the all-reduce across replicas included.) The sequence is one
#     order among zeroshard's collectives only: a collective of the user's own on a
#     mesh group during backward may land before or after a pending second one,
#     depending on this rank's timing. After an error inside ``with ZeroOptimizer``
#     the pending ones are dropped, never launched late (``drop_pending``).
class _InTurn:
    """Collectives that run one after another as one work: ``work`` now, each of
    ``launches`` once the one before it is done (Note [collectives on a mesh])."""

    def __init__(self, work, launches: list, device: torch.device) -> None:
        self.work = work
        self.launches = launches
        self.device = device
        self._after = None  # the work (or _InTurn) that follows, once launched

    def after(self):
        """Launch what follows ``work`` (once) and return it."""
        if self._after is None:
            with _side_stream(self.device):
                with _failures_explained():  # Note [a collective that fails]
                    self.work.wait()
                self._after = _in_turn(self.launches, self.device)
        return self._after


_pending: collections.deque[_InTurn] = collections.deque()  # oldest first
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device):
    """On CUDA, a stream of its own for waiting on a first collective and launching the
    second, so the compute stream does not wait; elsewhere nothing."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(_side_streams[device])


def _in_turn(launches: list, device: torch.device):
    """Launch the first of ``launches`` now, the others in turn (``_InTurn``)."""
    work = launches[0]()
    if len(launches) == 1:
        return work
    chain = _InTurn(work, launches[1:], device)
    _pending.append(chain)
    return chain


def drop_pending() -> None:
    """Forget the pending second collectives without launching them (after an error)."""
    _pending.clear()


def _launch_pending(until: _InTurn | None = None) -> None:
    """Launch what follows each pending first collective, oldest first, up to ``until``
    (None: all of them): before any new collective, or when ``until`` is waited for."""
    while _pending and (until is None or until._after is None):
        _pending.popleft().after()


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
        if group.rank == 0 else torch.empty(0, dtype=torch.uint8)
    length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    broadcast(length, group=group, stats=stats, label=label)
    received = payload.to(device) if payload.numel() else torch.empty(
        int(length.item()), dtype=torch.uint8, device=device)
    broadcast(received, group=group, stats=stats, label=label)
    received = received.cpu()
    return pickle.loads(ctypes.string_at(received.data_ptr(), received.numel()))


def all_gather_object(obj, *, group, stats: CommStats, label: str, device: torch.device) -> list:
    """Every shard's picklable ``obj``, in shard order (the lengths, then the bytes padded
    to the longest), on every rank."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    lengths = torch.zeros(group.shard_size, dtype=torch.int64, device=device)
    all_gather(lengths, torch.tensor([payload.numel()], dtype=torch.int64, device=device),
               group=group, stats=stats, label=label)
    lengths = lengths.tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    received = padded.new_empty(padded.numel() * group.shard_size)
    all_gather(received, padded, group=group, stats=stats, label=label)
    received = received.cpu()
    return [pickle.loads(ctypes.string_at(received.data_ptr() + r * padded.numel(), length))
            for r, length in enumerate(lengths)]


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
#     cannot reach (gloo's flat reduce-scatter keeps a copy of its whole input, which
#     Note [collectives on gloo] avoids on CPU): held for RETAIN_S, a backward shorter
#     than that kept every bucket's copy, the full gradient size, alive. So only the
#     works of the latest RETAIN_WAITS waits are held for RETAIN_S; older ones are let
#     go at a later wait once they have been finished for RETAIN_MIN_S. Dropping a
#     work while the process goes on running is safe even if a worker still holds it
#     (the worker then takes the GIL as usual); only a drop during teardown aborts, and
#     the works a script's last collectives used are among the latest.
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


def let_go_of_finished() -> None:
    """Drop every finished work now, so that what they held no longer counts as a
    holder of its storage (Note [views taken inside summon_full_params] in _bucket.py).
    Safe while the process runs even if a worker thread still holds one (Note
    [finished work]); the exit handler's pause covers one dropped just before exit."""
    _finished.clear()


def release_finished() -> None:
    """Let go of every finished work (``close()``) once the latest has been finished for
    RETAIN_S, so no worker thread can still hold one (Note [finished work]). A timer
    thread lets go, so close() returns at once (it slept RETAIN_S: a quarter of a
    second per optimizer); being a Python thread it holds the GIL when it drops them,
    and the interpreter joins it before exit handlers and teardown."""
    if not _finished:
        return
    works = list(_finished)
    _finished.clear()
    delay = max(0.0, works[-1][0] + RETAIN_S - time.monotonic())
    threading.Timer(delay, works.clear).start()


def wait(work) -> None:
    """Wait for one work handle (None: a blocking call that already finished)."""
    wait_all([work])


def _pause_at_exit() -> None:
    """Note [finished work]: at interpreter exit, before teardown, give gloo's worker
    threads time to let go of the works they ran (a script's own collectives too:
    a loss all-reduced for a log line just before exit), then let go of ours."""
    time.sleep(RETAIN_S)
    let_go_of_finished()


def wait_all(works) -> None:
    done = []
    for work in works:
        while isinstance(work, _InTurn):  # Note [collectives on a mesh]
            _launch_pending(until=work)
            done.append(work.work)
            work = work.after()
        if work is not None:
            with _failures_explained():  # Note [a collective that fails]
                work.wait()
            done.append(work)
    works = done
    if works:  # Note [finished work]
        if not _exit_pause_registered:
            _register_exit_pause()
        now = time.monotonic()
        while _finished and (now - _finished[0][0] > RETAIN_S or (
                len(_finished) >= RETAIN_WAITS and now - _finished[0][0] > RETAIN_MIN_S)):
            _finished.popleft()
        _finished.append((now, works))
