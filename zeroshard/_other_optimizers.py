"""Refusing another optimizer's step over parameters a ZeroOptimizer manages.

Note [another optimizer over managed parameters]:
    Under DDP a second torch optimizer over some of the model's parameters (Muon for
    the matrices and AdamW for the rest, a separate optimizer for a head) steps them
    with DDP's averaged ``p.grad``. A ZeroOptimizer keeps the reduced gradient in its
    shards instead: at stage 1 ``p.grad`` holds this rank's local, unreduced gradient,
    so such an optimizer stepped each rank's replica with its own gradient, and the
    next all-gather stitched the model together from the ranks' different results,
    silently unlike DDP (a probe: no error at all); at stages 2 and 3 it read the NaN
    markers and was refused as if it had changed ``p.grad``. So torch's global step
    pre-hook, registered once when the first ZeroOptimizer is built, refuses the step of
    any other optimizer holding a trainable parameter that a ZeroOptimizer manages, on
    every rank (the script steps it on every rank; that step issues no collective),
    before it changes anything, naming the parameter and the fix: one ZeroOptimizer
    with a param group per optimizer class. The ZeroOptimizer's own ``param_groups``
    hold its shards, not the model's parameters, and its inner optimizers step without
    the global hooks (``_step_without_global_hooks`` in _inner.py), so neither is
    checked. After ``close()`` (or the ZeroOptimizer dropped) the parameters are
    ordinary again and any optimizer may step them.
"""

from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_pre_hook

_handle = None


def refuse_other_optimizers_over(owners: dict, owner_of) -> None:
    """Register the refusal (once per process). ``owners`` is the registry of managed
    parameters (empty: nothing to check, at no cost per parameter); ``owner_of(param)``
    is the open ZeroOptimizer that manages ``param``, or None."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_StepRefusal(owners, owner_of))


class _StepRefusal:
    def __init__(self, owners: dict, owner_of) -> None:
        self._owners = owners
        self._owner_of = owner_of

    def __call__(self, optimizer, args, kwargs) -> None:
        if not self._owners:  # every ZeroOptimizer closed
            return
        for index, group in enumerate(optimizer.param_groups):
            for position, param in enumerate(group["params"]):
                owner = self._owner_of(param) if param.requires_grad else None
                if owner is not None and owner is not optimizer:
                    raise RuntimeError(_refusal(optimizer, owner, param, index, position))


def _refusal(optimizer, owner, param, index: int, position: int) -> str:
    name = next((n for n, p in owner.sharding.model.named_parameters() if p is param), "?")
    return (f"zeroshard: {type(optimizer).__name__}.step() would step {name} "
            f"(param_groups[{index}]['params'][{position}]), which a ZeroOptimizer (stage "
            f"{owner.stage}) manages: its p.grad is not the averaged gradient (the "
            "reduced gradient lives in the ZeroOptimizer's shards), so this optimizer would "
            "not step it as under DistributedDataParallel. Give the ZeroOptimizer one param "
            "group per optimizer class instead, e.g. ZeroOptimizer(model, torch.optim.AdamW, "
            "param_groups=[{'params': matrices, 'optimizer_class': Muon}, {'params': rest}]) "
            "(README: Any torch optimizer), or opt.close() before stepping the parameters "
            "with another optimizer")
