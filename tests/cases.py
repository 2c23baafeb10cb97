"""Functions the worker pool runs on each rank: zeroshard beside its references.

``train_side_by_side`` trains the same case three ways on every rank: zeroshard,
torch DistributedDataParallel with the same optimizer, and single-process training
that sees every rank's batch (the mean of the per-rank losses, which is what data
parallel averages). It returns what the tests compare.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import zeroshard
from torch import nn

from grad_hooks import after_zeroshard
from models import Block, build_model, loss_fn, make_batch, runs_a_module_twice
from pool import mesh_shape
from run_record import SideBySideRun

# Stage 3 unit choices by name (the case dict must stay picklable).
UNITS = {None: None, "blocks": Block, "linear": {nn.Linear, nn.Embedding},
         "nested": lambda m: isinstance(m, (Block, nn.Sequential))}

OPTIMIZERS = {
    "SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW,
    "Adagrad": torch.optim.Adagrad, "RMSprop": torch.optim.RMSprop,
}


def param_groups(model, case):
    """None, or two groups (weights / the rest) with their own lr and weight decay."""
    if not case["groups"]:
        return None
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": weights}, {"params": others, "lr": case["opt_kwargs"]["lr"] * 0.5,
                                  "weight_decay": 0.0}]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def flat_grads(model, missing: float = 0.0) -> torch.Tensor:
    """Every parameter's gradient, flattened in ``flat_params`` order; ``missing`` where
    a parameter has none."""
    return torch.cat([p.grad.detach().reshape(-1) if p.grad is not None
                      else torch.full((p.numel(),), missing) for p in model.parameters()])


def flat_hyperparameter(model, optimizer, key: str) -> torch.Tensor:
    """Each element's value of a param-group hyperparameter (lr, weight_decay)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return torch.cat([torch.full((p.numel(),), float(group_of[id(p)].get(key, 0.0)))
                      for p in model.parameters()])


def state_bytes(optimizer) -> int:
    """Bytes of an optimizer's per-element state for trainable parameters (`step` left out;
    Adagrad allocates state for frozen parameters too, which no shard needs)."""
    return sum(t.numel() * t.element_size() for p, s in optimizer.state.items()
               if p.requires_grad for k, t in s.items()
               if isinstance(t, torch.Tensor) and k != "step")


def replicas(case) -> int:
    return mesh_shape(case["mesh"])[0] if case.get("mesh") else 1


def step_comm(stats, dimension: str) -> dict:
    """Bytes per collective along one mesh dimension (without a mesh everything runs
    along "shard"), and for "shard" the number of all-gather calls."""
    out = {op: stats.by_dim[(op, dimension)] for op in stats.bytes}
    if dimension == "shard":
        out["gather_calls"] = stats.calls["all_gather"]
    return out


def shards(case) -> int:
    """How many ways the case shards the model states: the mesh's shard dimension, else
    every rank."""
    return mesh_shape(case["mesh"])[1] if case.get("mesh") else case["world_size"]


def ddp_needs_static_graph(case) -> bool:
    """DDP accepts a parameter used in two nested backwards (reentrant checkpointing of a
    reused block, of blocks sharing a module, or of two forwards) only with a static
    graph, which breaks no_sync."""
    model = case["model"]
    return model.get("checkpoint") == "reentrant" and bool(
        runs_a_module_twice(model) or case.get("two_forwards"))


def skipping_step(case, step: int) -> bool:
    """Whether ``step`` is one where block 0 may be skipped: the odd steps, or with
    "skip_first" the first two (a block that has had no gradient yet, across a
    ``zero_grad``)."""
    return step < 2 if case.get("skip_first") else step % 2 == 1


def skips_block(case, step: int, rank: int) -> bool | str:
    """Whether ``rank`` skips the transformer's block 0 in ``step``, or runs it and drops
    its output ("discard")."""
    where = case.get("skip_block")
    if not skipping_step(case, step):
        return False
    if where == "discarded_everywhere":
        return "discard"
    return where == "everywhere" or (where == "odd_ranks" and rank % 2 == 1)


def gets_no_gradient_anywhere(case, step: int) -> bool:
    """Whether no rank gives block 0 a gradient in ``step`` (Note [ran on no rank])."""
    return (case.get("skip_block") in ("everywhere", "discarded_everywhere")
            and skipping_step(case, step))


