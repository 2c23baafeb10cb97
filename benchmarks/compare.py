"""zeroshard next to its peers, side by side in one invocation: memory, step time, communication.

    python benchmarks/compare.py --world-size 2 --out benchmarks/results/ws2
    python benchmarks/compare.py --smoke            # tiny model, a few seconds per method
    python benchmarks/compare.py --world-size 4 --replicas 2 --methods ddp,fsdp2_hsdp,zeroshard3_hybrid

Methods (each on the same model, data and world size): DDP; DDP +
ZeroRedundancyOptimizer; FSDP1 FULL_SHARD and SHARD_GRAD_OP; FSDP2 fully_shard with
reshard_after_forward True and False; DeepSpeed ZeRO 1/2/3 (reported as skipped
when deepspeed is not installed); zeroshard stages 1/2/3, and stage 3 with
reshard_after_forward=False ("zeroshard3_no_reshard", FSDP2's no-reshard setting:
compared with stage 2, whose 2Ψ a step it moves). Hybrid sharding over a
(--replicas, world size / --replicas) DeviceMesh: FSDP2 fully_shard on the 2-D mesh
(HSDP) and zeroshard stages 1/2/3 with mesh= ("_hybrid"), compared with each other.
Muon ("_muon"): DDP with torch.optim.Muon over the blocks' matrices beside AdamW over
the rest, and zeroshard stages 1/2/3 with the same two param groups (each matrix
stepped whole by one owner), compared with each other and with AdamW alone.
The model is examples/train_gpt.py's GPT (blocks are the wrap/shard units), fp32, AdamW.

Each method runs in fresh processes (gloo on CPU, NCCL on CUDA), once for memory
and once per timing round:
- memory: the peak of the training steps: CPU: peak RSS above the RSS right after
  process-group start (the high-water mark is reset once the method's setup has
  built and sharded the model), with MALLOC_MMAP_THRESHOLD_=1048576 so freed
  buffers go back to the OS (otherwise RSS hides sharding); CUDA:
  torch.cuda.max_memory_allocated, its peak reset there too. The larger rank's
  figure is reported.
- time: the median step time over --steps steps after --warmup, without that
  setting (it slows some runs); with --rounds N, every method is timed in each of N
  rounds (order reversed every other round) and the median of its rounds reported,
  as this machine's speed drifts by tens of percent between runs.
With --trim-heap every method's model hands malloc's free heap pages back to the OS
(glibc's malloc_trim(0)) as backward enters each block. Under the memory run's fixed
mmap threshold, tensors under 1 MiB (this model's activations) live on malloc's heap,
whose freed pages stay resident: the option measures every method with that
retention taken out alike.
With --module-hooks every method's model has a full backward hook that does nothing
on each block (``register_full_backward_hook``, as a gradient-norm logger has it),
which zeroshard's stage 3 must keep gathered until the hook has run (Note [module
backward hooks] in zeroshard/stage3.py).
Communication per step is measured for zeroshard (comm_stats) and given by theory
for the peers (DESIGN.md's accounting), marked so. Output: results.json,
results.md (a markdown table with ratios to DDP and to the best peer at the same
stage) and results.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import queue
import socket
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from train_gpt import GPT, Block  # noqa: E402

# method -> (ZeRO stage it compares with, bytes moved per step in units of 4Ψ by theory;
# hybrid methods add an all-reduce of the 1/S shard across replicas)
METHODS = {
    "ddp": (0, 2), "ddp+zero_redundancy": (1, 3),
    "fsdp1_shard_grad_op": (2, 2), "fsdp1_full_shard": (3, 3),
    "fsdp2_no_reshard": (2, 2), "fsdp2_reshard": (3, 3),
    "deepspeed_zero1": (1, 2), "deepspeed_zero2": (2, 2), "deepspeed_zero3": (3, 3),
    "zeroshard1": (1, None), "zeroshard2": (2, None), "zeroshard3": (3, None),
    # stage 3 keeping its units gathered from forward to backward: FSDP2's
    # reshard_after_forward=False (2Ψ a step, parameters resharded after backward)
    "zeroshard3_no_reshard": (2, None),
    "fsdp2_hsdp": (3, 3),
    "zeroshard1_hybrid": (1, None), "zeroshard2_hybrid": (2, None), "zeroshard3_hybrid": (3, None),
    "ddp_muon": (0, 2),
    "zeroshard1_muon": (1, None), "zeroshard2_muon": (2, None), "zeroshard3_muon": (3, None),
}


def hybrid(method: str) -> bool:
    return method.endswith("_hybrid") or method == "fsdp2_hsdp"


def muon(method: str) -> bool:
    return method.endswith("_muon")


def zeroshard_stage(method: str) -> int:
    """The ``stage=`` a zeroshard method passes (METHODS gives the stage it compares with)."""
    return 3 if method == "zeroshard3_no_reshard" else METHODS[method][0]


def stage_label(method: str) -> str:
    """What a method is compared with: its ZeRO stage, hybrid or not, Muon or not."""
    return f"{METHODS[method][0]}{' hybrid' if hybrid(method) else ''}{' muon' if muon(method) else ''}"


def muon_groups(model) -> list[dict]:
    """Muon over the blocks' matrices, AdamW (the class they are given with) over the rest."""
    from train_gpt import param_groups
    return param_groups(model, SimpleNamespace(optimizer="muon", muon_lr=0.02, weight_decay=0.0))


