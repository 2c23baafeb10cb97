"""Checkpoint cases run on each rank: save on N ranks at stage S, resume on M ranks at stage T.

Every step trains on the same global batch, split evenly over the ranks, so runs on
different world sizes see the same data and a resumed run can be compared with one
that loads the same state another way.
"""

from __future__ import annotations

import collections
import math
import os

import torch

import zeroshard
from cases import UNITS
from models import build_model, loss_fn, make_batch

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
OPTIMIZERS = {"SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
              "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
              "AdamW fused": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "fused": True}),
              # stepped whole by their owners (Note [whole-parameter ownership])
              "Adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
              "Muon+AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})}
MUON = (torch.optim.Muon, {"lr": 0.02})  # for the Linear weights in "Muon+AdamW"


def param_groups(cfg, model):
    """None, or for "Muon+AdamW" Muon over the Linear weights and AdamW over the rest."""
    if cfg["optimizer"] != "Muon+AdamW":
        return None
    weights = {id(m.weight): m.weight for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in weights]
    return [{"params": list(weights.values()), "optimizer_class": MUON[0], **MUON[1]},
            {"params": rest}]


def plain_optimizers(cfg, model, optim_sd: dict) -> list[torch.optim.Optimizer]:
    """Plain torch optimizers over ``model``'s groups holding ``optim_sd`` (a full state
    dict: one index space over every group), one per group's class."""
    groups = param_groups(cfg, model)
    opt_class, kwargs = OPTIMIZERS[cfg["optimizer"]]
    if groups is None:
        plain = opt_class(model.parameters(), **kwargs)
        plain.load_state_dict(optim_sd)
        return [plain]
    out, first = [], 0
    for group, saved_group in zip(groups, optim_sd["param_groups"]):
        cls, own = (group["optimizer_class"], {}) if "optimizer_class" in group else (opt_class, kwargs)
        plain = cls(group["params"], **own)
        indices = saved_group["params"]
        plain.load_state_dict({
            "state": {i - first: optim_sd["state"][i] for i in indices if i in optim_sd["state"]},
            "param_groups": [{**saved_group, "params": [i - first for i in indices]}]})
        first += len(indices)
        out.append(plain)
    return out


def global_batch(spec, step: int):
    return make_batch(spec, seed=7919 * step, rank=0, batch=GLOBAL_BATCH)


def my_part(batch, rank: int, world_size: int):
    per_rank = GLOBAL_BATCH // world_size
    return tuple(t[rank * per_rank:(rank + 1) * per_rank] for t in batch)


def _with_table(model, shape: tuple | None):
    """``model`` with a buffer "table" of ``shape`` (None: as it is)."""
    if shape:
        model.register_buffer("table", torch.arange(float(math.prod(shape))).reshape(shape))
    return model


def build(ctx, cfg, side: str, seed: int):
    """Model and ZeroOptimizer for the saving ("save") or loading ("load") side."""
    spec = cfg["model"]
    model = _with_table(build_model(spec, seed=seed), cfg[side].get("table"))
    opt_class, kwargs = OPTIMIZERS[cfg["optimizer"]]
    extra = {}
    if cfg[side]["stage"] == 3:
        extra["units"] = UNITS[cfg[side].get("units")]
    if cfg[side].get("bf16"):
        extra["mixed_precision"] = zeroshard.MixedPrecision(
            torch.bfloat16, buffer_dtype=torch.bfloat16, output_dtype=torch.float32)
    extra.update(ctx.zero_ranks(cfg[side].get("mesh")))  # the pool's mesh, or its group
    opt = zeroshard.ZeroOptimizer(model, opt_class, stage=cfg[side]["stage"],
                                  param_groups=param_groups(cfg, model),
                                  bucket_size_mb=cfg[side]["bucket_mb"], **extra, **kwargs)
    return model, opt


def train(ctx, cfg, model, opt, start: int, steps: int) -> None:
    spec = cfg["model"]
    for step in range(start, start + steps):
        # equal parts: the ranks' mean of their mean losses is the global batch's mean loss
        loss_fn(spec, model, my_part(global_batch(spec, step), ctx.rank, ctx.world_size)).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()


def full_params(model, opt) -> list[torch.Tensor]:
    with opt.summon_full_params():
        return [p.detach().float().clone() for p in model.parameters()]


