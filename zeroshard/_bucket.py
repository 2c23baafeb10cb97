"""FlatBucket: parameters that communicate together.

A bucket owns one flat buffer (1-D, padded to a multiple of the world size) and
turns its parameters into views of it, so the same ``nn.Parameter`` objects stay in
the model (user code, tied weights and ``named_parameters()`` keep working) while
one collective moves all of them at once. ``shard`` is this rank's slice of the
buffer, what the all-gather sends. ``master`` is the tensor the inner optimizer
steps on: the shard itself, or with mixed precision an fp32 copy of it (the
parameters and the shard then hold the low-precision cast); _masters.py chooses
and keeps it, so the bucket holds layout, views and storage only.

Note [memory order]: a parameter keeps its strides (its memory format). The buffer
holds each parameter's elements in the order they lie in its memory, outermost dim
first: ``memory_order`` is that dim order (``(0, 2, 3, 1)`` for a ``channels_last``
conv weight, the identity for a row-major one and for any tensor that is not dense
and non-overlapping, which becomes row-major), and ``param_view`` permutes the
stored run back, so the view has the parameter's shape *and* strides: a
``channels_last`` weight stays ``channels_last`` (no layout conversion per call),
and gradient buffers, gathers and exports through ``param_view`` keep it too.
Everything that indexes "the flattened parameter" by ranges (``Overlap``,
checkpoint pieces, load sources) means this memory order. Values that come in
logical shape (``model.load_state_dict``, full state dicts, safetensors) are put
in it with ``to_memory_order``; a checkpoint records each parameter's order and
one saved in another order is moved to this one on load (checkpoint.py). All
ranks must hold a parameter in one order (a collective moves whole buffers):
``ZeroOptimizer`` checks that once at construction, as DDP checks strides.
Stage-3 placeholders are stride-0 expansions (Note [stage-3 placeholders]):
their shape is right, their strides are not the parameter's; gathered, it has
its strides back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import _comm, _released
from ._gradient_shards import as_gradient_shard
from ._hooks import LoopSwitches
from ._layout import FlatLayout, assign_owners
from ._materialize import placeholder_value, swap_in

_GRAD_DTYPE_SETTABLE = hasattr(torch.Tensor, "grad_dtype")
storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # tensors on a storage


def memory_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s dims from outermost to innermost in memory (Note [memory order])."""
    identity = tuple(range(tensor.dim()))
    if tensor.is_contiguous():  # also settles size-1 dims, whose strides say nothing
        return identity
    order = tuple(sorted(identity, key=lambda dim: -tensor.stride(dim)))  # ties: dim order
    # dense and non-overlapping exactly when the permuted tensor is row-major
    return order if tensor.permute(order).is_contiguous() else identity


