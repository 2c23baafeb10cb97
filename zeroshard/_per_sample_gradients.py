"""opacus' per-sample gradients (DP-SGD), refused.

Note [per-sample gradients]:
    opacus' DP-SGD clips each sample's gradient of every parameter and adds noise before
    the gradients are averaged. ZeroOptimizer reduces and shards the gradients in
    backward, and its param groups hold shards with no per-sample gradient, so opacus'
    ``DPOptimizer`` around it found no parameter to clip or noise and stepped the plain
    averaged gradient: training was not private, silently (a helper's probe, every
    stage: 0.0 from non-private DDP with noise_multiplier=1.0). So a GradSampleModule in
    the model is refused at construction, and, for one wrapped around the model after
    ``ZeroOptimizer(...)`` or opacus' hooks attached without a wrapper (ghost
    clipping's ``GradSampleHooksFastGradientClipping``), what their backward leaves on
    the parameters (per-sample gradients, or with ghost clipping their norms) is refused
    at the step. Every rank runs the same backward, so every rank raises. A first
    version read ``grad_sample`` of one parameter a bucket, which missed a bucket led by
    a parameter the forward did not use, and ghost clipping, which leaves
    ``_norm_sample`` and sets ``grad_sample`` to None (reviewers' probes).
"""

from __future__ import annotations

from torch import nn

_NOT_PRIVATE = ("differentially private training clips each sample's gradient and adds "
                "noise before gradients are averaged, which ZeroOptimizer's sharded reduction "
                "in backward does not allow (opacus' DPOptimizer around it would clip and "
                "noise nothing: training would not be private). Train with DP under opacus' "
                "own data parallelism (PrivacyEngine.make_private with "
                "DistributedDataParallel) instead")

# what opacus' hooks put on a parameter in backward
_PER_SAMPLE_ATTRIBUTES = ("grad_sample", "_norm_sample")


def refuse_per_sample_gradient_modules(model: nn.Module) -> None:
    """At construction: opacus' GradSampleModule (any of its kinds, by its base class's
    name: opacus is not a dependency to import) in the model."""
    for name, module in model.named_modules():
        if any(cls.__name__ == "AbstractGradSampleModule" and cls.__module__.startswith("opacus")
               for cls in type(module).__mro__):
            where = f"the model's submodule {name!r}" if name else "the model"
            raise TypeError(f"{where} is opacus' {type(module).__name__}: {_NOT_PRIVATE}")


def refuse_per_sample_gradients(buckets) -> None:
    """Before a step: what opacus' hooks left on a parameter. A dict lookup per parameter."""
    for bucket in buckets:
        for name, param in zip(bucket.param_names, bucket.params):
            held = [a for a in _PER_SAMPLE_ATTRIBUTES if a in param.__dict__]
            if held:
                raise TypeError(f"{name!r} holds {held[0]} (per-sample gradients: opacus' "
                                f"GradSampleModule or its hooks around the model): "
                                f"{_NOT_PRIVATE}")