def train_and_save(ctx, cfg, folder: str) -> dict:
    """Train, save a checkpoint and the full state dict, then go on training; on rank 0
    also continue a plain model + optimizer from the full state dict on the global batch."""
    model, opt = build(ctx, cfg, "save", seed=ctx.rank)
    train(ctx, cfg, model, opt, 0, cfg["steps_before"])
    zeroshard.save_checkpoint(folder, model, opt, extra={"step": cfg["steps_before"], "rank": ctx.rank})
    full = opt.full_state_dict()
    if ctx.rank == 0:
        torch.save(full, os.path.join(folder, "..", "full.pt"))
    train(ctx, cfg, model, opt, cfg["steps_before"], cfg["steps_after"])
    out = {"continued": full_params(model, opt)}
    if ctx.rank == 0 and not cfg["save"].get("bf16"):
        spec = cfg["model"]
        plain = _with_table(build_model(spec, seed=999), cfg["save"].get("table"))
        plain.load_state_dict(full[0])
        plain_opts = plain_optimizers(cfg, plain, full[1])
        for step in range(cfg["steps_before"], cfg["steps_before"] + cfg["steps_after"]):
            loss_fn(spec, plain, global_batch(spec, step)).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            for plain_opt in plain_opts:
                plain_opt.step()
                plain_opt.zero_grad()
        out["plain"] = [p.detach().clone() for p in plain.parameters()]
    return out


def resume_two_ways(ctx, cfg, folder: str) -> dict:
    """On this world size and stage: load the checkpoint into one fresh run and the full
    state dict into another; both must hold the same state and train identically."""
    model_a, opt_a = build(ctx, cfg, "load", seed=1000 + ctx.rank)
    extra = zeroshard.load_checkpoint(folder, model_a, opt_a)
    model_b, opt_b = build(ctx, cfg, "load", seed=2000 + ctx.rank)
    opt_b.load_full_state_dict(*torch.load(os.path.join(folder, "..", "full.pt"), weights_only=False))
    state_a, state_b = opt_a.full_state_dict(), opt_b.full_state_dict()
    loaded = {"a": full_params(model_a, opt_a), "b": full_params(model_b, opt_b)}
    train(ctx, cfg, model_a, opt_a, cfg["steps_before"], cfg["steps_after"])
    train(ctx, cfg, model_b, opt_b, cfg["steps_before"], cfg["steps_after"])
    return {"extra": extra, "state_a": state_a, "state_b": state_b, "loaded": loaded,
            "a": full_params(model_a, opt_a), "b": full_params(model_b, opt_b),
            "lr": opt_a.param_groups[0]["lr"]}


def load_bad_checkpoint(ctx, cfg, folder: str, which: str) -> dict:
    """Damage or mismatch one thing; loading must raise on every rank and change nothing."""
    if which == "other_model":
        cfg = {**cfg, "model": {**cfg["model"], "hidden": cfg["model"]["hidden"] + 1}}
    model, opt = build(ctx, cfg, "load", seed=3000 + ctx.rank)
    if which == "other_classes":  # the checkpoint has Muon's state for the Linear weights
        groups = [{k: v for k, v in g.items() if k not in ("optimizer_class", "lr")}
                  for g in param_groups(cfg, model)]
        opt.close()
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=cfg["load"]["stage"],
                                      process_group=ctx.group, param_groups=groups, lr=1e-2)
    if which in ("other_groups", "groups_in_another_order"):
        groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
                  {"params": [p for n, p in model.named_parameters() if not n.endswith("weight")]}]
        if which == "groups_in_another_order":  # (its refusal did not say so: helper-95)
            groups = [{"params": list(reversed(list(model.parameters())))}]
        opt_class, kwargs = OPTIMIZERS[cfg["optimizer"]]
        opt.close()  # one ZeroOptimizer per model at a time
        opt = zeroshard.ZeroOptimizer(model, opt_class, stage=cfg["load"]["stage"],
                                      process_group=ctx.group, param_groups=groups, **kwargs)
    train(ctx, cfg, model, opt, 0, 1)
    if which == "seen_by_one_rank":  # per-node disks, or a copy that did not reach rank 1
        folder = folder if ctx.rank == 0 else os.path.join(folder, "..", "elsewhere")
    error, unchanged = _refused_unchanged(model, opt, lambda: zeroshard.load_checkpoint(folder, model, opt))
    return {"error": error, "unchanged": unchanged}


def _refused_unchanged(model, opt, load) -> tuple[str | None, bool]:
    """Run ``load``: its error ("Type: message", None if none), and whether the
    parameters and the optimizer state are as they were."""
    before = full_params(model, opt), opt.state_dict()
    try:
        load()
        error = None
    except (ValueError, RuntimeError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    after = full_params(model, opt), opt.state_dict()
    unchanged = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and _same_state(
        before[1]["inner"]["state"], after[1]["inner"]["state"])
    return error, unchanged


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(torch.as_tensor(a[k][s]), torch.as_tensor(b[k][s])) for k in a for s in a[k]
        if a[k][s] is not None)


