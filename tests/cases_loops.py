"""Worker-side functions for ordinary training-loop variations (writes to the model
between steps, changing which parameters train)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import io
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._pytree import tree_flatten

import zeroshard
from cases import (average_by_hand, average_used_gradients, differences_per_step,
                   largest_difference)
from models import Block, build_model, loss_fn, make_batch

MLP = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
       "unused_branch": False}
TRANSFORMER = {"kind": "transformer", "vocab": 13, "d": 8, "heads": 2, "layers": 2, "seq": 5,
               "tied": True, "frozen": False}
REUSED_BLOCK = {**TRANSFORMER, "reuse": True}  # block 0 runs twice: each weight cast twice
BF16 = zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16,
                                output_dtype=torch.float32)


def _steps(spec, model, opt, first: int, count: int, rank: int) -> None:
    for step in range(first, first + count):
        loss_fn(spec, model, make_batch(spec, seed=step, rank=rank, batch=4)).backward()
        opt.step()
        opt.zero_grad()


def _zero(model, stage: int, group, mesh=None, **kwargs):
    """SGD at ``stage`` over ``group``, or over ``mesh`` when one is given."""
    ranks = {"mesh": mesh} if mesh is not None else {"process_group": group}
    return zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, bucket_size_mb=1e-4,
                                   **ranks, **kwargs,
                                   **({"units": torch.nn.Linear} if stage == 3 else {}))


def _differences(opt, model, reference) -> dict[str, float]:
    """Largest difference per parameter name between zeroshard's model and the reference
    (DDP or a plain module), read inside summon_full_params() (stage 3's placeholders)."""
    plain = reference.module if isinstance(reference, DDP) else reference
    with opt.summon_full_params():
        return {name: (p - q).abs().max().item()
                for (name, p), q in zip(model.named_parameters(), plain.parameters())}


def _refusal(action) -> str:
    """The message of the RuntimeError ``action()`` raises, or "no error"."""
    try:
        action()
    except RuntimeError as error:
        return str(error)
    return "no error"


def _ranks_in_step(ctx) -> float:
    """One all-reduce of a one: the world size comes back only if every rank got here, so
    no rank was left in another collective."""
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    return probe.item()


LOADS = ["model.load_state_dict", "each module's load_state_dict", "in-place writes",
         "writes through .data"]


def _load_by(model, pretrained: dict, how: str) -> None:
    """Give ``model`` the ``pretrained`` values, as ``how`` (one of LOADS) does."""
    if how == "model.load_state_dict":
        model.load_state_dict(pretrained)
        return
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = {name: pretrained[f"{prefix}.{name}" if prefix else name]
                   for name, p in module.named_parameters(recurse=False)}
            if own and how == "each module's load_state_dict":
                module.load_state_dict(own, strict=False)
            for name, value in own.items():
                if how == "in-place writes":
                    getattr(module, name).copy_(value)
                if how == "writes through .data":  # WGAN's p.data.clamp_(...)
                    getattr(module, name).data.copy_(value)


def load_state_dict_mid_run(ctx, stage: int, how: str):
    """With bf16 mixed precision: train a step, then give the model ``pretrained``
    fp32 values that bf16 cannot hold, as ``how`` does (stage 3: inside
    summon_full_params). The fp32 masters must hold loaded values exactly, at once
    (full_state_dict right after the load) and after a step with lr 0; written values
    reach them as the parameters hold them, in bf16 (the masters' cast compared); the
    parameters hold their bf16 cast. Returns the largest differences: masters after
    the load, the full state dict, masters after the step, parameters to the cast."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, mixed_precision=BF16, lr=0.05)
    _steps(MLP, model, opt, 0, 1, ctx.rank)
    pretrained = build_model(MLP, seed=77).state_dict()  # the same on every rank
    if how.endswith("writes") or how.endswith(".data"):  # what a parameter holds: its master
        pretrained = {name: value.to(torch.bfloat16).float() for name, value in pretrained.items()}
    if stage == 3:
        with opt.summon_full_params():
            _load_by(model, pretrained, how)
    else:
        _load_by(model, pretrained, how)
    names = {id(p): name for name, p in model.named_parameters()}

    def master_diff():
        return max((value - pretrained[names[key]]).abs().max().item()
                   for key, value in opt.sharding.gather_masters().items())

    after_load = master_diff()
    exported = opt.full_state_dict()
    exported_diff = 0.0 if exported is None else max(
        (exported[0][name] - pretrained[name]).abs().max().item() for name in names.values())
    for group in opt.param_groups:
        group["lr"] = 0.0
    _steps(MLP, model, opt, 1, 1, ctx.rank)
    after_step = master_diff()
    with opt.summon_full_params():
        params = max((p - pretrained[name].to(p.dtype)).abs().max().item()
                     for name, p in model.named_parameters())
    return after_load, exported_diff, after_step, params


def writes_to_the_stepped_tensors(ctx, stage: int, via_data: bool):
    """With bf16 mixed precision, a wrapper (Lookahead, SWA) halves the tensors in
    ``opt.param_groups`` (the fp32 masters), through them or their ``.data``, and
    evaluates inside ``summon_full_params()`` (whose end took the old cast back into
    stage 3's masters: a helper's probe): stage 3 evaluates the halves' casts (through
    ``.data`` too: Note [masters written through .data]), stages 1-2 refuse the forward
    through the masters (Note [masters written between steps]: it ran on the old
    parameters), not through their ``.data`` (not seen). Then
    (through them, stages 1-2), after full_state_dict(), a parameter is negated; a step
    with lr 0 follows. Returns the largest differences of the masters from half their
    old values and of the parameters from its bf16 cast (the old cast in the shard
    undid the write: a reviewer's probe), of the parameters the evaluation saw from
    the halves' casts, and the evaluation's refusal (or None)."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, mixed_precision=BF16, lr=0.05)
    _steps(MLP, model, opt, 0, 1, ctx.rank)
    halves = {key: value * 0.5 for key, value in opt.sharding.gather_masters().items()}
    with torch.no_grad():
        for group in opt.param_groups:
            group["lr"] = 0.0
            for tensor in group["params"]:
                (tensor.data if via_data else tensor).mul_(0.5)
    refusal = None
    with opt.summon_full_params(), torch.no_grad():  # an evaluation before the next step
        seen = max((p - halves[id(p)].to(p.dtype)).abs().max().item() for p in model.parameters())
        try:
            loss_fn(MLP, model, make_batch(MLP, seed=7, rank=ctx.rank, batch=4))
        except RuntimeError as error:
            refusal = str(error)
    opt.full_state_dict()  # takes the writes in; then the first parameter is written too
    if not via_data and stage < 3:  # (else the parameters hold the old cast until the step,
        first = next(model.parameters())  # Note [writes on either side]: negated, that one)
        with opt.summon_full_params(), torch.no_grad():
            first.neg_()
        halves[id(first)] = -halves[id(first)].to(first.dtype).float()  # what it can hold
    opt.step()  # no gradients; the parameters follow the masters (lr 0 anyway)
    _steps(MLP, model, opt, 1, 1, ctx.rank)
    masters = max((value - halves[key]).abs().max().item()
                  for key, value in opt.sharding.gather_masters().items())
    with opt.summon_full_params():
        params = max((p - halves[id(p)].to(p.dtype)).abs().max().item() for p in model.parameters())
    return masters, params, seen, refusal


WRITES_TO_THE_MASTERS = ["after_the_step", "inside_summon", "inside_full_precision_summon",
                         "evaluated_in_full_precision", "between_forward_and_backward",
                         "between_forward_and_backward_kept_gathered", "evaluated_inside_summon",
                         "after_the_step_through_data", "evaluated_through_data"]


def masters_written_around_a_forward(ctx, stage: int, when: str):
    """Note [masters written between steps], bf16 policy: after a step, ``opt.param_groups``'
    tensors (the fp32 masters) are halved (lr 0 from then on), ``when``: after the step;
    inside ``summon_full_params()``; inside ``summon_full_params(full_precision=True)``;
    after the step, followed by an evaluation forward inside a full-precision block;
    between the next forward and its backward (at stage 3 also with the units kept
    gathered from the forward: ``reshard_after_forward=False``); or inside
    ``summon_full_params()``, followed by an evaluation forward there; or through the
    masters' ``.data`` after the step, also followed by an evaluation forward under
    ``no_grad`` (pytorch_optimizer's ``Lookahead.backup_and_load_cache()`` loads its
    slow weights to evaluate so). Then a forward and backward (and the step). Returns
    the refusal (or None), the largest difference of the Linear weights the last
    forward computed with from the halves (cast as the forward saw them), and of the
    masters from the halves at the end."""
    model = build_model(MLP, seed=ctx.rank)
    kept = {"reshard_after_forward": False} if when.endswith("kept_gathered") and stage == 3 else {}
    opt = _zero(model, stage, ctx.group, mixed_precision=BF16, lr=0.05, **kept)
    _steps(MLP, model, opt, 0, 1, ctx.rank)
    halves = {key: value * 0.5 for key, value in opt.sharding.gather_masters().items()}
    used = {}  # id(weight) -> what the forward computed with (gathered, at stage 3)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(
                lambda m, args: used.__setitem__(id(m.weight), m.weight.detach().clone()))

    def halve(through_data: bool = False) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                group["lr"] = 0.0
                for tensor in group["params"]:
                    (tensor.data if through_data else tensor).mul_(0.5)

    batch = make_batch(MLP, seed=1, rank=ctx.rank, batch=4)
    refusal = None
    seen_inside = {}  # what an evaluation before the training forward computed with
    try:
        if when in ("after_the_step", "evaluated_in_full_precision"):
            halve()
        if when == "inside_summon":
            with opt.summon_full_params():
                halve()
        if when == "inside_full_precision_summon":
            with opt.summon_full_params(full_precision=True):
                halve()
        if when == "evaluated_inside_summon":
            with opt.summon_full_params(), torch.no_grad():
                halve()
                loss_fn(MLP, model, batch)
        if when.endswith("through_data"):
            halve(through_data=True)
        if when == "evaluated_in_full_precision":
            with opt.summon_full_params(full_precision=True), torch.no_grad(), \
                    torch.autocast("cpu", torch.bfloat16):  # the policy casts the inputs
                loss_fn(MLP, model, batch)
            seen_inside = dict(used)
        if when == "evaluated_through_data":
            with torch.no_grad():
                loss_fn(MLP, model, batch)
            seen_inside = dict(used)
        loss = loss_fn(MLP, model, batch)
        if when.startswith("between_forward_and_backward"):
            halve()
        loss.backward()
        opt.step()
        opt.zero_grad()
    except RuntimeError as error:
        refusal = str(error)
    if when in ("evaluated_in_full_precision", "evaluated_through_data"):
        used = seen_inside
    seen = max(((used[key] - halves[key].to(used[key].dtype)).abs().max().item() for key in used),
               default=None)  # None: no forward computed
    masters = max((value - halves[key]).abs().max().item()
                  for key, value in opt.sharding.gather_masters().items())
    return refusal, seen, masters


class SGDThenDecay(torch.optim.SGD):
    """SGD whose step then scales the tensors it steps by 0.9: a write to the optimizer's
    own tensors inside its step, where wrappers such as Lookahead make theirs."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            torch._foreach_mul_(group["params"], 0.9)
        return loss


def decay_written_after_the_step(ctx, stage: int, where: str, steps: int = 3):
    """Each step, the parameters are scaled by 0.9 after SGD's update: ``where`` is
    "param_groups" (over ``opt.param_groups`` after ``opt.step()``), "model" (over
    ``model.parameters()`` after it, inside ``summon_full_params()``) or "inside_the_step"
    (``SGDThenDecay``). The reference: a plain module, its gradients averaged by hand, then
    the same decay. Returns the largest difference per step, and the refusal's text (or
    None) with the step that raised it."""
    model = build_model(MLP, seed=0)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    opt = zeroshard.ZeroOptimizer(
        model, SGDThenDecay if where == "inside_the_step" else torch.optim.SGD, stage=stage,
        lr=0.05, process_group=ctx.group, bucket_size_mb=1e-4,
        **({"units": torch.nn.Linear} if stage == 3 else {}))
    differences = []
    try:
        for step in range(steps):
            batch = make_batch(MLP, seed=step, rank=ctx.rank, batch=4)
            loss_fn(MLP, model, batch).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                if where == "param_groups":
                    for group in opt.param_groups:
                        torch._foreach_mul_(group["params"], 0.9)
                elif where == "model":
                    with opt.summon_full_params():
                        torch._foreach_mul_(list(model.parameters()), 0.9)
            loss_fn(MLP, reference, batch).backward()
            average_by_hand(reference, ctx)
            ref_opt.step()
            ref_opt.zero_grad()
            with torch.no_grad():
                torch._foreach_mul_(list(reference.parameters()), 0.9)
            differences.append(largest_difference(opt, model, reference))
    except RuntimeError as refusal:
        return differences, (str(refusal), len(differences))
    finally:
        opt.close()
    return differences, None


def trainable_changed_after_construction(ctx, stage: int, unfreeze: bool):
    """A parameter unfrozen (or frozen) after the optimizer was built: step() refuses on
    every rank, naming it and close(); closing and building a new ZeroOptimizer then
    trains it like a DDP rebuilt over the changed model."""
    spec = {**MLP, "frozen": True}
    model = build_model(spec, seed=ctx.rank)
    reference = DDP(build_model(spec, seed=0), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(spec, model, opt, 0, 1, ctx.rank)
    _steps(spec, reference, ref_opt, 0, 1, ctx.rank)
    for net in (model, reference.module):
        if unfreeze:
            net.body[0].weight.requires_grad_(True)
        else:
            net.body[0].bias.requires_grad_(False)
    loss_fn(spec, model, make_batch(spec, seed=1, rank=ctx.rank, batch=4)).backward()
    refusal = _refusal(opt.step)
    probe = _ranks_in_step(ctx)
    opt.zero_grad()
    opt.close()
    model.zero_grad(set_to_none=True)
    opt = _zero(model, stage, ctx.group, lr=0.05)
    reference = DDP(reference.module, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(spec, model, opt, 1, 2, ctx.rank)
    _steps(spec, reference, ref_opt, 1, 2, ctx.rank)
    diffs = _differences(opt, model, reference)
    return refusal, probe, diffs


def touch_stage3_parameters_between_steps(ctx):
    """Stage 3 between steps (Note [released parameters]): a read of a parameter's values
    (a log line, an EMA update, a copy of the model, a regulariser computed after the
    forward, SAM's perturbed weights) is refused where it is made, on every rank, naming
    the parameter and summon_full_params(); before, each computed with the NaN
    placeholders, silently. What reads no values (shape, device, count, ``zeros_like``,
    ``requires_grad_``) goes on; printing names the parameter. A write raises at once,
    or (``p.data = t``) when its unit is next gathered. An EMA kept inside
    summon_full_params() equals the same EMA of DDP's parameters, and training goes on
    equal to DDP. A read after the optimizer was dropped without close() says the values
    are gone (it named summon_full_params(), of an optimizer no longer there: helper-89).
    A collective into a parameter (synced by hand) is refused too, before any rank joins
    it; it corrupted the heap (Note [collectives into a released parameter]); inside
    summon_full_params() it runs. Returns what was seen."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, 3, ctx.group, lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    with opt.summon_full_params():
        ema = [p.detach().clone() for p in model.parameters()]
    ref_ema = [p.detach().clone() for p in reference.parameters()]
    _steps(MLP, model, opt, 0, 1, ctx.rank)
    _steps(MLP, reference, ref_opt, 0, 1, ctx.rank)
    weight = model.body[0].weight
    batch = make_batch(MLP, seed=5, rank=ctx.rank, batch=4)
    reads = {
        "norm": lambda: weight.norm().item(),
        "view": lambda: weight.data.abs().max(),
        "ema": lambda: ema[0].lerp_(weight, 0.5),
        "deepcopy": lambda: copy.deepcopy(model),
        "save": lambda: torch.save(model, io.BytesIO()),
        "copied": lambda: weight.new_tensor(weight),  # a copy of its values
        "regulariser": lambda: loss_fn(MLP, model, batch) + sum(p.pow(2).sum() for p in model.parameters()),
        "perturbed": lambda: torch.func.functional_call(
            model, {n: p + 0.01 for n, p in model.named_parameters()}, (batch[0],)),
        # parameters synced by hand: c10d wrote the whole parameter into its placeholder
        "broadcast": lambda: dist.broadcast(weight.data, 0, group=ctx.group),
        "all_reduce": lambda: dist.all_reduce(weight, group=ctx.group),
        "all_gather": lambda: dist.all_gather([torch.empty_like(weight) for _ in range(2)],
                                              weight, group=ctx.group),
    }
    refusals = {what: _refusal(read) for what, read in reads.items()}
    in_step = _ranks_in_step(ctx)  # every rank refused alike, none left in a collective
    looks = (tuple(weight.shape), str(weight.device), weight.grad,
             torch.zeros_like(weight).sum().item() + weight.new_tensor([0.0]).item(),  # templates
             weight.requires_grad_(True).requires_grad, repr(weight))
    count = (sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in reference.module.parameters()))
    _steps(MLP, model, opt, 1, 1, ctx.rank)
    _steps(MLP, reference, ref_opt, 1, 1, ctx.rank)
    with opt.summon_full_params():
        for kept, p in zip(ema, model.parameters()):
            kept.lerp_(p, 0.5)
        dist.broadcast(model.body[0].weight.data, 0, group=ctx.group)  # equal on every rank
    for kept, p in zip(ref_ema, reference.parameters()):
        kept.detach().lerp_(p.detach(), 0.5)
    ema_diff = max((a - b).abs().max().item() for a, b in zip(ema, ref_ema))
    diffs = _differences(opt, model, reference)

    def write_then_train(write):
        with torch.no_grad():
            write(model.body[0].weight)
        loss_fn(MLP, model, make_batch(MLP, seed=9, rank=ctx.rank, batch=4)).backward()

    writes = [_refusal(lambda write=write: write_then_train(write))
              for write in (lambda p: torch.nn.init.normal_(p), lambda p: p.zero_(),
                            lambda p: p.data.clamp_(-0.01, 0.01),
                            lambda p: setattr(p, "data", torch.ones_like(p)))]

    def collective_in_backward():  # a backward hook, while the other units are released
        loss = loss_fn(MLP, model, make_batch(MLP, seed=11, rank=ctx.rank, batch=4))
        loss.register_hook(lambda grad: dist.broadcast(model.body[2].weight, 0, group=ctx.group))
        loss.backward()

    writes.append(_refusal(collective_in_backward))
    opt.zero_grad()
    # a refused write does not poison later passes
    loss_fn(MLP, model, make_batch(MLP, seed=10, rank=ctx.rank, batch=4)).backward()
    opt.zero_grad()
    del opt  # dropped without close(): the values are gone, and a read says so
    gc.collect()
    freed = _refusal(lambda: model.body[0].weight.norm())
    return refusals, in_step, looks, count, ema_diff, diffs, writes, freed


