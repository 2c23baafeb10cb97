"""zeroshard against DDP on this machine's device, side by side in one run: CUDA/NCCL
where there is a GPU, else CPU/gloo.

    python benchmarks/device_agreement.py --world-size 2 --out benchmarks/results/cuda_h200

The suite checks agreement on CPU/gloo only (CI has no GPU). On CUDA the collectives
run on NCCL's own streams, gradients arrive on autograd's, and memory is the caching
allocator's, none of which CPU runs exercise; this runs the loop a user writes there.
examples/train_gpt.py's GPT is trained for --steps steps by DDP + AdamW and by
zeroshard at each stage (same seeds, same per-rank batches): two micro-batches a step
(the first under no_sync()), clip_grad_norm_ (CLIP below), step, zero_grad; fp32, and with
torch.autocast(bfloat16) against DDP under the same autocast. Stage 3 also saves a
checkpoint after the second step and resumes it in a fresh model and optimizer. For
each case: the largest parameter difference from DDP over all steps and ranks
(0 means bitwise equal), torch.cuda.max_memory_allocated of the case's steps next to
memory_report()'s total, and the median step time.

With fewer GPUs than ranks the ranks share GPUs (compare.join_group): memory
figures are per process and hold; step times do not. The ``complex_stage*`` cases train
a small model with a complex weight (SGD) against DDP: NCCL has no complex type (Note
[complex tensors in collectives] in zeroshard/_comm.py). ``zeroshard2_one_parameter_buckets``
gives every parameter a bucket of its own, so that each gradient becomes its bucket's
reduce buffer (Note [a gradient as its bucket's buffer] in zeroshard/stage2.py).

Exit status 1 if a resumed run differs from the uninterrupted one, or, at two ranks, if
any case's parameters differ from DDP's (a + b = b + a: bitwise equal). With more ranks
the sums run in other orders than DDP's (NCCL's ring or tree over other bucket
layouts), and AdamW magnifies a last bit where a gradient is near eps, so parameters
are reported, not required equal; there the gradient norm the clip returns must be
within 1e-4 of DDP's, relatively (rounding gives about 1e-6; a missed or doubled
average gives 0.3 and more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from compare import device_name, free_port, join_group, spawn_ranks  # noqa: E402
from train_gpt import GPT, Block  # noqa: E402

import zeroshard  # noqa: E402

# Clipping at a norm never reached: the norm is computed (and compared) but scales by
# exactly 1. An active clip scales by a coefficient whose last bit differs between a
# norm summed from shards and torch's norm of per-tensor norms, and AdamW magnifies
# that bit where a gradient is near eps (tests/invariants.py bounds it); a bitwise
# comparison needs the same coefficient on both sides.
CLIP = 1e9
SIZE = {"vocab": 512, "d_model": 256, "layers": 4, "heads": 4, "seq_len": 64, "batch": 4}
# name -> (stage, autocast, ZeroOptimizer options)
CASES = {
    "zeroshard1": (1, False, {}),
    "zeroshard2": (2, False, {}),
    "zeroshard3": (3, False, {"units": Block}),
    "zeroshard3_no_reshard": (3, False, {"units": Block, "reshard_after_forward": False}),
    "zeroshard2_autocast_bf16": (2, True, {}),
    "zeroshard3_autocast_bf16": (3, True, {"units": Block}),
    "zeroshard2_one_parameter_buckets": (2, False, {"bucket_size_mb": 1e-4}),
}
# name -> stage, for the model with a complex weight
COMPLEX_CASES = {"complex_stage1": 1, "complex_stage2": 2, "complex_stage3": 3}
NORM_TOLERANCE = 1e-4  # relative, above two ranks (the module docstring)


class ComplexMix(torch.nn.Module):
    """A real layer, a complex mixing weight (a spectral layer's), a real head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(32, 32)
        self.mix = torch.nn.Parameter(torch.randn(32, 32, dtype=torch.cfloat) / 32)
        self.out = torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.out((self.inp(x).to(torch.cfloat) @ self.mix).abs())


def complex_case(stage: int | None, rank: int, device: torch.device, steps: int):
    """Parameters after each of ``steps`` SGD steps, the clip's norms and the step times:
    DDP (``stage`` None) or zeroshard at ``stage``."""
    torch.manual_seed(0)
    model = ComplexMix().to(device)
    if stage is None:
        module, opt = DDP(model, device_ids=[device.index] if device.type == "cuda" else None), \
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        clip = lambda limit: torch.nn.utils.clip_grad_norm_(model.parameters(), limit)  # noqa: E731
    else:
        module = model
        opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.05, momentum=0.9,
                                      **({"units": torch.nn.Linear} if stage == 3 else {}))
        clip = opt.clip_grad_norm_
    snapshots, seen = [], record()
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 32, generator=g).to(device), torch.randn(8, 1, generator=g).to(device)
        start = time.perf_counter()
        F.mse_loss(module(x), y).backward()
        seen["norm"].append(float(clip(CLIP)))
        opt.step()
        opt.zero_grad()
        seen["time"].append(time.perf_counter() - start)
        snapshots.append(snapshot(model, None if stage is None else opt))
    held = 0 if stage is None else sum(opt.memory_report().values())
    if stage is not None:
        opt.close()
    return snapshots, seen, held