def load_bad_full_state(ctx, cfg, file: str, which: str) -> dict:
    """load_full_state_dict with a dict that does not fit: an error on every rank, no change."""
    model, opt = build(ctx, cfg, "load", seed=4000 + ctx.rank)
    train(ctx, cfg, model, opt, 0, 1)
    full = opt.full_state_dict()
    if ctx.rank == 0:
        torch.save(full, file)
    torch.distributed.barrier(group=ctx.group)
    model_sd, optim_sd = torch.load(file, weights_only=False)
    if which == "missing_key":
        model_sd.pop(next(iter(model_sd)))
    elif which == "wrong_shape":
        key = next(k for k, v in model_sd.items() if v.dim() == 2)
        model_sd[key] = model_sd[key][:, :-1]
    elif which == "other_groups":
        optim_sd["param_groups"] = optim_sd["param_groups"] * 2
    elif which == "states_in_another_order":  # an optimizer built over reversed parameters
        states = [optim_sd["state"][i] for i in sorted(optim_sd["state"])]
        optim_sd["state"] = dict(zip(sorted(optim_sd["state"]), reversed(states)))
    elif which == "optimizer_on_rank1_only":  # (it was dropped, silently)
        optim_sd = optim_sd if ctx.rank == 1 else None
    before = full_params(model, opt)
    try:
        opt.load_full_state_dict(model_sd, optim_sd)
        error = None
    except (ValueError, TypeError) as exc:
        error = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, full_params(model, opt)))
    return {"error": error, "unchanged": unchanged}


