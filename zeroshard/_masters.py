"""What the inner optimizer steps for each bucket: its master shard, chosen once at
construction (``masters_for``).

Without a MixedPrecision policy (and for modules a policy keeps in full precision,
Note [full-precision modules]) the master *is* the shard: the optimizer steps the
parameters' own storage and there is nothing to copy (``ShardMasters``). With a
policy the parameters hold ``param_dtype`` casts and each trainable bucket keeps an
fp32 copy of its shard (``Fp32Masters``): after a step the cast goes back into the
shard, writes made to the parameters are taken into the master, and
``model.load_state_dict`` loads the master exactly. Frozen buckets are never updated
and have no master under a policy.

Both strategies answer the same calls, so the code around a step never asks which
precision it runs in.
"""

from __future__ import annotations

import torch

from ._bucket import FlatBucket, to_memory_order
from .mixed_precision import MASTER_DTYPE, MixedPrecision


class ShardMasters:
    """The master is the shard itself: but for ``place`` and the records of Note [masters
    written between steps], every call does nothing."""

    def __init__(self) -> None:
        # id(bucket) -> the master's version counter when every rank's parameters last
        # held its values (stages 1-2), and its stamp (``_stamp``) when its shard last
        # held them or its cast (stage 3's gathers read the shard): Note [masters
        # written between steps]
        self._followed: dict[int, int] = {}
        self._in_shard: dict[int, tuple] = {}

    def place(self, bucket: FlatBucket, own_storage: bool) -> None:
        """Set up ``bucket``'s shard (own storage at stage 3) and master from its buffer."""
        bucket.place_shard(own_storage)
        bucket.set_master(bucket.shard)
        self._note_in_shard(bucket)
        self.note_parameters_follow(bucket)

    def note_parameters_follow(self, bucket: FlatBucket) -> None:
        """Every rank's parameters hold the master's values (or its cast) now: the step's
        or a load's gathers ran (stages 1-2), or the master took what was written to the
        parameters."""
        if bucket.master is not None:
            self._followed[id(bucket)] = bucket.master._version

    def forget_parameters_follow(self, bucket: FlatBucket) -> None:
        """The parameters no longer hold the master's values (a full-precision block ended
        by an exception, or without its casts taking a write made to the master)."""
        if bucket.master is not None:
            self._followed[id(bucket)] = -1

    def written_since_parameters_followed(self, bucket: FlatBucket) -> bool:
        """Note [masters written between steps]:
            The tensors in ``opt.param_groups`` are the masters (the shards themselves, or
            with a policy their fp32 copies). Written outside the step (a Lookahead or SWA
            wrapper copying its slow weights in, a weight decay or SAM's perturbation
            applied by hand), they hold values the parameters the ranks run do not all
            hold until the next step's all-gather (stages 1-2: without a policy only this
            rank's slice of them has the write; with one none has, or, once a state dict
            or checkpoint took the masters' cast into the shard, this rank's slice), so
            the forwards in between ran each rank on another model, or on the model
            before the write (helper-110: SAM's perturbation was a no-op under a policy).
            Told by the master's version counter against the one taken when the
            parameters last followed it (construction, the step's gathers, zeroshard's
            own moves of the master towards the parameters): a write through the master
            moves it; one through its ``.data`` does not (stage 3 with a policy: Note
            [masters written through .data]). Stages 1-2 refuse
            the next forward and backward; stage 3's forwards gather the shards, so there
            the write reaches the next forward (with a policy through the cast
            ``before_gather`` makes first), and a backward's gather refuses it: the
            forward's activations came from the parameters before it, and torch (DDP)
            raises its in-place error there; so does a unit gathered before the write
            (inside ``summon_full_params()``, or kept from its forward for its backward),
            as a forward or backward asks for it. Not seen (helper-114): a write between
            a forward and its backward with a gather between them (an evaluation, a
            second forward), which takes the write, or a full-precision block between
            them, which spreads it: the backward mixes old activations and new weights."""
        followed = self._followed.get(id(bucket))
        return followed is not None and bucket.master._version != followed

    def _stamp(self, bucket: FlatBucket) -> tuple:
        """What tells a later write to ``bucket``'s master: its version counter, and
        (``Fp32Masters``) a print of its contents (Note [masters written through .data])."""
        return (bucket.master._version, None)

    def _written_since(self, bucket: FlatBucket, stamp: tuple | None,
                       read_contents: bool) -> bool:
        """Whether the master was written since ``stamp`` was taken: its version counter
        moved, or (``read_contents``: a read on the host) its print did."""
        if stamp is None:
            return False
        version, printed = stamp
        if bucket.master._version != version:
            return True
        return (read_contents and printed is not None
                and bool(_print_moved(printed, _master_print(bucket.master))))

    def _note_in_shard(self, bucket: FlatBucket) -> None:
        if bucket.master is not None:
            self._in_shard[id(bucket)] = self._stamp(bucket)

    def _written_since_in_shard(self, bucket: FlatBucket, read_contents: bool = True) -> bool:
        return self._written_since(bucket, self._in_shard.get(id(bucket)), read_contents)

    def before_gather(self, bucket: FlatBucket, in_backward: bool, gathered: bool) -> None:
        """Stage 3, as a unit is asked for (Note [masters written between steps]): a
        master written since its shard last held it reaches a forward's gather (its cast,
        with a policy); in a backward, or where the unit is gathered already (inside
        ``summon_full_params()``, or kept from its forward for its backward, helper-114),
        the parameters would compute without it: refused."""
        if not self._written_since_in_shard(bucket, read_contents=False):
            if not in_backward and not gathered:
                self._take_writes_through_data(bucket)
            return
        written = f"zeroshard stage 3: {bucket.held_by()} was written (through opt.param_groups) "
        if in_backward:
            raise RuntimeError(
                written + "between the forward that used them and this backward, which would "
                "compute their gradients at the new values from activations of the old (torch "
                "raises its in-place error there under DDP). Write them after the backward (SAM "
                "perturbs between one backward and the next forward), or run the forward again "
                "(Note [masters written between steps] in zeroshard/_masters.py)")
        if gathered:
            raise RuntimeError(
                written + "while their unit was gathered (inside summon_full_params(), or kept "
                "from an earlier forward by reshard_after_forward=False), so this forward would "
                "compute with what was gathered before the write. Inside a block write the "
                "parameters themselves; write opt.param_groups outside it, "
                "before the forward (Note [masters written between steps] in "
                "zeroshard/_masters.py)")
        with torch.no_grad():
            self.to_shard(bucket)

    def _take_writes_through_data(self, bucket: FlatBucket) -> None:
        """Stage 3, before a forward's gather: a write to the master through its ``.data``
        reaches the shard (Note [masters written through .data]); the master is the shard
        here, so it has."""

    def to_shard(self, bucket: FlatBucket) -> None:
        """After the optimizer updated the master: the shard takes its values."""
        self._note_in_shard(bucket)

    def absorb_writes(self, bucket: FlatBucket, written: torch.Tensor) -> None:
        """``written`` (this rank's elements) may hold writes to the parameters."""

    def absorb_outside_writes(self, buckets) -> None:
        """Before the masters are used: what was written to the parameters since."""

    def take_gathered_writes(self, bucket: FlatBucket) -> None:
        """Stage 3, as a gathered unit is released: this rank's slice of the full buffer
        (what was written to the parameters while gathered) goes into the shard, unless
        the shard itself was written meanwhile and the parameters were not (a write to
        ``opt.param_groups`` inside ``summon_full_params()``, which the slice's old values
        overwrote, silently: helper-112); the next gather spreads it. Written on both
        sides, the parameters' write wins (not seen)."""
        held = not self._written_since_in_shard(bucket)
        if not held and not bucket.written_while_gathered():
            return
        bucket.load_shard()
        if held:
            self._note_in_shard(bucket)

    def widen_gradient(self, bucket: FlatBucket) -> None:
        """Before clipping and the step: the gradient shard in the master's dtype."""

    def load(self, bucket: FlatBucket, index: int, value: torch.Tensor) -> None:
        """Parameter ``index`` is being loaded with ``value`` (``model.load_state_dict``)."""


