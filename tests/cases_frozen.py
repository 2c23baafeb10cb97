"""Worker-side functions for Note [frozen units backward never reads]
(zeroshard/_walk.py): stage-3 units with only frozen parameters that no rank's backward
reads are left out of the backward walk, and a rank whose backward reads one all the
same keeps it gathered from its forward, in step with the others' collectives."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import zeroshard
from cases import average_used_gradients, largest_difference

VOCAB, WIDTH = 40, 8
HIDDEN = (3, 12, 24, 40)  # a different gather size for each block
FROZEN_BLOCKS = 2  # the leading blocks, and the embedding, are frozen


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, hidden)
        self.down = nn.Linear(hidden, WIDTH)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Prompt(nn.Module):
    """A trainable vector added after the frozen embedding on the batches that ask for it:
    only then does backward reach the frozen blocks (to give the prompt its gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, h):
        return h + self.vector


class Shift(nn.Module):
    """A frozen vector added (backward never reads it) that, with ``decays``, its own
    forward scales in place, as a running statistic would."""

    def __init__(self) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.linspace(-1, 1, WIDTH), requires_grad=False)
        self.decays = False

    def forward(self, h):
        if self.decays:
            with torch.no_grad():
                self.vector.mul_(0.9)
        return h + self.vector


class FineTuned(nn.Module):
    """A frozen embedding, a frozen shift and frozen leading blocks under trained ones
    and a trained head."""

    def __init__(self, checkpointed: str = "") -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.prompt = Prompt()
        self.shift = Shift()
        self.blocks = nn.ModuleList(Block(h) for h in HIDDEN)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.checkpointed = checkpointed  # every block: "reentrant", "non_reentrant", ""
        self.checkpoint_a_frozen_block = False  # block 1, reentrant
        self.embedding.requires_grad_(False)
        for block in self.blocks[:FROZEN_BLOCKS]:
            block.requires_grad_(False)

    def forward(self, idx, prompted: bool = False):
        h = self.embedding(idx)
        if prompted:
            h = self.prompt(h)
        h = self.shift(h)
        for index, block in enumerate(self.blocks):
            if self.checkpointed:
                h = checkpoint(block, h, use_reentrant=self.checkpointed == "reentrant")
            elif self.checkpoint_a_frozen_block and index == 1:
                h = checkpoint(block, h, use_reentrant=True)
            else:
                h = block(h)
        return self.head(h)


def _prompted(way: str, step: int, rank: int) -> bool:
    """Whether this rank's training forward of ``step`` takes the branch through the
    prompt (its backward then reads the frozen blocks)."""
    if way in ("one_rank", "eval_between", "two_forwards", "no_sync", "checkpointed_on_one_rank",
               "retained_in_no_sync", "written_while_kept"):
        return rank == 1 and step in (2, 3)
    if way == "loaded_after_a_forward":  # its forward without backward, before the load
        return rank == 1 and step == 2
    if way == "every_rank":
        return step in (2, 3)
    return way == "reentrant"  # reentrant checkpointing needs an input that requires grad


def reads_anywhere(way: str, step: int, world_size: int) -> bool:
    return any(_prompted(way, step, r) for r in range(world_size))


