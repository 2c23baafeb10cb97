"""Worker-side functions for Note [released once backward has read it]
(zeroshard/stage3.py): a stage-3 unit is released in backward once backward has read
every parameter its forward saved, not only once its gradients are all in."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import zeroshard
from cases import average_by_hand, differences_per_step, largest_difference

VOCAB, WIDTH, BLOCKS = 48, 16, 3


class LinearKeepingItsWeight(torch.autograd.Function):
    """``x @ w.t()`` whose backward reads ``w`` from its ``ctx``, where saved-tensor hooks
    do not see it (as many custom kernels keep their weights)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad @ ctx.w, grad.flatten(0, -2).t() @ x.flatten(0, -2)


class Block(nn.Module):
    """``kind``: "plain"; "frozen", a LoRA-like block (``lin`` frozen, a trainable adapter
    beside); "frozen_ctx", the same with ``lin``'s frozen weight used through
    ``LinearKeepingItsWeight``; "ctx", ``lin``'s weight used through
    ``LinearKeepingItsWeight`` and a Linear after it."""

    def __init__(self, kind: str = "plain") -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(WIDTH, WIDTH)
        if kind.startswith("frozen"):
            self.lin.requires_grad_(False)
            self.adapter = nn.Linear(WIDTH, WIDTH, bias=False)
        if kind == "ctx":
            self.after = nn.Linear(WIDTH, WIDTH)

    def forward(self, h):
        if self.kind == "frozen":
            return h + torch.tanh(self.lin(h) + self.adapter(h))
        if self.kind == "frozen_ctx":  # the adapter's backward runs first (created later)
            return h + torch.tanh(LinearKeepingItsWeight.apply(h, self.lin.weight) + self.adapter(h))
        if self.kind == "ctx":
            return h + self.after(torch.tanh(LinearKeepingItsWeight.apply(h, self.lin.weight)))
        return h + torch.tanh(self.lin(h))


