"""What ``cases.train_side_by_side`` returns from each rank: one typed record of a run,
zeroshard beside DDP and single-process training, that tests/invariants.py checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SideBySideRun:
    # -- every step, after it (parameters flattened in model.parameters() order) -------
    zero: list[torch.Tensor] = field(default_factory=list)  # zeroshard's parameters
    ddp: list[torch.Tensor] = field(default_factory=list)  # DDP's
    single: list[torch.Tensor] = field(default_factory=list)  # single-process training's
    zero_loss: list[float] = field(default_factory=list)  # this rank's loss, summed over micro-batches
    ddp_loss: list[float] = field(default_factory=list)
    single_loss: list[float] = field(default_factory=list)  # the mean over ranks
    zero_norm: list[float] = field(default_factory=list)  # clip_grad_norm_'s (if clipping)
    ddp_norm: list[float] = field(default_factory=list)
    single_norm: list[float] = field(default_factory=list)
    comm: list[dict] = field(default_factory=list)  # bytes per collective along "shard" (step_comm)
    comm_replicate: list[dict] = field(default_factory=list)  # and along "replicate"
    mem: list[dict] = field(default_factory=list)  # memory_report() before the step
    eval_diff: list[float] = field(default_factory=list)  # no_grad forward vs a plain module
    # What bounds each element's rounding (invariants.update_bounds), from the
    # single-process reference: its gradient (NaN: none), the sum over ranks and
    # micro-batches of |each contribution|, how far the gradient moves at the other
    # runs' parameters, and each element's lr and weight decay.
    single_grad: list[torch.Tensor] = field(default_factory=list)
    grad_abs_sum: list[torch.Tensor] = field(default_factory=list)
    moved_grad: list[torch.Tensor] = field(default_factory=list)
    single_lr: list[torch.Tensor] = field(default_factory=list)
    single_wd: list[torch.Tensor] = field(default_factory=list)
    # -- the run ------------------------------------------------------------------------
    initial: torch.Tensor | None = None  # parameters after construction (rank 0's)
    trace: list = field(default_factory=list)  # comm_stats.trace: every collective, in order
    psi: int = 0  # trainable elements
    psi_all: int = 0  # every parameter's elements
    psi_frozen_units: int = 0  # stage 3: those of units with only frozen parameters (cases.py)
    largest_param_bytes: int = 0
    largest_bucket_bytes: int = 0
    root_bucket_bytes: int = 0  # stage 3: the root unit's trainable buckets
    n_buckets: int = 0  # trainable buckets
    n_all_buckets: int = 0  # every bucket, frozen included
    n_params: int = 0  # trainable parameters
    n_all_params: int = 0  # every parameter
    n_units: int = 0  # stage 3
    flags_per_backward: int = 0  # stage 3's 4-byte flags after each synced backward
    buffer_bytes: int = 0
    final_mem: dict = field(default_factory=dict)  # memory_report() after the last step
    ddp_state_bytes: int = 0  # DDP's optimizer state
    peak_grad_bytes: int = 0  # live gradients in backward, from the second step
    peak_param_bytes: int = 0  # stage 3: full parameters held at once
    block_bytes: list[int] = field(default_factory=list)  # each transformer block's
    lrs: list[float] = field(default_factory=list)  # zeroshard's param groups' lr at the end
    ddp_lrs: list[float] = field(default_factory=list)
