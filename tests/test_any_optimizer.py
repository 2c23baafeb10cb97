"""Any torch optimizer at every stage: parameters stepped whole by one owner, drawn by hypothesis.

Muon, Adafactor, a hand-written optimizer that is not element-wise and a LARS that
subclasses SGD (a subclass that overrides step is not element-wise), beside AdamW
or SGD in another param group (or alone), against DDP with the very same optimizers
(tests/cases_owned.py says what each case checks and why). A small fixed case
checks the owners, the layout and the bytes moved against figures worked out by hand.
torch's element-wise classes stepped a part at a time against the same stepped whole.
"""

import inspect
import itertools

import pytest
import torch
import torch.optim.adam as adam_module
from hypothesis import given, settings
from hypothesis import strategies as st

import cases_owned
from zeroshard._inner import InnerOptimizers
from zeroshard._validate import ELEMENTWISE_OPTIMIZERS, steps_as_torch_elementwise
from strategies import mlp_specs, transformer_specs

def _has_trained_matrices(spec: dict) -> bool:
    """One block under a frozen lead (its embedding and block 0) with a tied head leaves no
    Linear weight to train: the group stepped whole would be empty, and the reference
    torch optimizer refuses an empty parameter list (found by the thorough profile)."""
    return not (spec["frozen"] == "lead" and spec["layers"] == 1 and spec["tied"])


models = st.one_of(
    mlp_specs.map(lambda m: {**m, "unused_branch": False, "branch_everywhere": False}),
    transformer_specs.filter(_has_trained_matrices))


@st.composite
def owned_cases(draw):
    world_size = draw(st.sampled_from([1, 2, 3, 4]))
    whole = draw(st.sampled_from(sorted(cases_owned.WHOLE)))
    rest = draw(st.sampled_from(["AdamW", "SGD"] + ([] if whole == "Muon" else ["same"])))
    meshes = [None] + ([(2, 2), (1, 4), (4, 1)] if world_size == 4 else
                       [(2, 1)] if world_size == 2 else [])
    stage = draw(st.sampled_from([1, 2, 3]))
    accum = draw(st.integers(1, 3))
    return {
        "model": draw(models), "world_size": world_size, "mesh": draw(st.sampled_from(meshes)),
        "stage": stage, "whole": whole, "rest": rest,
        "units": draw(st.sampled_from([None, "blocks", "linear"])) if stage == 3 else None,
        "reshard": draw(st.booleans()),
        # one parameter per bucket (each its owner's alone) ... everything in one bucket
        "bucket_mb": draw(st.sampled_from([1e-6, 5e-4, 25])),
        "accum": accum, "no_sync": accum > 1 and draw(st.booleans()),
        "clip": draw(st.sampled_from([None, 0.05, 10.0])),
        "bf16": draw(st.booleans()) and draw(st.booleans()),  # a quarter of the cases
        "steps": draw(st.integers(2, 3)), "batch": draw(st.integers(2, 4)),
    }


def replicas(case) -> int:
    return case["mesh"][0] if case["mesh"] else 1


def exact(case) -> bool:
    """Whether DDP's and zeroshard's reductions round alike: a mean of one or two fp32
    values (halving is exact) of gradients accumulated alike (one micro-batch, or all
    under no_sync: zeroshard may add reduced micro-batches where DDP adds local ones),
    no clipping (norms summed in other orders), fp32."""
    return case["world_size"] <= 2 and case["clip"] is None and not case["bf16"] and (
        case["accum"] == 1 or case["no_sync"])


# 120 cases of about 0.7 s under the CI profile (its 250 cost three minutes); the
# thorough profile draws its own number
EXAMPLES = 120 if settings().max_examples <= 250 else settings().max_examples


