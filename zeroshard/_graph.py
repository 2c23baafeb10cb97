"""Walking the autograd graph a forward built."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def roots_of(outputs: Iterable) -> list:
    """The autograd nodes that made ``outputs`` (those that are tensors with a history)."""
    return [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def nodes_below(roots: list) -> Iterator:
    """Every node of the graph below ``roots`` (autograd nodes), each once. The nodes
    seen are held until the walk ends: a node's Python object lives only as long as
    something refers to it, and a new one for the same node would defeat the check of
    which were seen."""
    seen: dict[int, object] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack.extend(child for child, _ in node.next_functions
                     if child is not None and id(child) not in seen)
