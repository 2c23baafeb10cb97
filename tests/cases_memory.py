"""Worker-side functions for the real-memory test: the RSS peak of back-to-back training
steps against what the bound in README's "Real memory" section is made of."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

import zeroshard
from grad_hooks import after_zeroshard
from rss import Peak, reset_high_water, rss_kib

LAYERS, WIDTH, BATCH = 16, 1024, 4
LINEAR_BYTES = (WIDTH * WIDTH + WIDTH) * 4  # one Linear's weight and bias in fp32


def _train(model, opt, x, steps: int) -> None:
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _optimizer(ctx, model, stage: int, linears_per_bucket: int, **adamw_kwargs):
    extra = {"units": nn.Linear} if stage == 3 else {}
    bucket_mb = (linears_per_bucket + 0.01) * LINEAR_BYTES / 2**20
    return zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                   process_group=ctx.group, bucket_size_mb=bucket_mb, **extra,
                                   **adamw_kwargs)


def step_peak(ctx, stage: int, linears_per_bucket: int) -> dict:
    """``LAYERS`` Linear(WIDTH, WIDTH) trained with AdamW at ``stage``: the RSS peak of
    three steps run back to back after a warm-up step, above the RSS before the model
    was built; the model states memory_report() counts after a backward; and the peak of
    torch's own AdamW step over copies of this rank's master shards (the inner
    optimizer's temporaries, which no sharding removes)."""
    small = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # one-time set-up, not counted
    _train(small, _optimizer(ctx, small, stage, 1), torch.ones(2, 8), steps=2)
    gc.collect()
    dist.barrier(group=ctx.group)
    baseline = rss_kib("VmRSS")

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    opt = _optimizer(ctx, model, stage, linears_per_bucket)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(ctx.rank))
    _train(model, opt, x, steps=1)

    dist.barrier(group=ctx.group)
    reset_high_water()
    _train(model, opt, x, steps=3)
    peak = (rss_kib("VmHWM") - baseline) * 1024
    model(x).square().mean().backward()
    report = opt.memory_report()
    # After the measured steps: what this leaves behind would otherwise count in their peak.
    copies = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    for copy in copies:
        copy.grad = torch.ones_like(copy)
    plain = torch.optim.AdamW(copies, lr=1e-3)
    plain.step()  # its states exist before the measured step, as the inner optimizer's do
    with Peak() as plain_step:
        plain.step()
    opt.close()
    return {"peak": peak, "plain_step": plain_step.bytes, "parameters": report["parameters"],
            "gradients": report["gradients"], "optimizer_states": report["optimizer_states"]}


def foreach_step_peak(ctx, stage: int, linears_per_bucket: int) -> dict:
    """Note [a step in parts] (zeroshard/_inner.py): ``LAYERS`` Linear(WIDTH, WIDTH) at
    ``stage`` with AdamW's foreach kernels (CUDA's default): the RSS peak of
    ``opt.step()`` above the level before it, after two warm-up steps, and the bytes of
    this rank's master shards, which foreach AdamW's square roots took all at once."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    opt = _optimizer(ctx, model, stage, linears_per_bucket, foreach=True)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(ctx.rank))
    _train(model, opt, x, steps=2)
    model(x).square().mean().backward()
    with Peak() as step:
        opt.step()
    shards = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    opt.close()
    return {"step": step.bytes, "shards": shards}


def lone_parameter_backward(ctx, width: int) -> dict:
    """Note [a gradient as its bucket's buffer] (zeroshard/stage2.py): a Linear(width,
    width) weight alone in its bucket at stage 2, SGD; the RSS peak of a backward above
    the level before it, after two warm-up steps."""
    torch.manual_seed(0)
    model = nn.Linear(width, width, bias=False)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=2, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(ctx.rank))
    return {"peak": _backward_peak(model, opt, x)}


def _backward_peak(model, opt, x) -> int:
    """The RSS peak of a backward above the level before it, after two warm-up steps;
    ``opt`` is closed after."""
    _train(model, opt, x, steps=2)
    loss = model(x).square().mean()
    with Peak() as backward:
        loss.backward()
    opt.close()
    return backward.bytes


class _EmbeddingBlocksNorm(nn.Module):
    """A token embedding, Linear blocks, a final norm: the root unit (embedding and
    norm) gets the norm's gradient first and the embedding's last, as a GPT's does."""

    def __init__(self, vocab: int, width: int, blocks: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def gradients_mid_backward(ctx, vocab: int, width: int) -> list[int]:
    """Note [gradients wait for their buffer] (zeroshard/stage2.py): stage 3, a unit per
    block; per step after the first, the gradient bytes ``memory_report()`` counts when
    the middle block's weight gets its gradient (the norm's came before, the
    embedding's comes after)."""
    torch.manual_seed(0)
    model = _EmbeddingBlocksNorm(vocab, width, blocks=3)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1,
                                  process_group=ctx.group, units=nn.Linear)
    seen: list[int] = []
    accumulator = after_zeroshard(  # noqa: F841 (kept: the hook lives as long as it)
        model.blocks[1].weight, lambda _: seen.append(opt.memory_report()["gradients"]))
    tokens = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(ctx.rank))
    for _ in range(3):
        model(tokens).square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return seen[1:]


