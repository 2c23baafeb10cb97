"""A pool of persistent gloo worker processes that runs test cases on ranks 0..k-1.

Starting a rank costs seconds (mostly ``import torch``), so the pool starts four
workers once per test session, joins them in one gloo process group, and builds
sub-groups for world sizes 1-4 and a (replicate, shard) DeviceMesh of every shape
that fits. ``WorkerPool.run(fn, world_size, *args)`` sends a
module-level function to ranks ``0..world_size-1``, calls it there as
``fn(ctx, *args)`` and returns the per-rank results.

Nothing waits without a limit: every call has a timeout, gloo collectives time
out too, and a failing or silent rank tears the pool down and restarts it, so the
next test starts on clean processes; the failing test gets each rank's traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp

POOL_SIZE = 4
# (replicas, shards) of the meshes over ranks 0..R*S-1 every worker builds at start
MESH_SHAPES = [(r, s) for r in range(1, POOL_SIZE + 1) for s in range(1, POOL_SIZE + 1)
               if r * s <= POOL_SIZE]
# and (replicate, shard) meshes whose ranks are laid out otherwise, by name
ODD_MESHES = {"2x2 strided": [[0, 2], [1, 3]], "2x2 rank 0 in replica 1": [[2, 3], [0, 1]],
              "2x2 out of order": [[1, 0], [3, 2]]}
# a 2x2 mesh over ranks 0-3 whose dimensions are named the other way round
SHARD_NAMED_FIRST = "2x2 named (shard, replicate)"


def mesh_shape(key) -> tuple[int, int]:
    """(replicas, shards) of the mesh ``RankContext.meshes[key]``."""
    layout = ODD_MESHES.get(key) if isinstance(key, str) else None
    return (len(layout), len(layout[0])) if layout else tuple(key)
COLLECTIVE_TIMEOUT_S = 60
GRACE_AFTER_ERROR_S = 5  # how long to wait for the other ranks once one has failed


@dataclasses.dataclass
class RankContext:
    rank: int
    world_size: int
    group: object  # the gloo sub-group of ranks 0..world_size-1
    meshes: dict  # (replicas, shards) -> DeviceMesh("cpu", ...) over ranks 0..R*S-1; ODD_MESHES

    def mesh(self, key):
        """The pool's mesh ``key`` ((replicas, shards) or a name in ODD_MESHES); None: None."""
        return None if not key else self.meshes[key if isinstance(key, str) else tuple(key)]

    def zero_ranks(self, key) -> dict:
        """ZeroOptimizer's ``mesh=`` the pool's mesh ``key``, or without one
        ``process_group=`` this call's group."""
        mesh = self.mesh(key)
        return {"mesh": mesh} if mesh is not None else {"process_group": self.group}


class WorkerError(AssertionError):
    """A case failed or timed out on some rank; the message has each rank's story."""


def _worker_main(rank: int, size: int, init_file: str, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # the machines have 2 cores for 4 ranks
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # DDP's find_unused_parameters advice
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    groups = {k: dist.new_group(list(range(k))) for k in range(1, size + 1)}
    # Building a mesh creates its groups on every rank of the pool, so all are built now.
    from torch.distributed.device_mesh import DeviceMesh
    meshes = {shape: DeviceMesh("cpu", torch.arange(shape[0] * shape[1]).view(shape),
                                mesh_dim_names=("replicate", "shard"))
              for shape in MESH_SHAPES}
    meshes.update({name: DeviceMesh("cpu", torch.tensor(layout),
                                    mesh_dim_names=("replicate", "shard"))
                   for name, layout in ODD_MESHES.items()})
    meshes[SHARD_NAMED_FIRST] = DeviceMesh("cpu", torch.arange(4).view(2, 2),
                                           mesh_dim_names=("shard", "replicate"))
    results.put(("ready", rank, True, None))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            call_id, fn, world_size, args = task
            try:
                out = fn(RankContext(rank, world_size, groups[world_size], meshes), *args)
                # Plain pickle: torch.multiprocessing's pickler would pass tensors
                # through shared memory, which holds file descriptors open.
                results.put((call_id, rank, True, pickle.dumps(out)))
            except BaseException:  # noqa: BLE001 - the traceback goes to the test
                results.put((call_id, rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class WorkerPool:
    def __init__(self, size: int = POOL_SIZE, start_timeout_s: float = 180) -> None:
        self.size = size
        self.start_timeout_s = start_timeout_s
        self._call_id = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        # glibc reads this when a process starts: buffers of 1 MiB and more are mapped
        # and unmapped, so a freed buffer leaves the RSS at once and the memory tests
        # can read peaks from it (as benchmarks/compare.py does).
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
        handle, self._init_file = tempfile.mkstemp(prefix="zeroshard-pool-")
        os.close(handle)
        os.unlink(self._init_file)  # FileStore wants a path that does not exist yet
        self._tasks = [ctx.Queue() for _ in range(self.size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker_main, daemon=True,
                                   args=(rank, self.size, self._init_file, self._tasks[rank],
                                         self._results))
                       for rank in range(self.size)]
        for proc in self._procs:
            proc.start()
        ready = set()
        deadline = time.monotonic() + self.start_timeout_s
        while len(ready) < self.size:
            try:
                tag, rank, _, _ = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.shutdown(force=True)
                raise WorkerError(f"worker pool did not start within {self.start_timeout_s}s "
                                  f"(ready ranks: {sorted(ready)})") from None
            if tag == "ready":
                ready.add(rank)

    def run(self, fn, world_size: int, *args, timeout: float = 120):
        """Run ``fn(ctx, *args)`` on ranks 0..world_size-1; return the results in rank order."""
        assert 1 <= world_size <= self.size, world_size
        self._call_id += 1
        for rank in range(world_size):
            self._tasks[rank].put((self._call_id, fn, world_size, args))
        outcomes: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            try:
                call_id, rank, ok, payload = self._results.get(timeout=max(0.05, remaining))
            except queue.Empty:
                break
            if call_id != self._call_id:
                continue  # a late answer to an earlier, already failed call
            outcomes[rank] = (ok, payload)
            if not ok:  # the others may be stuck in a collective: give them a moment only
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_ERROR_S)
            if time.monotonic() > deadline:
                break
        if len(outcomes) == world_size and all(ok for ok, _ in outcomes.values()):
            return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]
        report = []
        for rank in range(world_size):
            if rank not in outcomes:
                proc = self._procs[rank]
                status = "alive" if proc.is_alive() else f"dead, exit code {proc.exitcode}"
                report.append(f"--- rank {rank}: no answer ({status}, timeout {timeout}s)")
            elif not outcomes[rank][0]:
                report.append(f"--- rank {rank} raised:\n{outcomes[rank][1]}")
        self.restart()
        raise WorkerError(f"{fn.__name__} failed on world size {world_size}:\n" + "\n".join(report))

    def restart(self) -> None:
        self.shutdown(force=True)
        self._start()

    def shutdown(self, force: bool = False) -> None:
        if not force:
            for tasks in self._tasks:
                tasks.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)
