"""Worker-side functions for the lifecycle tests: freeing, close(), a second optimizer."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import os
import warnings
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import zeroshard
from models import build_model, loss_fn, make_batch

MLP = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
       "unused_branch": False}
BF16 = zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16,
                                output_dtype=torch.float32)


def _steps(model, opt, first: int, count: int, rank: int, scheduler=None) -> None:
    for step in range(first, first + count):
        loss_fn(MLP, model, make_batch(MLP, seed=step, rank=rank, batch=4)).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _zero(model, stage: int, group, policy=None, bucket_size_mb=1e-4, **kwargs):
    return zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=group,
                                   bucket_size_mb=bucket_size_mb, mixed_precision=policy, lr=0.05,
                                   **({"units": torch.nn.Linear} if stage == 3 else {}), **kwargs)


def freed_by_reference_counting(ctx, stage: int, bf16: bool):
    """With the garbage collector off, dropping the optimizer (and its scheduler) frees the
    optimizer, its stage and its buffers at once, and removes the stage's hooks."""
    was_enabled = gc.isenabled()
    # torch's first optimizer in a process imports torch._dynamo, leaving a traceback
    # cycle that holds that optimizer's frames until the collector runs: not ours.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    gc.collect()
    gc.disable()
    try:
        model = build_model(MLP, seed=ctx.rank)
        opt = _zero(model, stage, ctx.group, BF16 if bf16 else None, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        _steps(model, opt, 0, 2, ctx.rank, scheduler)
        view = opt.sharding  # a view kept by user code must not keep the stage alive
        refs = {"optimizer": weakref.ref(opt), "stage": weakref.ref(view.stage),
                "bucket": weakref.ref(view.buckets[0])}
        del opt, scheduler
        alive = sorted(name for name, ref in refs.items() if ref() is not None)
        hooks = len(model._forward_hooks) + len(model._forward_pre_hooks) + sum(
            len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
        try:
            view.buckets
            refused = ""
        except RuntimeError as error:
            refused = str(error)
        return alive, hooks, refused
    finally:
        if was_enabled:
            gc.enable()


def close_then_continue(ctx, stage: int, next_stage: int, bf16: bool):
    """Train 2 steps, close(), check the model is ordinary, then train 2 more steps under a
    second ZeroOptimizer; DDP does the same with a second torch optimizer.

    Returns per-parameter differences to DDP after close() and at the end, the dtypes
    after close(), whether a plain backward after close() filled every .grad, and
    whether the closed optimizer refuses to step."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    dtypes_before = [p.dtype for p in model.parameters()]
    opt = _zero(model, stage, ctx.group, BF16 if bf16 else None)
    _steps(model, opt, 0, 2, ctx.rank)
    _steps(reference, ref_opt, 0, 2, ctx.rank)
    masters = {k: v.clone() for k, v in opt.sharding.gather_masters().items()} if bf16 else None
    opt.close()
    after_close = {name: (p - q).abs().max().item() for (name, p), q in
                   zip(model.named_parameters(), reference.module.parameters())}
    master_diff = max((p - masters[id(p)]).abs().max().item() for p in model.parameters()) \
        if bf16 else 0.0
    dtypes_ok = [p.dtype for p in model.parameters()] == dtypes_before
    try:
        opt.step()
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    loss_fn(MLP, model, make_batch(MLP, seed=99, rank=ctx.rank, batch=4)).backward()
    plain_grads = all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)

    opt2 = _zero(model, next_stage, ctx.group)  # a second optimizer on the closed model
    ref_opt2 = torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(model, opt2, 2, 2, ctx.rank)
    _steps(reference, ref_opt2, 2, 2, ctx.rank)
    with opt2.summon_full_params():
        at_end = {name: (p - q).abs().max().item() for (name, p), q in
                  zip(model.named_parameters(), reference.module.parameters())}
    opt2.close()
    return after_close, master_diff, dtypes_ok, refused, plain_grads, at_end


def handed_back_in_own_memory(ctx, stage: int, bf16: bool):
    """close() after 2 steps, weights and biases sharing buckets, a frozen layer: whether
    the parameters hold memory of their own in their dtypes, what safetensors (which
    refuses tensors sharing memory) writes and reads back against them, their distance
    from DDP's, and a state dict taken before close() (at stage 3 inside
    summon_full_params()) read after it: without a policy, where the parameters stay
    views of the buffers, against them; with or without, against its copy taken then."""
    from safetensors.torch import load, save

    model, plain = build_model(MLP, seed=ctx.rank), build_model(MLP, seed=0)
    for net in (model, plain):  # a frozen layer: stages 1-2 put it in no bucket
        net.body[0].requires_grad_(False)
    reference = DDP(plain, process_group=ctx.group)
    dtypes = [p.dtype for p in model.parameters()]
    opt = _zero(model, stage, ctx.group, BF16 if bf16 else None, bucket_size_mb=25)
    assert all(len(b.params) > 1 for b in opt.sharding.buckets), "the test needs shared buckets"
    _steps(model, opt, 0, 2, ctx.rank)
    _steps(reference, torch.optim.SGD(reference.parameters(), lr=0.05), 0, 2, ctx.rank)
    # views of the parameters, read after close() (with a policy: param_dtype values,
    # which warns); emptied, their memory made that read a segmentation fault
    with opt.summon_full_params() if stage == 3 else contextlib.nullcontext():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            taken = model.state_dict()
        then = {name: value.clone() for name, value in taken.items()}
    opt.close()
    params = list(model.parameters())
    kept = max((taken[name] - then[name]).abs().max().item() for name in taken)
    aliases = None if bf16 else max(
        (taken[name] - p).abs().max().item() for name, p in model.named_parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    own_memory = len(storages) == len(params) and all(
        p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params) and \
        [p.dtype for p in params] == dtypes
    try:
        read_back = load(save({k: v for k, v in model.state_dict().items()}))
        written = max((read_back[name] - p).abs().max().item()
                      for name, p in model.named_parameters())
    except RuntimeError as error:
        written = str(error)
    from_ddp = max((p.float() - q).abs().max().item()
                   for p, q in zip(params, reference.module.parameters()))
    return own_memory, written, from_ddp, aliases, kept


def with_block_closes(ctx, stage: int):
    """``with ZeroOptimizer(...) as opt:`` closes on exit; a second one inside is refused."""
    model = build_model(MLP, seed=ctx.rank)
    refusals = []
    with _zero(model, stage, ctx.group) as opt:
        _steps(model, opt, 0, 1, ctx.rank)
        for target in (model, model.body):  # the same model, or a part of it
            try:
                _zero(target, stage, ctx.group)
                refusals.append("no error")
            except ValueError as error:
                refusals.append(str(error))
    with _zero(model, stage, ctx.group) as opt:
        view = opt.sharding  # taken while open: refused once closed, like the optimizer
        with opt.summon_full_params():
            try:
                opt.close()
                refusals.append("no error")
            except RuntimeError as error:
                refusals.append(str(error))
    readable = all(torch.isfinite(p).all().item() for p in model.parameters())
    for use_after_close in (opt.step, opt.zero_grad, opt.state_dict, opt.full_state_dict,
                            lambda: zeroshard.save_checkpoint("unused", model, opt),
                            view.gather_masters, lambda: view.buckets):
        try:
            use_after_close()
            refusals.append("no error")
        except RuntimeError as error:
            refusals.append(str(error))
    return refusals, readable


def dropped_stage3_is_refused(ctx):
    """A stage-3 optimizer dropped without close() leaves no values in the parameters; a
    new ZeroOptimizer says so (and how to avoid it) instead of broadcasting garbage. A
    model of many small parameters in one bucket: its placeholders (one element per
    parameter) take more bytes than each parameter, which must still count as empty."""
    torch.manual_seed(ctx.rank)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(8)])
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.05, bucket_size_mb=25)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    del opt
    try:
        _zero(model, 2, ctx.group)
    except ValueError as error:
        return str(error)
    return "no error"


def dropped_then_rebuilt(ctx, stage: int, next_stage: int):
    """Stages 1-2 keep full parameters, so an optimizer dropped without close() (its
    hooks go with it) may be followed by a new one; training continues like DDP's
    with a second torch optimizer. Returns per-parameter differences at the end."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group), torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(model, opt, 0, 2, ctx.rank)
    _steps(reference, ref_opt, 0, 2, ctx.rank)
    del opt
    opt = _zero(model, next_stage, ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(model, opt, 2, 2, ctx.rank)
    _steps(reference, ref_opt, 2, 2, ctx.rank)
    with opt.summon_full_params():
        return {name: (p - q).abs().max().item() for (name, p), q in
                zip(model.named_parameters(), reference.module.parameters())}


def copy_is_an_ordinary_module(ctx, stage: int):
    """``copy.deepcopy(model)`` (an EMA or student copy) is an ordinary module: training
    the copy on rank 0 only issues no collective and leaves the original, which goes
    on training under its ZeroOptimizer, equal to DDP. Returns the differences to DDP
    and whether the copy's own gradients are plain full-size tensors."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group), torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(model, opt, 0, 1, ctx.rank)
    _steps(reference, ref_opt, 0, 1, ctx.rank)
    student = copy.deepcopy(model)
    plain_grads = True
    if ctx.rank == 0:
        student_opt = torch.optim.SGD(student.parameters(), lr=0.05)
        loss_fn(MLP, student, make_batch(MLP, seed=50, rank=0, batch=4)).backward()
        plain_grads = all(p.grad is not None and p.grad.shape == p.shape
                          for p in student.parameters() if p.requires_grad)
        student_opt.step()
    ema = torch.optim.swa_utils.AveragedModel(model)  # a deep copy too
    ref_ema = torch.optim.swa_utils.AveragedModel(reference.module)
    for step in (1, 2):
        _steps(model, opt, step, 1, ctx.rank)
        _steps(reference, ref_opt, step, 1, ctx.rank)
        ema.update_parameters(model)
        ref_ema.update_parameters(reference.module)
    diffs = {name: (p - q).abs().max().item() for (name, p), q in
             zip(model.named_parameters(), reference.module.parameters())}
    diffs.update({f"ema.{name}": (p - q).abs().max().item() for (name, p), q in
                  zip(ema.named_parameters(), ref_ema.parameters())})
    return diffs, plain_grads


def copies_taken_saved_and_differentiated(ctx, stage: int, bf16: bool):
    """A copy of a managed model (``copy.deepcopy``, and ``torch.save(model)`` loaded back)
    carries no hook that acts: after ``opt.close()`` ``torch.func.grad`` over the copy's
    parameters gives what it gives over a plain module holding the same values (a copy
    kept zeroshard's refusal of gradient transforms for good, and ``torch.save`` of a
    model under a policy failed on a local function: a helper's probe). Returns the
    largest difference from the plain module per copy, or the error raised."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, BF16 if bf16 else None)
    _steps(model, opt, 0, 1, ctx.rank)
    with opt.summon_full_params():
        copies = {"deepcopy": copy.deepcopy(model)}
        saved = io.BytesIO()
        torch.save(model, saved)
    saved.seek(0)
    copies["torch.save"] = torch.load(saved, weights_only=False)
    opt.close()
    x, _ = make_batch(MLP, seed=9, rank=ctx.rank, batch=4)
    results = {}
    for kind, copied in copies.items():
        plain = build_model(MLP, seed=0).to(next(copied.parameters()).dtype)
        plain.load_state_dict(copied.state_dict())

        def grads(module, inputs):
            params = dict(module.named_parameters())
            return torch.func.grad(lambda p: torch.func.functional_call(
                module, p, (inputs,)).float().square().sum())(params)
        try:  # the copy keeps the policy's cast of its inputs (README: Ending a run)
            expected = grads(plain, x.to(next(plain.parameters()).dtype))
            got = grads(copied, x)
            results[kind] = float(torch.stack([(got[n] - expected[n]).abs().max()  # keeps a NaN
                                               for n in expected]).max())
        except RuntimeError as error:
            results[kind] = str(error)
    return results


def _error_of(action) -> str | None:
    try:
        action()
    except RuntimeError as error:
        return str(error)
    return None


def ddp_sync_switch_set(ctx, stage: int) -> list[str]:
    """Note [DDP's switch of gradient sync]: nanoGPT's ``model.require_backward_grad_sync``
    on a managed model; the warnings of three training steps with it True on the last
    micro-batch only (two micro-batches a step), as nanoGPT sets it."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            for micro in range(2):
                model.require_backward_grad_sync = micro == 1
                loss_fn(MLP, model, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()
            opt.step()
            opt.zero_grad()
    opt.close()
    return [(str(w.message), os.path.basename(w.filename)) for w in caught
            if "zeroshard" in str(w.message)]


def ddp_around_a_managed_model(ctx, stage: int):
    """Note [refusing DistributedDataParallel]: DDP over a managed model, or over a module
    holding one, is refused on every rank; a deep copy, the model after close() and one
    whose optimizer was dropped are ordinary modules that DDP takes, and a user's own
    ignore list comes back."""
    model = build_model(MLP, seed=ctx.rank)
    model._ddp_params_and_buffers_to_ignore = ["nothing"]
    opt = _zero(model, stage, ctx.group)
    wrap_model = _error_of(lambda: DDP(model, process_group=ctx.group))
    parent = torch.nn.Sequential(model)
    if stage == 3:  # DDP's constructor broadcasts the parent's parameters: placeholders at stage 3
        wrap_parent = None
    else:
        parent_ddp = DDP(parent, process_group=ctx.group)
        wrap_parent = _error_of(lambda: parent_ddp(make_batch(MLP, seed=0, rank=ctx.rank, batch=4)[0]))
    with opt.summon_full_params():
        copied = copy.deepcopy(model)
    copy_ignores = list(copied._ddp_params_and_buffers_to_ignore)
    DDP(copied, process_group=ctx.group)
    _steps(model, opt, 0, 1, ctx.rank)
    opt.close()
    wrapped_after_close = DDP(model, process_group=ctx.group)
    loss_fn(MLP, wrapped_after_close, make_batch(MLP, seed=1, rank=ctx.rank, batch=4)).backward()
    dropped_then_wrapped = None
    if stage != 3:  # an optimizer dropped without close() takes its refusal with it
        other = build_model(MLP, seed=ctx.rank)
        dropped = _zero(other, stage, ctx.group)
        del dropped
        dropped_then_wrapped = _error_of(lambda: DDP(other, process_group=ctx.group)) is None
    return {"wrap_model": wrap_model, "wrap_parent": wrap_parent, "copy_ignores": copy_ignores,
            "ignores_after_close": list(model._ddp_params_and_buffers_to_ignore),
            "dropped_then_wrapped": dropped_then_wrapped}
