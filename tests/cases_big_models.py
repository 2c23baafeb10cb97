"""Worker-side functions for models bigger than one device: meta construction, loading, export."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import zeroshard
from models import MLP, TinyTransformer, build_model, loss_fn, make_batch
from rss import Peak


def init_everything(module: nn.Module) -> None:
    """An init_fn: reset_parameters() where a module has one, and the test models' own
    tensors that no reset_parameters() covers (as their constructors set them)."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    if isinstance(module, TinyTransformer):
        nn.init.normal_(module.pos, std=0.02)
    if isinstance(module, MLP):
        module.scale.copy_(torch.linspace(0.5, 1.5, module.scale.numel()))


def _outcome(call) -> tuple[str, str]:
    """(exception type, message) of ``call()``, or ("no error", "")."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test checks what it is
        return type(error).__name__, str(error)
    return "no error", ""


def _optimizer(model, ctx, stage: int, bf16: bool, **kwargs):
    policy = zeroshard.MixedPrecision(torch.bfloat16) if bf16 else None
    units = nn.Linear if stage == 3 else None
    return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                   lr=1e-2, mixed_precision=policy, bucket_size_mb=1e-3,
                                   units=units, **kwargs)


def _values(model, opt) -> dict[str, torch.Tensor]:
    with opt.summon_full_params():
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _train(spec: dict, model, opt, rank: int, steps: int = 3) -> None:
    for step in range(steps):
        loss_fn(spec, model, make_batch(spec, seed=step, rank=rank, batch=3)).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()


def train_built_on_meta(ctx, spec: dict, stage: int, bf16: bool):
    """A model built on meta (each rank with its own seed) and the same model built on
    CPU, both given one state dict after construction and trained alike. Returns the
    meta model's values after construction, and both models' values after training."""
    plain = build_model(spec, seed=0)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_opt = _optimizer(plain, ctx, stage, bf16)

    with torch.device("meta"):
        model = build_model(spec, seed=100 + ctx.rank)
    opt = _optimizer(model, ctx, stage, bf16, device="cpu", init_fn=init_everything)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    built = _values(model, opt)
    with opt.summon_full_params():
        model.load_state_dict(start)

    _train(spec, plain, plain_opt, ctx.rank)
    _train(spec, model, opt, ctx.rank)
    result = {"built": built, "meta": _values(model, opt), "plain": _values(plain, plain_opt)}
    opt.close()
    plain_opt.close()
    return result


def construct_twice_on_meta(ctx, stage: int):
    """The values a meta-built transformer gets, built twice with the same per-rank seeds."""
    spec = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 2, "seq": 4,
            "tied": True, "frozen": False}
    runs = []
    for _ in range(2):
        with torch.device("meta"):
            model = build_model(spec, seed=7 + ctx.rank)
        opt = _optimizer(model, ctx, stage, False, device="cpu", init_fn=init_everything)
        runs.append(_values(model, opt))
        opt.close()
    return runs


class NormedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))

    def forward(self, x):
        return self.body(x)


def batchnorm_statistics_on_meta(ctx):
    """reset_parameters() alone (no init_fn) initialises a meta model, buffers included."""
    with torch.device("meta"):
        model = NormedMLP()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.1, device="cpu", units=nn.Linear)
    norm = model.body[1]
    stats = {"running_mean": norm.running_mean.clone(), "running_var": norm.running_var.clone(),
             "num_batches_tracked": norm.num_batches_tracked.clone()}
    with opt.summon_full_params():
        stats["weight"] = norm.weight.detach().clone()
        stats["linear"] = model.body[0].weight.detach().clone()
    opt.close()
    return stats


def _state(opt) -> tuple[dict, dict] | None:
    full = opt.full_state_dict()
    return None if full is None else ({k: v.float() for k, v in full[0].items()}, full[1])


def load_full_state_from_rank0(ctx, spec: dict, stage: int, bf16: bool, with_optimizer: bool,
                               file: str):
    """One run trains and exports; a fresh run loads that export given on rank 0 only
    (None elsewhere), another loads it given on every rank. Returns both loaded states
    and the values after one more step each."""
    model, opt = build_model(spec, seed=0), None
    opt = _optimizer(model, ctx, stage, bf16)
    _train(spec, model, opt, ctx.rank, steps=2)
    full = opt.full_state_dict()
    opt.close()
    if ctx.rank == 0:
        torch.save(full, file)
    dist.barrier(group=ctx.group)
    everywhere = torch.load(file, weights_only=False)
    if not with_optimizer:
        everywhere = (everywhere[0], None)

    runs = {}
    for how in ("rank0", "everywhere"):
        model = build_model(spec, seed=50 + ctx.rank)
        opt = _optimizer(model, ctx, stage, bf16)
        _train(spec, model, opt, ctx.rank, steps=1)  # optimizer state that a model-only load keeps
        before = _state(opt)
        given = everywhere if how == "everywhere" or ctx.rank == 0 else (None, None)
        opt.load_full_state_dict(*given)
        loaded = _state(opt)
        _train(spec, model, opt, ctx.rank, steps=1)
        runs[how] = {"before": before, "loaded": loaded, "after": _values(model, opt)}
        opt.close()
    return runs


TIED = {"kind": "transformer", "vocab": 11, "d": 8, "heads": 2, "layers": 1, "seq": 4,
         "tied": True, "frozen": False}


def load_full_state_badly(ctx, which: str, folder: str | None = None):
    """load_full_state_dict with rank 0 giving None, or rank 0's dict not fitting; or a
    tied model given an untied one's values (a dict on rank 0, or its save_full_model
    folder on every rank)."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 9, "d_out": 3, "depth": 2, "frozen": True,
            "unused_branch": False}
    if which.startswith("tied_from_untied"):
        spec = TIED
    model = build_model(spec, seed=0)
    opt = _optimizer(model, ctx, 3, False)
    sd = {k: v.clone() for k, v in build_model(spec, seed=1).state_dict().items()}
    if which == "wrong_shape":
        sd["body.2.weight"] = sd["body.2.weight"][:, :-1]
    if which.startswith("tied_from_untied"):
        untied = build_model({**TIED, "tied": False}, seed=1)
        sd = {k: v.clone() for k, v in untied.state_dict().items()}
    given = sd if (ctx.rank == 0) == (which != "rank0_none") else None
    if which == "tied_from_untied_file":
        untied_opt = _optimizer(untied, ctx, 1, False)
        zeroshard.save_full_model(folder, untied, untied_opt)
        untied_opt.close()
        given = folder
    before = _values(model, opt)
    try:
        opt.load_full_state_dict(given, None)
        error = None
    except (ValueError, TypeError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    unchanged = all(torch.equal(v, _values(model, opt)[k]) for k, v in before.items())
    probe = torch.ones(1)  # every rank is still in step
    dist.all_reduce(probe, group=ctx.group)
    opt.close()
    return {"error": error, "unchanged": unchanged, "in_step": probe.item() == ctx.world_size}


def export_safetensors(ctx, spec: dict, stage: int, bf16: bool, folder: str, max_mb: float):
    """Train, then export with full_state_dict (rank 0's dict) and save_full_model."""
    model = build_model(spec, seed=0)
    opt = _optimizer(model, ctx, stage, bf16)
    _train(spec, model, opt, ctx.rank, steps=2)
    full = opt.full_state_dict()
    zeroshard.save_full_model(folder, model, opt, max_shard_size_mb=max_mb)
    opt.close()
    return None if full is None else {k: v.float() for k, v in full[0].items()}


def load_safetensors(ctx, spec: dict, stage: int, folder: str, rank0_only: bool):
    """A fresh model (its own seed per rank) loads the exported folder: on every rank,
    or on rank 0 only; returns its full values."""
    model = build_model(spec, seed=9 + ctx.rank)
    opt = _optimizer(model, ctx, stage, False)
    opt.load_full_state_dict(folder if ctx.rank == 0 or not rank0_only else None)
    values = _values(model, opt)
    opt.close()
    return values


def phase_peaks(ctx, layers: int, width: int, folder: str):
    """Stage 3 over ``layers`` Linear(width, width) units built on meta: the peak of each
    phase a model bigger than one device goes through, each above the level before it."""
    small = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # one-time set-up, not counted
    warm = zeroshard.ZeroOptimizer(small, torch.optim.AdamW, stage=3, process_group=ctx.group,
                                   units=nn.Linear)
    small(torch.ones(2, 8)).sum().backward()
    warm.step()
    zeroshard.save_full_model(folder + "-warm", small, warm)
    zeroshard.save_checkpoint(folder + "-warm-checkpoint", small, warm)
    zeroshard.load_checkpoint(folder + "-warm-checkpoint", small, warm)
    warm.close()
    dist.barrier(group=ctx.group)

    peaks = {}
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    with Peak() as peak:
        opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, process_group=ctx.group,
                                      device="cpu", units=nn.Linear, lr=1e-3)
    peaks["construct"] = peak.bytes
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(ctx.rank))
    for step in range(2):
        with Peak() as peak:
            model(x).square().mean().backward()
        peaks[f"backward{step}"] = peak.bytes
        with Peak() as peak:
            opt.step()
            opt.zero_grad()
        peaks[f"step{step}"] = peak.bytes
    with Peak() as peak:
        zeroshard.save_checkpoint(folder + "-checkpoint", model, opt)
    peaks["save_checkpoint"] = peak.bytes
    with Peak() as peak:
        zeroshard.load_checkpoint(folder + "-checkpoint", model, opt)
    peaks["load_checkpoint"] = peak.bytes
    with Peak() as peak:
        zeroshard.save_full_model(folder, model, opt)
    peaks["save_full_model"] = peak.bytes
    with Peak() as peak:
        full = opt.full_state_dict()
    peaks["full_state_dict"] = peak.bytes
    with Peak() as peak:
        opt.load_full_state_dict(*(full if full is not None else (None, None)))
    peaks["load_from_rank0"] = peak.bytes
    del full
    with Peak() as peak:
        opt.load_full_state_dict(folder)
    peaks["load_safetensors"] = peak.bytes
    peaks["model_states"] = sum(opt.memory_report().values())
    opt.close()
    return peaks