def holding(model, flat):
    """A copy of ``model`` whose parameters hold ``flat`` (in ``flat_params`` order)."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        offset = 0
        for param in probe.parameters():
            param.copy_(flat[offset:offset + param.numel()].view_as(param))
            param.grad = None
            offset += param.numel()
    return probe


def gradient_at(model, flat, batches, spec, case, step: int, n: int) -> torch.Tensor:
    """The single-process reference's gradient for ``step``'s batches, computed as it
    computes it (every rank's micro-batch backward in turn, then / n), on a copy of
    ``model`` holding the parameters ``flat``; unclipped."""
    probe = holding(model, flat)
    for m in range(case["accum"]):
        for r in range(n):
            probe.skip_block = skips_block(case, step, r)
            (micro_loss(spec, probe, batches[m][r], case) / case["accum"]).backward()
    return flat_grads(probe) / n


def micro_loss(spec, model, batch, case):
    """One micro-batch's loss; with "two_forwards", the sum of two forwards' losses
    (the batch split in half) before one backward."""
    if not case.get("two_forwards"):
        return loss_fn(spec, model, batch)
    half = batch[0].shape[0] // 2
    first = tuple(t[:half] for t in batch)
    second = tuple(t[half:] for t in batch)
    return (loss_fn(spec, model, first) + loss_fn(spec, model, second)) / 2


def train_side_by_side(ctx, case) -> SideBySideRun:
    spec, n = case["model"], ctx.world_size
    opt_class, opt_kwargs = OPTIMIZERS[case["optimizer"]], case["opt_kwargs"]
    base = build_model(spec, seed=100 + ctx.rank)  # ranks differ: both wrappers broadcast rank 0's
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    single_model = build_model(spec, seed=100)  # rank 0's initial values

    stage3 = {}
    if case["stage"] == 3:
        stage3 = {"units": UNITS[case.get("units")],
                  "reshard_after_forward": case.get("reshard_after_forward", True)}
    zopt = zeroshard.ZeroOptimizer(zero_model, opt_class, stage=case["stage"],
                                   param_groups=param_groups(zero_model, case),
                                   bucket_size_mb=case["bucket_mb"], **ctx.zero_ranks(case.get("mesh")),
                                   **stage3, **opt_kwargs)
    ddp = DDP(ddp_model, process_group=ctx.group, static_graph=ddp_needs_static_graph(case),
              find_unused_parameters=spec.get("unused_branch", False) or bool(case.get("skip_block")))
    groups = param_groups(ddp_model, case)
    dopt = opt_class(groups if groups else ddp_model.parameters(), **opt_kwargs)
    groups = param_groups(single_model, case)
    sopt = opt_class(groups if groups else single_model.parameters(), **opt_kwargs)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7)
              for o in (zopt, dopt, sopt)] if case["scheduler"] else []

    peak_param_bytes, accumulators = [0], []  # the recorders run after zeroshard's hooks
    if case["stage"] == 3 and case["record_peak"]:
        def record_params(*_):
            peak_param_bytes[0] = max(peak_param_bytes[0], zopt.memory_report()["parameters"])
        for module in zero_model.modules():
            module.register_forward_pre_hook(record_params)
            module.register_forward_hook(record_params)
        accumulators += [after_zeroshard(p, record_params)
                         for p in zero_model.parameters() if p.requires_grad]

    peak_grad_bytes, current_step = [0], [0]
    if case["record_peak"]:
        def record(_param):  # from the second step: the first learns the launch order
            if current_step[0] >= 1:  # (Note [launch order] in zeroshard/_reducer.py)
                peak_grad_bytes[0] = max(peak_grad_bytes[0], zopt.memory_report()["gradients"])
        accumulators += [after_zeroshard(p, record)
                         for p in zero_model.parameters() if p.requires_grad]

    # What bounds each element's sensitivity to rounding (invariants.update_bounds),
    # per step, from the single-process reference: the gradient its optimizer steps on
    # (NaN where a parameter has none: the step skips it), the sum over ranks and
    # micro-batches of |each backward's contribution| (after clipping: the scale of the
    # reduction's rounding), how far the gradient moves when computed at zeroshard's or
    # DDP's parameters instead of its own (after clipping; zero at the first step, where
    # all three start equal, and for SGD, whose bounds need no interval), and each
    # element's lr and weight decay.
    out = SideBySideRun()
    # The single-process reference is the same on every rank, and its figures feed the
    # bounds (invariants.gradient_noise): ranks 0 and 1 compute it, and the moves split
    # between them, rank 0 measuring at zeroshard's parameters and rank 1 at DDP's (one
    # rank: both); the other ranks skip it. Each rank computing it all, and rank 0 both
    # moves, was three quarters of a 4-rank case's backwards.
    computes_reference = ctx.rank < 2
    moved_at = ("zero", "ddp") if n == 1 else {0: ("zero",), 1: ("ddp",)}.get(ctx.rank, ())
    measure_moved = computes_reference and case["optimizer"] != "SGD"
    optimizers = (zopt, dopt, sopt) if computes_reference else (zopt, dopt)
    def zero_params():  # stage 3 parameters are sharded between steps: gather them to read
        with zopt.summon_full_params():
            return flat_params(zero_model)

    out.initial = zero_params()
    zopt.comm_stats.trace = out.trace = []  # Note [one order] in zeroshard/stage3.py
    accum = case["accum"]
    for step in range(case["steps"]):
        current_step[0] = step
        zopt.comm_stats.reset()  # after zero_params(): summon_full_params() gathers too
        batches = [[make_batch(spec, seed=1000 * step + 10 * m + r, rank=r, batch=case["batch"])
                    for r in range(n)] for m in range(accum)]
        for model in (zero_model, ddp_model):
            model.skip_block = skips_block(case, step, ctx.rank)
        if case.get("eval_forward"):  # gathers and releases, arms no backward hooks
            # against a plain module holding zeroshard's parameters (which the other checks
            # hold to DDP's): an adaptive optimizer may have moved them a rounding-sensitive
            # step from DDP's (thorough profile: 3.6e-5 in the output after Adagrad's steps)
            plain = holding(single_model, out.zero[-1] if step else out.initial)
            plain.skip_block = skips_block(case, step, ctx.rank)
            with torch.no_grad():
                x = batches[0][ctx.rank][0]
                out.eval_diff.append((zero_model(x) - plain(x)).abs().max().item())
        zl = dl = sl = 0.0
        abs_sum = torch.zeros(out.initial.numel())
        for m in range(accum):
            skip_sync = case["no_sync"] and m < accum - 1
            with zopt.no_sync() if skip_sync else contextlib.nullcontext():
                loss = micro_loss(spec, zero_model, batches[m][ctx.rank], case) / accum
                loss.backward()
                zl += loss.item()
            with ddp.no_sync() if skip_sync else contextlib.nullcontext():
                loss = micro_loss(spec, ddp, batches[m][ctx.rank], case) / accum
                loss.backward()
                dl += loss.item()
            for r in range(n if computes_reference else 0):
                # Each rank's micro-batch backward exactly as that rank computes it (the
                # loss over accum, not over accum * n: a scale that is not a power of two
                # would round every intermediate of the backward differently); the sum
                # over ranks is divided by n below, so only the reduction order differs.
                single_model.skip_block = skips_block(case, step, r)
                loss = micro_loss(spec, single_model, batches[m][r], case) / accum
                before = flat_grads(single_model)
                loss.backward()
                abs_sum += (flat_grads(single_model) - before).abs() / n
                sl += loss.item() / n
        with torch.no_grad():
            for param in single_model.parameters():
                if param.grad is not None:
                    param.grad /= n
        moved = torch.zeros(out.initial.numel())
        if measure_moved and step > 0:
            own = flat_grads(single_model)
            for flat in (getattr(out, name)[-1] for name in moved_at):
                if not torch.equal(flat, out.single[-1]):
                    at = gradient_at(single_model, flat, batches, spec, case, step, n)
                    moved = torch.maximum(moved, (at - own).abs())
        out.mem.append(zopt.memory_report())
        if case["clip"] is not None:
            clip, norm_type = case["clip"], case["norm_type"]
            out.zero_norm.append(zopt.clip_grad_norm_(clip, norm_type).item())
            clipped = [("ddp", ddp)] + ([("single", single_model)] if computes_reference else [])
            for name, model in clipped:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type)
                getattr(out, name + "_norm").append(norm.item())
            if computes_reference:
                coefficient = min(1.0, clip / (out.single_norm[-1] + 1e-6))
                abs_sum *= coefficient
                moved *= coefficient
        if computes_reference:
            out.single_grad.append(flat_grads(single_model, missing=float("nan")))
            out.grad_abs_sum.append(abs_sum)
            out.moved_grad.append(moved)
            out.single_lr.append(flat_hyperparameter(single_model, sopt, "lr"))
            out.single_wd.append(flat_hyperparameter(single_model, sopt, "weight_decay"))
        for o in optimizers:
            o.step()
            # set_to_none=False zeroes only the gradients that exist: a block skipped
            # from the first step keeps None and is not stepped (Note [zeros only where
            # a gradient was])
            o.zero_grad(set_to_none=not case.get("zeros_kept"))
        if case.get("zeros_kept") == "then_model":  # and then None after all (a loop
            for model in (zero_model, ddp_model, single_model):  # clearing twice)
                model.zero_grad()
        for s in scheds:
            s.step()
        out.comm.append(step_comm(zopt.comm_stats, "shard"))
        out.comm_replicate.append(step_comm(zopt.comm_stats, "replicate"))
        out.zero.append(zero_params())
        out.ddp.append(flat_params(ddp_model))
        out.zero_loss.append(zl)
        out.ddp_loss.append(dl)
        if computes_reference:
            out.single.append(flat_params(single_model))
            out.single_loss.append(sl)

    trainable = [p for p in zero_model.parameters() if p.requires_grad]
    out.psi = sum(p.numel() for p in trainable)
    out.psi_all = sum(p.numel() for p in zero_model.parameters())
    out.psi_frozen_units = frozen_unit_elements(zopt, case)
    out.n_params, out.n_all_params = len(trainable), len(list(zero_model.parameters()))
    out.largest_param_bytes = max(p.numel() * 4 for p in trainable)
    out.largest_bucket_bytes = max(b.layout.padded_numel * 4 for b in zopt.sharding.buckets)
    trainable_ids = {id(b) for b in zopt.sharding.buckets}
    out.root_bucket_bytes = sum(b.layout.padded_numel * 4 for b in zopt.sharding.plan.units[0].buckets
                                if id(b) in trainable_ids) if case["stage"] == 3 else 0
    out.n_buckets = len(zopt.sharding.buckets)
    # stage 3 all-reduces 5 numbers per unit once (the recorded orders), and after each
    # synced backward the flags of agreement_flags_per_backward
    out.n_units = len(zopt.sharding.units) if case["stage"] == 3 else 0
    out.flags_per_backward = agreement_flags_per_backward(zopt, case)
    out.n_all_buckets = len(zopt.sharding.stage.buckets) if case["stage"] != 3 else sum(
        len(u.buckets) for u in zopt.sharding.units)
    out.buffer_bytes = sum(b.numel() * b.element_size() for b in zero_model.buffers())
    out.final_mem = zopt.memory_report()
    out.ddp_state_bytes = state_bytes(dopt)
    out.peak_grad_bytes = peak_grad_bytes[0]
    out.peak_param_bytes = peak_param_bytes[0]
    blocks = [m for m in zero_model.modules() if isinstance(m, Block)]
    out.block_bytes = [sum(p.numel() * 4 for p in b.parameters()) for b in blocks]
    out.lrs = [g["lr"] for g in zopt.param_groups]
    out.ddp_lrs = [g["lr"] for g in dopt.param_groups]
    return out


def check_first_step_agreements(comm: dict, expected_all_reduce: int, case: dict, step: int,
                                n_units: int) -> None:
    """``comm["all_reduce"]`` is ``expected_all_reduce`` plus, in stage 3's first step on
    several ranks, one 8-byte agreement before each step of a walk over the units, each
    gather outside one, and each end of backward (Note [first-step agreement] in
    zeroshard/_walk.py): at least one, at most one per unit per pass, per all-gather
    call and per backward."""
    extra = comm["all_reduce"] - expected_all_reduce
    if case["stage"] == 3 and step == 0 and case["world_size"] > 1:
        backwards = case["accum"]
        forwards = backwards * (2 if case.get("two_forwards") else 1) + bool(case.get("eval_forward"))
        most = n_units * (forwards + backwards) + comm["gather_calls"] + backwards
        assert extra % 8 == 0 and 1 <= extra // 8 <= most, (comm, most)
    else:
        assert extra == 0, comm


def first_step_that_differs_across_ranks(ctx, how: str):
    """Note [first-step agreement]: in the first step rank 0 runs block 0 twice (its
    Linear units rerun after others: ``how="twice"``) or runs the blocks last to first
    (``how="order"``) while the others do not. Returns the error each rank raised (None
    if none), then whether the ranks still train together on the same process group."""
    spec = {"kind": "transformer", "vocab": 13, "d": 8, "heads": 2, "layers": 2, "seq": 5,
            "tied": True, "frozen": False, "checkpoint": None, "reuse": False}
    model = build_model(spec, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=UNITS["linear"], lr=0.1)
    if ctx.rank == 0:
        model.reuse, model.reverse = how == "twice", how == "order"
    error = None
    try:
        loss_fn(spec, model, make_batch(spec, seed=0, rank=ctx.rank, batch=2)).backward()
        opt.step()
    except RuntimeError as raised:
        error = str(raised)
    del opt
    model = build_model(spec, seed=0)  # the same group, every rank alike
    with zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                 units=UNITS["linear"], lr=0.1) as opt:
        for step in range(2):
            loss_fn(spec, model, make_batch(spec, seed=step, rank=ctx.rank, batch=2)).backward()
            opt.step()
            opt.zero_grad()
    return error, True


def frozen_units(zopt, case: dict) -> list:
    """Stage 3's units other than the root that hold only frozen parameters, where it
    reshards: those a backward may leave ungathered and that the ranks compare a flag for
    (Note [frozen units backward never reads] in zeroshard/_walk.py); none elsewhere."""
    if case["stage"] != 3 or not case.get("reshard_after_forward", True):
        return []
    return [u for u in zopt.sharding.units[1:]
            if u.buckets and not any(p.requires_grad for b in u.buckets for p in b.params)]


def agreement_flags_per_backward(zopt, case: dict) -> int:
    """The 4-byte flags stage 3 all-reduces after each synced backward: one per unit
    other than the root that has gradients ("ran", Note [ran on no rank]), one per bucket
    with gradients ("late"), one per ``frozen_units`` ("backward may read it"), and the
    step count and its negation; none at stages 1-2."""
    if case["stage"] != 3:
        return 0
    units = zopt.sharding.units
    trains = sum(any(p.requires_grad for b in u.buckets for p in b.params) for u in units[1:])
    return (trains + sum(b.params[0].requires_grad for u in units for b in u.buckets)
            + len(frozen_units(zopt, case)) + 2)


def frozen_unit_elements(zopt, case: dict) -> int:
    """The elements of ``frozen_units``: what a backward may leave ungathered."""
    return sum(p.numel() for u in frozen_units(zopt, case) for b in u.buckets for p in b.params)


def average_by_hand(reference: nn.Module, ctx) -> None:
    """What DDP does to a plain reference's gradients: the mean over the ranks (a frozen
    parameter has none)."""
    for param in reference.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=ctx.group)
            param.grad /= ctx.world_size


def average_used_gradients(reference: nn.Module, ctx) -> None:
    """Data parallelism by hand where a parameter may have no gradient: one that some
    rank has gets the mean over ranks (None counting as zero), as with DDP; one that no
    rank has keeps None, so the optimizer skips it, as torch does."""
    for param in reference.parameters():
        has = torch.tensor(float(param.grad is not None))
        dist.all_reduce(has, group=ctx.group)
        if has.item() > 0:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=ctx.group)
            param.grad /= ctx.world_size


def largest_difference(opt, model: nn.Module, reference: nn.Module) -> float:
    """The largest parameter difference between zeroshard's ``model`` and ``reference``
    (DDP or a plain module), read inside summon_full_params() (stage 3's placeholders);
    NaN if any is: torch's max keeps a NaN, Python's max() drops one unless it comes first."""
    plain = getattr(reference, "module", reference)
    with opt.summon_full_params():
        return float(torch.stack([(a - b).abs().max() for a, b in zip(
            model.parameters(), plain.parameters())]).max())


def differences_per_step(ctx, model: nn.Module, opt, reference: nn.Module, ref_opt, loss_of,
                         steps: int, average: bool = True) -> list[float]:
    """``steps`` steps of ``model`` under ``opt`` and of ``reference`` under ``ref_opt``,
    each backwarding ``loss_of(net, step)``; with ``average`` the reference is a plain
    module whose gradients are averaged here, as DDP would (else it is DDP). Per step, the
    largest parameter difference. Closes ``opt``."""
    differences = []
    for step in range(steps):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            loss_of(net, step).backward()
            if net is reference and average:
                average_by_hand(reference, ctx)
            optimizer.step()
            optimizer.zero_grad()
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return differences
