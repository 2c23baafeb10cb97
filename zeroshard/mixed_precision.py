"""The mixed-precision policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixedPrecision:
    """What dtype forward/backward compute in and gradients are reduced in.

    param_dtype: the dtype the model's parameters hold during forward and backward;
        fp32 master weights live in each rank's shard.
    reduce_dtype: the dtype gradients are reduced in; None means ``param_dtype``.
    """

    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype | None = None