def batches(rank: int, step: int, device: torch.device):
    """This rank's two micro-batches of ``step``."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    for _ in range(2):
        tokens = torch.randint(0, SIZE["vocab"], (SIZE["batch"], SIZE["seq_len"] + 1), generator=g)
        yield tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def new_model(device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(SIZE["vocab"], SIZE["d_model"], SIZE["layers"], SIZE["heads"], SIZE["seq_len"]).to(device)


def train(opt, module, clip, rank, device, steps: range, autocast: bool, seen: dict):
    """The user's loop; yields after each step. Appends to ``seen``'s lists the gradient
    norm ``clip`` returned, the step time and (CUDA) the step's peak allocation."""
    sync = getattr(module, "no_sync", None) or opt.no_sync
    for step in steps:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for micro, (x, y) in enumerate(batches(rank, step, device)):
            with sync() if micro == 0 else contextlib.nullcontext(), \
                    torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(module(x).reshape(-1, SIZE["vocab"]).float(), y.reshape(-1))
                loss.backward()
        seen["norm"].append(float(clip(CLIP)))
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
            seen["peak"].append(torch.cuda.max_memory_allocated())
        seen["time"].append(time.perf_counter() - start)
        yield step


def record() -> dict:
    return {"norm": [], "time": [], "peak": []}


def new_optimizer(model, stage: int, options: dict):
    return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                   weight_decay=0.1, **options)


