"""Worker functions for tests/test_collectives.py: stage 3's cross-rank comparisons
(zeroshard/_agreement.py) run alone, each rank passing its own notes."""

from __future__ import annotations

import torch

from zeroshard import _agreement, _comm
from zeroshard._ranks import ranks_from


def _where(ctx):
    return dict(device=torch.device("cpu"), group=ranks_from(ctx.group, None),
                stats=_comm.CommStats(), label="test")


def ran_and_late(ctx, ran_per_rank, late_per_rank, read_per_rank, steps_per_rank):
    return _agreement.ran_and_late(ran_per_rank[ctx.rank], late_per_rank[ctx.rank],
                                   read_per_rank[ctx.rank], steps_per_rank[ctx.rank],
                                   **_where(ctx))


def recorded_orders(ctx, notes_per_rank):
    forward, backward, repeated, counts = notes_per_rank[ctx.rank]
    where = _where(ctx)
    orders = _agreement.recorded_orders(forward, backward, repeated, counts, **where)
    return orders, {op: n for op, n in where["stats"].bytes.items() if n}


def next_gather(ctx, codes):
    return _agreement.next_gather(codes[ctx.rank], **_where(ctx))