def calls_under_inference_mode(ctx, stage: int):
    """zeroshard's calls made inside a user's ``torch.inference_mode()`` block (Note
    [inference mode] in _inference_mode.py), each followed by a training step outside it:
    the construction, the first step (AdamW's state made there), ``zero_grad(set_to_none=
    False)`` (stages 2-3), each load on its own (a state dict, full state dicts, a
    checkpoint), the end of a ``summon_full_params(full_precision=True)`` block and
    ``close()`` under a bf16 policy. Each but the state dict's load failed with torch's
    raw errors, at once or at the next step (helpers 91 and 92). Training goes on equal
    to DDP doing the same outside inference mode. Returns (the differences, whether the
    bf16 model trained on as a plain module after its close)."""
    import shutil
    import tempfile
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    with torch.inference_mode():
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=0.05,
                                      process_group=ctx.group, bucket_size_mb=1e-4,
                                      **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    both = ((model, opt), (reference, ref_opt))

    def backward(step: int) -> None:
        for net, _ in both:
            loss_fn(MLP, net, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()

    def train_one(step: int) -> None:
        for net, optimizer in both:
            _steps(MLP, net, optimizer, step, 1, ctx.rank)

    backward(0)
    with torch.inference_mode():
        opt.step()
    ref_opt.step()
    for net, optimizer in both:
        optimizer.zero_grad()
        with torch.inference_mode():
            net(make_batch(MLP, seed=1, rank=ctx.rank, batch=4)[0])  # an evaluation
    backward(2)
    with torch.inference_mode():
        opt.zero_grad(set_to_none=False)
    ref_opt.zero_grad(set_to_none=False)
    for net, optimizer in both:
        optimizer.step()  # on zero gradients: AdamW's moments move it
    saved, ref_saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(ref_opt.state_dict())
    train_one(3)
    with torch.inference_mode():  # back to the state before step 3's, on both sides
        opt.load_state_dict(saved)
    ref_opt.load_state_dict(ref_saved)
    train_one(4)
    full = opt.full_state_dict()
    with torch.inference_mode():  # each load below gives the optimizer what it holds
        opt.load_full_state_dict(*(full if full is not None else (None, None)))
    train_one(5)
    shared = [tempfile.mkdtemp() if ctx.rank == 0 else None]
    dist.broadcast_object_list(shared, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
    zeroshard.save_checkpoint(shared[0], model, opt)
    with torch.inference_mode():
        zeroshard.load_checkpoint(shared[0], model, opt)
    train_one(6)
    differences = _differences(opt, model, reference)
    opt.close()
    dist.barrier(group=ctx.group)
    if ctx.rank == 0:
        shutil.rmtree(shared[0])
    low = build_model(MLP, seed=0)
    low_opt = _zero(low, stage, ctx.group, lr=0.05, mixed_precision=BF16)
    _steps(MLP, low, low_opt, 0, 1, ctx.rank)
    with torch.inference_mode(), low_opt.summon_full_params(full_precision=True):
        teacher = [p.clone() for p in low.parameters()]  # an EMA teacher's copy
    _steps(MLP, low, low_opt, 1, 1, ctx.rank)
    with torch.inference_mode():
        low_opt.close()
    loss_fn(MLP, low, make_batch(MLP, seed=2, rank=ctx.rank, batch=4)).backward()  # a plain module
    trained_on = (all(p.grad is not None and p.grad.isfinite().all().item() for p in low.parameters())
                  and len(teacher) == len(list(low.parameters())))
    return differences, trained_on


class _BlockWithItsOwnTerm(torch.nn.Module):
    """A block that adds its own loss term to ``terms``, inside its forward."""

    def __init__(self, terms: list) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.terms = terms

    def forward(self, h):
        self.terms.append(self.lin.weight.sum().square())
        return torch.tanh(self.lin(h))


class _RegularisedInForward(torch.nn.Module):
    """A loss term from every block's weight, computed in the root's forward
    (``where="root"``, after the blocks ran: each is released by then at stage 3 with
    the blocks as units) or by each block in its own forward (``where="blocks"``). The
    term saves no parameter for backward (the square of a weight's sum; as a positional
    table sliced and added does, Whisper's ``embed_positions.weight[:n]``), so no
    saved-tensor hook sees the read."""

    def __init__(self, seed: int, where: str) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.terms: list = []
        self.emb = torch.nn.Embedding(10, 6)
        self.blocks = torch.nn.ModuleList(_BlockWithItsOwnTerm(self.terms) for _ in range(3))
        self.out = torch.nn.Linear(6, 3)
        self.where = where

    def forward(self, idx):
        self.terms.clear()
        h = self.emb(idx)
        for block in self.blocks:
            h = block(h)
        loss = self.out(h).square().mean()
        if self.where == "root":
            return loss + 1e-3 * sum(b.lin.weight.sum().square() for b in self.blocks)
        return loss + 1e-3 * sum(self.terms)


def parameters_read_outside_their_units_forward(ctx, where: str, grad: bool):
    """Stage 3, the blocks as units (Note [released parameters]): a loss term computed in
    the root's forward from the blocks' weights, after they ran and were released,
    computed with their NaN placeholders, silently (an evaluation forward gave NaN, a
    training forward trained NaN); now refused where it is read, on every rank, naming
    the parameter and its unit. The same term added by each block inside its own forward
    equals DDP. Returns (the refusal or None, the largest difference after two steps or
    None, whether every rank got past the refusal alike)."""
    model = _RegularisedInForward(seed=ctx.rank, where=where)
    reference = DDP(_RegularisedInForward(seed=0, where=where), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=_BlockWithItsOwnTerm, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    eval_diffs = []
    for step in range(2):
        idx = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(step + ctx.rank))
        losses = []
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            with torch.set_grad_enabled(grad):
                try:
                    losses.append(net(idx))
                except RuntimeError as error:
                    return str(error), None, _ranks_in_step(ctx)
            if grad:
                losses[-1].backward()
                optimizer.step()
                optimizer.zero_grad()
        eval_diffs.append(float((losses[0] - losses[1]).abs()))  # NaN stays NaN
    diff = largest_difference(opt, model, reference) if grad else float(torch.tensor(eval_diffs).max())
    return None, diff, _ranks_in_step(ctx)


def retained_graph_backward_twice(ctx, stage: int):
    """``loss.backward(retain_graph=True); opt.zero_grad(); loss.backward(); opt.step()``
    (a discarded first backward, e.g. a probe of the gradient): the step uses the second
    backward's gradients averaged over ranks. The reference is a plain model whose
    gradients the test all-reduces itself (DDP's reducer does not run a second time
    without a new forward). Returns per-parameter differences to it."""
    model = build_model(MLP, seed=ctx.rank)
    reference = build_model(MLP, seed=0)
    opt = _zero(model, stage, ctx.group, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            loss = loss_fn(MLP, net, make_batch(MLP, seed=step, rank=ctx.rank, batch=4))
            loss.backward(retain_graph=True)
            optimizer.zero_grad()
            loss.backward()
            if net is reference:
                average_by_hand(reference, ctx)
            optimizer.step()
            optimizer.zero_grad()
    return _differences(opt, model, reference)


class _Branch(torch.nn.Module):
    """A trunk, and a branch that a forward takes or not."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x, take_branch: bool):
        h = self.trunk(x)
        return h + self.branch(h) if take_branch else h


def cleared_then_a_branch_left_out(ctx, stage: int, clear: str):
    """After each step ``opt.zero_grad()`` ("opt"), ``opt.zero_grad(set_to_none=False)``
    ("opt_keep") or ``model.zero_grad()`` ("model"), then a step with no backward (on
    zero gradients, or none); rank 1 takes the branch in even steps only, rank 0 always
    (so DDP gives it a gradient every step). Stage 1 clears to None without zeroing its
    buffers: a branch rank 1 left out must add zero there, not the gradient its buffer
    kept from the step before. Returns what ``p.grad`` held after each clearing ("None",
    "zero" or "nonzero" per parameter) and the largest difference from DDP (AdamW with
    weight decay, which moves parameters on zero gradients) per step."""
    torch.manual_seed(0)
    model = _Branch()
    reference = DDP(copy.deepcopy(model), process_group=ctx.group, find_unused_parameters=True)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=0.05,
                                  weight_decay=0.1, process_group=ctx.group, bucket_size_mb=1e-4,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1)
    after_clearing, differences = [], []
    for step in range(4):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * ctx.rank + step))
        take_branch = ctx.rank == 0 or step % 2 == 0
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            net(x, take_branch).square().mean().backward()
            optimizer.step()
            if clear == "model":
                net.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=clear == "opt")
            optimizer.step()
        after_clearing.append(["None" if p.grad is None else "nonzero" if p.grad.any() else "zero"
                               for p in model.parameters()])
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return after_clearing, differences


class _TinyLM(torch.nn.Module):
    """An embedding, a body and a head; the forward takes token ids or embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 11)

    def forward(self, ids=None, inputs_embeds=None, again=False):
        h = self.body(self.embed(ids) if inputs_embeds is None else inputs_embeds)
        if again:  # the body's first layer once more, outside the body's forward
            h = h + self.body[0](h)
        return self.head(h)

    def loss(self, ids):  # a loss method that calls the submodules, not the forward
        return torch.nn.functional.cross_entropy(self.head(self.body(self.embed(ids))).flatten(0, 1),
                                                 ids.flatten())


class _ScaledEmbeddings(torch.nn.Module):
    """The wrapper a user writes: its forward builds the embeddings (scaled, like
    NEFTune's noise) and calls the model with them."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(inputs_embeds=self.lm.embed(ids) * 1.5)


def outside_the_models_forward(ctx, stage: int):
    """Note [called outside its unit's forward]: the embeddings computed before
    ``model(inputs_embeds=...)``, a loss method calling the submodules, and a forward
    running a layer of the body outside the body's forward, at ``stage`` (the sequential
    body a unit at stage 3), then a forward that fails on its own (embeddings of the
    wrong width, inside the body). Returns the errors of the four (messages, "no error"
    where none), whether saved-tensor hooks were left on torch's stack after each (Note
    [a forward that raises] in stage3.py) and whether a torch.func gradient then ran,
    whether every rank then got to the next collective, and per step the largest
    difference of the wrapper built for the first from DDP's."""
    def build(module):
        return zeroshard.ZeroOptimizer(module, torch.optim.AdamW, stage=stage, lr=0.05,
                                       process_group=ctx.group,
                                       **({"units": torch.nn.Sequential} if stage == 3 else {}))

    def ids(step):
        return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(10 * ctx.rank + step))

    def loss_of_embeddings(model):
        logits = model(inputs_embeds=model.embed(ids(0)) * 1.5)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids(0).flatten()).backward()

    def layer_again(model):
        logits = model(ids(0), again=True)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids(0).flatten()).backward()

    def wrong_width(model):
        model(inputs_embeds=torch.randn(2, 5, 7))

    refusals, hooks_left, transform_ran = [], [], []
    for misuse in (loss_of_embeddings, lambda model: model.loss(ids(0)).backward(), layer_again,
                   wrong_width):
        torch.manual_seed(0)
        model = _TinyLM()
        opt = build(model)
        refusals.append(_refusal(lambda: misuse(model)))
        hooks_left.append(torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)
        transform_ran.append(_refusal(lambda: torch.func.grad(lambda x: (x * x).sum())(torch.ones(2))))
        opt.close()
    every_rank_there = _ranks_in_step(ctx) == ctx.world_size
    torch.manual_seed(0)
    model = _ScaledEmbeddings(_TinyLM())
    reference = DDP(copy.deepcopy(model), process_group=ctx.group)
    differences = differences_per_step(
        ctx, model, build(model), reference, torch.optim.AdamW(reference.parameters(), lr=0.05),
        lambda net, step: torch.nn.functional.cross_entropy(
            net(ids(step)).flatten(0, 1), ids(step).flatten()), steps=3, average=False)
    return refusals, hooks_left, transform_ran, every_rank_there, differences


