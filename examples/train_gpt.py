"""Train a small GPT with zeroshard: the three-line change from a plain training loop.

    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --stage 2
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --stage 3 --precision bf16
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --stage 2 --precision fp16
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --save-dir ckpt --save-every 50
    torchrun --standalone --nproc_per_node=4 examples/train_gpt.py --save-dir ckpt --resume --stage 3 --steps 200
    torchrun --standalone --nproc_per_node=4 examples/train_gpt.py --stage 3 --replicas 2
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --stage 2 --optimizer muon

A checkpoint saved on any number of ranks at any stage resumes on any other (the
resumed run above goes on to step 200; with the default --steps it would find the
saved run finished).
``--optimizer muon`` trains the blocks' matrices with torch.optim.Muon and the rest
(embeddings, head, norms, biases) with AdamW: one ZeroOptimizer, two param groups;
each matrix is orthogonalised once, by the rank that owns it.
``--replicas R`` shards over a (R, world size / R) DeviceMesh: R replicas, each
holding the model states sharded over its ranks (hybrid sharding). Across two
machines of two ranks each, replicating across the machines (the same command on
each machine):

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST0:29500 --rdzv-id=gpt examples/train_gpt.py --replicas 2

Runs on CPU with gloo by default (about a minute on 2 cores; fp16, which CPUs compute
slowly, about ten times as long) and on CUDA with NCCL when GPUs are present. The data is generated here: sequences from a fixed random
Markov chain, so the loss has a known floor to fall towards (its entropy,
printed at the start) and no download is needed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import zeroshard

# -- defaults: small enough for ~1 minute on 2 CPU cores ------------------------------
DEFAULTS = dict(stage=1, precision="fp32", steps=150, batch_size=16, seq_len=64, vocab=64, d_model=128, layers=4,
                heads=4, lr=3e-3, weight_decay=0.1, clip=1.0, bucket_mb=1.0, log_every=25, seed=0,
                optimizer="adamw", muon_lr=0.02)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied input and output embeddings
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class MarkovData:
    """Token streams from a fixed random Markov chain with peaked transitions."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = 3.0 * torch.randn(vocab, vocab, generator=g)
        self.probs = logits.softmax(-1)  # next token | previous token
        self.vocab = vocab

    def entropy(self) -> float:
        """Nats per token of the chain: the lowest loss a model can reach (approximately)."""
        return float(-(self.probs * self.probs.clamp_min(1e-12).log()).sum(-1).mean())

    def batch(self, batch_size: int, seq_len: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=g)
        for t in range(1, seq_len + 1):
            tokens[:, t] = torch.multinomial(self.probs[tokens[:, t - 1]], 1, generator=g).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--save-dir", default="", help="checkpoint folder (zeroshard.save_checkpoint)")
    p.add_argument("--save-every", type=int, default=0, help="save every K steps (0: never)")
    p.add_argument("--resume", action="store_true", help="resume from --save-dir if it holds one")
    p.add_argument("--replicas", type=int, default=1,
                   help="hybrid sharding: this many replicas, each sharding over world size / "
                        "replicas ranks (1: shard over every rank)")
    p.add_argument("--export", default="", help="at the end, torch.save a plain PyTorch "
                   "(model_state_dict, optimizer_state_dict) here (opt.full_state_dict())")
    p.set_defaults(**DEFAULTS)
    args = p.parse_args(argv)
    if (args.save_every or args.resume) and not args.save_dir:
        p.error("--save-every and --resume need --save-dir")
    if args.stage not in (1, 2, 3):
        p.error(f"--stage must be 1, 2 or 3, got {args.stage}")
    if args.optimizer not in ("adamw", "muon"):
        p.error(f"--optimizer must be adamw or muon, got {args.optimizer}")
    if args.precision not in PRECISIONS:
        p.error(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision}")
    return args


# fp32: no policy. bf16/fp16: parameters in that dtype, fp32 master shards; the logits
# come back in fp32 for the loss. fp16 needs loss scaling (GradScaler, below).
PRECISIONS = {
    "fp32": None,
    "bf16": zeroshard.MixedPrecision(param_dtype=torch.bfloat16, output_dtype=torch.float32),
    "fp16": zeroshard.MixedPrecision(param_dtype=torch.float16, output_dtype=torch.float32),
}