class Fp32Masters(ShardMasters):
    """Parameters in ``param_dtype``, an fp32 master per trainable bucket."""

    def __init__(self, param_dtype: torch.dtype) -> None:
        super().__init__()
        self.param_dtype = param_dtype
        # id(bucket) -> (the shard's sum, the master's version counter) when the shard
        # last took the master's cast (Note [writes on either side])
        self._in_step: dict[int, tuple[torch.Tensor, int]] = {}

    def place(self, bucket: FlatBucket, own_storage: bool) -> None:
        if bucket.full_precision:  # Note [full-precision modules]
            super().place(bucket, own_storage)
            return
        # Note [masters no narrower than the model]: fp32, or the model's own dtype
        # where wider (an fp64 model's masters were fp32, so every step rounded its
        # weights to fp32, silently, even under param_dtype=torch.float64: helper-128)
        master_dtype = torch.promote_types(MASTER_DTYPE, bucket.own_slice().dtype)
        master = bucket.own_slice().to(master_dtype, copy=True) \
            if bucket.params[0].requires_grad else None
        bucket.cast_parameters(self.param_dtype)
        bucket.place_shard(own_storage)
        bucket.set_master(master)
        self._note_cast(bucket)
        self.note_parameters_follow(bucket)

    def _stamp(self, bucket: FlatBucket) -> tuple:
        # stage 3's shards (own storage) only: stages 1-2 never read the print
        read = bucket.has_separate_master and bucket.shard_owns_storage
        return (bucket.master._version, _master_print(bucket.master) if read else None)

    def _take_writes_through_data(self, bucket: FlatBucket) -> None:
        if not bucket.has_separate_master:
            return
        now = _master_print(bucket.master)
        moved = _print_moved(self._in_shard[id(bucket)][1], now)
        # on a CPU reading the flag costs nothing; on an accelerator it would wait for
        # the queue in every unit's gather, so the cast runs under the flag (one a forward)
        if moved.device.type == "cpu":
            if moved.item():
                self.to_shard(bucket)
            return
        bucket.shard.copy_(torch.where(moved, bucket.master.to(bucket.shard.dtype),
                                       bucket.shard))
        self._in_shard[id(bucket)] = (bucket.master._version, now)

    def to_shard(self, bucket: FlatBucket) -> None:
        if bucket.has_separate_master:
            bucket.shard.copy_(bucket.master)
        self._note_cast(bucket)

    def _note_cast(self, bucket: FlatBucket) -> None:
        """The shard holds the master's cast now."""
        self._note_in_shard(bucket)
        self._note_in_step(bucket)

    def _note_in_step(self, bucket: FlatBucket) -> None:
        if bucket.has_separate_master and not bucket.shard_owns_storage:
            self._in_step[id(bucket)] = (_fingerprint(bucket.shard), bucket.master._version)

    def absorb_writes(self, bucket: FlatBucket, written: torch.Tensor,
                      unless_equal_to: torch.Tensor | None = None) -> None:
        """Where ``written`` differs from the master's cast, the master takes the written
        value (and ``written`` differs from ``unless_equal_to``, what it held before it
        could be written). Elsewhere the
        master keeps its fp32 value, which a round trip through the cast would lose (a
        value loaded exactly by ``load`` stays exact). In chunks: the temporaries are
        about 11 bytes an element (the cast, the mask, the widened value, the choice)."""
        if not bucket.has_separate_master:
            return
        followed = not self.written_since_parameters_followed(bucket)
        master = bucket.master
        for start in range(0, master.numel(), _CHUNK):
            part, new = master[start:start + _CHUNK], written[start:start + _CHUNK]
            take = new != part.to(new.dtype)
            if unless_equal_to is not None:
                take &= new != unless_equal_to[start:start + _CHUNK]
            # torch.where, not boolean indexing: no host synchronisation on CUDA
            part.copy_(torch.where(take, new.to(part.dtype), part))
        if followed:  # the master moved towards the parameters: they still follow it
            self.note_parameters_follow(bucket)

    def take_gathered_writes(self, bucket: FlatBucket) -> None:
        """Stage 3 (Note [writes on either side]): the elements of this rank's slice of
        the gathered buffer that differ from the shard it was gathered from were written
        to the parameters while gathered; the master takes those, and the shard the
        slice. The others hold the master's last cast: taking them where the master was
        written since (a Lookahead or SWA wrapper writing ``opt.param_groups``' tensors,
        through them or their ``.data``) undid that write at the end of any
        ``summon_full_params()`` before the next step (an evaluation, an EMA update; a
        helper's probe: 2.0 off in bf16)."""
        if not bucket.has_separate_master:
            super().take_gathered_writes(bucket)
            return
        held = not self._written_since_in_shard(bucket)
        self.absorb_writes(bucket, bucket.own_slice(), unless_equal_to=bucket.shard)
        bucket.load_shard()
        if held:  # else the master was written too: the next gather takes its cast
            self._note_cast(bucket)

    def absorb_outside_writes(self, buckets) -> None:
        """Stages 1-2, before the masters are used: take into the master what an in-place
        write to the parameters (``model.apply(init)``, ``p.mul_(0.5)``, WGAN's
        ``p.data.clamp_(...)``) put in the shard outside ``summon_full_params()``, which
        the next step would otherwise write back over. The shard equals the master's
        cast except where such a write changed it. No version counter tells whether one
        did: a write through ``p.data`` moves none, and one through ``p`` moves the
        parameter's own, not the buffer's (the buffer's alone was read before, and such
        writes were lost, silently). Note [writes on either side] says how a write to
        the shard is told from one to the master. (``model.load_state_dict`` is taken
        exactly, in fp32: ``load``.)

        The buckets' flags are read at once, one host read a step: the comparison
        costs several passes over the masters, so it runs only where a shard was
        written (on an accelerator it ran under the flag in every bucket at every step,
        about an AdamW step's memory traffic, to spare the read: helper-121's reading)."""
        checked = []
        for bucket in buckets:
            if not bucket.has_separate_master or bucket.shard_owns_storage:  # stage 3: never written
                continue
            fingerprint, master_version = self._in_step[id(bucket)]
            if bucket.master._version != master_version:  # the master was written: it rules,
                self.to_shard(bucket)  # and the shard takes its cast (the next gather spreads it)
                continue
            checked.append((bucket, _fingerprint(bucket.shard) != fingerprint))
        if not checked:
            return
        flags = torch.stack([written for _, written in checked]).tolist()
        for (bucket, _), written in zip(checked, flags):
            if written:
                self.absorb_writes(bucket, bucket.shard)
                self._note_in_step(bucket)

    def widen_gradient(self, bucket: FlatBucket) -> None:
        """A 2-byte gradient shard (kept so until needed, ``FlatBucket.set_grad_shard``)
        takes the master's dtype (fp32, or the model's where wider)."""
        if bucket.grad_shard is not None and bucket.grad_shard.dtype != bucket.master.dtype:
            bucket.set_grad_shard(bucket.grad_shard.to(bucket.master.dtype))

    def load(self, bucket: FlatBucket, index: int, value: torch.Tensor) -> None:
        """Put this rank's part of ``value`` (the parameter's shape, any dtype and
        strides) into the master at full precision."""
        if not bucket.has_separate_master:
            return
        overlap = bucket.layout.overlap(index, bucket.rank)
        if overlap is None:
            return
        followed = not self.written_since_parameters_followed(bucket)
        bucket.master[overlap.shard_span].copy_(
            to_memory_order(value, bucket.orders[index])[overlap.param_start:overlap.param_stop])
        if followed:  # loaded into both
            self.note_parameters_follow(bucket)


