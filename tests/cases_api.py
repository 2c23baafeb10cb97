"""Worker-side functions for the API tests: bad input, state dicts, collectives, the pool."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import zeroshard
from zeroshard import _comm, stage2
from zeroshard._ranks import ranks_from
from cases import differences_per_step
from models import build_model, loss_fn, make_batch

MLP = {"kind": "mlp", "d_in": 5, "hidden": 7, "d_out": 3, "depth": 2, "frozen": False,
       "unused_branch": False}


def _bad_arguments(which: str, model: nn.Module, group, meshes):
    """(args, kwargs) for ZeroOptimizer that are wrong in the way ``which`` names."""
    kwargs = {"stage": 1, "process_group": group, "lr": 0.1}
    if which == "stage":
        return (model, torch.optim.SGD), {**kwargs, "stage": 4}
    if which == "ddp":
        return (DDP(model, process_group=group), torch.optim.SGD), kwargs
    if which == "lazy_module":  # failed in a torch internal with torch's message (a helper's probe)
        return (nn.Sequential(model, nn.LazyLinear(4)), torch.optim.SGD), kwargs
    if which == "foreign_param":
        stranger = nn.Parameter(torch.zeros(2, 3))
        return (model, torch.optim.SGD), {**kwargs, "param_groups": [
            {"params": list(model.parameters())}, {"params": [stranger]}]}
    if which == "named_params":  # torch's optimizers take these
        return (model, torch.optim.SGD), {**kwargs, "param_groups": model.named_parameters()}
    if which == "duplicate_param":
        params = list(model.parameters())
        return (model, torch.optim.SGD), {**kwargs, "param_groups": [
            {"params": params}, {"params": params[:1]}]}
    if which in ("set_group", "set_params"):  # torch refuses a set: each rank orders it its own way
        params = set(model.parameters())
        return (model, torch.optim.SGD), {**kwargs, "param_groups": (
            [{"params": params}] if which == "set_group" else params)}
    if which == "differentiable":  # nothing differentiates through a step of shards
        return (model, torch.optim.AdamW), {**kwargs, "differentiable": True}
    if which == "lbfgs":
        return (model, torch.optim.LBFGS), kwargs
    if which == "sparse_adam":
        return (model, torch.optim.SparseAdam), kwargs
    if which in ("group_class", "muon_vector"):  # a bias in Muon's group: only its owner would see
        weights = [p for p in model.parameters() if p.dim() == 2]
        others = [p for p in model.parameters() if p.dim() != 2]
        muon = "Muon" if which == "group_class" else torch.optim.Muon
        return (model, torch.optim.SGD), {**kwargs, "param_groups": [
            {"params": weights}, {"params": others, "optimizer_class": muon}]}
    if which == "opacus_per_sample":  # a stand-in named as opacus names its classes
        base = type("AbstractGradSampleModule", (nn.Module,),
                    {"__module__": "opacus.grad_sample.gsm_base"})
        wrapper = type("GradSampleModule", (base,), {
            "__module__": "opacus.grad_sample.grad_sample_module",
            "forward": lambda self, x: self._module(x)})()
        wrapper._module = model
        return (wrapper, torch.optim.SGD), kwargs
    if which == "tied_through_memory":  # the old way of tying a transposed weight
        model.decoder = nn.Linear(7, 5, bias=False)
        model.decoder.weight = nn.Parameter(model.body[0].weight.data.t())
        return (model, torch.optim.SGD), kwargs
    if which == "tied_through_memory_on_meta":  # meta has no addresses: its storages tell
        with torch.device("meta"):
            model = build_model(MLP, seed=0)
            model.decoder = nn.Linear(7, 5, bias=False)
            model.decoder.weight = nn.Parameter(model.body[0].weight.data.t())
        return (model, torch.optim.SGD), {**kwargs, "device": "cpu"}
    if which == "buffer_views_parameter":  # a weight transposed once, cached as a buffer
        model.body[0].register_buffer("weight_t", model.body[0].weight.detach().t(),
                                      persistent=False)
        return (model, torch.optim.SGD), kwargs
    if which == "overlapping_storages":  # two storages over one memory (torch.frombuffer)
        memory = bytearray(4 * 40)
        model.first = nn.Parameter(torch.frombuffer(memory, dtype=torch.float32, count=30))
        model.second = nn.Parameter(torch.frombuffer(memory, dtype=torch.float32, count=30,
                                                     offset=4 * 10))
        return (model, torch.optim.SGD), kwargs
    if which == "buffer_views_frozen_parameter":  # stage 3: its broadcast writes a released one
        model.body[0].weight.requires_grad_(False)
        model.body[0].register_buffer("weight_t", model.body[0].weight.detach().t(),
                                      persistent=False)
        return (model, torch.optim.SGD), {**kwargs, "stage": 3}
    if which == "expanded_parameter":  # it was refused as a dropped optimizer's placeholder
        model.extra = nn.Parameter(torch.zeros(1, 4).expand(3, 4))
        return (model, torch.optim.SGD), kwargs
    if which == "devices":
        model.extra = nn.Parameter(torch.zeros(3, device="meta"))
        return (model, torch.optim.SGD), kwargs
    if which == "meta_without_device":
        with torch.device("meta"):
            return (nn.Linear(3, 2), torch.optim.SGD), kwargs
    if which == "meta_without_init":  # a bare parameter: nothing to give it values
        with torch.device("meta"):
            holder = nn.Sequential(nn.Linear(3, 2), nn.ParameterList([nn.Parameter(torch.ones(2))]))
        return (holder, torch.optim.SGD), {**kwargs, "device": "cpu"}
    if which == "meta_buffer":  # reset_parameters() would overwrite the real weights
        model.norm = nn.BatchNorm1d(3)
        model.norm.running_mean = torch.empty(3, device="meta")
        return (model, torch.optim.SGD), {**kwargs, "device": "cpu"}
    if which == "device_meta":
        return (model, torch.optim.SGD), {**kwargs, "device": "meta"}
    if which == "init_fn":
        return (model, torch.optim.SGD), {**kwargs, "init_fn": "normal"}
    if which == "init_fn_not_meta":
        return (model, torch.optim.SGD), {**kwargs, "init_fn": print}
    if which == "units":
        return (model, torch.optim.SGD), {**kwargs, "units": {nn.Linear}}
    if which == "units_container":  # a ModuleList is never called: it cannot gather
        holder = nn.Sequential(nn.ModuleList([model]))
        return (holder, torch.optim.SGD), {**kwargs, "stage": 3, "units": nn.ModuleList}
    if which == "units_type":
        return (model, torch.optim.SGD), {**kwargs, "stage": 3, "units": "Linear"}
    if which == "broadcast_buffers":
        return (model, torch.optim.SGD), {**kwargs, "broadcast_buffers": "yes"}
    if which == "mesh_and_group":
        return (model, torch.optim.SGD), {**kwargs, "mesh": meshes[(1, 2)]}
    if which == "mesh_out_of_order":  # ranks 0 and 1 share a replica listed as [1, 0]
        return (model, torch.optim.SGD), {**kwargs, "process_group": None,
                                          "mesh": meshes["2x2 out of order"]}
    if which == "mesh_type":
        return (model, torch.optim.SGD), {**kwargs, "process_group": None, "mesh": (2, 2)}
    if which == "bucket_size":
        return (model, torch.optim.SGD), {**kwargs, "bucket_size_mb": 0}
    raise AssertionError(which)


def construct_with_bad_input(ctx, which: str):
    """Return (exception type, message, collectives issued) from a bad construction."""
    model = build_model(MLP, seed=ctx.rank)
    args, kwargs = _bad_arguments(which, model, ctx.group, ctx.meshes)
    issued = []
    real = {name: getattr(dist, name) for name in ("broadcast", "all_reduce")}
    real.update(gather=_comm._all_gather_flat, scatter=_comm._reduce_scatter_flat)

    def spy(name):
        def call(*a, **k):
            issued.append(name)
            return real[name](*a, **k)
        return call

    with mock.patch.object(dist, "broadcast", spy("broadcast")), \
            mock.patch.object(dist, "all_reduce", spy("all_reduce")), \
            mock.patch.object(_comm, "_all_gather_flat", spy("gather")), \
            mock.patch.object(_comm, "_reduce_scatter_flat", spy("scatter")):
        try:
            zeroshard.ZeroOptimizer(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the test checks what it is
            outcome = (type(error).__name__, str(error), issued)
        else:
            outcome = ("no error", "", issued)
    # Every rank is still in step: a rank stuck in a collective would hang or fail here.
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    assert probe.item() == ctx.world_size
    return outcome


def _train(model, opt, steps: int, start: int, rank: int):
    for step in range(start, start + steps):
        loss = loss_fn(MLP, model, make_batch(MLP, seed=step, rank=rank, batch=4))
        loss.backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()


def resume_from_state_dict(ctx, stage: int, optimizer: str, bf16: bool = False,
                           model_too: bool = True):
    """Train 2 steps, save, train 3 more; then resume a fresh model from the save (with
    bf16 and not ``model_too``, from the optimizer's state dict alone: it holds the fp32
    masters, and so the weights)."""
    opt_class = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[optimizer]
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer == "SGD" else {"lr": 0.01}
    if bf16:
        kwargs["mixed_precision"] = zeroshard.MixedPrecision(
            torch.bfloat16, buffer_dtype=torch.bfloat16, output_dtype=torch.float32)

    def fresh(seed):
        model = build_model(MLP, seed=seed)
        return model, zeroshard.ZeroOptimizer(model, opt_class, stage=stage, process_group=ctx.group,
                                              bucket_size_mb=1e-4, **kwargs)

    def params(model, opt):
        with opt.summon_full_params():  # stage 3: gathered to read
            return [p.detach().clone() for p in model.parameters()]

    model, opt = fresh(seed=ctx.rank)
    _train(model, opt, steps=2, start=0, rank=ctx.rank)
    with opt.summon_full_params():
        saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, steps=3, start=2, rank=ctx.rank)
    uninterrupted = params(model, opt)

    model2, opt2 = fresh(seed=1234 + ctx.rank)
    if model_too:
        with opt2.summon_full_params():
            model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, steps=3, start=2, rank=ctx.rank)
    resumed = params(model2, opt2)
    if bf16:  # the fp32 masters too, not only their bf16 casts
        uninterrupted += list(opt.sharding.gather_masters().values())
        resumed += list(opt2.sharding.gather_masters().values())
    return uninterrupted, resumed


def a_state_dict_refused_on_one_rank(ctx, stage: int):
    """Rank 1 loads a state dict that is not its own; rank 0 loads its own. Then every
    rank loads its own inside summon_full_params(), which mixed precision refuses.
    Returns what each rank raised in each (a step after each trains on every rank: no
    rank was left in a collective)."""
    model = build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                  lr=0.01, bucket_size_mb=1e-4,
                                  mixed_precision=zeroshard.MixedPrecision(
                                      torch.bfloat16, buffer_dtype=torch.bfloat16,
                                      output_dtype=torch.float32),
                                  **({"units": nn.Linear} if stage == 3 else {}))
    _train(model, opt, steps=1, start=0, rank=ctx.rank)
    saved = opt.state_dict()
    if ctx.rank == 1:
        saved = {**saved, "rank": 0}  # as if rank 0's state dict were loaded everywhere
    try:
        opt.load_state_dict(saved)
        raised = None
    except (ValueError, RuntimeError) as error:
        raised = f"{type(error).__name__}: {error}"
    _train(model, opt, steps=1, start=1, rank=ctx.rank)
    inside = None
    with opt.summon_full_params():  # the end of the block would overwrite the masters
        try:
            opt.load_state_dict(opt.state_dict())
        except RuntimeError as error:
            inside = str(error)
    _train(model, opt, steps=1, start=2, rank=ctx.rank)
    return raised, inside


def resetting_state_through_opt_state(ctx, stage: int, how: str = "entries"):
    """Two param groups; after 2 steps the state is reset the torch way: ``"entries"``,
    group 0's, ``opt.state[t] = {}`` over ``opt.param_groups[0]["params"]`` (this rank's
    shards); ``"assigned"``, every group's, ``opt.state = collections.defaultdict(dict)``
    (Note [the state assigned anew]); beside DDP + AdamW resetting alike; 2 more steps.
    Before the first step each side reads ``opt.state[t].get("exp_avg")`` over its
    tensors (a log line). Returns the largest parameter difference from DDP, what ``opt.state[p] = {}`` and
    ``opt.state.get(p)`` raised for a model parameter (the first did nothing before: an
    empty dict took the entry; the second answered None, as if it had no state), or for
    ``"assigned"`` what assigning a mapping with an entry raised, and the early reads."""
    import collections

    model, reference = build_model(MLP, seed=0), build_model(MLP, seed=0)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                  param_groups=[{"params": decay}, {"params": rest, "weight_decay": 0}],
                                  lr=0.01, bucket_size_mb=1e-4,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    ddp = DDP(reference, process_group=ctx.group)
    named = dict(reference.named_parameters())
    torch_opt = torch.optim.AdamW(
        [{"params": [named[n] for n, _ in model.named_parameters() if n.endswith("weight")]},
         {"params": [named[n] for n, _ in model.named_parameters() if not n.endswith("weight")],
          "weight_decay": 0}], lr=0.01)
    refusals = [None, None]
    # a log line of the moments before the first step, the torch way: torch's defaultdict
    # answers {} (zeroshard raised KeyError: helper-125)
    early_reads = [opt.state[t].get("exp_avg") for g in opt.param_groups for t in g["params"]]
    early_reads += [torch_opt.state[p].get("exp_avg") for g in torch_opt.param_groups for p in g["params"]]
    for step in range(4):
        if step == 2 and how == "assigned":
            opt.state = collections.defaultdict(dict)
            torch_opt.state = collections.defaultdict(dict)
            try:
                opt.state = {opt.param_groups[0]["params"][0]: {}}
            except TypeError as error:
                refusals = [str(error)]
        elif step == 2:
            for tensor in opt.param_groups[0]["params"]:
                opt.state[tensor] = {}
            for param in torch_opt.param_groups[0]["params"]:
                torch_opt.state[param] = {}
            try:
                opt.state[decay[0]] = {}
            except KeyError as error:
                refusals[0] = str(error)
            try:
                opt.state.get(decay[0])
            except KeyError as error:
                refusals[1] = str(error)
        for module, optimizer in ((model, opt), (ddp, torch_opt)):
            loss_fn(MLP, module, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()
            optimizer.step()
            optimizer.zero_grad()
    with opt.summon_full_params():
        difference = max((p - q).abs().max().item()
                         for p, q in zip(model.parameters(), reference.parameters()))
    opt.close()
    return difference, refusals, early_reads


def save_after_a_module_was_removed(ctx, stage: int, how: str):
    """A module holding managed parameters is replaced after the optimizer was built
    (as PEFT's merge_and_unload() does), then the model is saved. Returns the refusal,
    and whether every rank then reached the same collective."""
    import tempfile
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, **({"units": nn.Linear} if stage == 3 else {}))
    model[2] = nn.Identity()
    save = zeroshard.save_full_model if how == "save_full_model" else zeroshard.save_checkpoint
    try:
        save(tempfile.mkdtemp(), model, opt)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    return refusal, probe.item() == ctx.world_size


def state_dict_outside_summon(ctx):
    """Stage 3: model.state_dict() on sharded parameters is refused, not a crash."""
    model = build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.1, units=nn.Linear)
    messages = []
    for call in (model.state_dict, lambda: model.load_state_dict(model.state_dict())):
        try:
            call()
        except RuntimeError as error:
            messages.append(str(error))
    with opt.summon_full_params():
        messages.append(sorted(model.state_dict()))
    return messages


def load_state_dict_from_other_world_size(ctx):
    """A state dict saved on world size N does not silently load on N+1."""
    model = build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, process_group=ctx.group, lr=0.1)
    sd = opt.state_dict()
    sd["world_size"] += 1
    try:
        opt.load_state_dict(sd)
    except ValueError as error:
        return str(error)
    return "no error"


def load_state_dict_from_another_stage(ctx, saving: int, loading: int):
    """Four equal Linear layers: a state dict saved at stage ``saving`` has buckets of the
    same sizes as one at stage ``loading``, holding other parameters (stages 1-2 fill
    them in backward's order, stage 3 by units). Found by a probe: it loaded, and the
    state went to the wrong parameters, silently. Returns the refusal or "no error"."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(12, 12, bias=False) for _ in range(4)])

    def optimizer(model, stage):
        return zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9,
                                       process_group=ctx.group, bucket_size_mb=1e-4,
                                       **({"units": nn.Linear} if stage == 3 else {}))

    model = build()
    opt = optimizer(model, saving)
    model(torch.randn(3, 12)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    opt.close()
    other = optimizer(build(), loading)
    try:
        other.load_state_dict(saved)
    except ValueError as error:
        return str(error)
    finally:
        other.close()
    return "no error"


def new_data_inside_summon(ctx):
    """Stage 3: ``p.data = t`` inside ``summon_full_params()`` (the place the README sends
    writes to), then training on, against DDP given the same value; then ``.data`` of
    another shape (what ``resize_token_embeddings`` does). Found by a probe: the new
    value was lost, silently (the shard kept the old), and the new shape failed at the
    next forward with a reshape error naming nothing. Returns (largest difference from
    DDP, the error for the new shape, the error for ``model.double()`` inside the block
    on another model, which came out fp32 again, silently: a helper's probe)."""
    model = build_model(MLP, seed=0)
    reference = DDP(build_model(MLP, seed=0), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1, momentum=0.9,
                                  process_group=ctx.group, units=nn.Linear)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for net, optimizer, plain in ((model, opt, model), (reference, ref_opt, reference.module)):
        for step in range(3):
            if step == 1:
                with opt.summon_full_params() if net is model else contextlib.nullcontext():
                    plain.body[0].weight.data = torch.full_like(plain.body[0].weight, 0.25)
            loss_fn(MLP, net, make_batch(MLP, seed=step, rank=ctx.rank, batch=4)).backward()
            optimizer.step()
            optimizer.zero_grad()
    with opt.summon_full_params():
        diff = max((p - q).abs().max().item()
                   for p, q in zip(model.parameters(), reference.module.parameters()))
    refusals = []
    for built, change in ((model, lambda m: setattr(m.body[2].weight, "data", torch.zeros(2, 2))),
                          (build_model(MLP, seed=0), lambda m: m.double())):
        optimizer = opt if built is model else zeroshard.ZeroOptimizer(
            built, torch.optim.SGD, stage=3, lr=0.1, process_group=ctx.group, units=nn.Linear)
        try:
            with optimizer.summon_full_params():
                change(built)
            refusals.append("no error")
        except ValueError as error:
            refusals.append(str(error))
    return diff, *refusals


def collectives_are_counted(ctx, mesh_key=None):
    """Each collective in _comm moves the right data and is counted by DESIGN.md's rule,
    over the pool's group of ``ctx.world_size`` ranks or one of its meshes."""
    mesh = ctx.mesh(mesh_key)
    ranks = ranks_from(None if mesh else ctx.group, mesh)
    s, r = ranks.shard_size, ctx.rank
    stats = _comm.CommStats()
    out = {"rank": ranks.rank, "shard_rank": ranks.shard_rank}
    full = torch.arange(2 * s, dtype=torch.float32) * (r + 1)  # rank r holds (r+1) * [0..2s)
    shard = torch.empty(2)
    _comm.reduce_scatter(shard, full, group=ranks, stats=stats, label="test")
    out["reduce_scatter"] = shard.tolist()
    gathered = torch.empty(2 * s)
    _comm.all_gather(gathered, torch.full((2,), float(r)), group=ranks, stats=stats, label="test")
    out["all_gather"] = gathered.tolist()
    total = torch.tensor([float(r)], dtype=torch.float64)
    _comm.all_reduce(total, group=ranks, stats=stats, label="test")
    out["all_reduce"] = total.item()
    value = torch.full((3,), float(r), dtype=torch.bfloat16)
    _comm.broadcast(value, group=ranks, stats=stats, label="test")
    out["broadcast"] = value.float().tolist()
    out["bytes"], out["calls"] = dict(stats.bytes), dict(stats.calls)
    out["by_dim"] = {key: value for key, value in stats.by_dim.items() if value}
    stats.reset()
    out["after_reset"] = dict(stats.bytes)
    return out


def two_reduce_scatters_in_flight(ctx, numel: int, dtype_name: str) -> dict:
    """Note [two ranks exchange halves] (zeroshard/_comm.py): two reduce-scatters (SUM
    and AVG) of random ``numel``-element tensors in flight at once, beside an all-reduce
    of the same tensors; and whether their inputs were left as they were."""
    dtype = getattr(torch, dtype_name)
    ranks = ranks_from(ctx.group, None)
    stats = _comm.CommStats()
    generator = torch.Generator().manual_seed(ctx.rank)
    inputs = [torch.randn(numel, generator=generator).to(dtype) for _ in range(2)]
    kept = [t.clone() for t in inputs]
    outputs = [torch.empty(numel // 2, dtype=dtype) for _ in inputs]
    works = [_comm.reduce_scatter(out, t, group=ranks, stats=stats, label="test", op=op,
                                  async_op=True)
             for out, t, op in zip(outputs, inputs, (dist.ReduceOp.SUM, dist.ReduceOp.AVG))]
    _comm.wait_all(works)
    mine = slice(ctx.rank * (numel // 2), (ctx.rank + 1) * (numel // 2))
    expected = []
    for t, halve in zip(kept, (False, True)):
        total = t.clone()
        dist.all_reduce(total, group=ctx.group)
        expected.append(total[mine] / 2 if halve else total[mine])
    return {"equal": [torch.equal(o, e) for o, e in zip(outputs, expected)],
            "inputs_kept": all(torch.equal(t, k) for t, k in zip(inputs, kept))}


def hang(ctx):
    """Rank 0 waits in a collective that no other rank joins."""
    if ctx.rank == 0:
        dist.all_reduce(torch.ones(1), group=ctx.group)
    time.sleep(0.1)
    return ctx.rank


def rank_of(ctx):
    return ctx.rank


def summon_full_params_and_state_dict(ctx, stage: int):
    """Inside summon_full_params the parameters are DDP's; writes made there persist."""
    spec = {"kind": "transformer", "vocab": 13, "d": 8, "heads": 2, "layers": 2, "seq": 5,
            "tied": True, "frozen": False}
    from models import Block
    base = build_model(spec, seed=ctx.rank)
    zero_model, ddp_model = copy.deepcopy(base), copy.deepcopy(base)
    extra = {"units": Block} if stage == 3 else {}
    opt = zeroshard.ZeroOptimizer(zero_model, torch.optim.AdamW, stage=stage,
                                  process_group=ctx.group, lr=0.01, **extra)
    ddp = DDP(ddp_model, process_group=ctx.group)
    dopt = torch.optim.AdamW(ddp.parameters(), lr=0.01)
    for step in range(2):
        batch = make_batch(spec, seed=step, rank=ctx.rank, batch=3)
        for model, o in ((zero_model, opt), (ddp, dopt)):
            loss_fn(spec, model, batch).backward()
            o.step()
            o.zero_grad()
    with opt.summon_full_params():
        zero_sd = {k: v.clone() for k, v in zero_model.state_dict().items()}
        with torch.no_grad():
            for p in zero_model.parameters():
                p.mul_(0.5)  # the same write on every rank
    halved = {k: v.clone() for k, v in zero_sd.items()}
    with opt.summon_full_params():
        after = {k: v.clone() for k, v in zero_model.state_dict().items()}
    ddp_sd = ddp_model.state_dict()
    gathered = opt.memory_report()["parameters"]
    # stage 3's shards as the layouts pad them (Note [aligned parameters] in _layout.py)
    shards = sum(4 * b.layout.shard_numel for b in opt.sharding.plan.buckets)
    return ({k: (zero_sd[k] - ddp_sd[k]).abs().max().item() for k in ddp_sd},
            {k: (after[k] - 0.5 * halved[k]).abs().max().item() for k in after},
            gathered, shards)


def _train_each(pairs, steps: int, start: int, rank: int) -> None:
    """``steps`` steps on MLP batches from seed ``start``, each (model, optimizer) of
    ``pairs`` in turn: a zeroshard model beside its DDP reference."""
    for step in range(start, start + steps):
        for module, optimizer in pairs:
            loss_fn(MLP, module, make_batch(MLP, seed=step, rank=rank, batch=4)).backward()
            optimizer.step()
            optimizer.zero_grad()


def state_dict_kept_past_summon(ctx, bf16: bool):
    """Stage 3 (Note [views taken inside summon_full_params]): a state dict taken inside
    ``summon_full_params()`` (beside ``opt.full_state_dict()``, whose collectives let go of
    the block's gathers: helper-129) and saved with torch.save after the block, as a DDP
    loop saves; then 2 more steps, and a block that saves inside and keeps nothing. Returns
    what the saved file and the held tensors read against copies taken in the block
    (the save wrote a file torch.load refused, the reads were freed memory, before),
    the warnings of each block, and the distance from DDP + SGD at the end."""
    import io
    mixed = zeroshard.MixedPrecision(torch.bfloat16, buffer_dtype=torch.bfloat16,
                                     output_dtype=torch.float32) if bf16 else None
    model, reference = build_model(MLP, seed=0), build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.05, units=nn.Linear, mixed_precision=mixed)
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)

    def train(steps, start):
        _train_each(((model, opt), (ddp, ref_opt)), steps, start, ctx.rank)

    train(1, 0)
    with warnings.catch_warnings(record=True) as kept_warnings:
        warnings.simplefilter("always")
        with opt.summon_full_params():
            opt.full_state_dict()  # collectives inside the block let the gathers' works go
            held = model.state_dict()
            then = {name: value.clone() for name, value in held.items()}
    buffer = io.BytesIO()
    torch.save(held, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    saved = max((loaded[name] - then[name]).abs().max().item() for name in then)
    train(2, 1)  # the next gathers regrow the units' storage
    read = max((held[name] - then[name]).abs().max().item()
               for name, _ in model.named_parameters())
    with warnings.catch_warnings(record=True) as quiet_warnings:
        warnings.simplefilter("always")
        with opt.summon_full_params():
            torch.save(model.state_dict(), io.BytesIO())
            difference = max((p.float() - q).abs().max().item()
                             for p, q in zip(model.parameters(), reference.parameters()))
    opt.close()
    return {"saved": saved, "read": read, "difference": difference,
            "kept_warnings": [str(w.message) for w in kept_warnings
                              if "still view" in str(w.message)],
            "quiet_warnings": [str(w.message) for w in quiet_warnings
                               if "still view" in str(w.message)]}


def construct_with_strided_tensors(ctx, stage: int):
    """A transposed frozen weight and a transposed buffer: the construction broadcast
    sends contiguous tensors only (NCCL refuses others; gloo, here, would not tell) and
    every rank ends with rank 0's values. Returns (every broadcast tensor contiguous,
    largest difference to rank 0's values)."""
    torch.manual_seed(ctx.rank)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(torch.randn(4, 3).t(), requires_grad=False)
    model.register_buffer("table", torch.randn(3, 5).t())
    contiguous = []
    real = dist.broadcast

    def spy(tensor, *a, **k):
        contiguous.append(tensor.is_contiguous())
        return real(tensor, *a, **k)

    with mock.patch.object(dist, "broadcast", spy):
        opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage,
                                      process_group=ctx.group, lr=0.1)
    with opt.summon_full_params():
        mine = torch.cat([model[1].weight.reshape(-1), model.table.reshape(-1)])
    rank0 = mine.clone()
    dist.broadcast(rank0, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
    opt.close()
    return all(contiguous), (mine - rank0).abs().max().item()


def memory_on_a_mesh(ctx, stage, mesh_shape, frozen: bool = False):
    """(trainable parameters, frozen parameters, buckets, memory_report()) after a second
    backward, before its step, with fp32 AdamW on the pool's (replicas, shards) mesh;
    ``frozen``: the first Linear's weight frozen (a LoRA model's base weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 17))
    model[0].weight.requires_grad_(not frozen)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage,
                                  mesh=ctx.mesh(mesh_shape), lr=1e-3, bucket_size_mb=1e-3)
    for step in range(2):
        model(torch.randn(4, 33)).square().mean().backward()
        if step == 0:
            opt.step()
            opt.zero_grad()
    report = opt.memory_report()
    sharding = opt.sharding_report()
    rank = opt.sharding.ranks.shard_rank
    report["stored elements"] = sharding["stored"][rank] + sharding["stored_frozen"][rank]
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    psi_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buckets = len(opt.sharding.every_bucket)
    opt.close()
    return psi, psi_frozen, buckets, report


def nested_summon(ctx, stage):
    """summon_full_params() inside summon_full_params() (a helper that summons, called by
    code that already did), with a write in the inner block: returns the full parameters
    in the outer block before, in the inner one, after the inner one ends, and in a new
    block after both ended. A probe found the inner block's exit released the units
    under the outer one (NaN), and the outer exit then failed."""
    model = build_model(MLP, seed=ctx.rank)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, bucket_size_mb=1e-4,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()
    opt.step()

    def values():
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    with opt.summon_full_params():
        before = values()
        with opt.summon_full_params():
            inner = values()
            with torch.no_grad():
                next(model.parameters()).add_(1.0)  # the same write on every rank
        after_inner = values()
    with opt.summon_full_params():
        after = values()
    opt.close()
    return before, inner, after_inner, after


def kept_gradients(ctx, stage: int, keep: str) -> list[float]:
    """Note [a gradient as its bucket's buffer] (zeroshard/stage2.py): a hook registered
    before the optimizer keeps each parameter's gradient (``keep``: "tensor" or "view")
    as backward made it. Each bucket is one parameter with no padding, so the reduction
    could consume the gradient; what the hook kept must still be this rank's local
    gradient, computed here by the same model unsharded. Returns, per parameter, the
    largest difference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 4, bias=False))
    local = copy.deepcopy(model)
    kept: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: kept.__setitem__(name, p.grad if keep == "tensor" else p.grad[:]))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1e-6,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(ctx.rank))
    model(x).square().sum().backward()
    local(x).square().sum().backward()
    differences = [float((kept[name] - param.grad).abs().max())
                   for name, param in local.named_parameters()]
    opt.close()
    return differences


def hook_registered_after_the_optimizer(ctx, stage: int) -> list[float]:
    """Note [after the user's gradient hooks] (zeroshard/_reducer.py): a post-accumulate-grad
    hook registered after the optimizer scales each gradient by 0.5 and logs its norm, as DDP
    lets it (DDP reduces after every such hook). Small buckets, so some gradients wait
    for their buffer and some fill one alone. The reference is DDP with the same hook;
    returns, per step, the largest parameter difference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=300 * 4 / 2**20,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    norms: list[float] = []

    def log_and_scale(param: torch.Tensor) -> None:
        norms.append(float(param.grad.norm()))
        param.grad.mul_(0.5)

    for net in (model, reference):
        for param in net.parameters():
            param.register_post_accumulate_grad_hook(log_and_scale)
    return _differences_from_reference(ctx, model, opt, ddp, ref_opt, batch_shape=(4, 6))


def _differences_from_reference(ctx, model, opt, reference, ref_opt, batch_shape,
                                average: bool = False) -> list[float]:
    """Three steps of ``model`` under ``opt`` and of ``reference`` (DDP, or with
    ``average`` a plain module whose gradients are averaged over the ranks here, as DDP
    would) under ``ref_opt``, on each rank's own batch (a squared-mean loss); per step,
    the largest parameter difference. Closes ``opt``."""

    def loss_of(net, step):
        generator = torch.Generator().manual_seed(10 * step + ctx.rank)
        return net(torch.randn(*batch_shape, generator=generator)).square().mean()
    return differences_per_step(ctx, model, opt, reference, ref_opt, loss_of, 3, average)


class _SlowToPassOn(torch.autograd.Function):
    """The identity, whose backward waits 50 ms before passing the gradient on: long
    enough for a reduction launched meanwhile to finish, so one that wrote into that
    gradient changes what the node before reads every time, not only when it wins the
    race."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad


class _LinearThenAdd(nn.Module):
    """``first(x) + w``, whose backward gives ``w`` a view of the very tensor it passes on
    to ``first``, which autograd has yet to read when ``w``'s gradient comes (the
    function zeroshard's own check of the engine's counts uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 32)
        self.w = nn.Parameter(0.1 * torch.randn(32, 32))

    def forward(self, x):
        return stage2._AddGivingAView.apply(_SlowToPassOn.apply(self.first(x)), self.w)


def gradient_viewing_what_backward_passes_on(ctx, stage: int) -> list[float]:
    """Note [a gradient as its bucket's buffer] (zeroshard/stage2.py): ``w`` fills its
    bucket alone, and its gradient is a view of a tensor backward still owes the Linear
    before it; reducing it in place would change that Linear's gradient. The reference
    averages the same model's gradients over the ranks, as DDP does; returns, per step,
    the largest parameter difference."""
    torch.manual_seed(0)
    model = _LinearThenAdd()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=32 * 32 * 4 / 2**20)
    return _differences_from_reference(ctx, model, opt, reference, ref_opt, batch_shape=(32, 32),
                                       average=True)


def clip_norm_of_a_long_shard(ctx, stage: int) -> tuple[float, float]:
    """clip_grad_norm_'s norm where one bucket's shard holds about two million
    elements, against the fp64 norm of DDP's reduced gradients. Found while writing
    benchmarks/device_agreement.py: on CPU torch's norm of one long fp32 tensor drifts
    with its length, so the norm of a whole shard came out 4e-5 to 7e-5 off on a
    0.8M-parameter GPT and the clip coefficient with it (Note [a norm of a long shard]). Returns zeroshard's and
    torch's (per-parameter) relative errors."""
    torch.manual_seed(0)
    model = nn.Linear(2048, 2048, bias=False)
    reference = DDP(copy.deepcopy(model), process_group=ctx.group)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.0,
                                  process_group=ctx.group)
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(ctx.rank))
    for net in (model, reference):
        net(x).square().mean().backward()
    exact = reference.module.weight.grad.double().norm().item()
    torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9).item()
    norm = opt.clip_grad_norm_(1e9).item()
    opt.close()
    return abs(norm - exact) / exact, abs(torch_norm - exact) / exact


