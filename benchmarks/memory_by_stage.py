"""Per-rank model-state memory of stages 1, 2 and 3 on the example GPT, next to the formula.

    torchrun --standalone --nproc_per_node=2 benchmarks/memory_by_stage.py
    torchrun --standalone --nproc_per_node=4 benchmarks/memory_by_stage.py
    torchrun --standalone --nproc_per_node=2 benchmarks/memory_by_stage.py --precision bf16
    torchrun --standalone --nproc_per_node=4 benchmarks/memory_by_stage.py --replicas 2

For each stage: one AdamW step of examples/train_gpt.py's model (stage 3 with its
Block as units). Hooks registered after ZeroOptimizer's own record, at every
module's forward entry/exit and every gradient accumulation, the live bytes that
``memory_report()`` counts from the storages: the peak of parameters (full
buffers + shards) and of gradients during forward and backward. After backward and
after the step, the report itself. Formula (AdamW, DESIGN.md, P = 4 bytes in fp32
and 2 in bf16): parameters PΨ (stage 3: PΨ/N); gradients PΨ + PΨ/N (stage 1, which
keeps full-size buffers and the reduced shard) or PΨ/N; optimizer states 8Ψ/N;
master parameters 4Ψ/N with bf16 (in fp32 the parameters are their own masters).
With bf16 the four categories add up to the table's 4Ψ+12Ψ/N (stage 1, plus its
reduced shard 2Ψ/N), 2Ψ+14Ψ/N and 16Ψ/N.

``--replicas R`` hybrid-shards over a (R, N/R) mesh: the formula's N is then the
shard size S = N/R. Then a second step's communication is printed per mesh
dimension: within each replica the stage's usual gathers and reduce-scatters,
across replicas one all-reduce of the reduced shard (PΨ/S) per step, plus the
few bytes of the job-wide flags.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import zeroshard  # noqa: E402
from train_gpt import DEFAULTS, GPT, Block, MarkovData  # noqa: E402

BUCKET_MB = 0.25


def measure(stage: int, policy, mesh) -> dict:
    torch.manual_seed(0)
    a = DEFAULTS
    model = GPT(a["vocab"], a["d_model"], a["layers"], a["heads"], a["seq_len"])
    extra = {"units": Block} if stage == 3 else {}
    if mesh is not None:
        extra["mesh"] = mesh
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                  bucket_size_mb=BUCKET_MB, mixed_precision=policy, **extra)
    peak = {"parameters": 0, "gradients": 0}

    def record(*_):
        report = opt.memory_report()
        for key in peak:
            peak[key] = max(peak[key], report[key])

    for module in model.modules():
        module.register_forward_pre_hook(record)
        module.register_forward_hook(record)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(record)
    x, y = MarkovData(a["vocab"], 0).batch(a["batch_size"], a["seq_len"], seed=dist.get_rank())
    F.cross_entropy(model(x).view(-1, a["vocab"]), y.reshape(-1)).backward()
    after_backward = opt.memory_report()
    opt.step()
    after_step = opt.memory_report()
    opt.zero_grad()
    opt.comm_stats.reset()  # a second step's traffic: the first records orders once
    F.cross_entropy(model(x).view(-1, a["vocab"]), y.reshape(-1)).backward()
    opt.step()
    comm = {key: value for key, value in opt.comm_stats.by_dim.items() if value}
    psi = sum(p.numel() for p in model.parameters())
    return {"psi": psi, "peak": peak, "after_backward": after_backward, "after_step": after_step,
            "comm": comm}


def formula(stage: int, psi: int, n: int, p: int) -> dict:
    return {"parameters": p * psi / (n if stage == 3 else 1),
            "gradients": p * psi + p * psi / n if stage == 1 else p * psi / n,
            "optimizer_states": 8 * psi / n,
            "master_parameters": 4 * psi / n if p == 2 else 0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--replicas", type=int, default=1,
                        help="hybrid sharding over a (replicas, N / replicas) mesh")
    args = parser.parse_args()
    policy = zeroshard.MixedPrecision(torch.bfloat16) if args.precision == "bf16" else None
    param_bytes = 2 if policy else 4
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    mesh = None
    if args.replicas > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (args.replicas, n // args.replicas),
                                mesh_dim_names=("replicate", "shard"))
    shards = n // args.replicas
    for stage in (1, 2, 3):
        r = measure(stage, policy, mesh)
        if rank != 0:
            continue
        f = formula(stage, r["psi"], shards, param_bytes)
        layout = f" as {args.replicas}x{shards} (replicate, shard), S={shards}" if mesh else ""
        print(f"stage {stage}, {args.precision}, N={n}{layout}, Ψ={r['psi']:,}, bucket "
              f"{BUCKET_MB} MiB (bytes on rank 0)")
        for key in ("parameters", "gradients", "optimizer_states", "master_parameters"):
            expected = f"{f[key]:>12,.0f}"
            peak = f"{r['peak'][key]:>12,}" if key in r["peak"] else " " * 12
            print(f"  {key:<18} after backward {r['after_backward'][key]:>12,}  after step "
                  f"{r['after_step'][key]:>12,}  formula {expected}  peak fwd/bwd {peak}", flush=True)
        print("  second step's communication, bytes: " + ", ".join(
            f"{op} along {dim} {value:,}" for (op, dim), value in r["comm"].items())
            + f"  (PΨ = {param_bytes * r['psi']:,}, PΨ/S = {param_bytes * r['psi'] / shards:,.0f})",
            flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
