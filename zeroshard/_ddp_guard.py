"""Refusing ``DistributedDataParallel`` around a model a ZeroOptimizer manages.

Note [refusing DistributedDataParallel]:
    A managed model reduces its own gradients during backward. DDP around it would
    reduce them a second time, into ``p.grad`` that zeroshard does not read (stage 1:
    the local gradient; stages 2-3: markers), and at stage 3 it would broadcast the
    placeholders; each ends in an error that names neither DDP nor its fix, or, worse,
    in a difference. ``accelerator.prepare(model)`` (Hugging Face ``Trainer`` with
    ``optimizers=(ZeroOptimizer, ...)``) wraps the model in DDP exactly so.

    DDP's constructor offers no hook, but before its first collective it reads the
    wrapped module's ``_ddp_params_and_buffers_to_ignore`` (``set(...)`` of it), so
    the managed model carries a ``DDPRefusal`` there whose iteration raises: every rank
    raises the same error before any collective. A DDP around a *parent* of the model
    does not read the child's attribute; the model's forward pre-hook checks DDP's
    record of the module whose forward it is running and refuses there, on every rank,
    before the model's first collective of that forward. ``close()``, or the optimizer
    dropped, removes both; a user's own ``_ddp_params_and_buffers_to_ignore`` comes back.
"""

from __future__ import annotations

import warnings
import weakref

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._hooks import WeakHook, levels_to_the_caller

_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"
_FIX = ("a ZeroOptimizer reduces this model's gradients itself: pass the model to it "
        "unwrapped, not to DistributedDataParallel (Hugging Face Trainer: use "
        "zeroshard.integrations.hf.ZeroTrainer, which keeps Accelerate from wrapping it; "
        "a loop of your own with Accelerate: accelerator.prepare() the optimizer, scheduler "
        "and data loaders, not the model, and run the backwards of an accumulation "
        "window's micro-batches but the last inside opt.no_sync())")


# Note [DDP's switch of gradient sync]:
#     nanoGPT's loop, and others written for DDP, skip the reduction of all but the last
#     micro-batch by setting DDP's ``model.require_backward_grad_sync = False``. On a
#     model under a ZeroOptimizer nothing reads that attribute, so every backward reduced:
#     the same numbers, three reductions a step where DDP made one in a helper's probe
#     (3 micro-batches). A forward that finds it False warns once, naming no_sync().
_IGNORED_SYNC_SWITCH = (
    "zeroshard: model.require_backward_grad_sync = False is DistributedDataParallel's "
    "switch, which a ZeroOptimizer does not read: this backward reduces its gradients (the "
    "numbers are the same; each micro-batch costs a reduction). Run the backwards of an "
    "accumulation window's micro-batches but the last inside `with opt.no_sync():` instead")


class DDPRefusal:
    """What ``_ddp_params_and_buffers_to_ignore`` holds on a managed model. It refuses
    only while its guard lives: an optimizer dropped without ``close()`` no longer
    manages the model, which DDP may then wrap."""

    def __init__(self, guard: DDPGuard, previous) -> None:
        self._guard = weakref.ref(guard)
        self.previous = previous  # the user's own value, or None

    def __iter__(self):
        if self._guard() is None:
            return iter(self.previous or ())
        raise RuntimeError("zeroshard: DistributedDataParallel was given a model that a "
                           f"ZeroOptimizer manages; {_FIX}")

    # copies (an EMA model, torch.save) are ordinary modules: they carry the user's value
    def __deepcopy__(self, memo):
        return self.previous if self.previous is not None else ()

    def __reduce__(self):
        return (tuple, (tuple(self.previous or ()),))


class DDPGuard:
    """Installs the refusal on ``model``; it goes with the guard (Note above). The forward
    hook's handle joins ``handles``, the stage's, which are removed with the stage."""

    def __init__(self, model: nn.Module, handles: list) -> None:
        self._model = model
        self._warned = False  # Note [DDP's switch of gradient sync]
        refusal = DDPRefusal(self, model.__dict__.get(_ATTRIBUTE))
        model.__dict__[_ATTRIBUTE] = refusal
        handles.append(model.register_forward_pre_hook(WeakHook(self._before_forward)))
        # an optimizer dropped without close() takes the refusal with it, like its hooks
        self._take_back = weakref.finalize(self, _take_back, model.__dict__, refusal)
        self._take_back.atexit = False

    def _before_forward(self, module, args) -> None:
        active = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if active is not None and any(m is self._model for m in active.module.modules()):
            raise RuntimeError("zeroshard: a DistributedDataParallel module runs the forward "
                               f"of a model that a ZeroOptimizer manages; {_FIX}")
        if self._model.__dict__.get("require_backward_grad_sync") is False and not self._warned:
            self._warned = True
            warnings.warn(_IGNORED_SYNC_SWITCH, stacklevel=levels_to_the_caller())

    def remove(self) -> None:
        self._take_back()


def _take_back(namespace: dict, refusal: DDPRefusal) -> None:
    """Put the user's own ``_ddp_params_and_buffers_to_ignore`` back, if it had one."""
    if namespace.get(_ATTRIBUTE) is refusal:
        del namespace[_ATTRIBUTE]
        if refusal.previous is not None:
            namespace[_ATTRIBUTE] = refusal.previous
