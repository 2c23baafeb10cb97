"""ZeRO stage 3: stage 2 plus parameters partitioned, gathered per unit on demand.

At rest a rank holds only its shard of every parameter; the parameters themselves
are views of full buffers whose storage is freed. Around each unit's forward the
unit's buffers are all-gathered and (with ``reshard_after_forward``) freed again;
in backward they are gathered again when the unit's outputs receive their
gradient, and freed once all the unit's parameter gradients are accumulated.
Gradients are handled exactly as in stage 2 (``Stage2``): reduce-scattered into
shards in one fixed bucket order, full gradients freed as their bucket is reduced.

Note [stage 3 contract]:
    All-gathers are issued as units compute, so every rank must run the same units
    in the same order, in forward and in backward: the contract of FSDP too. A unit
    whose forward runs on some ranks only, or whose outputs receive gradient on
    some ranks only, would leave the ranks in different collectives. A unit that no
    rank runs in a step (skipped by the optimizer, as torch skips a parameter whose
    gradient is None) and a unit run twice are fine. A parameter must be used
    inside the forward of a module that holds it (in ``_parameters``), or of one of
    that module's ancestor units.

Note [recomputation]:
    Activation checkpointing runs a unit's forward again during backward. The
    hooks recognise it by the BACKWARD state: they gather as usual but neither
    release (backward is about to use the parameters) nor arm backward hooks.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.utils._pytree import tree_flatten

from ._stage import TrainingState
from ._unit import ShardState, Unit
from .stage2 import Stage2


class Stage3(Stage2):
    stage = 3

    def __init__(self, model, units: list[Unit], group, stats, reshard_after_forward: bool,
                 policy=None) -> None:
        # Reduce-scatter order: units from the last to the root (roughly backward's order).
        trainable = [b for u in reversed(units) for b in u.buckets if b.params[0].requires_grad]
        super().__init__(model, trainable, group, stats, policy)
        self.units = units
        self.root = units[0]
        self.reshard_after_forward = reshard_after_forward
        self._unit_of = {id(p): u for u in units for b in u.buckets for p in b.params}
        # Prefetch orders, recorded on the first training forward / backward.
        self._forward_order: list[Unit] | None = None
        self._backward_order: list[Unit] | None = None
        self._recording: list[Unit] = []
        self._order_index = 0  # units entered so far in this forward or backward
        self._order_warned = False
        for module in model.modules():
            owners = {id(self._unit_of[id(p)]): self._unit_of[id(p)]
                      for p in module._parameters.values() if p is not None}
            if owners:
                guard = functools.partial(self._refuse_if_sharded, list(owners.values()))
                self._handles.append(module.register_state_dict_pre_hook(guard))
                self._handles.append(module.register_load_state_dict_pre_hook(guard))
        for unit in units:
            self._handles.append(unit.module.register_forward_pre_hook(
                functools.partial(self._pre_forward, unit)))
            self._handles.append(unit.module.register_forward_hook(
                functools.partial(self._post_forward, unit)))
            unit.release()  # the shards hold rank 0's values (broadcast, then placed)

    # -- forward --------------------------------------------------------------------

    def _pre_forward(self, unit: Unit, module, args) -> None:
        training = torch.is_grad_enabled() and self.state is TrainingState.IDLE
        if training:
            unit.ran_since_backward = True
        if unit is self.root and training:
            self._order_index, self._recording = 0, []
        self._gather_now(unit)
        if training:
            self._prefetch_next(unit, self._forward_order)

    def _post_forward(self, unit: Unit, module, args, output) -> None:
        if self.state is TrainingState.BACKWARD:
            return  # Note [recomputation]
        if not torch.is_grad_enabled():
            unit.release()  # no backward follows
            return
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(functools.partial(self._pre_backward, unit))
        if self.reshard_after_forward:
            unit.release()
        if unit is self.root:  # the end of forward
            if self._forward_order is None:
                self._forward_order = self._recording
            if self.reshard_after_forward:
                for other in self.units:  # a prefetch the forward did not use
                    other.release()

    # -- backward -------------------------------------------------------------------

    def _pre_backward(self, unit: Unit, grad: torch.Tensor) -> None:
        self._on_backward_start(grad)
        if unit.backward_armed:
            return
        if not any(u.backward_armed for u in self.units):
            self._order_index, self._recording = 0, []
        unit.backward_armed = True
        self._gather_now(unit)
        self._prefetch_next(unit, self._backward_order)

    def collect(self, bucket, index: int) -> None:
        super().collect(bucket, index)
        param = bucket.params[index]
        unit = self._unit_of[id(param)]
        unit.grads_arrived.add(id(param))
        if unit.release_when_grads_done and unit.grads_arrived >= unit.trainable_ids:
            unit.release()  # all its gradients are accumulated: backward is done with it
            # A nested backward (Note [late gradients]) may gather it again: count afresh.
            unit.grads_arrived.clear()

    def skips_reduction(self, bucket) -> bool:
        """A unit that ran no forward since the last backward ran on no rank (Note [stage 3
        contract]): its gradient is not zero but absent, so its reduce-scatter is skipped
        and, if it stays absent until step(), the optimizer skips it as torch skips a
        parameter whose .grad is None (no weight decay, no momentum)."""
        return not self._unit_of[id(bucket.params[0])].ran_since_backward

    def _on_backward_end(self) -> None:
        super()._on_backward_end()
        if self._backward_order is None:
            self._backward_order = self._recording
        for unit in self.units:
            unit.release()
            unit.grads_arrived.clear()
            unit.backward_armed = False
            unit.ran_since_backward = False

    # -- gather, prefetch -------------------------------------------------------------

    def _gather_now(self, unit: Unit) -> None:
        unit.gather(self.group, self.stats, self.label)
        unit.wait()

    def _prefetch_next(self, unit: Unit, order: list[Unit] | None) -> None:
        """Record ``unit`` as the next in order, and start gathering the one after it."""
        position = self._order_index
        self._order_index += 1
        if order is None:
            self._recording.append(unit)
            return
        if position >= len(order) or order[position] is not unit:
            if not self._order_warned:
                self._order_warned = True
                warnings.warn(f"zeroshard stage 3: unit {unit.name} ran out of the order recorded "
                              "on the first step; prefetching stops where the order differs")
            return
        if position + 1 < len(order) and order[position + 1].state is ShardState.SHARDED:
            order[position + 1].gather(self.group, self.stats, self.label)

    @staticmethod
    def _refuse_if_sharded(units: list[Unit], module, *args) -> None:
        """Reading or loading a freed buffer would read or write memory that is not there."""
        if any(u.state is not ShardState.GATHERED for u in units):
            raise RuntimeError(
                "stage 3 keeps parameters sharded between forward and backward, so "
                "model.state_dict() and model.load_state_dict() must run inside "
                "`with opt.summon_full_params():` (on every rank)")

    # -- around the optimizer step ----------------------------------------------------

    def after_step(self) -> None:
        """Parameters stay sharded after a step; free anything still gathered (stale now)."""
        for unit in self.units:
            unit.release()

    def parameter_tensors(self) -> list[torch.Tensor]:
        return [b.shard for u in self.units for b in u.buckets]

    def master_tensors(self) -> list[torch.Tensor]:
        return [b.master for u in self.units for b in u.buckets if b.master is not None]

    @contextlib.contextmanager
    def summon_full_params(self):
        """Gather every unit; on exit write each rank's own slice back into its shard."""
        for unit in self.units:
            self._gather_now(unit)
        try:
            yield
        finally:
            with torch.no_grad():
                for unit in self.units:
                    for bucket in unit.buckets:
                        bucket.load_shard()
                    unit.release()
