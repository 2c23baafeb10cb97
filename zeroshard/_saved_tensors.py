"""What a stage-3 unit's forward saves for backward: the saved-tensor hooks that
gather a released unit before backward uses its parameters, and refuse a forward
that computed with another unit's released parameters.

Note [saved tensors]:
    Backward gathers a unit when a tensor its forward returned gets its gradient,
    which needs the forward hook to find those tensors: it looks inside tuples,
    lists and dicts, not inside a dataclass or any other object. So during each
    unit's training forward a pair of saved-tensor hooks is active too: when backward
    unpacks a view of the unit's own parameters that forward saved (a weight for a
    matmul's input gradient), the unit is gathered first if it is not already.
    Backward reads parameters only through such saved views, so it never computes
    with a released unit's placeholders, whatever the unit returns. An activation the
    unit saved needs no gather (gathering for one gathered again a unit released
    once its gradients were done: one all-gather too many, found by the thorough
    profile). The hooks cost one Python call per saved tensor on save and on use.
    Autograd checks no version of a tensor saved through such hooks, so they check the
    activations' themselves (``SavedActivation``): an in-place write between forward
    and backward (``x.mul_(2)`` on an input) raises torch's error, as under DDP, where
    it went into the gradients silently. Inside another
    pair of saved-tensor hooks (non-reentrant activation checkpointing, offloading)
    none are added: those must see every tensor saved inside them, and a checkpointed
    unit is gathered by its recomputation (Note [recomputation] in stage3.py).

Note [a graph from before the step]:
    A graph built before ``opt.step()`` and backwarded after it (a loss kept across
    the step; a GAN's generator loss computed through the discriminator before the
    discriminator's step) pairs the old weights' activations with the new weights.
    Torch refuses it: the step's in-place writes move the parameters' versions, and
    backward finds a saved weight at another version than it was saved at. Stages 1-2
    move the versions after their gathers (``WholeParameters.after_step``). Stage 3
    saves views of its units' parameters through these hooks, which autograd does not
    version-check, and backward gathers the unit again from the stepped shards: so
    each saved view (and cast) records how many steps its bucket had taken
    (``FlatBucket.steps_taken``, counted for trainable buckets only, as a step leaves
    frozen parameters alone), and unpacking it after another step raises torch's
    error. Before, every stage ran such a backward silently (a helper's probe: a
    gradient norm 0.9% off that of either the old or the new weights). One case raises
    where torch does not: under autocast torch saves the casts it made, which the step
    leaves as they were, and runs on them; stage 3 saves how to cast (Note [autocast
    casts]) and cannot make the old cast again, so it refuses (before, it cast the new
    weights: 1.8e-3 off a reference averaging by hand, a reviewer's probe).

Note [autocast casts]:
    Under ``torch.autocast`` without a MixedPrecision policy, each op casts the
    parameters it uses (fp32 -> bf16), and what the op saves for backward is that
    cast. Kept as they are, those casts would hold a low-precision copy of every
    unit's parameters from forward until backward, and the sharding of parameters
    would be lost there. So the unit's saved-tensor hooks (Note [saved tensors]) save
    a cast of one of the unit's own parameters as a recipe instead (the parameter,
    the dtype and the view's geometry): backward gathers the unit and casts again,
    which gives the same values because the shards do not change between forward
    and backward. A cast is recognised by its autograd history (a copy of the
    parameter's AccumulateGrad leaf), so casts of frozen parameters, which have none,
    are saved as they are: a model with large frozen parts (LoRA) should use a policy.
    Autocast's own cache is left alone: it keeps one cast of each parameter until the
    autocast region ends, so during the forward the casts of every unit run so far
    are alive (a policy avoids that too), but a parameter used twice shares one cast
    whose gradients add up in low precision, as under DDP; emptying the cache after
    each unit gave each use its own cast, and gradients 2e-4 off DDP's in bf16.
"""

from __future__ import annotations

import weakref

import torch

from ._unit import Unit


