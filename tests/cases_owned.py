"""Optimizers stepped on whole parameters, run on each rank beside DDP with the very same optimizers.

Muon (torch's, counting the matrices it orthogonalises), Adafactor and a hand-written
optimizer that is not element-wise step the models' Linear weights (tied weights
included); the rest of the parameters go to AdamW, SGD, or the same class. Each
case checks three things against references computed here:

- the reduced gradient each owner steps on is the mean over ranks of the gradients
  at zeroshard's parameters (each rank's computed here by a plain copy, averaged by a
  plain all-reduce), within the rounding of two reductions of the same values;
- the owner's update is exactly the unmodified torch optimizer's: a fresh instance
  of the class, given the parameter, that gradient and the state before the step,
  produces bit-for-bit the parameter zeroshard holds after it, on every rank;
- every Linear weight has one owner in the job, which alone holds its state and
  alone runs the optimizer on it (Muon's Newton-Schulz once per matrix).

Where the reductions round exactly (one or two ranks, no clipping, fp32) the whole
run must equal DDP's bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import zeroshard
from cases import UNITS, ddp_needs_static_graph, largest_difference
from models import build_model, loss_fn, make_batch

U32 = 2.0**-24  # unit roundoff of fp32


class CountingMuon(torch.optim.Muon):
    """torch's Muon, counting the matrices it orthogonalises (one Newton-Schulz each)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.orthogonalised = 0

    def step(self, closure=None):
        self.orthogonalised += sum(p.grad is not None for g in self.param_groups for p in g["params"])
        return super().step(closure)


