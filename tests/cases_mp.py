"""Mixed precision on each rank: zeroshard beside a reference that follows the same recipe.

The reference is torch DDP over a low-precision copy of the model (parameters and
buffers cast to ``param_dtype``), with fp32 master weights kept here: after each
backward the masters take the DDP-reduced gradients (widened to fp32), a plain
torch optimizer steps the masters, and the model copy takes their cast values.
For an fp32 reduction of bf16 gradients DDP cannot be the reducer (its reduced
gradients land in the bf16 ``.grad`` again), so there DDP runs under ``no_sync``
and the test averages the widened local gradients with one fp32 all-reduce.
With fp16 both sides use ``torch.amp.GradScaler`` the ordinary way. A third model
trains in fp32 on the global batch, for the losses to track.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import zeroshard
from cases import (OPTIMIZERS, UNITS, agreement_flags_per_backward, flat_params,
                   frozen_unit_elements, step_comm)
from models import build_model, loss_fn, make_batch
from rss import rss_kib

PRECISIONS = {  # name -> (param_dtype, reduce_dtype)
    "bf16": (torch.bfloat16, None),
    "bf16_reduce_fp32": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, None),
}
INIT_SCALE = 2.0**8  # small models: no overflow unless the test injects one


def fp32_average(tensors, group) -> None:
    """Average fp32 tensors over the ranks of ``group`` in place, in fp32."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def low_precision_loss(spec, model, batch, dtype, cast: bool):
    """The loss in fp32 from a low-precision forward. ``cast``: cast the input to
    ``dtype`` and the output to fp32 here (zeroshard's policy does it for its model)."""
    x, y = batch
    if cast and x.is_floating_point():
        x = x.to(dtype)
    out = model(x)
    if cast:
        out = out.float()
    if spec["kind"] == "mlp":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def inject_inf(model):
    """Make the first trainable parameter's gradient infinite (this rank, this backward)."""
    param = next(p for p in model.parameters() if p.requires_grad)
    return param.register_hook(lambda grad: grad * float("inf"))