class Pair(nn.Module):
    """Two layers whose parent's init overrides one of its children's (as Hugging Face's
    GPT-2 rescales c_proj from the attention module), with a buffer shared by every
    Pair of a model."""

    def __init__(self, shared: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("scale", shared)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(x * self.scale)))


class TaggedParameter(nn.Parameter):
    pass


def build_pairs() -> nn.Module:
    shared = torch.empty(4)
    model = nn.Sequential(Pair(shared), Pair(shared))
    tagged = TaggedParameter(torch.empty(4))
    tagged.no_decay = True
    model[1].outer.bias = tagged
    return model


def deterministic_init(module: nn.Module) -> None:
    """No randomness: the expected values are the eager model.apply(deterministic_init)."""
    if isinstance(module, nn.Linear):
        module.weight.copy_(torch.linspace(-1, 1, module.weight.numel()).view_as(module.weight))
        module.bias.fill_(0.25)
    if isinstance(module, Pair):
        module.inner.weight.mul_(3.0)  # the parent wins only if it runs after its children
        module.scale.copy_(torch.arange(1.0, 5.0))


def init_through_data(module: nn.Module) -> None:
    """Gives every Linear new .data (as older Hugging Face code did), and the buffer a value."""
    if isinstance(module, nn.Linear):
        module.weight.data = torch.full(module.weight.shape, 0.5)
        module.bias.data = torch.zeros(module.bias.shape)
    if isinstance(module, Pair):
        module.scale.copy_(torch.ones(4))