@settings(deadline=None, max_examples=EXAMPLES)
@given(owned_cases())
def test_whole_parameter_optimizers_equal_ddp_with_the_same_optimizers(pool, case):
    results = pool.run(cases_owned.train_owned_side_by_side, case["world_size"], case)
    first = results[0]
    for rank, res in enumerate(results):
        assert max(res["grad_excess"]) <= 0, (rank, res["grad_excess"])
        assert max(res["contract"]) == 0, (rank, res["contract"])
        for mine, theirs in zip(res["params"], first["params"]):  # every rank holds the same
            assert torch.equal(mine, theirs), rank
        if exact(case):
            assert max(res["ddp_diff"]) == 0, (rank, res["ddp_diff"])
        # state lives on the owner only, for each parameter it owns
        assert res["state_holders"] == res["owned"], rank
        assert res["whole_states"] == len(res["owned"]), rank
        report = res["report"]
        shards = case["world_size"] // replicas(case)
        assert report["shard_size"] == shards and len(report["elements"]) == shards
        assert min(report["imbalance"].values()) >= 1.0
    # each parameter stepped whole has one owner per replica (every replica holds the same shards)
    owners = {}
    for res in results:
        for name in res["owned"]:
            owners[name] = owners.get(name, 0) + 1
    assert owners == {name: replicas(case) for name in first["whole_names"]}, owners
    if case["whole"] == "Muon":  # Newton-Schulz once per matrix per step in each replica
        assert sum(r["orthogonalised"] for r in results) == \
            case["steps"] * len(first["whole_names"]) * replicas(case)


def test_owners_layout_and_bytes_of_a_fixed_case(pool):
    """Two ranks, stage 2, one bucket of Muon matrices 8x4, 6x4, 4x4, 2x4 (32, 24, 16, 8
    elements). Largest first to the rank holding least: 32 -> rank 0, 24 -> rank 1,
    16 -> rank 1 (24 < 32), 8 -> rank 0 (32 < 40). Each parameter starts at a multiple of
    32 elements (Note [aligned parameters]): rank 0's segment holds 32 at 0 and 8 at 32
    (40), rank 1's 24 at 0 and 16 at 32 (48); segments of 64 (a multiple of 32), so the
    reduce-scatter and the all-gather each move 128 fp32 elements = 512 bytes per step."""
    for res in pool.run(cases_owned.fixed_owned_case, 2):
        assert res["owners"] == [0, 1, 1, 0], res
        assert res["padded"] == 128 and res["stored"] == 64, res
        assert res["reduce_scatter"] == 512 and res["all_gather"] == 512, res
        assert res["report"]["elements"] == [40, 40], res
        assert res["report"]["imbalance"]["elements"] == 1.0, res
        # Muon's work per matrix is m * n * min(m, n): 128 + 16 = 144 against 96 + 64 = 160
        assert res["report"]["work"]["torch.optim.Muon"] == [144.0, 160.0], res
        assert res["state_shapes"] == ([[2, 4], [8, 4]] if res["rank"] == 0 else [[4, 4], [6, 4]])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_state_dict_round_trip_keeps_the_groups_live_for_schedulers(pool, stage):
    """torch's ``load_state_dict`` gives an optimizer new group dicts: the lr a scheduler
    sets afterwards must still reach every inner optimizer (accelerate round-trips the
    state dict when it prepares an optimizer: Trainer stepped with its initial lr)."""
    for diff in pool.run(cases_owned.round_trip_then_schedule, 2, stage):
        assert diff == 0, diff  # two ranks, no clipping: the same arithmetic as DDP


@pytest.mark.parametrize("whole", ["GroupCounted", *sorted(cases_owned.RESUMED_ONLY)])
@pytest.mark.parametrize("how", ["checkpoint", "full_state_dict"])
@pytest.mark.parametrize("stages", [(1, 3), (3, 2), (2, 1)])
def test_settings_an_optimizer_keeps_on_its_groups_survive_steps_and_resumes(
        pool, tmp_path, stages, how, whole):
    """Note [settings both ways]: a class keeping a count and a warm-up factor on its
    group (as pytorch_optimizer's LAMB, Adan, Prodigy do) had the factor put back to its
    value at construction before every step, and its count lost on resume (helper's
    probes: a Lookahead never took its slow step, LAMB 4.3e-2 off after a resume). Note
    [state under an optimizer's own keys]: a count under a key of the class's own in its
    state (MADGRAD's ``state["k"]``) was lost on resume (a helper's sweep, 7.3e-4). Note
    [per-element states of their own dtype]: a bf16 momentum and a boolean mask came back
    in the parameter's dtype, and the next step raised (a helper's sweep)."""
    for diff in pool.run(cases_owned.group_settings_resumed, 2, stages, how,
                         str(tmp_path / "ckpt"), whole):
        assert diff == 0, diff  # two ranks, no clipping: the same arithmetic as DDP