def train_mixed_precision(ctx, case):
    spec, n, rank = case["model"], ctx.world_size, ctx.rank
    param_dtype, reduce_dtype = PRECISIONS[case["precision"]]
    fp16 = param_dtype == torch.float16
    opt_class, opt_kwargs = OPTIMIZERS[case["optimizer"]], case["opt_kwargs"]

    zero_model = build_model(spec, seed=100 + rank)  # ranks differ: zeroshard broadcasts rank 0's
    policy = zeroshard.MixedPrecision(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                      buffer_dtype=param_dtype, output_dtype=torch.float32)
    stage3 = {"units": UNITS[case["units"]]} if case["stage"] == 3 else {}
    zopt = zeroshard.ZeroOptimizer(zero_model, opt_class, stage=case["stage"],
                                   bucket_size_mb=case["bucket_mb"], mixed_precision=policy,
                                   **ctx.zero_ranks(case.get("mesh")), **stage3, **opt_kwargs)

    ref_model = build_model(spec, seed=100)  # rank 0's values
    trainable = [p for p in ref_model.parameters() if p.requires_grad]
    masters = [p.detach().clone() for p in trainable]
    ref_model.to(param_dtype)
    ddp = DDP(ref_model, process_group=ctx.group, find_unused_parameters=spec["unused_branch"]
              if spec["kind"] == "mlp" else False)
    ddp_reduces = reduce_dtype is None
    mopt = opt_class(masters, **opt_kwargs)

    fp32_model = build_model(spec, seed=100)
    fopt = opt_class(fp32_model.parameters(), **opt_kwargs)

    zscaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=fp16)
    rscaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=fp16)

    def zero_state():
        masters_by_id = zopt.sharding.gather_masters()
        zmasters = torch.cat([masters_by_id[id(p)].reshape(-1) for p in zero_model.parameters()
                              if p.requires_grad])
        with zopt.summon_full_params():
            return zmasters.clone(), flat_params(zero_model)

    out = {k: [] for k in ("zero_masters", "ref_masters", "zero_params", "ref_params",
                           "zero_loss", "ref_loss", "fp32_loss", "zero_norm", "ref_norm",
                           "zero_scale", "ref_scale", "comm", "mem", "state_sum")}
    accum = case["accum"]
    for step in range(case["steps"]):
        zopt.comm_stats.reset()
        batches = [[make_batch(spec, seed=1000 * step + 10 * m + r, rank=r, batch=case["batch"])
                    for r in range(n)] for m in range(accum)]
        injecting = case["inject_inf_step"] == step and rank == n - 1
        handles = [inject_inf(zero_model), inject_inf(ref_model)] if injecting else []
        zl = rl = fl = 0.0
        for m in range(accum):
            skip_sync = case["no_sync"] and m < accum - 1
            with zopt.no_sync() if skip_sync else contextlib.nullcontext():
                loss = low_precision_loss(spec, zero_model, batches[m][rank], param_dtype,
                                          cast=False) / accum
                zscaler.scale(loss).backward()
                zl += loss.item()
            with ddp.no_sync() if skip_sync or not ddp_reduces else contextlib.nullcontext():
                loss = low_precision_loss(spec, ddp, batches[m][rank], param_dtype,
                                          cast=True) / accum
                rscaler.scale(loss).backward()
                rl += loss.item()
            for r in range(n):
                loss = loss_fn(spec, fp32_model, batches[m][r]) / (accum * n)
                loss.backward()
                fl += loss.item()
        for handle in handles:
            handle.remove()
        out["mem"].append(zopt.memory_report())  # after backward, before the step

        for master, param in zip(masters, trainable):
            master.grad = torch.zeros_like(master) if param.grad is None else param.grad.float()
        if not ddp_reduces:
            fp32_average([m.grad for m in masters], ctx.group)
        zscaler.unscale_(zopt)
        rscaler.unscale_(mopt)
        if case["clip"] is not None:
            out["zero_norm"].append(zopt.clip_grad_norm_(case["clip"]).item())
            out["ref_norm"].append(torch.nn.utils.clip_grad_norm_(masters, case["clip"]).item())
            torch.nn.utils.clip_grad_norm_(fp32_model.parameters(), case["clip"])
        zscaler.step(zopt)
        rscaler.step(mopt)
        zscaler.update()
        rscaler.update()
        if case["inject_inf_step"] != step:  # the step both scalers skip
            fopt.step()
        for o in (zopt, mopt, fopt):
            o.zero_grad()
        ddp.zero_grad(set_to_none=True)
        with torch.no_grad():
            for master, param in zip(masters, trainable):
                param.copy_(master)

        out["comm"].append(step_comm(zopt.comm_stats, "shard"))
        zmasters, zparams = zero_state()
        out["zero_masters"].append(zmasters)
        out["zero_params"].append(zparams)
        out["ref_masters"].append(torch.cat([m.reshape(-1) for m in masters]).clone())
        out["ref_params"].append(flat_params(ref_model))
        out["zero_loss"].append(zl)
        out["ref_loss"].append(rl)
        out["fp32_loss"].append(fl)
        out["zero_scale"].append(zscaler.get_scale() if fp16 else None)
        out["ref_scale"].append(rscaler.get_scale() if fp16 else None)
        out["state_sum"].append(sum(float(t.double().sum()) for s in zopt.sharding.inner.state.values()
                                    for t in s.values() if isinstance(t, torch.Tensor)))

    out["final_mem"] = zopt.memory_report()
    out["psi"] = sum(p.numel() for p in zero_model.parameters() if p.requires_grad)
    out["psi_all"] = sum(p.numel() for p in zero_model.parameters())
    out["psi_frozen_units"] = frozen_unit_elements(zopt, case)
    out["n_buckets"] = len(zopt.sharding.buckets)
    out["n_params"] = sum(p.requires_grad for p in zero_model.parameters())
    out["n_all_params"] = len(list(zero_model.parameters()))
    # stage 3 all-reduces 5 numbers per unit once (the recorded orders), and after each
    # synced backward the flags of agreement_flags_per_backward
    out["n_units"] = len(zopt.sharding.units) if case["stage"] == 3 else 0
    out["flags_per_backward"] = agreement_flags_per_backward(zopt, case)
    out["n_all_buckets"] = len(zopt.sharding.stage.buckets) if case["stage"] != 3 else sum(
        len(u.buckets) for u in zopt.sharding.units)
    out["param_dtypes"] = sorted({str(p.dtype) for p in zero_model.parameters()})
    out["adam_state_bytes"] = 8 * out["psi"]  # exp_avg + exp_avg_sq in fp32, full model
    return out