def meta_init_order(ctx, stage: int, units, init: str):
    """The meta-built pairs, initialised by ZeroOptimizer, and what model.apply(init)
    gives the same model built on CPU."""
    init_fn = {"deterministic": deterministic_init, "through_data": init_through_data}[init]
    with torch.device("meta"):
        model = build_pairs()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, device="cpu", init_fn=init_fn, units=units)
    tagged = model[1].outer.bias
    result = {"tag": (type(tagged).__name__, getattr(tagged, "no_decay", None)),
              "shared": model[0].scale is model[1].scale, "built": _values(model, opt)}
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    result["stepped"] = _values(model, opt)
    opt.close()
    expected = build_pairs()
    with torch.no_grad():
        expected.apply(init_fn)
    result["expected"] = {k: v.clone() for k, v in expected.state_dict().items()}
    expected(torch.ones(2, 4)).sum().backward()  # one plain SGD step on the same data,
    with torch.no_grad():  # the gradient averaged over ranks that all saw the same batch
        for p in expected.parameters():
            p -= 0.1 * p.grad
    result["expected_stepped"] = {k: v.clone() for k, v in expected.state_dict().items()}
    return result


def meta_init_refused(ctx, which: str):
    """Inits that cannot work: (error type, message, collectives still in step); then a
    second construction of the same model with a working init must succeed."""
    calls = []

    def failing(module):
        calls.append(module)
        if isinstance(module, Pair):
            raise RuntimeError("init failed on purpose")
        deterministic_init(module)

    def replacing(module):
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(torch.zeros(module.weight.shape))
        deterministic_init(module)

    def forgetting(module):
        if isinstance(module, Pair):
            module.scale.fill_(1.0)  # the Linears get no value

    def spanning_through_data(write):  # a parent's override through .data (transformers 4)
        def init(module):
            if isinstance(module, Pair):
                write(module.inner.weight)
                module.scale.copy_(torch.arange(1.0, 5.0))
            elif isinstance(module, nn.Linear):
                deterministic_init(module)
        return init

    def freezing_a_child(module):  # the plan sharded it trainable: a raw AttributeError came later
        if isinstance(module, nn.Linear):
            deterministic_init(module)
        if isinstance(module, Pair):
            module.scale.copy_(torch.arange(1.0, 5.0))
            module.inner.weight.requires_grad_(False)

    def copying_from_a_child(module):  # a parent taking a child's values: it reads a unit inside it
        if isinstance(module, Pair):
            module.scale.copy_(module.inner.weight[0])
        elif isinstance(module, nn.Linear):
            deterministic_init(module)

    through_data = {
        "spans_scaled_through_data": lambda p: p.data.mul_(3.0),
        "spans_filled_through_data": lambda p: p.data.fill_(2.0),
        "spans_new_data": lambda p: setattr(p, "data", torch.full(p.shape, 2.0))}
    init_fn, units = {"raises": (failing, nn.Linear), "spans": (deterministic_init, nn.Linear),
                      "replaces": (replacing, None), "forgets": (forgetting, Pair),
                      "spans_copied_from_a_child": (copying_from_a_child, nn.Linear),
                      "spans_freezes_a_child": (freezing_a_child, nn.Linear),
                      **{name: (spanning_through_data(write), nn.Linear)
                         for name, write in through_data.items()}}[which]
    with torch.device("meta"):
        model = build_pairs()
    outcome = _outcome(lambda: zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=3, process_group=ctx.group, lr=0.1, device="cpu",
        init_fn=init_fn, units=units))
    still_meta = all(p.is_meta for p in model.parameters())
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group, lr=0.1,
                                  device="cpu", init_fn=deterministic_init, units=Pair)
    retried = _values(model, opt)
    opt.close()
    expected = build_pairs()
    with torch.no_grad():
        expected.apply(deterministic_init)
    same = all(torch.equal(retried[k], v) for k, v in expected.state_dict().items())
    return {"error": outcome, "still_meta": still_meta, "retry_matches": same}


