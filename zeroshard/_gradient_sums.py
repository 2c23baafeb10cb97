"""The gradient of a parameter used more than once in a forward, summed in place.

Note [contributions summed in place]:
    Autograd sums the gradients of a parameter used more than once in a forward (a
    token embedding tied to the output head, a weight shared by several layers, a
    block run twice) in the input buffer of the parameter's accumulator node. It adds
    in place into the contribution that came first only if that one is a row-major
    tensor alone on its memory; otherwise it makes a new tensor for the sum. A tied
    head's contribution comes first and is a transposed view (``F.linear`` multiplies
    by ``weight.t()``), so in the token embedding's backward three tensors of the
    embedding's size are alive at once: the two contributions and their sum. On the
    100M GPT that is 48 MiB more at the step's peak, at every stage (and under DDP
    and FSDP): a 16 MiB tied embedding alone took 48-50 MiB in backward at stages 1
    and 2, 32-35 with this (``test_a_tied_weights_two_gradients_are_summed_in_place``).

    So zeroshard hooks the nodes of each training forward's graph that feed a managed
    parameter's accumulator more than once (a node's post-hook may hand autograd
    other gradients). The first contribution of a backward, if it is not a row-major
    tensor alone on its memory, is handed on as a row-major copy, and the later ones
    are added to it in place. The sum is the same, bitwise: the same additions in
    the same order. The copy lives beside the view it copies for a moment, in the
    node that transposes the head's gradient, which runs after the head's matmul has
    freed the logits' gradient (larger than the weight wherever a batch holds at
    least as many tokens as the model is wide). Where backward starts at the step's
    peak and the batch is smaller than that, the copy raises the peak: stage 3
    without resharding after forward, every unit gathered when backward starts, on
    the 100M GPT with 64 tokens a batch: 1034 -> 1075 MiB
    (``benchmarks/results/backward_timeline_ws2``).

    Finding those nodes walks the forward's graph once per training forward: 0.24 ms
    for the 100M GPT's 504 nodes, 2.6 ms for a 48-layer Hugging Face GPT-2's 3,327. A
    model whose first training forward uses no managed parameter twice is not walked
    again. Parameters laid out other than row-major (``channels_last``) are left
    alone: a row-major copy would not have their layout, which their gradient keeps.
    A graph backwarded a second time (``retain_graph=True``) sums as torch does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._graph import nodes_below, roots_of


class InPlaceSums:
    """Hooks the nodes that feed a parameter's accumulator more than once in a
    forward (Note [contributions summed in place]). ``accumulators``: the accumulator
    nodes of the row-major managed parameters, kept alive by the caller."""

    def __init__(self, accumulators: Iterable) -> None:
        self._accumulators = {id(node): node for node in accumulators}
        self._walking = bool(self._accumulators)
        self._walked_once = False

    def arm(self, outputs: Iterable[torch.Tensor]) -> None:
        """After a forward with grad enabled: hook the nodes of its graph that feed an
        accumulator of ours more than once."""
        if not self._walking:
            return
        roots = roots_of(outputs)
        if not roots:
            return
        feeders = _feeders(roots, self._accumulators)
        used_twice = {acc for acc, slots in feeders.items() if len(slots) > 1}
        if not self._walked_once:
            self._walked_once = True
            self._walking = bool(used_twice)
        by_node: dict[int, tuple[object, list[tuple[int, int]]]] = {}
        for acc in used_twice:
            for node, slot in feeders[acc]:
                by_node.setdefault(id(node), (node, []))[1].append((slot, acc))
        contributed: set[int] = set()  # accumulators given a contribution in this graph
        for node, slots in by_node.values():
            node.register_hook(_FirstContributionRowMajor(sorted(slots), contributed))


def _feeders(roots: list, accumulators: dict) -> dict[int, list[tuple[object, int]]]:
    """id(accumulator) -> (node, slot) for every edge of the graph below ``roots`` into
    one of ``accumulators``."""
    feeders: dict[int, list[tuple[object, int]]] = {}
    for node in nodes_below(roots):
        for slot, (child, _) in enumerate(node.next_functions):
            if child is not None and accumulators.get(id(child)) is child:
                feeders.setdefault(id(child), []).append((node, slot))
    return feeders


class _FirstContributionRowMajor:
    """A node post-hook: the first contribution to each of its accumulators in this
    backward leaves row-major, alone on its memory (Note [contributions summed in place])."""

    def __init__(self, slots: list[tuple[int, int]], contributed: set[int]) -> None:
        self._slots = slots  # (slot among the node's gradients, id of its accumulator)
        self._contributed = contributed

    def __call__(self, grad_inputs: tuple, grad_outputs: tuple):
        replaced = None
        for slot, acc in self._slots:
            grad = grad_inputs[slot]
            if grad is None or acc in self._contributed:
                continue
            self._contributed.add(acc)
            if grad.layout == torch.strided and not _summable_in_place(grad):
                replaced = list(grad_inputs) if replaced is None else replaced
                replaced[slot] = grad.clone(memory_format=torch.contiguous_format)
        return None if replaced is None else tuple(replaced)


def _summable_in_place(grad: torch.Tensor) -> bool:
    """Whether autograd may add the next contribution into ``grad`` (strided) in place:
    row-major, and alone on its memory (not a view of a larger gradient)."""
    return (grad.is_contiguous() and grad._base is None
            and grad.storage_offset() == 0
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())