@pytest.mark.parametrize("policy", [False, True])
@pytest.mark.parametrize("kind", sorted(cases_owned.SCHEDULE_FREE))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_schedule_free_optimizer_switches_modes_like_ddp(pool, tmp_path, stage, kind, policy):
    """Note [a mode switch of the optimizer]: ``opt.train()`` / ``opt.eval()`` did not exist
    (schedulefree's classes could not be driven, and Trainer skipped them), and switching
    the inner optimizers by hand was refused or drifted (helper-77's probes). Evaluated in
    eval mode and trained in train mode, as DDP with the same class, whole parameters or
    flat shards, the mode on the groups or on the optimizer (a first version missed that
    switch under a policy: a reviewer's probe, 2.6e-3 from DDP); a switch to the mode it
    is in issues no collective; a step in eval mode is the class's own refusal; a
    rollback in eval mode to a checkpoint saved in train mode evaluates as DDP's (a
    switch after the load was skipped: a reviewer's probe, 2.6e-3 under a policy)."""
    for result in pool.run(cases_owned.schedule_free_modes, 2, stage, kind, policy,
                           str(tmp_path / "ckpt")):
        assert result["evaluations"] and max(result["evaluations"]) == 0, result
        assert min(result["moved"]) > 0, result  # eval mode evaluates another point
        assert result["params"] == 0, result
        assert result["calls_in_train_mode"] == [0] * 4, result
        assert "not in train mode" in (result["refused"] or ""), result


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_tensor_lr_filled_in_place_after_a_state_dict_round_trip_reaches_the_step(pool, stage):
    """Note [settings both ways]: torch's load_state_dict gave the inner group a copy of
    the tensor lr, which the scheduler's in-place fill then never reached (a reviewer's
    probe of a first version: 4.1e-2 from DDP)."""
    for per_step in pool.run(cases_owned.tensor_lr_round_trip, 2, stage):
        assert all(params == 0 and lr == 0 for params, lr in per_step), per_step