class _Float64Scale(torch.nn.Module):
    """An fp32 linear layer and an fp64 scale after it (all fp64 with ``wide``)."""

    def __init__(self, wide: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4, dtype=torch.float64 if wide else torch.float32)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))

    def forward(self, x):
        return self.linear(x.to(self.linear.weight.dtype)).double() * self.scale


def clipping_with_float64_parameters(ctx, stage: int, wide: bool):
    """``opt.clip_grad_norm_`` (binding) over a model with an fp64 parameter, or all fp64:
    per step the norm it returns and its dtype, DDP's ``torch.nn.utils.clip_grad_norm_``'s,
    and the largest parameter difference from DDP (AdamW)."""
    torch.manual_seed(0)
    model = _Float64Scale(wide)
    reference = DDP(copy.deepcopy(model), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=0.05,
                                  process_group=ctx.group,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    steps = []
    for step in range(3):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(10 * ctx.rank + step))
        norms = []
        for net, optimizer, clip in (
                (model, opt, lambda: opt.clip_grad_norm_(0.1)),
                (reference, ref_opt, lambda: torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))):
            net(x).square().mean().backward()
            norms.append(clip())
            optimizer.step()
            optimizer.zero_grad()
        steps.append((norms[0].item(), str(norms[0].dtype), norms[1].item(), str(norms[1].dtype),
                      largest_difference(opt, model, reference)))
    opt.close()
    return steps


def forward_inside_summon(ctx, stage: int):
    """Evaluation inside ``summon_full_params()`` on rank 0 only (sampling between steps):
    no collective, the reference model's output, training undisturbed (equal to DDP). A
    forward with grad enabled there is refused at stage 3. Returns (output difference,
    collectives the eval issued, parameter differences at the end, refusal message)."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group, lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(MLP, model, opt, 0, 1, ctx.rank)
    _steps(MLP, reference, ref_opt, 0, 1, ctx.rank)
    batch = make_batch(MLP, seed=99, rank=0, batch=4)
    output_diff, issued = 0.0, 0
    with opt.summon_full_params():
        opt.comm_stats.reset()
        if ctx.rank == 0:
            model.eval()
            with torch.no_grad():
                ours, theirs = model(batch[0]), reference.module(batch[0])
            output_diff = (ours - theirs).abs().max().item()
            model.train()
        issued = sum(opt.comm_stats.calls.values())
    def forward_with_grad_inside_summon():
        with opt.summon_full_params():
            model(batch[0])

    refusal = _refusal(forward_with_grad_inside_summon) if stage == 3 else "no error"
    _steps(MLP, model, opt, 1, 2, ctx.rank)
    _steps(MLP, reference, ref_opt, 1, 2, ctx.rank)
    diffs = _differences(opt, model, reference)
    return output_diff, issued, diffs, refusal


CLEARS = ("opt", "opt_keep", "model", "model_keep", "half_none", "none")


def _clear(how: str, model, optimizer) -> None:
    """Clear gradients after a step the way a training loop might (``CLEARS``)."""
    if how == "opt":
        optimizer.zero_grad()
    elif how == "opt_keep":
        optimizer.zero_grad(set_to_none=False)
    elif how == "model":
        model.zero_grad()
    elif how == "model_keep":
        model.zero_grad(set_to_none=False)
    elif how == "half_none":  # e.g. a loop that clears one sub-module's gradients
        params = list(model.parameters())
        for param in params[: len(params) // 2]:
            param.grad = None
    else:
        assert how == "none", how  # gradients accumulate into the next step, as torch does


# ("resume": a checkpoint saved and loaded into a new ZeroOptimizer of the next stage;
# "resume_full": full state dicts, on rank 0 only, into one of the same stage)
BETWEEN_STEPS = (None, "ema", "summon_eval", "load", "rebuild", "resume", "resume_full", "log_norm")
# Note [a backward that raised] in zeroshard/_reducer.py: where a skipped batch's
# backward raises (none; at the loss's gradient, before the stage's backward starts;
# halfway through the model)
ABANDONED = (None, "first", "middle")


class _BatchSkipped(Exception):
    pass


def _raise_skipped(grad):
    raise _BatchSkipped()


def _abandon_a_backward(spec, model, batch, where: str, autocast: bool) -> None:
    """A batch whose backward raises ``where`` (a hook), caught, as a loop skipping a
    batch catches it."""
    handles = []
    if where in ("middle", "later"):  # at the output of a module halfway, or earlier
        leaves = [m for m in model.modules() if next(m.children(), None) is None]

        def raise_there(module, args, output):
            tensors = [t for t in tree_flatten(output)[0]
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                tensors[0].register_hook(_raise_skipped)

        there = leaves[len(leaves) // 2 if where == "middle" else len(leaves) // 4]
        handles.append(there.register_forward_hook(raise_there))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(spec, model, batch)
        if where == "first":
            loss.register_hook(_raise_skipped)
        loss.backward()
    except _BatchSkipped:
        pass
    else:
        raise AssertionError(f"the backward of the batch to skip did not raise ({where})")
    finally:
        for handle in handles:
            handle.remove()


def skipped_after_an_abandoned_backward(ctx, stage: int, how: str):
    """Note [a backward that raised]: after one step, a batch whose backward raises
    halfway (caught): at one point on every rank, at points that differ by rank, in
    the first step, or at one point "after" a micro-batch accumulated inside
    ``no_sync()`` or "inside" (that batch inside ``no_sync()`` too). Returns the
    refusals of a step, a clipping, ``summon_full_params()``, ``full_state_dict()``, a
    call of a stage-3 unit (the first Linear) and a forward after ``model.zero_grad()`` before
    ``opt.zero_grad()`` (messages, "no error" where none), whether every rank then got
    to the next collective, the bytes ``opt.zero_grad()`` reduced, the bytes a later
    step reduces and those a run that skipped nothing reduces in its second, and the largest
    difference per parameter from DDP after two more steps, DDP having skipped the
    batch with ``zero_grad()``."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group, lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    if how != "first_step":  # (in the first: before stage 3 has recorded its orders)
        _steps(MLP, model, opt, 0, 1, ctx.rank)
        _steps(MLP, reference, ref_opt, 0, 1, ctx.rank)
    for net in (model, reference) if how in ("after", "inside") else ():
        with net.no_sync() if net is reference else opt.no_sync():
            loss_fn(MLP, net, make_batch(MLP, seed=1, rank=ctx.rank, batch=4)).backward()
    where = "later" if how == "points_differ" and ctx.rank % 2 else "middle"
    with opt.no_sync() if how == "inside" else contextlib.nullcontext():
        _abandon_a_backward(MLP, model, make_batch(MLP, seed=2, rank=ctx.rank, batch=4), where, False)
    def summon():
        with opt.summon_full_params():
            pass

    refusals = [_refusal(opt.step), _refusal(lambda: opt.clip_grad_norm_(1.0)), _refusal(summon),
                _refusal(opt.full_state_dict), _refusal(lambda: model.body[0](torch.ones(1, 5)))]
    model.zero_grad()
    refusals.append(_refusal(lambda: loss_fn(MLP, model, make_batch(MLP, seed=3, rank=ctx.rank, batch=4))))
    def reduced_bytes(optimizer):  # stage 3's backward walk gathers inside no_sync() too
        return optimizer.comm_stats.bytes["reduce_scatter"] + optimizer.comm_stats.bytes["all_reduce"]

    before = reduced_bytes(opt)
    opt.zero_grad()
    zero_grad_bytes = reduced_bytes(opt) - before
    # (not before it: ranks that raised at different points have launched different
    # reductions until opt.zero_grad() ends the backward)
    every_rank_there = _ranks_in_step(ctx) == ctx.world_size
    ref_opt.zero_grad()
    _steps(MLP, model, opt, 3, 1, ctx.rank)
    _steps(MLP, reference, ref_opt, 3, 2, ctx.rank)
    before = reduced_bytes(opt)
    _steps(MLP, model, opt, 4, 1, ctx.rank)
    step_bytes = reduced_bytes(opt) - before
    clean = build_model(MLP, seed=ctx.rank)  # the same steps, no batch skipped
    clean_opt = _zero(clean, stage, ctx.group, lr=0.05)
    _steps(MLP, clean, clean_opt, 0, 1, ctx.rank)
    before = reduced_bytes(clean_opt)
    _steps(MLP, clean, clean_opt, 1, 1, ctx.rank)
    clean_bytes = reduced_bytes(clean_opt) - before
    return (refusals, every_rank_there, zero_grad_bytes, (step_bytes, clean_bytes),
            _differences(opt, model, reference))


# The optimizers the drawn loops step (``drive_loop``): the element-wise classes whose
# update follows torch's where a parameter's gradient is None in some steps and not in
# others (no count shared by a shard's parameters enters their update), with a state
# made at construction (Adagrad's, from initial_accumulator_value), at the first step
# from the gradient (SGD's momentum) or from zeros (Adadelta's).
DRAWN_OPTIMIZERS = {
    "SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.05, "initial_accumulator_value": 0.1}),
    "Adadelta": (torch.optim.Adadelta, {"lr": 0.5}),
}


