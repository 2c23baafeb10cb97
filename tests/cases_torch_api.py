"""Cases: what torch's ``Optimizer`` API promises, kept by ZeroOptimizer: its hooks
(global step hooks, state-dict hooks) and sparse gradients."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import zeroshard
from cases import differences_per_step, largest_difference


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(net, optimizer, steps, rank: int) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(10 * step + rank)
        net(torch.randn(4, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def optimizer_hooks_as_under_ddp(ctx, stage: int) -> dict:
    """A global step pre-hook that halves every gradient it is shown (a gradient-scaling
    hook) and a global post-hook, a state-dict post-hook adding a key, a load pre-hook
    setting the resumed run's lr, a load post-hook: on ZeroOptimizer and on DDP + SGD
    with momentum, 2 steps, a state-dict round trip, 2 more steps. Returns what fired on
    each, the saved key, the lr after the load and the largest parameter difference; and
    what each rank raised when a load pre-hook raised on rank 1 only."""
    fired: dict[str, list] = {"zeroshard": [], "ddp": []}
    running = ["zeroshard"]

    def halve_gradients(optimizer, args, kwargs) -> None:
        fired[running[0]].append(("step pre-hook", type(optimizer).__name__))
        for group in optimizer.param_groups:
            for tensor in group["params"]:
                if tensor.grad is not None:
                    tensor.grad.mul_(0.5)

    def after_step(optimizer, args, kwargs) -> None:
        fired[running[0]].append(("step post-hook", type(optimizer).__name__))

    def resume_with_a_new_lr(optimizer, state_dict):
        for group in state_dict["param_groups"]:
            group["lr"] = 0.05
        return state_dict

    model, reference = _mlp(), _mlp()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9,
                                  process_group=ctx.group, bucket_size_mb=100 * 4 / 2**20,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    outcome = {}
    handles = [register_optimizer_step_pre_hook(halve_gradients),
               register_optimizer_step_post_hook(after_step)]
    try:
        for key, net, optimizer in (("zeroshard", model, opt), ("ddp", ddp, ref_opt)):
            running[0] = key
            optimizer.register_state_dict_post_hook(lambda o, sd: {**sd, "epoch": 7})
            optimizer.register_load_state_dict_pre_hook(resume_with_a_new_lr)
            optimizer.register_load_state_dict_post_hook(
                lambda o, key=key: fired[key].append(("load post-hook", type(o).__name__)))
            _train(net, optimizer, range(2), ctx.rank)
            saved = optimizer.state_dict()
            optimizer.load_state_dict(copy.deepcopy(saved))
            _train(net, optimizer, range(2, 4), ctx.rank)
            outcome[key] = {"fired": fired[key], "epoch": saved.get("epoch"),
                            "lr": [g["lr"] for g in optimizer.param_groups]}
    finally:
        for handle in handles:
            handle.remove()
    outcome["difference"] = largest_difference(opt, model, reference)

    def refuse_on_rank_1(optimizer, state_dict):
        if ctx.rank == 1:
            raise ValueError("this rank's hook refused the state dict")

    opt.register_load_state_dict_pre_hook(refuse_on_rank_1)
    try:
        opt.load_state_dict(opt.state_dict())
    except Exception as error:  # noqa: BLE001 - the test reads what it is
        outcome["refused"] = str(error)
    else:
        outcome["refused"] = None
    opt.close()
    return outcome


class _ClampingSGD(torch.optim.SGD):
    """An optimizer class whose instances register a step pre-hook in ``__init__``: each
    gradient element clamped to [-0.01, 0.01] before the step."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.pre_hook_calls = 0
        self.register_step_pre_hook(self._clamp)

    @staticmethod
    def _clamp(optimizer, args, kwargs) -> None:
        optimizer.pre_hook_calls += 1
        for group in optimizer.param_groups:
            for tensor in group["params"]:
                if tensor.grad is not None:
                    tensor.grad.clamp_(-0.01, 0.01)