class AttentionModel(nn.Module):
    """An attention whose forward reads out_proj.weight without calling out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def evaluation_of_attention_before_training(ctx) -> float:
    """Stage 3 with automatic units small enough to make MultiheadAttention's out_proj
    a unit of its own (before: it was one, never gathered for the attention's read of
    its weight, so an evaluation under no_grad before the first step gave NaN,
    silently): the evaluation's largest difference from the same model unsharded."""
    torch.manual_seed(0)
    model = AttentionModel()
    plain = copy.deepcopy(model).eval()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1e-6)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        difference = (model(x) - plain(x)).abs().max().item()
    opt.close()
    return difference


def add_param_group_after_construction(ctx):
    """Progressive unfreezing the torch way: ``opt.add_param_group`` with the parameters
    just unfrozen. Returns the error's type and message (a helper's probe: it named
    param_groups= only, which then refuses the unfrozen parameters at the step)."""
    model = build_model(MLP, seed=0)
    model.body[0].requires_grad_(False)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=2, lr=0.1, process_group=ctx.group)
    model.body[0].requires_grad_(True)
    try:
        opt.add_param_group({"params": list(model.body[0].parameters()), "lr": 0.01})
    except Exception as error:  # noqa: BLE001 - the test checks what it is
        return type(error).__name__, str(error)
    return "no error", ""