def drive_loop(ctx, stage: int, plan: dict):
    """One drawn way of driving the loop (``plan``: bf16 autocast or not, and per step a
    batch skipped because its backward raised or not, how gradients are cleared (after
    the step, and some set to None between backward and step), micro-batches, the last one's backward run twice through a
    retained graph with ``zero_grad()`` between, an evaluation forward, clipping, and what
    happens between steps: an
    EMA update (``AveragedModel``), evaluation on rank 0 inside ``summon_full_params()``,
    ``model.load_state_dict`` of other weights, a log line reading the weights' norm,
    ``close()`` and a new optimizer, or a resume: ``close()`` and a new optimizer given the state saved before, by a checkpoint
    (at the next stage) or by full state dicts (on rank 0 only), while DDP goes on with
    its optimizer), applied alike to zeroshard and to DDP with the same torch optimizer.
    Returns the largest parameter difference after each step, and at the end the EMA's."""
    spec = plan["model"]
    model = build_model(spec, seed=ctx.rank)
    reference = DDP(build_model(spec, seed=0), process_group=ctx.group)
    optimizer_class, kwargs = DRAWN_OPTIMIZERS[plan.get("optimizer", "SGD")]
    kwargs = {**kwargs, "weight_decay": plan["weight_decay"]}
    mesh = ctx.mesh(plan.get("mesh"))

    def new_zero(stage):
        ranks = {"mesh": mesh} if mesh is not None else {"process_group": ctx.group}
        return zeroshard.ZeroOptimizer(model, optimizer_class, stage=stage, bucket_size_mb=1e-4,
                                       **ranks, **kwargs,
                                       **({"units": torch.nn.Linear} if stage == 3 else {}))

    def new_optimizers():
        return new_zero(stage), optimizer_class(reference.parameters(), **kwargs)
    opt, ref_opt = new_optimizers()
    ema = ref_ema = None
    diffs = []
    for step, how in enumerate(plan["steps"]):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            if how.get("abandoned"):  # skipped with zero_grad(): DDP skips it from the start
                if net is model:
                    _abandon_a_backward(spec, net, make_batch(spec, seed=500 + step, rank=ctx.rank,
                                                              batch=4), how["abandoned"], plan["autocast"])
                optimizer.zero_grad()
            for micro in range(how["micro_batches"]):
                batch = make_batch(spec, seed=10 * step + micro, rank=ctx.rank, batch=4)
                # a discarded first backward through a retained graph (DDP's reducer does not
                # run twice without a new forward: the reference averages by hand)
                retain = how.get("retain", False) and micro == how["micro_batches"] - 1
                local = net.no_sync() if retain and net is reference else contextlib.nullcontext()
                with local, torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan["autocast"]):
                    loss = loss_fn(spec, net, batch)
                if retain:
                    loss.backward(retain_graph=True)
                    optimizer.zero_grad()
                loss.backward()
                if retain and net is reference:
                    average_by_hand(reference.module, ctx)
            if how["eval"]:
                with torch.no_grad():
                    net(make_batch(spec, seed=1000 + step, rank=ctx.rank, batch=2)[0])
            if how.get("none_before_step"):  # the later weights' gradients, not the biases'
                params = list(net.parameters())  # (at stage 3 a unit's bucket holds both:
                for param in params[len(params) // 2:]:  # Note [a gradient cleared before
                    if param.ndim > 1:  # the step])
                        param.grad = None
            if how["clip"]:
                if net is model:
                    opt.clip_grad_norm_(0.05)
                else:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            optimizer.step()
            _clear(how["clear"], net.module if net is reference else net, optimizer)
        between = how.get("between")
        if between == "ema":
            with opt.summon_full_params():  # stage 3: the parameters hold values only here
                if ema is None:
                    ema = torch.optim.swa_utils.AveragedModel(model)
                    ref_ema = torch.optim.swa_utils.AveragedModel(reference.module)
                ema.update_parameters(model)
            ref_ema.update_parameters(reference.module)
        elif between == "summon_eval":
            with opt.summon_full_params():
                if ctx.rank == 0:  # sampling on one rank: no collective may be issued
                    model.eval()
                    with torch.no_grad():
                        model(make_batch(spec, seed=2000 + step, rank=0, batch=2)[0])
                    model.train()
        elif between == "load":
            pretrained = build_model(spec, seed=77 + step).state_dict()
            with opt.summon_full_params() if stage == 3 else contextlib.nullcontext():
                model.load_state_dict(pretrained)
            reference.module.load_state_dict(pretrained)
        elif between == "rebuild":  # close() drops gradients not yet stepped: so does DDP's side
            opt.close()
            ref_opt.zero_grad()
            opt, ref_opt = new_optimizers()
        elif between in ("resume", "resume_full"):
            stage = stage % 3 + 1 if between == "resume" else stage
            opt = _resumed(ctx, opt, model, lambda: new_zero(stage), between)
            ref_opt.zero_grad()
        elif between == "log_norm":  # a log line reading the weights
            diffs.append(abs(_logged_norm(opt, model, stage) - _logged_norm(None, reference.module, 0)))
        else:
            assert between is None, between
        diffs.append(largest_difference(opt, model, reference))
    if ema is not None:
        diffs.append(max((p - q).abs().max().item() for p, q in
                         zip(ema.parameters(), ref_ema.parameters())))
    opt.close()
    return diffs


def _logged_norm(opt, model, stage: int) -> float:
    """The weights' norm as a log line reads it between steps: at stage 3 that read is
    refused (Note [released parameters]), naming summon_full_params(), inside which it
    is read."""
    def norm():
        return float(torch.stack([p.detach().float().norm() for p in model.parameters()]).norm())
    try:
        return norm()
    except RuntimeError as error:
        if stage != 3 or "summon_full_params" not in str(error):
            raise
    with opt.summon_full_params():
        return norm()


def _resumed(ctx, opt, model, new_zero, how: str):
    """``opt``'s state saved (a checkpoint in a folder rank 0 makes, or full state dicts
    that rank 0 alone holds and passes), ``opt`` closed, and a new optimizer from
    ``new_zero()`` given that state (``drive_loop``'s "resume" and "resume_full")."""
    import shutil
    import tempfile
    if how == "resume_full":
        saved = opt.full_state_dict()
        opt.close()
        opt = new_zero()
        with warnings.catch_warnings():  # Note [a fresh state inside a shard's]: the
            warnings.simplefilter("ignore")  # shared counts, which these classes lack
            opt.load_full_state_dict(*(saved if saved is not None else (None, None)))
        return opt
    shared = [tempfile.mkdtemp() if ctx.rank == 0 else None]
    dist.broadcast_object_list(shared, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
    zeroshard.save_checkpoint(shared[0], model, opt)
    opt.close()
    opt = new_zero()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zeroshard.load_checkpoint(shared[0], model, opt)
    dist.barrier(group=ctx.group)
    if ctx.rank == 0:
        shutil.rmtree(shared[0])
    return opt


def torch_clip_over_model_parameters(ctx, stage: int):
    """``torch.nn.utils.clip_grad_norm_(model.parameters())`` between backward and step
    cannot reach the reduced gradients (stage 1: it clips local ones; stages 2 and 3:
    markers), so step() refuses on every rank, naming opt.clip_grad_norm_; training
    then goes on equal to DDP. Returns (refusal, probe, differences after two steps)."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group, lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()

    def clip_then_step():  # refused at the clip (stages 2, 3: the markers) or the step (1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()

    refusal = _refusal(clip_then_step)
    probe = _ranks_in_step(ctx)
    opt.zero_grad()
    _steps(MLP, model, opt, 1, 2, ctx.rank)
    _steps(MLP, reference, ref_opt, 1, 2, ctx.rank)
    diffs = _differences(opt, model, reference)
    return refusal, probe, diffs


def gradient_values_read_after_backward(ctx, stage: int):
    """Stages 2-3 (helper-85's probes): reading a marker's values after backward gave NaN,
    which decided things silently: DINO's per-parameter clip (``clip / (norm + 1e-6) < 1``
    is False for NaN) never clipped, and a guard stepping only on finite gradients never
    stepped. Each read is refused on every rank, changing nothing; the guard written
    with what ``opt.clip_grad_norm_(inf)`` returns skips the step DDP's guard skips (a
    batch with an infinity on rank 1) and takes the others. What reads no values is not
    refused (a reviewer's probes, helper-87: a marker zeroed through ``p.grad``, the
    model converted, a marker as a shape template). Returns (the refusals, what was not
    refused, the collective probe, the largest difference from DDP after three steps)."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt, ref_opt = _zero(model, stage, ctx.group, lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()
    weight = model.body[0].weight
    refusals = [_refusal(lambda: [p.grad.norm() for p in model.parameters()]),  # DINO's clip
                _refusal(lambda: all(torch.isfinite(p.grad).all() for p in model.parameters())),
                _refusal(lambda: weight.grad.clone()),
                _refusal(lambda: weight.grad.unbind()[0].sum()),  # through a view
                _refusal(lambda: bool(weight.grad.data[0, 0]))]
    unrefused = {"shown": repr(weight.grad), "template": torch.ones(1, 5).expand_as(weight.grad)}
    probe = _ranks_in_step(ctx)
    model.zero_grad(set_to_none=False)  # zeroed through p.grad: reads zero, as DDP's do
    unrefused["zeroed"] = weight.grad.abs().sum().item()
    opt.step()
    unrefused["zeroed, stepped"] = weight.grad.abs().sum().item()
    opt.zero_grad()
    for step in range(3):
        batch = make_batch(MLP, seed=step, rank=ctx.rank, batch=4)
        if step == 1 and ctx.rank == 1:
            batch = tuple(t.clone() for t in batch)
            batch[0][0, 0] = float("inf")
        for net, optimizer, clip in ((model, opt, opt.clip_grad_norm_),
                                     (reference, ref_opt, lambda m: torch.nn.utils.clip_grad_norm_(
                                         reference.parameters(), m))):
            loss_fn(MLP, net, batch).backward()
            if torch.isfinite(clip(float("inf"))):
                optimizer.step()
            optimizer.zero_grad()
    difference = max(_differences(opt, model, reference).values())
    if stage == 2:  # converting the model converts p.grad: a marker still, not a read
        loss_fn(MLP, model, make_batch(MLP, seed=3, rank=ctx.rank, batch=4)).backward()
        model.double()
        unrefused["converted"] = type(weight.grad).__name__
    return refusals, unrefused, probe, difference


def _batchnorm_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3))


def batchnorm_statistics(ctx, stage: int, broadcast_buffers: bool, micro_batches: int = 1,
                         mesh=None):
    """BatchNorm running statistics against DDP with the same ``broadcast_buffers``, with
    an evaluation forward on rank 0 alone between steps (through the model itself: under
    no_grad it must issue no collective; DDP's through its module); ``micro_batches``
    per step, all but the last under ``no_sync()``; on the pool's ``mesh`` if given.
    Returns the largest differences of parameters and buffers on this rank, and the
    eval's collectives."""
    model = _batchnorm_net(seed=ctx.rank)
    reference = DDP(_batchnorm_net(seed=0), process_group=ctx.group,
                    broadcast_buffers=broadcast_buffers)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, **ctx.zero_ranks(mesh),
                                  broadcast_buffers=broadcast_buffers, bucket_size_mb=1e-4, lr=0.05,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    issued = 0
    for step in range(3):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            for micro in range(micro_batches):
                # each rank's own data (the seed follows the rank), so the statistics differ
                x, y = make_batch(MLP, seed=10 * step + micro + 100 * ctx.rank, rank=ctx.rank,
                                  batch=6)
                last = micro == micro_batches - 1
                syncing = net if net is reference else opt
                with contextlib.nullcontext() if last else syncing.no_sync():
                    torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        # stage 3 gathers parameters for a forward outside summon_full_params()
        with opt.summon_full_params() if stage == 3 else contextlib.nullcontext():
            if ctx.rank == 0:
                before = sum(opt.comm_stats.calls.values())
                for net in (model, reference.module):
                    net.eval()
                    with torch.no_grad():
                        net(x)
                    net.train()
                issued += sum(opt.comm_stats.calls.values()) - before
    params = largest_difference(opt, model, reference)
    buffers = max((b.float() - c.float()).abs().max().item()
                  for b, c in zip(model.buffers(), reference.module.buffers()))
    return params, buffers, issued


@dataclasses.dataclass
class BlockOutput:
    """A container ``tree_flatten`` does not open (as many model libraries return)."""
    hidden: torch.Tensor


class DataclassBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(7, 7)

    def forward(self, x) -> BlockOutput:
        return BlockOutput(torch.tanh(self.fc(x)))


class DataclassNet(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(5, 7)
        self.blocks = torch.nn.ModuleList(DataclassBlock() for _ in range(3))
        self.out = torch.nn.Linear(7, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h).hidden
        return self.out(h)


def dataclass_unit_outputs(ctx, reshard_after_forward: bool):
    """Stage 3 with units whose forward returns a dataclass: backward reaches their
    parameters without passing through a tensor the output hooks could find, and must
    gather them all the same. Returns per-step largest parameter differences to DDP."""
    model = DataclassNet(seed=ctx.rank)
    reference = DDP(DataclassNet(seed=0), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=DataclassBlock, lr=0.05, momentum=0.9,
                                  reshard_after_forward=reshard_after_forward)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    diffs = []
    for step in range(3):
        x, y = make_batch(MLP, seed=10 * step + ctx.rank, rank=ctx.rank, batch=4)
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        diffs.append(largest_difference(opt, model, reference))
    return diffs


def batchnorm_with_bf16(ctx, stage: int, model_dtype: torch.dtype = torch.float32):
    """BatchNorm under ``MixedPrecision(param_dtype=bf16)`` (Note [full-precision
    modules]): BatchNorm keeps the model's dtype (fp32, or fp64 in an fp64 model) for
    its parameters and statistics and computes in it, the rest computes in bf16 with
    fp32 masters. The reference follows that recipe by hand: DDP over a copy whose
    Linear layers are bf16 and whose BatchNorm keeps the model's dtype with the same
    casts around it; masters (fp32 for the Linear layers, BatchNorm's own) take the
    DDP-reduced gradients, a plain SGD steps them, and the copy takes their cast.
    Returns (largest master difference, largest buffer difference, BatchNorm parameter
    and buffer dtypes)."""
    bf16 = zeroshard.MixedPrecision(torch.bfloat16, output_dtype=torch.float32)
    model = _batchnorm_net(seed=ctx.rank).to(model_dtype)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  mixed_precision=bf16, bucket_size_mb=1e-4, lr=0.05,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    copy = _batchnorm_net(seed=0).to(model_dtype)
    norm = copy[1]
    masters = [p.detach().clone() if any(p is q for q in norm.parameters())
               else p.detach().float() for p in copy.parameters()]
    for module in (copy[0], copy[3]):
        module.to(torch.bfloat16)
    norm.register_forward_pre_hook(lambda m, args: tuple(a.to(model_dtype) for a in args))
    norm.register_forward_hook(lambda m, args, out: out.to(torch.bfloat16))
    reference = DDP(copy, process_group=ctx.group)
    master_opt = torch.optim.SGD(masters, lr=0.05)
    for step in range(3):
        x, y = make_batch(MLP, seed=10 * step + ctx.rank, rank=ctx.rank, batch=6)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        out = reference(x.to(torch.bfloat16)).float()
        torch.nn.functional.mse_loss(out, y).backward()
        for master, param in zip(masters, copy.parameters()):
            master.grad = param.grad.to(master.dtype)
        master_opt.step()
        with torch.no_grad():
            for master, param in zip(masters, copy.parameters()):
                param.copy_(master)
                param.grad = None
    with opt.summon_full_params():
        ours = opt.sharding.gather_masters()
        names = {id(p): i for i, p in enumerate(model.parameters())}
        params = max((value - masters[names[key]]).abs().max().item() for key, value in ours.items())
    buffers = max((b.double() - c.double()).abs().max().item()
                  for b, c in zip(model.buffers(), copy.buffers()))
    dtypes = sorted({str(t.dtype) for t in (*model[1].parameters(), *model[1].buffers())
                     if t.is_floating_point()})
    return params, buffers, dtypes


def gradient_penalty(ctx, stage: int):
    """A gradient penalty on the input (WGAN-GP, R1): ``torch.autograd.grad(loss, x,
    create_graph=True)``, then ``(loss + penalty).backward()``. The reference is a plain
    model whose gradients the test all-reduces itself. Returns (per-step largest parameter
    differences, reduce-scatter bytes per step: the last step has no penalty); stage 3
    refuses, and returns (the refusal, a probe that every rank is still in step)."""
    model = build_model(MLP, seed=ctx.rank)
    reference = build_model(MLP, seed=0)
    opt = _zero(model, stage, ctx.group, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    diffs, scattered = [], []
    if stage == 3:  # refused: the penalty's graph would outlive the gathered parameters
        x, y = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
        x_in = x.requires_grad_(True)
        loss = torch.nn.functional.mse_loss(model(x_in), y)
        refusal = _refusal(lambda: torch.autograd.grad(loss, x_in, create_graph=True))
        return refusal, _ranks_in_step(ctx)
    for step in range(4):
        penalize = step < 3
        x, y = make_batch(MLP, seed=10 * step + ctx.rank, rank=ctx.rank, batch=4)
        opt.comm_stats.reset()
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            x_in = x.clone().requires_grad_(True)
            loss = torch.nn.functional.mse_loss(net(x_in), y)
            if penalize:
                (grad,) = torch.autograd.grad(loss, x_in, create_graph=True)
                loss = loss + 0.1 * grad.pow(2).sum()
            loss.backward()
            if net is reference:
                average_by_hand(reference, ctx)
            optimizer.step()
            optimizer.zero_grad()
        scattered.append(opt.comm_stats.bytes["reduce_scatter"])
        diffs.append(largest_difference(opt, model, reference))
    return diffs, scattered


def backward_with_create_graph(ctx, stage: int):
    """``loss.backward(create_graph=True)``: refused on every rank with a message (it
    crashed inside the reduction at stages 1 and 2); returns (the refusal, a probe that
    every rank is still in step)."""
    model = build_model(MLP, seed=0)
    opt = _zero(model, stage, ctx.group, lr=0.05)
    x, y = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
    loss = torch.nn.functional.mse_loss(model(x), y)
    return _refusal(lambda: loss.backward(create_graph=True)), _ranks_in_step(ctx)


class FunctionallyTied(torch.nn.Module):
    """minGPT/OLMo-style tying: the output projection reads the embedding's weight in the
    root's forward (``F.linear(h, self.emb.weight)``), not through a tied module."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(50, 64)
        self.body = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3)])

    def forward(self, idx):
        return torch.nn.functional.linear(self.body(self.emb(idx)), self.emb.weight)


def functionally_tied_weight(ctx, units):
    """Stage 3 with automatic units (``emb`` becomes a unit, released when the root reads
    its weight): refused on every rank, naming the parameter and units=. With units that
    leave the embedding to the root (``nn.Linear``): equal to DDP. Returns (refusal or
    None, largest parameter difference after two steps or None)."""
    model = FunctionallyTied(seed=ctx.rank)
    reference = DDP(FunctionallyTied(seed=0), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=units, bucket_size_mb=0.01, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(step + ctx.rank))
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            try:
                out = net(idx)
            except RuntimeError as error:
                return str(error), None
            torch.nn.functional.cross_entropy(out.reshape(-1, 50), idx.reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return None, largest_difference(opt, model, reference)


class _Dora(torch.nn.Module):
    """peft DoRA's way with its base layer: call it, then read its weight."""

    def __init__(self, d_in: int, d_out: int, frozen: bool) -> None:
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.scale = torch.nn.Parameter(torch.ones(d_out))
        self.base.requires_grad_(not frozen)

    def forward(self, h):
        return self.base(h) + self.scale * torch.nn.functional.linear(h, self.base.weight)


class ReadAfterCall(torch.nn.Module):
    """A unit (``mid.base``) called, then its weight read in its caller's forward, before
    the next unit runs; with ``last``, the schedule's last unit (``out.base``) too."""

    def __init__(self, seed: int, frozen: bool, last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.mid = torch.nn.Linear(4, 16), _Dora(16, 16, frozen)
        self.out = _Dora(16, 3, frozen) if last else torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + torch.tanh(self.mid(h)))


def unit_weight_read_after_its_call(ctx, frozen: bool, reshard: bool, last: bool = False):
    """``ReadAfterCall`` at stage 3 with every Linear a unit, against DDP: the largest
    parameter difference per step, and per step the all-gathered bytes over the bytes of
    every unit's gathered buffer. Backward failed with torch's raw "setStorage: ...
    storage of size 0" (the read saved a view of ``base``'s gathered parameters, which
    the forward released; a helper's probe, DoRA with automatic units): Note [another
    unit's parameters saved] in _saved_tensors.py. The last unit's was refused as a read
    of a released unit (a reviewer's probe): Note [the last unit released with its
    caller] in stage3.py."""
    model = ReadAfterCall(seed=0, frozen=frozen, last=last)
    reference = DDP(ReadAfterCall(seed=0, frozen=frozen, last=last), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, process_group=ctx.group,
                                  units=torch.nn.Linear, reshard_after_forward=reshard, lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    gathered = sum(b.flat.numel() * b.flat.element_size() for b in opt._plan.every_bucket)
    differences, gathers = [], []
    for step in range(3):
        opt.comm_stats.reset()
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        gathers.append(opt.comm_stats.bytes["all_gather"] / gathered)
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return differences, gathers


class RevBlock(torch.nn.Module):
    """A reversible residual block (RevNet, HF Reformer): its forward runs under no_grad,
    and ``backward_pass`` recomputes its inputs from its outputs by calling ``f`` and
    ``g`` inside backward, never the block's own forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
        self.g = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())

    def forward(self, x1, x2):
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    def backward_pass(self, y1, y2, dy1, dy2):
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_(True)
            gy1 = self.g(y1)
            torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2, dx1 = y2 - gy1, dy1 + y1.grad
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_(True)
            fx2 = self.f(x2)
            torch.autograd.backward(fx2, dx1)
        with torch.no_grad():
            return y1 - fx2, x2.detach(), dx1, dy2 + x2.grad


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks):
        with torch.no_grad():
            for block in blocks:
                x1, x2 = block(x1, x2)
        ctx.blocks = blocks
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        for block in reversed(ctx.blocks):
            y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2)
        return dy1, dy2, None


class ReversibleNet(torch.nn.Module):
    def __init__(self, seed: int, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(4, 2 * width)
        self.blocks = torch.nn.ModuleList(RevBlock(width) for _ in range(3))
        self.out = torch.nn.Linear(2 * width, 1)

    def forward(self, x):
        y1, y2 = _Reversible.apply(*self.inp(x).chunk(2, -1), list(self.blocks))
        return self.out(torch.cat([y1, y2], -1))


def reversible_blocks(ctx, reshard: bool):
    """``ReversibleNet`` at stage 3 with ``units=RevBlock``, against DDP: per step the
    largest parameter difference, the all-gathered bytes over the bytes of every unit's
    gathered buffer, and how many units were gathered as backward ended. ``f`` and ``g``
    computed with the released block's NaN placeholders, and every parameter was NaN
    after the first step, silently (a helper's probe, HF Reformer): Note [a unit's
    modules called in backward] in stage3.py."""
    model = ReversibleNet(seed=0)
    reference = DDP(ReversibleNet(seed=0), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, process_group=ctx.group,
                                  units=RevBlock, reshard_after_forward=reshard, lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    gathered = sum(b.flat.numel() * b.flat.element_size() for b in opt._plan.every_bucket)
    units = opt.sharding.stage.params.units
    differences, gathers, held = [], [], []
    for step in range(3):
        opt.comm_stats.reset()
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            net(x).square().mean().backward()
            if net is model:
                held.append(sum(u.state.name == "GATHERED" for u in units))
            optimizer.step()
            optimizer.zero_grad()
        gathers.append(opt.comm_stats.bytes["all_gather"] / gathered)
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return differences, gathers, held


class ScaledNet(torch.nn.Module):
    """A buffer that a forward saves for backward (``h * self.scale``)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 7))

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) * self.scale))