def hf_gpt2_built_on_meta(ctx, stage: int, folder: str):
    """A tiny Hugging Face GPT-2 built on meta and loaded from save_pretrained's
    safetensors, trained with zeroshard; the same checkpoint trained with torch DDP;
    the zeroshard model exported with save_full_model and read by from_pretrained."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if ctx.rank == 0:
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder + "/pretrained")
    dist.barrier(group=ctx.group)

    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, device="cpu", init_fn=model._init_weights,
                                  units=GPT2Block if stage == 3 else None)
    opt.load_full_state_dict(folder + "/pretrained")
    reference = GPT2LMHeadModel.from_pretrained(folder + "/pretrained")
    ddp = DDP(reference, process_group=ctx.group)
    ddp_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        for module, optimizer in ((model, opt), (ddp, ddp_opt)):
            module(tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    trained = _values(model, opt)
    zeroshard.save_full_model(folder + "/export", model, opt)
    opt.close()
    result = {"tied": model.lm_head.weight is model.transformer.wte.weight,
              "trained": trained, "ddp": {k: v.clone() for k, v in reference.state_dict().items()}}
    if ctx.rank == 0:
        exported = GPT2LMHeadModel.from_pretrained(folder + "/export")
        result["exported"] = {k: v.clone() for k, v in exported.state_dict().items()}
    return result


def load_sparse_plain_state(ctx, rank0_only: bool, file: str):
    """A plain torch AdamW state dict in which one parameter never had a gradient (no
    state), loaded given on rank 0 only or on every rank; returns the loaded full state."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 9, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": True}
    if ctx.rank == 0:
        plain = build_model(spec, seed=3)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
        x, y = make_batch(spec, seed=0, rank=1, batch=4)  # odd rank's data: the branch is unused
        torch.nn.functional.mse_loss(plain(x), y).backward()
        plain_opt.step()
        torch.save((plain.state_dict(), plain_opt.state_dict()), file)
    dist.barrier(group=ctx.group)
    model = build_model(spec, seed=8)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, process_group=ctx.group,
                                  lr=0.01, bucket_size_mb=1e-3)
    given = torch.load(file, weights_only=False) if ctx.rank == 0 or not rank0_only else (None, None)
    opt.load_full_state_dict(*given)
    return _state(opt)