def join_for_uneven_batches(ctx):
    """DDP's way with uneven numbers of batches per rank, ``Join([...])`` around the loop,
    with the ZeroOptimizer among the joinables: the error's type and message (a bare
    AttributeError before, a helper's probe)."""
    from torch.distributed.algorithms import Join
    model = build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=2, lr=0.1, process_group=ctx.group)
    try:
        with Join([opt]):
            pass
    except Exception as error:  # noqa: BLE001 - the test checks what it is
        return type(error).__name__, str(error)
    finally:
        opt.close()
    return "no error", ""


def a_step_skipped_on_one_rank(ctx, skips: bool) -> list[str | None]:
    """Stage 3: three steps, the second skipped by rank 1 when ``skips`` (its own loss
    over a limit); what each step raised, per step (None: it stepped)."""
    model = build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1, process_group=ctx.group)
    raised = []
    for step in range(3):
        loss_fn(MLP, model, make_batch(MLP, 10 * step, ctx.rank, 4)).backward()
        try:
            if not (skips and step == 1 and ctx.rank == 1):
                opt.step()
            raised.append(None)
        except RuntimeError as error:
            raised.append(str(error))
        opt.zero_grad()
    opt.close()
    return raised


def models_or_arguments_that_differ_across_ranks(ctx, which: str) -> str | None:
    """Rank 1 builds another model or passes another argument than rank 0: another hidden
    size (whose buckets came out the same size: it trained the ranks apart, silently), a
    float64 model, a policy, stage 1 against 2, resharding or buffer broadcasting given
    differently (gloo aborts or hangs in training, before). Every rank must raise at
    construction, and stay in step."""
    other = ctx.rank == 1
    hidden = 8 if other and which == "hidden_size" else 7
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    if other and which == "dtype":
        model.double()
    kwargs = {"stage": 2 if other and which == "stage" else (3 if which == "reshard" else 1)}
    if other and which == "mixed_precision":
        kwargs["mixed_precision"] = zeroshard.MixedPrecision(param_dtype=torch.bfloat16)
    if other and which == "reshard":
        kwargs["reshard_after_forward"] = False
    if other and which == "broadcast_buffers":
        kwargs["broadcast_buffers"] = False
    return _construction_refusal(ctx, lambda: zeroshard.ZeroOptimizer(
        model, torch.optim.AdamW, process_group=ctx.group, **kwargs))