def two_forwards_one_backward_with_a_saved_buffer(ctx, stage: int):
    """Two training forwards, then one backward of both (contrastive, siamese losses),
    with a buffer the first forward saved: the second forward's buffer broadcast must not
    invalidate it (Note [buffers follow rank 0]). Returns the largest parameter
    difference to DDP after two steps."""
    model = ScaledNet(seed=ctx.rank)
    reference = DDP(ScaledNet(seed=0), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(2):
        x, _ = make_batch(MLP, seed=10 * step + ctx.rank, rank=ctx.rank, batch=4)
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            (net(x).pow(2).mean() + net(x + 1).pow(2).mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
    return largest_difference(opt, model, reference)


def grad_cleared_between_backward_and_step(ctx, stage: int, how: str, optimizer: str):
    """Between backward and step, the first layer's gradients are set to None (``how`` =
    "none") or zeroed in place ("zero_"), with a branch only some ranks use (so the
    ranks' local gradients differ). Every rank must decide alike: equal to DDP, or the
    same refusal on every rank. Plain SGD: a parameter without gradient and one with a
    zero gradient do not move. AdamW with weight decay, over 3 steps, clearing the
    weight alone, in one bucket with every parameter, or Muon stepping the matrices
    whole: torch skips a None gradient and steps a zero one (Note [a gradient cleared
    before the step]: the weight was stepped, with a zero gradient). Returns (refusal
    or None, probe, largest difference)."""
    spec = {**MLP, "unused_branch": True}
    model = build_model(spec, seed=ctx.rank)
    reference = DDP(build_model(spec, seed=0), process_group=ctx.group,
                    find_unused_parameters=True)
    def muon_groups(net):  # the matrices stepped whole by Muon, each on one rank
        matrices = [p for p in net.parameters() if p.ndim == 2]
        return [{"params": matrices, "optimizer_class": torch.optim.Muon, "lr": 0.02},
                {"params": [p for p in net.parameters() if p.ndim != 2]}]
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    if optimizer == "SGD":
        opt, ref_opts = _zero(model, stage, ctx.group, lr=0.1), [torch.optim.SGD(reference.parameters(), lr=0.1)]
    elif optimizer == "AdamW":
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                      bucket_size_mb=25, **kwargs)
        ref_opts = [torch.optim.AdamW(reference.parameters(), **kwargs)]
    else:
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                      param_groups=muon_groups(model), **kwargs)
        matrices, rest = (group["params"] for group in muon_groups(reference))
        ref_opts = [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, **kwargs)]
    refusal = None
    for step in range(1 if optimizer == "SGD" else 3):
        for net, optimizers in ((model, [opt]), (reference, ref_opts)):
            loss_fn(spec, net, make_batch(spec, seed=step, rank=ctx.rank, batch=4)).backward()
            first = (net.module if net is reference else net).body[0]
            for param in first.parameters() if optimizer == "SGD" else [first.weight]:
                if how == "none":
                    param.grad = None
                else:
                    param.grad.zero_()
            try:
                for opt_ in optimizers:
                    opt_.step()
            except RuntimeError as error:
                refusal = str(error)
            for opt_ in optimizers:
                opt_.zero_grad()
        if refusal is not None:
            break
    probe = _ranks_in_step(ctx)
    return refusal, probe, largest_difference(opt, model, reference)


