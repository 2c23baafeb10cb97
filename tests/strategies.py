"""Hypothesis strategies that draw a whole training case (a picklable dict)."""

import math

from hypothesis import strategies as st

from models import runs_a_module_twice
from pool import mesh_shape

OPTIMIZER_KWARGS = {
    "SGD": st.fixed_dictionaries({
        "lr": st.sampled_from([0.05, 0.1]), "momentum": st.sampled_from([0.0, 0.9]),
        "weight_decay": st.sampled_from([0.0, 0.01])}),
    "Adam": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 1e-2]),
                                   "weight_decay": st.sampled_from([0.0, 0.1])}),
    "AdamW": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 1e-2]),
                                    "weight_decay": st.sampled_from([0.0, 0.1])}),
    "Adagrad": st.fixed_dictionaries({"lr": st.sampled_from([0.01, 0.1])}),
    "RMSprop": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 1e-2]),
                                      "momentum": st.sampled_from([0.0, 0.9])}),
}

mlp_specs = st.fixed_dictionaries({
    "kind": st.just("mlp"), "d_in": st.integers(3, 9), "hidden": st.integers(5, 17),
    "d_out": st.integers(1, 5), "depth": st.integers(1, 3), "frozen": st.booleans(),
    "unused_branch": st.booleans(), "branch_everywhere": st.booleans()})

transformer_specs = st.fixed_dictionaries({
    "kind": st.just("transformer"), "vocab": st.integers(11, 23), "d": st.sampled_from([8, 12]),
    "heads": st.just(2), "layers": st.integers(1, 2), "seq": st.integers(3, 7),
    "tied": st.booleans(), "frozen": st.sampled_from([False, True, "lead"]),
    "share_mlp": st.booleans()})


@st.composite
def forward_options(draw, model: dict, stage: int) -> dict:
    """How the loop drives the model; for stage 3 also units and resharding."""
    options = {"two_forwards": draw(st.booleans()), "eval_forward": draw(st.booleans())}
    if stage == 3:
        options["units"] = draw(st.sampled_from([None, "blocks", "linear", "nested"]))
        options["reshard_after_forward"] = draw(st.booleans())
    if model["kind"] == "transformer":
        # Reentrant checkpointing gives no gradient through a block whose input needs none
        # (a frozen block 0 under a frozen embedding: torch warns), in DDP as anywhere.
        model["checkpoint"] = draw(st.sampled_from(
            [None, "nonreentrant"] + ([] if model.get("frozen") == "lead" else ["reentrant"])))
        model["reuse"] = draw(st.booleans())
        # Block 0 skipped in odd steps, on odd ranks only (stage 3: a unit some ranks run,
        # Note [gather schedule]) or on every rank, or run on every rank with its output
        # dropped (no gradient: Note [ran on no rank]). A block no rank runs gets no gradient
        # from DDP, and the optimizer skips it; stage 3 does the same for a skipped unit,
        # while stages 1-2 (and units that do not match the block) step it with a zero
        # gradient, as ZeroOptimizer documents. The DDP reference cannot mix reentrant
        # checkpointing with find_unused_parameters.
        # A module shared by the blocks that is a unit itself (units "linear", "nested")
        # runs where block 0 runs and where block 1 does: a rank skipping block 0 runs it
        # at the second place only, another order of units than the others' (README:
        # units run in one order on every rank; the thorough profile found the gathers
        # mismatched).
        shared_unit = model.get("share_mlp") and options.get("units") in ("linear", "nested")
        skips = [None]
        if model["checkpoint"] != "reentrant":
            skips += [] if shared_unit else ["odd_ranks"]
            if stage == 3 and options["units"] in ("blocks", "nested"):
                skips += ["everywhere", "discarded_everywhere"]
        options["skip_block"] = draw(st.sampled_from(skips))
        # skipped from the first step (a unit no rank has given a gradient yet), where the
        # first step may differ between ranks (not at stage 3: Note [first-step agreement])
        first_may_differ = stage != 3 or options["skip_block"] != "odd_ranks"
        options["skip_first"] = (options["skip_block"] is not None and first_may_differ
                                 and draw(st.booleans()))
    return options


def mesh_shapes(world_size: int) -> list[tuple[int, int]]:
    """Every (replicas, shards) mesh of ``world_size`` ranks, 1-D-like ones included."""
    return [(r, world_size // r) for r in range(1, world_size + 1) if world_size % r == 0]


@st.composite
def training_cases(draw, stages=(1, 2, 3), world_sizes=(1, 2, 3, 4), meshes=None):
    """A whole case. ``meshes``: the (replicas, shards) meshes to draw from (each of the
    world size's, or no mesh, by default; a list: one of those, always)."""
    optimizer = draw(st.sampled_from(sorted(OPTIMIZER_KWARGS)))
    opt_kwargs = draw(OPTIMIZER_KWARGS[optimizer])
    if draw(st.booleans()):  # CUDA's default; a step in parts (Note [a step in parts])
        opt_kwargs["foreach"] = True
    if optimizer == "SGD" and opt_kwargs["momentum"] > 0:
        opt_kwargs["nesterov"] = draw(st.booleans())
    model = draw(st.one_of(mlp_specs, transformer_specs))
    stage = draw(st.sampled_from(stages))
    options = draw(forward_options(model, stage))
    nested_reuse = model.get("checkpoint") == "reentrant" and (
        runs_a_module_twice(model) or options["two_forwards"])
    world_size = draw(st.sampled_from(world_sizes))
    if meshes is None:  # half the cases on several ranks run over a mesh
        shapes = mesh_shapes(world_size) if world_size > 1 else []
        mesh = draw(st.one_of(st.none(), st.sampled_from(shapes))) if shapes else None
    else:
        mesh = draw(st.sampled_from([m for m in meshes if math.prod(mesh_shape(m)) == world_size]))
    return {
        "model": model,
        **options,
        "world_size": world_size,
        "mesh": mesh,
        "stage": stage,
        "optimizer": optimizer,
        "opt_kwargs": opt_kwargs,
        "groups": draw(st.booleans()),
        # one parameter per bucket ... everything in one bucket
        "bucket_mb": draw(st.sampled_from([1e-6, 5e-4, 25])),
        "scheduler": draw(st.booleans()),
        # opt.zero_grad(set_to_none=False) after each step, then model.zero_grad() or not
        "zeros_kept": draw(st.sampled_from([False, True, "then_model"])),
        "accum": draw(st.integers(1, 3)),
        "no_sync": not nested_reuse and draw(st.booleans()),  # DDP's static graph breaks no_sync
        "clip": draw(st.sampled_from([None, 0.05, 10.0])),  # 0.05 is always active
        "norm_type": draw(st.sampled_from([2.0, float("inf")])),
        "steps": draw(st.integers(2, 3)),
        "batch": draw(st.integers(2, 4)),
        "record_peak": True,
    }
