"""A LoRA-like model's backward: how much of its frozen base each method gathers at once.

    python benchmarks/lora_backward.py --methods ddp,fsdp2_reshard,zeroshard3
    python benchmarks/lora_backward.py --checkpointing   # each block under checkpoint()

Blocks of a frozen pre-norm MLP (LayerNorm, Linear(W, 4W), Linear(4W, W)) with a
trainable rank-8 adapter beside each Linear, as LoRA puts it, and a trainable head;
fp32 AdamW, CPU/gloo, fresh processes per method with MALLOC_MMAP_THRESHOLD_=1048576 (so
freed buffers leave RSS at once). After --warmup full steps, the RSS high-water mark of
each measured backward above the RSS at its start (stage 3 and FSDP gather in
backward, so this is what they gather at once, plus the activations' gradients), and
the step's peak above the RSS before the model was built (after a tiny model's two
steps through the same method, as memory_breakdown.py warms the runtime up). The
larger rank's figures.
CPU only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import baseline_after_warm_up, free_port, rss_kib, setup, spawn_ranks  # noqa: E402


class LoraBlock(nn.Module):
    def __init__(self, width: int, rank: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.requires_grad_(False)  # the base; the adapters below train
        self.down1, self.up1 = nn.Linear(width, rank, bias=False), nn.Linear(rank, 4 * width, bias=False)
        self.down2, self.up2 = nn.Linear(4 * width, rank, bias=False), nn.Linear(rank, width, bias=False)

    def forward(self, h):
        x = self.norm(h)
        x = torch.relu(self.fc1(x) + self.up1(self.down1(x)))
        return h + self.fc2(x) + self.up2(self.down2(x))


class LoraModel(nn.Module):
    def __init__(self, width: int, blocks: int, checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LoraBlock(width) for _ in range(blocks))
        self.head = nn.Linear(width, width)
        self.checkpointing = checkpointing

    def forward(self, h):
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointing else block(h)
        return self.head(h)


def worker(rank: int, world: int, port: int, method: str, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    baseline = baseline_after_warm_up(method, LoraModel(64, 2, args.checkpointing),
                                      lambda module: module(torch.randn(2, 4, 64)).square().mean(),
                                      LoraBlock)
    torch.manual_seed(0)
    model = LoraModel(args.width, args.blocks, args.checkpointing)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    module, opt, backward = setup(method, model, lr=1e-4, block=LoraBlock)
    backward = backward or torch.Tensor.backward
    x = torch.randn(args.batch, args.tokens, args.width, generator=torch.Generator().manual_seed(rank))
    backward_peaks, step_peak = [], 0
    for step in range(args.warmup + args.steps):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the high-water mark starts again from the current RSS
        loss = module(x).square().mean()
        forward_peak = rss_kib("VmHWM")
        start = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        backward(loss)
        backward_peak = rss_kib("VmHWM")
        opt.step()
        opt.zero_grad()
        del loss
        if step >= args.warmup:
            backward_peaks.append((backward_peak - start) / 1024)
            step_peak = max(step_peak, (max(forward_peak, rss_kib("VmHWM")) - baseline) / 1024)
    results.put({"rank": rank, "backward": max(backward_peaks), "step": step_peak,
                 "frozen": frozen / 2**20})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ddp,fsdp2_reshard,zeroshard3")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--checkpointing", action="store_true", help="each block under checkpoint()")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=None, help="a folder for results.md")
    args = p.parse_args(argv)
    lines = ["| method | backward's peak above its start, MiB | step's peak, MiB |", "|---|---|---|"]
    frozen = None
    for method in args.methods.split(","):
        out = spawn_ranks(worker, args.world_size, (free_port(), method, args), args.timeout,
                          measure_memory=True)
        frozen = out[0]["frozen"]
        lines.append(f"| {method} | {max(r['backward'] for r in out):.0f} | "
                     f"{max(r['step'] for r in out):.0f} |")
        print(lines[-1], flush=True)
    command = "python benchmarks/lora_backward.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"{command}\n\n{args.blocks} blocks of width {args.width}, {frozen:.0f} MiB of frozen "
            f"weights in all, {args.world_size} ranks, fp32 AdamW, CPU/gloo, torch "
            f"{torch.__version__}; the larger rank, the worst of {args.steps} steps after "
            f"{args.warmup}\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "results_checkpointing.md" if args.checkpointing else "results.md"
        (args.out / name).write_text(text)


if __name__ == "__main__":
    main()