def _construction_refusal(ctx, build) -> str | None:
    """The ValueError ``build()`` raises (None if it builds), once every rank is past it:
    none was left in a collective."""
    try:
        build()
        error = None
    except ValueError as refusal:
        error = str(refusal)
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    assert probe.item() == ctx.world_size
    return error


def meshes_that_differ_across_ranks(ctx, which: str) -> str | None:
    """Note [meshes compared over the job] (helper-86's probes): of 4 ranks holding the
    2x2 mesh, rank 3 holds it named the other way round ("names": construction blocked
    for the mesh groups' 30-minute timeout), ranks 2-3 a 1x4 mesh ("shape") or none
    ("none": the default group). Every rank must raise at construction and stay in
    step. Returns this rank's error."""
    from pool import SHARD_NAMED_FIRST
    other = {"names": ctx.rank == 3, "shape": ctx.rank >= 2, "none": ctx.rank >= 2}[which]
    mesh = ctx.meshes[(2, 2)]
    if other:
        mesh = {"names": ctx.meshes[SHARD_NAMED_FIRST], "shape": ctx.meshes[(1, 4)],
                "none": None}[which]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return _construction_refusal(ctx, lambda: zeroshard.ZeroOptimizer(
        model, torch.optim.AdamW, stage=2, mesh=mesh))