# How the forward computes beside a GradScaler (train_autocast_fp16): under fp16 autocast
# around the call; under an fp16 autocast that wraps model.forward itself (as Accelerate
# applies it: the model's hooks run outside it); under bf16 autocast; in fp32.
COMPUTES = ("fp16", "fp16_inside_forward", "bf16", "fp32")


def train_autocast_fp16(ctx, case):
    """fp32 parameters, a forward computing as ``case["compute"]`` says (default fp16
    autocast), GradScaler: zeroshard beside DDP. The last rank's gradient gets an inf at
    step 1; both must skip that step everywhere."""
    spec, n, rank = case["model"], ctx.world_size, ctx.rank
    compute = case.get("compute", "fp16")
    zero_model = build_model(spec, seed=100 + rank)
    ddp_model = build_model(spec, seed=100)
    zopt = zeroshard.ZeroOptimizer(zero_model, torch.optim.SGD, stage=case["stage"],
                                   process_group=ctx.group, lr=0.05, momentum=0.9)
    ddp = DDP(ddp_model, process_group=ctx.group)
    dopt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) for _ in range(2)]
    if compute == "fp16_inside_forward":
        for model in (zero_model, ddp_model):
            model.forward = torch.autocast("cpu", dtype=torch.float16)(model.forward)
    around_the_call = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(compute)
    out = {"zero": [], "ddp": [], "zero_scale": [], "ddp_scale": []}
    for step in range(3):
        batch = make_batch(spec, seed=1000 * step, rank=rank, batch=3)
        injecting = step == 1 and rank == n - 1
        handles = [inject_inf(zero_model), inject_inf(ddp_model)] if injecting else []
        for model, opt, scaler in ((zero_model, zopt, scalers[0]), (ddp, dopt, scalers[1])):
            with torch.autocast("cpu", dtype=around_the_call or torch.float16,
                                enabled=around_the_call is not None):
                out_ = model(batch[0])
            loss = F.cross_entropy(out_.float().reshape(-1, out_.shape[-1]), batch[1].reshape(-1))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        for handle in handles:
            handle.remove()
        with zopt.summon_full_params():
            out["zero"].append(flat_params(zero_model))
        out["ddp"].append(flat_params(ddp_model))
        out["zero_scale"].append(scalers[0].get_scale())
        out["ddp_scale"].append(scalers[1].get_scale())
    return out


def autocast_stage3_holds_no_casts(ctx, layers: int, width: int):
    """Stage 3 with fp32 parameters under bf16 autocast (no policy), beside DDP under the
    same autocast: the parameters after three steps, and how much memory a training forward
    leaves behind for backward (Note [autocast casts]: no bf16 copy of released units)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    zero_model, ddp_model = make(), make()
    ddp_model.load_state_dict(zero_model.state_dict())
    zopt = zeroshard.ZeroOptimizer(zero_model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                   units=nn.Linear, lr=0.05, momentum=0.9)
    ddp = DDP(ddp_model, process_group=ctx.group)
    dopt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
    retained = []
    for step in range(3):  # the first is a warm-up: one-time allocations, orders recorded
        x = torch.randn(4, width, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        for model, opt in ((zero_model, zopt), (ddp, dopt)):
            gc.collect()
            before = rss_kib("VmRSS")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            if model is zero_model and step > 0:
                retained.append((rss_kib("VmRSS") - before) * 1024)
            loss.backward()
            opt.step()
            opt.zero_grad()
    with zopt.summon_full_params():
        zero = flat_params(zero_model)
    return {"zero": zero, "ddp": flat_params(ddp_model), "retained": retained,
            "unit_cast_bytes": width * width * 2}


def autocast_reused_block(ctx, units: str):
    """Stage 3 under bf16 autocast (no policy), block 0 run twice per forward (ALBERT
    style): a weight cast once per autocast region gets its two uses' gradients added
    in bf16, as under DDP (Note [autocast casts]). Returns the largest parameter
    difference to DDP after three SGD steps."""
    spec = {"kind": "transformer", "vocab": 50, "d": 32, "heads": 2, "layers": 2, "seq": 8,
            "tied": True, "frozen": False, "reuse": True}
    zero_model, ddp_model = build_model(spec, seed=3 + ctx.rank), build_model(spec, seed=3)
    zopt = zeroshard.ZeroOptimizer(zero_model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                   units=UNITS[units], lr=0.05, momentum=0.9)
    ddp = DDP(ddp_model, process_group=ctx.group)
    dopt = torch.optim.SGD(ddp_model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        batch = make_batch(spec, seed=step, rank=ctx.rank, batch=4)
        for model, opt in ((zero_model, zopt), (ddp, dopt)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(spec, model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
    with zopt.summon_full_params():
        return (flat_params(zero_model) - flat_params(ddp_model)).abs().max().item()


class _ComplexMix(nn.Module):
    """A complex weight (a spectral layer's) over the features picked by a frozen
    integer index (a permutation, ``requires_grad=False``): no real floating-point
    parameter, so under a policy the model computes alike with and without it but for
    the input's cast."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = nn.Parameter(torch.randperm(6), requires_grad=False)
        self.weight = nn.Parameter(0.3 * torch.randn(6, 4, dtype=torch.cfloat))

    def forward(self, x):
        return (x[:, self.pick].to(self.weight.dtype) @ self.weight).abs()


_MLP = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
        "unused_branch": False}