class SavedTensorWatches:
    """The saved-tensor hook pairs open for units' forwards, and what the hooks check
    and save. ``gather`` (a ``WeakHook``) gathers a unit whose saved parameters
    backward is about to use (``UnitGatherer.gather_for_saved_tensor``)."""

    def __init__(self, units: list[Unit], unit_of: dict[int, Unit], gathered: dict[int, Unit],
                 gather, all_read) -> None:
        self._unit_of = unit_of
        self._gathered = gathered  # address of a gathered buffer's storage -> its unit
        self._gather = gather
        self._all_read = all_read  # Note [released once backward has read it] in stage3.py
        self._open: list[tuple[Unit, object]] = []  # (unit, hook pair), innermost last
        # a released parameter's storage is its bucket's placeholders
        self._placeholder_owner = {b.placeholders.untyped_storage().data_ptr(): (u, b)
                                   for u in units for b in u.buckets}

    def open(self, unit: Unit) -> None:
        """Open ``unit``'s saved-tensor hooks for its forward (with grad enabled, and not
        inside another pair of saved-tensor hooks)."""
        if torch.is_grad_enabled() and may_watch_saved_tensors():
            watch = SavedTensorWatch(self, unit)
            hooks = torch.autograd.graph.saved_tensors_hooks(watch.pack, watch.unpack)
            hooks.__enter__()
            self._open.append((unit, hooks))

    def close(self, unit: Unit | None) -> None:
        """Close the saved-tensor hooks opened for ``unit`` (and any opened inside it and
        left open by a forward that raised); None closes every pair."""
        if unit is not None and all(u is not unit for u, _ in self._open):
            return
        while self._open:
            opened_for, hooks = self._open.pop()
            hooks.__exit__(None, None, None)
            if opened_for is unit:
                return

    def gather(self, unit: Unit) -> None:
        self._gather(unit)

    def saved_by(self, unit: Unit, tensor: torch.Tensor, storage: int) -> SavedView | None:
        """``unit``'s forward saves ``tensor``: a ``SavedParameter`` if it views the unit's
        own gathered parameters, a ``SavedView`` if another unit's (its own forward having
        ended, or an inner unit's forward using them: saved as it is, checked for a step,
        Note [a graph from before the step], and that unit is never again released before
        its gradients are done, Note [released once backward has read it] in stage3.py),
        else None."""
        owner = self._gathered.get(storage)
        if owner is None:
            return None
        owner.note_backward_may_read()  # Note [frozen units backward never reads] in _walk.py
        if owner is not unit:
            owner.saved_by_another_unit = True
            return SavedView(tensor.detach(), _bucket_at(owner, storage), owner)
        saved = SavedParameter(tensor.detach(), _bucket_at(owner, storage), owner)
        unit.saved_unread.add(saved)
        return saved

    def read(self, unit: Unit, saved: SavedParameter | Recast) -> None:
        """Backward reads ``saved`` (a view or a cast of ``unit``'s parameters, which its
        forward saved); the first read of the last one not read yet tells the stage
        (Note [released once backward has read it] in stage3.py)."""
        if saved in unit.saved_unread:
            unit.saved_unread.discard(saved)
            if not unit.saved_unread:
                self._all_read(unit)

    def check_saved_parameter(self, unit: Unit, tensor: torch.Tensor, storage: int) -> None:
        """``unit``'s forward saves ``tensor`` (its storage at address
        ``storage``) for backward. If it is (a view of) a released unit's placeholder (a
        weight tied functionally, ``F.linear(h, self.emb.weight)`` with ``emb`` a unit of
        its own), the forward has just computed with NaN: refuse, on every rank alike."""
        owner = self._placeholder_owner.get(storage)
        if owner is None:
            return
        released, bucket = owner
        # parameter i's placeholder is element i of the bucket's placeholders, expanded
        name = bucket.param_names[tensor.storage_offset()]
        raise RuntimeError(
            f"zeroshard stage 3: the forward of unit {unit.name} used parameter {name!r}, "
            f"which belongs to unit {released.name} and is released outside that unit's "
            "forward (a weight tied functionally, such as F.linear(h, self.emb.weight); or "
            "a forward pre-hook registered with prepend=True after the ZeroOptimizer, which "
            "runs before the unit's gather: register it without prepend), so it computed "
            "with a NaN placeholder. Choose units so that the module using a "
            "parameter holds it or is an ancestor of its unit: pass units= without "
            f"{type(released.module).__name__} (e.g. the block class), or tie the weight "
            "by assignment (head.weight = emb.weight) before building the ZeroOptimizer (a tie "
            "made after it is not seen: opt.close(), tie, and build a new one)")

    def recast_of(self, unit: Unit, tensor: torch.Tensor) -> Recast | None:
        """Note [autocast casts]: a recipe for ``tensor`` if it is (a view of) a cast of one
        of ``unit``'s own parameters, else None."""
        cast = tensor if tensor._base is None else tensor._base
        node = cast.grad_fn
        if node is None or node.name() != "ToCopyBackward0":
            return None
        source = node.next_functions[0][0]
        param = getattr(source, "variable", None)  # an AccumulateGrad node: a leaf's cast
        if param is None or self._unit_of.get(id(param)) is not unit:
            return None
        bucket = next(b for b in unit.buckets if any(p is param for p in b.params))
        return Recast(param, cast.dtype, tensor.shape, tensor.stride(), tensor.storage_offset(),
                      bucket)


