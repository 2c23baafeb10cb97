"""What the parts of a stage share: hooks that hold them weakly, and the loop's switches.

Note [no reference cycles]:
    Hooks live on the model and its parameters, and a stage refers to the model, so
    a hook holding its stage strongly would make a reference cycle (model -> hook ->
    stage -> model) that only the garbage collector frees: often during interpreter
    teardown, after ``destroy_process_group()``, with the process group and buffers
    still alive. So every hook reaches its part of the stage through a weak
    reference (``WeakHook``), and the parts refer to each other without cycles (a
    part that must call back into the one holding it gets a weak proxy): when the
    last ``ZeroOptimizer`` reference goes, the stage and everything it holds are
    freed at once, and its hooks are removed with it.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import weakref
from dataclasses import dataclass

import torch


def levels_to_the_caller() -> int:
    """The ``stacklevel`` that points a warning raised in a module hook (a forward
    pre-hook, a state-dict hook) at the line that called the model: past zeroshard's
    frames and torch's (its module code, and dynamo's wrapper of the hooks marked by
    Note [the optimizer under torch.compile], which it pointed at before), and
    contextlib's (a warning at the end of a ``with`` block points at the block)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_OURS)
                                 or frame.f_code.co_filename.startswith(_TORCH)
                                 or frame.f_code.co_filename == _CONTEXTLIB):
        level, frame = level + 1, frame.f_back
    return level


_OURS = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_CONTEXTLIB = contextlib.__file__


class InertWhenCopied:
    """A hook of the stage's whose copy is an ``InertHook``: a copy of the module or
    parameter it sits on (``copy.deepcopy``: an EMA model, ``AveragedModel``; pickling:
    ``torch.save(model)``) is an ordinary module, not a second way into this stage that
    would issue collectives on the ranks that use the copy only, nor one that keeps
    refusing what the stage refuses after ``opt.close()``."""

    def __deepcopy__(self, memo) -> InertHook:
        return InertHook()

    def __reduce__(self):
        return InertHook, ()


class WeakHook(InertWhenCopied):
    """A hook calling ``method(*leading, *hook_args)`` that holds ``method``'s object
    weakly (Note [no reference cycles]); once that object is gone it does nothing."""

    def __init__(self, method, *leading) -> None:
        self._target = weakref.WeakMethod(method)
        self._leading = leading

    def __call__(self, *args, **kwargs):
        bound = self._target()
        return None if bound is None else bound(*self._leading, *args, **kwargs)


class EagerOnlyHook(WeakHook):
    """A ``WeakHook`` that does nothing while torch.compile traces the module it sits on:
    that check comes first, so dynamo inlines it and keeps the module in the graph (the
    weak reference behind a ``WeakHook`` splits the graph where dynamo meets it)."""

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return None
        return super().__call__(*args, **kwargs)


class InertHook:
    """What a copy of a ``WeakHook`` becomes: a hook that does nothing."""

    def __call__(self, *args, **kwargs) -> None:
        return None


def remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Phase(enum.Enum):
    """What the model is doing, as the stage's hooks see it (one for the whole stage)."""
    IDLE = "idle"
    FORWARD = "forward"  # a forward of the root with grad enabled (stage 3 tracks forwards)
    FORWARD_NO_GRAD = "forward without grad"  # evaluation, generate()
    BACKWARD = "backward"  # the end-of-backward callback is queued


# The moves the phase makes; any other is a bug in the hooks, refused. A forward may
# begin again while one is running (the last raised), and a backward begin inside a
# forward (torch.autograd.grad in a model's forward).
_PHASE_MOVES = {
    Phase.IDLE: {Phase.FORWARD, Phase.FORWARD_NO_GRAD, Phase.BACKWARD},
    Phase.FORWARD: {Phase.IDLE, Phase.FORWARD, Phase.FORWARD_NO_GRAD, Phase.BACKWARD},
    Phase.FORWARD_NO_GRAD: {Phase.IDLE, Phase.FORWARD, Phase.FORWARD_NO_GRAD, Phase.BACKWARD},
    Phase.BACKWARD: {Phase.IDLE},
}


@dataclass
class LoopSwitches:
    """What the training loop is doing and has switched on, read by every part of a stage."""

    require_sync: bool = True  # False inside ZeroOptimizer.no_sync()
    summoned: int = 0  # depth of ZeroOptimizer.summon_full_params() blocks
    phase: Phase = Phase.IDLE  # moved only by enter()
    # the stage went away without close(): stage 3's released parameters hold no values
    # anywhere now (Note [released parameters] in _released.py)
    freed: bool = False

    def enter(self, phase: Phase) -> None:
        if phase not in _PHASE_MOVES[self.phase]:
            raise RuntimeError(f"zeroshard internal error: the stage cannot go from "
                               f"{self.phase.value} to {phase.value}; please report it")
        self.phase = phase
