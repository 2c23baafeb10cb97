"""How a checkpoint's load time grows with the number of buckets (Note [a checkpoint
file read once] in zeroshard/_file_pages.py), next to FSDP2's with
torch.distributed.checkpoint on the same model.

    python benchmarks/checkpoint_load.py [--layers 48,96,192] [--width 256]

A stack of ``layers`` x (Linear(width, width), LayerNorm(width)), fp32 AdamW, one step,
then a save and a load into the same model and optimizer; 2 ranks, CPU/gloo, fresh
processes per row, the slower rank's seconds. zeroshard stage 2 with
``bucket_size_mb=1`` (a bucket per MiB of parameters, so a model of N MiB has about N
buckets, as a 25 MB bucket of a 7B model makes about 1,100); FSDP2 (``fully_shard``
on each pair, then the root) saves and loads ``get_state_dict`` / ``set_state_dict``
through ``torch.distributed.checkpoint``. To time another version of zeroshard, put
it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402

import zeroshard  # noqa: E402


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
                           for _ in range(layers)))


def _zeroshard(model, folder: str) -> tuple:
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3, bucket_size_mb=1)
    step = lambda: opt.step()  # noqa: E731
    save = lambda: zeroshard.save_checkpoint(folder, model, opt)  # noqa: E731
    load = lambda: zeroshard.load_checkpoint(folder, model, opt)  # noqa: E731
    return step, save, load, len(opt.sharding.every_bucket)


def _fsdp2(model, folder: str) -> tuple:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    for block in model:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def save():
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=folder)

    def load():
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return opt.step, save, load, None


def worker(rank: int, world: int, port: int, method: str, layers: int, width: int,
           folder: str, results) -> None:
    compare.join_group(rank, world, port)
    model = _model(layers, width)
    step, save, load, buckets = (_zeroshard if method == "zeroshard2" else _fsdp2)(model, folder)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    step()
    dist.barrier()
    start = time.perf_counter()
    save()
    dist.barrier()
    saved = time.perf_counter() - start
    start = time.perf_counter()
    load()
    loaded = time.perf_counter() - start
    results.put({"rank": rank, "save": saved, "load": loaded, "buckets": buckets})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="48,96,192")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    print(f"python benchmarks/checkpoint_load.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"zeroshard from {os.path.dirname(zeroshard.__file__)}; layers x (Linear({args.width}, "
          f"{args.width}), LayerNorm), fp32 AdamW, 2 ranks, CPU/gloo, torch {torch.__version__}; "
          "seconds, the slower rank\n")
    print("| layers | parameters | zeroshard2 buckets | zeroshard2 save | zeroshard2 load | "
          "FSDP2 + DCP save | FSDP2 + DCP load | load x FSDP2 |")
    print("|---|---|---|---|---|---|---|---|")
    for layers in (int(n) for n in args.layers.split(",")):
        row = {}
        for method in ("zeroshard2", "fsdp2"):
            with tempfile.TemporaryDirectory() as folder:
                per_rank = compare.spawn_ranks(
                    worker, 2, (compare.free_port(), method, layers, args.width, folder),
                    args.timeout, measure_memory=False)
            row[method] = {key: max(r[key] for r in per_rank) for key in ("save", "load")}
            row[method]["buckets"] = per_rank[0]["buckets"]
        parameters = sum(p.numel() for p in _model(layers, args.width).parameters())
        z, f = row["zeroshard2"], row["fsdp2"]
        print(f"| {layers} | {parameters / 1e6:.1f}M | {z['buckets']} | {z['save']:.2f} | "
              f"{z['load']:.2f} | {f['save']:.2f} | {f['load']:.2f} | {z['load'] / f['load']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
