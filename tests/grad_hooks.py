"""A gradient hook that measures what zeroshard did with a gradient, not what it will do."""

from __future__ import annotations

import torch


def after_zeroshard(param: torch.nn.Parameter, hook) -> object:
    """Call ``hook(param)`` once zeroshard has taken ``param``'s gradient for reduction.

    zeroshard hooks autograd's accumulator node (Note [after the user's gradient hooks]
    in zeroshard/_reducer.py), which runs after every post-accumulate-grad hook on the
    parameter; the node's hooks run in registration order, so this one, registered
    after the ZeroOptimizer, runs after zeroshard's. Returns the node: keep it while the
    hook should live (the engine keeps a node only while something refers to it)."""
    with torch.enable_grad():
        node = param.view_as(param).grad_fn.next_functions[0][0]
    node.register_hook(lambda grad_inputs, grad_outputs: hook(param))
    return node
