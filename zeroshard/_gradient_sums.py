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

Note [an embedding's rows summed into the first contribution]:
    Summed in place, a tied embedding's contribution is still made as a tensor of the
    whole weight's size (``embedding_dense_backward`` zeroes one and adds in the rows
    the batch looked up) before autograd adds it to the head's, and it comes at the
    end of backward, where every other gradient (stage 1) or gradient shard (stages
    2-3) is alive: in the 100M GPT's stage-2 backward the RSS rose 57 MiB in that node,
    to the step's peak. So where the head's contribution came first, a pre-hook on the
    embedding's node adds the looked-up rows into it, where autograd holds it for the
    parameter's accumulator, and hands autograd no gradient from the node. The rows
    are summed by torch's own kernel on the batch's indices renumbered 0, 1, ... in
    sorted order (``_looked_up_rows``): the same rows see the same additions in the
    same order, into a tensor as large as the batch, then each one addition into the
    first contribution, which is what autograd's in-place sum does, bitwise. That is
    checked the first time per device, dtype, ``scale_grad_by_freq`` and size class, on
    the batch's indices with a narrow made-up gradient, and where it does not hold
    torch's path is kept. (On CPU it holds: the kernel adds each row's contributions in
    index order. CUDA's sorts the indices stably and sums runs of equal ones, which
    renumbering in order leaves as they were; no GPU has run it yet.)

    Only the contribution the first one's hook holds, while autograd holds it too and
    nothing else does (``_use_count() == 2``: had autograd summed a third contribution
    into a new tensor, it would hold that one instead), for an accumulator fed by one
    embedding node of the graph, outside a double backward, for a dense gradient, for
    indices not written since the forward (the node then raises torch's error), saved
    with no saved-tensor hooks but a stage-3 unit's (reading them through a checkpoint's
    would recompute its region in the forward, ``_summable_lookup``), and where the
    batch has fewer tokens than the embedding has rows (the renumbered sum is as large
    as the batch). What it bought on the 100M GPT: README, "Next to the
    peers".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._graph import nodes_below, roots_of
from ._saved_tensors import SavedTensorWatch


class InPlaceSums:
    """Hooks the nodes that feed a parameter's accumulator more than once in a
    forward (Note [contributions summed in place]). ``accumulators``: the accumulator
    nodes of the row-major managed parameters, kept alive by the caller."""

    def __init__(self, accumulators: Iterable) -> None:
        self._accumulators = {id(node): node for node in accumulators}
        self._walking = bool(self._accumulators)
        self._walked_once = False

    def replace(self, old, new) -> None:
        """A parameter's accumulator node is ``new`` now (Note [a new accumulator after a
        change of dtype] in _reducer.py)."""
        if self._accumulators.pop(id(old), None) is not None:
            self._accumulators[id(new)] = new

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
        embedding_of: dict[int, object] = {}  # accumulator -> its one embedding node
        for acc in used_twice:
            embeddings = [node for node, _ in feeders[acc] if _summable_lookup(node)]
            if len(embeddings) == 1:
                embedding_of[acc] = embeddings[0]
            for node, slot in feeders[acc]:
                by_node.setdefault(id(node), (node, []))[1].append((slot, acc))
        contributed: set[int] = set()  # accumulators given a contribution in this graph
        held: dict[int, torch.Tensor] = {}  # Note [an embedding's rows summed into the first contribution]
        for node, slots in by_node.values():
            awaiting = {acc for _, acc in slots
                        if acc in embedding_of and embedding_of[acc] is not node}
            node.register_hook(_FirstContributionRowMajor(sorted(slots), contributed,
                                                          awaiting, held))
        for acc, node in embedding_of.items():
            node.register_prehook(_EmbeddingRowsIntoFirst(acc, node, held))


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

    def __init__(self, slots: list[tuple[int, int]], contributed: set[int],
                 awaiting: set[int], held: dict[int, torch.Tensor]) -> None:
        self._slots = slots  # (slot among the node's gradients, id of its accumulator)
        self._contributed = contributed
        self._awaiting = awaiting  # accumulators whose embedding node is yet to come
        self._held = held

    def __call__(self, grad_inputs: tuple, grad_outputs: tuple):
        replaced = None
        for slot, acc in self._slots:
            grad = grad_inputs[slot]
            if grad is None or acc in self._contributed:
                continue
            self._contributed.add(acc)
            if grad.layout != torch.strided:
                continue
            if not _summable_in_place(grad):
                replaced = list(grad_inputs) if replaced is None else replaced
                grad = replaced[slot] = grad.clone(memory_format=torch.contiguous_format)
            if acc in self._awaiting and not torch.is_grad_enabled():
                self._held[acc] = grad
        return None if replaced is None else tuple(replaced)