class NormScaled(torch.optim.Optimizer):
    """Not element-wise: each parameter moves against its gradient by lr times its own
    norm over the gradient's norm, so every element's update depends on all others."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["steps"] = state.get("steps", 0) + 1
                p.sub_(p.grad * (group["lr"] * (p.norm() + 1) / (p.grad.norm() + group["eps"])))


class Lars(torch.optim.SGD):
    """LARS as SimCLR/BYOL code writes it: SGD whose step first scales each gradient by
    the parameter's trust ratio, ||w|| / ||g||. A subclass of an element-wise class that
    is not element-wise: it was stepped on flat shards, 4.7e-3 from DDP (a helper's probe)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_((p.norm() + 1e-3) / (p.grad.norm() + 1e-8))
        return super().step(closure)


class GroupCounted(torch.optim.Optimizer):
    """Keeps running values on its param group, as many optimizers outside torch do
    (pytorch_optimizer's ``group["step"]``, Prodigy's ``d``): a bias-corrected momentum
    whose count is a group key its first step sets, and a warm-up factor, one of its
    defaults, that each step moves. Before Note [settings both ways] every step put the
    factor back to its value at construction, and a resume restarted the count."""

    def __init__(self, params, lr: float = 0.01, beta: float = 0.9, warm: float = 0.25) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "warm": warm})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            group["warm"] = min(1.0, 2 * group["warm"])
            scale = group["lr"] * group["warm"] / (1 - group["beta"] ** group["step"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.sub_(momentum * (scale * (p.norm() + 1) / (momentum.norm() + 1e-8)))


class ScheduleFreeSGD(torch.optim.Optimizer):
    """Schedule-free SGD (Defazio et al. 2024) in the form of schedulefree's
    ``SGDScheduleFree``, without warm-up or weight decay: it steps the point z and
    averages it into x, and the parameters hold y = (1 - beta) z + beta x in train mode,
    x in eval mode; ``train()`` and ``eval()`` move them in place and flip
    ``group["train_mode"]``, and ``step()`` refuses eval mode, as schedulefree's do."""

    def __init__(self, params, lr: float = 0.1, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta, "k": 0, "train_mode": False})

    def _training(self, group: dict) -> bool:
        return group["train_mode"]

    def _set_training(self, group: dict, value: bool) -> None:
        group["train_mode"] = value

    @torch.no_grad()
    def _move(self, to_train: bool) -> None:
        for group in self.param_groups:
            if self._training(group) != to_train:
                beta = group["beta"]
                for p in group["params"]:
                    if "z" in self.state[p]:  # x -> y, or y -> x
                        p.lerp_(self.state[p]["z"], 1 - beta if to_train else 1 - 1 / beta)
                self._set_training(group, to_train)

    def train(self) -> None:
        self._move(True)

    def eval(self) -> None:
        self._move(False)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not self._training(group):
                raise RuntimeError("ScheduleFreeSGD is not in train mode: call opt.train()")
            beta, weight = group["beta"], 1 / (group["k"] + 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                z = self.state[p].setdefault("z", p.detach().clone())
                x = (p - (1 - beta) * z) / beta
                z.sub_(p.grad, alpha=group["lr"])
                x.lerp_(z, weight)
                p.copy_((1 - beta) * z + beta * x)
            group["k"] += 1


class ElementwiseScheduleFreeSGD(ScheduleFreeSGD):
    zeroshard_elementwise = True  # it is: stepped on flat shards


class ScheduleFreeSGDModeOnItself(ScheduleFreeSGD):
    """The mode kept on the optimizer, not on its groups, as schedule-free wrappers keep
    it (pytorch_optimizer's ScheduleFreeWrapper): a switch changes no group setting."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.training = False

    def _training(self, group: dict) -> bool:
        return self.training

    def _set_training(self, group: dict, value: bool) -> None:
        self.training = value


SCHEDULE_FREE = {"whole": ScheduleFreeSGD, "flat": ElementwiseScheduleFreeSGD,
                 "mode_on_itself": ScheduleFreeSGDModeOnItself}


class OwnKeyCounted(GroupCounted):
    """GroupCounted that also counts its steps under a key of its own in ``self.state``,
    as MADGRAD keeps ``state["k"]``, and damps its steps by that count. A resume lost it
    before Note [state under an optimizer's own keys] (the drawn test leaves this class
    out: its contract check rebuilds per-tensor state only)."""

    @torch.no_grad()
    def step(self, closure=None):
        self.state["k"] = self.state.get("k", 0) + 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.state["k"])
        return super().step(closure)


class LowPrecisionMomentum(torch.optim.Optimizer):
    """Keeps per-element states in other dtypes than the parameter's, as pytorch_optimizer's
    AdaFactor (a bf16 momentum) and SPAM (a boolean mask) do: a bf16 momentum, and a mask
    of the elements whose gradient was once above the parameter's mean, whose update is
    halved. A load gave both back in the parameter's dtype before Note [per-element
    states of their own dtype], and the boolean index raised."""

    threshold = None  # None: the parameter's mean |gradient| (not element-wise)

    def __init__(self, params, lr: float = 0.01, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["large"] = torch.zeros_like(p, dtype=torch.bool)
                bound = p.grad.abs().mean() if self.threshold is None else self.threshold
                state["large"] |= p.grad.abs() > bound
                state["momentum"].mul_(group["beta"]).add_(p.grad.to(torch.bfloat16))
                update = state["momentum"].to(p.dtype)
                update[state["large"]] *= 0.5
                p.sub_(update, alpha=group["lr"])


class ElementwiseLowPrecisionMomentum(LowPrecisionMomentum):
    zeroshard_elementwise = True  # with a fixed threshold it is: stepped on flat shards
    threshold = 0.01


class Pace(enum.Enum):
    STEADY = 1


class KeepsAnEnum(NormScaled):
    """NormScaled that keeps an enum in each parameter's state, as SCION keeps an enum
    setting and AdaShift a ``deque``: Python objects that load_checkpoint's weights-only
    read refuses unless allowed (Note [a checkpoint that loads]; a deque cannot be
    allowed, torch's unpickler cannot rebuild one)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["pace"] = Pace.STEADY
        return super().step(closure)


def checkpoint_of_a_python_object(ctx, folder: str, allowed: bool) -> dict:
    """KeepsAnEnum over the Linear weights, a step, then save_checkpoint (with ``Pace``
    allowed by torch.serialization.safe_globals or not) and, if it saved, a load. Returns
    the refusal, the types of the loaded states, and what the folder holds."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    model = build_model(spec, seed=100)
    groups = [{"params": linear_weights(model), "optimizer_class": KeepsAnEnum},
              {"params": [p for p in model.parameters() if p.dim() == 1]}]
    zopt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=2, process_group=ctx.group,
                                   param_groups=groups, lr=0.01)
    loss_fn(spec, model, make_batch(spec, seed=0, rank=ctx.rank, batch=4)).backward()
    zopt.step()
    allow = torch.serialization.safe_globals([Pace]) if allowed \
        else contextlib.nullcontext()
    refusal = loaded = None
    with allow:
        try:
            zeroshard.save_checkpoint(folder, model, zopt)
            zeroshard.load_checkpoint(folder, model, zopt)
            loaded = sorted(type(s["pace"]).__name__ for s in zopt.state.values()
                            if isinstance(s, dict) and "pace" in s)
        except ValueError as error:
            refusal = str(error)
    zopt.close()
    return {"refusal": refusal, "loaded": loaded,
            "files": sorted(os.listdir(folder)) if os.path.isdir(folder) else []}


RESUMED_ONLY = {"OwnKeyCounted": (OwnKeyCounted, {"lr": 0.01}),
                "LowPrecisionMomentum": (LowPrecisionMomentum, {"lr": 0.01}),
                "ElementwiseLowPrecisionMomentum": (ElementwiseLowPrecisionMomentum, {"lr": 0.01})}


WHOLE = {"Muon": (CountingMuon, {"lr": 0.02}), "Adafactor": (torch.optim.Adafactor, {"lr": 0.01}),
         "NormScaled": (NormScaled, {"lr": 0.01}), "Lars": (Lars, {"lr": 0.01, "momentum": 0.9}),
         "GroupCounted": (GroupCounted, {"lr": 0.01})}
REST = {"AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        "SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})}


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable Linear weights, each once (a tied head is the embedding's weight)."""
    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad \
                and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(module.weight)
    return out


def optimizer_setup(model: nn.Module, case: dict):
    """(positional class, its kwargs, param groups) for ZeroOptimizer, and the same as
    [(class, kwargs, params)] for plain optimizers."""
    whole_class, whole_kwargs = {**WHOLE, **RESUMED_ONLY}[case["whole"]]
    whole = linear_weights(model)
    rest = [p for p in model.parameters()
            if p.requires_grad and all(p is not w for w in whole)]
    if case["rest"] == "same":  # one class for everything: the positional one
        return whole_class, whole_kwargs, None, [(whole_class, whole_kwargs, whole + rest)]
    rest_class, rest_kwargs = REST[case["rest"]]
    groups = [{"params": whole, "optimizer_class": whole_class, **whole_kwargs},
              {"params": rest}]
    return rest_class, rest_kwargs, groups, [(whole_class, whole_kwargs, whole),
                                             (rest_class, rest_kwargs, rest)]


def owned(zopt):
    """(name, bucket, index, stepped tensor) for each parameter this rank steps whole."""
    for bucket in zopt.sharding.buckets:
        if bucket.owns_whole_parameters:
            for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped):
                yield bucket.param_names[index], bucket, index, stepped


def train_owned_side_by_side(ctx, case: dict) -> dict:
    spec, n = case["model"], ctx.world_size
    base = build_model(spec, seed=100 + ctx.rank)  # ranks differ: both wrappers broadcast rank 0's
    zero_model, ddp_model, local_model = (copy.deepcopy(base) for _ in range(3))
    positional, kwargs, groups, _ = optimizer_setup(zero_model, case)
    extra = {}
    if case["stage"] == 3:
        extra = {"units": UNITS[case["units"]], "reshard_after_forward": case["reshard"]}
    if case["bf16"]:
        extra["mixed_precision"] = zeroshard.MixedPrecision(
            torch.bfloat16, buffer_dtype=torch.bfloat16, output_dtype=torch.float32)
    zopt = zeroshard.ZeroOptimizer(zero_model, positional, stage=case["stage"], param_groups=groups,
                                   bucket_size_mb=case["bucket_mb"],
                                   **ctx.zero_ranks(case["mesh"]), **extra, **kwargs)
    ddp = DDP(ddp_model, process_group=ctx.group, static_graph=ddp_needs_static_graph(case))
    plain = [cls(params, **kw) for cls, kw, params in optimizer_setup(ddp_model, case)[3]]
    names = {id(p): name for name, p in ddp_model.named_parameters()}
    ddp_param = dict(ddp_model.named_parameters())
    out = {"grad_excess": [], "contract": [], "ddp_diff": [], "owned": [], "orthogonalised": [],
           "state_holders": []}
    elements = sum(p.numel() for p in zero_model.parameters() if p.requires_grad)
    for step in range(case["steps"]):
        # The local model holds zeroshard's parameters: its gradient is this rank's part of
        # what zeroshard reduces, and a plain all-reduce of it here is the reference mean.
        with torch.no_grad(), zopt.summon_full_params():
            for p, q in zip(local_model.parameters(), zero_model.parameters()):
                p.copy_(q.float())
                p.grad = None
        abs_sum = {}
        for m in range(case["accum"]):
            batch = make_batch(spec, seed=1000 * step + 10 * m + ctx.rank, rank=ctx.rank,
                               batch=case["batch"])
            skip_sync = case["no_sync"] and m < case["accum"] - 1
            for model, sync in ((zero_model, zopt.no_sync), (ddp, ddp.no_sync)):
                with sync() if skip_sync else contextlib.nullcontext():
                    (loss_fn(spec, model, batch) / case["accum"]).backward()
            previous = {name: p.grad.clone() for name, p in local_model.named_parameters()
                        if p.grad is not None}
            (loss_fn(spec, local_model, batch) / case["accum"]).backward()
            for name, p in local_model.named_parameters():  # each micro-batch's |gradient|
                if p.grad is not None:
                    abs_sum[name] = abs_sum.get(name, 0) + (p.grad - previous.get(name, 0)).abs()
        mean = {}
        for name, p in local_model.named_parameters():
            if p.requires_grad:
                mean[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                abs_sum.setdefault(name, torch.zeros_like(p))
                dist.all_reduce(mean[name], group=ctx.group)
                dist.all_reduce(abs_sum[name], group=ctx.group)
                mean[name] /= n
        if case["clip"] is not None:
            zopt.clip_grad_norm_(case["clip"])
            torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), case["clip"])
            norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in mean.values()]))
            for grad in mean.values():
                grad *= min(1.0, case["clip"] / (float(norm) + 1e-6))
        before = []
        excess = 0.0
        for name, bucket, index, stepped in owned(zopt):
            grad = stepped.grad.float()
            reference = mean[name]
            # Both sum the same k = n * accum per-(rank, micro-batch) gradients g_j, in other
            # orders (zeroshard may reduce each micro-batch and then add): each within
            # (k - 1) u sum|g_j| / n of the exact mean, then within u |mean| for the division;
            # clipping scales both by coefficients from norms summed in other orders,
            # within 2 (elements + 2) u of each other.
            k = n * case["accum"]
            bound = 2 * (k - 1) * U32 * abs_sum[name] / n + 2 * U32 * reference.abs()
            if case["clip"] is not None:
                bound = bound + 2 * (elements + 2) * U32 * reference.abs()
            if case["bf16"]:  # zeroshard's gradient comes from a bf16 forward: not this one
                bound = torch.full_like(bound, float("inf"))
            excess = max(excess, float(((grad - reference).abs() - bound).max()))
            group = zopt.sharding.inner.param_groups[bucket.group_index]
            before.append((name, stepped, stepped.detach().clone(), grad.clone(),
                           copy.deepcopy(zopt.sharding.inner.state.get(stepped, {})),
                           zopt.sharding.inner.classes[bucket.group_index],
                           {k: v for k, v in group.items() if k != "params"}))
        out["grad_excess"].append(excess)
        zopt.step()
        zopt.zero_grad()
        for optimizer in plain:
            optimizer.step()
            optimizer.zero_grad()
        # The owner's update is the unmodified optimizer's, stepped once on that gradient.
        contract = 0.0
        for name, stepped, value, grad, state, cls, hyper in before:
            probe = torch.empty_like(stepped).copy_(value)
            probe.grad = grad
            reference = cls([{"params": [probe], **hyper}])
            if state:
                reference.state[probe] = state
            reference.step()
            contract = max(contract, float((probe - stepped).abs().max()))
        out["contract"].append(contract)
        with zopt.summon_full_params():
            # torch's max keeps a NaN (Python's max() drops one unless it comes first)
            out["ddp_diff"].append(float(torch.stack([
                (p.detach().float() - ddp_param[name].detach()).abs().max()
                for name, p in zero_model.named_parameters()]).max()))
            out.setdefault("params", []).append(
                torch.cat([p.detach().float().reshape(-1) for p in zero_model.parameters()]))
    out["owned"] = sorted(name for name, *_ in owned(zopt))
    stepped_whole = optimizer_setup(ddp_model, case)[3][0][2]  # the whole class's parameters
    out["whole_names"] = sorted(names[id(p)] for p in stepped_whole)
    # which whole parameters have optimizer state on this rank
    out["state_holders"] = sorted(name for name, _, _, stepped in owned(zopt)
                                  if stepped in zopt.sharding.inner.state)
    whole_class = WHOLE[case["whole"]][0]
    out["whole_states"] = sum(len(o.state) for o in zopt.sharding.inner.optimizers
                              if isinstance(o, whole_class))
    out["orthogonalised"] = sum(getattr(o, "orthogonalised", 0) for o in zopt.sharding.inner.optimizers)
    out["report"] = zopt.sharding_report()
    out["stored"] = [b.shard.numel() for b in zopt.sharding.buckets]
    out["layouts"] = [(list(b.layout.numels), list(b.layout.owners or []), b.layout.padded_numel)
                      for b in zopt.sharding.buckets if b.owns_whole_parameters]
    zopt.close()
    return out


