"""Gradient memory of stages 1 and 2 on the example GPT, during and after backward.

    torchrun --standalone --nproc_per_node=2 benchmarks/grad_memory.py

For each stage, one training step; a post-accumulate-grad hook on every parameter
(registered after ZeroOptimizer's own, so it sees the state each hook leaves)
records ``memory_report()["gradients"]``: the live gradient bytes on this rank,
counted from the storages. Printed on rank 0 next to the formula
(stage 1: 4Ψ + 4Ψ/N; stage 2: 4Ψ/N, fp32).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import zeroshard  # noqa: E402
from train_gpt import DEFAULTS, GPT, MarkovData  # noqa: E402


def measure(stage: int, bucket_mb: float) -> dict:
    torch.manual_seed(0)
    a = DEFAULTS
    model = GPT(a["vocab"], a["d_model"], a["layers"], a["heads"], a["seq_len"])
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                  bucket_size_mb=bucket_mb)
    peak = [0]

    def record(_param):
        peak[0] = max(peak[0], opt.memory_report()["gradients"])

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(record)
    x, y = MarkovData(a["vocab"], 0).batch(a["batch_size"], a["seq_len"], seed=dist.get_rank())
    loss = F.cross_entropy(model(x).view(-1, a["vocab"]), y.reshape(-1))
    loss.backward()
    after = opt.memory_report()["gradients"]
    opt.step()
    psi = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4
    return {"psi": psi, "peak": peak[0], "after": after, "largest": largest}


def main():
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    bucket_mb = 0.25
    for stage in (1, 2):
        r = measure(stage, bucket_mb)
        formula = 4 * r["psi"] + 4 * r["psi"] / n if stage == 1 else 4 * r["psi"] / n
        if dist.get_rank() == 0:
            print(f"stage {stage}: N={n} Ψ={r['psi']:,} bucket {bucket_mb} MiB | gradients after "
                  f"backward {r['after']:,} B (formula {formula:,.0f} B) | peak during backward "
                  f"{r['peak']:,} B (largest parameter {r['largest']:,} B)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
