"""Gloo's flat all-gather and reduce-scatter beside the per-shard collectives zeroshard
uses on CPU (Note [collectives on gloo] in zeroshard/_comm.py), and at 2 ranks its
exchange of halves (Note [two ranks exchange halves]): time and transient memory.

    MALLOC_MMAP_THRESHOLD_=1048576 torchrun --standalone --nproc_per_node=2 benchmarks/gloo_collectives.py
    MALLOC_MMAP_THRESHOLD_=1048576 torchrun --standalone --nproc_per_node=4 benchmarks/gloo_collectives.py --mib 64

Transient: the RSS high-water mark during the call above the RSS before it (the mmap
threshold makes freed buffers leave RSS at once). Medians over --repeat calls after one
warm-up call; rank 0's figures.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from zeroshard import _comm


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=64, help="size of the flat tensor")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    numel = int(args.mib * 2**20 / 4) // n * n
    flat = torch.randn(numel)
    full = torch.zeros(numel)
    shard = torch.randn(numel // n)
    out = torch.zeros(numel // n)

    def reduce_scatter_tensor():
        dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM)

    def reduce_per_shard():
        works = [dist.reduce(piece, dst=owner, op=dist.ReduceOp.SUM, async_op=True)
                 for owner, piece in enumerate(flat.chunk(n))]
        for work in works:
            work.wait()

    def all_gather_into_tensor():
        dist.all_gather_into_tensor(full, shard)

    def broadcast_per_shard():
        works = [dist.broadcast(piece, src=owner, async_op=True)
                 for owner, piece in enumerate(full.chunk(n))]
        for work in works:
            work.wait()

    def exchange_halves():  # Note [two ranks exchange halves]: zeroshard's own call
        _comm._exchange_halves(out, flat, op=dist.ReduceOp.SUM, group=dist.group.WORLD).wait()

    calls = [("reduce_scatter_tensor", reduce_scatter_tensor),
             ("reduce per shard", reduce_per_shard)]
    if n == 2:
        calls.append(("exchange of halves (2 ranks)", exchange_halves))
    calls += [("all_gather_into_tensor", all_gather_into_tensor),
              ("broadcast per shard", broadcast_per_shard)]
    rows = []
    for name, call in calls:
        transient, seconds = [], []
        for i in range(args.repeat + 1):
            dist.barrier()
            before = rss_mib("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            start = time.perf_counter()
            call()
            if i:
                seconds.append(time.perf_counter() - start)
                transient.append(rss_mib("VmHWM") - before)
        rows.append((name, statistics.median(transient), statistics.median(seconds)))
    if rank == 0:
        print(f"{n} ranks, {args.mib:g} MiB fp32, torch {torch.__version__}\n")
        print("| collective | transient MiB | median ms |\n|---|---|---|")
        for name, mib, s in rows:
            print(f"| {name} | {mib:.1f} | {1000 * s:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