def a_parameter_without_state_inside_a_shard(ctx, stage: int, how: str,
                                              folder: str | None = None) -> list[float]:
    """A parameter that has no optimizer state of its own while its bucket's shard has
    one (Note [a fresh state inside a shard's]): its gradient set to None in the first
    step only (``how`` = "cleared_first", a warm-up freeze), or a plain optimizer's state
    dict without state for it loaded into a new ZeroOptimizer ("loaded": DDP trained 2
    steps with it cleared, then resumed on zeroshard), or cleared in zeroshard's first 2
    steps, saved to ``folder`` and resumed by a new ZeroOptimizer ("resumed"). Rprop,
    whose fresh ``step_size`` is the lr, under StepLR, against DDP; per step, the largest
    parameter difference (zeros there held the weight still, a helper's probe: 1e-2 ..
    5.4e-2 from DDP; a resume that took its fresh values for its own state, 3.6e-2: a
    reviewer's), and what was said: the load's warnings of a parameter without state
    under its bucket's count, and whether full_state_dict() gave it a state.
    "loaded_adagrad": "loaded" with Adagrad, whose state dict holds ``step`` 0 for the
    cleared weight beside 2 (Note [a state never stepped]: refused as differing counts
    before, a reviewer's probe); "loaded_adagrad_lr_decay": with ``lr_decay``, which reads
    the count, refused (said: the refusal)."""
    cls, kwargs = torch.optim.Rprop, {"lr": 0.01}
    if how.startswith("loaded_adagrad"):  # "_lr_decay": a count Adagrad reads, refused
        cls, kwargs = torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1,
                                            "lr_decay": 0.1 if how.endswith("lr_decay") else 0.0}
        how = "loaded"
    model = build_model(MLP, seed=0)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    ref_opt = cls(reference.parameters(), **kwargs)
    schedulers = {id(ref_opt): torch.optim.lr_scheduler.StepLR(ref_opt, 1, gamma=0.9)}

    def train(net, optimizer_, steps, clear_in):
        for step in steps:
            loss_fn(MLP, net, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()
            if step in clear_in:
                (net.module if net is reference else net).body[0].weight.grad = None
            optimizer_.step()
            schedulers[id(optimizer_)].step()  # its groups' initial_lr: a setting no
            optimizer_.zero_grad()              # constructor takes

    def new_opt():
        return zeroshard.ZeroOptimizer(model, cls, stage=stage, process_group=ctx.group,
                                       bucket_size_mb=25, **kwargs,
                                       **({"units": torch.nn.Linear} if stage == 3 else {}))
    if how == "loaded":
        train(reference, ref_opt, range(2), clear_in=range(2))
        opt = new_opt()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.load_full_state_dict(reference.module.state_dict(), ref_opt.state_dict())
            except ValueError as refusal:
                opt.close()
                return [], [f"refused: {refusal}"]
        said = [str(w.message) for w in caught if "holds no state" in str(w.message)]
        steps = range(2, 5)
    elif how == "resumed":
        opt = new_opt()
        schedulers[id(opt)] = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        for step in range(2):
            train(model, opt, [step], clear_in=range(2))
            train(reference, ref_opt, [step], clear_in=range(2))
        zeroshard.save_checkpoint(folder, model, opt)
        full = opt.full_state_dict()
        frozen = [name for name, _ in model.named_parameters()].index("body.0.weight")
        said = ["full_state_dict() gave body.0.weight a state"] if (
            full is not None and frozen in full[1]["state"]) else []
        schedule = schedulers[id(opt)].state_dict()
        opt.close()
        opt = new_opt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the load's warning of the shared count
            zeroshard.load_checkpoint(folder, model, opt)
        schedulers[id(opt)] = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        schedulers[id(opt)].load_state_dict(schedule)
        steps = range(2, 5)
    else:
        opt = new_opt()
        said, steps = [], range(4)
    if id(opt) not in schedulers:
        schedulers[id(opt)] = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    differences = []
    for step in steps:
        train(model, opt, [step], clear_in=[0])
        train(reference, ref_opt, [step], clear_in=[0])
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return differences, said


def partial_gradient_writes(ctx, stage: int):
    """Zeroing some rows of a gradient after backward (``p.grad[rows].zero_()``, through
    ``p.grad.data``, or ``p.grad[rows] = 0``), or ``p.grad += 1``, as a fine-tuning loop that trains only new embedding rows
    might: zeroshard cannot apply it to the reduced gradient, so it must refuse on every
    rank (stages 2-3 at the write, stage 1 at the step) rather than clear the whole
    parameter or nothing. Returns the refusals and a probe that ranks are in step."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, lr=0.1)
    refusals = []
    def assign_rows(grad):  # p.grad[rows] = 0: torch's raw error from the marker before
        grad[:1] = 0

    def add_in_place(grad):
        grad += 1

    for write in (lambda g: g[:1].zero_(), lambda g: g.data[:1].zero_(), assign_rows,
                  add_in_place):
        loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()

        def write_then_step(write=write):
            write(model.body[0].weight.grad)
            opt.step()

        refusals.append(_refusal(write_then_step))
        opt.zero_grad()
    return refusals, _ranks_in_step(ctx)


def gradients_set_by_hand(ctx, stage: int):
    """Gradients the loop puts in ``p.grad`` itself, then a step with no backward: PCGrad's
    surgery (each loss's gradients from ``torch.autograd.grad``, their sum in ``p.grad``)
    and gradients copied in from another model (a helper's probe). No rank's hand-made
    gradient reaches the others, so every rank must refuse before the step's collectives,
    saying why: at stages 2 and 3 the step went on without them, the parameters not
    moved. Each way on a fresh optimizer and after a step that trained normally (and its
    ``opt.zero_grad()``). Returns the refusals and a probe that ranks are in step."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, lr=0.1)
    params = list(model.parameters())
    refusals = []
    for trained_before in (False, True):
        if trained_before:
            opt.zero_grad()
            loss_fn(MLP, model, make_batch(MLP, seed=1, rank=ctx.rank, batch=4)).backward()
            opt.step()
            opt.zero_grad()
        x, _ = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
        out = model(x)
        first = torch.autograd.grad(out[:, :1].pow(2).mean(), params, retain_graph=True)
        second = torch.autograd.grad(out[:, 1:].abs().mean(), params)
        surgery = [a + b for a, b in zip(first, second)]
        copied = [torch.full_like(a, 0.5) for a in first]  # a model zeroshard never saw
        for grads in (surgery, copied):
            def set_then_step(grads=grads):
                for param, grad in zip(params, grads):
                    param.grad = grad
                opt.step()

            refusals.append(_refusal(set_then_step))
            model.zero_grad()
    return refusals, _ranks_in_step(ctx)


def gradients_cleared_through_the_param_groups(ctx, stage: int, micro_batches: int,
                                               optimizer: str = "SGD") -> list:
    """Gradients cleared by setting ``opt.param_groups``' ``.grad`` to None after each step,
    as torch's ``Optimizer.zero_grad`` of a wrapper around the ZeroOptimizer does (timm's
    Lookahead, fairseq's), instead of ``opt.zero_grad()``, beside DDP clearing its own;
    ``micro_batches`` backwards a step, all but the last inside ``no_sync()``; SGD (flat
    shards) or Adafactor (stepped by whole parameters). Returns the largest parameter
    difference after each step. (Stage 1 added the old local gradients into the next
    step's: helper-105's probe, 7.5e-3 from DDP; with Adafactor every stage did: a
    reviewer's probe, 4.3e-2.)"""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    base = build_model(spec, seed=100 + ctx.rank)
    model, reference = copy.deepcopy(base), copy.deepcopy(base)
    cls = getattr(torch.optim, optimizer)
    opt = zeroshard.ZeroOptimizer(model, cls, stage=stage, process_group=ctx.group,
                                  lr=0.1, bucket_size_mb=1e-4)
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = cls(reference.parameters(), lr=0.1)
    differences = []
    for step in range(4):
        for micro in range(micro_batches):
            batch = make_batch(spec, seed=10 * step + micro, rank=ctx.rank, batch=4)
            last = micro == micro_batches - 1
            with contextlib.nullcontext() if last else opt.no_sync():
                loss_fn(spec, model, batch).backward()
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss_fn(spec, ddp, batch).backward()
        opt.step()
        ref_opt.step()
        torch.optim.Optimizer.zero_grad(opt)  # the param groups' .grad to None
        ref_opt.zero_grad()
        differences.append(largest_difference(opt, model, reference))
    opt.close()
    return differences


def param_group_gradients_replaced(ctx, stage: int, policy: bool) -> dict:
    """The gradients ``opt.param_groups`` show, changed between backward and the step:
    the weights' group given new tensors (``p.grad = p.grad.clamp(-c, c)``, or new
    memory through ``p.grad.data = ...``) and the biases' group set to None, then ``opt.clip_grad_norm_`` and SGD (no momentum: a
    zero gradient leaves a parameter where None does). The reference is the same loop
    changing them in place (``clamp_``, ``zero_()``), which reached the shards before.
    Returns the largest parameter difference and the clip norms of both, and how far
    the biases moved. (A helper's probes: the replaced gradients reached neither the
    clip's norm nor, under a bf16 policy, the step; the biases moved.)"""
    out = {}
    for way in ("replaced", "other memory", "in place"):
        model = build_model(MLP, seed=0)
        model = model.float() if policy else model.double()
        biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
        weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
        initial = [b.detach().clone() for b in biases]
        opt = zeroshard.ZeroOptimizer(
            model, torch.optim.SGD, stage=stage, lr=0.1, process_group=ctx.group,
            param_groups=[{"params": weights}, {"params": biases}],
            mixed_precision=zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16)
            if policy else None)
        norms = []
        for step in range(3):
            x, y = make_batch(MLP, seed=step, rank=ctx.rank, batch=4)
            dtype = torch.bfloat16 if policy else torch.float64  # the model computes in it
            torch.nn.functional.mse_loss(model(x.to(dtype)).double(), y.double()).backward()
            for p in opt.param_groups[0]["params"]:
                if way == "replaced":
                    p.grad = p.grad.clamp(-0.02, 0.02)
                elif way == "other memory":  # the same tensor object
                    p.grad.data = p.grad.clamp(-0.02, 0.02)
                else:
                    p.grad.clamp_(-0.02, 0.02)
            for p in opt.param_groups[1]["params"]:
                if way == "in place":
                    p.grad.zero_()
                else:
                    p.grad = None
            norms.append(opt.clip_grad_norm_(0.05).item())
            opt.step()
            opt.zero_grad()
        with opt.summon_full_params(full_precision=True):  # the masters, under the policy
            out[way] = ([p.detach().clone() for p in model.parameters()], norms,
                        max((b - i).abs().max().item() for b, i in zip(biases, initial)))
        opt.close()
    kept, kept_norms, kept_moved = out.pop("in place")
    return {way: {"difference": max((a - b).abs().max().item() for a, b in zip(params, kept)),
                  "norms": (norms, kept_norms), "biases moved": (moved, kept_moved)}
            for way, (params, norms, moved) in out.items()}


def forward_without_backward_frees_its_activations(ctx):
    """Stage 3, a forward with grad enabled whose output is dropped without backward (a
    loss skipped for being NaN, an evaluation without no_grad): with the garbage collector
    off, the activations it saved must be freed with it, as without zeroshard (Note
    [saved tensors]: the hooks must not make a reference cycle). Returns whether an
    activation saved inside the model is still alive after ``del``."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, 3, ctx.group, lr=0.1)
    x, _ = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
    seen = []  # a Tanh inside the model saves its output for backward
    model.body[1].register_forward_hook(lambda module, args, out: seen.append(weakref.ref(out)))
    gc.disable()
    try:
        out = model(x)
        del out
        result = seen[0]() is not None
    finally:
        gc.enable()
    opt.close()
    return result


def parameters_held_at_the_head(ctx):
    """Stage 3 with a unit per block: when the head runs (after the last block, with the
    logits and loss: often the forward's peak), no block is gathered any more, only the
    root's own parameters beside the shards. Returns (parameter bytes held then, the
    shards plus the root's full buffers, one block's bytes)."""
    model = build_model(TRANSFORMER, seed=ctx.rank)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=Block, lr=0.1)
    held = []
    model.head.register_forward_pre_hook(
        lambda module, args: held.append(opt.memory_report()["parameters"]))
    loss_fn(TRANSFORMER, model, make_batch(TRANSFORMER, seed=0, rank=ctx.rank, batch=2)).backward()
    block_bytes = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    # every unit's shards, and the root unit's full buffers, each as its layout pads it
    # (to a multiple of N, and each parameter's start aligned: Note [aligned parameters])
    units = opt.sharding.units
    bound = sum(4 * b.layout.shard_numel for u in units for b in u.buckets) + sum(
        4 * b.layout.padded_numel for b in units[0].buckets)
    opt.close()
    return held[0], bound, block_bytes


class ConvNet(torch.nn.Module):
    """Two convolutions and a linear head; ``channels_last`` gives the conv weights
    permuted strides (Note [memory order] in zeroshard/_bucket.py)."""

    def __init__(self, seed: int, channels_last: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 5, 3, padding=1)
        self.head = torch.nn.Linear(5, 3)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.mean((2, 3)))

    def conv_weights(self):
        return [self.conv1.weight, self.conv2.weight]


CONV_OPTIMIZERS = {"SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
                   "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})}


def _conv_batch(seed: int, rank: int):
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(2, 3, 6, 6, generator=generator).to(memory_format=torch.channels_last)
    return x, torch.randn(2, 3, generator=generator)


def _conv_zero(model, stage: int, group, optimizer: str):
    opt_class, kwargs = CONV_OPTIMIZERS[optimizer]
    # tiny buckets: shards cut through the conv weights
    return zeroshard.ZeroOptimizer(model, opt_class, stage=stage, process_group=group,
                                   bucket_size_mb=1e-4, **kwargs,
                                   **({"units": torch.nn.Conv2d} if stage == 3 else {}))


def _channels_last(tensors) -> list[bool]:
    return [t.is_contiguous(memory_format=torch.channels_last) for t in tensors]


def channels_last_conv_weights(ctx, stage: int, optimizer: str):
    """A ``channels_last`` conv net against DDP over the same: the conv weights stay
    ``channels_last`` after construction, in every forward (stage 3: gathered), in
    stage 1's ``.grad``, in the full state dict and after ``close()``; parameters and
    the exported optimizer state equal DDP's. Returns (layouts seen, per-step largest
    parameter differences, exported-state difference, difference after close)."""
    model = ConvNet(seed=ctx.rank, channels_last=True)
    reference = DDP(ConvNet(seed=0, channels_last=True), process_group=ctx.group)
    opt = _conv_zero(model, stage, ctx.group, optimizer)
    opt_class, kwargs = CONV_OPTIMIZERS[optimizer]
    ref_opt = opt_class(reference.parameters(), **kwargs)
    layouts = {}
    with opt.summon_full_params():
        layouts["constructed"] = _channels_last(model.conv_weights())
    forwards = []
    for conv in (model.conv1, model.conv2):
        conv.register_forward_pre_hook(
            lambda module, args: forwards.append(_channels_last([module.weight])[0]))
    diffs = []
    for step in range(3):
        x, y = _conv_batch(step, ctx.rank)
        for net, optimizer_ in ((model, opt), (reference, ref_opt)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            if net is model and stage == 1:  # the local gradient views its buffer
                layouts.setdefault("stage1_grads", _channels_last(p.grad for p in model.conv_weights()))
            optimizer_.step()
            optimizer_.zero_grad()
        diffs.append(largest_difference(opt, model, reference))
    layouts["forwards"] = forwards
    with opt.summon_full_params():
        layouts["stepped"] = _channels_last(model.conv_weights())
    exported = opt.full_state_dict()
    exported_diff = 0.0
    if exported is not None:
        model_sd, optim_sd = exported
        layouts["exported"] = _channels_last([model_sd["conv1.weight"], model_sd["conv2.weight"]])
        plain = reference.module
        for index, (name, param) in enumerate(plain.named_parameters()):
            exported_diff = max(exported_diff, (model_sd[name] - param).abs().max().item())
            for key, value in ref_opt.state[param].items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    theirs = optim_sd["state"][index][key]
                    exported_diff = max(exported_diff, (theirs - value).abs().max().item())
    opt.close()
    layouts["closed"] = _channels_last(model.conv_weights())
    closed = max((p - q).abs().max().item()
                 for p, q in zip(model.parameters(), reference.module.parameters()))
    return layouts, diffs, exported_diff, closed


def _conv_steps(model, opt, first: int, count: int, rank: int) -> None:
    for step in range(first, first + count):
        x, y = _conv_batch(step, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _full_conv_params(model, opt) -> list[torch.Tensor]:
    with opt.summon_full_params():
        return [p.detach().clone() for p in model.parameters()]


def channels_last_checkpoint_round_trip(ctx, stage: int, load_stage: int, folder: str):
    """AdamW at ``stage``: a ``channels_last`` model saves a checkpoint, a full state dict
    and a safetensors file; a row-major model at ``load_stage`` loads each (and the
    reverse: the row-major one saves, a ``channels_last`` one loads). Loaded parameters
    must equal the saved exactly, and after a further step (checkpoint and full state:
    the optimizer state followed too) the saving model's. Returns (largest difference
    per way and when, loaded conv weights' layouts)."""
    results, layouts = {}, {}
    for way, (save_cl, load_cl) in {"cl_to_plain": (True, False),
                                    "plain_to_cl": (False, True)}.items():
        saver = ConvNet(seed=0, channels_last=save_cl)
        opt = _conv_zero(saver, stage, ctx.group, "AdamW")
        _conv_steps(saver, opt, 0, 2, ctx.rank)
        path = f"{folder}/{way}"
        zeroshard.save_checkpoint(path, saver, opt)
        zeroshard.save_full_model(f"{path}_safetensors", saver, opt)
        exported = opt.full_state_dict()
        saved = _full_conv_params(saver, opt)
        _conv_steps(saver, opt, 2, 1, ctx.rank)
        stepped = _full_conv_params(saver, opt)
        for how in ("checkpoint", "full_state", "safetensors"):
            loader = ConvNet(seed=5, channels_last=load_cl)
            loaded_opt = _conv_zero(loader, load_stage, ctx.group, "AdamW")
            if how == "checkpoint":
                zeroshard.load_checkpoint(path, loader, loaded_opt)
            elif how == "full_state":  # the dicts on rank 0 only, sent bucket by bucket
                loaded_opt.load_full_state_dict(*(exported if exported is not None else (None, None)))
            else:  # the model only, each rank reading its ranges from the file
                loaded_opt.load_full_state_dict(f"{path}_safetensors")
            with loaded_opt.summon_full_params():
                layouts[f"{way}_{how}"] = _channels_last(loader.conv_weights())
            got = _full_conv_params(loader, loaded_opt)
            results[f"{way}_{how}"] = max((a - b).abs().max().item() for a, b in zip(got, saved))
            if how != "safetensors":
                _conv_steps(loader, loaded_opt, 2, 1, ctx.rank)
                got = _full_conv_params(loader, loaded_opt)
                results[f"{way}_{how}_stepped"] = max((a - b).abs().max().item()
                                                      for a, b in zip(got, stepped))
            loaded_opt.close()
        opt.close()
    return results, layouts


def channels_last_load_state_dict_with_bf16(ctx, stage: int):
    """bf16 mixed precision over a ``channels_last`` model: ``model.load_state_dict`` of a
    row-major model's fp32 values puts them into the fp32 masters exactly (they are
    indexed in the buffer's memory order). Returns (largest master difference, the conv
    weights' layouts inside summon_full_params)."""
    model = ConvNet(seed=ctx.rank, channels_last=True)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  mixed_precision=BF16, bucket_size_mb=1e-4, lr=0.05,
                                  **({"units": torch.nn.Conv2d} if stage == 3 else {}))
    _conv_steps(model, opt, 0, 1, ctx.rank)
    pretrained = ConvNet(seed=77, channels_last=False).state_dict()
    with opt.summon_full_params():
        model.load_state_dict(pretrained)
        layouts = _channels_last(model.conv_weights())
    names = {id(p): name for name, p in model.named_parameters()}
    diff = max((value - pretrained[names[key]]).abs().max().item()
               for key, value in opt.sharding.gather_masters().items())
    opt.close()
    return diff, layouts


def memory_formats_differ_across_ranks(ctx, stage: int):
    """Rank 0's conv weights ``channels_last``, the others' row-major: the buffers would
    hold their elements in different orders, so construction raises on every rank.
    Returns the message, or "no error"."""
    model = ConvNet(seed=0, channels_last=ctx.rank == 0)
    try:
        _conv_zero(model, stage, ctx.group, "SGD").close()
    except ValueError as error:
        return str(error)
    return "no error"


def optimizer_state_dict_across_memory_formats(ctx):
    """``opt.state_dict()`` is this rank's shard, in the buffer's memory order: loading it
    into an optimizer over a row-major model is refused; over a ``channels_last`` one it
    loads. Returns (the refusal, or "no error"; whether the second load went through)."""
    model = ConvNet(seed=0, channels_last=True)
    opt = _conv_zero(model, 2, ctx.group, "AdamW")
    _conv_steps(model, opt, 0, 1, ctx.rank)
    saved = opt.state_dict()
    refusal = "no error"
    try:
        _conv_zero(ConvNet(seed=0, channels_last=False), 2, ctx.group, "AdamW").load_state_dict(saved)
    except ValueError as error:
        refusal = str(error)
    _conv_zero(ConvNet(seed=0, channels_last=True), 2, ctx.group, "AdamW").load_state_dict(saved)
    return refusal, True


