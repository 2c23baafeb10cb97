"""The peak of the bytes torch's allocator holds for live tensors, method by method: what
``torch.cuda.max_memory_allocated`` counts on a GPU, measured on CPU, where compare.py's
RSS also counts what malloc keeps of freed memory (Note [collectives on gloo], and
phase_peaks.py's heap column).

    python benchmarks/allocated_peaks.py --methods ddp,fsdp2_no_reshard,zeroshard2

Each rank runs torch's profiler with ``profile_memory=True`` from before the model is
built to the end of its last step, and sums the allocator's events in time order: the
bytes allocated and not yet freed since the profiler started (everything the run made:
the model, the wrapper's buffers, the optimizer state). The peak is taken over the last
``--steps`` steps (after ``--warmup``), with the phase it fell in; the larger rank.
Not counted, as on a GPU: memory the backend allocates outside torch (gloo's own
buffers), and malloc's retention. Methods, model and wrapping are compare.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402
from train_gpt import GPT  # noqa: E402

MIB = 2**20


def worker(rank: int, world: int, port: int, method: str, size: dict, args, results) -> None:
    compare.join_group(rank, world, port)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      profile_memory=True)
    profiler.__enter__()
    torch.manual_seed(0)
    model = GPT(size["vocab"], size["d_model"], size["layers"], size["heads"], size["seq_len"])
    module, opt, backward = compare.setup(method, model, lr=1e-4)
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(rank))
    x, y = tokens[:, :-1], tokens[:, 1:]
    for step in range(args.warmup + args.steps):
        measured = "measured " if step >= args.warmup else ""
        with torch.profiler.record_function(f"{measured}forward"):
            loss = F.cross_entropy(module(x).reshape(-1, size["vocab"]), y.reshape(-1))
        with torch.profiler.record_function(f"{measured}backward"):
            (backward or torch.Tensor.backward)(loss)
        with torch.profiler.record_function(f"{measured}step"):
            opt.step()
        with torch.profiler.record_function(f"{measured}zero_grad"):
            opt.zero_grad()
        del loss
    profiler.__exit__(None, None, None)
    events = profiler.profiler.kineto_results.events()
    phases = [(e.name().removeprefix("measured "), e.start_ns(), e.end_ns()) for e in events
              if e.name().startswith("measured ")]
    start = min(begin for _, begin, _ in phases)
    allocated, peak, peak_phase = 0, 0, None
    for at, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                             if e.name() == "[memory]"
                             and e.device_type() == torch.autograd.DeviceType.CPU):
        allocated += nbytes
        if at >= start and allocated > peak:
            peak = allocated
            peak_phase = next((name for name, begin, end in phases if begin <= at <= end), None)
    results.put({"rank": rank, "peak_bytes": peak, "phase": peak_phase})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--size", choices=sorted(compare.SIZES), default="100m")
    p.add_argument("--methods", default="ddp,ddp+zero_redundancy,fsdp1_shard_grad_op,"
                   "fsdp2_no_reshard,zeroshard1,zeroshard2,fsdp1_full_shard,fsdp2_reshard,"
                   "zeroshard3")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    size = compare.SIZES[args.size]
    rows = []
    for method in args.methods.split(","):
        per_rank = compare.spawn_ranks(worker, args.world_size,
                                       (compare.free_port(), method, size, args), args.timeout,
                                       measure_memory=False)
        top = max(per_rank, key=lambda r: r["peak_bytes"])
        rows.append({"method": method, "stage": compare.stage_label(method),
                     "peak_mib": top["peak_bytes"] / MIB, "phase": top["phase"]})
        print(f"{method}: {rows[-1]['peak_mib']:.1f} MiB in {top['phase']}", flush=True)
    best = {}  # the lowest peer peak per stage
    for row in rows:
        if not row["method"].startswith("zeroshard"):
            best[row["stage"]] = min(best.get(row["stage"], float("inf")), row["peak_mib"])
    ddp = next((r["peak_mib"] for r in rows if r["method"] == "ddp"), None)
    lines = [f"python benchmarks/allocated_peaks.py --world-size {args.world_size} --size "
             f"{args.size} --methods {args.methods}" + (f" --out {args.out}" if args.out else ""),
             "", f"model: examples/train_gpt.py GPT {size}, fp32 AdamW, {args.world_size} ranks, "
             f"CPU/gloo, torch {torch.__version__}; the peak of the bytes torch's allocator held "
             f"for live tensors over steps {args.warmup + 1}-{args.warmup + args.steps} "
             "(profiler memory events summed from before the model was built), the larger rank",
             "", "| method | ZeRO stage | allocated peak MiB | x DDP | x best peer (same stage) | "
             "peak in |", "|---|---|---|---|---|---|"]
    for row in rows:
        peer = best.get(row["stage"]) if row["method"].startswith("zeroshard") else None
        lines.append(f"| {row['method']} | {row['stage']} | {row['peak_mib']:.1f} | "
                     + (f"{row['peak_mib'] / ddp:.2f}" if ddp else "-") + " | "
                     + (f"{row['peak_mib'] / peer:.2f}" if peer else "-") + f" | {row['phase']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
