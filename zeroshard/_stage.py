"""A stage, assembled: what each ZeRO stage is made of, and what the optimizer calls.

Every stage is the same three parts, chosen once here:

    stage | gradients (the store)          | parameters
    ------+--------------------------------+------------------------------------------
      1   | FullGradients (stage1.py)      | WholeParameters: all-gathered after a step
      2   | ShardedGradients (stage2.py)   | WholeParameters
      3   | ShardedGradients               | UnitGatherer (stage3.py): per unit, on demand

and one ``GradientReducer`` (_reducer.py) reduces the gradients into the store in
one launch order, telling stage 3's gatherer, which decides when reductions are
due in its backward walk. No part inherits another; ``Stage`` holds them and is
what ``ZeroOptimizer`` calls.
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import torch
from torch import nn

from . import _comm
from ._bucket import FlatBucket
from ._hooks import EagerOnlyHook, LoopSwitches, WeakHook, remove_handles
from ._masters import ShardMasters
from ._reduce_slots import ReduceSlots
from ._reducer import GradientReducer, abandoned_backward_refusal
from ._unit import Unit
from .mixed_precision import GradientDtypes, MixedPrecision
from .stage1 import FullGradients
from .stage2 import ShardedGradients
from .stage3 import UnitGatherer, trainable_buckets


def increment_version(tensors: list[torch.Tensor]) -> None:
    """Move each tensor's version counter by one (autograd's in-place write check)."""
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)


# Post-step all-gathers in flight at once (stages 1-2): each holds (on gloo) its
# collective's temporaries (Note [collectives on gloo] in _comm.py).
GATHERS_IN_FLIGHT = 2


class Stage:
    """One ZeRO stage over ``model``: its hooks, gradient store, reducer and parameters."""

    def __init__(self, stage: int, model: nn.Module, buckets: list[FlatBucket],
                 units: list[Unit], group, stats: _comm.CommStats, policy: MixedPrecision | None,
                 masters: ShardMasters, reshard_after_forward: bool) -> None:
        self.stage = stage
        self.label = f"stage{stage}"
        self.switches = LoopSwitches()
        self.handles: list = []
        dtypes = GradientDtypes(policy)
        trainable = trainable_buckets(units) if stage == 3 else buckets
        self.reducer = GradientReducer(model, trainable, None, group, stats, self.label, dtypes,
                                       policy, self.switches, self.handles,
                                       record_ready_order=stage != 3)
        if stage == 1:
            self.store = FullGradients(trainable, dtypes)
            # It keeps the buffers it reduces: where the reduction changes its input (on
            # CPU, but for two ranks' exchange), their copies reuse slots.
            if any(_comm.changes_input(bucket.flat, group) for bucket in trainable):
                self.reducer.slots = ReduceSlots(trainable, dtypes.reduce_dtype,
                                                 FullGradients.reductions_in_flight)
        else:
            self.store = ShardedGradients(trainable, dtypes, self.switches, self.label,
                                          self.handles, masters)
        self.reducer.store = self.store
        if stage == 3:
            self.params = UnitGatherer(model, units, self.reducer, self.store, dtypes, masters,
                                       self.switches, group, stats, self.label,
                                       reshard_after_forward, self.handles)
            self.reducer.gatherer = self.params
        else:
            reducer = self.reducer
            self.params = WholeParameters(buckets, lambda: reducer.buckets, masters, group, stats,
                                          self.label)
            # Note [memory replaced inside a forward]; held weakly: the parameters hold
            # the reducer (Note [no reference cycles])
            self.reducer.at_backward_start = WeakHook(self._check_parameters_at_backward)
            # Note [the optimizer's own tensors written after a step]
            self.handles.append(model.register_forward_pre_hook(
                EagerOnlyHook(self.params.refuse_shards_written_since_step)))
        # Note [no reference cycles]: a stage that goes away takes its hooks with it.
        weakref.finalize(self, remove_handles, self.handles).atexit = False
        weakref.finalize(self, setattr, self.switches, "freed", True).atexit = False

    @property
    def buckets(self) -> list[FlatBucket]:
        """The trainable buckets, in the order their reductions launch."""
        return self.reducer.buckets

    # -- before the shards are used ---------------------------------------------------

    def wait_in_flight(self) -> None:
        self.reducer.wait_in_flight()

    def refuse_local_gradients(self, action: str) -> None:
        """Before a step or clipping, on every rank alike (no collective yet): the last
        backward ran inside ``no_sync()``, so the gradient shards lack what it
        accumulated, which no rank has reduced."""
        if self.reducer.local_only:
            raise RuntimeError(
                f"zeroshard: {action} after a backward inside `opt.no_sync()` with no backward "
                "outside it since: the gradients accumulated there are each rank's own, not yet "
                "reduced across ranks, so the optimizer's gradient shards do not hold them. Run "
                "the last micro-batch's backward outside `with opt.no_sync():` (that backward "
                "reduces everything accumulated since zero_grad(), as with DDP), or call "
                "opt.zero_grad() to drop them (model.zero_grad() clears .grad, but only "
                "opt.zero_grad() tells every rank alike that the window was dropped)")

    def refuse_abandoned_backward(self, action: str) -> None:
        """Note [a backward that raised] in _reducer.py: on every rank that raised in it
        (no collective yet)."""
        if self.reducer.backward_abandoned:
            raise abandoned_backward_refusal(action)

    def refuse_abandoned_backward_before_forward(self, module, args) -> None:
        self.refuse_abandoned_backward("a forward of the model")

    def claim_gradients(self) -> None:
        """The gradient shards are about to be used (step, clipping): apply what was done
        to ``p.grad`` since backward (Note [gradient markers])."""
        self.store.claim_gradients()

    def scale_local_gradients(self, factor: torch.Tensor) -> None:
        """Clipping scaled the gradient shards by ``factor`` (stage 1 keeps local
        gradients that the next backward reduces again)."""
        self.store.scale_local_gradients(factor)

    def is_gradient_marker(self, tensor: torch.Tensor) -> bool:
        return self.store.is_gradient_marker(tensor)

    def zero_grad(self, set_to_none: bool) -> None:
        self.reducer.end_abandoned_backward()  # Note [a backward that raised] in _reducer.py
        self.reducer.wait_in_flight()
        self.store.zero_grad(set_to_none)
        self.reducer.local_only = False

    # -- parameters -------------------------------------------------------------------

    def _check_parameters_at_backward(self) -> None:
        """Stages 1-2, as each backward begins: Note [memory replaced inside a forward].
        Inside ``summon_full_params(full_precision=True)`` the parameters show the fp32
        masters, which zeroshard itself put there: the refusal says so, where it blamed a
        ``p.data = t`` of the user's (a reviewer's probe)."""
        self.params.refuse_masters_written("backward")
        try:
            self.params.check_before_step()
        except RuntimeError as error:
            if not self.switches.summoned:
                raise
            raise RuntimeError(
                "zeroshard: a backward inside `with opt.summon_full_params(full_precision=True):`"
                ", where the parameters show their fp32 masters, not the memory the optimizer "
                "reduces and steps; run the forward and backward outside the block") from error

    def check_before_step(self) -> None:
        """Before a step, on every rank alike (no collective): what the stage's parameters
        need for it (the storage the step writes to; stage 3: as many steps on every rank)."""
        self.params.check_before_step()

    def after_step(self) -> None:
        """The inner optimizer has updated the shards: make the parameters follow."""
        self.params.after_step()

    def follow_shards(self) -> None:
        """The shards changed outside a step (Note [a mode switch of the optimizer] in
        optimizer.py): the parameters follow as after one, which is not counted as one."""
        self.params.follow_shards()

    def unshard(self) -> None:
        """Make every parameter hold its full value for good (``close()``)."""
        self.params.unshard()

    def summon_full_params(self):
        return self.params.summon_full_params()

    def keep_writes_made_inside(self) -> None:
        """Inside ``summon_full_params()``: the writes made so far reach the shards and
        masters (stage 3; stages 1-2 write the shards themselves)."""
        keep = getattr(self.params, "keep_writes_made_inside", None)
        if keep is not None:
            keep()

    def reading_structure(self):
        """``model.state_dict(keep_vars=True)`` inside reads names and objects, not values."""
        return self.params.reading_structure()

    # -- memory_report() --------------------------------------------------------------

    def parameter_tensors(self) -> list[torch.Tensor]:
        """Parameter storage beyond the model's own parameters."""
        return self.params.parameter_tensors()

    def master_tensors(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps."""
        return self.params.master_tensors()

    def gradient_tensors(self) -> list[torch.Tensor]:
        """Every gradient tensor this stage keeps alive."""
        return self.store.gradient_tensors()

    def remove_hooks(self) -> None:
        remove_handles(self.handles)
        self.store.drop()


class WholeParameters:
    """Stages 1 and 2: every rank keeps every parameter whole; after a step each bucket's
    updated shard is all-gathered into its flat buffer."""

    def __init__(self, buckets: list[FlatBucket], launch_order, masters: ShardMasters, group,
                 stats: _comm.CommStats, label: str) -> None:
        self.buckets = buckets
        self.launch_order = launch_order  # () -> the reducer's launch list, as it is now
        self.masters = masters
        self.group = group
        self.stats = stats
        self.label = label

    def check_before_step(self) -> None:
        """The parameters are views of their buckets' flat buffers, which the step's
        all-gathers fill. One whose storage was replaced (``p.data = t``,
        ``model.to(dtype)`` or ``model.double()`` after construction) would silently stop
        training, where DDP would train the new tensor: refused, naming the parameter.

        Note [memory replaced inside a forward]: also as each backward begins
        (``GradientReducer.at_backward_start``). A module whose own forward converts
        itself (HF SwitchTransformers' router: ``self.classifier =
        self.classifier.to(router_dtype)``, every forward) replaces its parameters'
        memory there, in a model of another dtype or under a policy; its gradients then
        came in that dtype, and backward failed in the reduction with torch's raw
        "attempting to assign a gradient with dtype ..." (a helper's probe, stages 1 and
        2). The same check, a pointer compare per parameter, refuses it before any
        collective, naming the parameter, on every rank (every rank runs the forward)."""
        for bucket in self.buckets:
            storage = bucket.flat.untyped_storage()._cdata
            for name, param in zip(bucket.param_names, bucket.params):
                if param.untyped_storage()._cdata != storage:
                    raise RuntimeError(
                        f"zeroshard: parameter {name!r} no longer holds the memory ZeroOptimizer "
                        "shards and steps (its .data was replaced after the optimizer was built: "
                        "p.data = t, model.to(dtype), model.double(), or a module's forward "
                        "converting itself, self.layer = self.layer.to(dtype)); the step would "
                        "not reach it. Write new values in place (p.data.copy_(t), "
                        "model.load_state_dict), keep a module that converts itself in the dtype "
                        "it converts to, or opt.close() and build a new ZeroOptimizer over the "
                        "changed model")

    def follow_shards(self) -> None:
        self.after_step()

    def after_step(self) -> None:
        launch_order = self.launch_order()
        self.gather(launch_order)
        # The gathers write the flat buffers, whose version counter the parameters (bound
        # by .data) do not share: move theirs as torch's in-place step would, so that a
        # graph built before the step and backwarded after it raises torch's error, as
        # under DDP (it mixed old activations with new weights, silently).
        increment_version([p for bucket in launch_order for p in bucket.params])
        for bucket in self.buckets:  # Note [masters written between steps] in _masters.py
            self.masters.note_parameters_follow(bucket)

    def refuse_shards_written_since_step(self, module, args) -> None:
        """Note [the optimizer's own tensors written after a step]:
            Without mixed precision (and for the modules a policy keeps in full
            precision, BatchNorm) the tensors in ``opt.param_groups`` at stages 1 and 2
            are each rank's shard: its slice of the parameters' flat buffers. A write to
            them outside the step (a Lookahead or SWA wrapper copying its slow weights
            in, a weight decay applied by hand over ``opt.param_groups``) reached only
            this rank's slice of its parameters, the other slices following at the next
            step's all-gather: the forward and backward in between ran each rank on a
            different model, with no error (a helper's probes: 4e-2 from data parallel
            after a decay by 0.9 each step, 1e-2 with Lookahead). With a policy they are
            the fp32 masters, and such a write reached no parameter until the next step:
            the forward in between ran on the model before it (helper-110's probe: SAM's
            perturbation written there changed nothing, bitwise the run without it, at
            every stage). The next forward, and every one after until a step, refuses
            either, on every rank that wrote, before any collective (Note [masters
            written between steps] in _masters.py says how a write is told). Not seen:
            a write through the tensors' ``.data`` (``p.data.copy_(slow)``), which moves
            no version counter (Note [masters written through .data] in _masters.py says
            why no content check stands in here), and any under ``torch.compile`` (the
            check is not traced: ``EagerOnlyHook``). A write between a forward and its
            backward is refused as the backward begins (torch raises its in-place error
            there under DDP; it ran, silently, 0.086 off in the gradient norm:
            helper-112)."""
        self.refuse_masters_written("forward")

    def refuse_masters_written(self, where: str) -> None:
        """Note [the optimizer's own tensors written after a step], as a ``where``
        ("forward", "backward") begins."""
        written = next((bucket for bucket in self.buckets
                        if self.masters.written_since_parameters_followed(bucket)), None)
        if written is None:
            return
        after_its_forward = (" (its forward ran before the write, where torch raises its "
                             "in-place error under DDP)") if where == "backward" else ""
        raise RuntimeError(
            f"zeroshard: {written.held_by()} was written outside opt.step() (through "
            "opt.param_groups, after the last step or before the first: a Lookahead or SWA "
            "wrapper, a weight decay or SAM's perturbation applied by hand, a schedule-free "
            "optimizer's train() / eval() called on the inner optimizer: call opt.train() / "
            "opt.eval() instead). At stages 1 and 2 those tensors are this rank's shard of the "
            "parameters (or, with a MixedPrecision policy, its fp32 copy), so until the next "
            "step the parameters the ranks run do not all hold the write, and this "
            f"{where} would not run the model DDP would{after_its_forward}. Make the write "
            "part of the step: an optimizer class whose step() does it (a subclass of the inner "
            "optimizer), passed as ZeroOptimizer's optimizer_class, "
            "writes the shards before the step's all-gather spreads them; or write the model's "
            "parameters, the same on every rank, as under DDP (with a policy inside `with "
            "opt.summon_full_params(full_precision=True):`, which keeps fp32 values). A write "
            "made from the reduced gradients (SAM), which only the shards hold, works at stage "
            "3, whose forwards gather the shards (Note [the optimizer's own tensors written "
            "after a step] in zeroshard/_stage.py)")

    def gather(self, launch_order: list[FlatBucket]) -> None:
        """All-gather each bucket's updated shard into its flat buffer (the parameters), in
        forward order (the launch order reversed), at most GATHERS_IN_FLIGHT at once: a
        collective's temporaries (Note [collectives on gloo]) stay a bucket's, not the
        model's."""
        in_flight: collections.deque = collections.deque()
        for bucket in reversed(launch_order):
            if len(in_flight) == GATHERS_IN_FLIGHT:
                _comm.wait(in_flight.popleft())
            in_flight.append(_comm.all_gather(bucket.flat, bucket.shard, group=self.group,
                                              stats=self.stats, label=self.label, async_op=True))
        _comm.wait_all(in_flight)

    def unshard(self) -> None:
        """Parameters are always whole here."""

    @contextlib.contextmanager
    def summon_full_params(self):
        """Nothing to gather; with mixed precision, writes made inside are copied into the
        fp32 masters on exit."""
        try:
            yield
        finally:
            with torch.no_grad():
                self.masters.absorb_outside_writes(self.buckets)

    def reading_structure(self):
        return contextlib.nullcontext()

    def parameter_tensors(self) -> list[torch.Tensor]:
        return []

    def master_tensors(self) -> list[torch.Tensor]:
        return [b.master for b in self.buckets]
