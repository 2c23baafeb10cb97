"""The refusal of a forward inside a ``torch.func`` gradient transform.

Note [gradient transforms]:
    ZeroOptimizer reduces the gradients that ``loss.backward()`` accumulates into the
    model's parameters. Under ``torch.func.grad`` (``vjp``, ``jacrev``, ``jvp``,
    ``jacfwd``) over ``functional_call(model, params, ...)`` the gradients go to the
    tensors the transform was given and never reach the parameters, while the model's
    hooks still ran: stages 1-3 crashed inside the transform's backward with torch's
    raw "Cannot access data pointer" or "Cannot access storage of TensorWrapper" (a
    helper's probe), and a gradient set on ``p.grad`` by hand afterwards is refused at
    the step anyway. So the model's first forward pre-hook refuses such a forward,
    naming what works. Every rank runs the same code, so every rank raises there,
    before any hook of the stage gathers or any collective. ``torch.func.vmap`` alone
    (an ensemble, batched evaluation) is left alone: it computes no gradient itself.
"""

from __future__ import annotations

import torch

_functorch = getattr(torch._C, "_functorch", None)


def refuse_gradient_transforms(module, args) -> None:
    """A forward pre-hook (Note [gradient transforms])."""
    if _functorch is None or torch.compiler.is_compiling():
        return
    if _functorch.maybe_current_level() is None:  # inside no transform: the usual case
        return
    gradient_kinds = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)
    if any(interpreter.key() in gradient_kinds for interpreter in _functorch.get_interpreter_stack()):
        raise RuntimeError(
            "zeroshard: the model's forward ran inside a torch.func gradient transform "
            "(torch.func.grad, vjp, jacrev, jvp or jacfwd over functional_call). ZeroOptimizer "
            "reduces the gradients that loss.backward() accumulates into the model's "
            "parameters, and a transform's gradients never reach them. Compute the loss "
            "with the model and call loss.backward(); for a transform over the model, "
            "opt.close() first and use it unmanaged (Note [gradient transforms] in "
            "zeroshard/_transforms.py)")
