"""The sharding plan, and the view of it that the rest of the package reads.

``plan_sharding`` decides what is sharded and how (buckets, stage 3's units, the
param groups' members, the ranks) from the model and the arguments alone: no
collective, so every rank computes it and a bad argument fails on every rank alike.
``ZeroOptimizer`` then broadcasts and places the buckets it names.

``ShardingView`` (``ZeroOptimizer.sharding``) is the one way into an optimizer for
code outside optimizer.py: the checkpoint modules (checkpoint.py, _full_state.py,
_sharded_state.py, _safetensors.py) and the tests read the plan, the model, this
rank's shards and states through it, and gather shards with its two collectives,
instead of reading the optimizer's private attributes.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import _comm
from ._bucket import FlatBucket, Ownership, build_buckets
from ._inner import step_cost
from ._masters import ShardMasters
from ._ranks import Ranks
from ._unit import Unit, build_units
from ._unit_tree import select_unit_modules


@dataclass(frozen=True)
class ShardingPlan:
    """What one ZeroOptimizer shards, and over which ranks."""

    stage: int
    ranks: Ranks  # every collective goes along it (_comm.py)
    # Every bucket (stage 3: unit by unit, frozen parameters' included), in placement order
    every_bucket: tuple[FlatBucket, ...]
    buckets: tuple[FlatBucket, ...]  # the trainable ones: what the inner optimizer steps
    units: tuple[Unit, ...]  # stage 3's units, the root first; () at stages 1-2
    group_members: tuple[tuple[nn.Parameter, ...], ...]  # each param group's, a plain optimizer's order

    @property
    def device(self) -> torch.device:
        """Where the buckets (and the small collectives' tensors) live."""
        return self.every_bucket[0].flat.device if self.every_bucket else torch.device("cpu")

    @property
    def placement_batches(self) -> list[list[FlatBucket]]:
        """The buckets placed together (Note [one unit at a time] in _materialize.py)."""
        return [list(u.buckets) for u in self.units] if self.units else [list(self.every_bucket)]

    def emptied(self) -> ShardingPlan:
        """The plan of a closed optimizer: no buckets, no units, nothing held."""
        return ShardingPlan(self.stage, self.ranks, (), (), (), ())


def plan_sharding(model: nn.Module, groups: list[dict], stage: int, units, bucket_bytes: int,
                  ranks: Ranks, full_precision: frozenset[int], ownership: Ownership) -> ShardingPlan:
    """Flatten the parameters into buckets (no communication).

    Stages 1-2 bucket the trainable parameters by size; stage 3 gives every unit
    the buckets of its own parameters, frozen ones included.
    """
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    if stage != 3:
        trainable = [(p, group_of[id(p)]) for p in model.parameters() if p.requires_grad]
        built_units = []
        buckets = build_buckets(trainable, bucket_bytes, ranks.shard_rank, ranks.shard_size,
                                full_precision, ownership)
    else:
        modules = select_unit_modules(model, units, bucket_bytes)
        built_units = build_units(model, modules, group_of, ranks.shard_rank, ranks.shard_size,
                                  full_precision, ownership)
        buckets = [b for u in built_units for b in u.buckets]
    names = {id(p): name for name, p in model.named_parameters()}
    for bucket in buckets:  # for messages
        bucket.param_names = [names[id(p)] for p in bucket.params]
    return ShardingPlan(stage, ranks, tuple(buckets),
                        tuple(b for b in buckets if b.params[0].requires_grad), tuple(built_units),
                        tuple(tuple(g["params"]) for g in groups))


class ShardingView:
    """Read-only: an open ZeroOptimizer's plan, model, shards, inner optimizer and
    stage, as the checkpoint modules and the tests use them (module docstring).

    It holds the optimizer weakly and asks it on every use whether it is still open:
    a view kept after ``close()`` or after the optimizer is dropped refuses to work
    (with the fix), and never keeps a stage, or its hooks on the model, alive."""

    def __init__(self, opt, optimizer_class: type) -> None:
        self._opt = weakref.ref(opt)
        self._optimizer_class = optimizer_class

    def _open(self):
        opt = self._opt()
        if opt is None:
            raise RuntimeError("the ZeroOptimizer this view was taken from is gone; take "
                               "opt.sharding from the optimizer in use")
        opt._require_open()  # a closed one: the error says how to go on
        return opt

    @property
    def _plan(self) -> ShardingPlan:
        return self._open()._plan

    @property
    def plan(self) -> ShardingPlan:
        return self._plan

    @property
    def model(self) -> nn.Module:
        return self._open()._model

    @property
    def inner(self):
        """The inner optimizers (``InnerOptimizers``): ``state``, ``param_groups``,
        ``classes``, ``optimizers``, over this rank's shards."""
        return self._open()._inner

    @property
    def optimizer_class(self) -> type:
        return self._optimizer_class

    @property
    def stage(self):
        """The assembled stage (``Stage`` in _stage.py)."""
        return self._open()._stage

    @property
    def masters(self) -> ShardMasters:
        """What the inner optimizer steps, and how shards follow it (_masters.py)."""
        return self._open()._masters

    @property
    def ranks(self) -> Ranks:
        return self._plan.ranks

    @property
    def rank(self) -> int:
        """This rank among every rank of the job, every replica's (``Ranks.rank``)."""
        return self._plan.ranks.rank

    @property
    def world_size(self) -> int:
        """Every rank of the job, every replica's (``Ranks.size``)."""
        return self._plan.ranks.size

    @property
    def every_bucket(self) -> tuple[FlatBucket, ...]:
        return self._plan.every_bucket

    @property
    def buckets(self) -> tuple[FlatBucket, ...]:
        return self._plan.buckets

    @property
    def units(self) -> tuple[Unit, ...]:
        return self._plan.units

    @property
    def group_members(self) -> tuple[tuple[nn.Parameter, ...], ...]:
        return self._plan.group_members

    @property
    def device(self) -> torch.device:
        """Where this optimizer's tensors (and its small collectives' tensors) live."""
        return self._plan.device

    def take_outside_writes(self) -> tuple[FlatBucket, ...]:
        """With mixed precision, the masters take what was written to the parameters
        since the last step (``absorb_outside_writes`` in _masters.py); returns the buckets.
        Inside ``summon_full_params()`` the writes made so far in the block too: at stage
        3 those in the gathered buffers, with ``full_precision=True`` those in the masters'
        copies, which reached the masters at the block's end only, so a save, a
        ``full_state_dict()`` or a nested block inside missed them (a reviewer's probes)."""
        opt = self._open()
        buckets, masters = self.buckets, self.masters
        shown = opt._masters_shown
        if shown is not None:
            shown.flush()
        if opt._stage.switches.summoned:
            with shown.casts_in_place() if shown is not None else contextlib.nullcontext():
                opt._stage.keep_writes_made_inside()
        masters.absorb_outside_writes(buckets)
        return buckets

    def reading_structure(self):
        """Inside, ``model.state_dict()`` may run at stage 3 to read keys and shapes."""
        return self.stage.reading_structure()

    def gather_shard(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's ``shard`` of one bucket, end to end (the padded flat size). Collective."""
        opt = self._open()
        full = shard.new_empty(shard.numel() * opt._plan.ranks.shard_size)
        _comm.all_gather(full, shard, group=opt._plan.ranks, stats=opt.comm_stats, label="state")
        return full

    @torch.no_grad()
    def gather_masters(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its full value, all-gathered from the master shards, for every
        parameter this optimizer updates (fp32 with mixed precision). Collective."""
        full_values = {}
        for bucket in self.take_outside_writes():
            full = self.gather_shard(bucket.master)
            for index, param in enumerate(bucket.params):
                full_values[id(param)] = bucket.param_view(full, index)
        return full_values


def work_balance(plan: ShardingPlan, classes: list[type]) -> dict:
    """``ZeroOptimizer.sharding_report``: per shard rank, the elements it steps, the
    elements its shards store and the work per optimizer class (``classes``: each param
    group's), from the layout alone; and the elements of frozen parameters' shards it
    stores (stage 3: a LoRA model's base weights, 52 times the trainable shards in a
    helper's probe, which ``stored`` alone left out; stages 1-2 shard none)."""
    size = plan.ranks.shard_size
    elements, stored = [0] * size, [0] * size
    trainable = {id(bucket) for bucket in plan.buckets}
    frozen_stored = [sum(bucket.layout.shard_numel for bucket in plan.every_bucket
                         if id(bucket) not in trainable)] * size
    work: dict[str, list[float]] = {}
    for bucket in plan.buckets:
        cls = classes[bucket.group_index]
        name = f"{cls.__module__}.{cls.__qualname__}"
        cost = step_cost(cls) if bucket.owns_whole_parameters else (lambda shape: shape.numel())
        class_work = work.setdefault(name, [0.0] * size)
        for rank in range(size):
            stored[rank] += bucket.layout.shard_numel
            for index, param in enumerate(bucket.params):
                overlap = bucket.layout.overlap(index, rank)
                if overlap is None:
                    continue
                elements[rank] += overlap.param_stop - overlap.param_start
                class_work[rank] += float(cost(param.shape)) \
                    if bucket.owns_whole_parameters else overlap.param_stop - overlap.param_start
    return {"shard_size": size, "elements": elements, "stored": stored,
            "stored_frozen": frozen_stored, "work": work,
            "imbalance": {"elements": _imbalance(elements),
                          **{name: _imbalance(loads) for name, loads in work.items()}},
            "padding": sum(stored) / max(1, sum(elements))}


def _imbalance(loads: list) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0