def train(ctx, way: str, reshard_after_forward: bool = True, steps: int = 6):
    """``steps`` AdamW steps (fp64) of stage 3 (units: the blocks, the prompt and the
    shift) beside DDP, each rank on its own tokens, driven the ``way`` named. Returns
    per step: the largest parameter difference from DDP, the sizes of the all-gathers
    backward issued and of those the step issued in all (in order); and the gather size
    of each unit's buckets, the frozen units' apart.

    Found by helper-97: "checkpointed_on_one_rank" (rank 1 runs frozen block 1 under
    reentrant checkpointing while prompted: it alone kept walking the block, and gloo
    aborted two steps later), "retained_in_no_sync" (a backward inside no_sync() with
    retain_graph=True, then a synced one through the same graph: the first released what
    rank 1 kept, and the second raised there), "written_while_kept" (the frozen shift
    scales itself in each of two forwards a step: rank 1 kept it, its writes never
    reached the shard the others gathered, 3e-4 from DDP). Found by helper-98:
    "loaded_after_a_forward" (a training forward without backward kept the frozen blocks
    on rank 1, and a load left their old values there for its next forward: 3.4e-2)."""
    torch.manual_seed(0)
    checkpointed = way if way in ("non_reentrant", "reentrant") else ""
    with torch.device("cpu"):
        model = FineTuned(checkpointed).double()
        reference = FineTuned(checkpointed).double()
    reference.load_state_dict(model.state_dict())
    with torch.device("cpu"):
        loaded = {k: v + 0.01 for k, v in FineTuned().double().state_dict().items()}
    model.shift.decays = reference.shift.decays = way == "written_while_kept"
    # DDP cannot: a retained graph backwarded inside no_sync; a forward without backward
    if way in ("retained_in_no_sync", "loaded_after_a_forward"):
        ddp, average = reference, average_used_gradients
    else:  # the prompt unused on some ranks; with reentrant checkpointing everywhere (the
        # prompt used on every rank) DDP needs a static graph instead
        ddp, average = DistributedDataParallel(
            reference, process_group=ctx.group, **({"static_graph": True} if way == "reentrant"
                                                   else {"find_unused_parameters": True})), None
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=3, lr=1e-2,
                                  process_group=ctx.group, units=(Block, Prompt, Shift),
                                  reshard_after_forward=reshard_after_forward)
    frozen = {id(b) for b in model.blocks[:FROZEN_BLOCKS]} | {id(model.shift)}
    sizes = [b.layout.padded_numel * 8 for u in opt.sharding.units for b in u.buckets]
    frozen_sizes = [b.layout.padded_numel * 8 for u in opt.sharding.units
                    if id(u.module) in frozen for b in u.buckets]
    block_1_sizes = [b.layout.padded_numel * 8 for u in opt.sharding.units
                     if u.module is model.blocks[1] for b in u.buckets]
    opt.comm_stats.trace = trace = []
    differences, backward_gathers, step_gathers = [], [], []
    for step in range(steps):
        prompted = _prompted(way, step, ctx.rank)
        generator = torch.Generator().manual_seed(10 * step + ctx.rank)
        idx = torch.randint(0, VOCAB, (4, 6), generator=generator)
        target = torch.randint(0, VOCAB, (4, 6), generator=generator)
        start = len(trace)
        for net, optimizer in ((model, opt), (ddp, ref_opt)):
            getattr(net, "module", net).checkpoint_a_frozen_block = (
                way == "checkpointed_on_one_rank" and prompted)
            if way == "loaded_after_a_forward" and step == 2:  # a validation loss without
                net(idx, prompted)  # no_grad (rank 1 keeps the frozen blocks), then a load
                if net is model:
                    opt.load_full_state_dict(loaded)
                else:
                    reference.load_state_dict(loaded)
            if way == "no_sync":  # a first micro-batch inside no_sync, unprompted
                with (opt.no_sync() if net is model else ddp.no_sync()):
                    (F.cross_entropy(net(idx[:2]).flatten(0, 1), target[:2].flatten()) / 2
                     ).backward()
                idx_used, target_used, scale = idx[2:], target[2:], 2
            else:
                idx_used, target_used, scale = idx, target, 1
            trains_prompted = prompted and way != "loaded_after_a_forward"
            if way in ("two_forwards", "written_while_kept"):  # two training forwards, one backward
                loss = sum(F.cross_entropy(net(idx_used[i::2], trains_prompted).flatten(0, 1),
                                           target_used[i::2].flatten()) for i in range(2))
            else:
                loss = F.cross_entropy(net(idx_used, trains_prompted).flatten(0, 1),
                                       target_used.flatten())
            if way == "eval_between":  # an evaluation between forward and backward
                with torch.no_grad():
                    net(idx)
            if way == "retained_in_no_sync":
                with (opt.no_sync() if net is model else contextlib.nullcontext()):
                    (0.3 * loss).backward(retain_graph=True)
                loss = 0.7 * loss
            before_backward = len(trace)
            (loss / scale).backward()
            if net is model:
                backward_gathers.append([b for _, op, b in trace[before_backward:]
                                         if op == "all_gather"])
            elif average is not None:
                average(reference, ctx)
            optimizer.step()
            optimizer.zero_grad()
        step_gathers.append([b for _, op, b in trace[start:] if op == "all_gather"])
        differences.append(largest_difference(opt, model, ddp))
    opt.close()
    return differences, backward_gathers, step_gathers, sizes, frozen_sizes, block_1_sizes


def skipped_in_backward(backward: list[int], sizes: list[int]) -> Counter:
    """The gathers of every unit's buckets that ``backward`` did not issue."""
    return Counter(sizes) - Counter(backward)