def fixed_owned_case(ctx) -> dict:
    """Muon over four bias-free Linear layers whose weights are 8x4, 6x4, 4x4 and 2x4, stage 2."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, rows, bias=False) for rows in (8, 6, 4, 2)))
    model.forward = lambda x: sum(layer(x).sum() for layer in model)
    zopt = zeroshard.ZeroOptimizer(model, torch.optim.Muon, stage=2, process_group=ctx.group,
                                   lr=0.02)
    for _ in range(2):  # the second step is the steady state (the first learns the order)
        zopt.comm_stats.reset()
        model(torch.randn(3, 4)).backward()
        zopt.step()
        zopt.zero_grad()
    (bucket,) = zopt.sharding.buckets
    by_rows = {p.shape[0]: owner for p, owner in zip(bucket.params, bucket.layout.owners)}
    return {"rank": ctx.rank, "owners": [by_rows[rows] for rows in (8, 6, 4, 2)],
            "padded": bucket.layout.padded_numel, "stored": bucket.shard.numel(),
            "reduce_scatter": zopt.comm_stats.bytes["reduce_scatter"],
            "all_gather": zopt.comm_stats.bytes["all_gather"],
            "report": zopt.sharding_report(),
            "state_shapes": sorted(list(s["momentum_buffer"].shape) for s in zopt.sharding.inner.state.values())}


def round_trip_then_schedule(ctx, stage: int) -> float:
    """Muon + AdamW with a scheduler halving each group's lr every step, and a
    ``load_state_dict(state_dict())`` round trip after the first step (what accelerate
    does to an optimizer): the largest difference from DDP with the same optimizers."""
    spec = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 2, "seq": 4,
            "tied": True, "frozen": False}
    case = {"whole": "Muon", "rest": "AdamW", "model": spec}
    base = build_model(spec, seed=100 + ctx.rank)
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    positional, kwargs, groups, _ = optimizer_setup(zero_model, case)
    zopt = zeroshard.ZeroOptimizer(zero_model, positional, stage=stage, param_groups=groups,
                                   process_group=ctx.group, **kwargs)
    ddp = DDP(ddp_model, process_group=ctx.group)
    plain = [cls(params, **kw) for cls, kw, params in optimizer_setup(ddp_model, case)[3]]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step)
                  for o in [zopt] + plain]
    for step in range(3):
        batch = make_batch(spec, seed=step, rank=ctx.rank, batch=2)
        for model in (zero_model, ddp):
            loss_fn(spec, model, batch).backward()
        for optimizer in [zopt] + plain:
            optimizer.step()
            optimizer.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        if step == 0:
            zopt.load_state_dict(zopt.state_dict())
            for optimizer in plain:
                optimizer.load_state_dict(optimizer.state_dict())
    with zopt.summon_full_params():
        return float(torch.stack([(p.detach() - q.detach()).abs().max()  # keeps a NaN
                                  for p, q in zip(zero_model.parameters(), ddp_model.parameters())]).max())


def group_settings_resumed(ctx, stages: tuple[int, int], how: str, folder: str,
                           whole: str = "GroupCounted") -> float:
    """``whole`` over the Linear weights and AdamW over the rest, two steps at
    ``stages[0]``, resumed at ``stages[1]`` (a checkpoint, or the full state dicts on
    rank 0) in a new model and optimizer, two more: the largest difference from DDP with
    the same optimizers for four steps without a stop."""
    spec = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 2, "seq": 4,
            "tied": True, "frozen": False}
    case = {"whole": whole, "rest": "AdamW", "model": spec}
    base = build_model(spec, seed=100 + ctx.rank)
    ddp_model = copy.deepcopy(base)
    ddp = DDP(ddp_model, process_group=ctx.group)
    plain = [cls(params, **kw) for cls, kw, params in optimizer_setup(ddp_model, case)[3]]

    def build(stage: int, model: nn.Module):
        positional, kwargs, groups, _ = optimizer_setup(model, case)
        return zeroshard.ZeroOptimizer(model, positional, stage=stage, param_groups=groups,
                                       process_group=ctx.group, **kwargs)

    def train(model, zopt, steps):
        for step in steps:
            batch = make_batch(spec, seed=step, rank=ctx.rank, batch=2)
            for optimizers, net in (([zopt], model), (plain, ddp)):
                loss_fn(spec, net, batch).backward()
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad()

    model = copy.deepcopy(base)
    zopt = build(stages[0], model)
    train(model, zopt, range(2))
    zopt.memory_report()  # every state entry read, under the class's own keys too
    dict(zopt.state.items())  # (both raised at MADGRAD's "k", a probe)
    zeroshard.save_checkpoint(folder, model, zopt)
    full = zopt.full_state_dict()
    zopt.close()
    model = build_model(spec, seed=7)  # other values: the load must bring them all
    zopt = build(stages[1], model)
    if how == "checkpoint":
        zeroshard.load_checkpoint(folder, model, zopt)
    else:
        zopt.load_full_state_dict(*(full or (None, None)))  # rank 0 holds them
    train(model, zopt, range(2, 4))
    with zopt.summon_full_params():
        return float(torch.stack([(p.detach() - q.detach()).abs().max()  # keeps a NaN
                                  for p, q in zip(model.parameters(), ddp_model.parameters())]).max())


def schedule_free_modes(ctx, stage: int, kind: str, policy: bool, folder: str) -> dict:
    """ScheduleFreeSGD over every parameter, driven as transformers' Trainer drives it:
    ``opt.train()`` before every training step, ``opt.eval()`` before an evaluation after
    every second step, beside DDP with the same class; then, in eval mode, a rollback to
    the checkpoint of step 2 (saved in train mode) and an evaluation. Returns the largest
    difference of the evaluations' outputs (the rollback's last) and of the final
    parameters (in eval mode), how far each evaluation's outputs are from the trained
    point's (eval mode moves), the collectives a ``train()`` in train mode issued, and
    whether the step in eval mode was refused."""
    spec = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 2, "seq": 4,
            "tied": True, "frozen": False}
    cls = SCHEDULE_FREE[kind]
    base = build_model(spec, seed=100 + ctx.rank)
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    extra = {"units": UNITS["blocks"]} if stage == 3 else {}
    if policy:  # fp32 casts of fp32 masters: the switch moves the masters, not the parameters
        extra["mixed_precision"] = zeroshard.MixedPrecision(torch.float32)
    zopt = zeroshard.ZeroOptimizer(zero_model, cls, stage=stage, process_group=ctx.group,
                                   lr=0.1, **extra)
    ddp = DDP(ddp_model, process_group=ctx.group)
    plain = cls(ddp_model.parameters(), lr=0.1)
    evaluations, moved, calls_in_train_mode = [], [], []
    probe = make_batch(spec, seed=99, rank=0, batch=2)

    def evaluate_both() -> torch.Tensor:
        """Both in eval mode, evaluated: the difference recorded; zeroshard's outputs."""
        outputs = []
        for optimizer, model in ((zopt, zero_model), (plain, ddp_model)):
            optimizer.eval()
            with torch.no_grad():
                outputs.append(model(probe[0]))
        evaluations.append(float((outputs[0] - outputs[1]).abs().max()))
        return outputs[0]

    for step in range(4):
        for optimizer in (zopt, plain):
            optimizer.train()
        zopt.comm_stats.reset()
        zopt.train()  # again, as Trainer does in each training step: nothing to move
        calls_in_train_mode.append(sum(zopt.comm_stats.calls.values()))
        batch = make_batch(spec, seed=step, rank=ctx.rank, batch=2)
        for optimizer, model in ((zopt, zero_model), (plain, ddp)):
            loss_fn(spec, model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 2:
            zeroshard.save_checkpoint(folder, zero_model, zopt)
            saved = copy.deepcopy((ddp_model.state_dict(), plain.state_dict()))
        if step % 2 == 1:
            with torch.no_grad():
                trained_point = zero_model(probe[0])
            moved.append(float((evaluate_both() - trained_point).abs().max()))
    # the rollback, in eval mode, to a checkpoint saved in train mode: the loaded mode is
    # train, and the eval() that follows moves (a reviewer's probe: it was skipped)
    zeroshard.load_checkpoint(folder, zero_model, zopt)
    ddp_model.load_state_dict(saved[0])
    plain.load_state_dict(saved[1])
    evaluate_both()
    loss_fn(spec, zero_model, make_batch(spec, seed=9, rank=ctx.rank, batch=2)).backward()
    try:
        zopt.step()  # in eval mode: the class refuses, on every rank alike
        refused = None
    except RuntimeError as error:
        refused = str(error)
    zopt.zero_grad()
    with zopt.summon_full_params():
        params = float(torch.stack([(p.detach() - q.detach()).abs().max()  # keeps a NaN
                                    for p, q in zip(zero_model.parameters(),
                                                    ddp_model.parameters())]).max())
    zopt.close()
    return {"evaluations": evaluations, "moved": moved, "params": params, "refused": refused,
            "calls_in_train_mode": calls_in_train_mode}


class LookaheadSGD(torch.optim.SGD):
    """SGD with timm's Lookahead slow weights as a method of the class: ``sync_lookahead()``
    moves each slow weight half way to its parameter and the parameter onto it (timm's
    ``Lookahead.update_slow``), which timm's loop calls at each epoch's end."""

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                slow = self.state[param].setdefault("slow", param.detach().clone())
                slow.add_(param - slow, alpha=0.5)
                param.copy_(slow)

    def parameter_count(self) -> int:
        """A method that reads: over a ZeroOptimizer's shards it would count this rank's."""
        return sum(p.numel() for group in self.param_groups for p in group["params"])


def a_method_of_the_optimizer_class(ctx, stage: int, policy: bool) -> dict:
    """Note [methods of the optimizer class]: ``LookaheadSGD.sync_lookahead`` reached
    through ``hasattr`` as timm's loop does, after every second step, beside DDP with the
    same class. Returns the largest parameter difference after each step and each
    sync, the error of a call with an argument on this rank, and what rank 0's
    ``hasattr`` of a method that reads raised (no collective: rank 1 does not call it)."""
    spec = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 2, "seq": 4,
            "tied": True, "frozen": False}
    base = build_model(spec, seed=100 + ctx.rank)
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    extra = {"units": UNITS["blocks"]} if stage == 3 else {}
    if policy:  # fp32 casts of fp32 masters: the sync moves the masters, then the casts
        extra["mixed_precision"] = zeroshard.MixedPrecision(torch.float32)
    zopt = zeroshard.ZeroOptimizer(zero_model, LookaheadSGD, stage=stage,
                                   process_group=ctx.group, lr=0.1, momentum=0.9, **extra)
    ddp = DDP(ddp_model, process_group=ctx.group)
    plain = LookaheadSGD(ddp_model.parameters(), lr=0.1, momentum=0.9)

    differences = []
    for step in range(4):
        batch = make_batch(spec, seed=step, rank=ctx.rank, batch=2)
        for optimizer, model in ((zopt, zero_model), (plain, ddp)):
            loss_fn(spec, model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        differences.append(largest_difference(zopt, zero_model, ddp_model))
        if step % 2 == 1:
            for optimizer in (zopt, plain):
                if hasattr(optimizer, "sync_lookahead"):  # timm's train loop
                    optimizer.sync_lookahead()
            differences.append(largest_difference(zopt, zero_model, ddp_model))
    try:
        zopt.sync_lookahead(zopt.param_groups[0])
        refused = None
    except TypeError as error:
        refused = str(error)
    try:  # on rank 0 alone, as a log line would: refused there, no collective
        reading = None if ctx.rank else hasattr(zopt, "parameter_count")
    except NotImplementedError as error:
        reading = str(error)
    zopt.close()
    return {"differences": differences, "refused": refused, "reading": reading}


def tensor_lr_round_trip(ctx, stage: int) -> list[tuple[float, float]]:
    """AdamW with a tensor lr that ExponentialLR halves in place, an in-process
    ``load_state_dict(state_dict())`` after two steps, beside DDP doing the same: the
    largest parameter difference and the lrs used, after each step."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    base = build_model(spec, seed=100 + ctx.rank)
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    zopt = zeroshard.ZeroOptimizer(zero_model, torch.optim.AdamW, stage=stage,
                                   process_group=ctx.group, lr=torch.tensor(0.05))
    ddp = DDP(ddp_model, process_group=ctx.group)
    plain = torch.optim.AdamW(ddp_model.parameters(), lr=torch.tensor(0.05))
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, 0.5) for o in (zopt, plain)]
    out = []
    for step in range(5):
        for optimizer, scheduler, model in ((zopt, schedulers[0], zero_model),
                                            (plain, schedulers[1], ddp)):
            if step == 2:
                optimizer.load_state_dict(optimizer.state_dict())
            if step >= 2:
                scheduler.step()
            loss_fn(spec, model, make_batch(spec, seed=step, rank=ctx.rank, batch=4)).backward()
            optimizer.step()
            optimizer.zero_grad()
        with zopt.summon_full_params():
            out.append((float(torch.stack([(p.detach() - q.detach()).abs().max() for p, q in
                                           zip(zero_model.parameters(), ddp_model.parameters())]).max()),
                        float(zopt.sharding.inner.param_groups[0]["lr"]) - float(plain.param_groups[0]["lr"])))
    return out


def fp32_adam_state_into_an_fp64_model(ctx, stage: int) -> float:
    """DDP over an fp32 model trains two Adam steps; its state dicts (on rank 0) load into
    an fp64 model with ``load_full_state_dict``, and into an fp64 DDP with torch's own
    ``load_state_dict`` (which casts the moments to fp64); two more steps each. The
    largest difference (the moments came back fp32 beside fp64 parameters, and the step
    raised: a reviewer's probe of Note [per-element states of their own dtype])."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    fp32 = build_model(spec, seed=100)
    ddp32 = DDP(fp32, process_group=ctx.group)
    adam32 = torch.optim.Adam(fp32.parameters(), lr=0.01)
    batches = [make_batch(spec, seed=step, rank=ctx.rank, batch=4) for step in range(4)]
    for batch in batches[:2]:
        loss_fn(spec, ddp32, batch).backward()
        adam32.step()
        adam32.zero_grad()
    saved = (fp32.state_dict(), adam32.state_dict()) if ctx.rank == 0 else (None, None)
    zero_model, ref_model = build_model(spec, seed=7).double(), build_model(spec, seed=7).double()
    zopt = zeroshard.ZeroOptimizer(zero_model, torch.optim.Adam, stage=stage,
                                   process_group=ctx.group, lr=0.01)
    zopt.load_full_state_dict(*saved)
    ref_model.load_state_dict(fp32.state_dict())
    reference = DDP(ref_model, process_group=ctx.group)
    ref_adam = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ref_adam.load_state_dict(adam32.state_dict())
    for batch in batches[2:]:
        batch = tuple(t.double() for t in batch)
        for optimizer, model in ((zopt, zero_model), (ref_adam, reference)):
            loss_fn(spec, model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    with zopt.summon_full_params():
        return float(torch.stack([(p.detach() - q.detach()).abs().max()
                                  for p, q in zip(zero_model.parameters(), ref_model.parameters())]).max())


def scaler_with_ranks_that_own_nothing(ctx) -> dict:
    """Muon alone over two matrices on four ranks (two own nothing), fp16 with
    GradScaler; in the third step rank 3's loss is inf. Every rank must record an inf
    check, skip that step and halve the scale; the ranks agree on the parameters."""
    torch.manual_seed(ctx.rank)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.Muon, stage=2, process_group=ctx.group,
                                  lr=0.02, mixed_precision=zeroshard.MixedPrecision(
                                      torch.float16, output_dtype=torch.float32))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scales, moved = [], []
    for step in range(4):
        with opt.summon_full_params():
            before = [p.detach().clone() for p in model.parameters()]
        loss = model(torch.randn(3, 4)).square().mean()
        if step == 2 and ctx.rank == 3:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        opt.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        with opt.summon_full_params():
            moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
            final = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    owned = sum(len(b.layout.owned(b.rank)) for b in opt.sharding.buckets)
    return {"scales": scales, "moved": moved, "final": final, "owned": owned}


def hyperparameters_of_two_classes(ctx) -> dict:
    """What schedulers see of Muon + AdamW groups: each group its own class's keys, the
    optimizer's defaults only the keys both share (the positional class's values)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    matrices = [m.weight for m in model]
    rest = [m.bias for m in model]
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=1, process_group=ctx.group,
                                  lr=0.01, param_groups=[
                                      {"params": matrices, "optimizer_class": torch.optim.Muon,
                                       "lr": 0.02}, {"params": rest}])
    out = {"defaults": dict(opt.defaults), "keys": [sorted(g) for g in opt.param_groups]}
    try:
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        out["one_cycle"] = None
    except ValueError as error:
        out["one_cycle"] = str(error)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    out["lrs"] = [g["lr"] for g in opt.param_groups]
    opt.close()
    return out


def arguments_that_differ_across_ranks(ctx, which: str) -> str | None:
    """Rank 1 builds other buckets than rank 0 (Adafactor instead of Muon for the
    matrices, or another bucket_size_mb): every rank must raise, and stay in step."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    classes = (torch.optim.Muon, torch.optim.Adafactor if which == "class" else torch.optim.Muon)
    bucket_mb = (25, 1e-4 if which == "bucket_size_mb" else 25)
    try:
        zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, process_group=ctx.group,
                                bucket_size_mb=bucket_mb[ctx.rank], param_groups=[
                                    {"params": [m.weight for m in model],
                                     "optimizer_class": classes[ctx.rank]},
                                    {"params": [m.bias for m in model]}])
        error = None
    except ValueError as refusal:
        error = str(refusal)
    probe = torch.ones(1)  # every rank is still in step
    dist.all_reduce(probe, group=ctx.group)
    assert probe.item() == ctx.world_size
    return error