# Elements compared at once when the masters take writes (absorb_writes).
_CHUNK = 1 << 22


def _fingerprint(shard: torch.Tensor) -> torch.Tensor:
    """Note [writes on either side]:
        Stages 1-2 with mixed precision: between steps the shard (the parameters' storage)
        holds the master's cast, and either side may be written. A write to the
        parameters (``p.mul_(0.5)``, ``p.data.clamp_``) must reach the master; one to the
        master (a Lookahead or SWA wrapper writing ``opt.param_groups``' tensors) must
        not be undone by the old cast still in the shard. Comparing the two says that
        they differ, not which side moved. The master's version counter moves with a
        write through it (not one through its ``.data``); no counter moves with a write
        through ``p.data``, and one through ``p`` moves the parameter's own, not the
        buffer's. So the shard's sum, taken when it last took the master's cast (a
        reduction to one number on the device, every bucket's read at once, one host read
        a step), tells whether the shard was written; a master whose
        counter moved rules, and the shard takes its cast then. At stage 3 the parameters
        are written only while gathered, and the shard they were gathered from tells which
        elements were (``take_gathered_writes``). Not seen: a write to the
        parameters that leaves their sum as it was (a permutation), and one to both sides
        at once. What a write to the masters does until the next step: Note [masters
        written between steps]."""
    return shard.sum(dtype=torch.float32)