class SavedTensorWatch:
    """The saved-tensor hooks of one unit's forward (Note [saved tensors]). Holds the
    stage's watches weakly (Note [no reference cycles] in _hooks.py); once they are
    gone, packing and unpacking do nothing."""

    def __init__(self, stage: SavedTensorWatches, unit: Unit) -> None:
        self._stage = weakref.ref(stage)
        self._unit = unit

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | SavedActivation | SavedView | Recast:
        stage = self._stage()
        if stage is not None:
            try:
                storage = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # sparse, nested: not a parameter
                storage = None
            if storage is not None:
                stage.check_saved_parameter(self._unit, tensor, storage)
            recast = stage.recast_of(self._unit, tensor)  # Note [autocast casts]
            if recast is not None:
                self._unit.saved_unread.add(recast)  # backward reads the parameter for it
                self._unit.note_backward_may_read()
                return recast
            saved = None if storage is None else stage.saved_by(self._unit, tensor, storage)
            if saved is not None:
                return saved  # a unit's parameters (this unit's: gathered when used)
            return SavedActivation(tensor.detach())
        # Not the tensor itself: a saved output would then hold its own autograd node, a
        # reference cycle keeping a forward's activations until the garbage collector runs
        return tensor.detach()

    def unpack(self, packed: torch.Tensor | SavedActivation | SavedView | Recast
               ) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, SavedActivation):  # it needs no gather
            return packed.unpack()
        stage = self._stage()
        if type(packed) is SavedView:  # another unit's (Note [another unit's parameters saved])
            if stage is not None:
                stage.gather(packed.owner)
            return packed.unstepped()
        if stage is not None:
            stage.gather(self._unit)
            stage.read(self._unit, packed)
        return packed.rebuild() if isinstance(packed, Recast) else packed.unstepped()


class SavedActivation:
    """A tensor a unit's forward saved that is not its parameters' (Note [saved tensors]),
    with its version then: autograd checks no version of what saved-tensor hooks save, so
    an in-place write between forward and backward (``x.mul_(2)`` on an input) would
    otherwise go into the gradients silently where DDP raises torch's error."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # a detached alias: it shares the version counter
        self.version = _version(tensor)

    def unpack(self) -> torch.Tensor:
        now = _version(self.tensor)
        if now != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by "
                f"an inplace operation: [{self.tensor.type()} {list(self.tensor.shape)}] is at "
                f"version {now}; expected version {self.version} instead (saved by a "
                "zeroshard stage-3 unit's forward; torch raises the same without zeroshard). "
                "Write to a clone of the tensor instead, or make the change before the "
                "forward")
        return self.tensor


def _version(tensor: torch.Tensor) -> int | None:
    """``tensor._version``; None for a tensor that keeps none (an inference tensor)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class StepCheck:
    """What a saved view of a bucket's parameters (or a cast of one) checks when backward
    unpacks it: that no step has changed the bucket since (Note [a graph from before the
    step])."""

    def __init__(self, bucket) -> None:
        self.bucket = bucket
        self.steps_taken = bucket.steps_taken

    def check_unstepped(self, what: str, as_torch: str) -> None:
        """``what`` was saved; ``as_torch``: what torch does in its place."""
        if self.bucket.steps_taken != self.steps_taken:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: {what} saved by the forward of this graph was changed by "
                f"opt.step() since ({self.bucket.steps_taken - self.steps_taken} step(s) "
                f"later; {as_torch}). Backward through a graph before the step that changes "
                "its parameters: compute the loss again after the step, or detach what "
                "another model's step changes (a GAN's discriminator)")