class _LateBranch(torch.nn.Module):
    """Two layers, and a branch that no rank runs in the first two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.branch = (torch.nn.Linear(4, 4), torch.nn.Linear(4, 2),
                                       torch.nn.Linear(4, 2))
        self.use_branch = False

    def forward(self, x):
        y = self.b(torch.tanh(self.a(x)))
        return y + self.branch(x) if self.use_branch else y


def _late_branch_steps(ctx, model, opt, start: int, count: int) -> None:
    for step in range(start, start + count):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        model.use_branch = step >= 2
        mine = slice(4 * ctx.rank, 4 * ctx.rank + 4)
        ((model(x[mine]) - y[mine]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


STEP_COUNTING = {"AdamW": (torch.optim.AdamW, {"lr": 1e-2}),
                 # at lr 0 no class moves: the count still matters once the lr rises (a
                 # reviewer's probe: loaded, 5.3e-3 from DDP); Note [scalars that do not
                 # change the step]
                 "AdamW_lr0": (torch.optim.AdamW, {"lr": 0.0}),
                 # Note [scalars that do not change the step]: read with lr_decay only
                 "Adagrad": (torch.optim.Adagrad, {"lr": 1e-1}),
                 "Adagrad_lr_decay": (torch.optim.Adagrad, {"lr": 1e-1, "lr_decay": 0.5})}


def step_counts_that_differ_within_a_bucket(ctx, folder: str, how: str, optimizer: str):
    """Stage 3 with a unit per Linear steps a unit no rank ran one step fewer (as torch
    skips a parameter whose gradient is None), so the ``step`` of ``optimizer``
    (``STEP_COUNTING``) differs by parameter after 3 steps. Loaded (``how``:
    "checkpoint" or "full") at stage 1, where one bucket holds them all, AdamW took the
    first parameter's, silently (5e-3 from the run that never stopped, a helper's
    probe); now refused on every rank, changing nothing, where the count changes the
    step (AdamW, Adagrad with ``lr_decay``), and loaded where it does not (Adagrad).
    Loaded at stage 3 as saved, it goes on like the run that never stopped. Returns
    (the refusal as "Type: message", None if none; unchanged, or where it loaded the
    largest difference of the stage-1 resume from the run that never stopped; that of
    the stage-3 resume)."""
    optimizer_class, kwargs = STEP_COUNTING[optimizer]

    def build(stage):
        torch.manual_seed(0)
        model = _LateBranch()
        return model, zeroshard.ZeroOptimizer(
            model, optimizer_class, stage=stage, process_group=ctx.group, **kwargs,
            **({"units": torch.nn.Linear} if stage == 3 else {}))

    model, opt = build(3)
    _late_branch_steps(ctx, model, opt, 0, 3)
    zeroshard.save_checkpoint(folder, model, opt)
    full = opt.full_state_dict()
    _late_branch_steps(ctx, model, opt, 3, 2)
    never_stopped = full_params(model, opt)
    opt.close()

    def load(model, opt):
        if how == "checkpoint":
            zeroshard.load_checkpoint(folder, model, opt)
        else:
            opt.load_full_state_dict(*(full or (None, None)))  # rank 0 holds them

    model, opt = build(1)
    refusal, unchanged = _refused_unchanged(model, opt, lambda: load(model, opt))
    if refusal is None:
        _late_branch_steps(ctx, model, opt, 3, 2)
        unchanged = max((a - b).abs().max().item()
                        for a, b in zip(full_params(model, opt), never_stopped))
    opt.close()
    model, opt = build(3)
    load(model, opt)
    _late_branch_steps(ctx, model, opt, 3, 2)
    resumed = full_params(model, opt)
    return refusal, unchanged, max((a - b).abs().max().item() for a, b in zip(resumed, never_stopped))


def load_inside_summon(ctx, folder: str):
    """Stage 3: ``load_checkpoint`` and ``load_full_state_dict`` inside
    ``summon_full_params()`` failed at the block's end with torch's raw "setStorage"
    error (a helper's probe). Returns their refusals and whether the parameters kept
    their values."""
    torch.manual_seed(0)
    model = _LateBranch()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, lr=1e-2,
                                  process_group=ctx.group, units=torch.nn.Linear)
    _late_branch_steps(ctx, model, opt, 0, 1)
    zeroshard.save_checkpoint(folder, model, opt)
    full = opt.full_state_dict() or (None, None)
    _late_branch_steps(ctx, model, opt, 1, 1)
    before = full_params(model, opt)
    refusals = []
    for load in (lambda: zeroshard.load_checkpoint(folder, model, opt),
                 lambda: opt.load_full_state_dict(*full)):
        try:
            with opt.summon_full_params():
                load()
            refusals.append("no error")
        except RuntimeError as error:
            refusals.append(str(error))
    kept = all(torch.equal(a, b) for a, b in zip(before, full_params(model, opt)))
    return refusals, kept


def save_to_per_rank_folders(ctx, base: str):
    """Each rank passes its own folder to ``save_checkpoint`` (``f"ckpt_{rank}"``), then
    every rank passes one folder. Returns the first save's error on this rank and the
    largest parameter difference after loading the second save back (every rank must
    have left the first in step: the second's collectives are the same on every rank)."""
    torch.manual_seed(0)
    model = _LateBranch()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-2,
                                  process_group=ctx.group)
    _late_branch_steps(ctx, model, opt, 0, 1)
    error = None
    try:
        zeroshard.save_checkpoint(f"{base}_{ctx.rank}", model, opt)
    except Exception as exc:  # noqa: BLE001 -- what the user would see is the result
        error = f"{type(exc).__name__}: {exc}"
    zeroshard.save_checkpoint(base, model, opt)
    saved = full_params(model, opt)
    _late_branch_steps(ctx, model, opt, 1, 1)
    zeroshard.load_checkpoint(base, model, opt)
    return error, max((a - b).abs().max().item() for a, b in zip(saved, full_params(model, opt)))


class _WithTemperature(torch.nn.Module):
    """A layer and a learnt 0-dim temperature (CLIP's logit_scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.layer(x) * self.temperature


def a_zero_dim_parameters_state_through_full_state_dicts(ctx, stage: int, bucket_mb: float,
                                                         optimizer: str):
    """Plain DDP + ``optimizer`` trains 3 steps; a fresh ZeroOptimizer loads its state
    dicts (``load_full_state_dict``), and both train 2 more steps. Returns what loading
    raised (None) and the largest parameter difference from DDP at the end."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    # "..._alone": a state only the temperature's group has (amsgrad's max_exp_avg_sq; SGD's
    # momentum buffer, with no state at all on the layer's group)
    cls, kwargs, alone = {"AdamW": (torch.optim.AdamW, {"lr": 0.05}, None),
                          "SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, None),
                          "AdamW_amsgrad_alone": (torch.optim.AdamW, {"lr": 0.05}, {"amsgrad": True}),
                          "SGD_momentum_alone": (torch.optim.SGD, {"lr": 0.05}, {"momentum": 0.9}),
                          }[optimizer]

    def groups(module):
        if alone is None:
            return None
        return [{"params": list(module.layer.parameters())},
                {"params": [module.temperature], **alone}]

    def steps(module, opt, start: int, count: int) -> None:
        for step in range(start, start + count):
            g = torch.Generator().manual_seed(100 * step + ctx.rank)
            x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
            torch.nn.functional.mse_loss(module(x), y).backward()
            opt.step()
            opt.zero_grad()

    torch.manual_seed(0)
    reference = _WithTemperature()
    ddp = DDP(reference, process_group=ctx.group)
    plain = cls(groups(reference) or ddp.parameters(), **kwargs)
    steps(ddp, plain, 0, 3)
    model = _WithTemperature()  # other initial values, all overwritten by the load
    opt = zeroshard.ZeroOptimizer(model, cls, stage=stage, process_group=ctx.group,
                                  param_groups=groups(model), bucket_size_mb=bucket_mb, **kwargs)
    error = None
    try:
        opt.load_full_state_dict(reference.state_dict(), plain.state_dict())
    except ValueError as exc:
        error = str(exc)
    steps(ddp, plain, 3, 2)
    steps(model, opt, 3, 2)
    return error, max((a - b).abs().max().item()
                      for a, b in zip(full_params(model, opt), reference.parameters()))


class _SharedBuffer(torch.nn.Module):
    """One buffer tensor registered in two modules (a shared scale or mask); with
    ``first_persistent=False`` computed (``persistent=False``) in the first and persistent
    in the second, so ``state_dict()`` holds it as ``b.scale`` only."""

    def __init__(self, first_persistent: bool = True) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        scale = torch.ones(4)
        self.a.register_buffer("scale", scale, persistent=first_persistent)
        self.b.register_buffer("scale", scale)

    def forward(self, x):
        return self.b(self.a(x) * self.a.scale) * self.b.scale


def a_buffer_registered_in_two_modules(ctx, folder: str, first_persistent: bool = True):
    """Save a checkpoint, change the buffer, load it; then load the model's own state
    dict. Returns what each load raised (None) and the buffer after the first load.
    Persistent in the second module only, ``named_buffers()`` lists the tensor once, as
    ``a.scale``, not persistent: nothing was saved and the checkpoint's load refused the
    model's own checkpoint (a reviewer's probe)."""
    torch.manual_seed(0)
    model = _SharedBuffer(first_persistent)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-2,
                                  process_group=ctx.group)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    zeroshard.save_checkpoint(folder, model, opt)
    model.a.scale.fill_(3.0)
    errors = []
    for load in (lambda: zeroshard.load_checkpoint(folder, model, opt),
                 lambda: opt.load_full_state_dict(model.state_dict(), None)):
        try:
            load()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
        if len(errors) == 1:
            restored = model.b.scale.clone()
    return errors, restored


