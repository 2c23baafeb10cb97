"""Per-rank peak memory of a model bigger than one rank's budget, through every phase.

    python benchmarks/big_model_memory.py --world-size 4 --layers 64 --width 1024

Stage 3, fp32 AdamW, a stack of ``--layers`` Linear(width, width) units (64 x 1024 x 1024
is 256 MiB of parameters). The model is built under ``torch.device("meta")`` and
goes through what a model too big for one device needs: construction (materialized
unit by unit), training steps, ``save_checkpoint``, ``load_checkpoint``,
``full_state_dict`` (built on rank 0 on CPU), ``save_full_model`` (safetensors,
streamed from rank 0), ``load_full_state_dict`` given on rank 0 only, and from the
safetensors folder. For each phase, each rank's peak RSS above its level when the
phase began (``/proc/self/clear_refs`` resets the high-water mark; glibc runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the RSS), next to the full
model's size, the ZeRO formula's model states (16Ψ/N for fp32 Adam) and one unit.
On CPU "device" memory is host memory: rank 0's full state dict and the pages of
the files it reads count there too. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from compare import rss_kib  # benchmarks/ is this script's directory

PHASES = ("construct", "steps", "save_checkpoint", "load_checkpoint", "full_state_dict",
          "save_full_model", "load_full_state_dict (rank 0 only)", "load_full_state_dict (safetensors)")


class Peak:
    def __enter__(self):
        gc.collect()
        self.before = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark restarts from the current RSS
        return self

    def __exit__(self, *exc):
        self.bytes = (rss_kib("VmHWM") - self.before) * 1024


def worker(rank: int, world: int, port: int, args, folder: str, results) -> None:
    import zeroshard
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # What a process sets up once (gloo's buffers, the gather channel) is not counted.
    small = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    warm = zeroshard.ZeroOptimizer(small, torch.optim.AdamW, stage=3, units=nn.Linear)
    small(torch.ones(2, 8)).sum().backward()
    warm.step()
    zeroshard.save_checkpoint(os.path.join(folder, "warm"), small, warm)
    zeroshard.save_full_model(os.path.join(folder, "warm-export"), small, warm)
    warm.close()
    dist.barrier()

    peaks = {}
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
    with Peak() as peak:
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, device="cpu",
                                      units=nn.Linear, lr=1e-4)
    peaks["construct"] = peak.bytes
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    with Peak() as peak:
        for _ in range(args.steps):
            model(x).square().mean().backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
    peaks["steps"] = peak.bytes
    with Peak() as peak:
        zeroshard.save_checkpoint(os.path.join(folder, "ckpt"), model, opt)
    peaks["save_checkpoint"] = peak.bytes
    with Peak() as peak:
        zeroshard.load_checkpoint(os.path.join(folder, "ckpt"), model, opt)
    peaks["load_checkpoint"] = peak.bytes
    with Peak() as peak:
        full = opt.full_state_dict()
    peaks["full_state_dict"] = peak.bytes
    with Peak() as peak:
        zeroshard.save_full_model(os.path.join(folder, "export"), model, opt)
    peaks["save_full_model"] = peak.bytes
    with Peak() as peak:
        opt.load_full_state_dict(*(full if full is not None else (None, None)))
    peaks["load_full_state_dict (rank 0 only)"] = peak.bytes
    del full
    with Peak() as peak:
        opt.load_full_state_dict(os.path.join(folder, "export"))
    peaks["load_full_state_dict (safetensors)"] = peak.bytes
    psi = sum(p.numel() for p in model.parameters())
    opt.close()
    results.put({"rank": rank, "peaks": peaks, "psi": psi})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    # Read by glibc when a rank starts. 64 KiB, not compare.py's 1 MiB: here the last
    # rank's part of each unit is 4 KiB short of 1 MiB, so at 1 MiB it came from the
    # heap, whose fragmentation held up to 60 MiB more RSS in some runs of
    # load_checkpoint (1 run in 3; never with 64 KiB, in 4 runs).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        procs = [ctx.Process(target=worker, args=(r, args.world_size, port, args, folder, results))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        out = sorted((results.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join(timeout=60)
    psi, n, mib = out[0]["psi"], args.world_size, 2**20
    unit = (args.width * args.width + args.width) * 4
    print(f"# python benchmarks/big_model_memory.py --world-size {n} --layers {args.layers} "
          f"--width {args.width} --batch {args.batch} --steps {args.steps}   "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"Ψ = {psi:,} parameters: full fp32 model {4 * psi / mib:.1f} MiB, model states "
          f"16Ψ/N = {16 * psi / n / mib:.1f} MiB per rank, shards 4Ψ/N = {4 * psi / n / mib:.1f} MiB, "
          f"one unit {unit / mib:.1f} MiB\n")
    print("| phase | " + " | ".join(f"rank {r['rank']} MiB" for r in out) + " |")
    print("|---|" + "---|" * len(out))
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{r['peaks'][phase] / mib:.1f}" for r in out) + " |")


if __name__ == "__main__":
    main()