class Optimizers:
    """Plain torch optimizers stepped as one: DDP's Muon beside its AdamW."""

    def __init__(self, *optimizers) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()
SIZES = {  # ~100M parameters (the reference size) and a smoke-test toy
    "100m": dict(vocab=16384, d_model=768, layers=12, heads=12, seq_len=64, batch=1),
    "example": dict(vocab=64, d_model=128, layers=4, heads=4, seq_len=64, batch=16),  # train_gpt.py's
    "smoke": dict(vocab=64, d_model=32, layers=2, heads=2, seq_len=16, batch=2),
}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def baseline_after_warm_up(method: str, tiny, loss_of, block) -> int:
    """Two steps of the model ``tiny`` through ``method`` first, so that the runtime's
    one-time costs (code pages, threads, gloo's buffers) fall in the baseline, not in
    the figures; then the RSS (KiB) once it is freed, which the figures are taken above.
    Every rank at once (a barrier). ``loss_of(module)``: a loss to backward."""
    module, opt, backward = setup(method, tiny, lr=1e-4, block=block)
    for _ in range(2):
        (backward or torch.Tensor.backward)(loss_of(module))
        opt.step()
        opt.zero_grad()
    del tiny, module, opt
    gc.collect()
    dist.barrier()
    return rss_kib("VmRSS")


def setup(method: str, model, lr: float, mesh=None, block=Block, foreach: bool | None = None):
    """Wrap ``model`` the way ``method`` does; return (module to call, optimizer, backward).
    ``mesh``: the (replicate, shard) DeviceMesh of the hybrid methods; ``block``: the
    module class FSDP1 wraps and zeroshard's stage 3 gathers (FSDP2 shards ``model.blocks``);
    ``foreach``: AdamW's, for every method (None: torch's default, the for-loop on CPU and
    the foreach kernels on CUDA)."""
    kwargs = {"lr": lr} if foreach is None else {"lr": lr, "foreach": foreach}
    adamw = lambda params: torch.optim.AdamW(params, **kwargs)  # noqa: E731
    if method == "ddp_muon":
        from torch.nn.parallel import DistributedDataParallel as DDP
        matrices, rest = muon_groups(model)
        return DDP(model), Optimizers(torch.optim.Muon(matrices["params"], lr=matrices["lr"]),
                                      adamw(rest["params"])), None
    if method in ("ddp", "ddp+zero_redundancy"):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model)
        opt = adamw(ddp.parameters()) if method == "ddp" else ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=torch.optim.AdamW, **kwargs)
        return ddp, opt, None
    if method.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        strategy = (ShardingStrategy.FULL_SHARD if method == "fsdp1_full_shard"
                    else ShardingStrategy.SHARD_GRAD_OP)
        device = next(model.parameters()).device  # FSDP1 runs on CPU only when told so
        fsdp = FSDP(model, sharding_strategy=strategy, auto_wrap_policy=ModuleWrapPolicy({block}),
                    use_orig_params=True, device_id=device)
        return fsdp, adamw(fsdp.parameters()), None
    if method.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard
        reshard = method in ("fsdp2_reshard", "fsdp2_hsdp")
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard, mesh=mesh)
        fully_shard(model, reshard_after_forward=reshard, mesh=mesh)
        return model, adamw(model.parameters()), None
    if method.startswith("deepspeed"):
        import deepspeed
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": int(method[-1])}}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model.parameters()),
                                                 config=config)
        return engine, engine, engine.backward
    if method.startswith("zeroshard"):
        import zeroshard
        stage = zeroshard_stage(method)
        extra = {"units": block} if stage == 3 else {}
        if method == "zeroshard3_no_reshard":
            extra["reshard_after_forward"] = False
        if mesh is not None:
            extra["mesh"] = mesh
        if muon(method):
            extra["param_groups"] = muon_groups(model)
        return model, zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, **kwargs,
                                              **extra), None
    raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")


