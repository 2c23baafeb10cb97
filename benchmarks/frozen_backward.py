"""Fine-tuning the top of a GPT at stage 3: what each method gathers and how long a step takes.

    python benchmarks/frozen_backward.py --methods ddp,fsdp2_reshard,zeroshard3 --rounds 3

The example GPT (examples/train_gpt.py) with its embeddings (the head is tied to the
token embedding) and its first --frozen-blocks blocks frozen, the rest trained: no
backward reads the frozen blocks, so FSDP2 (which gathers in backward only what a
gradient reaches) and zeroshard (Note [frozen units backward never reads] in
zeroshard/_walk.py) leave them out of backward's all-gathers. fp32 AdamW, CPU/gloo,
fresh processes per method and round, the order alternating; per method the median
step time over the rounds (each round's median over --steps steps after --warmup),
the step's RSS peak above the RSS before the model was built (MALLOC_MMAP_THRESHOLD_=
1048576), and for zeroshard the all-gathered bytes of a step from comm_stats. The larger
rank's figures. CPU only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import (GPT, Block, baseline_after_warm_up, free_port, rss_kib, setup,  # noqa: E402
                     spawn_ranks)


def frozen_gpt(args) -> GPT:
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq_len)
    for module in (model.tok, model.pos, *model.blocks[:args.frozen_blocks]):
        module.requires_grad_(False)
    return model


def worker(rank: int, world: int, port: int, method: str, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokens = lambda n, seed: torch.randint(0, args.vocab, (args.batch, n),  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed))
    tiny = GPT(args.vocab, 32, 1, 2, args.seq_len)
    baseline = baseline_after_warm_up(
        method, tiny, lambda module: module(tokens(8, rank)).square().mean(), Block)
    torch.manual_seed(0)
    module, opt, backward = setup(method, frozen_gpt(args), lr=1e-4, block=Block)
    backward = backward or torch.Tensor.backward
    stats = getattr(opt, "comm_stats", None)
    times, gathered, peak = [], [], 0
    for step in range(args.warmup + args.steps):
        idx = tokens(args.seq_len + 1, 10 * step + rank)
        if stats is not None:
            stats.reset()
        dist.barrier()
        start = time.perf_counter()
        logits = module(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        backward(loss)
        opt.step()
        opt.zero_grad()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            peak = max(peak, (rss_kib("VmHWM") - baseline) / 1024)
            if stats is not None:
                gathered.append(stats.bytes["all_gather"])
        del logits, loss
    results.put({"rank": rank, "step": statistics.median(times), "peak": peak,
                 "gathered": max(gathered) if gathered else None})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ddp,fsdp2_reshard,zeroshard3")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frozen-blocks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=None, help="a folder for results.md")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    runs: dict[str, list[list[dict]]] = {m: [] for m in methods}
    for round_ in range(args.rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            runs[method].append(spawn_ranks(worker, args.world_size, (free_port(), method, args),
                                            args.timeout, measure_memory=True))
            print(method, runs[method][-1], flush=True)
    step = {m: statistics.median(max(r["step"] for r in out) for out in runs[m]) for m in methods}
    peak = {m: max(max(r["peak"] for r in out) for out in runs[m]) for m in methods}
    lines = ["| method | step's peak MiB | median step s | × ddp | × fsdp2_reshard | all-gather MiB/step |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        ratio = lambda peer: f"{step[m] / step[peer]:.2f}" if peer in step else "—"  # noqa: E731
        gathered = runs[m][0][0]["gathered"]
        gathered = None if gathered is None else gathered / 2**20
        lines.append(f"| {m} | {peak[m]:.0f} | {step[m]:.3f} | {ratio('ddp')} | "
                     f"{ratio('fsdp2_reshard')} | "
                     f"{'—' if gathered is None else f'{gathered:.1f} (measured)'} |")
    command = "python benchmarks/frozen_backward.py " + " ".join(sys.argv[1:] if argv is None else argv)
    model = frozen_gpt(args)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    text = (f"{command}\n\nexamples/train_gpt.py GPT (vocab {args.vocab}, d_model {args.d_model}, "
            f"{args.layers} layers), {total:,} parameters of which {frozen:,} frozen (embeddings, "
            f"tied head, blocks 0-{args.frozen_blocks - 1}), fp32 AdamW, {args.world_size} ranks, "
            f"CPU/gloo, torch {torch.__version__}; the larger rank, median over {args.rounds} "
            f"round(s) of {args.steps} steps after {args.warmup}\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps(
            {"command": command, "frozen": frozen, "total": total,
             "frozen_blocks": sum(p.numel() for b in model.blocks[:args.frozen_blocks]
                                  for p in b.parameters()),
             "rows": [{"method": m, "step_s": step[m], "peak_mib": peak[m],
                       "all_gather_bytes": runs[m][0][0]["gathered"]} for m in methods]}, indent=1))


if __name__ == "__main__":
    main()