class TiedLM(nn.Module):
    """A token embedding tied to the output head, as GPTs have it: the root unit's
    embedding is read by the head at the start of backward and gets its own gradient
    at the very end. ``variant``:

    - "plain";
    - "checkpointed" / "checkpointed_reentrant": a root-level layer after the
      embedding runs under activation checkpointing, so backward recomputes it (reads
      its weight) near the end, after the head's read;
    - "shared_with_block": block 0's weight is also a root-level layer's (tied by
      assignment, so the root unit owns it) and block 0's forward saves it;
    - "frozen_base": LoRA-like blocks;
    - "frozen_ctx_weight": LoRA-like blocks whose frozen weight is kept on a custom
      Function's ``ctx``, read after the block's last saved view and last gradient;
    - "frozen_checkpointed" / "frozen_checkpointed_reentrant": LoRA-like blocks, each
      under activation checkpointing;
    - "ctx_weight": blocks whose backward reads a weight kept on a custom Function's
      ``ctx``, after the block's last saved view is read;
    - "parameter_hook": a hook on the token embedding, as users fold weight decay into
      the gradient, reads the weight when its gradient comes, at backward's end;
    - "module_hook_on_block": a full backward pre-hook on block 0 scales its output's
      gradient by the token embedding's norm (read after the head's read);
    - "module_hook_on_layer": a full backward hook on each block's layer scales its
      input's gradient by the layer's own weight's norm (read after its gradients);
    - "pre_hook_on_own_block": a full backward pre-hook on each block (a unit's own
      module) scales its output's gradient by the block's own weight's norm;
    - "post_hook_keyword_input": each block is called with its input as a keyword, and
      a full backward hook on it logs its own weight's norm (``logged``);
    - "pre_hook_on_root": a full backward pre-hook on the model (the root unit's own
      module) scales the gradient of its output by the token embedding's norm;
    - "hooks_during_forward": ``hooks_for_one_forward`` puts a full backward hook on
      each block, scaling its input's gradient by the block's own weight's norm, which
      the caller removes after the forward, before its backward (torch still calls it);
    - "root_hook_after_optimizer": ``hooks_after_optimizer`` puts a full backward
      pre-hook on the model that logs the token embedding's norm.

    ``seen`` records, each time backward reaches block 0's output, whether the token
    embedding, block 1 and block 2 (whose backward is done by then) were gathered
    (False: a placeholder, released)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.tok = nn.Embedding(VOCAB, WIDTH)
        kind = {"frozen_ctx_weight": "frozen_ctx", "ctx_weight": "ctx"}.get(
            variant, "frozen" if variant.startswith("frozen") else "plain")
        self.blocks = nn.ModuleList(Block(kind) for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tok.weight
        if variant.startswith("checkpointed"):
            self.proj_in = nn.Linear(WIDTH, WIDTH)
        if variant == "parameter_hook":
            weight = self.tok.weight
            weight.register_hook(lambda grad: grad + 1e-2 * weight.detach())
        if variant == "shared_with_block":
            self.mix = nn.Linear(WIDTH, WIDTH, bias=False)
            self.blocks[0].lin.weight = self.mix.weight
        if variant == "module_hook_on_block":
            self.blocks[0].register_full_backward_pre_hook(
                lambda module, grad: (grad[0] * (1 + 1e-3 * self.tok.weight.norm()),))
        if variant == "module_hook_on_layer":
            for block in self.blocks:
                block.lin.register_full_backward_hook(
                    lambda module, grad_in, grad_out: (grad_in[0] * (1 + 1e-3 * module.weight.norm()),))
        if variant == "pre_hook_on_own_block":
            for block in self.blocks:
                block.register_full_backward_pre_hook(
                    lambda module, grad: (grad[0] * (1 + 1e-3 * module.lin.weight.norm()),))
        if variant == "post_hook_keyword_input":
            for block in self.blocks:
                block.register_full_backward_hook(
                    lambda module, grad_in, grad_out: self.logged.append(module.lin.weight.norm()))
        if variant == "pre_hook_on_root":
            self.register_full_backward_pre_hook(
                lambda module, grad: (grad[0] * (1 + 1e-3 * module.tok.weight.norm()),))
        self.seen: list[tuple[bool, bool, bool]] = []
        self.logged: list[torch.Tensor] = []  # weight norms the hooks read, in backward

    def hooks_for_one_forward(self) -> list:
        if self.variant != "hooks_during_forward":
            return []
        return [block.register_full_backward_hook(
            lambda module, grad_in, grad_out: (grad_in[0] * (1 + 1e-3 * module.lin.weight.norm()),))
            for block in self.blocks]

    def hooks_after_optimizer(self) -> None:
        if self.variant == "root_hook_after_optimizer":
            self.register_full_backward_pre_hook(
                lambda module, grad: self.logged.append(module.tok.weight.norm()))

    def forward(self, idx):
        h = self.tok(idx)
        if self.variant.startswith("checkpointed"):
            h = checkpoint(self.proj_in, h, use_reentrant=self.variant.endswith("reentrant"))
        for i, block in enumerate(self.blocks):
            if self.variant.startswith("frozen_checkpointed"):
                h = checkpoint(block, h, use_reentrant=self.variant.endswith("reentrant"))
            elif self.variant == "post_hook_keyword_input":
                h = block(h=h)
            else:
                h = block(h)
            if i == 0 and h.requires_grad:
                h.register_hook(self._note_embedding)
        if self.variant == "shared_with_block":
            h = self.mix(h)
        return self.head(self.norm(h))

    def _note_embedding(self, grad):
        self.seen.append(tuple(weight.stride() != (0, 0) for weight in (
            self.tok.weight, self.blocks[1].lin.weight, self.blocks[2].lin.weight)))


def train_tied_lm(ctx, variant: str, reshard_after_forward: bool, steps: int = 4):
    """``steps`` SGD steps of zeroshard stage 3 (units: the blocks) and of the same model
    with its gradients averaged over the ranks by hand, on each rank's own tokens.
    Returns, per step: the largest parameter difference, whether the embedding, block 1
    and block 2 were still gathered when backward reached block 0, and the all-gather
    bytes of the step; the largest difference counts the weight norms the hooks logged.
    Last, the warnings zeroshard's first step gave."""
    torch.manual_seed(0)
    model = TiedLM(variant)
    reference = TiedLM(variant)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.5, momentum=0.9,
                                  process_group=ctx.group, units=Block,
                                  reshard_after_forward=reshard_after_forward)
    model.hooks_after_optimizer()
    reference.hooks_after_optimizer()
    differences, embedding_gathered, block_gathered, last_block_gathered, gather_bytes = \
        [], [], [], [], []
    for step in range(steps):
        idx = torch.randint(0, VOCAB, (4, 6),
                            generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        target = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(7 + step))
        opt.comm_stats.reset()
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handles = net.hooks_for_one_forward()
                out = net(idx)
                for handle in handles:
                    handle.remove()
                F.cross_entropy(out.flatten(0, 1), target.flatten()).backward()
            if step == 0 and net is model:
                first_step_warnings = [str(w.message) for w in caught
                                       if str(w.message).startswith("zeroshard")]
            if net is reference:
                average_by_hand(reference, ctx)
            if net is model:
                gather_bytes.append(opt.comm_stats.bytes["all_gather"])
            optimizer.step()
            optimizer.zero_grad()
        embedding_gathered.append(model.seen[-1][0])
        block_gathered.append(model.seen[-1][1])
        last_block_gathered.append(model.seen[-1][2])
        logged = [(a - b).abs() for a, b in zip(model.logged, reference.logged, strict=True)]
        model.logged.clear()
        reference.logged.clear()
        differences.append(float(torch.stack([torch.tensor(largest_difference(
            opt, model, reference)), *logged]).max()))
    opt.close()
    return (differences, embedding_gathered, block_gathered, last_block_gathered, gather_bytes,
            first_step_warnings)


