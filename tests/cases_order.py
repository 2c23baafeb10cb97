"""Stage 3 loops in which ranks run different units, for Note [one order] in
zeroshard/stage3.py: each returns its rank's sequence of collectives and how far its
parameters are from single-process training over every rank's data."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import zeroshard
from grad_hooks import after_zeroshard

# pattern -> reshard_after_forward. In step 1 rank 0 runs unit b (or blk twice) and the
# other ranks do not, in a loop that also:
PATTERNS = {
    "no_grad forward before backward": False,  # releases every unit before backward
    "second backward through a retained graph": False,  # the first one released them
    "unit skipped in one of two forwards": True,  # one backward of both forwards' losses
    "reentrant checkpointed unit run twice": True,  # its recomputations in backward
    # b, run by no rank in the first step, then by rank 0 alone: put after c in the walk,
    # it made rank 0 walk past blk and c to b and gather them again, out of order (a
    # helper's long-run probe: gloo aborted on a size mismatch)
    "unit no rank ran in the first step, run on one later": True,
}
STEPS = 2
LR = 0.1


class Net(nn.Module):
    """a, then b added on ranks that use it, then blk ``reps`` times, then c."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.blk, self.c = (nn.Linear(4, 4) for _ in range(4))
        self.use_b, self.reps, self.reentrant = True, 1, False

    def forward(self, x):
        h = self.a(x)
        if self.use_b:
            h = h + self.b(h)
        for _ in range(self.reps):
            h = checkpoint(self.blk, h, use_reentrant=True) if self.reentrant else self.blk(h)
        return self.c(h)


def _train_single_process(reference: nn.Module, steps: int, world_size: int, backward) -> None:
    """Every rank's step in turn, gradients averaged, as DDP would: ``backward(step,
    rank)`` runs that rank's backward on ``reference``; SGD at LR steps it."""
    sgd = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(steps):
        for rank in range(world_size):
            backward(step, rank)
        for param in reference.parameters():
            if param.grad is not None:
                param.grad /= world_size
        sgd.step()
        sgd.zero_grad()


def _difference(opt, model: nn.Module, reference: nn.Module) -> float:
    with opt.summon_full_params():
        return max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))


def _batch(step: int, rank: int, micro: int) -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(100 * step + 10 * rank + micro))


def _train_step(model, pattern: str, step: int, rank: int, after_forward=None) -> None:
    """One step's forwards and backwards as ``rank`` runs them."""
    differs = step == 1 and rank != 0
    model.reentrant = pattern == "reentrant checkpointed unit run twice"
    model.reps = 1 if differs or not model.reentrant else 2
    if pattern == "unit skipped in one of two forwards":
        model.use_b = True
        first = model(_batch(step, rank, 0)).square().mean()
        model.use_b = not differs
        (first + model(_batch(step, rank, 1)).square().mean()).backward()
        return
    model.use_b = not differs
    if pattern == "unit no rank ran in the first step, run on one later":
        model.use_b = step == 1 and rank == 0
    loss = model(_batch(step, rank, 0)).square().mean()
    if after_forward is not None:
        after_forward(loss)
    if pattern == "second backward through a retained graph":
        loss.backward(retain_graph=True)
    loss.backward()


def one_order_when_ranks_differ(ctx, pattern: str):
    model = Net()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=nn.Linear, reshard_after_forward=PATTERNS[pattern], lr=LR)
    opt.comm_stats.trace = trace = []

    def no_grad_forward(loss):
        if pattern == "no_grad forward before backward":
            with torch.no_grad():
                model(_batch(99, ctx.rank, 0))
    for step in range(STEPS):
        _train_step(model, pattern, step, ctx.rank, no_grad_forward)
        opt.step()
        opt.zero_grad()

    reference = Net()
    _train_single_process(reference, STEPS, ctx.world_size,
                          lambda step, rank: _train_step(reference, pattern, step, rank))
    difference = _difference(opt, model, reference)
    opt.close()
    return trace, difference