class WithPositions(nn.Module):
    """An integer buffer, as position ids are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(4), persistent=False)

    def forward(self, x):
        return self.body(x) + self.positions


def meta_integer_buffer(ctx, write_it: bool):
    def init(module):
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        if write_it and isinstance(module, WithPositions):
            module.positions.copy_(torch.arange(4))

    with torch.device("meta"):
        model = WithPositions()
    try:
        opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=1, process_group=ctx.group,
                                      lr=0.1, device="cpu", init_fn=init)
    except ValueError as error:
        return str(error)
    positions = model.positions.clone()
    opt.close()
    return positions


def init_failing_on_one_rank(ctx):
    """An init_fn that raises on rank 1 only: every rank raises, none hangs."""
    def init(module):
        if isinstance(module, nn.Linear) and ctx.rank == 1:
            raise OSError("weights file missing on this node")
        deterministic_init(module)

    with torch.device("meta"):
        model = build_pairs()
    outcome = _outcome(lambda: zeroshard.ZeroOptimizer(
        model, torch.optim.SGD, stage=3, process_group=ctx.group, lr=0.1, device="cpu",
        init_fn=init, units=Pair))
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    return {"error": outcome, "still_meta": all(p.is_meta for p in model.parameters()),
            "in_step": probe.item() == ctx.world_size}


def export_to_a_file_path(ctx, file: str):
    model = build_model(SPECS_MLP, seed=0)
    opt = _optimizer(model, ctx, 3, False)
    outcome = _outcome(lambda: zeroshard.save_full_model(file, model, opt))
    probe = torch.ones(1)
    dist.all_reduce(probe, group=ctx.group)
    opt.close()
    return {"error": outcome, "in_step": probe.item() == ctx.world_size}


SPECS_MLP = {"kind": "mlp", "d_in": 5, "hidden": 9, "d_out": 3, "depth": 2, "frozen": True,
             "unused_branch": False}


def bytes_read_loading_safetensors(ctx, folder: str):
    """Load an exported folder on every rank, counting the bytes each rank reads."""
    import os
    from unittest import mock
    model = build_model(SPECS_MLP, seed=5)
    opt = _optimizer(model, ctx, 3, False)
    read = []
    real = os.pread

    def counting(fd, n, offset):
        data = real(fd, n, offset)
        read.append(len(data))
        return data
    with mock.patch.object(os, "pread", counting):
        opt.load_full_state_dict(folder)
    values = _values(model, opt)
    opt.close()
    return {"bytes": sum(read), "values": values}


class WithComputedBuffers(nn.Module):
    """Buffers the model computes (non-persistent), as Hugging Face's rotary inv_freq and
    Bert's position_ids are now, and a pattern of keys it declares ignorable."""

    _keys_to_ignore_on_load_unexpected = [r"^legacy\."]

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.rotary = nn.Module()
        self.rotary.register_buffer("inv_freq", torch.arange(1.0, 5.0), persistent=False)
        self.register_buffer("position_ids", torch.arange(4), persistent=False)

    def forward(self, x):
        return self.proj(x * self.rotary.inv_freq)


def load_keys_of_older_checkpoints(ctx, stage: int, extra: str):
    """A dict as older transformers wrote them (given on rank 0): the computed buffers
    stored, per layer where the model has one buffer; returns (refusal, whether the
    weights loaded, whether the computed buffers kept the model's values)."""
    torch.manual_seed(0)
    model = WithComputedBuffers()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, process_group=ctx.group,
                                  lr=0.1, **({"units": nn.Linear} if stage == 3 else {}))
    sd = {"proj.weight": torch.full((4, 4), 0.5), "proj.bias": torch.full((4,), 0.25),
          "position_ids": torch.zeros(4, dtype=torch.long),
          "layers.0.rotary.inv_freq": torch.zeros(4), "legacy.scale": torch.ones(1),
          "rotary.inv_freq": torch.zeros(4)}
    if extra:
        sd[extra] = torch.ones(4)
    try:
        opt.load_full_state_dict(sd if ctx.rank == 0 else None)
        refusal = None
    except (ValueError, RuntimeError) as error:  # rank 0 names it, the others point there
        refusal = str(error)
    values = _values(model, opt)
    loaded = torch.equal(values["proj.weight"], sd["proj.weight"])
    kept = (torch.equal(model.rotary.inv_freq, torch.arange(1.0, 5.0))
            and torch.equal(model.position_ids, torch.arange(4)))
    opt.close()
    return refusal, loaded, kept


