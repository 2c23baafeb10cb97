"""Step 3 of building a ZeroOptimizer: every rank holds rank 0's values, laid out by
the plan, and its own shards.

The ranks first compare what they planned (``refuse_layouts_that_differ_across_ranks``:
one all-reduce), then each batch of buckets (stage 3: one unit, Note [one unit at a
time] in _materialize.py) is materialized, initialised, broadcast from rank 0 and
sharded (``place``); the masters the inner optimizer steps are set up as each batch is
(_masters.py). The first collectives of the optimizer are here.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from . import _comm, _materialize
from ._bucket import FlatBucket, is_row_major
from ._masters import ShardMasters
from ._plan import ShardingPlan
from ._ranks import Ranks
from .mixed_precision import MixedPrecision, cast_buffers, full_precision_parameters


def _described(model: nn.Module, settings: dict) -> list[tuple]:
    """What every rank must build alike: the settings, then each parameter's and buffer's
    shape and dtype."""
    return ([("setting", name, repr(value)) for name, value in settings.items()]
            + [("parameter", name, tuple(p.shape), str(p.dtype))
               for name, p in model.named_parameters()]
            + [("buffer", name, tuple(b.shape), str(b.dtype)) for name, b in model.named_buffers()])


def _first_difference(mine: list[tuple], rank0: list[tuple]) -> str:
    fix = ("build the same model with the same ZeroOptimizer arguments on every rank (a "
           "config or an argument read per rank?)")
    for here, there in zip(mine, rank0):
        if here != there:
            if here[:2] != there[:2]:
                return (f"the ranks built different models or arguments: this rank has "
                        f"{here[0]} {here[1]!r} where rank 0 has {there[0]} {there[1]!r}; {fix}")
            if here[0] == "setting":
                return (f"ZeroOptimizer's {here[1]} differs across ranks: {here[2]} on this "
                        f"rank, {there[2]} on rank 0; {fix}")
            return (f"{here[0]} {here[1]!r} has shape {here[2]} and dtype {here[3]} on this "
                    f"rank, shape {there[2]} and dtype {there[3]} on rank 0; {fix}")
    if len(mine) != len(rank0):
        return (f"this rank's model has {len(mine)} settings, parameters and buffers in all, "
                f"rank 0's {len(rank0)}; {fix}")
    return f"another rank built a different model or passed other arguments than rank 0; {fix}"


class Placement:
    """Places ``plan``'s buckets on ``device`` (ZeroOptimizer's construction, step 3)."""

    def __init__(self, model: nn.Module, plan: ShardingPlan, masters: ShardMasters,
                 policy: MixedPrecision | None, stats: _comm.CommStats) -> None:
        self.model = model
        self.plan = plan
        self.group = plan.ranks
        self.masters = masters
        self.policy = policy
        self.stats = stats

    def refuse_layouts_that_differ_across_ranks(self, classes: list[type], device: torch.device,
                                                settings: dict, across: Ranks) -> None:
        """Every rank must lay the buckets out alike, as the collectives move whole
        buffers and every rank must issue the same ones. Two things can differ: the
        memory order a rank holds a parameter in (Note [memory order] in _bucket.py: a
        ``channels_last`` weight on one rank and a row-major one on another would
        exchange scrambled values; DDP checks strides too), and the buckets themselves
        (param groups, optimizer classes and so owners, ``bucket_size_mb`` given
        differently on some ranks). The ranks compare a fingerprint of each in one
        all-reduce, and one of the model's tensors and of ``settings`` (the stage, the
        policy, ...): a model built with another hidden size on one rank (a per-rank
        config) passed when its buckets came out the same size, and trained the ranks'
        models apart, silently; a policy, a dtype or a resharding setting given on some
        ranks only crashed training with a bare gloo abort, or hung (a helper's probes).
        Where those differ, rank 0's are broadcast so that each rank names the first
        difference. ``across``: the ranks that compare (Note [meshes compared over the
        job] in _ranks.py)."""
        if across.size == 1:
            return
        buckets = self.plan.every_bucket
        held = [(name, order) for bucket in buckets
                for name, order in zip(bucket.param_names, bucket.orders)
                if not is_row_major(order)]
        layouts = [(b.group_index, b.param_names, b.layout.owners) for b in buckets] + [
            f"{c.__module__}.{c.__qualname__}" for c in classes]
        described = _described(self.model, settings)
        fingerprint = torch.tensor([zlib.crc32(repr(held).encode()),
                                    zlib.crc32(repr(layouts).encode()),
                                    zlib.crc32(repr(described).encode())], dtype=torch.int64,
                                   device=device)
        highest, lowest = _comm.extremes(fingerprint, group=across, stats=self.stats,
                                         label="init")
        if highest[2] != lowest[2]:  # every rank sees it: all take part in the broadcast
            rank0 = _comm.broadcast_object(described, group=across, stats=self.stats,
                                           label="init", device=device)
            raise ValueError(_first_difference(described, rank0))
        if highest[0] != lowest[0]:
            mine = ", ".join(name for name, _ in held[:3]) or "none"
            raise ValueError(
                "the parameters' memory formats differ across ranks (e.g. "
                "model.to(memory_format=torch.channels_last) on some ranks only); this rank "
                f"holds these parameters in a non-row-major order: {mine}. Give the model "
                "the same memory format on every rank before building ZeroOptimizer")
        if highest[1] != lowest[1]:
            raise ValueError(
                "the ranks built different buckets: param_groups, their optimizer_class or "
                f"bucket_size_mb differ across ranks (this rank has {len(buckets)} buckets; its "
                f"groups' classes are {[c.__name__ for c in classes]}); build ZeroOptimizer "
                "with the same arguments on every rank")

    def place(self, device: torch.device, init: _materialize.Initialisation) -> None:
        """Materialize, initialise, broadcast and shard the model batch by batch: stage 3
        one unit at a time (Note [one unit at a time] in _materialize.py)."""
        batches = self.plan.placement_batches
        bucketed = {id(p) for b in self.plan.every_bucket for p in b.params}
        # parameters with real memory now: the loose ones, then each batch's
        materialized = {id(p) for p in self.model.parameters() if id(p) not in bucketed}

        def prepare(step: _materialize.PlacementStep) -> None:
            """This rank's part of a step: allocation, the user's init code, the checks."""
            if step.batch == 0:
                _materialize.place_loose_tensors(init, bucketed, device)
            for bucket in batches[step.batch]:
                bucket.materialize(device)
            materialized.update(id(p) for b in batches[step.batch] for p in b.params)
            spanning = {id(m) for m in step.spanning}
            for module in step.initialise:
                guard = _materialize.writes_refused_inside_units(
                    init, module, materialized, device) if id(module) in spanning else None
                init.run(module, guard)
            for index in step.finish:
                for bucket in batches[index]:
                    bucket.adopt_replaced_data()
                _materialize.refuse_missing_values(init, batches[index])
            if step.batch == len(batches) - 1:
                _materialize.refuse_missing_loose_values(init, bucketed)
                _materialize.refuse_missing_buffer_values(init)

        # Note [weak references to meta parameters] in _materialize.py: let go of while
        # parameters are swapped in, and swapped back to meta after a failure
        with _materialize.weak_references_let_go(self.model):
            try:
                for step in _materialize.placement_steps(batches, init.modules):
                    # An init that fails, or memory that runs out, on one rank only: every
                    # rank raises here, before the step's broadcasts (one 4-byte all-reduce).
                    _comm.run_and_share(lambda: prepare(step), group=self.group,
                                        stats=self.stats, label="init", device=device)
                    for index in step.finish:
                        self._broadcast_from_rank0([b.flat for b in batches[index]])
                        self._place_shards(batches[index])
                        if self.plan.stage == 3:
                            self.plan.units[index].release()
                            materialized.difference_update(
                                id(p) for b in batches[index] for p in b.params)
            except BaseException as error:
                _materialize.back_to_meta(init)
                if self.plan.stage == 3 and not init.meta_params:
                    error.add_note("zeroshard: units placed before the failure were sharded: "
                                   "their parameters hold NaN placeholders now; build the "
                                   "model again")
                raise
        loose = [p.data for p in self.model.parameters() if id(p) not in bucketed]
        self._broadcast_from_rank0(loose + list(self.model.buffers()))
        self._cast_loose_tensors(bucketed)

    def _place_shards(self, buckets: list[FlatBucket]) -> None:
        """Set up each bucket's shard and master from rank 0's values."""
        for bucket in buckets:
            self.masters.place(bucket, own_storage=self.plan.stage == 3)

    def _cast_loose_tensors(self, bucketed: set[int]) -> None:
        """With mixed precision, cast the parameters in no bucket and the buffers."""
        policy = self.policy
        if policy is None:
            return
        full_precision = full_precision_parameters(self.model, policy)
        with torch.no_grad():
            for param in self.model.parameters():
                # frozen, stages 1-2: never updated, no master
                if id(param) not in bucketed and id(param) not in full_precision:
                    param.data = param.data.to(policy.param_dtype)
        cast_buffers(self.model, policy)

    def _broadcast_from_rank0(self, tensors: list[torch.Tensor]) -> None:
        """All ranks start from rank 0's parameters and buffers, as with DDP."""
        # NCCL broadcasts contiguous tensors only (gloo takes any): a strided one (a
        # transposed frozen weight, a sliced buffer) goes through a contiguous copy.
        sent = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        works = [_comm.broadcast(t, group=self.group, stats=self.stats, label="init",
                                 async_op=True) for t in sent]
        _comm.wait_all(works)
        with torch.no_grad():
            for tensor, copy in zip(tensors, sent):
                if copy is not tensor:
                    tensor.copy_(copy)