class _ShrinkingAdamW(torch.optim.AdamW):
    """An optimizer class whose instances register a step post-hook in ``__init__``:
    every parameter scaled by 0.99 after the step."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.post_hook_calls = 0
        self.register_step_post_hook(self._shrink)

    @staticmethod
    def _shrink(optimizer, args, kwargs) -> None:
        optimizer.post_hook_calls += 1
        with torch.no_grad():
            for group in optimizer.param_groups:
                for tensor in group["params"]:
                    tensor.mul_(0.99)


def an_optimizer_class_own_hooks_like_ddp(ctx, stage: int, class_name: str) -> dict:
    """An optimizer class that registers step hooks on its instances (``_ClampingSGD``,
    ``_ShrinkingAdamW`` with foreach kernels over buckets small enough that its step
    comes in parts, Note [a step in parts]) under ZeroOptimizer and under DDP, 3 steps:
    the largest parameter difference per step, and how often the inner optimizer's hook
    ran. The inner optimizers stepped without their own hooks, silently (a helper's
    probe: 0.11 and 0.033 from DDP after one step)."""
    optimizer_class = {"_ClampingSGD": _ClampingSGD, "_ShrinkingAdamW": _ShrinkingAdamW}[
        class_name]
    kwargs = ({"lr": 0.5, "momentum": 0.9} if optimizer_class is _ClampingSGD
              else {"lr": 0.01, "weight_decay": 0.1, "foreach": True})
    model, reference = _mlp(), _mlp()
    opt = zeroshard.ZeroOptimizer(model, optimizer_class, stage=stage, process_group=ctx.group,
                                  bucket_size_mb=40 * 4 / 2**20, **kwargs,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    inner = opt._inner.optimizers[0]
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = optimizer_class(reference.parameters(), **kwargs)

    def loss_of(net, step):
        generator = torch.Generator().manual_seed(10 * step + ctx.rank)
        return net(torch.randn(4, 6, generator=generator)).square().mean()

    differences = differences_per_step(ctx, model, opt, ddp, ref_opt, loss_of, 3,
                                       average=False)
    calls = getattr(inner, "pre_hook_calls", None) or getattr(inner, "post_hook_calls", None)
    return {"differences": differences, "calls": calls}


class _SparseBag(nn.Module):
    """A sparse token embedding (``nn.Embedding(sparse=True)``), averaged, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(40, 8, sparse=True)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def sparse_embedding_like_ddp(ctx, stage: int, optimizer_name: str) -> list[float]:
    """``_SparseBag`` under ZeroOptimizer and under DDP (which reduces the sparse
    gradient as it is), each rank drawing its own tokens; per step, the largest
    parameter difference. Stage 1 crashed in backward on the sparse gradient's data
    pointer (a helper's probe); stages 2 and 3 reduce it densely."""
    optimizer_class = getattr(torch.optim, optimizer_name)
    kwargs = {"lr": 0.1, **({"momentum": 0.9} if optimizer_name == "SGD" else {})}
    torch.manual_seed(0)
    model = _SparseBag()
    reference = copy.deepcopy(model)
    opt = zeroshard.ZeroOptimizer(model, optimizer_class, stage=stage, process_group=ctx.group,
                                  bucket_size_mb=64 * 4 / 2**20, **kwargs,
                                  **({"units": nn.Embedding} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = optimizer_class(reference.parameters(), **kwargs)

    def loss_of(net, step):
        generator = torch.Generator().manual_seed(10 * step + ctx.rank)
        tokens = torch.randint(0, 40, (6, 3), generator=generator)
        return (net(tokens) - 1).square().mean()
    return differences_per_step(ctx, model, opt, ddp, ref_opt, loss_of, 3, average=False)


class _ScaledMLP(nn.Module):
    """``_mlp()`` of its input times a buffer (Fourier features' fixed matrix, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.register_buffer("scale", torch.full((6,), 0.5))

    def forward(self, x):
        return self.body(x * self.scale)


def gradient_transform_refused(ctx, stage: int) -> tuple:
    """``torch.func.grad`` over ``functional_call(model, ...)``: it crashed inside the
    transform's backward with torch's raw errors (a helper's probe); now refused, as is
    (stage 3) ``jacrev`` of a unit called alone, which crashed the process (a reviewer's
    probe). Then ``torch.func.vmap`` evaluates the model (untouched by the refusal), and
    training goes on equal to data parallel (gradients averaged here), at stages 1 and 2
    with a physics-informed loss that takes ``vmap(jacrev(model))`` of the inputs (a
    first version of the refusal refused it, and the buffers' synchronisation inside the
    transform crashed it: reviewers' probes). Returns the refusals, vmap's largest
    difference from the model's own outputs, and the per-step parameter differences."""
    torch.manual_seed(0)
    model = _ScaledMLP()
    reference = copy.deepcopy(model)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9,
                                  process_group=ctx.group,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(ctx.rank))
    params = {name: p.detach() for name, p in model.named_parameters()}
    attempts = [lambda: torch.func.grad(
        lambda p: torch.func.functional_call(model, p, (x[0],)).sum())(params)]
    if stage == 3:
        attempts.append(lambda: torch.func.jacrev(model.body[0])(x[0]))
    refusals = []
    for attempt in attempts:
        try:
            attempt()
        except RuntimeError as error:
            refusals.append(str(error))
        else:
            refusals.append(None)
    with opt.summon_full_params(), torch.no_grad():
        batched = torch.func.vmap(model)(x)
        vmapped = float((batched - torch.stack([model(row) for row in x])).abs().max())

    def loss_of(net, step):
        inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        if stage == 3:
            return net(inputs).square().mean()
        # a saliency map logged on the way (its backward over the inputs alone crashed
        # at the end of backward: a reviewer's probe), then the outputs' slopes in the
        # inputs penalised, beside the outputs (even steps) or alone (odd steps: the
        # step's backward starts at no output of a training forward; the last bias,
        # which no slope depends on, gets a zero gradient rather than none, which
        # zeroshard would step with momentum where torch skips it, as documented)
        torch.func.grad(lambda x: net(x).sum())(inputs)
        slopes = torch.func.vmap(torch.func.jacrev(net))(inputs).square().mean()
        if step % 2 == 1:
            return slopes + 0 * getattr(net, "module", net).body[2].bias.sum()
        return slopes + net(inputs).square().mean()
    return refusals, vmapped, differences_per_step(ctx, model, opt, reference, ref_opt,
                                                   loss_of, 3)


class _PlainSGD(torch.optim.Optimizer):
    """SGD written out, recording at each step how many global step pre-hooks torch
    holds for the process (another thread's optimizer steps with those meanwhile)."""

    registered_at_step: list[int] = []

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim import optimizer as optimizer_module
        type(self).registered_at_step.append(len(optimizer_module._global_optimizer_pre_hooks))
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])


def global_hooks_while_stepping(ctx, stage: int) -> tuple[list[int], int]:
    """A global step pre-hook registered, one step: what the inner optimizer saw of the
    process's global hooks while it stepped (a first version of the fix that fires them
    once per step set them aside process-wide, and another thread's optimizer lost them:
    a reviewer's probe), and how many times the hook fired."""
    fired = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: fired.append(type(o).__name__))
    _PlainSGD.registered_at_step = []
    try:
        model = _mlp()
        opt = zeroshard.ZeroOptimizer(model, _PlainSGD, stage=stage, lr=0.1,
                                      process_group=ctx.group,
                                      **({"units": nn.Linear} if stage == 3 else {}))
        _train(model, opt, range(1), ctx.rank)
        opt.close()
    finally:
        handle.remove()
    return _PlainSGD.registered_at_step, fired