class _EmbeddingRowsIntoFirst:
    """A pre-hook on an embedding's node: its rows go into the first contribution held
    for its accumulator, and autograd gets none from the node (Note [an embedding's rows
    summed into the first contribution])."""

    def __init__(self, acc: int, node, held: dict[int, torch.Tensor]) -> None:
        self._acc = acc
        self._held = held
        # What the node saved, read now: a hook that held the node would keep the graph.
        # The indices are the forward's own tensor: one written in place since is left
        # to the node, which raises torch's error for it.
        self._indices = node._saved_indices
        self._version = self._indices._version
        self._rows = node._saved_weight_sym_argsize_0
        padding = node._saved_padding_idx  # -1 (shown unsigned) when there is none
        self._padding = padding if 0 <= padding < self._rows else -1
        self._scale = node._saved_scale_grad_by_freq

    def __call__(self, grad_outputs: tuple):
        first = self._held.pop(self._acc, None)
        grad = grad_outputs[0]
        if (first is None or grad is None or torch.is_grad_enabled()
                or _use_count(first) != 2  # this frame's and autograd's input buffer
                or grad.layout != torch.strided or grad.dtype != first.dtype
                or grad.device != first.device or first.shape[0] != self._rows
                or self._indices.numel() >= self._rows
                or self._indices._version != self._version
                or not _renumbering_exact(grad, self._indices, self._rows, self._padding,
                                          self._scale)):
            return None
        rows, sums = _looked_up_rows(grad, self._indices, self._padding, self._scale)
        first.index_add_(0, rows, sums)
        return (None,)


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s implementation (0 where this torch cannot say)."""
    count = getattr(tensor, "_use_count", None)
    return count() if count is not None else 0


def _summable_lookup(node) -> bool:
    """Whether ``node`` is an embedding lookup's backward with a dense gradient whose
    indices can be read now without side effects: saved as they were, or through a
    stage-3 unit's own saved-tensor hooks. Reading them through another pair of hooks
    would call its unpack in the forward: a checkpoint's recomputes the region (its
    memory saving lost, BatchNorm's statistics counted again), an offloading one may
    give a tensor only once (a reviewer's probes)."""
    if type(node).__name__ != "EmbeddingBackward0" or node._saved_sparse:
        return False
    unknown = object()  # a torch whose saved tensors do not say: left to torch
    unpack = getattr(node._raw_saved_indices, "unpack_hook", unknown)
    return unpack is None or isinstance(getattr(unpack, "__self__", None), SavedTensorWatch)


def _looked_up_rows(grad: torch.Tensor, indices: torch.Tensor, padding: int,
                    scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, sums): the embedding's gradient is ``sums[j]`` at row ``rows[j]`` and zero
    elsewhere (an unused ``j`` has row 0 and a zero sum). Torch's kernel over the indices
    renumbered in sorted order, so without a host synchronisation (Note [an embedding's
    rows summed into the first contribution])."""
    flat = indices.reshape(-1)
    in_order, where = flat.sort(stable=True)
    starts = torch.ones_like(in_order, dtype=torch.bool)
    starts[1:] = in_order[1:] != in_order[:-1]
    numbers = starts.cumsum(0) - 1
    renumbered = torch.empty_like(numbers).scatter_(0, where, numbers)
    rows = torch.zeros_like(flat).scatter_(0, numbers, in_order)
    grad = grad.reshape(flat.numel(), grad.shape[-1])
    if padding >= 0:  # the padding row gets nothing: its renumbered row sums zeros
        grad = grad.masked_fill((flat == padding).unsqueeze(1), 0)
    return rows, torch.ops.aten.embedding_dense_backward(grad, renumbered, flat.numel(), -1,
                                                         scale)


_exact_by_kind: dict[tuple, bool] = {}
_CHECK_WIDTH = 32  # columns of the check's gradient: the kernels order rows, not columns


def _renumbering_exact(grad, indices, rows_in_weight: int, padding: int, scale: bool) -> bool:
    """Whether ``_looked_up_rows`` gives torch's own gradient bit for bit. Checked the
    first time per device type, dtype, ``scale`` and size class, on these indices with a
    narrow made-up gradient (no random numbers drawn: the user's generator is left as it
    was), so the check costs ``_CHECK_WIDTH`` columns of the weight, not the weight."""
    # CUDA's kernel takes another path above 3072 indices.
    kind = (grad.device.type, grad.dtype, scale, indices.numel() > 3072)
    if kind not in _exact_by_kind:
        n = indices.numel()
        width = min(grad.shape[-1], _CHECK_WIDTH)
        made_up = torch.arange(n * width, device=grad.device).reshape(n, width)
        made_up = made_up.float().mul(0.731).sin().mul(1e3).to(grad.dtype)
        rows, sums = _looked_up_rows(made_up, indices, padding, scale)
        dense = torch.ops.aten.embedding_dense_backward(made_up, indices.reshape(-1),
                                                        rows_in_weight, padding, scale)
        _exact_by_kind[kind] = torch.equal(torch.zeros_like(dense).index_add_(0, rows, sums),
                                           dense)
    return _exact_by_kind[kind]


def _summable_in_place(grad: torch.Tensor) -> bool:
    """Whether autograd may add the next contribution into ``grad`` (strided) in place:
    row-major, and alone on its memory (not a view of a larger gradient)."""
    return (grad.is_contiguous() and grad._base is None
            and grad.storage_offset() == 0
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())