def param_groups(model: GPT, args):
    """None (AdamW for everything), or with ``--optimizer muon`` Muon for the blocks'
    matrices and AdamW for the embeddings, the head, the norms and the biases."""
    if args.optimizer == "adamw":
        return None
    matrices = [m.weight for block in model.blocks for m in block.modules() if isinstance(m, nn.Linear)]
    chosen = {id(p) for p in matrices}
    return [{"params": matrices, "optimizer_class": torch.optim.Muon, "lr": args.muon_lr,
             "weight_decay": args.weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in chosen]}]


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.replicas:
        raise SystemExit(f"--replicas {args.replicas} does not divide the {world} ranks")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(args.seed + rank)  # ranks may differ: ZeroOptimizer broadcasts rank 0's
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq_len).to(device)
    # The three-line change: a ZeroOptimizer over the plain model, instead of DDP + AdamW.
    options = {"units": Block} if args.stage == 3 else {}  # stage 3 gathers one block at a time
    if args.replicas > 1:  # torchrun numbers a machine's ranks together: with --replicas
        # equal to the number of machines, each machine is one replica
        options["mesh"] = init_device_mesh(device.type, (args.replicas, world // args.replicas),
                                           mesh_dim_names=("replicate", "shard"))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=args.stage, lr=args.lr,
                                  weight_decay=args.weight_decay, bucket_size_mb=args.bucket_mb,
                                  mixed_precision=PRECISIONS[args.precision],
                                  param_groups=param_groups(model, args), **options)
    # fp16 gradients underflow without loss scaling; the ordinary GradScaler works as is.
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    data = MarkovData(args.vocab, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        layout = f" as {args.replicas} replicas x {world // args.replicas}" if args.replicas > 1 else ""
        print(f"zeroshard stage {args.stage}, {args.precision}, {args.optimizer} | {world} ranks{layout} "
              f"on {device.type} ({'nccl' if cuda else 'gloo'}) | {n_params / 1e6:.2f}M parameters | "
              f"loss floor ~{data.entropy():.3f} nats", flush=True)
        if args.optimizer == "muon":  # each matrix has one owner: how even is the split?
            imbalance = opt.sharding_report()["imbalance"]
            print("  work per rank, max/mean: " + ", ".join(
                f"{name.split('.')[-1]} {value:.3f}" for name, value in imbalance.items()), flush=True)

    first_step = 0
    if args.resume and os.path.exists(os.path.join(args.save_dir, "LATEST")):
        state = zeroshard.load_checkpoint(args.save_dir, model, opt)
        first_step = state["step"]
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if rank == 0:
            print(f"resumed from {args.save_dir} at step {first_step}", flush=True)

    tokens_per_step = args.batch_size * args.seq_len * world
    start, loss_sum, loss_count, comm = time.perf_counter(), 0.0, 0, None
    for step in range(first_step, args.steps):
        x, y = data.batch(args.batch_size, args.seq_len, seed=args.seed * 1_000_003 + step * world + rank)
        x, y = x.to(device), y.to(device)
        opt.comm_stats.reset()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, args.vocab), y.reshape(-1))
        scaler.scale(loss).backward()
        log = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        memory = opt.memory_report() if log else None  # after backward: gradients are live
        scaler.unscale_(opt)
        opt.clip_grad_norm_(args.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        comm = dict(opt.comm_stats.by_dim)  # bytes per (collective, mesh dimension)
        if args.save_every and (step + 1) % args.save_every == 0:
            # The data is a function of the step, so the step is all the loader needs.
            zeroshard.save_checkpoint(args.save_dir, model, opt, extra={
                "step": step + 1, "scheduler": sched.state_dict(), "scaler": scaler.state_dict()})
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if rank == 0:
            done = (step + 1) / args.steps
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            elapsed = time.perf_counter() - start
            print(f"\r[{bar}] step {step + 1}/{args.steps} loss {loss.item():.3f} "
                  f"{tokens_per_step * (step + 1 - first_step) / elapsed:,.0f} tok/s", end="",
                  flush=True)
            if log:
                print(f"\n  mean loss {loss_sum / loss_count:.3f} | after backward: "
                      + ", ".join(f"{k} {mib(v)}" for k, v in memory.items()), flush=True)
                loss_sum, loss_count = 0.0, 0
    if args.export:
        exported = opt.full_state_dict()  # collective: every rank calls it
        if rank == 0:
            torch.save(exported, args.export)
    if rank == 0 and comm is not None:
        param_bytes = 4 if args.precision == "fp32" else 2
        across = (f", all_reduce across replicas {mib(comm[('all_reduce', 'replicate')])}"
                  if args.replicas > 1 else "")
        print(f"comm per step: all_gather {mib(comm[('all_gather', 'shard')])}, reduce_scatter "
              f"{mib(comm[('reduce_scatter', 'shard')])}, all_reduce {comm[('all_reduce', 'shard')]} B"
              f"{across} (the parameters in {args.precision}: {mib(n_params * param_bytes)})",
              flush=True)
    dist.destroy_process_group()



if __name__ == "__main__":
    sys.exit(main())