def shares_gpus(world: int) -> bool:
    """Whether ranks share GPUs (fewer GPUs than ranks): see ``join_group``."""
    return torch.cuda.is_available() and torch.cuda.device_count() < world


def join_group(rank: int, world: int, port: int) -> torch.device:
    """Join the process group: NCCL on GPU ``rank`` where there are GPUs, else gloo.

    With fewer GPUs than ranks the ranks share them (a one-GPU machine): NCCL refuses
    two ranks on one GPU of one host, so each rank gives NCCL a host id of its own
    (NCCL_HOSTID) and the ranks talk over loopback sockets. Each process's
    max_memory_allocated still holds; step times do not (the GPU is time-sliced)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return torch.device("cpu")
    if shares_gpus(world):
        os.environ.update(NCCL_HOSTID=f"zeroshard-rank-{rank}", NCCL_SOCKET_IFNAME="lo",
                          NCCL_IB_DISABLE="1")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return device


def worker(rank: int, world: int, port: int, method: str, size: dict, args, results) -> None:
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = join_group(rank, world, port)
    cuda = device.type == "cuda"
    baseline_kib = rss_kib("VmRSS")
    torch.manual_seed(0)
    model = GPT(size["vocab"], size["d_model"], size["layers"], size["heads"], size["seq_len"]).to(device)
    psi = sum(p.numel() for p in model.parameters())
    mesh = None
    if hybrid(method):
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (args.replicas, world // args.replicas),
                                mesh_dim_names=("replicate", "shard"))
    if args.trim_heap:
        trim_heap_in_backward(model.blocks)
    if args.module_hooks:
        for block in model.blocks:
            block.register_full_backward_hook(lambda module, grad_input, grad_output: None)
    module, opt, backward = setup(method, model, lr=1e-4, mesh=mesh, foreach=args.foreach)
    # The peak of the training steps, not of building the model whole on each rank and
    # sharding it (DESIGN.md: the high-water mark is reset after setup; CUDA's peak was
    # never reset, so at 8 ranks stage 3's would have been its construction's).
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times, comm = [], None
    for step in range(args.warmup + args.steps):
        if hasattr(opt, "comm_stats"):
            opt.comm_stats.reset()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(module(x).reshape(-1, size["vocab"]), y.reshape(-1))
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        if hasattr(opt, "comm_stats"):  # the gathers and reductions (a mesh: both dimensions)
            by_dim = opt.comm_stats.by_dim
            comm = (by_dim[("all_gather", "shard")] + by_dim[("reduce_scatter", "shard")]
                    + by_dim[("all_reduce", "replicate")])
    peak = (torch.cuda.max_memory_allocated() if cuda
            else (rss_kib("VmHWM") - baseline_kib) * 1024)
    report = opt.memory_report() if hasattr(opt, "memory_report") else None
    sharding = opt.sharding_report() if hasattr(opt, "sharding_report") else None
    results.put({"rank": rank, "peak_bytes": peak, "step_s": statistics.median(times), "psi": psi,
                 "comm_bytes": comm, "memory_report": report, "sharding_report": sharding})
    dist.barrier()
    dist.destroy_process_group()


def trim_heap_in_backward(blocks) -> None:
    """--trim-heap: glibc's malloc_trim(0) as backward enters each of ``blocks``: a hook
    on the block's output, not a module backward hook, which would keep zeroshard's
    stage-3 units gathered to backward's end (Note [module backward hooks])."""
    malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc's; the option is Linux/glibc only

    def trim(grad) -> None:
        malloc_trim(0)

    def on_output(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(trim)
    for block in blocks:
        block.register_forward_hook(on_output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(method: str, world: int, size: dict, args, measure_memory: bool) -> list[dict]:
    """One fresh process group for one method; per-rank results."""
    return spawn_ranks(worker, world, (free_port_cache[0], method, size, args), args.timeout,
                       measure_memory)


def spawn_ranks(target, world: int, target_args: tuple, timeout: float,
                measure_memory: bool) -> list[dict]:
    """Run ``target(rank, world, *target_args, results)`` in ``world`` fresh processes
    (each puts one dict on ``results``); their dicts in rank order. A rank that dies, or
    no answer within ``timeout`` seconds, kills them all and raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env_key = "MALLOC_MMAP_THRESHOLD_"
    if measure_memory:
        os.environ[env_key] = "1048576"  # read by glibc at process start: set before spawning
    try:
        procs = [ctx.Process(target=target, args=(r, world, *target_args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        out, deadline = [], time.monotonic() + timeout
        while len(out) < world:
            try:
                out.append(results.get(timeout=1))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a rank exited with code {dead[0]}" if dead
                                       else f"no result within {timeout}s") from None
        for p in procs:
            p.join(timeout=60)
        return sorted(out, key=lambda r: r["rank"])
    finally:
        os.environ.pop(env_key, None)


free_port_cache = [0]


def device_name(world: int) -> str:
    """The GPU and how the ranks sit on it, for the results' header; '' on CPU."""
    if not torch.cuda.is_available():
        return ""
    name = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
    if shares_gpus(world):
        name += ("ranks sharing GPUs (NCCL over loopback sockets, GPU time-sliced: step "
                 "times are not comparable, peak memory per process is), ")
    return name


def formula_bytes(stage: int, psi: int, n: int) -> dict:
    """fp32 AdamW model states per rank (DESIGN.md)."""
    return {"parameters": 4 * psi / (n if stage == 3 else 1),
            "gradients": 4 * psi + 4 * psi / n if stage == 1 else 4 * psi / n,
            "optimizer_states": 8 * psi / n}


def summarise(rows: list[dict], world: int, replicas: int) -> str:
    mib = 2**20
    shards = world // replicas
    by_name = {r["method"]: r for r in rows if "error" not in r}
    ddp = by_name.get("ddp")
    lines = ["| method | ZeRO stage | peak memory MiB | × DDP | × best peer (same stage) | "
             "median step s | × DDP | × best peer (same stage) | comm MiB/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {stage_label(r['method'])} | skipped: {r['error']} "
                         "| | | | | | |")
            continue
        stage = stage_label(r["method"])
        peers = [p for name, p in by_name.items() if stage_label(name) == stage
                 and not name.startswith("zeroshard") and name != r["method"]]
        best_mem = min((p["peak_bytes"] for p in peers), default=None)
        best_time = min((p["step_s"] for p in peers), default=None)
        ratio = lambda a, b: f"{a / b:.2f}" if b else "—"  # noqa: E731
        if r["comm_bytes"] is not None:
            comm = f"{r['comm_bytes'] / mib:.1f} (measured)"
        else:
            theory = METHODS[r["method"]][1] + (1 / shards if hybrid(r["method"]) else 0)
            comm = f"{theory * 4 * r['psi'] / mib:.1f} (theory)"
        lines.append(
            f"| {r['method']} | {stage} | {r['peak_bytes'] / mib:.0f} | "
            f"{ratio(r['peak_bytes'], ddp and ddp['peak_bytes'])} | {ratio(r['peak_bytes'], best_mem)} | "
            f"{r['step_s']:.3f} | {ratio(r['step_s'], ddp and ddp['step_s'])} | "
            f"{ratio(r['step_s'], best_time)} | {comm} |")
    lines += ["", "zeroshard's memory_report() after the last step (rank 0) next to the formula:", "",
              "| method | parameters | gradients | optimizer states | formula (p / g / s) | worst deviation |",
              "|---|---|---|---|---|---|"]
    for r in rows:  # the formula is AdamW's: not the Muon rows'
        if r["method"].startswith("zeroshard") and not muon(r["method"]) and "error" not in r:
            stage, rep = zeroshard_stage(r["method"]), r["memory_report"]
            f = formula_bytes(stage, r["psi"], shards if hybrid(r["method"]) else world)
            # after zero_grad() the gradient shards are gone; compare the other two
            worst = max(abs(rep[k] - f[k]) / f[k] for k in ("parameters", "optimizer_states"))
            lines.append(f"| {r['method']} | {rep['parameters']:,} | {rep['gradients']:,} | "
                         f"{rep['optimizer_states']:,} | {f['parameters']:,.0f} / {f['gradients']:,.0f} / "
                         f"{f['optimizer_states']:,.0f} | {worst:.2%} |")
    lines += muon_against_adamw(by_name)
    return "\n".join(lines)


def muon_against_adamw(by_name: dict) -> list[str]:
    """Muon (blocks' matrices) + AdamW beside AdamW alone, per stage: step time, bytes
    moved, and how evenly the ranks share Muon's work (sharding_report)."""
    pairs = [(a, m) for a, m in [("ddp", "ddp_muon")] + [(f"zeroshard{s}", f"zeroshard{s}_muon")
                                                          for s in (1, 2, 3)]
             if a in by_name and m in by_name]
    if not pairs:
        return []
    lines = ["", "Muon + AdamW against AdamW alone (same stage, same run):", "",
             "| stage | step s AdamW | step s Muon+AdamW | × | comm MiB AdamW | comm MiB Muon+AdamW | × "
             "| Muon work max/mean | elements max/mean | stored / stepped elements |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def mib(row) -> float | None:
        return row["comm_bytes"] / 2**20 if row["comm_bytes"] is not None else None

    def cell(value, digits: int) -> str:
        return "—" if value is None else f"{value:.{digits}f}"
    for adamw, with_muon in pairs:
        a, m = by_name[adamw], by_name[with_muon]
        report = m.get("sharding_report")
        imbalance = report["imbalance"] if report else {}
        work = next((v for k, v in imbalance.items() if "Muon" in k), None)
        comm_ratio = mib(m) / mib(a) if mib(a) and mib(m) else None
        lines.append(" | ".join([
            f"| {METHODS[adamw][0]}", cell(a["step_s"], 3), cell(m["step_s"], 3),
            cell(m["step_s"] / a["step_s"], 2), cell(mib(a), 1), cell(mib(m), 1),
            cell(comm_ratio, 3), cell(work, 3), cell(imbalance.get("elements"), 3),
            cell(report and report["padding"], 3)]) + " |")
    return lines


def chart(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "results.png skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if "error" not in r]
    names = [r["method"] for r in ok]
    colors = ["tab:orange" if n.startswith("zeroshard") else "tab:blue" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    a.barh(names, [r["peak_bytes"] / 2**20 for r in ok], color=colors)
    a.set_xlabel("peak memory per rank (MiB)")
    b.barh(names, [r["step_s"] for r in ok], color=colors)
    b.set_xlabel("median step time (s)")
    for ax in (a, b):
        ax.invert_yaxis()
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"wrote {path}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2,
                   help="replicas of the hybrid methods' (replicate, shard) mesh")
    p.add_argument("--size", choices=sorted(SIZES), default="100m")
    p.add_argument("--smoke", action="store_true", help="--size smoke --steps 2 --warmup 1")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="timing rounds over all methods; step time is the median of the rounds'")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest")
    p.add_argument("--foreach", action="store_const", const=True, default=None,
                   help="every method's AdamW with foreach=True (CUDA's default; CPU's is the "
                        "for-loop)")
    p.add_argument("--trim-heap", action="store_true",
                   help="every method hands malloc's free heap pages back to the OS as "
                        "backward enters each block (glibc's malloc_trim)")
    p.add_argument("--module-hooks", action="store_true",
                   help="every method's model with a full backward hook that does nothing on "
                        "each block")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.warmup = "smoke", 2, 1
    size, world = SIZES[args.size], args.world_size
    if world % args.replicas:
        p.error(f"--replicas {args.replicas} does not divide --world-size {world}")
    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    rows = {method: {"method": method} for method in methods}
    for method in methods:
        if method.startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except ImportError as error:
                rows[method]["error"] = f"deepspeed not installed ({error.name})"
                print(f"{method}: skipped (deepspeed not installed)", flush=True)
    # Memory once per method; time in --rounds rounds, each over every method, the order
    # reversed every other round: this machine's speed drifts between runs, and a method
    # timed only once takes whatever the machine gave it then.
    # On CUDA the peak (max_memory_allocated) needs no allocator setting that slows
    # the steps, so the memory run is also the first timing round; so it is in a smoke
    # run, whose times mean nothing (it checks that each method runs and reports).
    cuda = torch.cuda.is_available()
    timed_with_memory = cuda or args.smoke
    passes = [(True, methods)] + [(False, methods[::-1] if i % 2 else methods)
                                  for i in range(args.rounds - (1 if timed_with_memory else 0))]
    for measure_memory, order in passes:
        for method in order:
            row = rows[method]
            if "error" in row:
                continue
            try:
                free_port_cache[0] = free_port()
                per_rank = run(method, world, size, args, measure_memory)
            except Exception as error:  # noqa: BLE001 - one method failing must not hide the others
                rows[method] = {"method": method, "error": f"{type(error).__name__}: {error}"[:200]}
                print(f"{method}: {rows[method]['error']}", flush=True)
                continue
            if measure_memory:
                row["peak_bytes"] = max(r["peak_bytes"] for r in per_rank)
                print(f"{method}: peak {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
                if not timed_with_memory:
                    continue
            row.setdefault("step_s_rounds", []).append(max(r["step_s"] for r in per_rank))
            row.update(step_s=statistics.median(row["step_s_rounds"]), psi=per_rank[0]["psi"],
                       comm_bytes=per_rank[0]["comm_bytes"],
                       memory_report=per_rank[0]["memory_report"],
                       sharding_report=per_rank[0]["sharding_report"])
            print(f"{method}: step {row['step_s_rounds'][-1]:.3f} s "
                  f"(round {len(row['step_s_rounds'])} of {args.rounds})", flush=True)
    rows = list(rows.values())
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = summarise(rows, world, args.replicas)
    header = (f"{command}\n\nmodel: examples/train_gpt.py GPT {size}, "
              f"Ψ = {next((r['psi'] for r in rows if 'psi' in r), 0):,} parameters, fp32 AdamW"
              f"{' (foreach=True)' if args.foreach else ''}"
              f"{', every method trimming the heap in backward' if args.trim_heap else ''}"
              f"{', a module backward hook on each block' if args.module_hooks else ''}, "
              f"{world} ranks, {'CUDA/NCCL' if cuda else 'CPU/gloo'}, "
              f"{device_name(world)}"
              f"torch {torch.__version__}, {os.cpu_count()} cores; step time: median over "
              f"{args.rounds} round(s) of every method, alternating order (each round's in "
              "results.json)\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "size": size,
                                                       "world_size": world, "rows": rows}, indent=1))
    (args.out / "results.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)
    print(chart(rows, args.out / "results.png"))


if __name__ == "__main__":
    main()