class Repeated(nn.Module):
    """a, then blk ``reps`` times (under reentrant or non-reentrant checkpointing, or
    not; with c after each run when ``between``), then c (with ``blk_last`` no c: blk
    is the schedule's last unit), then a parameter of the root. ``nested``: blk is a
    unit holding two Linear units."""

    def __init__(self, checkpointing: str | None, nested: bool = False, between: bool = False,
                 blk_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointing, self.between, self.blk_last = checkpointing, between, blk_last
        self.a = nn.Linear(4, 4)
        self.blk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)) if nested else nn.Linear(4, 4)
        self.c = None if blk_last else nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.reps = 1

    def _blk(self, h):
        if self.checkpointing is None:
            return self.blk(h)
        return checkpoint(self.blk, h, use_reentrant=self.checkpointing == "reentrant")

    def forward(self, x):
        h = self.a(x)
        for _ in range(self.reps):
            h = self._blk(h)
            if self.between:
                h = self.c(h)
        return h * self.scale if self.blk_last or self.between else self.c(h) * self.scale


# how -> (model options, blk's runs in the first step on every rank (or per rank), two
# forwards per step).
# From the second step on the ranks run blk a different number of times (REPS).
RUN_MORE_OFTEN = {
    "reentrant": ({"checkpointing": "reentrant"}, 1, False),
    "reentrant, last unit, first step twice": ({"checkpointing": "reentrant", "blk_last": True}, 2,
                                               False),
    "reentrant, two forwards": ({"checkpointing": "reentrant"}, 1, True),
    # a unit of two layers: backward reads it after its first gradient comes
    "reentrant two-layer unit, first step twice": ({"checkpointing": "reentrant", "nested": True,
                                                    "units": nn.Sequential}, 2, False),
    "reentrant, ranks differ in the first step": ({"checkpointing": "reentrant"}, [2, 1], False),
    "non-reentrant, two forwards": ({"checkpointing": "nonreentrant"}, 1, True),
    "nested units, first step twice": ({"checkpointing": None, "nested": True}, 2, False),
    "units between, first step twice": ({"checkpointing": None, "between": True}, 2, False),
    "reentrant nested units, first step twice": ({"checkpointing": "reentrant", "nested": True}, 2,
                                                 False),
}
REPS = [[1, 2], [3, 1], [2, 3]]  # [step - 1][rank]


def _repeated_loss(model, how: str, step: int, rank: int) -> torch.Tensor:
    _, first_runs, two_forwards = RUN_MORE_OFTEN[how]
    if isinstance(first_runs, list):
        first_runs = first_runs[rank]
    model.reps = first_runs if step == 0 else REPS[step - 1][rank]
    loss = model(_batch(step, rank, 0)).square().mean()
    if two_forwards:
        model.reps = 1
        loss = loss + model(_batch(step, rank, 1)).square().mean()
    return loss


def _train_beside_single_process(ctx, opt, model, reference, backward, steps: int,
                                 before=lambda: None):
    """``steps`` steps of ``opt`` over ``model``, ``backward(net, step, rank)`` running this
    rank's backward (after ``before()``), warnings caught; then single-process training of
    ``reference`` alike. Returns the parameters' largest difference and zeroshard's
    warnings; closes ``opt``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before()
        for step in range(steps):
            backward(model, step, ctx.rank)
            opt.step()
            opt.zero_grad()
    _train_single_process(reference, steps, ctx.world_size,
                          lambda step, rank: backward(reference, step, rank))
    difference = _difference(opt, model, reference)
    opt.close()
    return difference, [str(w.message) for w in caught if "zeroshard" in str(w.message)]


def run_more_often_from_the_second_step(ctx, how: str, reshard_after_forward: bool):
    """Note [run twice from the second step on]: ranks run blk different numbers of
    times after a first step that ran it alike. Returns the rank's collectives, how far
    its parameters are from single-process training, and the warnings it gave."""
    options = dict(RUN_MORE_OFTEN[how][0])
    units = options.pop("units", [nn.Sequential, nn.Linear] if options.get("nested") else nn.Linear)
    model = Repeated(**options)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=units, reshard_after_forward=reshard_after_forward, lr=LR)
    opt.comm_stats.trace = trace = []
    return (trace, *_train_beside_single_process(
        ctx, opt, model, Repeated(**options),
        lambda net, step, rank: _repeated_loss(net, how, step, rank).backward(), len(REPS) + 1))


class Bookends(nn.Module):
    """blk, a, b, then blk again (a block shared by the first and the last layer); ``skip``
    names the calls of blk left out ("first", "last")."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blk, self.a, self.b = (nn.Linear(4, 4) for _ in range(3))
        self.skip = ()

    def forward(self, x):
        h = x if "first" in self.skip else torch.tanh(self.blk(x))
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        return h if "last" in self.skip else self.blk(h)


