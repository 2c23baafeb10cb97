"""The refusal of a forward inside a ``torch.func`` gradient transform that cannot work.

Note [gradient transforms]:
    ZeroOptimizer reduces the gradients that ``loss.backward()`` accumulates into the
    model's parameters. Under ``torch.func.grad`` (``vjp``, ``jacrev``, ``jvp``,
    ``jacfwd``) over ``functional_call(model, params, ...)`` the gradients go to the
    tensors the transform was given and never reach the parameters, while the model's
    hooks still ran: stages 1-3 crashed inside the transform's backward with torch's
    raw "Cannot access data pointer" or "Cannot access storage of TensorWrapper" (a
    helper's probe), and a gradient set on ``p.grad`` by hand afterwards is refused at
    the step anyway. So the model's first forward pre-hook refuses a forward whose
    parameters a gradient transform holds (they are functorch's wrappers then), naming
    what works. Every rank runs the same code, so every rank raises there, before any
    hook of the stage gathers or any collective.

    A transform over the inputs alone is left alone at stages 1 and 2: a physics-
    informed loss (``vmap(jacrev(model))(x)`` in the loss, then ``loss.backward()``)
    trains equal to DDP there (a reviewer's probe; a first version of this refusal
    refused it). At stage 3 it is refused too: the gathers inside the transform
    crashed the process (a reviewer's probe). ``torch.func.vmap`` alone computes no
    gradient and is left alone at every stage. At stage 3 each unit's module refuses
    too: a transform over a unit called alone (``jacrev(model.fc1)``) reached its
    gather and crashed the process (a reviewer's probe). Buffers a transform holds
    (``functional_call(model, {"scale": b}, ...)``) count as parameters do. Inside any
    transform the buffers are not synchronised from rank 0 (Note [buffers follow rank
    0] in _buffers.py): a transform refuses in-place writes, which crashed the
    physics-informed loss of a model with a buffer (a reviewer's probe). And a forward
    inside a gradient transform does not arm the end of backward (Note [end of
    backward] in _reducer.py): the transform's own backward over the inputs is not the
    step's, and ending it as one crashed a saliency map (``torch.func.grad(lambda x:
    model(x).sum())(x)``) at stages 1 and 2; a later backward that reaches the
    parameters starts the step's backward from their first gradient, as any does.
"""

from __future__ import annotations

import itertools

import torch

from ._hooks import InertWhenCopied

_functorch = getattr(torch._C, "_functorch", None)


def inside_a_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (grad, vmap, jvp, ...); never
    while dynamo traces (a look at functorch's level there made every compiled model
    compile twice: the suite's compile test)."""
    if _functorch is None or torch.compiler.is_compiling():
        return False
    return _functorch.maybe_current_level() is not None


def inside_a_gradient_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform that takes gradients (grad,
    vjp, jacrev, jvp, jacfwd); never while dynamo traces."""
    if not inside_a_transform():
        return False
    kinds = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)
    return any(i.key() in kinds for i in _functorch.get_interpreter_stack())


class GradientTransformRefusal(InertWhenCopied):
    """A forward pre-hook on the model and, at stage 3, on each unit's module (Note
    [gradient transforms]); a copy of the model gets an inert one (a copy that kept it
    refused ``torch.func`` over its parameters for good, after ``opt.close()`` too: a
    helper's probe)."""

    def __init__(self, stage: int) -> None:
        self.stage = stage

    def __call__(self, module, args) -> None:
        if not inside_a_gradient_transform():  # the usual case; or vmap alone
            return
        over_parameters = any(_functorch.is_functorch_wrapped_tensor(t)
                              for t in itertools.chain(module.parameters(), module.buffers()))
        if not over_parameters and self.stage != 3:
            return
        what = ("with parameters (or buffers) that a torch.func gradient transform holds "
                "(torch.func.grad, vjp, jacrev, jvp or jacfwd over functional_call(model, "
                "params, ...))" if over_parameters
                else "inside a torch.func gradient transform at stage 3")
        raise RuntimeError(
            f"zeroshard: a forward of the managed {type(module).__name__} ran {what}. "
            "ZeroOptimizer reduces the "
            "gradients that loss.backward() accumulates into the model's parameters, and a "
            "transform's gradients never reach them. Compute the loss with the model and "
            "call loss.backward()" + ("" if over_parameters else
                                      " (stages 1 and 2 take transforms over the inputs alone)")
            + "; for a transform over the model, opt.close() first and use it unmanaged "
            "(Note [gradient transforms] in zeroshard/_transforms.py)")