def reads_inside_a_stage3_block_see_its_writes(ctx, policy: bool) -> dict:
    """Stage 3: ``full_state_dict()`` inside ``summon_full_params()`` after a write there
    to a frozen weight (in place) and to a trainable one (new ``.data``): it read the
    shards as they were before the block (a reviewer's probe: 0.214 off), the block's
    end keeping the writes. Returns the differences on rank 0 (None elsewhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    model[0].weight.requires_grad_(False)
    mixed = zeroshard.MixedPrecision(param_dtype=torch.bfloat16) if policy else None
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, units=nn.Linear,
                                  process_group=ctx.group, mixed_precision=mixed)
    with opt.summon_full_params(), torch.no_grad():
        model[0].weight.mul_(0.5)
        model[2].weight.data = model[2].weight.data * 0.5
        written = {"0.weight": model[0].weight.float().clone(),
                   "2.weight": model[2].weight.float().clone()}
        full = opt.full_state_dict()
    opt.close()
    return None if full is None else {k: float((full[0][k].float() - v).abs().max())
                                      for k, v in written.items()}


def units_selecting_no_module(ctx) -> list[str]:
    """Stage 3 given a unit class the model does not hold (another architecture's
    block): the warnings zeroshard gave on this rank."""
    import warnings

    from models import TinyTransformer
    model = TinyTransformer(vocab=11, d=8, heads=2, layers=2, seq=3, tied=True, frozen=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1, process_group=ctx.group,
                                units=nn.TransformerDecoderLayer).close()
    return [str(w.message) for w in caught if str(w.message).startswith("zeroshard")]


def blocks_placed_by_guess(ctx, skip_in_first_step: bool) -> list[str]:
    """Stage 3 over blocks called last to first, block 0 skipped on every rank in the
    first step (or not), then run in two more steps: the warnings zeroshard gave on this
    rank (Note [units no rank entered])."""
    import warnings

    from models import TinyTransformer
    model = TinyTransformer(vocab=11, d=8, heads=2, layers=2, seq=3, tied=True, frozen=False)
    model.reverse = True
    idx = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(ctx.rank))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1,
                                      process_group=ctx.group, units=model.blocks[0].__class__)
        for step in range(3):
            model.skip_block = skip_in_first_step and step == 0
            model(idx).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    return [str(w.message) for w in caught if "in the first step" in str(w.message)]


def disjoint_views_of_one_storage(ctx, stage: int) -> list[float]:
    """Note [memory two tensors share]: parameters that are disjoint views of one storage
    (what ``torch.load(mmap=True)`` and ``load_state_dict(assign=True)`` give) are not
    refused, and train like DDP; so do the old spectral norm, whose ``weight`` attribute
    views ``weight_orig`` until the first forward recomputes it, and at stages 1-2 a
    frozen weight that another frozen parameter and a buffer view."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.utils.spectral_norm(nn.Linear(8, 8)),
                          nn.Linear(8, 3))
    # frozen parameters, and a buffer, over one memory (a tie split by
    # load_state_dict(assign=True) under a LoRA model's frozen base): they never change
    model[0].weight.requires_grad_(False)
    model[0].frozen_twin = nn.Parameter(model[0].weight.detach(), requires_grad=False)
    if stage < 3:  # stage 3 refuses the buffer: its broadcast would write a released weight
        model[0].register_buffer("weight_view", model[0].weight.detach()[:2], persistent=False)
    reference = copy.deepcopy(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        start = 0
        for param in model.parameters():
            param.data = flat[start:start + param.numel()].view_as(param)
            start += param.numel()
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=100 * 4 / 2**20,
                                  **({"units": nn.Linear} if stage == 3 else {}))
    return _differences_from_reference(ctx, model, opt, ddp, ref_opt, batch_shape=(4, 6))