def clipping_through_the_param_groups(ctx, stage: int):
    """Clipping over the optimizer's tensors, as Lightning clips (Note [a norm of a shard]
    in zeroshard/_gradient_shards.py): by norm it is refused on every rank (it clipped
    each rank's shard by its own norm, silently unlike DDP); by value it equals DDP
    clipping the model's gradients by value. Returns (the refusal, a probe that every
    rank is still in step, per step the largest parameter difference of the clipping by
    value from DDP's)."""
    model = build_model(MLP, seed=0)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)

    def shards():
        return [p for group in opt.param_groups for p in group["params"]]

    x, y = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
    torch.nn.functional.mse_loss(model(x), y).backward()
    refusal = _refusal(lambda: torch.nn.utils.clip_grad_norm_(shards(), 0.01))
    probe = _ranks_in_step(ctx)
    # what a copy or a saved gradient gives: plain tensors holding the shard's values
    saved = io.BytesIO()
    torch.save([p.grad for p in shards()], saved)
    saved.seek(0)
    copies = copy.deepcopy(opt.param_groups)[0]["params"][0].grad, torch.load(saved)[0]
    shard = shards()[0].grad.as_subclass(torch.Tensor)
    assert all(type(c) is torch.Tensor and torch.equal(c, shard) for c in copies), copies
    opt.zero_grad()
    differences = []
    for step in range(3):
        x, y = make_batch(MLP, seed=step, rank=ctx.rank, batch=4)
        for net, optimizer, params in ((model, opt, shards), (reference, ref_opt,
                                                               reference.parameters)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            torch.nn.utils.clip_grad_value_(params(), 0.02)
            optimizer.step()
            optimizer.zero_grad()
        differences.append(largest_difference(opt, model, reference.module))
    opt.close()
    return refusal, probe, differences


def backward_inside_summon_full_precision(ctx, stage: int):
    """A forward and backward inside ``summon_full_params(full_precision=True)`` with a
    bf16 policy at stages 1-2, where the parameters show their fp32 masters: what each
    rank raised (it blamed a ``p.data = t`` of the user's, or at stage 1 torch's raw
    dtype error), and a probe that every rank is still in step."""
    model = build_model(MLP, seed=0)
    opt = _zero(model, stage, ctx.group, lr=0.05,
                mixed_precision=zeroshard.MixedPrecision(param_dtype=torch.bfloat16))
    x, y = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)

    def inside():
        with opt.summon_full_params(full_precision=True):
            torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
    return _refusal(inside), _ranks_in_step(ctx)


def parameter_replaced_after_construction(ctx, stage: int, how: str):
    """A parameter replaced after ZeroOptimizer(...): its ``.data`` (``p.data = t``,
    ``model.double()``; stages 1-2 went on stepping the old memory, silently) or the
    ``nn.Parameter`` itself (every stage stepped the old one), or converted by its
    module's own forward ("in_forward", as HF SwitchTransformers' router converts itself
    to its router dtype in every forward: backward failed with torch's raw dtype error).
    Returns (the refusal of the backward or the step, a probe that every rank is still in
    step)."""
    model = build_model(MLP, seed=0)
    opt = _zero(model, stage, ctx.group, lr=0.05)
    x, y = make_batch(MLP, seed=0, rank=ctx.rank, batch=4)
    head = model.body[-1]
    if how == "data":
        with torch.no_grad():
            head.weight.data = torch.randn_like(head.weight)
    elif how == "double":
        model.double()
        x, y = x.double(), y.double()
    elif how == "in_forward":
        head.register_forward_pre_hook(lambda module, args: (module.to(torch.float64),
                                                             (args[0].double(),))[1])
    else:
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))

    def backward_and_step():
        torch.nn.functional.mse_loss(model(x).to(y.dtype), y).backward()
        opt.step()
    return _refusal(backward_and_step), _ranks_in_step(ctx)


def step_after_a_backward_inside_no_sync(ctx, stage: int, action: str):
    """A window whose last backward ran inside ``no_sync()`` (found by a probe: stages
    2 and 3 stepped on shards without its gradients, moving nothing; stage 1 blamed a
    write to ``.grad``). ``action`` ("step" or "clip") must be refused on every rank;
    then ``zero_grad()`` and a window ending outside ``no_sync()``, and a window of
    two no_sync backwards then one synced, must train like DDP. Returns (refusal,
    probe, largest difference from DDP)."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    batch = lambda step: make_batch(MLP, seed=step, rank=ctx.rank, batch=4)  # noqa: E731
    with opt.no_sync():
        loss_fn(MLP, model, batch(0)).backward()
    refusal = _refusal(opt.step if action == "step" else lambda: opt.clip_grad_norm_(1.0))
    opt.zero_grad()
    for net, optimizer, no_sync in ((model, opt, opt.no_sync), (reference, ref_opt, reference.no_sync)):
        for step in range(1, 4):
            with no_sync():
                for micro in range(step - 1):  # 0, 1, 2 micro-batches inside no_sync()
                    loss_fn(MLP, net, batch(10 * step + micro)).backward()
            loss_fn(MLP, net, batch(10 * step + 9)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return refusal, _ranks_in_step(ctx), largest_difference(opt, model, reference)


def input_gradient_inside_no_sync(ctx, stage: int):
    """A synced backward, then ``torch.autograd.grad`` of a loss with respect to the
    input inside ``no_sync()`` (a saliency map, a metric), then a step: that call
    accumulates nothing into the parameters, so the step goes on, like DDP's. Found by
    review: it was refused as if a window's last backward had run inside no_sync().
    Returns the largest difference from DDP."""
    model = build_model(MLP, seed=0)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for net, optimizer, no_sync in ((model, opt, opt.no_sync), (reference, ref_opt, reference.no_sync)):
        for step in range(2):
            x, y = make_batch(MLP, seed=step, rank=ctx.rank, batch=4)
            loss_fn(MLP, net, (x, y)).backward()
            with no_sync():
                x.requires_grad_(True)
                torch.autograd.grad(loss_fn(MLP, net, (x, y)), x)
            optimizer.step()
            optimizer.zero_grad()
    return largest_difference(opt, model, reference)


def parameters_computed_in_a_pre_forward_hook(ctx, stage: int):
    """Legacy ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.prune`` compute a
    layer's weight from its parameters in a forward pre-hook registered before
    ``ZeroOptimizer(...)``. Found by a probe: at stage 3 with the layers as units
    that hook ran before the gather, on the placeholders, and training went NaN
    without an error. Returns the largest difference from DDP."""
    import warnings

    import torch.nn.utils.prune as prune

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
            torch.nn.utils.weight_norm(net[0])
        prune.l1_unstructured(net[2], "weight", amount=0.3)
        return net

    model, reference = build(), DDP(build(), process_group=ctx.group)
    opt = _zero(model, stage, ctx.group, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    _steps(MLP, model, opt, 0, 3, ctx.rank)
    _steps(MLP, reference, ref_opt, 0, 3, ctx.rank)
    return largest_difference(opt, model, reference)


def embedding_with_max_norm(ctx, stage: int, units):
    """``nn.Embedding(max_norm=1.0)`` renormalises the rows it looks up in place, inside
    its forward; the same batch on every rank, so DDP's replicas stay equal. Found by a
    probe: at stage 3 the write went to the gathered buffer and was lost at release
    (rows kept norms of 2 to 2.7). Returns the largest difference from DDP."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(11, 6, max_norm=1.0), torch.nn.Linear(6, 3))

    model, reference = build(), DDP(build(), process_group=ctx.group)
    kwargs = {"lr": 0.1, "momentum": 0.9}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  **({"units": units} if stage == 3 else {}), **kwargs)
    ref_opt = torch.optim.SGD(reference.parameters(), **kwargs)
    for net, optimizer in ((model, opt), (reference, ref_opt)):
        for step in range(3):
            tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(step))
            net(tokens).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return largest_difference(opt, model, reference)


class _MomentumContrast(torch.nn.Module):
    """MoCo as its reference code writes it: the key encoder, a frozen copy of the query
    encoder, moves towards it inside ``forward`` (``how``: "assign", ``p_k.data = p_k.data
    * m + p_q.data * (1 - m)``, the reference's; "in_place", the same without ``.data``
    under no_grad)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.query = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
        self.key = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
        self.key.load_state_dict(self.query.state_dict())
        self.key.requires_grad_(False)

    def forward(self, x):
        q = self.query(x)
        with torch.no_grad():
            for p_q, p_k in zip(self.query.parameters(), self.key.parameters()):
                if self.how == "assign":
                    p_k.data = p_k.data * 0.9 + p_q.data * 0.1
                else:
                    p_k.mul_(0.9).add_(p_q, alpha=0.1)
            k = self.key(x.flip(0))
        return -(torch.nn.functional.normalize(q, dim=1) * torch.nn.functional.normalize(k, dim=1)).sum()


def momentum_encoder_written_inside_forward(ctx, stage: int, how: str):
    """A MoCo step per rank's own batch, 4 steps of SGD beside DDP. Found by helper-96:
    at stage 3 the "assign" update took the key encoder's parameters off the gathered
    buffer and release put placeholders over them: the key encoder never moved, 1.5e-2
    from DDP, no error (Note [new .data inside a forward] in zeroshard/_bucket.py).
    Returns the largest difference from DDP, key encoder included."""
    def build():
        torch.manual_seed(0)
        return _MomentumContrast(how).double()

    model, reference = build(), DDP(build(), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad],
                              lr=0.1, momentum=0.9)
    for net, optimizer in ((model, opt), (reference, ref_opt)):
        for step in range(4):
            x = torch.randn(6, 5, generator=torch.Generator().manual_seed(10 * step + ctx.rank),
                            dtype=torch.float64)
            net(x).backward()
            optimizer.step()
            optimizer.zero_grad()
    return largest_difference(opt, model, reference)


def dropped_no_sync_window(ctx, clearing: str):
    """Stage 3: a window of ``no_sync()`` backwards that ran the branch (on rank 0),
    then ``clearing`` ("opt.zero_grad", "model.zero_grad" or "none": the window is
    kept), then a synced backward that runs it nowhere, and a step. AdamW with weight
    decay tells a zero gradient from none. Found by review: the record that the branch
    ran survived a zero_grad(), so the dropped window's unit was stepped with a zero
    gradient where data parallelism skips it. Returns the largest difference from
    data parallelism by hand, and the branch's largest move (zero only if skipped)."""
    spec = {**MLP, "unused_branch": True}
    model, reference = build_model(spec, seed=0), build_model(spec, seed=0)
    start = copy.deepcopy(reference.branch.weight.detach())
    kwargs = {"lr": 0.1, "weight_decay": 0.5}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, bucket_size_mb=1e-4,
                                  process_group=ctx.group, units=torch.nn.Linear, **kwargs)
    ref_opt = torch.optim.AdamW(reference.parameters(), **kwargs)
    window = make_batch(spec, seed=1, rank=ctx.rank, batch=4)  # the branch runs on rank 0
    x, y = make_batch(spec, seed=2, rank=ctx.rank, batch=4)
    x[:, 0] = -x[:, 0].abs()  # the branch runs nowhere
    for net, optimizer, no_sync in ((model, opt, opt.no_sync),
                                    (reference, ref_opt, contextlib.nullcontext)):
        with no_sync():
            loss_fn(spec, net, window).backward()
        if clearing != "none":
            (optimizer if clearing == "opt.zero_grad" else net).zero_grad()
        loss_fn(spec, net, (x, y)).backward()
        if net is reference:
            average_used_gradients(reference, ctx)
        optimizer.step()
        optimizer.zero_grad()
    moved = (reference.branch.weight.detach() - start).abs().max().item()
    return largest_difference(opt, model, reference), moved


@torch.compiler.disable
def _graph_boundary(*args) -> None:
    """A no-op hook dynamo does not trace: a graph break where stage 3's unit hooks make one."""


