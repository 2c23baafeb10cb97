"""Calls that make tensors the optimizer keeps, made outside a user's inference mode.

Note [inference mode]:
    A user's evaluation block may be ``torch.inference_mode()``, and zeroshard's calls
    made inside it (its construction, ``step``, ``zero_grad``, the loads, ``close``, the
    end of ``summon_full_params()``) made inference tensors that the optimizer or the
    model kept: the next training step may not change those, nor save them for backward,
    and torch's raw errors followed, at once or a step later (``Inference tensors do not
    track version counter``, ``Inplace update to inference tensor outside
    InferenceMode``, ``'NoneType' object has no attribute 'next_functions'``; helpers'
    probes). So those calls leave inference mode for their own work. Leaving it turns
    grad mode on (torch's guard), where inference mode had it off, so they turn it off
    again: the call runs as under ``torch.no_grad()``, which is what the caller had.
"""

from __future__ import annotations

import functools

import torch


def outside_inference_mode(function):
    """``function`` run outside inference mode, with grad mode off, if called inside it;
    else as it is (Note [inference mode])."""
    @functools.wraps(function)
    def outside(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return function(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return function(*args, **kwargs)
    return outside