def reduction_storages(ctx, stage: int, layers: int) -> list[dict]:
    """Note [reduce slots] (zeroshard/_reduce_slots.py): ``layers`` equal Linear layers,
    a bucket (stage 3: a unit) each, on gloo, where a reduce-scatter is one
    ``dist.reduce`` per shard, or on 2 ranks sends and receives. Per backward after the
    first: how many storages those reduces ran on (every one seen is kept referenced, so
    the allocator cannot hand one out twice), how many of them still held memory once
    the step was done, and whether every send read the gradient buffers themselves."""
    width = 64
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    extra = {"units": nn.Linear} if stage == 3 else {}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group,
                                  bucket_size_mb=1.01 * (width + 1) * width * 4 / 2**20, **extra)
    seen: dict[int, torch.UntypedStorage] = {}
    sent: set[int] = set()
    reduce, isend = dist.reduce, dist.isend

    def recording_reduce(tensor, *args, **kwargs):
        storage = tensor.untyped_storage()
        seen.setdefault(storage._cdata, storage)
        return reduce(tensor, *args, **kwargs)

    def recording_isend(tensor, *args, **kwargs):
        sent.add(tensor.untyped_storage()._cdata)
        return isend(tensor, *args, **kwargs)

    x = torch.randn(4, width, generator=torch.Generator().manual_seed(ctx.rank))
    figures = []
    for step in range(3):
        seen.clear()
        sent.clear()
        dist.reduce, dist.isend = recording_reduce, recording_isend
        try:
            model(x).square().mean().backward()
        finally:
            dist.reduce, dist.isend = reduce, isend
        buffers = {p.grad.untyped_storage()._cdata for p in model.parameters()}
        opt.step()
        opt.zero_grad()
        if step:
            figures.append({"storages": len(seen),
                            "holding": sum(s.nbytes() > 0 for s in seen.values()),
                            "sent_from_buffers": bool(sent) and sent <= buffers})
    opt.close()
    return figures


class _TiedEmbeddingHead(nn.Module):
    """A token embedding that is also the output head (``head.weight = emb.weight``,
    as Hugging Face ties them): backward's first node (the head) and its last (the
    embedding) each give the weight a gradient, which autograd sums."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.norm(self.emb(tokens)))


def tied_embedding_backward(ctx, stage: int, vocab: int, width: int) -> dict:
    """Note [contributions summed in place] (zeroshard/_gradient_sums.py): the RSS peak
    of a backward of ``_TiedEmbeddingHead`` above the level before it, after two
    warm-up steps, with SGD at ``stage`` (the embedding alone in its bucket or unit)."""
    torch.manual_seed(0)
    model = _TiedEmbeddingHead(vocab, width)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1)
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
    return {"peak": _backward_peak(model, opt, tokens)}


def tied_embedding_lookup_backward(ctx, stage: int, vocab: int, width: int,
                                   warm_up: int) -> dict:
    """Note [an embedding's rows summed into the first contribution]
    (zeroshard/_gradient_sums.py): in a backward of ``_TiedEmbeddingHead`` after
    ``warm_up`` steps (SGD at ``stage``), the RSS peak from the moment the embedding's
    lookup gets its gradient to the end of backward, above the RSS at that moment. The
    process's first such backward also checks the renumbered sums against torch's."""
    from zeroshard import _gradient_sums
    _gradient_sums._exact_by_kind.clear()  # as in a fresh process
    torch.manual_seed(0)
    model = _TiedEmbeddingHead(vocab, width)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group, bucket_size_mb=1)
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
    _train(model, opt, tokens, steps=warm_up)
    at_lookup = []

    def measure_from_here(grad):
        gc.collect()
        at_lookup.append(rss_kib("VmRSS"))
        reset_high_water()

    def on_lookup(module, args, out) -> None:
        out.register_hook(measure_from_here)

    handle = model.emb.register_forward_hook(on_lookup)
    loss = model(tokens).square().mean()
    handle.remove()
    loss.backward()
    peak = (rss_kib("VmHWM") - at_lookup[0]) * 1024
    opt.close()
    return {"peak": peak}


def calls_in_a_memory_report(ctx, stage: int) -> tuple[dict, int, dict]:
    """The report of a small model's optimizer after a step (its stage-3 units
    released), the Python calls of zeroshard's released-parameter guard
    (zeroshard/_released.py) it made, and a report read inside a unit's forward."""
    import cProfile
    import pstats
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(4)))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-3,
                                  process_group=ctx.group,
                                  **({"units": nn.Sequential} if stage == 3 else {}))
    inside: list[dict] = []
    model[1].register_forward_hook(lambda *_: inside.append(opt.memory_report()))
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    profile = cProfile.Profile()
    profile.enable()
    between = opt.memory_report()
    profile.disable()
    with torch.no_grad():
        model(torch.randn(2, 8))
    guard_calls = sum(calls for (file, _, _), (_, calls, _, _, _) in pstats.Stats(profile).stats.items()
                      if file.endswith("_released.py"))
    opt.close()
    return between, guard_calls, inside[-1]