def per_sample_gradients_at_the_step(ctx, stage: int, ghost: bool) -> str | None:
    """What opacus' GradSampleModule, wrapped around the model after ``ZeroOptimizer(...)``,
    leaves in backward: ``p.grad_sample`` on every parameter, or with ghost clipping
    (``ghost``) ``p._norm_sample`` and ``grad_sample`` None, here on the last parameter
    only (one the forward did not use gets none; a first version read the first
    parameter of each bucket, and only ``grad_sample``: reviewers' probes). The step's
    error."""
    model = build_model(MLP, seed=ctx.rank)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1)
    loss_fn(MLP, model, make_batch(MLP, seed=0, rank=ctx.rank, batch=4)).backward()
    for param in list(model.parameters())[-1:] if ghost else model.parameters():
        if ghost:
            param._norm_sample, param.grad_sample = torch.zeros(4), None
        else:
            param.grad_sample = torch.zeros(4, *param.shape)
    try:
        opt.step()
        return None
    except TypeError as error:
        return str(error)
    finally:
        opt.close()


def numpy_reads_of_stage3_weights(ctx, where: str):
    """Stage 3: a weight read as a numpy array while gathered, ``where`` "summon" (inside
    ``summon_full_params()``, the array kept past the block, another's dropped) or
    "forward" (a forward hook's log line); then two more steps. Returns the kept array
    against a copy taken in the block (None for "forward") and the distance from DDP +
    SGD at the end. Releasing the unit raised "Trying to resize storage that is not
    resizable" before (helper-131)."""
    model, reference = build_model(MLP, seed=0), build_model(MLP, seed=0)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.05, units=nn.Linear)
    ddp = DDP(reference, process_group=ctx.group)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    logged = []
    if where == "forward":
        linears[0].register_forward_hook(
            lambda module, args, out: logged.append(float(module.weight.detach().numpy().sum())))

    def train(steps, start):
        _train_each(((model, opt), (ddp, ref_opt)), steps, start, ctx.rank)

    train(1, 0)
    kept = None
    if where == "summon":
        with opt.summon_full_params():
            array = linears[0].weight.detach().numpy()
            linears[-1].weight.detach().numpy().sum()  # an array dropped at once
            then = linears[0].weight.detach().clone()
        train(2, 1)
        kept = (torch.from_numpy(array) - then).abs().max().item()
    else:
        train(2, 1)
    with opt.summon_full_params():
        difference = max((p - q).abs().max().item()
                         for p, q in zip(model.parameters(), reference.parameters()))
    opt.close()
    return {"kept": kept, "difference": difference, "logged": len(logged)}
