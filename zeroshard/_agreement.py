"""Stage 3's cross-rank comparisons: every all-reduce in which the ranks compare notes
to take together a decision no rank can take alone.

A rank knows which units its own data ran, in which order, and which of its
gradients came late; whether a unit ran on *any* rank, whether all ranks ran the
units in one order, or whether the ranks are about to issue the same gather, only
the ranks together know. Each function here is one all-reduce (MAX, so a flag set
on any rank is set on all) that every rank issues at the same point, and returns
the same answer on every rank (Note [one order] in stage3.py). The callers in
stage3.py decide when; this module decides nothing but packs, reduces and unpacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _comm


def ran_and_late(got_gradient: list[bool], late: list[bool], backward_read: list[bool],
                 steps: int, *, device, group, stats: _comm.CommStats, label: str
                 ) -> tuple[list[bool], list[bool], list[bool], bool]:
    """Note [ran on no rank] in stage3.py: after a synced backward, which units got a
    gradient on some rank (``got_gradient``: one flag per unit some rank may skip),
    which buckets got gradient late on some rank (``late``: one per bucket, Note [late
    gradients] in _reducer.py) and which frozen units some rank's backward may have read
    (``backward_read``: Note [frozen units backward never reads] in _walk.py); and
    whether every rank has taken as many optimizer ``steps`` (Note [steps on some ranks
    only]: the count modulo 2**20, exact in fp32, and its negation)."""
    count = float(steps % 2**20)
    flags = torch.tensor([float(f) for f in got_gradient + late + backward_read] + [count, -count],
                         device=device)
    _comm.all_reduce(flags, group=group, stats=stats, label=label, op=dist.ReduceOp.MAX)
    values = flags.tolist()
    highest, negated_lowest = values[-2:]
    flags = [v > 0 for v in values[:-2]]
    late_from = len(got_gradient)
    read_from = late_from + len(late)
    return (flags[:late_from], flags[late_from:read_from], flags[read_from:],
            highest == -negated_lowest)


@dataclass
class RecordedOrders:
    """What the ranks recorded in the first step, compared (Note [recorded order] in
    _walk.py)."""
    agreed: bool  # every rank entered the units in the same order, forward and backward
    entered_before_ready: list[int]  # per bucket: the latest rank's count (Note [one order])
    repeated: list[bool]  # per unit: some rank entered it twice in one forward pass


def recorded_orders(forward: list[int], backward: list[int], repeated: list[bool],
                    entered_before_ready: list[int], *, device, group,
                    stats: _comm.CommStats, label: str) -> RecordedOrders:
    """One all-reduce (MAX) of each unit's first-entry position in forward and in
    backward (-1: not entered), of their negations (the orders agree exactly when the
    maximum equals the minimum everywhere), of a flag per unit entered twice, and of
    each bucket's count of units entered before it was ready."""
    n_units = len(forward)
    positions = torch.tensor([forward, backward], dtype=torch.float32, device=device)
    notes = torch.cat([positions.flatten(), -positions.flatten(),
                       torch.tensor([float(r) for r in repeated], device=device),
                       torch.tensor([float(n) for n in entered_before_ready], device=device)])
    _comm.all_reduce(notes, group=group, stats=stats, label=label, op=dist.ReduceOp.MAX)
    highest, negated_lowest = notes[:2 * n_units], notes[2 * n_units:4 * n_units]
    return RecordedOrders(
        agreed=torch.equal(highest, -negated_lowest),
        entered_before_ready=[int(n) for n in notes[5 * n_units:].tolist()],
        repeated=[flag > 0 for flag in notes[4 * n_units:5 * n_units].tolist()])


def next_gather(code: int, *, device, group, stats: _comm.CommStats, label: str) -> tuple[int, int]:
    """Note [first-step agreement]: the highest and lowest of the ranks' ``code`` for
    what each is about to do (a unit's index + 1, or 0: end the backward)."""
    highest, lowest = _comm.extremes(torch.tensor([float(code)], device=device),
                                     group=group, stats=stats, label=label)
    return int(highest.item()), int(lowest.item())