def a_policy_over_an_fp64_model(ctx, stage: int, param_dtype: torch.dtype) -> dict:
    """An fp64 MLP under ``MixedPrecision(param_dtype)`` beside DDP over an fp64 copy,
    AdamW, 3 steps on each rank's batch (cast to ``param_dtype`` on DDP's side, as the
    policy casts zeroshard's). With ``param_dtype=torch.float64`` the policy casts
    nothing, yet the masters were fp32 and every step rounded the weights to fp32
    (helper-128: 3e-8 from plain AdamW after 3 steps). Returns the masters' dtypes, the
    parameters' dtypes after close(), and (fp64 only) the largest difference from DDP."""
    model, reference = build_model(_MLP, seed=0), build_model(_MLP, seed=0)
    model.double(), reference.double()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                  process_group=ctx.group,
                                  mixed_precision=zeroshard.MixedPrecision(
                                      param_dtype=param_dtype, buffer_dtype=param_dtype),
                                  **({"units": nn.Linear} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):
        x, y = make_batch(_MLP, seed=step, rank=ctx.rank, batch=4)
        loss_fn(_MLP, model, (x.double(), y)).float().backward()
        opt.step()
        opt.zero_grad()
        loss_fn(_MLP, ddp, (x.double(), y)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    masters = sorted({str(t.dtype) for g in opt.param_groups for t in g["params"]})
    opt.close()
    difference = max((p - q).abs().max().item()
                     for p, q in zip(model.parameters(), reference.parameters()))
    return {"masters": masters, "closed": sorted({str(p.dtype) for p in model.parameters()}),
            "difference": difference if param_dtype == torch.float64 else None}


def complex_and_integer_parameters(ctx, stage: int, policy: bool) -> dict:
    """``_ComplexMix`` under ZeroOptimizer (with a bf16 policy, or none) and under DDP,
    each rank's inputs cast to bf16 on both sides when there is a policy, SGD with
    momentum, clipped by 0.1 each step (torch's clip_grad_norm_ on DDP's side). A policy
    dropped the complex weight's imaginary part and rounded the index to bf16; stage 3
    could not be built over the integer parameter; clipping a complex gradient raised
    (a helper's probes). Returns the norms, the per-step parameter differences, and the
    parameters' dtypes and values as ``close()`` hands them back next to the originals."""
    torch.manual_seed(0)
    model = _ComplexMix()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = _ComplexMix()
    reference.load_state_dict(model.state_dict())
    mixed = zeroshard.MixedPrecision(param_dtype=torch.bfloat16) if policy else None
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9,
                                  process_group=ctx.group, mixed_precision=mixed,
                                  **({"units": None} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    outcome = {"norms": [], "differences": []}
    for step in range(3):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        model(x).square().mean().backward()
        ddp(x.to(torch.bfloat16) if policy else x).square().mean().backward()
        outcome["norms"].append((float(opt.clip_grad_norm_(0.1)), float(
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))))
        for optimizer in (opt, ref_opt):
            optimizer.step()
            optimizer.zero_grad()
        with opt.summon_full_params():
            outcome["differences"].append(max(
                float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters())))
    # save_full_model with a dtype casts the real floating-point parameters only (it
    # wrote the complex weight and the index as bf16, and without a dtype it knew no
    # complex dtype: a reviewer's probe)
    folder = Path(tempfile.gettempdir()) / f"zeroshard-complex-{os.getppid()}-{stage}-{policy}"
    zeroshard.save_full_model(folder, model, opt, dtype=torch.bfloat16)
    if ctx.rank == 0:
        saved = safetensors.torch.load_file(folder / "model.safetensors")
        outcome["saved"] = {name: (saved[name].dtype, bool(torch.equal(saved[name], p.detach())))
                            for name, p in reference.named_parameters()}
        shutil.rmtree(folder)
    opt.close()
    outcome["kept"] = {name: (p.dtype, original[name].dtype,
                              bool(torch.equal(p, original[name])) if name == "pick" else None)
                       for name, p in model.named_parameters()}
    return outcome


