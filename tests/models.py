"""Small models for the tests, built from picklable specs; sizes chosen not to divide by N."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class MLP(nn.Module):
    """An MLP with a constant buffer, an optionally frozen first layer, and an optional
    branch that only ranks whose batch has a positive first feature use; with
    ``branch_everywhere`` the other ranks run it too but leave its output unused."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int, frozen: bool,
                 unused_branch: bool, branch_everywhere: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d_in))
        dims = [d_in] + [hidden] * depth + [d_out]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*layers[:-1])
        if frozen:
            self.body[0].weight.requires_grad_(False)
        self.branch = nn.Linear(d_in, d_out) if unused_branch else None
        self.branch_everywhere = branch_everywhere

    def forward(self, x):
        y = self.body(x * self.scale)
        if self.branch is not None:
            used = x[:, 0].sum() > 0  # data-dependent: unused on some ranks
            if used or self.branch_everywhere:
                branch = self.branch(x)
                if used:
                    y = y + branch
        return y


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.heads = heads
        # No bias: softmax ignores a key bias, so its gradient is zero up to rounding
        # noise, which Adagrad's first step (g / |g|) turns into a random +-lr step.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A GPT-like stack; with ``tied`` its input embedding is its output head.

    ``checkpoint``: None, "reentrant" or "nonreentrant" activation checkpointing of
    each block; ``reuse``: block 0 runs twice per forward; ``reverse``: the blocks
    run last to first; ``skip_block``: set to True to skip block 0 in a forward, or to
    "discard" to run it and drop its output (it reaches no loss: no gradient);
    ``share_mlp``: every block holds block 0's MLP, one module registered in each (as
    ALBERT-style models share by module). ``frozen``: True freezes the position table
    and block 0's first norm; "lead" the embedding (with ``tied`` the head too), the
    position table and all of block 0, which then no backward reads unless the blocks
    run last to first (Note [frozen units backward never reads] in zeroshard/_walk.py).
    """

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int, tied: bool,
                 frozen: bool | str, checkpoint: str | None = None, reuse: bool = False,
                 reverse: bool = False, share_mlp: bool = False) -> None:
        super().__init__()
        self.checkpoint, self.reuse, self.reverse, self.skip_block = checkpoint, reuse, reverse, False
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        for block in list(self.blocks)[1:] if share_mlp else []:
            block.mlp = self.blocks[0].mlp
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        if frozen == "lead":
            for frozen_part in (self.emb, self.pos, self.blocks[0]):
                frozen_part.requires_grad_(False)
        elif frozen:  # ln1 opens block 0: its backward runs after the block's other gradients
            self.pos.requires_grad_(False)
            self.blocks[0].ln1.requires_grad_(False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        blocks = list(self.blocks)[::-1] if self.reverse else list(self.blocks)
        if self.reuse:
            blocks.insert(0, blocks[0])
        if self.skip_block is True:
            blocks = [b for b in blocks if b is not self.blocks[0]]
        for block in blocks:
            if block is self.blocks[0] and self.skip_block == "discard":
                block(x)  # runs; what it computes reaches no loss
                continue
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=self.checkpoint == "reentrant")
        return self.head(self.ln_f(x))


def runs_a_module_twice(spec: dict) -> bool:
    """Whether a forward of the transformer ``spec`` runs a module twice: block 0
    reused, or one MLP shared by its blocks."""
    return bool(spec.get("reuse") or (spec.get("share_mlp") and spec.get("layers", 1) > 1))


def build_model(spec: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if spec["kind"] == "mlp":
        return MLP(spec["d_in"], spec["hidden"], spec["d_out"], spec["depth"], spec["frozen"],
                   spec["unused_branch"], spec.get("branch_everywhere", False))
    return TinyTransformer(spec["vocab"], spec["d"], spec["heads"], spec["layers"], spec["seq"],
                           spec["tied"], spec["frozen"], spec.get("checkpoint"),
                           spec.get("reuse", False), spec.get("reverse", False),
                           spec.get("share_mlp", False))


def make_batch(spec: dict, seed: int, rank: int, batch: int):
    """One rank's micro-batch. For the MLP the first feature's sign follows the rank's
    parity, so the data-dependent branch is used on even ranks only."""
    g = torch.Generator().manual_seed(seed)
    if spec["kind"] == "mlp":
        x = torch.randn(batch, spec["d_in"], generator=g)
        x[:, 0] = x[:, 0].abs() * (1 if rank % 2 == 0 else -1)
        return x, torch.randn(batch, spec["d_out"], generator=g)
    idx = torch.randint(0, spec["vocab"], (batch, spec["seq"] + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_fn(spec: dict, model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    if spec["kind"] == "mlp":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def estimate_cli_example() -> nn.Module:
    """A model for `zeroshard estimate --model models:estimate_cli_example` (tests)."""
    return MLP(10, 20, 5, 2, frozen=False, unused_branch=False)


def estimate_cli_example_frozen() -> nn.Module:
    """``estimate_cli_example`` with its first weight frozen (a LoRA model's base)."""
    model = estimate_cli_example()
    next(model.parameters()).requires_grad_(False)
    return model