def snapshot(model, opt=None) -> list[torch.Tensor]:
    """The full parameters, on CPU, in registration order (complex ones as real pairs)."""
    with opt.summon_full_params() if opt is not None and opt.stage == 3 else contextlib.nullcontext():
        return [(torch.view_as_real(p) if p.is_complex() else p).detach().float().cpu().clone()
                for p in model.parameters()]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def worker(rank: int, world: int, port: int, steps: int, names: list[str], results) -> None:
    device = join_group(rank, world, port)
    reference: dict[bool, tuple[list, dict]] = {}  # autocast -> (parameters per step, record)
    for autocast in sorted({CASES[name][1] for name in names if name in CASES}):
        model = new_model(device)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        clip = lambda limit: torch.nn.utils.clip_grad_norm_(model.parameters(), limit)  # noqa: E731
        seen = record()
        reference[autocast] = ([snapshot(model) for _ in train(
            adamw, ddp, clip, rank, device, range(steps), autocast, seen)], seen)
        del ddp, model, adamw, clip
    rows = {}
    complex_reference = None
    for name in names:
        if name in COMPLEX_CASES:
            if complex_reference is None:
                complex_reference = complex_case(None, rank, device, steps)
            expected, expected_seen, _ = complex_reference
            got, seen, held = complex_case(COMPLEX_CASES[name], rank, device, steps)
            rows[name] = row(max(map(largest_difference, got, expected)), None, seen,
                             expected_seen, held)
            continue
        stage, autocast, options = CASES[name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = new_model(device)
        opt = new_optimizer(model, stage, options)
        expected, expected_seen = reference[autocast]
        difference, seen, folder = 0.0, record(), None
        for step in train(opt, model, opt.clip_grad_norm_, rank, device, range(steps), autocast, seen):
            difference = max(difference, largest_difference(snapshot(model, opt), expected[step]))
            if stage == 3 and step == 1:  # rank 0 names a folder for all
                folder = [tempfile.mkdtemp(prefix="zs_agree_") if rank == 0 else None]
                dist.broadcast_object_list(folder, group_src=0)
                folder = folder[0]
                zeroshard.save_checkpoint(folder, model, opt)
        held = sum(opt.memory_report().values())
        final = snapshot(model, opt)
        opt.close()
        del opt, model
        resumed = None
        if stage == 3:  # resume the checkpoint in a fresh model and optimizer
            model = new_model(device)
            opt = new_optimizer(model, stage, options)
            zeroshard.load_checkpoint(folder, model, opt)
            for _ in train(opt, model, opt.clip_grad_norm_, rank, device, range(2, steps),
                           autocast, record()):
                pass
            resumed = largest_difference(snapshot(model, opt), final)
            opt.close()
            del opt, model
            dist.barrier()  # every rank has read the checkpoint: rank 0 removes it
            if rank == 0:
                shutil.rmtree(folder)
        rows[name] = row(difference, resumed, seen, expected_seen, held)
    results.put({"rank": rank, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def row(difference: float, resumed: float | None, seen: dict, expected_seen: dict, held: int) -> dict:
    return {
        "difference_from_ddp": difference, "resumed_difference": resumed,
        "norm_relative_difference": max(abs(a - b) / b for a, b in
                                        zip(seen["norm"], expected_seen["norm"])),
        "peak_bytes": max(seen["peak"], default=None), "memory_report_bytes": held,
        "ddp_peak_bytes": max(expected_seen["peak"], default=None),
        "step_s": statistics.median(seen["time"]),
        "ddp_step_s": statistics.median(expected_seen["time"])}


def probe(rank: int, world: int, port: int, results) -> None:
    """Whether the ranks can run zeroshard's collectives at all here (a shared GPU may not)."""
    device = join_group(rank, world, port)
    x = torch.full((4 * world,), float(rank + 1), device=device)
    dist.all_reduce(x)
    shard = torch.empty(4, device=device)
    dist.reduce_scatter_tensor(shard, x)
    whole = torch.empty(4 * world, device=device)
    dist.all_gather_into_tensor(whole, shard)
    results.put({"rank": rank, "device": str(device), "sum": whole.sum().item()})
    dist.barrier()
    dist.destroy_process_group()


def merge(per_rank: list[dict]) -> dict:
    """The worst rank's figure for each case."""
    rows = {}
    for name in per_rank[0]["rows"]:
        figures = [r["rows"][name] for r in per_rank]
        rows[name] = {key: max((f[key] for f in figures if f[key] is not None), default=None)
                      for key in figures[0]}
    return rows


def table(rows: dict, header: str) -> str:
    lines = [header, "",
             "| case | largest parameter difference from DDP | gradient norm vs DDP's, relative | "
             "resumed checkpoint vs uninterrupted | peak allocated MiB (DDP) | memory_report MiB | "
             "step s (DDP) |",
             "|---|---|---|---|---|---|---|"]

    def mib(value):
        return "-" if value is None else f"{value / 2**20:.1f}"
    for name, row in rows.items():
        resumed = "-" if row["resumed_difference"] is None else f"{row['resumed_difference']:.3g}"
        lines.append(f"| {name} | {row['difference_from_ddp']:.3g} | "
                     f"{row['norm_relative_difference']:.2g} | {resumed} | "
                     f"{mib(row['peak_bytes'])} ({mib(row['ddp_peak_bytes'])}) | "
                     f"{mib(row['memory_report_bytes'])} | "
                     f"{row['step_s']:.4f} ({row['ddp_step_s']:.4f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, default=None)
    every = [*CASES, *COMPLEX_CASES]
    p.add_argument("--cases", default=",".join(every),
                   help=f"comma-separated subset of {', '.join(every)}")
    p.add_argument("--probe", action="store_true",
                   help="only check that the ranks can run collectives here; exit 1 if not")
    args = p.parse_args(argv)
    if args.probe:
        print(spawn_ranks(probe, args.world_size, (free_port(),), args.timeout,
                          measure_memory=False), flush=True)
        return
    if args.steps < 3:
        p.error(f"--steps {args.steps}: stage 3 saves after step 2 and resumes, so at least 3")
    names = args.cases.split(",")
    unknown = [name for name in names if name not in every]
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(every)}")
    per_rank = spawn_ranks(worker, args.world_size, (free_port(), args.steps, names),
                           args.timeout, measure_memory=False)
    rows = merge(per_rank)
    chosen = "" if names == every else f" --cases {args.cases}"
    header = (f"`python benchmarks/device_agreement.py --world-size {args.world_size} "
              f"--steps {args.steps}{chosen}`: {args.world_size} ranks, "
              f"{device_name(args.world_size) or 'CPU/gloo, '}torch {torch.__version__}, "
              f"GPT {SIZE}")
    text = table(rows, header)
    print(text, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "agreement.md").write_text(text + "\n")
        (args.out / "agreement.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    failed = [name for name, figures in rows.items() if figures["resumed_difference"] not in (None, 0)
              or (figures["difference_from_ddp"] != 0 if args.world_size <= 2
                  else figures["norm_relative_difference"] > NORM_TOLERANCE)]
    if failed:
        print(f"differs from DDP or from the uninterrupted run: {', '.join(failed)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