def ema_in_full_precision(ctx, stage: int, steps: int = 4, decay: float = 0.9) -> dict:
    """An fp32 EMA teacher (DINO's) under a bf16 policy, updated inside
    ``summon_full_params(full_precision=True)``, and a write made there (the weights
    halved at step 1); beside it the reference of ``train_mixed_precision`` (DDP over a
    bf16 copy, fp32 masters kept here) with its EMA updated from its masters and the
    same write on them. Returns the largest differences of the EMAs, of the masters, and
    the dtypes the parameters had inside the block."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    model = build_model(spec, seed=100)
    policy = zeroshard.MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16,
                                      output_dtype=torch.float32)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                  mixed_precision=policy, process_group=ctx.group,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    reference = build_model(spec, seed=100)
    masters = [p.detach().clone() for p in reference.parameters()]
    reference.to(torch.bfloat16)
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.AdamW(masters, lr=1e-2)
    with opt.summon_full_params(full_precision=True):
        ema = [p.detach().clone() for p in model.parameters()]
        dtypes = {str(p.dtype) for p in model.parameters()}
    ref_ema = [m.clone() for m in masters]
    for step in range(steps):
        batch = make_batch(spec, seed=1000 * step, rank=ctx.rank, batch=4)
        low_precision_loss(spec, model, batch, torch.bfloat16, cast=False).backward()
        low_precision_loss(spec, ddp, batch, torch.bfloat16, cast=True).backward()
        for master, param in zip(masters, reference.parameters()):
            master.grad = param.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        ddp.zero_grad(set_to_none=True)
        with opt.summon_full_params(full_precision=True), torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - decay)
            if step == 1:
                for p in model.parameters():
                    p.mul_(0.5)
        with torch.no_grad():
            for e, master in zip(ref_ema, masters):
                e.lerp_(master, 1 - decay)
            if step == 1:
                for master in masters:
                    master.mul_(0.5)
            for master, param in zip(masters, reference.parameters()):
                param.copy_(master)
    zero_masters = opt.sharding.gather_masters()
    result = {
        "ema": max(float((a - b).abs().max()) for a, b in zip(ema, ref_ema)),
        "masters": max(float((zero_masters[id(p)] - m).abs().max())
                       for p, m in zip(model.parameters(), masters)),
        "dtypes": sorted(dtypes), "ema_dtype": str(ema[0].dtype)}
    with opt.summon_full_params():
        result["params"] = max(float((p.float() - q.float()).abs().max())
                               for p, q in zip(model.parameters(), reference.parameters()))
        result["outside_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    opt.close()
    return result


def full_precision_block_edges(ctx, stage: int) -> dict:
    """What a reviewer's probes found around ``summon_full_params(full_precision=True)``:
    a write made in a plain block, then a full-precision block nested inside it (stage 3
    undid the write); ``full_state_dict()`` inside a full-precision block after a write
    there (it read the masters without it); a load and a step inside (the load was
    undone at stages 1-2; the step crashed at stage 3). Returns the differences and the
    refusals."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  mixed_precision=zeroshard.MixedPrecision(param_dtype=torch.bfloat16),
                                  process_group=ctx.group,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    model(torch.randn(3, 4)).float().sum().backward()
    opt.step()
    opt.zero_grad()
    weight = model[0].weight
    start = opt.sharding.gather_masters()[id(weight)].clone()
    with opt.summon_full_params(), torch.no_grad():
        weight.mul_(2)  # a bf16 write, exact (a power of two)
        with opt.summon_full_params(full_precision=True):
            seen = weight.clone()
    doubled = start.to(torch.bfloat16).float() * 2  # what the bf16 write put there
    out = {"nested_seen": float((seen - doubled).abs().max()),
           "nested_kept": float((opt.sharding.gather_masters()[id(weight)] - doubled).abs().max())}
    with opt.summon_full_params(full_precision=True), torch.no_grad():
        weight.mul_(1 / 3)  # not exact in bf16: only the fp32 master holds it
        full = opt.full_state_dict()
    expected = doubled * (1 / 3)
    out["saved_inside"] = None if full is None else float((full[0]["0.weight"] - expected).abs().max())
    refusals = {}
    for what, action in (("step", opt.step), ("load", lambda: opt.load_full_state_dict(
            {k: v.float() for k, v in model.state_dict().items()} if stage != 3 else None))):
        try:
            with opt.summon_full_params(full_precision=True):
                action()
            refusals[what] = None
        except RuntimeError as error:
            refusals[what] = str(error)
    out["refusals"] = refusals
    out["after"] = float((opt.sharding.gather_masters()[id(weight)] - expected).abs().max())
    opt.close()
    return out