def adafactor_state_from_rank0(ctx, stage: int):
    """Adafactor (stepped whole: a vector keeps ``variance``, a matrix ``row_var`` and
    ``col_var``) trains 2 steps; two fresh optimizers load its full state dicts, one
    given them on every rank, one on rank 0 only; each then trains 2 more steps. Returns
    (state keys saved, state keys after the rank-0 load) on rank 0, and the largest
    parameter difference between the two loads' runs."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        extra = {"units": torch.nn.Linear} if stage == 3 else {}
        return model, zeroshard.ZeroOptimizer(model, torch.optim.Adafactor, stage=stage, lr=0.05,
                                              process_group=ctx.group, **extra)

    def steps(model, opt, start: int, count: int) -> None:
        for step in range(start, start + count):
            g = torch.Generator().manual_seed(10 * step + ctx.rank)
            torch.nn.functional.mse_loss(model(torch.randn(8, 4, generator=g)),
                                         torch.randn(8, 3, generator=g)).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    steps(model, opt, 0, 2)
    full = opt.full_state_dict() or (None, None)
    gathered = [None] * torch.distributed.get_world_size(ctx.group)
    torch.distributed.all_gather_object(gathered, full, group=ctx.group)
    everywhere = gathered[0]
    runs, keys = [], {}
    for dicts in (everywhere, full):  # on every rank; on rank 0 only (None elsewhere)
        model, opt = build()
        opt.load_full_state_dict(*dicts)
        reloaded = opt.full_state_dict()
        if reloaded is not None and dicts is full:
            keys = {"saved": {i: sorted(s) for i, s in full[1]["state"].items()},
                    "loaded": {i: sorted(s) for i, s in reloaded[1]["state"].items()}}
        steps(model, opt, 2, 2)
        runs.append(full_params(model, opt))
    return keys, max((a - b).abs().max().item() for a, b in zip(*runs))


def load_where_a_layer_is_frozen_since(ctx, stage: int, folder: str, how: str):
    """Trained 2 steps with every layer trainable, saved (``how``: a checkpoint or full
    state dicts), then loaded by a new ZeroOptimizer over the same model with its last
    layer frozen (``requires_grad_(False)``). At stage 3 without a policy that layer's
    bucket has no master but its shard, which the inner optimizer does not step: the load
    raised a KeyError halfway, the other layers loaded (a helper's probe). Returns the
    largest difference of the loaded parameters from the saved ones."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    model = build_model(spec, seed=ctx.rank)

    def new_opt():
        return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                       process_group=ctx.group,
                                       **({"units": torch.nn.Linear} if stage == 3 else {}))
    opt = new_opt()
    for step in range(2):
        loss_fn(spec, model, make_batch(spec, seed=step, rank=ctx.rank, batch=4)).backward()
        opt.step()
        opt.zero_grad()
    saved = [p.clone() for p in full_params(model, opt)]
    full = opt.full_state_dict() if how == "full" else None
    if how == "checkpoint":
        zeroshard.save_checkpoint(folder, model, opt)
    opt.close()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # stage 1-2: plain values again; overwritten by the load
    model.body[-1].requires_grad_(False)
    opt = new_opt()
    if how == "checkpoint":
        zeroshard.load_checkpoint(folder, model, opt)
    else:
        opt.load_full_state_dict(*(full or (None, None)))
    loaded = full_params(model, opt)
    opt.close()
    return max((a - b).abs().max().item() for a, b in zip(loaded, saved))