def _master_print(master: torch.Tensor) -> torch.Tensor:
    """Note [masters written through .data]:
        A write to a master through its ``.data`` (pytorch_optimizer's
        ``Lookahead.backup_and_load_cache()`` loading the slow weights to evaluate, and
        ``clear_and_load_backup()`` after; older Lookahead and hand weight decays,
        ``p.data.mul_(...)`` over ``opt.param_groups``) moves no version counter, so the
        records of Note [masters written between steps] miss it. At stage 3 with a
        policy the parameters are gathered from the shards, which hold the masters'
        casts: such an evaluation ran the fast weights, silently (0.05 to 0.11 in
        cross-entropy from DDP + Lookahead). So there the shard's record also keeps this
        print of the master: the bits of the float32 sum of its elements, of every one
        where it has up to 65,536, else of every 1,024th (one per 4 KiB page: a
        millisecond for 48M elements on a CPU), which a write of whole tensors (a copy, a
        decay, a perturbation) moves; a forward's gather casts a master whose print
        moved into its shard first (``_take_writes_through_data``; on an accelerator,
        which would wait for its queue to read the flag, the cast runs under the flag:
        one cast of each unit's master per forward). Each rank does so for its own
        shard, and the gather spreads it, so the ranks need not agree. At
        stages 1-2 the write would have to be refused, and whether a rank's print moved
        depends on its own values (a clamp that bites on one rank's shard only), so a
        refusal there would leave the other ranks in the backward's collectives
        (helper-117's probe of a first version); without a policy the master is the
        parameters' own memory, which a write to the parameters, the same on every
        rank, changes alike. Not seen, then: a write through ``.data`` at stages 1-2, or
        inside a ``summon_full_params()`` block (the block's gathers came before it), or
        to elements no print reads. A print that moves with nothing written (a sum
        taken with another thread count) costs a cast, nothing more."""
    flat = master.detach().reshape(-1)
    sample = flat if flat.numel() <= _PRINT_WHOLE_UP_TO else flat[::_PRINT_EVERY]
    return sample.sum(dtype=torch.float32).view(torch.int32)


_PRINT_WHOLE_UP_TO = 1 << 16
_PRINT_EVERY = 1024


def _print_moved(before: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    return before != now


def masters_for(policy: MixedPrecision | None) -> ShardMasters:
    return ShardMasters() if policy is None else Fp32Masters(policy.param_dtype)
