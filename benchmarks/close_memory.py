"""What ``opt.close()`` costs in memory: the RSS high-water mark during ``close()``
above the RSS just before it, and the RSS after it (Note [parameters handed back] in
zeroshard/optimizer.py).

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/close_memory.py [--size 100m]

The example GPT (examples/train_gpt.py, its blocks stage 3's units), fp32 AdamW, two
steps, then ``close()``; each stage with and without a bf16 ``MixedPrecision`` policy,
2 ranks, CPU/gloo, fresh processes per row; the larger rank's figures. To compare with
another version of zeroshard, put it first on PYTHONPATH. CPU only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402
from phase_peaks import _reset_high_water  # noqa: E402
from train_gpt import GPT, Block  # noqa: E402

import zeroshard  # noqa: E402


def worker(rank: int, world: int, port: int, stage: int, bf16: bool, size: dict, results) -> None:
    compare.join_group(rank, world, port)
    torch.manual_seed(0)
    model = GPT(size["vocab"], size["d_model"], size["layers"], size["heads"], size["seq_len"])
    policy = zeroshard.MixedPrecision(torch.bfloat16) if bf16 else None
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-4,
                                  mixed_precision=policy, **({"units": Block} if stage == 3 else {}))
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, size["vocab"]), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    before = compare.rss_kib("VmRSS")
    _reset_high_water()
    opt.close()
    results.put({"rank": rank, "peak": (compare.rss_kib("VmHWM") - before) / 1024,
                 "after": (compare.rss_kib("VmRSS") - before) / 1024})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(compare.SIZES), default="100m")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '')} python "
          f"benchmarks/close_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"zeroshard from {os.path.dirname(zeroshard.__file__)}; GPT {compare.SIZES[args.size]}, "
          f"fp32 AdamW, 2 ranks, CPU/gloo, torch {torch.__version__}; MiB, the larger rank\n")
    print("| stage | policy | RSS peak during close() above before | RSS after close() |")
    print("|---|---|---|---|")
    for stage in (1, 2, 3):
        for bf16 in (False, True):
            per_rank = compare.spawn_ranks(worker, 2, (compare.free_port(), stage, bf16,
                                                       compare.SIZES[args.size]),
                                           args.timeout, measure_memory=True)
            worst = max(per_rank, key=lambda r: r["peak"])
            print(f"| {stage} | {'bf16' if bf16 else 'none'} | {worst['peak']:.0f} | "
                  f"{worst['after']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
