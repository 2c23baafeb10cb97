"""Parameters whose gradient was set to None between backward and the step.

Note [a gradient cleared before the step]:
    torch's optimizers skip a parameter whose ``.grad`` is None: its value and its state
    stay as they are. Between backward and ``opt.step()`` a loop may set some parameters'
    gradients to None (``p.grad = None``: an embedding frozen through warm-up, a
    sub-module left out of this step; ``model.zero_grad()`` over a sub-module). The
    stages see that when the gradients are next used (Note [gradient markers]; stage 1's
    ``claim_gradients``), and zero those parameters' parts of the gradient shards, so
    clipping's norm leaves them out, as torch's does. But the inner optimizer steps a
    bucket's shard whole: with a zero gradient, weight decay and momentum still moved
    them (a helper's probe, half the parameters cleared every step: 5e-4 from DDP after
    5 steps at every stage, and 4.9e-3 where they were cleared after
    ``zero_grad(set_to_none=False)``). So the step keeps them still: the elements of
    this rank's shards that hold them, in the tensors the inner optimizer steps and in
    every state tensor shaped like those (Adam's moments, SGD's momentum), are copied
    before the inner step and put back after it. A parameter owned whole by this rank
    (Note [whole-parameter ownership] in _layout.py) is a tensor of its own to the inner
    optimizer: its gradient is set to None there, and torch skips it. A bucket whose
    every parameter was cleared has no gradient shard at all, and is skipped as before.
    What cannot be kept is a count the bucket's shard shares: Adam's step, one per
    shard, still counts this step, so once such a parameter gets gradients again its
    bias correction is that of the bucket's steps, not of its own (torch's counts
    restart from its first step); and in a state the step creates (the shard's first
    step) they have none of their own until a step steps them (Note [a fresh state
    inside a shard's] in _inner.py). Which parameters were cleared
    is decided by the loop, alike on every rank, and forgotten once a backward has
    reduced gradients for them again or ``opt.zero_grad()`` has dropped the shards. At
    stage 3 a unit that got a gradient on no rank in a backward (Note [ran on no rank])
    keeps them: they stay still in the step after it too, as torch's None stays None (a
    reviewer's probe, a weight cleared and its block skipped in the next step: 1.7e-3
    from DDP when the first version forgot them at every backward). At stages 1-2, and
    for the root unit, the ranks do not compare who got a gradient, and a parameter
    that got one on no rank is stepped with a zero one, as the README says. Stage 3's
    units and stages 1-2's buckets alike: a unit's bucket whose every parameter is
    cleared is dropped, one partly cleared is kept still in part.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._bucket import FlatBucket
from ._inner import InnerOptimizers, fresh_values, split_state


class HeldStill:
    """The parts of this rank's stepped tensors and their states that hold cleared
    parameters (Note [a gradient cleared before the step]), copied before the step."""

    def __init__(self, buckets: Iterable[FlatBucket], inner: InnerOptimizers) -> None:
        self._inner = inner
        state = inner.state
        self._saved: list[tuple[torch.Tensor, slice, torch.Tensor]] = []
        self._unstepped: list[FlatBucket] = []  # no state yet
        for bucket in buckets:
            if bucket.grad_shard is None:
                continue
            stepped_first = bucket.without_state - bucket.cleared
            if stepped_first:  # Note [a fresh state inside a shard's]: their own from now
                give_fresh_state(bucket, stepped_first, inner)
                bucket.without_state -= stepped_first
            if not bucket.cleared:
                continue
            if bucket.owns_whole_parameters:
                for index, stepped in zip(bucket.layout.owned(bucket.rank), bucket.stepped):
                    if index in bucket.cleared:
                        stepped.grad = None  # a tensor of its own: torch skips it
                continue
            own_state = state.find(bucket.master, {})
            if not own_state:
                self._unstepped.append(bucket)
            _, per_element = split_state(own_state, bucket.master)  # moments, momentum
            for tensor in [bucket.master, *per_element.values()]:
                self._saved += [(tensor, span, tensor[span].clone())
                                for span in bucket.shard_spans(bucket.cleared)]

    def restore(self) -> None:
        """After the inner step: put back what it changed of the cleared parameters. In
        a state the step created (the shard's first step) they have none of their own
        until they are stepped (Note [a fresh state inside a shard's] in _inner.py)."""
        with torch.no_grad():
            for tensor, span, saved in self._saved:
                tensor[span].copy_(saved)
        for bucket in self._unstepped:
            if self._inner.state.find(bucket.master):
                bucket.without_state |= bucket.cleared
                give_fresh_state(bucket, bucket.cleared, self._inner)


@torch.no_grad()
def give_fresh_state(bucket: FlatBucket, indices: Iterable[int], inner: InnerOptimizers) -> None:
    """Note [a fresh state inside a shard's] in _inner.py: the parameters ``indices`` of
    ``bucket`` take a fresh state's values, with their group's settings now, in every
    state tensor of the shard kept element by element."""
    state = inner.state.find(bucket.master, {})
    if not indices or not state:
        return  # no stand-in step of the user's class where nothing takes its values
    fresh = fresh_values(inner.classes[bucket.group_index], inner.param_groups[bucket.group_index])
    _, per_element = split_state(state, bucket.master)
    for key, tensor in per_element.items():
        for span in bucket.shard_spans(indices):
            tensor[span].fill_(fresh.get(key, 0.0))
