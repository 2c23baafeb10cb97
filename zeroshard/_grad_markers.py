"""What ``p.grad`` holds at stages 2 and 3 once a backward has reduced it.

Note [gradient markers]:
    At stages 2 and 3 the reduced gradient lives in this rank's gradient shards, not
    in ``p.grad``. But training loops clear gradients through the parameters:
    ``model.zero_grad()`` (what HF ``Trainer`` calls), ``p.grad = None`` for a subset,
    or ``model.zero_grad(set_to_none=False)``. With ``p.grad`` left None none of
    these would reach the shards, and the next backward would add to the old
    gradient: silently different numbers from DDP. So after each synced backward
    every parameter whose bucket got a reduced gradient gets a marker in ``p.grad``:
    a NaN tensor of its shape, dtype and device, backed by one element (stride 0) of
    a small tensor per bucket, so it costs one fill per bucket. Before the shards are
    next used (the next backward, a step, clipping) the markers are read back, from
    host-side version counters (the values are read only where one changed):

    - ``p.grad`` is None (``zero_grad()``), or the marker now holds zero
      (``zero_grad(set_to_none=False)``): this parameter's part of the shard is
      cleared, so the next backward starts from zero as in plain PyTorch. A bucket
      whose every parameter was set to None drops its shard, as ``opt.zero_grad()``
      would.
    - the marker is untouched: the gradient accumulates, as in plain PyTorch.
    - anything else cannot reach the shards, so it is refused on every rank, naming
      the parameter and what to use instead: an in-place change other than zeroing
      the whole marker (scaling, as ``torch.nn.utils.clip_grad_norm_(
      model.parameters())`` does, or zeroing some rows through ``p.grad[rows]``,
      ``p.grad.data``) at once, by the marker (a ``torch.Tensor`` subclass whose views
      are markers too), and a new tensor put in ``p.grad`` when the shards are next
      used, in place of a marker or where none was (before the first backward, after
      ``opt.zero_grad()``: the step went on without it there until a helper's probe).

    After ``opt.zero_grad(set_to_none=False)`` the shards that exist are zeros, and
    their parameters get markers too, reading zero as torch's zeroed gradients do, so
    that a ``model.zero_grad()`` after it still reaches the shards; reading one into
    another tensor (an EMA of gradients: ``ema.add_(p.grad)``) reads that zero, and is
    not refused as below (helper-64's probe: refused as "read after backward" where
    DDP read zeros).

    Reading the values of a marker placed after a backward is refused where it is made,
    naming the parameter and ``opt.clip_grad_norm_``: the reduced gradient is not in
    ``p.grad``, and the NaN a read gave flowed on silently where it decided something.
    DINO's per-parameter clipping (``clip / (p.grad.norm() + 1e-6) < 1`` is False for
    NaN) never clipped, and a guard that steps only when every ``p.grad`` is finite
    never stepped (helper-85's probes: 0.27 and 0.33 from DDP, no error). An operation
    whose result has new memory it did not take from an argument reads values, but for
    the ``*_like`` and ``new_*`` constructors; so do ``item()``, ``tolist()``, ``bool()``,
    pickling and the like. Views of a marker (``p.grad.data``, ``p.grad[rows]``,
    ``p.grad.unbind()``) are markers in turn, and so is a marker converted to another
    dtype or device (``model.half()`` converts ``p.grad`` too); a marker as another
    tensor's template (``x.to(p.grad)``, ``x.expand_as(p.grad)``), shape, dtype and the
    rest read no values, and printing one names it instead of showing NaN (a reviewer's
    probes, helper-87: the conversions and templates were refused as reads in a first
    version). A marker placed by ``opt.zero_grad(set_to_none=False)``, or zeroed whole
    since (``model.zero_grad(set_to_none=False)``), reads zero, as DDP's gradients do
    then, through the steps until the next backward. An in-place operation reading a
    marker into another tensor (``buffer.add_(p.grad)``) is refused, saying so: that
    tensor would take the NaN (it was refused as a change of the marker).
    Another optimizer stepping the parameter is refused before it reads anything (Note
    [another optimizer over managed parameters] in _other_optimizers.py). A step or
    clipping leaves untouched markers in place; when a backward begins they are taken
    out of ``p.grad`` (set to None) before autograd accumulates into it (a parameter
    hook runs before accumulation).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

from . import _absent_values as absent_values
from ._bucket import FlatBucket

# In-place operations a marker allows: clearing (``model.zero_grad(set_to_none=False)``; not
# through a view, which would clear part of it) and autograd's flags.
_ZEROING = {"zero_", "_foreach_zero_"}
_ALLOWED_IN_PLACE = _ZEROING | {"requires_grad_", "detach_"}


class GradientMarker(torch.Tensor):
    """A marker in ``p.grad`` (Note [gradient markers]). A read of its values, and an
    in-place change other than zeroing the whole marker, is refused where it is made,
    naming the parameter and what to use instead. What a marker's view (``p.grad[rows]``,
    ``p.grad.data``) returns is a marker too, so a write through it is refused alike."""

    parameter_name = ""  # set per marker
    stage_label = ""
    is_view = False
    holds_zero = False  # the gradient is zero: placed by opt.zero_grad(set_to_none=False), or
    # zeroed whole since (model.zero_grad(set_to_none=False))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = absent_values.name_of(func)
        markers = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, cls)]
        unread = [m for m in markers if not m.holds_zero]
        if name in absent_values.SHOWN and unread:  # a print or a log line: no values to show
            return (f"GradientMarker({unread[0].parameter_name}: the reduced gradient lives "
                    "in the optimizer's shards; Note [gradient markers] in "
                    "zeroshard/_grad_markers.py)")
        in_place = absent_values.is_in_place(name, kwargs, bool(markers))
        written = absent_values.written(cls, args, kwargs) if in_place else []
        if in_place and (name not in _ALLOWED_IN_PLACE
                         or (name in _ZEROING and any(m.is_view for m in markers))):
            if written:
                raise RuntimeError(refusal(written[0], f"was changed in place ({name})"))
            if unread:  # read into another tensor: it takes the NaN
                raise RuntimeError(refusal(unread[0], f"was read into another tensor in "
                                                      f"place ({name}; a gradient added into "
                                                      "a buffer by hand)"))
        result, views, reads = absent_values.run(func, name, args, kwargs, markers)
        if in_place:
            if name in _ZEROING:  # the whole marker cleared: it reads zero, as DDP's
                for marker in written:
                    marker.holds_zero = True
            return result
        if reads and unread:
            raise RuntimeError(refusal(unread[0], f"was read ({name})"))
        if not views:
            return result
        return tree_map(lambda t: _view_of(markers[0], t) if id(t) in views else t, result)


def _view_of(marker: GradientMarker, view: torch.Tensor) -> GradientMarker:
    """``view``, a view of ``marker``'s memory or a conversion of it, as a marker: reads
    and writes through it are refused as through the marker."""
    view = view.as_subclass(GradientMarker)
    view.parameter_name, view.stage_label = marker.parameter_name, marker.stage_label
    view.is_view, view.holds_zero = True, marker.holds_zero
    return view


# A .grad the loop replaced: gradient surgery (PCGrad: torch.autograd.grad per loss, the
# results combined into p.grad) is the common way to get here.
GIVEN_A_NEW_TENSOR = (
    "was given a new tensor (set by hand: zeroshard reduces the gradients backward computes, "
    "as DDP does, so one computed with torch.autograd.grad and put in .grad would reach no "
    "other rank; backward the loss instead, or change gradients as backward makes them with "
    "p.register_hook)")


def refusal(marker: GradientMarker, what: str) -> str:
    since = "opt.zero_grad(set_to_none=False)" if marker.holds_zero else "backward"
    return _refusal(marker.parameter_name, marker.stage_label, f"{what} after {since}")


def refusal_of_a_gradient_set_by_hand(name: str, stage_label: str) -> str:
    """For a ``.grad`` the loop filled where no backward had left one (Note [gradient
    markers]: before the first backward, or after ``opt.zero_grad()``)."""
    return _refusal(name, stage_label, f"{GIVEN_A_NEW_TENSOR} where no backward had left one")


def _refusal(name: str, stage_label: str, what: str) -> str:
    return (f"zeroshard {stage_label}: {name}.grad {what}, "
            "but the reduced gradient lives in the optimizer's shards, not in "
            ".grad (Note [gradient markers] in zeroshard/_grad_markers.py). Clear gradients "
            "with opt.zero_grad() or model.zero_grad() (whole gradients); clip with "
            "opt.clip_grad_norm_(max_norm) instead of "
            "torch.nn.utils.clip_grad_norm_(model.parameters()) (Hugging Face Trainer: use "
            "zeroshard.integrations.hf.ZeroTrainer); for the gradients' norm (a log line, "
            "a step skipped on a non-finite gradient) use what opt.clip_grad_norm_ returns, "
            "on every rank (max_norm=float('inf') clips nothing); read or change gradients "
            "through opt.param_groups (each rank's gradient shards: "
            "torch.nn.utils.clip_grad_value_([p for g in opt.param_groups for p in "
            "g['params']], v) clips by value)")


class _BucketMarkers:
    """The markers of one bucket's parameters: views of one element each of ``values``
    (NaN, or zero where the shard is known to be zeros), whose version counter says
    whether any was zeroed."""

    def __init__(self, bucket: FlatBucket, label: str, value: float) -> None:
        self.bucket = bucket
        first = bucket.params[0]
        self.value = value
        self.values = torch.full((len(bucket.params),), value, dtype=first.dtype,
                                 device=first.device)
        self.markers: dict[int, GradientMarker] = {}  # parameter index -> its marker
        for index, param in enumerate(bucket.params):
            # a local gradient (no_sync) stays where it is; one the loop set to None stays
            # None (Note [a gradient cleared before the step] in _cleared.py)
            if param.grad is not None or index in bucket.cleared:
                continue
            marker = self.values[index].expand(param.shape).as_subclass(GradientMarker)
            marker.parameter_name, marker.stage_label = bucket.param_names[index], label
            marker.holds_zero = value == 0
            param.grad = marker
            self.markers[index] = marker
        self.version = self.values._version

    def cleared(self) -> tuple[list[int], list[int]]:
        """(indices whose gradient was set to None, indices whose marker was zeroed);
        raises for a marker replaced by another tensor."""
        params = self.bucket.params
        for index, marker in self.markers.items():
            grad = params[index].grad
            if grad is not None and grad is not marker:
                raise RuntimeError(refusal(marker, GIVEN_A_NEW_TENSOR))
        none = [i for i, m in self.markers.items() if params[i].grad is None]
        zeroed = []
        if self.values._version != self.version:  # some marker was zeroed: read which
            values = self.values.tolist()
            zeroed = [i for i in self.markers if i not in none and values[i] == 0]
        return none, zeroed

    def keep_untouched(self, cleared: list[int]) -> None:
        """After a step or clipping: markers set to None stay out; the others stay in
        place, zeroed ones reading zero (their part of the shard was cleared)."""
        for index in cleared:
            if self.bucket.params[index].grad is None:
                del self.markers[index]
        if self.values._version != self.version:
            self.values.fill_(self.value)
            zeroed = [i for i in cleared if i in self.markers]
            self.values[zeroed] = 0
        self.version = self.values._version

    def drop(self) -> None:
        for index, marker in self.markers.items():
            if self.bucket.params[index].grad is marker:
                self.bucket.params[index].grad = None
        self.markers.clear()


class GradientMarkers:
    """The markers now in ``p.grad`` of one stage's parameters (Note [gradient markers])."""

    def __init__(self, stage_label: str) -> None:
        self.stage_label = stage_label
        self._placed: list[_BucketMarkers] = []

    def is_marker(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, GradientMarker)

    def place(self, buckets: list[FlatBucket], zeros: bool = False) -> None:
        """After a synced backward: mark every parameter whose bucket holds a reduced
        gradient. ``zeros``: the shards were just zeroed (``zero_grad(set_to_none=False)``),
        and the markers read zero, as torch's zeroed gradients do."""
        self.drop()
        value = 0.0 if zeros else float("nan")
        self._placed = [_BucketMarkers(b, self.stage_label, value) for b in buckets
                        if b.grad_shard is not None]

    def take_back(self, keep: bool = False) -> None:
        """Apply what was done to the markers to the gradient shards; then remove the
        markers (a backward begins), or with ``keep`` leave the untouched ones in place
        (a step or clipping: the shards keep their gradient until it is cleared). Every
        check comes before any change: a refused usage changes nothing."""
        cleared = [(placed, *placed.cleared()) for placed in self._placed]
        for placed, none, zeroed in cleared:
            placed.bucket.clear_gradients_of(none, zeroed)
            if keep:
                placed.keep_untouched(none + zeroed)
        if keep:
            self._placed = [placed for placed in self._placed if placed.markers]
        else:
            self.drop()

    def drop(self) -> None:
        """Remove the markers still in place, reading nothing (``opt.zero_grad()``, ``close()``)."""
        for placed in self._placed:
            placed.drop()
        self._placed = []
