"""The mixed-precision policy, and the casts it puts around the model's forward.

With a policy, the model's parameters hold ``param_dtype`` values (forward and
backward compute in it), each rank keeps fp32 master weights for its own shard
only (in the model's own dtype where it is wider: fp64 for an fp64 model, Note
[masters no narrower than the model] in _masters.py), and the inner optimizer steps
on those. After the step each rank casts its
updated master shard to ``param_dtype`` and the parameters are all-gathered from
the cast shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

MASTER_DTYPE = torch.float32
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MixedPrecision:
    """What forward and backward compute in, and what gradients are reduced in.

    param_dtype: the dtype the model's parameters hold (and forward and backward
        compute in). fp32 master weights of each rank's shard live in the optimizer
        (fp64 for an fp64 model: never narrower than the model's own dtype).
    reduce_dtype: the dtype gradients are reduce-scattered in; None means
        ``param_dtype``. fp32 is allowed with bf16 compute (slower, more exact).
        fp16 reductions are pre-divided by the world size and summed, so the sum of
        N gradients cannot overflow where their mean would not.
    buffer_dtype: the dtype floating-point buffers are cast to; None keeps them
        as they are (BatchNorm statistics, for instance, stay fp32).
    cast_forward_inputs: cast floating-point tensors passed to the model's forward
        to ``param_dtype`` (a fp32 batch then meets low-precision weights).
    output_dtype: cast floating-point tensors the model's forward returns to this
        dtype (for instance fp32, for the loss); None leaves them as computed.

    Gradient shards are kept in ``reduce_dtype``, except fp16: those are kept in
    fp32, because loss scaling needs them unscaled without underflow (and
    ``torch.amp.GradScaler`` refuses to unscale fp16 gradients). ``clip_grad_norm_``
    and ``step`` widen 2-byte gradient shards to fp32 when they run.
    """

    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype | None = None
    buffer_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True
    output_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype", "buffer_dtype", "output_dtype"):
            value = getattr(self, name)
            if (value is not None or name == "param_dtype") and value not in _FLOATING:
                raise ValueError(f"MixedPrecision.{name} must be a floating-point torch.dtype "
                                 f"such as torch.bfloat16, got {value!r}")

    @property
    def gradient_reduce_dtype(self) -> torch.dtype:
        return self.reduce_dtype if self.reduce_dtype is not None else self.param_dtype


# Note [full-precision modules]:
#     BatchNorm's running statistics are numerically delicate, and batch_norm refuses a
#     bf16 weight beside fp32 statistics. So, as FSDP does by default, under any policy
#     BatchNorm modules keep their parameters (in buckets of their own, whose shard is
#     the master, reduced in their dtype) and buffers in the model's dtype (fp32 in an
#     fp32 model), and compute in it: their floating-point inputs are cast to that
#     dtype and their outputs to ``param_dtype``. Casting the inputs to fp32 whatever
#     the module kept failed in an fp64 or bf16 model with torch's raw "mixed dtype"
#     error (a helper's probe).
FULL_PRECISION_MODULES = (nn.modules.batchnorm._BatchNorm,)


class GradientDtypes:
    """The dtypes gradients are reduced and kept in, chosen once from the policy.

    Gradients are reduced in the policy's reduce dtype (else the parameters' own);
    an fp16 gradient shard is kept in fp32, where loss scaling can unscale it. A
    full-precision bucket (Note [full-precision modules]), and every bucket without
    a policy, reduces and keeps its own dtype."""

    def __init__(self, policy: MixedPrecision | None) -> None:
        self.reduce = policy.gradient_reduce_dtype if policy is not None else None
        self.kept = MASTER_DTYPE if self.reduce == torch.float16 else self.reduce

    def reduce_dtype(self, bucket) -> torch.dtype:
        if self.reduce is None or bucket.full_precision:
            return bucket.flat.dtype
        return self.reduce

    def cleared_gradient_shard(self, bucket, set_to_none: bool) -> torch.Tensor | None:
        """What ``zero_grad(set_to_none)`` leaves as the bucket's gradient shard: None, or
        zeros (as a reduction of zeros would leave them) where a shard was.

        Note [zeros only where a gradient was]:
            torch's ``zero_grad(set_to_none=False)`` zeroes the gradients that exist and
            leaves a None one None, so the next step still skips a parameter that never
            got a gradient. Making every shard zeros stepped those too (weight decay,
            Adam's moments): a stage-3 unit no rank had used yet, 1.0e-3 from DDP after
            AdamW's steps. A shard exists on every rank alike after a synced backward
            (stage 3 agrees on which units got a gradient), so the ranks still step the
            same buckets."""
        if set_to_none or bucket.grad_shard is None:
            return None
        return self.as_gradient_shard(bucket, bucket.master.new_zeros(
            bucket.master.numel(), dtype=self.reduce_dtype(bucket)))

    def as_gradient_shard(self, bucket, reduced: torch.Tensor) -> torch.Tensor:
        """A reduce-scatter's output in the dtype gradient shards are kept in."""
        if self.kept is None or bucket.full_precision or reduced.dtype == self.kept:
            return reduced
        return reduced.to(self.kept)


def full_precision_parameters(model: nn.Module, policy: MixedPrecision | None) -> set[int]:
    """ids of the parameters a policy leaves in their own dtype: a full-precision
    module's (Note [full-precision modules]), and any that is not real floating point.
    A policy's dtypes are real, so casting a complex parameter dropped its imaginary
    part and an integer one (frozen) was rounded to bf16, silently (a helper's probes);
    like BatchNorm's, they keep their dtype, in buckets whose shard is the master."""
    if policy is None:
        return set()
    return {id(p) for m in model.modules() for p in m.parameters(recurse=False)
            if isinstance(m, FULL_PRECISION_MODULES) or not p.is_floating_point()}


def install_forward_casts(model: nn.Module, policy: MixedPrecision) -> list:
    """Hooks on the root module that cast its forward's inputs and outputs, and around
    each full-precision module; returns handles."""
    handles = []
    for module in model.modules():
        if isinstance(module, FULL_PRECISION_MODULES):  # Note [full-precision modules]
            handles.append(module.register_forward_pre_hook(_InputsTo(_kept_dtype(module))))
            handles.append(module.register_forward_hook(_OutputsTo(policy.param_dtype)))
    if policy.cast_forward_inputs:
        handles.append(model.register_forward_pre_hook(_ArgumentsTo(policy.param_dtype),
                                                        with_kwargs=True, prepend=True))
    if policy.output_dtype is not None:
        handles.append(model.register_forward_hook(_OutputsTo(policy.output_dtype)))
    return handles


# Note [a state dict in param_dtype]:
#     Under a policy the parameters hold ``param_dtype`` values between steps at stages
#     1-2 (and inside ``summon_full_params()`` at stage 3), so ``model.state_dict()``
#     gives those, not the fp32 masters the optimizer steps: a checkpoint written from
#     it on rank 0 (``save_pretrained``, ``torch.save(model.state_dict())``, DDP's
#     habits) came out bf16, silently (helper-120: a diffusers UNet's 3.9e-3 from the
#     fp32 weights zeroshard keeps); FSDP2's state dict holds its fp32 shards. The fp32
#     values take a collective (``save_full_model``, ``full_state_dict()``, a
#     ``summon_full_params(full_precision=True)`` block), which a rank-0-only call
#     cannot make, so the first such state dict warns, naming them: the model's, or
#     one of its children's (a wrapper's ``wrapper.model.save_pretrained``; deeper
#     modules' are not watched, helper-122). zeroshard's own readings
#     (``keep_vars=True``: names and objects, no values saved) do not warn.
def holds_param_dtype_values(state_dict: dict, buckets) -> bool:
    """Whether ``state_dict`` holds values of parameters kept in ``param_dtype`` beside
    fp32 masters (Note [a state dict in param_dtype]), and not their objects."""
    flats = {b.flat.untyped_storage().data_ptr() for b in buckets
             if b.has_separate_master and b.flat is not None and b.flat.untyped_storage().nbytes()}
    held = False
    for value in state_dict.values():
        if isinstance(value, nn.Parameter):
            return False  # keep_vars=True
        held = held or (isinstance(value, torch.Tensor)
                        and value.untyped_storage().data_ptr() in flats)
    return held


def _kept_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a full-precision module keeps and computes in: its own parameters'
    or buffers' (fp32 where it has neither)."""
    kept = [t.dtype for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
            if t.is_floating_point()]
    return kept[0] if kept else MASTER_DTYPE


class _InputsTo:
    """A forward pre-hook casting floating-point inputs to ``dtype`` (picklable)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args):
        return _cast_floating(args, self.dtype)


class _ArgumentsTo:
    """A forward pre-hook (``with_kwargs=True``) casting floating-point positional and
    keyword inputs to ``dtype`` (picklable: ``torch.save(model)`` of a model under a
    policy failed on a local function until this change, a helper's probe)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args, kwargs):
        return _cast_floating(args, self.dtype), _cast_floating(kwargs, self.dtype)


class _OutputsTo:
    """A forward hook casting floating-point outputs to ``dtype`` (picklable: a copy of
    the model, ``copy.deepcopy``, keeps working)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module, args, output):
        return _cast_floating(output, self.dtype)


def cast_buffers(model: nn.Module, policy: MixedPrecision) -> None:
    """Floating-point buffers to ``policy.buffer_dtype``, but for those of the modules
    kept in full precision (Note [full-precision modules]). A buffer registered in
    several modules (one mask for every layer) is cast once and stays one tensor: a
    cast per module made copies, so a write through one module no longer reached the
    others, silently (a helper's probe: the reader kept zeros)."""
    if policy.buffer_dtype is None:
        return
    kept = {id(buffer) for module in model.modules() if isinstance(module, FULL_PRECISION_MODULES)
            for buffer in module._buffers.values() if buffer is not None}
    cast: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and id(buffer) not in kept:
                module._buffers[name] = cast.setdefault(id(buffer), buffer.to(policy.buffer_dtype))


def _cast_floating(tree, dtype: torch.dtype):
    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value
    return tree_map(cast, tree)


def fp16_compute(device: torch.device, policy: MixedPrecision | None) -> bool:
    """True if this forward computes in fp16, so its gradients may overflow (loss scaling)."""
    if policy is not None and policy.param_dtype == torch.float16:
        return True
    return (torch.is_autocast_enabled(device.type)
            and torch.get_autocast_dtype(device.type) == torch.float16)
