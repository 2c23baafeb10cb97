"""Per-rank model-state memory of stages 1, 2 and 3 on the example GPT, next to the formula.

    torchrun --standalone --nproc_per_node=2 benchmarks/memory_by_stage.py
    torchrun --standalone --nproc_per_node=4 benchmarks/memory_by_stage.py

For each stage: one AdamW step of examples/train_gpt.py's model (stage 3 with its
Block as units). Hooks registered after ZeroOptimizer's own record, at every
module's forward entry/exit and every gradient accumulation, the live bytes that
``memory_report()`` counts from the storages: the peak of parameters (full
buffers + shards) and of gradients during forward and backward. After backward and
after the step, the report itself. Formula (fp32 AdamW, DESIGN.md): parameters 4Ψ
(stage 3: 4Ψ/N), gradients 4Ψ + 4Ψ/N (stage 1, which keeps full-size buffers and
the reduced shard) or 4Ψ/N, optimizer states 8Ψ/N.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import zeroshard  # noqa: E402
from train_gpt import DEFAULTS, GPT, Block, MarkovData  # noqa: E402

BUCKET_MB = 0.25


def measure(stage: int) -> dict:
    torch.manual_seed(0)
    a = DEFAULTS
    model = GPT(a["vocab"], a["d_model"], a["layers"], a["heads"], a["seq_len"])
    extra = {"units": Block} if stage == 3 else {}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                  bucket_size_mb=BUCKET_MB, **extra)
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
    psi = sum(p.numel() for p in model.parameters())
    return {"psi": psi, "peak": peak, "after_backward": after_backward, "after_step": after_step}


def formula(stage: int, psi: int, n: int) -> dict:
    return {"parameters": 4 * psi / (n if stage == 3 else 1),
            "gradients": 4 * psi + 4 * psi / n if stage == 1 else 4 * psi / n,
            "optimizer_states": 8 * psi / n}


def main():
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    for stage in (1, 2, 3):
        r = measure(stage)
        if rank != 0:
            continue
        f = formula(stage, r["psi"], n)
        print(f"stage {stage}, N={n}, Ψ={r['psi']:,}, bucket {BUCKET_MB} MiB (bytes on rank 0)")
        for key in ("parameters", "gradients", "optimizer_states", "master_parameters"):
            expected = f"{f[key]:>12,.0f}" if key in f else f"{0:>12,}"
            peak = f"{r['peak'][key]:>12,}" if key in r["peak"] else " " * 12
            print(f"  {key:<18} after backward {r['after_backward'][key]:>12,}  after step "
                  f"{r['after_step'][key]:>12,}  formula {expected}  peak fwd/bwd {peak}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