def saving_a_dtype_safetensors_lacks(ctx, stage: int) -> str | None:
    """``save_full_model`` of a complex128 parameter, which safetensors cannot hold: it
    raised a bare KeyError on rank 0 alone (a reviewer's probe). Returns this rank's
    refusal; every rank then meets in one all-reduce (none is left in a collective)."""
    torch.manual_seed(0)
    model = _mlp()
    model.spectrum = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    folder = Path(tempfile.gettempdir()) / f"zeroshard-c128-{os.getppid()}-{stage}"
    try:
        zeroshard.save_full_model(folder, model, opt)
    except ValueError as error:
        refusal = str(error)
    else:
        refusal = None
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    opt.close()
    return refusal


def another_optimizer_over_managed_parameters(ctx, stage: int) -> dict:
    """A plain SGD over the head's parameters next to a ZeroOptimizer over the whole model
    (two optimizers, as with Muon for the matrices): at stage 1 it stepped each rank's
    replica with that rank's local gradient, silently; at stages 2-3 the NaN markers
    refused it as a change of ``p.grad``. Returns its step's refusal, whether that step
    left the parameters as they were, the refusal of a gradient added into a buffer by
    hand (stages 2-3), and whether, once the ZeroOptimizer is closed, the same SGD steps
    the ordinary module."""
    model = _mlp()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=0.01,
                                  process_group=ctx.group,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    head = torch.optim.SGD(model[2].parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(ctx.rank)
    model(torch.randn(4, 6, generator=generator)).square().mean().backward()
    opt.step()
    with opt.summon_full_params():
        before = [p.detach().clone() for p in model.parameters()]
    try:
        head.step()
    except RuntimeError as error:
        refusal = str(error)
    else:
        refusal = None
    with opt.summon_full_params():
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    read_refusal = None
    if stage > 1:
        try:
            torch.zeros(16, 6).add_(model[0].weight.grad)
        except RuntimeError as error:
            read_refusal = str(error)
    opt.zero_grad()
    opt.close()
    model(torch.randn(4, 6, generator=generator)).square().mean().backward()
    head.step()
    return {"refusal": refusal, "unchanged": unchanged, "read_refusal": read_refusal,
            "stepped_after_close": not torch.equal(model[2].weight, before[2])}