def compiled_model(ctx, stage: int, backend: str, autocast: bool, where: str = "model"):
    """``torch.compile(model)`` after ``ZeroOptimizer(...)`` (``where="blocks"``: each
    block compiled in place, ``block.compile()``; ``"step"``: the model as it is, and a
    compiled function that calls ``opt.step()`` and ``opt.zero_grad()``, which failed
    inside dynamo: helper-116; ``"train_step"``: one compiled function that runs the
    forward, backward, step and evaluation, which failed so too, and at stage 3 in the
    backward's hooks; ``"train_step_hooked"``: so, with a full backward hook on the first
    block, whose unit is then kept to the backward's end and released by its end,
    which failed inside dynamo after the first fix: helper-119), trained four steps
    with an evaluation forward between, against plain data parallelism (gradients averaged by
    hand) on the same model compiled alike. Stage 3's unit hooks run outside the graph
    (Note [stage 3 under torch.compile]), so the reference breaks its graph at the same
    blocks: the same kernels, bitwise. Found by a probe: stage 3 failed to compile
    (aot_eager: ``set_`` on a graph input) or failed inductor's stride checks.
    Returns the largest difference, and how many graphs zeroshard's model compiled
    after its first step (a gathered parameter that a guard saw as new would
    recompile every step, and past dynamo's cache limit fall back to eager)."""
    spec = {**TRANSFORMER, "tied": False}
    reference = build_model(spec, seed=0)
    for block in reference.modules():
        if isinstance(block, Block):
            block.register_forward_pre_hook(_graph_boundary)
            block.register_forward_hook(_graph_boundary)
    model = build_model(spec, seed=ctx.rank)
    if where == "train_step_hooked":  # a unit kept to the backward's end (helper-119)
        for net in (reference, model):
            next(m for m in net.modules() if isinstance(m, Block)).register_full_backward_hook(
                lambda module, grad_input, grad_output: None)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                  process_group=ctx.group, **({"units": Block} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    torch._dynamo.reset()  # each case compiles afresh in this worker
    graphs = torch._dynamo.utils.counters["stats"]

    @torch.compile(backend=backend)
    def train_step(batch):  # where="train_step*": one compiled function, the step in it
        loss_fn(spec, model, batch).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model(batch[0])
    for net, optimizer in ((reference, ref_opt), (model, opt)):
        def step_and_clear(optimizer=optimizer):
            optimizer.step()
            optimizer.zero_grad()
        if where == "blocks":
            compiled = net
            for block in [m for m in net.modules() if isinstance(m, Block)]:
                block.compile(backend=backend)
        elif where != "model":  # Note [the optimizer under torch.compile]
            compiled = net  # (torch's AdamW compiled computes its step otherwise: the
            if net is model:  # reference steps eagerly, as zeroshard's compiled one does)
                step_and_clear = torch.compile(step_and_clear, backend=backend)
        else:
            compiled = torch.compile(net, backend=backend)
        for step in range(4):
            if step == 1:
                graphs_after_one_step = graphs["unique_graphs"]
            batch = make_batch(spec, seed=10 * step + ctx.rank, rank=ctx.rank, batch=2)
            if where.startswith("train_step") and net is model:
                train_step(batch)
                continue
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = loss_fn(spec, compiled, batch)
            loss.backward()
            if net is reference:
                average_by_hand(reference, ctx)
            step_and_clear()
            with torch.no_grad():
                compiled(batch[0])  # an evaluation forward between steps
    recompiled = graphs["unique_graphs"] - graphs_after_one_step  # zeroshard's, after its first step
    return largest_difference(opt, model, reference), recompiled


class _SharedBlockRepeated(torch.nn.Module):
    """A shared block run ``repeats`` times, each under reentrant checkpointing (ALBERT's
    sharing with a depth that depends on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x, repeats: int):
        h = self.inp(x)
        for _ in range(repeats):
            h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
        return self.out(h)


def repeats_that_differ_across_ranks(ctx, stage: int, steps: int = 4):
    """Note [late gradients]: the shared block runs twice on rank 0 and once on the
    others in even steps, once everywhere in odd ones (the first included), so its bucket
    gets gradient late on rank 0 only, and not in the first step. Returns the largest
    parameter difference from the same model whose gradients are averaged by hand, per
    step."""
    torch.manual_seed(0)
    model, reference = _SharedBlockRepeated(), _SharedBlockRepeated()
    reference.load_state_dict(model.state_dict())
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9,
                                  process_group=ctx.group, bucket_size_mb=5e-4)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    def loss_of(net, step):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        repeats = 2 if step % 2 == 1 and ctx.rank == 0 else 1
        return net(x, repeats).square().mean()
    return differences_per_step(ctx, model, opt, reference, ref_opt, loss_of, steps)


def odd_sizes_against_ddp(ctx, stage: int, steps: int = 3):
    """Note [aligned parameters] (zeroshard/_layout.py): a regression head on odd sizes,
    whose F.linear rounds by where its weight starts in memory on this CPU. Returns the
    largest difference of outputs and of parameters from DDP's over ``steps`` SGD steps,
    and each parameter's start modulo 64 bytes (read where the forward reads it)."""
    def build():
        torch.manual_seed(7)
        return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.LeakyReLU(0.2),
                                   torch.nn.Linear(17, 1))
    model, reference = build(), DDP(build(), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    starts: set[int] = set()
    model[2].register_forward_pre_hook(
        lambda module, args: starts.update(p.data_ptr() % 64 for p in module.parameters()))
    generator = torch.Generator().manual_seed(ctx.rank)
    output_difference = 0.0
    for _ in range(steps):
        x = torch.randn(6, 13, generator=generator)
        outputs = []
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            out = net(x)
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
        output_difference = max(output_difference, (outputs[0] - outputs[1]).abs().max().item())
    difference = largest_difference(opt, model, reference)
    opt.close()
    return output_difference, difference, sorted(starts)


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _hooked_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(_Residual(), _Residual(), torch.nn.Linear(16, 4))


FORWARD_HOOKS_AFTER = ["calls a submodule", "scales by a weight", "logs a weight"]


def _add_forward_hook(model, how: str, log: list) -> None:
    """A forward hook on a block, as ``how`` says (FORWARD_HOOKS_AFTER). The block is a
    unit at stage 3; the second is the schedule's last unit."""
    if how == "calls a submodule":  # an adapter's extra residual
        model[0].register_forward_hook(lambda m, args, out: out + 0.1 * m.fc2(torch.tanh(m.fc1(out))))
    if how == "scales by a weight":
        model[1].register_forward_hook(lambda m, args, out: out * m.fc1.weight.mean())
    if how == "logs a weight":
        model[1].register_forward_hook(lambda m, args, out: log.append(m.fc1.weight.sum().item()))


def forward_hook_registered_after_the_optimizer(ctx, stage: int, how: str):
    """Note [the unit's forward hook runs last] in zeroshard/stage3.py: a forward hook
    added after ZeroOptimizer ran after the unit's own, which at stage 3 may have
    released the unit (NaN read, NaN trained) or stopped watching what its forward saves
    (a raw error in backward). Returns the largest parameter difference from DDP with
    the same hook after 3 steps, and whether the logged weights were DDP's."""
    model, reference = _hooked_net(0), _hooked_net(0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                  lr=0.01, **({"units": _Residual} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    logs, ref_logs = [], []
    _add_forward_hook(model, how, logs)
    _add_forward_hook(reference, how, ref_logs)
    for step in range(3):
        generator = torch.Generator().manual_seed(10 * step + ctx.rank)
        x, y = torch.randn(4, 16, generator=generator), torch.randn(4, 4, generator=generator)
        for net, optimizer in ((model, opt), (ddp, ref_opt)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return largest_difference(opt, model, reference), logs == ref_logs


class TiedLookup(torch.nn.Module):
    """A token embedding tied to the output head (``head.weight = emb.weight``), looked
    up once, or twice (``second_lookup``: a second token stream, as a retrieval model's);
    with ``checkpointed``, all of it under non-reentrant activation checkpointing
    (``runs`` counts the forwards, recomputations included)."""

    def __init__(self, seed: int, padding_idx=None, scale_grad_by_freq=False,
                 second_lookup=False, checkpointed=False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(40, 8, padding_idx=padding_idx,
                                      scale_grad_by_freq=scale_grad_by_freq)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 40, bias=False)
        self.head.weight = self.emb.weight
        self.second_lookup, self.checkpointed, self.runs = second_lookup, checkpointed, 0

    def forward(self, idx):
        if self.checkpointed:
            return torch.utils.checkpoint.checkpoint(self._forward, idx, use_reentrant=False)
        return self._forward(idx)

    def _forward(self, idx):
        self.runs += 1
        h = self.emb(idx)
        if self.second_lookup:
            h = h + self.emb(idx.flip(-1))
        return self.head(torch.tanh(self.body(h)))


LOOKUPS = {  # variant -> (TiedLookup's arguments, tokens per rank's batch, dtype)
    "plain": ({}, (3, 5), torch.float32),
    "padding, scaled by frequency": ({"padding_idx": 0, "scale_grad_by_freq": True},
                                     (3, 5), torch.float32),
    "bf16": ({}, (3, 5), torch.bfloat16),
    "two forwards": ({}, (3, 5), torch.float32),
    "more tokens than rows": ({}, (8, 6), torch.float32),
    "looked up twice": ({"second_lookup": True}, (3, 5), torch.float32),
    "checkpointed": ({"checkpointed": True}, (3, 5), torch.float32),
}


def tied_lookup_rows(ctx, stage: int, variant: str):
    """Note [an embedding's rows summed into the first contribution]: three AdamW steps of
    ``TiedLookup`` at ``stage`` and under DDP, tokens drawn from a few values (so a batch
    repeats rows, and holds the padding row). Returns (the largest parameter difference
    to DDP, how many lookups' rows went into the head's contribution, how many forwards
    ran here and under DDP)."""
    import zeroshard._gradient_sums as sums
    kwargs, shape, dtype = LOOKUPS[variant]
    model = TiedLookup(seed=ctx.rank, **kwargs).to(dtype)
    reference = DDP(TiedLookup(seed=0, **kwargs).to(dtype), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                                  process_group=ctx.group, bucket_size_mb=1e-4,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    applied, call = [], sums._EmbeddingRowsIntoFirst.__call__

    def counting(hook, grad_outputs):
        result = call(hook, grad_outputs)
        applied.append(result is not None)
        return result

    sums._EmbeddingRowsIntoFirst.__call__ = counting
    try:
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + ctx.rank)
            idx = torch.randint(0, 6, shape, generator=g)
            for net, optimizer in ((model, opt), (reference, ref_opt)):
                loss = net(idx).float().square().mean()
                if variant == "two forwards":
                    loss = loss + net(idx.roll(1, -1)).float().square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    finally:
        sums._EmbeddingRowsIntoFirst.__call__ = call
    return (largest_difference(opt, model, reference), sum(applied),
            (model.runs, reference.module.runs))


def saved_input_written_after_forward(ctx, stage: int, what: str) -> list[str]:
    """A tensor the forward saved for backward, written in place before the backward:
    the token ids a tied embedding looked up (labels made from them in place), or the
    input of a Linear (``x.mul_(2)``). Torch refuses in backward, under DDP and here:
    at stage 3 the units' saved-tensor hooks, which autograd does not version-check,
    check it themselves (they did not: the write went into the gradients silently).
    Returns the two errors (None where a backward ran), zeroshard's first."""
    errors = []
    for wrap in ("zeroshard", "ddp"):
        torch.manual_seed(0)
        model = TiedLookup(seed=0) if what == "token ids" else torch.nn.Sequential(
            torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
        if wrap == "zeroshard":
            opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                          process_group=ctx.group, bucket_size_mb=1e-4,
                                          **({"units": torch.nn.Linear} if stage == 3 else {}))
        net = model if wrap == "zeroshard" else DDP(model, process_group=ctx.group)
        g = torch.Generator().manual_seed(ctx.rank)
        if what == "token ids":
            inputs = torch.randint(0, 6, (3, 5), generator=g)
            loss = net(inputs).square().mean()
            inputs[inputs == 0] = 5
        else:
            inputs = torch.randn(2, 4, generator=g)
            loss = net(inputs).square().mean()
            inputs.mul_(2)
        errors.append(_backward_error(loss))
        if wrap == "zeroshard":
            opt.zero_grad()
            opt.close()
    return errors


def _backward_error(loss) -> str | None:
    """What ``loss.backward()`` raised, or None."""
    try:
        loss.backward()
    except RuntimeError as error:
        return str(error)
    return None


def backward_of_a_graph_from_before_the_step(ctx, stage: int, how: str) -> list[str]:
    """Note [a graph from before the step] (zeroshard/_saved_tensors.py): a graph built
    before ``opt.step()`` and backwarded after it. "loss kept": two losses computed, one
    backwarded and stepped, then the other backwarded. "gan": a generator's loss computed
    through the discriminator before the discriminator's step, backwarded after it (the
    discriminator's own loss through a detached fake). Torch refuses in backward, under
    DDP and here; every stage ran it, silently. "loss kept, autocast": the first under
    bf16 autocast, where torch saved its casts, which the step leaves alone, and runs.
    Returns the errors, zeroshard's first (None where a backward ran)."""
    errors = []
    for wrap in ("zeroshard", "ddp"):
        torch.manual_seed(0)
        gen, disc = (torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                         torch.nn.Linear(4, 4)) for _ in range(2))
        trained = disc if how == "gan" else gen
        if wrap == "zeroshard":
            opt = zeroshard.ZeroOptimizer(trained, torch.optim.AdamW, stage=stage, lr=0.1,
                                          process_group=ctx.group, bucket_size_mb=1e-4,
                                          **({"units": torch.nn.Linear} if stage == 3 else {}))
        else:
            ddp = DDP(trained, process_group=ctx.group)
            opt = torch.optim.AdamW(ddp.parameters(), lr=0.1)
            gen, disc = (gen, ddp) if how == "gan" else (ddp, disc)
        g = torch.Generator().manual_seed(ctx.rank)
        x, other = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
        if how == "gan":
            fake = gen(x)
            g_loss = disc(fake).square().mean()  # through the discriminator, before its step
            disc(fake.detach()).square().mean().backward()
            opt.step()
            later = g_loss
        else:
            with torch.autocast("cpu", torch.bfloat16, enabled=how.endswith("autocast")):
                first, later = gen(x).float().square().mean(), gen(other).float().square().mean()
            first.backward()
            opt.step()
        errors.append(_backward_error(later))
        if wrap == "zeroshard":
            opt.zero_grad()
            opt.close()
    return errors


def gradients_read_into_buffers_after_zero_grad_keeping_zeros(ctx, stage: int):
    """An EMA of gradients (``ema.add_(p.grad)``) after ``opt.zero_grad(set_to_none=False)``
    reads torch's zeros (stages 2-3: markers reading zero, Note [gradient markers]); after
    a backward the same read is refused (the reduced gradient is not in ``p.grad``).
    Returns (the largest value read after zero_grad, the refusal after backward)."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, lr=0.1)
    emas = [torch.zeros_like(p) for p in model.parameters()]
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    for ema, param in zip(emas, model.parameters()):
        ema.add_(param.grad)
    read = max(ema.abs().max().item() for ema in emas)
    loss_fn(MLP, model, make_batch(MLP, seed=1, rank=ctx.rank, batch=4)).backward()
    refusal = _refusal(lambda: [e.add_(p.grad) for e, p in zip(emas, model.parameters())])
    opt.zero_grad()
    opt.close()
    return read, refusal


def marker_reads_and_cleared_gradients(ctx, stage: int):
    """Stages 2-3 (a reviewer's probes): ``torch.add(ema, p.grad, out=ema)`` after backward
    wrote the marker's NaN into ``ema``, not refused as ``ema.add_(p.grad)`` is; and after
    ``p.grad = None``, ``opt.zero_grad(set_to_none=False)`` put a marker in ``p.grad``,
    where torch keeps None. Returns (the refusal of the ``out=`` read, whether ``ema``
    stayed finite, whether the cleared ``p.grad`` is None after the zero_grad)."""
    model = build_model(MLP, seed=ctx.rank)
    opt = _zero(model, stage, ctx.group, lr=0.1)
    first = model.body[0].weight
    ema = torch.zeros_like(first)
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()
    refusal = _refusal(lambda: torch.add(ema, first.grad, out=ema))
    finite = bool(torch.isfinite(ema).all())
    first.grad = None
    opt.step()
    opt.zero_grad(set_to_none=False)
    stays_none = first.grad is None
    opt.zero_grad()
    opt.close()
    return refusal, finite, stays_none


def layer_cleared_around_clipping(ctx, stage: int):
    """The first layer (a bucket of its own: its own param group; stage 3, a unit) has
    its weight's gradient set to None before ``clip_grad_norm_`` and its bias's after,
    in the first two steps, then trains (AdamW, weight decay). Cleared in two calls, the
    bucket kept its shard: held still, but Adam's step count advanced, 3.6e-3 from DDP
    once it trained (a reviewer's probe). Returns the largest difference from DDP."""
    model = build_model(MLP, seed=ctx.rank)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}

    def groups(net):
        first = list(net.body[0].parameters())
        return [{"params": first}, {"params": [p for p in net.parameters()
                                                if all(p is not q for q in first)]}]
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                  param_groups=groups(model), **kwargs,
                                  **({"units": torch.nn.Linear} if stage == 3 else {}))
    ref_opt = torch.optim.AdamW(groups(reference.module), **kwargs)
    for step in range(4):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            plain = net.module if net is reference else net
            loss_fn(MLP, net, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()
            if step < 2:
                plain.body[0].weight.grad = None
            if net is model:
                opt.clip_grad_norm_(1e9)
            else:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)
            if step < 2:
                plain.body[0].bias.grad = None
            optimizer.step()
            optimizer.zero_grad()
    difference = largest_difference(opt, model, reference)
    opt.close()
    return difference


def cleared_then_unit_unused_everywhere(ctx):
    """Stage 3 (a reviewer's probe): block 0's qkv weight gets its gradient set to None
    before the step, gradients accumulate (no zero_grad), and in the next step no rank
    runs block 0: torch keeps that None and skips the weight again, while the unit's
    other parameters step on what they accumulated. The first version forgot the
    clearing at that backward and stepped the weight with a zero gradient (1.7e-3 from
    DDP). Returns the largest difference from DDP after each step."""
    spec = TRANSFORMER
    model = build_model(spec, seed=ctx.rank)
    reference = DDP(build_model(spec, seed=0), process_group=ctx.group, find_unused_parameters=True)
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=type(model.blocks[0]), **kwargs)
    ref_opt = torch.optim.SGD(reference.parameters(), **kwargs)
    diffs = []
    for step in range(4):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            plain = net.module if net is reference else net
            plain.skip_block = step % 2 == 1
            loss_fn(spec, net, make_batch(spec, seed=step, rank=ctx.rank, batch=4)).backward()
            if step % 2 == 0:
                plain.blocks[0].qkv.weight.grad = None
            optimizer.step()
            if step % 2 == 1:
                optimizer.zero_grad()
        diffs.append(largest_difference(opt, model, reference))
    opt.close()
    return diffs
