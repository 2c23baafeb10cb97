"""Worker-side function for the overlap test: what happens during one backward, in
order, as seen from outside the reducer (Note [reductions in flight] in
zeroshard/_reducer.py)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import zeroshard
from zeroshard import _comm

BLOCKS, WIDTH = 4, 8
BLOCK_BYTES = 2 * (WIDTH * WIDTH + WIDTH) * 4  # two Linear(WIDTH, WIDTH) in fp32


def backward_events(ctx, stage: int, input_layer: bool = False) -> list[list[tuple[str, str]]]:
    """``BLOCKS`` blocks of two Linear layers, a bucket (stage 3: a unit) per block,
    trained for three steps; per step, the backward's events in order: ("arrive",
    parameter) as a gradient reaches a parameter, ("launch", "") for a reduce-scatter
    issued, ("wait", "") for a reduce-scatter waited for. With ``input_layer``, a
    Linear layer named "input" runs first, outside the blocks (stage 3: in the root
    unit), as a token embedding does."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)) for _ in range(BLOCKS)]
    layers = ([("input", nn.Linear(WIDTH, WIDTH))] if input_layer else []) + [
        (str(i), block) for i, block in enumerate(blocks)]
    model = nn.Sequential(OrderedDict(layers))
    extra = {"units": lambda module: module in set(blocks)} if stage == 3 else {}
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=stage, lr=0.1,
                                  process_group=ctx.group,
                                  bucket_size_mb=1.01 * BLOCK_BYTES / 2**20, **extra)
    events: list[tuple[str, str]] = []
    recording = [False]
    reductions: set[int] = set()
    for name, param in model.named_parameters():  # runs before autograd accumulates
        param.register_hook(lambda grad, name=name: events.append(("arrive", name))
                            if recording[0] else None)
    reduce_scatter, wait = _comm.reduce_scatter, _comm.wait

    def recorded_reduce_scatter(*args, **kwargs):
        work = reduce_scatter(*args, **kwargs)
        if recording[0]:
            reductions.add(id(work))
            events.append(("launch", ""))
        return work

    def recorded_wait(work):
        if id(work) in reductions:
            reductions.discard(id(work))
            events.append(("wait", ""))
        return wait(work)

    steps = []
    _comm.reduce_scatter, _comm.wait = recorded_reduce_scatter, recorded_wait
    try:
        for step in range(3):
            x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(10 * step + ctx.rank))
            loss = model(x).square().mean()
            events.clear()
            recording[0] = True
            loss.backward()
            recording[0] = False
            steps.append(list(events))
            opt.step()
            opt.zero_grad()
    finally:
        _comm.reduce_scatter, _comm.wait = reduce_scatter, wait
    opt.close()
    return steps