def gradients_taken_as_they_come(ctx, stage: int, shown: str | None) -> tuple[list, bool]:
    """Note [a new accumulator after a change of dtype] (zeroshard/_reducer.py): a bf16
    policy, a bucket per parameter, and a ``summon_full_params(full_precision=True)``
    block, as an EMA teacher's update has it: ``shown`` "before" training, "between"
    each forward and its backward, or None. When the first layer's weight gets its
    gradient, the last in backward, a hook the user registered there records, per step,
    whether each later layer's parameter still holds its full gradient in ``.grad``
    (the stage's store takes each as it comes). Also returns whether every parameter
    moved from its first value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    policy = zeroshard.MixedPrecision(param_dtype=torch.bfloat16)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                  mixed_precision=policy, bucket_size_mb=1e-6,
                                  process_group=ctx.group, **({"units": nn.Linear} if stage == 3 else {}))
    others = [*model[2].parameters(), *model[4].parameters()]
    held: list[list[bool]] = []
    model[0].weight.register_post_accumulate_grad_hook(
        lambda _: held.append([p.grad is not None for p in others]))
    with opt.summon_full_params():  # the casts: no change of dtype
        first = [p.detach().clone() for p in model.parameters()]
    if shown == "before":
        with opt.summon_full_params(full_precision=True):
            pass
    for step in range(2):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        loss = model(x).float().square().mean()
        if shown == "between":
            with opt.summon_full_params(full_precision=True):
                pass
        loss.backward()
        opt.step()
        opt.zero_grad()
    with opt.summon_full_params():
        moved = all(not torch.equal(a, p) for a, p in zip(first, model.parameters()))
    opt.close()
    return held, moved


class _SharedMask(nn.Module):
    """One buffer registered in two modules: ``writer`` moves it in each training forward
    (a running statistic), ``reader`` scales by it."""

    def __init__(self) -> None:
        super().__init__()
        self.writer, self.reader = nn.Linear(4, 4), nn.Linear(4, 2)
        shared = torch.zeros(4)
        self.writer.register_buffer("mask", shared)
        self.reader.register_buffer("mask", shared)

    def forward(self, x):
        h = self.writer(x)
        if self.training:
            with torch.no_grad():
                self.writer.mask.mul_(0.5).add_(h.detach().abs().mean(0), alpha=0.5)
        return self.reader(h * (1 + self.reader.mask.to(h.dtype)))


def a_buffer_shared_by_two_modules(ctx, stage: int) -> dict:
    """A ``buffer_dtype`` policy over ``_SharedMask``: after two steps and after
    ``close()``, whether the two modules still hold one tensor, and the reader's buffer
    against the writer's."""
    torch.manual_seed(0)
    model = _SharedMask()
    opt = zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=stage, lr=0.1, process_group=ctx.group,
        mixed_precision=zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16))
    for step in range(2):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    out = {"one tensor": model.reader.mask is model.writer.mask,
           "difference": (model.reader.mask - model.writer.mask).abs().max().item(),
           "moved": model.writer.mask.abs().max().item()}
    opt.close()
    out["one tensor after close"] = model.reader.mask is model.writer.mask
    out["dtype after close"] = model.reader.mask.dtype
    return out


