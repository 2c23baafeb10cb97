"""Buffers follow rank 0 (``broadcast_buffers=True``, DDP's default).

Note [buffers follow rank 0]:
    Buffers that a forward updates (BatchNorm's running statistics) drift apart
    across ranks, each updated with its own batches. DDP broadcasts rank 0's buffers
    at the start of a forward that follows one outside ``no_sync()``; so does
    zeroshard, at the start of every forward with grad enabled (the forwards that
    train) whose previous such forward, if any, ran outside ``no_sync()``: with
    accumulation under ``no_sync()`` that is the first micro-batch's forward, not
    the last one's. One broadcast per dtype and device, counted in ``comm_stats``
    under ``broadcast``. A forward under ``torch.no_grad()`` (evaluation,
    ``generate()``) issues no collective, so it may run on rank 0 alone; it sees this
    rank's buffers. DDP differs in that it also broadcasts in the first forward after
    a training one whatever its grad mode, and not in the training forward that
    follows a ``no_grad`` one, which then starts from what that broadcast gave plus
    this rank's own ``no_grad`` update. So the parameters are DDP's, and so are the
    buffers every training forward starts from, but where a ``no_grad`` forward in
    train mode updates them (GAN fakes, a teacher pass): then ranks other than 0 start
    from rank 0's buffers, its ``no_grad`` update included, not from their own update
    of rank 0's earlier ones (documented in the README; matching DDP would need a
    collective in ``no_grad`` forwards, which rank-0-only evaluation must not issue).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _comm
from ._transforms import inside_a_transform


class BufferFollower:
    """Overwrites the model's buffers with rank 0's before a training forward that
    follows one outside ``no_sync()`` (Note [buffers follow rank 0])."""

    def __init__(self, model: nn.Module, switches, group, stats: _comm.CommStats) -> None:
        self.model = model
        self.switches = switches  # require_sync (no_sync()), summoned (summon_full_params())
        self.group = group
        self.stats = stats
        self.follows_synced_forward = True  # no training forward yet

    def before_forward(self, module, args) -> None:
        if not torch.is_grad_enabled() or self.switches.summoned or inside_a_transform():
            return  # inside a torch.func transform: Note [gradient transforms]
        follows_synced = self.follows_synced_forward
        self.follows_synced_forward = self.switches.require_sync
        if not follows_synced:
            return
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for buffer in self.model.buffers():  # now: a forward may have replaced one
            if buffer.numel():
                by_kind.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        with torch.no_grad():
            for buffers in by_kind.values():
                flat = torch.cat([b.reshape(-1) for b in buffers])
                _comm.broadcast(flat, group=self.group, stats=self.stats, label="buffers")
                for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                    # An earlier forward may have saved this buffer for a backward still
                    # to come (two forwards, one backward): keep autograd's version check
                    # quiet, as DDP's buffer sync does; that backward then sees rank 0's
                    # values, as under DDP.
                    with torch.autograd._unsafe_preserve_version_counter(buffer):
                        buffer.copy_(value.view(buffer.shape))