def numpy_hyperparameters(ctx, folder: str):
    """An lr that a schedule computed with numpy (``np.float64``) and numpy betas, saved in
    a checkpoint and loaded by a new ZeroOptimizer: the load refused meta.pt on every rank
    (weights-only unpickling), the save having said nothing (a helper's probe). Returns
    the loaded groups' lr and betas, as Python numbers."""
    import numpy as np
    model = build_model({"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2,
                         "frozen": False, "unused_branch": False}, seed=0)

    def new_opt():
        return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-2,
                                       process_group=ctx.group)
    opt = new_opt()
    opt.param_groups[0]["lr"] = np.float64(0.005)
    opt.param_groups[0]["betas"] = (np.float64(0.8), 0.95)
    zeroshard.save_checkpoint(folder, model, opt)
    opt.close()
    opt = new_opt()
    zeroshard.load_checkpoint(folder, model, opt)
    group = opt.param_groups[0]
    loaded = (group["lr"], tuple(group["betas"]))
    opt.close()
    return loaded


class _ComputedTable(torch.nn.Module):
    """A persistent buffer next to one the model computes (``persistent=False``: a
    rotary ``inv_freq``, a causal mask as long as the configured length)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.register_buffer("kept", torch.zeros(4))
        self.register_buffer("mask", torch.arange(float(length)), persistent=False)

    def forward(self, x):
        return self.a(x) + self.kept + self.mask[:4]


def non_persistent_buffers(ctx, folder: str, length_on_load: int):
    """Save a checkpoint of a model whose buffers changed in training, load it into a
    fresh one whose computed ``mask`` has ``length_on_load`` elements. Returns what the
    load raised (None), and whether every buffer then equals that of the same fresh
    model given the saved one's ``state_dict()`` by torch's ``load_state_dict``."""
    torch.manual_seed(0)
    saved_model = _ComputedTable(4)
    opt = zeroshard.ZeroOptimizer(saved_model, torch.optim.AdamW, stage=2, lr=1e-2,
                                  process_group=ctx.group)
    saved_model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with torch.no_grad():
        saved_model.kept.fill_(2.0)
        saved_model.mask.mul_(-3.0)  # computed anew by a fresh model; torch saves none
    zeroshard.save_checkpoint(folder, saved_model, opt)
    expected = _ComputedTable(length_on_load)
    expected.load_state_dict(saved_model.state_dict())
    opt.close()
    model = _ComputedTable(length_on_load)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-2,
                                  process_group=ctx.group)
    try:
        zeroshard.load_checkpoint(folder, model, opt)
        error = None
    except ValueError as exc:
        error = str(exc)
    same = all(torch.equal(b, e) for b, e in zip(model.buffers(), expected.buffers()))
    opt.close()
    return error, same


def _qat_model():
    import torch.ao.quantization as quantization
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).train()
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    return quantization.prepare_qat(model)


def a_qat_models_resume(ctx, folder: str, stage: int):
    """A QAT model's fake-quant scale is shaped (1,) and its observers' min/max (0,) until
    its first forward sizes them per channel, and torch's load_state_dict resizes them: a
    fresh model's resume was refused with advice to load into the model the checkpoint
    came from, which it was (helper-95). The refusal names the first forward as the fix,
    and after one the checkpoint and the full state dicts load. Returns (the checkpoint's
    refusal, the full state dicts', the largest difference of the resumed model's
    parameters and buffers from the saved ones: rank 0's, else None)."""
    def zero(model):
        return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                       process_group=ctx.group)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(ctx.rank))
    model = _qat_model()
    opt = zero(model)
    model(x).square().mean().backward()
    opt.step()
    zeroshard.save_checkpoint(folder, model, opt)
    full = opt.full_state_dict()
    opt.close()

    def refusal(load) -> str:
        fresh = _qat_model()
        fresh_opt = zero(fresh)
        try:
            load(fresh, fresh_opt)
        except (ValueError, RuntimeError) as error:  # the other ranks': another rank failed
            return str(error)
        finally:
            fresh_opt.close()
        return "no error"
    from_checkpoint = refusal(lambda m, o: zeroshard.load_checkpoint(folder, m, o))
    from_full = refusal(lambda m, o: o.load_full_state_dict(*(full or (None, None))))
    sized = _qat_model()
    with torch.no_grad():
        sized(x)  # the fix the refusals name
    sized_opt = zero(sized)
    zeroshard.load_checkpoint(folder, sized, sized_opt)
    sized_opt.load_full_state_dict(*(full or (None, None)))
    resumed = sized_opt.full_state_dict()
    sized_opt.close()
    difference = None if full is None else max(
        (resumed[0][name].float() - value.float()).abs().max().item()
        for name, value in full[0].items() if value.is_floating_point())
    return from_checkpoint, from_full, difference