def accumulation_against_fsdp2(ctx, stage: int, no_sync: bool) -> float:
    """Four micro-batches a step under a bf16 policy (default reduce dtype, bf16), with
    ``no_sync()`` around the first three or a synced backward each, against FSDP2 with
    the same policy (``fully_shard`` over the root, the same micro-batches and syncs).
    Returns the largest difference of the fp32 masters from FSDP2's sharded parameters
    after three SGD steps with momentum. (Note [reduced gradients summed in fp32] in
    zeroshard/stage2.py: each synced micro-batch's reduced gradient was added to a bf16
    shard, where FSDP2 sums in fp32: helper-102's probe.)"""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))

    def batches(step):
        for k in range(4):
            g = torch.Generator().manual_seed(100 * step + 10 * k + ctx.rank)
            yield k, torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)

    model = build()
    opt = zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=stage, lr=0.05, momentum=0.9, process_group=ctx.group,
        bucket_size_mb=1e-3, mixed_precision=zeroshard.MixedPrecision(
            torch.bfloat16, output_dtype=torch.float32))
    reference = build()
    fully_shard(reference, mesh=DeviceMesh.from_group(ctx.group, "cpu"),
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.bfloat16,
                                               output_dtype=torch.float32))
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        for k, x, y in batches(step):
            synced = not no_sync or k == 3
            with contextlib.nullcontext() if synced else opt.no_sync():
                (F.mse_loss(model(x), y) / 4).backward()
            reference.set_requires_gradient_sync(synced)
            (F.mse_loss(reference(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
        reference_opt.step()
        reference_opt.zero_grad()
    with opt.summon_full_params(full_precision=True):
        mine = [p.detach().clone() for p in model.parameters()]
    theirs = [p.full_tensor().detach() for p in reference.parameters()]
    opt.close()
    return max((a - b).abs().max().item() for a, b in zip(mine, theirs))


def scaler_after_gradients_replaced(ctx, replace: bool) -> list[float]:
    """Stage 2 under a bf16 policy with a GradScaler; in the second step rank 1's reduced
    gradients overflow (made inf through ``opt.param_groups``), and the param groups'
    gradients are then replaced out of place (``p.grad = p.grad * 1.0``: noise added so)
    before ``scaler.unscale_(opt)``. Returns what each step's check found on this rank:
    every rank must find the overflow and skip that step alike (a helper's probe: the
    replaced tensors lost the ranks' agreement, rank 1 skipped alone and rank 0 waited
    in the step's all-gather)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=2, lr=0.01, bucket_size_mb=1e-4, process_group=ctx.group,
        mixed_precision=zeroshard.MixedPrecision(torch.bfloat16, output_dtype=torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    found = []
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + ctx.rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        for group in opt.param_groups:
            for p in group["params"]:
                if step == 1 and ctx.rank == 1:
                    p.grad.mul_(float("inf"))
                if replace:
                    p.grad = p.grad * 1.0
        scaler.unscale_(opt)
        found.append(sum(v.item() for v in
                         scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    opt.close()
    return found


def state_dicts_that_warn(ctx, stage: int, policy: bool) -> dict:
    """Which ways of reading the model's state dict after a step warn that it holds
    ``param_dtype`` values (Note [a state dict in param_dtype]), and the dtypes of the
    parameters' values in each."""
    import warnings

    model = build_model({"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2,
                         "frozen": False, "unused_branch": False}, seed=0)
    opt = zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=stage, lr=0.1, process_group=ctx.group,
        mixed_precision=zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16)
        if policy else None)
    model(torch.randn(4, 5)).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    at_stage3 = opt.summon_full_params if stage == 3 else contextlib.nullcontext
    readings = {
        "full_state_dict": lambda: (opt.full_state_dict() or ({},))[0],  # collective
        "keep_vars": lambda: _inside(at_stage3(), lambda: model.state_dict(keep_vars=True)),
        "full_precision block": lambda: _inside(opt.summon_full_params(full_precision=True),
                                                model.state_dict),
        "state_dict": lambda: _inside(at_stage3(), model.body.state_dict),  # a child's
        "state_dict again": lambda: _inside(at_stage3(), model.state_dict),
    }
    out = {}
    for name, read in readings.items():  # in this order: the plain one comes after the others
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = read()
        warned = [str(w.message) for w in caught if "MixedPrecision policy" in str(w.message)]
        names = {n.removeprefix("body.") for n, _ in model.named_parameters()} | set(
            dict(model.named_parameters()))
        out[name] = (bool(warned), sorted({str(v.dtype) for k, v in state.items() if k in names}))
        out[name + " from"] = [w.filename for w in caught]
    opt.close()
    return out


def _inside(block, read):
    with block:
        return {k: v.detach().clone() for k, v in read().items()}