class _BlockReadingTheRootsEmbedding(nn.Module):
    """A LoRA-like block that also reads the root's trainable embedding through a frozen
    layer: that read's gradient goes to the root's parameter, not to the block's input."""

    def __init__(self, memory: nn.Embedding) -> None:
        super().__init__()
        self.memory = memory  # owned by the root (it holds it too)
        self.through = nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.lin = nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.adapter = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, h):
        read = self.through(self.memory.weight).mean(0)  # made first: run last in backward
        return h + self.lin(h) + self.adapter(h) + read


class _LeafInputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.memory = nn.Embedding(3, WIDTH)
        self.block = _BlockReadingTheRootsEmbedding(self.memory)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, h):
        return self.head(checkpoint(self.block, h, use_reentrant=False)).square().mean()


def leaf_input_under_checkpointing(ctx, steps: int = 3):
    """Note [backward past a unit's inputs]: the block's argument is a leaf that
    requires grad (an embedding output detached for adversarial training), whose hook
    runs at its accumulator, before the node that reads ``through``'s frozen weight for
    the root's embedding. Returns the largest parameter difference from the same model
    with its gradients averaged by hand, per step."""
    torch.manual_seed(0)
    model, reference = _LeafInputModel(), _LeafInputModel()
    reference.load_state_dict(model.state_dict())
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1,
                                  process_group=ctx.group, units=[_BlockReadingTheRootsEmbedding])
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)

    def loss_of(net, step):  # a leaf that requires grad, as the block's argument
        seed = 10 * ctx.rank + step
        return net(torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(seed)).requires_grad_())
    return differences_per_step(ctx, model, opt, reference, ref_opt, loss_of, steps)


def reads_of_a_unit_being_gathered(ctx, steps: int = 3) -> list[bool]:
    """Note [not a view while gathering] (zeroshard/_bucket.py): a backward pre-hook on
    each block but the first reads the block before it, the next unit backward gathers:
    that unit's gather (a prefetch) is in flight then, from the second step on. Returns,
    for each read, whether the weight read was a placeholder (stride 0), not a view of
    the buffer the gather is filling."""
    torch.manual_seed(0)
    model = TiedLM("plain")
    reads: list[bool] = []
    for previous, block in zip(model.blocks, model.blocks[1:]):
        block.register_full_backward_pre_hook(
            lambda module, grad, previous=previous: reads.append(
                previous.lin.weight.stride() == (0, 0)))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.5,
                                  process_group=ctx.group, units=Block)
    for step in range(steps):
        idx = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(step))
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return reads


class _CheckpointingLater(TiedLM):
    """``TiedLM`` that runs ``where`` under activation checkpointing while
    ``checkpointing`` is set: "blocks", each block (a unit); "layer", a layer the root
    unit holds (``proj_in``, after the embedding)."""

    def __init__(self, where: str, reentrant: bool) -> None:
        super().__init__("checkpointed" if where == "layer" else "plain")
        self.where, self.reentrant, self.checkpointing = where, reentrant, False

    def forward(self, idx):
        def run(module, h):
            if self.checkpointing:
                return checkpoint(module, h, use_reentrant=self.reentrant)
            return module(h)
        h = self.tok(idx)
        if self.where == "layer":
            h = run(self.proj_in, h)
        for i, block in enumerate(self.blocks):
            h = run(block, h) if self.where == "blocks" else block(h)
            if i == 0 and h.requires_grad:
                h.register_hook(self._note_embedding)
        return self.head(self.norm(h))


def checkpointing_begun_later_on_one_rank(ctx, where: str, reentrant: bool, steps: int = 4):
    """Rank 1 checkpoints from the third step on (as a loop that checkpoints only long
    batches may), rank 0 never. Returns, per step, the largest parameter difference from
    the same model with its gradients averaged by hand, and whether the token embedding
    was gathered when backward reached block 0."""
    torch.manual_seed(0)
    model, reference = _CheckpointingLater(where, reentrant), _CheckpointingLater(where, reentrant)
    reference.load_state_dict(model.state_dict())
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.5, momentum=0.9,
                                  process_group=ctx.group, units=Block)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)

    def loss_of(net, step):
        net.checkpointing = ctx.rank == 1 and step >= 2
        idx = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(10 * step + ctx.rank))
        target = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(7 + step))
        return F.cross_entropy(net(idx).flatten(0, 1), target.flatten())
    differences = differences_per_step(ctx, model, opt, reference, ref_opt, loss_of, steps)
    return differences, [seen[0] for seen in model.seen]