class _Calibrated(torch.nn.Module):
    """A layer with extra state its forward reads and training changes (Transformer
    Engine's FP8 scaling and a quantizer's running amax work so): ``amax``, the largest
    weight magnitude seen in training (alike on every rank, as such state is kept),
    scales the output; ``seen``, a count, a list (not a tensor, as torch allows)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.amax, self.seen = 1.0, [0]

    def forward(self, x):
        y = self.lin(x)
        if self.training:
            self.amax = max(self.amax, 4 * float(self.lin.weight.detach().abs().max()))
            self.seen = [self.seen[0] + 1]
        return y / self.amax

    def get_extra_state(self):
        return {"amax": self.amax, "seen": list(self.seen)}

    def set_extra_state(self, state) -> None:
        self.amax, self.seen = state["amax"], list(state["seen"])


class _Uncalibrated(_Calibrated):
    """The same parameters, no extra state."""
    get_extra_state = torch.nn.Module.get_extra_state
    set_extra_state = torch.nn.Module.set_extra_state


class _CalibratedWithHistory(_Calibrated):
    """Extra state holding a Python object the weights-only unpickler refuses."""

    def get_extra_state(self):
        return {"history": collections.deque([self.amax], maxlen=4)}


class _CalibratedNet(torch.nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.block = layer(4)
        self.again = self.block  # one module under two names: its state is saved once
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.block(x)))


def _calibrated_model(layer=_Calibrated) -> torch.nn.Module:
    torch.manual_seed(0)
    return _CalibratedNet(layer).double()


def _calibrated_steps(ctx, model, opt, start: int, count: int) -> None:
    for step in range(start, start + count):
        x = torch.randn(2 * ctx.world_size, 4, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(step))
        model(x[2 * ctx.rank:2 * ctx.rank + 2]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def modules_extra_state(ctx, stage: int, folder: str) -> dict:
    """Train 2 steps, save a checkpoint and take full state dicts, train 2 more (the run
    that never stopped). Then resume 3 ways in fresh models and optimizers (the
    checkpoint; the full state dicts on every rank; on rank 0 only) and train the same 2
    steps. Returns, per way, the largest parameter difference from the run that never
    stopped and whether the extra state equals it; and what loading the checkpoint into a
    model without the calibrated layer's extra state raised."""
    kwargs = {"stage": stage, "lr": 0.1, "process_group": ctx.group, "bucket_size_mb": 1e-4}
    model = _calibrated_model()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, **kwargs)
    _calibrated_steps(ctx, model, opt, 0, 2)
    zeroshard.save_checkpoint(folder, model, opt)
    full = [opt.full_state_dict()]  # rank 0's; then on every rank
    torch.distributed.broadcast_object_list(full, group_src=0, group=ctx.group)
    full = full[0]
    _calibrated_steps(ctx, model, opt, 2, 2)
    with opt.summon_full_params():
        expected = [p.detach().clone() for p in model.parameters()]
    expected_state = model.block.get_extra_state()
    opt.close()
    out = {}
    loads = {"checkpoint": lambda m, o: zeroshard.load_checkpoint(folder, m, o),
             "full state, every rank": lambda m, o: o.load_full_state_dict(*full),
             "full state, rank 0": lambda m, o: o.load_full_state_dict(
                 *(full if ctx.rank == 0 else (None, None)))}
    for way, load in loads.items():
        model = _calibrated_model()
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, **kwargs)
        load(model, opt)
        _calibrated_steps(ctx, model, opt, 2, 2)
        with opt.summon_full_params():
            difference = max((p - e).abs().max().item() for p, e in zip(model.parameters(), expected))
        out[way] = (difference, model.block.get_extra_state() == expected_state)
        opt.close()
    plain = _calibrated_model(_Uncalibrated)
    opt = zeroshard.ZeroOptimizer(plain, torch.optim.AdamW, **kwargs)
    try:
        zeroshard.load_checkpoint(folder, plain, opt)
        out["refused"] = None
    except ValueError as error:
        out["refused"] = str(error)
    opt.close()
    model = _calibrated_model(_CalibratedWithHistory)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, **kwargs)
    try:
        zeroshard.save_checkpoint(folder + "_history", model, opt)
        out["save refused"] = None
    except ValueError as error:
        out["save refused"] = str(error)
    out["written"] = os.path.exists(os.path.join(folder + "_history", "LATEST"))
    opt.close()
    return out


class _ReadsItsWeight(_Calibrated):
    """Extra state read from the layer's weight (a quantizer's scale taken from it)."""

    def get_extra_state(self):
        return {"wmax": float(self.lin.weight.detach().abs().max())}

    def set_extra_state(self, state) -> None:
        self.amax = state["wmax"]


