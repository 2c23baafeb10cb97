"""What ``p.grad`` holds at stages 2 and 3 once a backward has reduced it.

Note [gradient markers]:
    At stages 2 and 3 the reduced gradient lives in this rank's gradient shards, not
    in ``p.grad``. But training loops clear gradients through the parameters:
    ``model.zero_grad()`` (what HF ``Trainer`` calls), ``p.grad = None`` for a subset,
    or ``model.zero_grad(set_to_none=False)``. With ``p.grad`` left None none of
    these would reach the shards, and the next backward would add to the old
    gradient: silently different numbers from DDP. So after each synced backward
    every parameter whose bucket got a reduced gradient gets a marker in ``p.grad``:
    a NaN tensor of its shape, dtype and device, backed by one element (stride 0),
    so it costs nothing. Before the shards are next used (the next backward, a
    step, clipping) the markers are read back:

    - ``p.grad`` is None (``zero_grad()``), or the marker now holds zero
      (``zero_grad(set_to_none=False)``): this parameter's part of the shard is
      cleared, so the next backward starts from zero as in plain PyTorch. A bucket
      whose every parameter was set to None drops its shard, as ``opt.zero_grad()``
      would.
    - the marker is untouched: the gradient accumulates, as in plain PyTorch.
    - anything else cannot reach the shards, so it is refused on every rank, naming
      the parameter and what to use instead: an in-place change (scaling, as
      ``torch.nn.utils.clip_grad_norm_(model.parameters())`` does) at once, by the
      marker (a ``torch.Tensor`` subclass), and a new tensor put in ``p.grad`` when
      the shards are next used.

    Reading a marker gives NaN: the reduced gradient is not in ``p.grad``, and a
    gradient-norm log line shows that rather than a plausible wrong number. Then the
    markers are taken out of ``p.grad`` (set to None) before autograd accumulates
    into it: a parameter hook runs before accumulation.
"""

from __future__ import annotations

import torch
from torch import nn

from torch.utils._pytree import tree_flatten

from ._bucket import FlatBucket


# In-place operations a marker allows: clearing (``model.zero_grad(set_to_none=False)``).
_ALLOWED_IN_PLACE = {"zero_", "_foreach_zero_", "requires_grad_", "detach_"}


class GradientMarker(torch.Tensor):
    """A marker in ``p.grad`` (Note [gradient markers]). Reads work (they give NaN);
    an in-place change other than zeroing is refused where it is made, naming the
    parameter and what to use instead."""

    refusal = ""  # set per marker

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and name not in _ALLOWED_IN_PLACE:
            marker = next(t for t in tree_flatten((args, kwargs))[0] if isinstance(t, cls))
            raise RuntimeError(marker.refusal.format(what=f"was changed in place ({name})"))
        with torch._C.DisableTorchFunctionSubclass():  # results are ordinary tensors
            return func(*args, **(kwargs or {}))


class GradientMarkers:
    """The markers now in ``p.grad`` of one stage's parameters (Note [gradient markers])."""

    def __init__(self, stage_label: str) -> None:
        self.stage_label = stage_label
        # (bucket, parameter index, marker, the marker's version when placed)
        self._placed: list[tuple[FlatBucket, int, GradientMarker, int]] = []

    def is_marker(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, GradientMarker)

    def place(self, buckets: list[FlatBucket]) -> None:
        """After a synced backward: mark every parameter whose bucket holds a reduced gradient."""
        self.drop()
        for bucket in buckets:
            if bucket.grad_shard is None:
                continue
            for index, param in enumerate(bucket.params):
                if param.grad is not None:  # a local gradient (no_sync) stays where it is
                    continue
                element = torch.full((), float("nan"), dtype=param.dtype, device=param.device)
                marker = element.expand(param.shape).as_subclass(GradientMarker)
                marker.refusal = self._refusal(bucket, index)
                param.grad = marker
                self._placed.append((bucket, index, marker, marker._version))

    def take_back(self) -> None:
        """Apply what was done to the markers to the gradient shards, then remove them.
        Every check comes before any change: a refused usage changes nothing."""
        if not self._placed:
            return
        cleared: dict[int, tuple[FlatBucket, list[int]]] = {}
        every_one_none: dict[int, bool] = {}
        for bucket, index, marker, version in self._placed:
            grad = bucket.params[index].grad
            if grad is not None and grad is not marker:
                raise RuntimeError(marker.refusal.format(what="was given a new tensor"))
            zeroed = grad is marker and marker._version != version  # zero_(): the one change allowed
            every_one_none[id(bucket)] = every_one_none.get(id(bucket), True) and grad is None
            if grad is None or zeroed:
                cleared.setdefault(id(bucket), (bucket, []))[1].append(index)
        self.drop()
        for key, (bucket, indices) in cleared.items():
            if every_one_none[key] and len(indices) == len(bucket.params):
                bucket.set_grad_shard(None)  # what opt.zero_grad() does
                continue
            for index in indices:
                overlap = bucket.layout.overlap(index, bucket.rank)
                if overlap is not None and bucket.grad_shard is not None:
                    bucket.grad_shard[overlap.shard_span].zero_()

    def drop(self) -> None:
        """Remove the markers still in place, reading nothing (``opt.zero_grad()``, ``close()``)."""
        for bucket, index, marker, _ in self._placed:
            if bucket.params[index].grad is marker:
                bucket.params[index].grad = None
        self._placed.clear()

    def _refusal(self, bucket: FlatBucket, index: int) -> str:
        """The message for a refused change, with ``{what}`` to fill in."""
        return (f"zeroshard {self.stage_label}: {bucket.param_names[index]}.grad {{what}} after "
                "backward, but the reduced gradient lives in the optimizer's shards, not in "
                ".grad (Note [gradient markers] in zeroshard/_grad_markers.py). Clear gradients "
                "with opt.zero_grad() or model.zero_grad(); clip with "
                "opt.clip_grad_norm_(max_norm) instead of "
                "torch.nn.utils.clip_grad_norm_(model.parameters()); read or change gradients "
                "through opt.param_groups (each rank's gradient shards)")