def a_held_unit_skipped_once_on_one_rank(ctx, skip: str, reshard_after_forward: bool):
    """Note [runs before the walk moves on]: blk runs twice a pass on every rank in the
    first step, so it is held gathered for each later pass; from the second step on
    rank 1 leaves out one of its two calls (``skip``). The walk passed over it there,
    released it, and gathered it again on rank 1 alone: gloo aborted (a helper's probe).
    Returns the rank's collectives, its distance from single-process training and its
    warnings."""
    def backward(net, step, rank):
        net.skip = (skip,) if step > 0 and rank == 1 else ()
        net(_batch(step, rank, 0)).square().mean().backward()
    model, reference = Bookends(), Bookends()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=nn.Linear, reshard_after_forward=reshard_after_forward, lr=LR)
    opt.comm_stats.trace = trace = []
    return (trace, *_train_beside_single_process(ctx, opt, model, reference, backward, 3))


class Layers(nn.Module):
    """Three layers in a row; ``only_last``: the last alone (an early-exit evaluation);
    ``skip_first``: the first left out (layer drop)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.only_last = self.skip_first = False

    def forward(self, x):
        if self.only_last:
            return self.layers[2](x)
        for i, layer in enumerate(self.layers):
            if not (i == 0 and self.skip_first):
                x = torch.tanh(layer(x))
        return x


def evaluation_before_the_first_step(ctx, drop: bool):
    """Note [evaluation before the first step]: every rank evaluates the last layer alone
    under no_grad, then trains the layers in order, rank 1 dropping the first from the
    second step on (``drop``). The evaluation was recorded as the order to walk: every
    later pass warned and gathered the last layer twice, and with the drop gloo aborted
    (a helper's probe). Returns the collectives, the distance from single-process
    training and the warnings."""
    def backward(net, step, rank):
        net.skip_first = drop and step > 0 and rank == 1
        net(_batch(step, rank, 0)).square().mean().backward()
    model, reference = Layers(), Layers()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=nn.Linear, lr=LR)
    opt.comm_stats.trace = trace = []

    def evaluate_the_last_layer() -> None:
        model.only_last = True
        with torch.no_grad():
            model(_batch(99, ctx.rank, 0))
        model.only_last = False
    return (trace, *_train_beside_single_process(ctx, opt, model, reference, backward, 3,
                                                 before=evaluate_the_last_layer))


def every_rank_runs_a_nested_block_more_often_later(ctx):
    """Note [run twice from the second step on]: every rank runs a block holding units
    once in the first step and twice from then on. Its inner units are gathered again
    on every rank, so it trains; each rank warns, naming the unit, before the gather.
    Returns the difference from single-process training and the warnings."""
    model, reference = Repeated(None, nested=True), Repeated(None, nested=True)
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=[nn.Sequential, nn.Linear], lr=LR)

    def backward(net, step, rank):
        net.reps = 1 if step == 0 else 2
        net(_batch(step, rank, 0)).square().mean().backward()
    return _train_beside_single_process(ctx, opt, model, reference, backward, 3)


def gathered_peak_in_backward(ctx, how: str):
    """Note [run twice from the second step on]: six Linear units; each step runs, as
    ``how`` says, a training forward whose output is dropped (a log line without
    no_grad) then one that backward goes through, or one forward under reentrant
    checkpointing of the whole model. Nothing is recomputed more than once, so each
    unit is released once its gradient is in. Returns the most parameter bytes held
    gathered while backward accumulated gradients (from the second step on), one
    unit's bytes, and the largest parameter difference from single-process training."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    model, reference = build(), build()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.SGD, stage=3, process_group=ctx.group,
                                  units=nn.Linear, lr=LR)
    peak, step_now = [0], [0]

    def record(_param):
        if step_now[0] >= 1:
            peak[0] = max(peak[0], opt.memory_report()["parameters"])
    nodes = [after_zeroshard(p, record) for p in model.parameters()]

    def loss(net, step, rank):
        x = _batch(step, rank, 0).repeat(1, 8)
        if how == "dropped forward":
            net(x)
            return net(x).square().mean()
        return checkpoint(net, x.requires_grad_(), use_reentrant=True).square().mean()
    for step in range(3):
        step_now[0] = step
        loss(model, step, ctx.rank).backward()
        opt.step()
        opt.zero_grad()
    del nodes
    _train_single_process(reference, 3, ctx.world_size,
                          lambda step, rank: loss(reference, step, rank).backward())
    difference = _difference(opt, model, reference)
    unit_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    opt.close()
    return peak[0], unit_bytes, difference