def extra_state_read_from_released_parameters(ctx, folder: str) -> dict:
    """Stage 3, a module whose ``get_extra_state`` reads its released weight: a checkpoint
    and a full state dict, outside and inside ``summon_full_params()``. Returns what each
    raised on this rank (every rank must raise alike: ``full_state_dict`` raised on rank
    0 alone, after its gathers, helper-103), and the state saved inside the block."""
    model = _calibrated_model(_ReadsItsWeight)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1,
                                  process_group=ctx.group)
    out = {}
    for name, call in (("checkpoint", lambda: zeroshard.save_checkpoint(folder, model, opt)),
                       ("full state", opt.full_state_dict)):
        try:
            call()
            out[name] = None
        except RuntimeError as error:
            out[name] = str(error)
    with opt.summon_full_params():
        expected = float(model.block.lin.weight.abs().max())
        zeroshard.save_checkpoint(folder, model, opt)
        full = opt.full_state_dict()
    zeroshard.load_checkpoint(folder, model, opt)
    out["restored"] = (model.block.amax, expected)
    out["full"] = full[0]["block._extra_state"]["wmax"] if full else expected
    opt.close()
    return out


def _as_a_big_endian_host_saves(folder: str) -> None:
    """Rewrite the rank files of checkpoint ``folder`` as a big-endian host (s390x) writes
    them: every tensor's bytes swapped and the byteorder record "big"; meta.pt's sizes
    and checksums, and its own, follow (helper-130's probe)."""
    from pathlib import Path
    import sys
    import zlib
    from torch.utils._pytree import tree_map
    from zeroshard.checkpoint import LATEST, META_CHECKSUM
    root = Path(folder)
    version = root / (root / LATEST).read_text().strip()

    def swapped(t):
        copy = t.detach().clone().contiguous()
        copy.untyped_storage().byteswap(copy.dtype)
        return copy
    meta = torch.load(version / "meta.pt", weights_only=True)
    for file in sorted(version.glob("rank*.pt")):
        big = tree_map(lambda v: swapped(v) if isinstance(v, torch.Tensor) else v,
                       torch.load(file, weights_only=True))
        native, sys.byteorder = sys.byteorder, "big"  # what torch.save records
        try:
            torch.save(big, file)
        finally:
            sys.byteorder = native
        meta["files"][file.name] = file.stat().st_size
        meta["checksums"][file.name] = zlib.crc32(file.read_bytes())
    torch.save(meta, version / "meta.pt")
    (version / META_CHECKSUM).write_text(f"{zlib.crc32((version / 'meta.pt').read_bytes())}\n")


def files_a_load_opens(ctx, folder: str, stage: int, big_endian: bool = False) -> dict:
    """Note [a checkpoint file read once]: a model of many one-parameter buckets saved,
    then loaded into a differently initialised one while every ``torch.load`` is counted
    by file; the loaded parameters and Adam states against the saved ones. With
    ``big_endian`` the files are rewritten as a big-endian host saves them, which
    ``torch.load`` swaps in place as it maps them."""
    def build_mlp(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(6)))
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                      process_group=ctx.group, bucket_size_mb=1e-4,
                                      **({"units": torch.nn.Linear} if stage == 3 else {}))
        return model, opt

    model, opt = build_mlp(0)
    for step in range(2):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step * 10 + ctx.rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    zeroshard.save_checkpoint(folder, model, opt)
    saved = opt.full_state_dict()  # rank 0's; None elsewhere
    buckets = len(opt.sharding.every_bucket)
    opt.close()
    if big_endian and ctx.rank == 0:
        _as_a_big_endian_host_saves(folder)
    torch.distributed.barrier(group=ctx.group)

    model, opt = build_mlp(1)
    opened = collections.Counter()
    torch_load = torch.load

    def counting_load(file, *args, **kwargs):
        opened[os.path.basename(str(file))] += 1
        return torch_load(file, *args, **kwargs)
    # the pieces the rank files hold, and those the load keeps (what this rank reads)
    from zeroshard.checkpoint import _CheckpointSource
    keep_from, pieces = _CheckpointSource.keep_from, {"in_files": [], "kept": []}

    def counting_keep_from(source, file, droppable):  # called with the files in rank order
        before = sum(len(kept) for kept in source.saved_pieces.values())
        keep_from(source, file, droppable)
        pieces["in_files"].append(sum(len(ps) for ps in file["pieces"].values()))
        pieces["kept"].append(sum(len(kept) for kept in source.saved_pieces.values()) - before)
    torch.load, _CheckpointSource.keep_from = counting_load, counting_keep_from
    try:
        zeroshard.load_checkpoint(folder, model, opt)
    finally:
        torch.load, _CheckpointSource.keep_from = torch_load, keep_from
    loaded = opt.full_state_dict()
    opt.close()
    same = saved is None or (
        all(torch.equal(v, loaded[0][k]) for k, v in saved[0].items())
        and all(torch.equal(v, loaded[1]["state"][k][key])
                for k, state in saved[1]["state"].items() for key, v in state.items()))
    return {"opened": dict(opened), "buckets": buckets, "same": same, **pieces}
