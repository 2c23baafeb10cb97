"""Stage 3: a unit is gathered before the backward hooks of its own module run.

Note [gathered before a unit's own module hooks]:
    torch wraps a module's output in the node that calls its backward hooks
    (``BackwardHook``) after the module's forward hooks have run. zeroshard's forward
    hook arms the unit's gather on the output it sees, the one inside that wrapping, so
    in backward the user's hooks ran first: a backward pre-hook on a unit's own module
    that read the unit's weight read the placeholders' NaN (unless a prefetch had
    gathered the unit), and one scaling the gradient by it trained NaN from the first
    step; so did a full backward hook of a unit called with its input as a keyword
    (torch wraps positional inputs only, and without a tensor among them calls the
    post-hooks from the output's node too). A helper's probes found both.

    So a unit whose own module has a full backward hook or a backward pre-hook of the
    user's also gets a backward pre-hook of zeroshard's, first among its pre-hooks
    (``GatherFirst``), which gathers the unit (what the output's gradient hook does a
    node later). torch takes a module's backward hooks as each call begins, before its
    forward pre-hooks run, so each call of the unit takes one ``GatherFirst`` and finds
    a fresh one for the next, and only the one taken by a call whose outputs were armed
    (a forward with grad enabled, not a recomputation in backward) acts. The units'
    hooks are brought up to date as the root's forward begins, before any other unit's
    call takes its hooks; a hook registered on a unit's module after that (inside the
    model's forward), or on the root's own module after the optimizer was built, is seen
    from the next forward on, and zeroshard warns (once per unit) that in the backward
    of this one it reads placeholders: a hook that only reads them (a log line) reads
    NaN there, one that uses them in a gradient trains NaN from then on (a reviewer's
    probe). torch's global module backward pre-hooks run before every module's own: not
    seen.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._hooks import WeakHook

if TYPE_CHECKING:
    from ._unit import Unit


class GatherFirst(WeakHook):
    """zeroshard's backward pre-hook, first on a unit's module, taken by one call of it:
    gathers the unit if that call's outputs were armed."""

    def __init__(self, method, unit: Unit) -> None:
        super().__init__(method, unit)
        self.armed = False

    def __call__(self, module, grad_output) -> None:
        if self.armed:
            super().__call__(module, grad_output)
        return None  # the gradient unchanged


def user_backward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a full backward hook or a backward pre-hook of the user's
    (torch calls them from the node wrapping its output). A hook of the old kind
    (``register_backward_hook``) runs after the node that made the output: gathered."""
    return bool(module._backward_hooks and module._is_full_backward_hook) or any(
        not isinstance(hook, GatherFirst) for hook in module._backward_pre_hooks.values())


class GatherBeforeModuleHooks:
    """Note [gathered before a unit's own module hooks]: keeps a ``GatherFirst`` first
    among the pre-hooks of each unit's module that has hooks of the user's."""

    def __init__(self, method) -> None:
        # (unit, module, grad_output), held weakly (Note [no reference cycles] in _hooks.py)
        self._method = weakref.WeakMethod(method)
        self._handles: dict[int, RemovableHandle] = {}  # id(unit) -> its GatherFirst's
        self._taken: dict[int, GatherFirst] = {}  # id(unit) -> the running call's
        self._warned: set[int] = set()  # id(unit)

    def bring_up_to_date(self, unit: Unit) -> bool:
        """Put a fresh ``GatherFirst`` first on ``unit``'s module if it has hooks of the
        user's, or take it off if not. Returns whether the hooks torch takes now, with
        a user's among them, lacked it (or had it after a user's)."""
        hooks = unit.module._backward_pre_hooks
        handle = self._handles.get(id(unit))
        was_first = handle is not None and next(iter(hooks), None) == handle.id
        wanted = user_backward_hooks(unit.module)
        if was_first and wanted:
            return False
        if handle is not None:
            handle.remove()
            del self._handles[id(unit)]
        if not wanted:
            return False
        handle = unit.module.register_full_backward_pre_hook(
            GatherFirst(self._method(), unit), prepend=True)
        self._handles[id(unit)] = handle
        return True

    def take_for_call(self, unit: Unit, training: bool) -> None:
        """A call of ``unit``'s module begins (its first forward pre-hook): keep the
        ``GatherFirst`` torch took for it, leaving a fresh one for the next call
        (``training``: a forward with grad enabled, whose backward may run the hooks)."""
        self._taken.pop(id(unit), None)
        if self.bring_up_to_date(unit):
            if training:
                self._warn_late(unit)
            return
        handle = self._handles.get(id(unit))
        if handle is not None:
            hooks = unit.module._backward_pre_hooks
            self._taken[id(unit)] = hooks[handle.id]
            hooks[handle.id] = GatherFirst(self._method(), unit)  # keeps its place

    def arm(self, unit: Unit) -> None:
        """The running call of ``unit`` armed its outputs: its ``GatherFirst`` acts."""
        taken = self._taken.pop(id(unit), None)
        if taken is not None:
            taken.armed = True

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._taken.clear()

    def _warn_late(self, unit: Unit) -> None:
        if id(unit) in self._warned:
            return
        self._warned.add(id(unit))
        warnings.warn(
            f"zeroshard stage 3: the module of unit {unit.name} got a backward hook or pre-hook "
            "after the model's forward began (or, the root's, after ZeroOptimizer was built): "
            "in the backward of this forward it runs before the unit is gathered and reads "
            "placeholders (NaN) in place of its parameters; it is seen from the next forward "
            "on. A hook that uses them in a gradient trains NaN from here on: register "
            "backward hooks on a unit's module before the model's forward, and on the model "
            "itself before building ZeroOptimizer (Note [gathered before a unit's own module "
            "hooks] in zeroshard/_module_hooks.py)")