def to_memory_order(value: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``value`` (the parameter's shape, any strides) as 1-D, in ``order``."""
    return value.permute(order).reshape(-1)


def is_row_major(order: tuple[int, ...]) -> bool:
    """Whether a parameter held in ``order`` (``memory_order``) is held row-major."""
    return order == tuple(range(len(order)))


def from_memory_order(flat: torch.Tensor, shape, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``to_memory_order``: a view of ``flat`` with ``shape`` whose
    strides follow ``order``."""
    stored = flat.view([shape[dim] for dim in order])
    if is_row_major(order):
        return stored
    return stored.permute(sorted(range(len(order)), key=order.__getitem__))


def _with_a_version_counter_of_its_own(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor that does not share its version counter: a parameter
    built on meta and swapped in holding the view itself shared the flat buffer's, so a
    write to it (``model.load_state_dict`` after a step) moved the shard's counter and
    was refused as a write to ``opt.param_groups``' tensors, at stages 1-2 (a reviewer's
    probe; a parameter built on CPU gets ``.data = view`` and keeps its own counter)."""
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


class FlatBucket:
    """Parameters of one param group, dtype, device and ``requires_grad`` value."""

    def __init__(self, params: Sequence[nn.Parameter], group_index: int, rank: int,
                 world_size: int, full_precision: bool = False,
                 owners: tuple[int, ...] | None = None) -> None:
        first = params[0]
        assert all(p.dtype == first.dtype and p.device == first.device for p in params)
        self.params = list(params)
        self.group_index = group_index
        self.rank = rank
        # owners: each parameter whole on one rank (Note [whole-parameter ownership])
        self.layout = FlatLayout(tuple(p.numel() for p in params), world_size, owners)
        self.stepped: list[torch.Tensor] = []  # what the inner optimizer steps (set_master)
        self.orders = [memory_order(p) for p in params]  # Note [memory order]
        self.flat: torch.Tensor | None = None  # 1-D, padded to a multiple of world size (materialize)
        self.shard: torch.Tensor | None = None  # this rank's elements (materialize, place_shard)
        self.master: torch.Tensor | None = None  # what the optimizer steps (set_master)
        self.shard_owns_storage = False  # stage 3's shard is a copy (place_shard)
        self.grad_shard: torch.Tensor | None = None  # reduced gradient of `master`
        self._shown_grad: torch.Tensor | None = None  # what set_grad_shard put in master.grad
        # the loop set master.grad to None (Note [gradients the param groups show]); stage 1
        # clears its local gradients before the next backward adds to them
        self.shown_gradient_cleared = False
        self._shown_at: tuple | None = None
        # the reducer's, for GradScaler's check (Note [non-finite gradients] in _reducer.py)
        self.agree_on_non_finite = None
        self.ready: set[int] = set()  # params whose gradient arrived in this backward
        # params whose .grad was set to None since gradients were last reduced (Note [a
        # gradient cleared before the step] in _cleared.py)
        self.cleared: set[int] = set()
        # params with no optimizer state of their own in a shard that has one, until they
        # are stepped (Note [a fresh state inside a shard's] in _inner.py)
        self.without_state: set[int] = set()
        self.param_names = [f"params[{i}]" for i in range(len(self.params))]  # for messages
        self.placeholders: torch.Tensor | None = None  # stage 3 (Note [stage-3 placeholders])
        # stage 3, once built: placeholders refuse reads between passes (Note [released
        # parameters] in _released.py)
        self.released_watch: tuple[str, LoopSwitches] | None = None  # (unit's name, the stage's)
        # kept in fp32 under a mixed-precision policy (Note [full-precision modules])
        self.full_precision = full_precision
        self._versions_at_release: list[int] = []
        self._versions_at_gather: list[int] = []  # stage 3 (Note [writes inside a forward])
        self.steps_taken = 0  # stage 3 (Note [a graph from before the step] in _saved_tensors.py)

    @torch.no_grad()
    def materialize(self, device: torch.device) -> None:
        """Give the bucket its full buffer on ``device`` and make the parameters views of
        it, holding their current values. A parameter built under ``torch.device("meta")``
        has no values yet: its view holds NaN until its module is initialised in place
        (Note [one unit at a time] in _materialize.py), and it is swapped in, staying
        the same Python object (``_materialize.swap_in``)."""
        dtype = self.params[0].dtype
        self.flat = torch.zeros(self.layout.padded_numel, dtype=dtype, device=device)
        for index, param in enumerate(self.params):
            view = self.param_view(self.flat, index)
            if param.is_meta:
                view.fill_(float("nan") if view.is_floating_point() else 0)
                swap_in(param, _with_a_version_counter_of_its_own(view))
            else:
                view.copy_(param)
                param.data = view
        self.shard = self.own_slice()

    @torch.no_grad()
    def adopt_replaced_data(self, what: str = "initialising",
                            fix: str = "initialise it with the shape it was built with") -> None:
        """An init (``what``), or a write inside ``summon_full_params()``, that gave a
        parameter new ``.data`` (``p.data = torch.randn(...)``, or another parameter's)
        cut it off from its place in the buffer: the place takes the value and the
        parameter becomes a view of it again. A new shape cannot fit its place."""
        for index, param in enumerate(self.params):
            built = self.layout.numels[index]
            view = self.param_view(self.flat, index) if param.numel() == built else None
            if view is not None and param.data_ptr() == view.data_ptr() and param.stride() == view.stride():
                continue
            if view is None or param.shape != view.shape:
                raise ValueError(
                    f"{what} gave {self.param_names[index]!r} shape {tuple(param.shape)}; it was "
                    f"built with {built} elements, and a ZeroOptimizer keeps each parameter's "
                    f"shape; {fix}")
            if (param.dtype, param.device) != (view.dtype, view.device):
                # the copy below would cast it back, silently (model.double() inside
                # summon_full_params() came out fp32: a helper's probe)
                raise ValueError(
                    f"{what} gave {self.param_names[index]!r} dtype {param.dtype} on "
                    f"{param.device}; it is held as {view.dtype} on {view.device}, and a "
                    "ZeroOptimizer keeps each parameter's dtype and device. Write values with "
                    "model.load_state_dict(...) (under a MixedPrecision policy it sets the fp32 "
                    "masters exactly) or p.copy_(t), which casts; to change the model's dtype or "
                    "device, opt.close(), change the model, then build a new ZeroOptimizer")
            view.copy_(param.data)
            param.data = view

    def held_by(self) -> str:
        """For messages: "the optimizer's tensor holding parameters a, b, c, ..."."""
        names = self.param_names
        return (f"the optimizer's tensor holding parameters {', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}")

    def missing_values(self, built_on_meta: set[int]) -> list[str]:
        """Names of the parameters built on meta that still hold NaN (no init wrote them)."""
        if not self.flat.is_floating_point() or not bool(self.flat.isnan().any()):
            return []
        return [self.param_names[index] for index, param in enumerate(self.params)
                if id(param) in built_on_meta and bool(self.param_view(self.flat, index).isnan().any())]

    def param_view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s elements of ``flat`` (any buffer of this layout), shaped
        and strided like it (Note [memory order])."""
        span = self.layout.param_range(index)
        return from_memory_order(flat[span.start:span.stop], self.params[index].shape,
                                 self.orders[index])

    def own_slice(self) -> torch.Tensor:
        own = self.layout.shard_range(self.rank)
        return self.flat[own.start:own.stop]

    def cast_parameters(self, dtype: torch.dtype) -> None:
        """Make the parameters views of a new flat buffer of ``dtype`` holding their cast
        (a MixedPrecision policy's ``param_dtype``: ``_masters.Fp32Masters``). Already of
        ``dtype`` (a policy of the model's own dtype: a bf16 model given fp32 masters by a
        bf16 policy), they stay: ``to`` returned the buffer itself, which the release
        below then freed under them (construction failed with torch's raw "setStorage ...
        out of bounds", a reviewer's probe)."""
        if self.flat.dtype == dtype:
            return
        flat = self.flat.to(dtype)
        with torch.no_grad():
            for index, param in enumerate(self.params):
                param.data = self.param_view(flat, index)
        # Nothing views the old buffer now, but the broadcast's work still refers to it
        # for a while (Note [finished work] in _comm.py): free it here.
        _comm.release([self.flat])
        self.flat = flat

    def place_shard(self, own_storage: bool) -> None:
        """Set up ``shard`` from the buffer's current (broadcast) values. ``own_storage``
        (stage 3) gives the shard storage of its own, so the full buffer can be freed."""
        self.shard = self.own_slice().clone() if own_storage else self.own_slice()
        self.shard_owns_storage = own_storage

    def set_master(self, master: torch.Tensor | None) -> None:
        """What the inner optimizer steps (``_masters``): the shard, an fp32 copy of it,
        or None (a frozen bucket under a policy); and so ``stepped``."""
        self.master = master
        if master is not None:
            self.stepped = [master] if self.layout.owners is None else \
                [self._owned_view(master, index) for index in self.layout.owned(self.rank)]

    @property
    def has_separate_master(self) -> bool:
        """The optimizer steps a master of its own (fp32 beside ``param_dtype`` shards,
        under a MixedPrecision policy), not the shard itself."""
        return self.master is not None and self.master is not self.shard

    @property
    def owns_whole_parameters(self) -> bool:
        """Note [whole-parameter ownership]: the inner optimizer steps each parameter this
        rank owns whole, as a view of the master shaped like it."""
        return self.layout.owners is not None

    def _owned_view(self, shard_sized: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``, owned whole by this rank, in ``shard_sized`` (the master,
        the gradient shard, a state), shaped and strided like the parameter."""
        overlap = self.layout.overlap(index, self.rank)  # None for an empty parameter
        span = overlap.shard_span if overlap is not None else slice(0, 0)
        return from_memory_order(shard_sized[span], self.params[index].shape, self.orders[index])

    @property
    def all_ready(self) -> bool:
        return len(self.ready) == len(self.params)

    def clear_gradients_of(self, none: list[int], zeroed: list[int] = ()) -> None:
        """After backward, the ``.grad`` of parameters ``none`` was set to None and that
        of ``zeroed`` zeroed: zero their parts of the reduced gradient shard (where this
        rank holds any), and the step keeps ``none`` still (Note [a gradient cleared
        before the step] in _cleared.py), or, if every parameter's ``.grad`` was set to
        None, drop the shard, as ``opt.zero_grad()`` does, so that the step skips them
        as torch skips a None gradient."""
        self.cleared.update(none)
        if len(self.cleared) == len(self.params):  # in one call or several (clipping between)
            self.set_grad_shard(None)
            return
        if self.grad_shard is not None:
            for span in self.shard_spans([*none, *zeroed]):
                self.grad_shard[span].zero_()

    def shard_spans(self, indices) -> list[slice]:
        """Where parameters ``indices`` lie in this rank's shard (those it holds any of)."""
        return [overlap.shard_span for overlap in
                (self.layout.overlap(i, self.rank) for i in sorted(indices)) if overlap is not None]

    def set_grad_shard(self, grad: torch.Tensor | None) -> None:
        """Install the reduced gradient where the inner optimizer looks for it.

        A 2-byte gradient of an fp32 master stays 2 bytes until clipping or the step
        widens it; torch releases that check through ``grad_dtype``, and on a torch
        without it the gradient is widened here.
        """
        if grad is not None and grad.dtype != self.master.dtype:
            if _GRAD_DTYPE_SETTABLE:
                self.master.grad_dtype = None  # any dtype
            else:
                grad = grad.to(self.master.dtype)
        self.grad_shard = grad
        if grad is None:  # nothing left to keep still (Note [a gradient cleared before
            self.cleared.clear()  # the step] in _cleared.py)
        # what the param groups show: Note [a norm of a shard]
        self.master.grad = None if grad is None else as_gradient_shard(
            grad, self.param_names, self.agree_on_non_finite)
        # Note [gradients the param groups show]: what it showed, and where its values were
        self._shown_grad = self.master.grad
        self._shown_at = None if grad is None else (grad.data_ptr(), grad.shape)
        if self.owns_whole_parameters:
            for index, stepped in zip(self.layout.owned(self.rank), self.stepped):
                if grad is not None and grad.dtype != stepped.dtype and _GRAD_DTYPE_SETTABLE:
                    stepped.grad_dtype = None
                stepped.grad = None if grad is None else self._owned_view(grad, index)

    def claim_shown_gradient(self) -> None:
        """Note [gradients the param groups show]:
            ``opt.param_groups`` hold this rank's master shards, whose ``.grad`` shows the
            reduced gradient shard, and the README sends the loop there to change
            gradients. A change in place reaches the shard. But one that gives ``.grad``
            another tensor (``p.grad = p.grad.clamp(-c, c)``, noise added out of place,
            or other memory: ``p.grad.data = ...``, ``set_``) or None (a group left out
            of one step) reached only what the inner optimizer reads without a policy:
            ``opt.clip_grad_norm_`` took its norm from the old shard, and with a policy
            the step's widening to fp32 put the old shard back
            (a helper's probes: 4.8e-3 from DDP with a clip, 3.8e-2 under bf16; a group
            set to None moved by 0.12). So before clipping, a step, and a backward adding
            to the shard (stages 2-3), what ``.grad`` holds now becomes the shard: None
            drops it (the step skips it, as torch skips a None gradient), another tensor
            of its shape is taken as it is. Stage 1 computes its shard anew from its full
            local gradients at each synced backward, so there a change made before it
            does not carry over (README); a None clears the bucket's local gradients
            before the next backward adds to them, as clearing the parameters' would
            under DDP (a None set instead of ``opt.zero_grad()``, as torch's
            ``Optimizer.zero_grad`` of a wrapper around the ZeroOptimizer does, timm's
            Lookahead, fairseq's: the old local gradients were added into the next
            step's, silently, helper-103's and helper-105's probes, 7.5e-3 from DDP).
            A bucket stepped by whole parameters (Muon, Adafactor) shows its master shard
            too, and its parameters' gradients are views of what that holds: they were
            left out of this until a reviewer's probe found such a group set to None
            stepped all the same (Adafactor: 8.9e-3 moved; a wrapper's zero_grad added
            the old gradients into the next step's, 4.3e-2 from DDP)."""
        if self.master is None:
            return
        shown = self.master.grad
        if shown is self._shown_grad and (shown is None or (
                shown.data_ptr(), shown.shape) == self._shown_at):  # (``.data =`` keeps it)
            return
        if shown is None:
            self.set_grad_shard(None)
            self.shown_gradient_cleared = True
        elif shown.shape == self.master.shape:  # (another shape: the step raises, as torch's)
            self.set_grad_shard(shown.detach().as_subclass(torch.Tensor))

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    # -- stage 3: the full buffer exists only while gathered ----------------------------

    def load_shard(self) -> None:
        """Copy this rank's slice of the full buffer (written to) into the detached shard."""
        self.shard.copy_(self.own_slice())
        self.note_gathered()  # the shard holds what the buffer holds

    def note_gathered(self) -> None:
        """The full buffer holds the shards' values (a gather finished): the parameters'
        versions now, to tell a write made while gathered (``written_while_gathered``).
        A parameter's ``.data`` views the buffer, but it keeps a version counter of its own."""
        self._versions_at_gather = [param._version for param in self.params]

    def written_while_gathered(self) -> bool:
        """Note [writes inside a forward]:
            A parameter written in place while its unit is gathered (``nn.Embedding(
            max_norm=...)`` renormalises the rows it looks up, inside its forward)
            wrote to the full buffer, which release frees: before, the write was lost,
            silently. Release asks this first, and this rank's slice of the buffer goes
            to its shard (and masters): every rank keeps the writes to its own slice,
            which with the same writes on every rank (the same batch, or a write that
            does not depend on the data) is what DDP keeps, and with writes that differ
            is one model on every rank, where DDP's replicas drift apart."""
        return any(param._version != version
                   for param, version in zip(self.params, self._versions_at_gather))

    def adopt_data_replaced_while_gathered(self) -> bool:
        """Note [new .data inside a forward]:
            ``p.data = t`` while the unit is gathered (MoCo's reference code updates its
            key encoder so inside its forward: ``p_k.data = p_k.data * m + p_q.data * (1 -
            m)``) takes the parameter off its place in the full buffer, which its version
            counter does not show, and release made it a placeholder over the old
            values: the write was lost, silently (helper-96: MoCo's key encoder never
            moved, 1.5e-2 from DDP at stage 3). So release first asks each parameter
            whether it still views the buffer; one that does not gives its value to its
            place and views it again (``adopt_replaced_data``), and the write then goes
            to the shards as any other (Note [writes inside a forward]). Returns whether
            one did. An in-place write through ``p.data`` (``p.data.mul_(m)``) moves no
            version counter and leaves the parameter where it was: it is still lost."""
        home = self.flat.untyped_storage().data_ptr()
        if all(param.untyped_storage().data_ptr() == home for param in self.params):
            return False
        with torch.no_grad():
            self.adopt_replaced_data(
                "new .data given while its unit was gathered (p.data = t inside a forward)",
                "write values of that shape (or, to change a shape, opt.close(), change the "
                "model, then build a new ZeroOptimizer)")
        return True

    @property
    def is_gathered(self) -> bool:
        return self.flat.untyped_storage().nbytes() > 0

    def allocate(self) -> None:
        """Give the full buffer its storage back (a gather then fills it); the
        parameters stay placeholders until it is filled (``view_gathered``)."""
        self.flat.untyped_storage().resize_(self.nbytes())
        self._versions_at_release = []

    def view_gathered(self) -> None:
        """Make the parameters views of the full buffer again, once a gather has filled it.

        Note [not a view while gathering]: made views when the gather began, the
        parameters of a unit whose gather was in flight (a prefetch) read the buffer half
        filled: a module hook reading another unit's weight (block i's backward pre-hook
        reading block i-1's, the next to be gathered) read values that were neither NaN
        nor the weights (0.04 off, 8e15, inf: a helper's probes). As placeholders until
        the gather is done, they read NaN there (Note [stage-3 placeholders])."""
        with torch.no_grad():
            for index, param in enumerate(self.params):
                _released.restore(param)
                param.data = self.param_view(self.flat, index)

    def watch_released(self, unit: str, switches: LoopSwitches) -> None:
        """From now on a placeholder of unit ``unit``'s refuses reads (Note [released
        parameters] in _released.py), the ones there now too."""
        self.released_watch = unit, switches
        if not self.is_gathered:
            for index, param in enumerate(self.params):
                _released.release(param, self.param_names[index], unit, switches)

    def free(self, views_at_gather: int | None = None) -> bool:
        """Free the full buffer's storage; the parameters become placeholders. Given
        ``views_at_gather`` (``views_elsewhere()`` after a ``summon_full_params()``
        gather), a storage more tensors view now is left to them instead (Note [views
        taken inside summon_full_params]): then True.

        Note [stage-3 placeholders]: between uses a parameter is never a view of freed
        storage (reading that reads memory that is not there). It holds a placeholder
        of its own shape, dtype and device: one NaN element of its own repeated
        (stride 0), so ``numel()``, ``shape`` and ``device`` stay true. Between passes
        a read of its values or a write to them is refused where it is made (Note
        [released parameters] in _released.py); what escapes that (a write inside a
        pass, ``p.data = ...``) is found by the parameter's version counter or storage
        when the unit is next gathered, which raises then, on the ranks that wrote
        (write the same on every rank). Autograd's saved references are the same
        parameter objects, so backward sees the gathered values again.
        """
        self._versions_at_gather = []
        if self.placeholders is None:
            self.placeholders = torch.empty(len(self.params), dtype=self.flat.dtype,
                                            device=self.flat.device)
        # again: a write through .data may have changed it
        self.placeholders.fill_(placeholder_value(self.flat.dtype))
        for index in range(len(self.params)):
            self._become_placeholder(index)
        with torch._C.DisableTorchFunctionSubclass():
            self._versions_at_release = [param._version for param in self.params]
        if views_at_gather is not None and self.views_elsewhere() > views_at_gather:
            self._let_go_of_the_full_buffer()
            return True
        if not self.flat.untyped_storage().resizable():
            # Note [a buffer numpy has seen]: a parameter's ``.numpy()`` while it was
            # gathered (a log line's, a plot's) marks the storage not resizable for good,
            # as numpy may hold its memory; freeing it raised "Trying to resize storage
            # that is not resizable" as the unit was released (helper-131's probe). That
            # storage is left to what holds it (nothing, once the array is gone) and a
            # new one serves the next gathers.
            self._let_go_of_the_full_buffer()
            return False
        self.flat.untyped_storage().resize_(0)
        return False

    def views_elsewhere(self) -> int:
        """How many tensors besides the full buffer and the parameters are on its storage
        (what the loop took from the parameters, the last collectives' works); 0 where
        this torch cannot count them."""
        if storage_use_count is None:
            return 0
        storage = self.flat.untyped_storage()._cdata
        params = sum(1 for p in self.params if p.untyped_storage()._cdata == storage)
        return storage_use_count(storage) - 1 - params

    def _let_go_of_the_full_buffer(self) -> None:
        """Note [views taken inside summon_full_params]:
            ``with opt.summon_full_params(): sd = model.state_dict()``, then
            ``torch.save(sd, path)`` after the block, as a DDP loop saves: the block's
            end emptied the storage the state dict's tensors view, so torch.save wrote a
            file torch.load refuses ("Trying to resize storage that is not resizable"),
            silently, and reading a tensor was a segmentation fault or, once the next
            gather regrew the storage, whatever it held then (helper-127; FSDP1 and
            FSDP2 free theirs alike). Where the block's end finds more tensors on a
            unit's storage than after its gather, it leaves that storage to them and
            takes a new one for the next gathers: they keep the values the block ended
            with (a save right after the block writes what DDP's would; under DDP they
            would follow later steps too), and their memory is freed when they are,
            which a warning says once. The count after the gather is taken once the
            finished gathers' works are let go of: they hold views of the buffers until
            later waits drop them, so a collective inside the block (``full_state_dict()``,
            a ``full_precision=True`` block's gathers) lowered the count at its end and
            hid a state dict from a first version (helper-129). Autograd's saved
            tensors are never counted here (the block refuses a forward with grad
            enabled, and one from before it was on the storage at the gather too)."""
        flat = torch.empty_like(self.flat)
        flat.untyped_storage().resize_(0)
        self.flat = flat

    @torch.no_grad()
    def _become_placeholder(self, index: int) -> None:
        param = self.params[index]
        with torch._C.DisableTorchFunctionSubclass():  # a released one's class reads nothing
            param.data = self.placeholders[index].expand(param.shape)
        if self.released_watch is not None:
            _released.release(param, self.param_names[index], *self.released_watch)

    def refuse_writes_while_released(self) -> None:
        """Before a gather: a parameter written (in place, or given new ``.data``) while
        released would silently lose the write; raise instead, once per write (the
        parameter is a placeholder again afterwards). Host-side checks only. An
        in-place write through ``p.data`` cannot be seen (it has its own version)."""
        if not self._versions_at_release:
            return  # gathered
        home = self.placeholders.untyped_storage().data_ptr()
        with torch._C.DisableTorchFunctionSubclass():  # released ones read nothing here
            written = [index for index, param in enumerate(self.params)
                       if param._version != self._versions_at_release[index]
                       or param.untyped_storage().data_ptr() != home]
            converted = [(self.param_names[index], self.params[index].dtype,
                          self.params[index].device) for index in written
                         if (self.params[index].dtype, self.params[index].device)
                         != (self.placeholders.dtype, self.placeholders.device)]
        if not written:
            return
        for index in written:
            self._become_placeholder(index)
        self._versions_at_release = [param._version for param in self.params]
        names = ", ".join(repr(self.param_names[index]) for index in written)
        if converted:  # model.double() after the optimizer was built (helper-91)
            stepped = self.master.dtype if self.master is not None else self.placeholders.dtype
            raise RuntimeError(
                f"zeroshard stage 3: parameter{'s' if len(converted) > 1 else ''} " + ", ".join(
                    f"{name!r} (to {dtype} on {device})" for name, dtype, device in converted)
                + f" {'were' if len(converted) > 1 else 'was'} converted after the "
                "ZeroOptimizer was built (model.to(dtype), "
                f"model.double(), .half()), so the conversion is lost: the optimizer holds "
                f"them as {self.placeholders.dtype} on {self.placeholders.device} and steps "
                f"{stepped}. Build the model in the dtype and on the device it trains in "
                "before the ZeroOptimizer (to compute in low precision: mixed_precision=; to "
                "see the full-precision values: summon_full_params(full_precision=True)), "
                "or opt.close(), convert the model and build a new ZeroOptimizer")
        raise RuntimeError(
            f"stage-3 parameter {names} was written while its unit was released (between "
            "forward passes it holds a NaN placeholder, Note [stage-3 placeholders] in "
            "zeroshard/_bucket.py), so the write is lost; write parameters inside "
            "`with opt.summon_full_params():` on every rank. A forward that registers a "
            "parametrization on them (torch.nn.utils.parametrize, as peft's "
            "target_parameters does on MoE experts before each call) writes them too: "
            "choose units= a module that holds both the registering module and this one "
            "(the decoder layer class)")


class Ownership:
    """Chooses the owners of each whole-parameter bucket, in the order the buckets are
    built, carrying each rank's work from bucket to bucket (``assign_owners``; Note
    [whole-parameter ownership] in _layout.py). ``costs`` maps the index of each
    group stepped whole to the cost of stepping one parameter of a shape."""

    def __init__(self, costs: dict[int, Callable[[torch.Size], float]], world_size: int) -> None:
        self.costs = costs
        self.work = (0.0,) * world_size

    def owners(self, params: Sequence[nn.Parameter], group_index: int) -> tuple[int, ...] | None:
        cost = self.costs.get(group_index)
        if cost is None or not params[0].requires_grad:  # flat; frozen: never stepped
            return None
        owners, self.work = assign_owners(tuple(p.numel() for p in params),
                                          tuple(float(cost(p.shape)) for p in params), self.work)
        return owners


def grad_shards(buckets: Sequence[FlatBucket]) -> list[torch.Tensor]:
    """The reduced gradient shards the buckets hold now."""
    return [b.grad_shard for b in buckets if b.grad_shard is not None]


def build_buckets(params: Sequence[tuple[nn.Parameter, int]], bucket_bytes: int, rank: int,
                  world_size: int, full_precision: frozenset[int] = frozenset(),
                  ownership: Ownership | None = None) -> list[FlatBucket]:
    """Group ``(parameter, group_index)`` pairs, given in model order, into buckets.

    Parameters are taken in reverse model order, roughly the order in which backward
    produces their gradients, so the first bucket is the first to become ready. Each
    (group, dtype, device) has one open bucket. When adding a parameter would take
    its bucket past ``bucket_bytes``, every open bucket closes, not only that one:
    buckets then hold parameters of one region of the model, and a bucket of small
    parameters (biases in their own group, say) cannot span the whole model and
    keep every bucket behind it waiting until backward ends. A parameter larger
    than ``bucket_bytes`` gets a bucket of its own. The order of the returned list,
    by each bucket's first parameter, is the fixed order in which every rank
    launches the buckets' collectives. Parameters in ``full_precision`` (ids) get
    buckets of their own (Note [full-precision modules] in mixed_precision.py).
    """
    open_buckets: dict[tuple, list[nn.Parameter]] = {}
    open_bytes: dict[tuple, int] = {}  # summed as they fill: a sum per parameter was quadratic
    ordered: list[tuple[int, list[nn.Parameter]]] = []
    for param, group_index in reversed(list(params)):
        key = (group_index, param.dtype, param.device, id(param) in full_precision)
        members = open_buckets.get(key)
        size = param.numel() * param.element_size()
        if members is not None and open_bytes[key] + size > bucket_bytes:
            open_buckets.clear()
            members = None
        if members is None:
            members = open_buckets[key] = []
            open_bytes[key] = 0
            ordered.append((group_index, members))
        members.append(param)
        open_bytes[key] += size
    ownership = ownership or Ownership({}, world_size)
    return [FlatBucket(members, group_index, rank, world_size, id(members[0]) in full_precision,
                       ownership.owners(members, group_index))
            for group_index, members in ordered]