class SavedView(StepCheck):
    """A saved view of ``owner``'s gathered parameters, checked for a step when unpacked.

    Note [another unit's parameters saved]:
        A module may compute with a unit's parameters outside that unit's forward while
        the unit is still gathered: a parent calling the unit and then reading its weight
        (peft's DoRA: ``base_layer(x)``, then ``F.linear(x, base_layer.weight)``) before
        the walk moves on, or an inner unit's forward using its ancestor's parameters.
        Its forward saves a view of them. Once backward has gathered the owner, it is
        kept gathered until its gradients are done (Note [released once backward has
        read it] in stage3.py); but the forward may release it before (resharding after
        forward), and backward may reach the view before the owner's own outputs: the
        view then had no memory under it, and backward failed with torch's raw
        "setStorage ... out of bounds for storage of size 0" (a helper's probe, DoRA
        with automatic units). So unpacking it gathers the owner first, as a unit's own
        saved parameters are gathered (every rank runs the same backward, so every rank
        gathers it there)."""

    def __init__(self, tensor: torch.Tensor, bucket, owner: Unit | None = None) -> None:
        super().__init__(bucket)
        self.tensor = tensor
        self.owner = owner

    def unstepped(self) -> torch.Tensor:
        self.check_unstepped(f"[{self.tensor.type()} {list(self.tensor.shape)}], a view of "
                             "a zeroshard stage-3 unit's parameters",
                             "torch and DDP raise the same")
        return self.tensor


class SavedParameter(SavedView):
    """A saved view of a unit's own parameters (Note [saved tensors]): the unit must be
    gathered before backward uses it. Activations the unit saved need no gather: a unit
    released once its gradients were done is not gathered again for one."""


class Recast(StepCheck):
    """A saved cast of a parameter, kept as how to make it again (Note [autocast casts])."""

    def __init__(self, param: torch.Tensor, dtype: torch.dtype, shape, stride, offset: int,
                 bucket) -> None:
        super().__init__(bucket)
        self.param, self.dtype = param, dtype
        self.shape, self.stride, self.offset = shape, stride, offset

    def rebuild(self) -> torch.Tensor:
        self.check_unstepped(f"a {self.dtype} cast of a zeroshard stage-3 parameter "
                             f"{list(self.param.shape)}",
                             "under autocast torch keeps the cast it made and runs on the "
                             "old weights' cast; stage 3 keeps how to make the cast, not the "
                             "cast, and cannot make the old one again")
        with torch.no_grad():
            cast = self.param.to(self.dtype)
        return cast.as_strided(self.shape, self.stride, self.offset)


def _bucket_at(unit: Unit, storage: int):
    """The bucket of ``unit`` whose gathered buffer is the storage at address ``storage``."""
    return next(b for b in unit.buckets if b.flat.untyped_storage().data_ptr() == storage)


def may_recompute_in_backward() -> bool:
    """A module runs inside a training forward as activation checkpointing runs it, so
    backward may run it again: reentrant checkpointing runs it without grad,
    non-reentrant under its own saved-tensor hooks. Also true, and taken alike, under
    another pair of saved-tensor hooks (offloading) or in a no_grad region of the
    forward (a frozen teacher): that only keeps units gathered longer."""
    return not torch.is_grad_enabled() or not may_watch_saved_tensors()


def may_watch_saved_tensors() -> bool:
    """No saved-tensor hooks are active, or only a unit's own (Note [saved tensors])."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is None or isinstance(getattr(top[0], "__self__", None), SavedTensorWatch)