def spanning_init_tags_its_children(ctx) -> list:
    """A parent's init setting an attribute on its children's parameters (a ``no_decay``
    tag) at stage 3, where the children are units of their own: the tag was set on the
    sentinel standing in for each and lost (a reviewer's probe). Returns each Linear
    weight's tag."""
    def init(module):
        if isinstance(module, nn.Linear):
            deterministic_init(module)
        if isinstance(module, Pair):
            module.scale.copy_(torch.arange(1.0, 5.0))
            for param in module.parameters():
                param.no_decay = True
    with torch.device("meta"):
        model = build_pairs()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  lr=0.1, device="cpu", init_fn=init, units=nn.Linear)
    tags = [getattr(m.weight, "no_decay", None) for m in model.modules() if isinstance(m, nn.Linear)]
    opt.close()
    return tags


class Recurrent(nn.Module):
    """An LSTM and a GRU (torch keeps weak references to their weights) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


def recurrent_built_on_meta(ctx, stage: int):
    """Note [weak references to meta parameters]: RNNs built on meta are placed (they
    failed with torch's raw swap_tensors error) and train like the same model built on
    CPU given the same state dict. Returns both models' values after 3 steps."""
    def optimizer(model, **kwargs):
        return zeroshard.ZeroOptimizer(
            model, torch.optim.AdamW, stage=stage, process_group=ctx.group, lr=1e-2,
            bucket_size_mb=1e-3, **({"units": nn.RNNBase} if stage == 3 else {}), **kwargs)
    torch.manual_seed(0)
    plain = Recurrent()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_opt = optimizer(plain)
    with torch.device("meta"):
        model = Recurrent()
    opt = optimizer(model, device="cpu")
    with opt.summon_full_params():
        model.load_state_dict(start)
    for net, net_opt in ((plain, plain_opt), (model, opt)):
        for step in range(3):
            generator = torch.Generator().manual_seed(10 * step + ctx.rank)
            net(torch.randn(2, 5, 4, generator=generator)).square().mean().backward()
            net_opt.step()
            net_opt.zero_grad()
    return _values(model, opt), _values(plain, plain_opt)


def load_mid_run_into_a_model_built_on_meta(ctx, stage: int):
    """``model.load_state_dict`` between steps into a model built on meta, beside the same
    model built on CPU doing the same: at stages 1-2 its parameters shared the flat
    buffer's version counter, and the load was refused at the next step as a write to
    ``opt.param_groups``' tensors (a reviewer's probe). Returns both models' values."""
    spec = {"kind": "mlp", "d_in": 5, "hidden": 9, "d_out": 3, "depth": 2, "frozen": False,
            "unused_branch": False}
    plain = build_model(spec, seed=0)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    loaded = build_model(spec, seed=1).state_dict()
    plain_opt = _optimizer(plain, ctx, stage, False)
    with torch.device("meta"):
        model = build_model(spec, seed=100 + ctx.rank)
    opt = _optimizer(model, ctx, stage, False, device="cpu", init_fn=init_everything)
    with opt.summon_full_params():
        model.load_state_dict(start)
    for net, net_opt in ((plain, plain_opt), (model, opt)):
        _train(spec, net, net_opt, ctx.rank, steps=1)
        with net_opt.summon_full_params():
            net.load_state_dict(loaded)
        _train(spec, net, net_opt, ctx.rank, steps=2)
    return _values(model, opt), _values(plain, plain_opt)


class _SmallBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.linear(x))


def calls_to_build(ctx, stage: int, blocks: int) -> int:
    """The Python function calls a ZeroOptimizer's construction makes over ``blocks``
    small blocks (4 parameters each; at stage 3 a unit each): a count, not a time."""
    import cProfile
    import pstats
    model = nn.Sequential(*(_SmallBlock() for _ in range(blocks)))
    profile = cProfile.Profile()
    profile.enable()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, process_group=ctx.group,
                                  **({"units": _SmallBlock} if stage == 3 else {}))
    profile.disable()
    opt.close()
    return pstats.Stats(profile).total_calls