@pytest.mark.parametrize("policy", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_method_of_the_optimizer_class_runs_like_ddp(pool, stage, policy):
    """Note [methods of the optimizer class]: timm's loop calls ``sync_lookahead()``
    where ``hasattr`` finds it; the ZeroOptimizer had no such attribute, so the sync was
    skipped, silently (helper-105's probe: 5.1e-3 from DDP after an epoch). A call with
    an argument is refused on every rank."""
    results = pool.run(cases_owned.a_method_of_the_optimizer_class, 2, stage, policy)
    for result in results:
        assert len(result["differences"]) == 6 and max(result["differences"]) == 0, result
        assert "takes no arguments" in (result["refused"] or ""), result
    # a method that reads would answer for this rank's shards: refused where looked up
    reading = results[0]["reading"]
    assert "LookaheadSGD.parameter_count is not run" in (reading or ""), reading


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_fp32_runs_adam_state_loads_into_an_fp64_model_as_torch_loads_it(pool, stage):
    """Note [per-element states of their own dtype]: states in their parameter's dtype
    follow the new one, as torch's load_state_dict casts them (a first version kept them
    fp32 beside fp64 parameters, and the step raised: a reviewer's probe)."""
    for diff in pool.run(cases_owned.fp32_adam_state_into_an_fp64_model, 2, stage):
        assert diff == 0, diff  # two ranks: the same arithmetic as torch's DDP


def test_grad_scaler_on_ranks_that_own_no_parameter_skips_with_the_others(pool):
    """A rank that owns no parameter whole still holds each bucket's shard in its
    param groups, so GradScaler records its inf check there (it asserted before)."""
    results = pool.run(cases_owned.scaler_with_ranks_that_own_nothing, 4)
    assert sorted(r["owned"] for r in results) == [0, 0, 1, 1]
    for res in results:
        assert res["scales"] == [1024.0, 1024.0, 512.0, 512.0], res["scales"]
        assert res["moved"] == [True, True, False, True], res["moved"]
        assert torch.equal(res["final"], results[0]["final"])


def test_groups_of_two_classes_show_each_its_own_hyperparameters(pool):
    (res,) = pool.run(cases_owned.hyperparameters_of_two_classes, 1)
    muon, adamw = res["keys"]
    assert "ns_steps" in muon and "betas" not in muon, muon
    assert "betas" in adamw and "ns_steps" not in adamw and "momentum" not in adamw, adamw
    # the positional class's values, the keys both classes have
    assert res["defaults"]["lr"] == 0.01 and "betas" not in res["defaults"], res["defaults"]
    # cycling momentum would reach one class only: torch's own refusal, not a silent no-op
    assert "momentum or beta1" in res["one_cycle"], res["one_cycle"]
    assert res["lrs"][0] == res["lrs"][1] == pytest.approx(0.1 / 25)  # OneCycleLR's start


@pytest.mark.parametrize("which", ["class", "bucket_size_mb"])
def test_ranks_that_build_different_buckets_are_refused_on_every_rank(pool, which):
    """Owners follow the classes and buckets: ranks that disagree would exchange
    buffers of other sizes (gloo aborts) or scrambled values."""
    for error in pool.run(cases_owned.arguments_that_differ_across_ranks, 2, which):
        assert error is not None and "differ across ranks" in error, error
        assert "same arguments on every rank" in error, error


def _shards(seed: int) -> list[list[torch.Tensor]]:
    """Two param groups' flat tensors, of sizes that cut into parts unevenly."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=g) for n in (5, 300, 7, 64)],
            [torch.randn(n, generator=g) for n in (33, 2)]]


def _give_gradients(shards: list[list[torch.Tensor]]) -> None:
    for t in itertools.chain(*shards):
        t.grad = torch.ones_like(t)


def _implementations(cls) -> list[dict]:
    """The for-loop, the foreach kernels and, where this torch has one, the fused kernel."""
    kinds = [{"foreach": False}, {"foreach": True}]
    if "weight_decay" in inspect.signature(cls).parameters:  # a second temporary in some
        kinds.append({"foreach": True, "weight_decay": 0.1})
    if "momentum" in inspect.signature(cls).parameters:  # state to compare
        kinds.append({"foreach": True, "momentum": 0.9})
    try:
        cls([torch.zeros(1)], fused=True)
        kinds.append({"fused": True})
    except (RuntimeError, TypeError, ValueError):
        pass
    return kinds


@pytest.mark.parametrize("cls", ELEMENTWISE_OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_step_in_parts_is_the_whole_step_bit_for_bit(cls):
    """Note [a step in parts]: torch's element-wise classes stepped a part at a time
    (parts of at most 300 bytes: with the foreach kernels four calls of ``step``, the
    second group's tensors together, the first's in three parts; the for-loop and the
    fused kernels one call) give every tensor the update and state they get stepped in
    one call, bitwise, for three steps, and each group's tensors are back in place
    after each step."""
    groups = [{"params": [], "lr": 0.01}, {"params": [], "lr": 0.02}]
    for kwargs in _implementations(cls):
        whole, parts = _shards(0), _shards(0)
        a = InnerOptimizers(groups, whole, cls, kwargs, part_bytes=2**30)
        b = InnerOptimizers(groups, parts, cls, kwargs, part_bytes=300)
        for step in range(3):
            g = torch.Generator().manual_seed(10 + step)
            for x, y in zip(itertools.chain(*whole), itertools.chain(*parts)):
                x.grad = torch.randn(x.shape, generator=g)
                y.grad = x.grad.clone()
            a.step()
            b.step()
            assert [[id(t) for t in g["params"]] for g in b.param_groups] == \
                [[id(t) for t in group] for group in parts], kwargs
        for x, y in zip(itertools.chain(*whole), itertools.chain(*parts)):
            assert torch.equal(x, y), (kwargs, (x - y).abs().max())
            assert all(torch.equal(torch.as_tensor(u), torch.as_tensor(v))
                       for u, v in zip(a.state.get(x, {}).values(), b.state.get(y, {}).values())), kwargs


def test_torch_compile_leaves_the_step_in_parts_on():
    """Note [a step in parts]: torch.compile's first use wraps each torch optimizer
    class's ``_init_group`` (``torch._dynamo.disable``, set on the class: ``AdamW``'s
    own wrapper around ``Adam``'s). A first version compared them wrapped, so after a
    compile anywhere in the process no class was stepped in parts any more (found by the
    suite's memory test running in a worker that had compiled a model)."""
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(1))
    assert "_init_group" in vars(torch.optim.AdamW)  # the wrapping this test is about
    for cls in ELEMENTWISE_OPTIMIZERS:
        assert steps_as_torch_elementwise(cls), cls


def test_a_step_in_parts_puts_the_groups_back_when_it_raises():
    """Note [a step in parts]: a step that raises in a later part (Adam refuses a sparse
    gradient) leaves each group holding all its tensors, as before the step."""
    shards = _shards(0)
    inner = InnerOptimizers([{"params": []}, {"params": []}], shards, torch.optim.Adam,
                            {"lr": 0.1}, part_bytes=300)
    _give_gradients(shards)
    shards[1][1].grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        inner.step()
    assert [len(g["params"]) for g in inner.param_groups] == [4, 2]


class _CountsInItsStep(torch.optim.SGD):
    zeroshard_elementwise = True  # says it is element-wise, with a step of its own

    def step(self, closure=None):
        for group in self.param_groups:
            group["calls"] = group.get("calls", 0) + 1
        return super().step(closure)


class _CountsInItsInitGroup(torch.optim.Adam):
    """torch's step, but an ``_init_group`` of its own (a helper's probe: 5 after a step
    in a first version, which looked at ``step`` alone)."""

    def _init_group(self, group, *args, **kwargs):
        group["calls"] = group.get("calls", 0) + 1
        return super()._init_group(group, *args, **kwargs)


@pytest.mark.parametrize("cls", [_CountsInItsStep, _CountsInItsInitGroup],
                         ids=lambda c: c.__name__)
def test_a_class_that_may_count_on_its_group_is_stepped_whole(cls):
    """Note [a step in parts]: a class with a ``step`` or an ``_init_group`` of its own
    is stepped in one call per step, even where it says it is element-wise, since it
    may keep a count on the group (a call per part would count several steps here)."""
    shards = _shards(0)
    inner = InnerOptimizers([{"params": []}, {"params": []}], shards, cls,
                            {"lr": 0.1, "foreach": True}, part_bytes=300)
    _give_gradients(shards)
    inner.step()
    assert [g["calls"] for g in inner.param_groups] == [1, 1]


@pytest.mark.parametrize("groups, tensors, foreach, most", [
    (40, 1, True, 1),  # a group per parameter: one call for all of them
    (3, 4, True, 2),  # each group cut in two parts of two tensors
    (3, 4, False, 4),  # the for-loop makes its temporaries a tensor at a time: not cut
])
def test_a_step_in_parts_hands_torch_each_tensor_once_and_no_empty_group(
        monkeypatch, groups, tensors, foreach, most):
    """Note [a step in parts]: every call of torch's Adam kernels over a group gets
    some of its tensors, at most ``most`` (a part: two 400-byte tensors of 800 bytes),
    and each tensor once a step. A first version called ``step`` once per part with the
    other groups emptied, so each call still visited every group: 40 groups of one
    tensor made 40 x 40 calls, 1560 of them empty (a helper's probe: 13.6x the step's
    time with 300 groups on an H100)."""
    seen: list[list[int]] = []
    adam = adam_module.adam

    def recording(params, *args, **kwargs):
        seen.append([id(p) for p in params])
        return adam(params, *args, **kwargs)

    monkeypatch.setattr(adam_module, "adam", recording)
    shards = [[torch.randn(100) for _ in range(tensors)] for _ in range(groups)]
    inner = InnerOptimizers([{"params": []} for _ in range(groups)], shards, torch.optim.AdamW,
                            {"lr": 0.1, "foreach": foreach}, part_bytes=800)
    _give_gradients(shards)
    for _ in range(2):
        seen.clear()
        inner.step()
        assert all(0 < len(call) <= most for call in seen), [len(call) for call in seen]
        assert sorted(itertools.chain(*seen)) == sorted(id(t) for t in itertools.chain(*shards))
