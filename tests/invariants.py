"""DESIGN.md's invariants, checked on the results of one trained case (tests/cases.py):
equal parameters, losses and clipped norms to DDP's and single-process training every
step, within bounds derived from the run; all ranks identical; exactly 2Ψ (stage 3: 3Ψ)
of communication per step, in one order on every rank; memory as the stage promises.
Shared by every test module that trains cases; no test module imports another.
"""

import pytest
import torch

import cases
from models import runs_a_module_twice
from zeroshard._layout import ALIGN

FP32 = 4


def tolerances(case):
    """fp32 reduction-order noise where the update is well conditioned: rtol covers the
    rounding of the parameter's own magnitude. An adaptive optimizer's update can
    magnify rounding far beyond that at some elements: ``update_bounds`` adds those."""
    return {"rtol": 1e-5, "atol": 1e-6}


UNIT_ROUNDOFF = 2.0**-24  # fp32


def gradient_noise(results, case, step):
    """Half-width of an interval around the single-process gradient at ``step`` that holds
    every reference's gradient (zeroshard, DDP, single process, either stage).

    All reduce the same k = N * accum per-(rank, micro-batch) gradients g_j: each rank's
    backward is the same computation in every reference (the single-process one runs it
    as the rank does, cases.py). A sum of k terms in any order is within (k-1) u sum|g_j|
    of the exact sum; dividing by N and clipping round once more each:
    so each reference is within (k+1) u sum|g_j| of the exact mean, any two within twice
    that. Clipping scales sum|g_j| by its coefficient (cases.py records it so), and the
    references' coefficients differ by their norms' rounding: a relative rho, measured.

    From the second step the references also start from parameters that differ (by up to
    the previous step's bound), so their gradients differ by more than rounding: by how
    far the single-process gradient moves when computed at the others' parameters,
    measured (cases.py, "moved_grad"). A sharding bug still fails at the first step
    where it makes a difference: the gradient moves only as far as the parameters
    already checked let it."""
    k = case["world_size"] * case["accum"]
    res = results[0]
    noise = 2 * (k + 1) * UNIT_ROUNDOFF * res.grad_abs_sum[step].double()
    # rank 0 measured the move at zeroshard's parameters, rank 1 at DDP's (cases.py)
    noise += torch.stack([r.moved_grad[step] for r in results[:2]]).amax(0).double()
    if case["clip"] is not None:
        def coefficient(norm):
            return min(1.0, case["clip"] / (norm + 1e-6))
        single = coefficient(res.single_norm[step])
        rho = max(abs(coefficient(norms[step]) - single) / single
                  for r in results for norms in (r.zero_norm, r.ddp_norm))
        noise += rho * res.single_grad[step].double().abs().nan_to_num()
    return noise


def _divide(lo, hi, d_lo, d_hi):
    """The range of x / d for x in [lo, hi] and d in [d_lo, d_hi], d > 0."""
    return (torch.where(lo >= 0, lo / d_hi, lo / d_lo), torch.where(hi >= 0, hi / d_lo, hi / d_hi))


def _square(lo, hi):
    """The range of x**2 for x in [lo, hi]."""
    straddles = (lo <= 0) & (hi >= 0)
    return (torch.where(straddles, 0.0, torch.minimum(lo * lo, hi * hi)),
            torch.maximum(lo * lo, hi * hi))


def _adam_step_cap(beta1, beta2, count):
    """The largest |m_hat| / sqrt(v_hat) after ``count`` steps, whatever the gradients:
    m_hat = sum a_i g_i and v_hat = sum b_i g_i**2, so by Cauchy-Schwarz
    |m_hat| <= sqrt(sum a_i**2 / b_i) sqrt(v_hat)."""
    if count == 0:
        return 0.0
    a = [(1 - beta1) * beta1 ** (count - i) / (1 - beta1**count) for i in range(1, count + 1)]
    b = [(1 - beta2) * beta2 ** (count - i) / (1 - beta2**count) for i in range(1, count + 1)]
    return sum(x * x / y for x, y in zip(a, b)) ** 0.5


def update_bounds(results, case):
    """Per step, a bound on each element's parameter difference between any two
    references that the rounding of reduced gradients can cause through an adaptive
    optimizer; None for SGD, whose update is linear in the gradient (``tolerances``).

    Adam's first update is lr g / (|g| + eps): where |g| is near eps, or the gradient
    cancels across ranks and micro-batches to rounding noise, a rounding-level change
    of g moves the parameter by up to 2 lr. So the optimizer runs once more here, on
    intervals: each step's gradient is [g - d, g + d] (``gradient_noise``; a coupled
    weight decay adds wd p to g and wd D to d), the state (Adam's m and v, RMSprop's
    square average and momentum, Adagrad's sum of squares) is carried as intervals,
    and the normalised update (m_hat / (sqrt(v_hat) + eps), g / (sqrt(v) + eps))
    as an interval, narrowed to the values it can take at all: Adam's
    ``_adam_step_cap``, RMSprop's 1 / sqrt(1 - alpha) (v >= (1 - alpha) g**2),
    Adagrad's 1. An element's first step is exactly [f(g - d), f(g + d)] with
    f(g) = g / (c |g| + eps) increasing (c = 1; RMSprop sqrt(1 - alpha)): its width
    is ~2 d eps / g**2 where |g| >> d, eps, and up to 2 where |g| <= d (a sign flip).
    The bound grows by lr times that interval's width each step:
    D_t = D_(t-1) + lr_t (hi - lo). Where g is well above d and eps the width is
    ~d / |g| (about 1e-6, far below atol); an element once sensitive stays so through
    its state's wide interval. One element's difference reaches other elements'
    gradients through the model at the next step: ``gradient_noise`` measures that
    rather than leaving it to rtol/atol."""
    name = case["optimizer"]
    if name == "SGD":
        return None
    hp = cases.OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], **case["opt_kwargs"]).defaults
    res = results[0]
    zeros = torch.zeros_like(res.initial, dtype=torch.float64)
    bound, count = zeros.clone(), torch.zeros_like(zeros, dtype=torch.long)
    state = {key: [zeros.clone(), zeros.clone()] for key in ("m", "v", "buf")}
    bounds = []
    for step in range(case["steps"]):
        g = res.single_grad[step].double()
        has = ~torch.isnan(g)  # no gradient: the optimizer skips the element
        g = g.nan_to_num()
        noise = gradient_noise(results, case, step)
        if name != "AdamW":  # coupled weight decay: the gradient includes wd * p
            wd = res.single_wd[step].double()
            g = g + wd * (res.single[step - 1] if step else res.initial).double()
            noise = noise + wd * bound
        lo, hi = g - noise, g + noise
        count = count + has.long()
        sq_lo, sq_hi = _square(lo, hi)
        if name in ("Adam", "AdamW"):
            beta1, beta2 = hp["betas"]
            (m_lo, m_hi), (v_lo, v_hi) = state["m"], state["v"]
            new = {"m": [beta1 * m_lo + (1 - beta1) * lo, beta1 * m_hi + (1 - beta1) * hi],
                   "v": [beta2 * v_lo + (1 - beta2) * sq_lo, beta2 * v_hi + (1 - beta2) * sq_hi]}
            c1, c2 = 1 - beta1 ** count.clamp(min=1), 1 - beta2 ** count.clamp(min=1)
            u_lo, u_hi = _divide(new["m"][0] / c1, new["m"][1] / c1,
                                 (new["v"][0] / c2).sqrt() + hp["eps"],
                                 (new["v"][1] / c2).sqrt() + hp["eps"])
            cap = torch.tensor([_adam_step_cap(beta1, beta2, c)
                                for c in range(case["steps"] + 1)], dtype=torch.float64)[count]
        elif name == "RMSprop":
            alpha = hp["alpha"]
            v_lo, v_hi = state["v"]
            new = {"v": [alpha * v_lo + (1 - alpha) * sq_lo, alpha * v_hi + (1 - alpha) * sq_hi]}
            u_lo, u_hi = _divide(lo, hi, new["v"][0].sqrt() + hp["eps"],
                                 new["v"][1].sqrt() + hp["eps"])
            cap = (1 - alpha) ** -0.5
        else:  # Adagrad, no lr decay (the cases use none)
            assert name == "Adagrad" and hp["lr_decay"] == 0 and hp["initial_accumulator_value"] == 0
            v_lo, v_hi = state["v"]
            new = {"v": [v_lo + sq_lo, v_hi + sq_hi]}
            u_lo, u_hi = _divide(lo, hi, new["v"][0].sqrt() + hp["eps"],
                                 new["v"][1].sqrt() + hp["eps"])
            cap = 1.0
        u_lo, u_hi = u_lo.clamp(-cap, cap), u_hi.clamp(-cap, cap)
        # An element's first step is g / (c |g| + eps) (c: sqrt(v) / |g|), increasing in g:
        # its exact range, which the division above would overstate where |g| ~ d >> eps.
        c = {"RMSprop": (1 - hp.get("alpha", 0)) ** 0.5}.get(name, 1.0)
        first = count == 1
        u_lo = torch.where(first, lo / (c * lo.abs() + hp["eps"]), u_lo)
        u_hi = torch.where(first, hi / (c * hi.abs() + hp["eps"]), u_hi)
        if name == "RMSprop" and hp["momentum"] > 0:  # the step is lr * buf
            buf_lo, buf_hi = state["buf"]
            new["buf"] = [hp["momentum"] * buf_lo + u_lo, hp["momentum"] * buf_hi + u_hi]
            u_lo, u_hi = new["buf"]
        for key, (new_lo, new_hi) in new.items():
            state[key] = [torch.where(has, new_lo, state[key][0]),
                          torch.where(has, new_hi, state[key][1])]
        bound = bound + torch.where(has, res.single_lr[step].double() * (u_hi - u_lo), 0.0)
        bounds.append(bound.clone())
    return bounds


def assert_params_close(actual, expected, case, bound, what):
    """|actual - expected| <= atol + rtol |expected| + bound, element by element."""
    tol = tolerances(case)
    allowed = tol["atol"] + tol["rtol"] * expected.double().abs()
    if bound is not None:
        allowed = allowed + bound
    excess = (actual.double() - expected.double()).abs() - allowed
    if not (excess <= 0).all():  # NaN fails too
        i = int(excess.nan_to_num(float("inf")).argmax())
        sensitivity = 0.0 if bound is None else float(bound[i])
        raise AssertionError(
            f"{what}: {int((~(excess <= 0)).sum())} of {excess.numel()} elements differ; "
            f"worst at {i}: {actual[i].item():.9g} vs {expected[i].item():.9g}, difference "
            f"{abs(actual[i].item() - expected[i].item()):.3g}, allowed {allowed[i].item():.3g} "
            f"(of which {sensitivity:.3g} the update's sensitivity, {tol})")


def check_matches_references(results, case):
    bounds = update_bounds(results, case)
    single = results[0]  # ranks 0 and 1 compute the single-process reference (cases.py)
    for a, b in zip(single.single, results[1].single if len(results) > 1 else []):
        assert torch.equal(a, b), "ranks 0 and 1 computed different single-process references"
    for rank, res in enumerate(results):
        for step in range(case["steps"]):
            where = f"rank {rank}, step {step}"
            bound = None if bounds is None else bounds[step]
            assert_params_close(res.zero[step], res.ddp[step], case, bound,
                                f"zeroshard vs DDP, {where}")
            assert_params_close(res.zero[step], single.single[step], case, bound,
                                f"zeroshard vs single process, {where}")
            assert res.zero_loss[step] == approx(res.ddp_loss[step]), where
            if case["clip"] is not None:
                assert res.zero_norm[step] == approx(res.ddp_norm[step]), where
                assert res.zero_norm[step] == approx(single.single_norm[step]), where
        # mean of the ranks' losses is the single-process loss on the global batch
    mean_loss = sum(r.zero_loss[-1] for r in results) / len(results)
    assert mean_loss == approx(results[0].single_loss[-1])
    assert results[0].lrs == approx(results[0].ddp_lrs)
    # the case trained at all: a test that moves nothing would pass vacuously
    assert not torch.equal(results[0].zero[-1], results[0].initial)


def check_ranks_agree(results, case):
    for step in range(case["steps"]):
        for rank, res in enumerate(results[1:], start=1):
            assert torch.equal(res.zero[step], results[0].zero[step]), (rank, step)
    check_one_order(results)


def check_one_order(results):
    """Every rank issued the same collectives, (mesh dimension, collective, bytes), in the
    same order, whatever its data ran (Note [one order] in zeroshard/stage3.py; on a mesh
    also Note [collectives on a mesh] in _comm.py): what NCCL needs of one communicator,
    checked here on gloo, which only needs it per group."""
    first = results[0].trace
    assert first
    for rank, res in enumerate(results[1:], start=1):
        if res.trace != first:
            at = next((i for i, (a, b) in enumerate(zip(first, res.trace)) if a != b),
                      min(len(first), len(res.trace)))
            raise AssertionError(
                f"rank {rank} issued another sequence of collectives than rank 0 from call {at} "
                f"on: rank 0 {first[at:at + 4]}, rank {rank} {res.trace[at:at + 4]}")


def gathers_per_step(case) -> int | None:
    """How many times a step all-gathers all parameters (None: not a fixed number)."""
    if case["stage"] != 3:
        return 1  # after step()
    model = case["model"]
    if runs_a_module_twice(model) or model.get("checkpoint") == "reentrant":
        return None  # a unit gathered twice: counted per unit, not per Ψ
    # A skipped unit is gathered all the same (Note [gather schedule]): no exception for it.
    forwards = 2 if case["two_forwards"] and case["reshard_after_forward"] else 1
    backward = 1 if case["reshard_after_forward"] else 0
    return case["accum"] * (forwards + backward) + (1 if case["eval_forward"] else 0)


def may_reduce_late(case) -> bool:
    """Note [late gradients]: nested backwards of reentrant checkpointing (of a reused
    block, of blocks sharing a module, or of two forwards) may bring gradient to a
    bucket already reduced, which is then reduced again."""
    model = case["model"]
    return model.get("checkpoint") == "reentrant" and bool(
        runs_a_module_twice(model) or case.get("two_forwards"))


def padding_bound(n_buckets: int, n_params: int, shards: int) -> int:
    """Elements of the flat buffers that hold no parameter: fewer than ``shards`` past
    the end of each bucket, and fewer than ALIGN before each parameter (Note [aligned
    parameters] in zeroshard/_layout.py)."""
    return n_buckets * (shards - 1) + n_params * (ALIGN - 1)


def late_agreements(case, step: int, synced_backwards: int, n_buckets: int, fp: int = FP32) -> int:
    """Stages 1-2 on several ranks (Note [late gradients] in zeroshard/_reducer.py): the
    first synced backward all-reduces each bucket's place in the order it became ready
    (Note [launch order]), a late flag per bucket and a nested-backward flag, each with
    its negation; after a first backward that ran nested backwards (reentrant
    checkpointing: every drawn checkpointed block has trainable parameters), every
    later synced backward all-reduces the late flags and the nested flag."""
    if case["stage"] == 3 or case["world_size"] == 1:
        return 0
    agreements = synced_backwards - (step == 0)
    nested = case["model"].get("checkpoint") == "reentrant"
    return (2 * fp * (2 * n_buckets + 1) if step == 0 else 0) + (
        agreements * fp * (n_buckets + 1) if nested else 0)


def check_comm_per_step(results, case, first_step: int = 0):
    """Per step: reduce-scatter Ψ per synced backward plus all-gather Ψ each time the
    parameters are gathered: 2Ψ for stages 1-2; 3Ψ for stage 3 (2Ψ without resharding
    after forward). fp32 bytes, with at most ``padding_bound`` elements of padding.
    Broadcast: the buffers, before each training forward outside no_sync (world size > 1).
    All-reduce: the clip norm; at stage 3 also a 4-byte flag per unit (but the root) and
    per bucket, and the step count and its negation, per synced backward, and in the first step 5 numbers per unit and 1 per bucket
    (the recorded orders) and the agreements of Note [first-step agreement]; at stages 1-2
    on several ranks, ``late_agreements``.

    Stage 3's first step walks the module tree's order (Note [recorded order]), so a
    unit called out of it is gathered, and may be reduced, twice: that step is held
    to the lower bounds only. Steps before ``first_step`` are not checked."""
    n, res = case["world_size"], results[0]
    s = cases.shards(case)  # a mesh: these checks are of the shard dimension's collectives
    psi, padding = res.psi, padding_bound(res.n_buckets, res.n_params, s)
    # stage 3 gathers frozen parameters too; stages 1-2 gather only what the optimizer updates
    if case["stage"] == 3:
        psi_all, padding_all = res.psi_all, padding_bound(res.n_all_buckets, res.n_all_params, s)
    else:
        psi_all, padding_all = psi, padding
    synced_backwards = 1 if case["no_sync"] else case["accum"]
    gathers = gathers_per_step(case)
    late = may_reduce_late(case)
    for step, comm in enumerate(res.comm[first_step:], start=first_step):
        rs = comm["reduce_scatter"]
        # ran nowhere: not reduced
        skipped = case.get("skip_block") == "everywhere" and cases.skipping_step(case, step)
        assert skipped or synced_backwards * FP32 * psi <= rs, comm
        walking_tree_order = case["stage"] == 3 and step == 0
        if not late and not walking_tree_order:
            assert rs <= synced_backwards * FP32 * (psi + padding), comm
        if gathers is not None:
            ag = comm["all_gather"]
            # each backward may leave out the units no rank's backward reads (Note [frozen
            # units backward never reads] in zeroshard/_walk.py)
            left_out = case["accum"] * res.psi_frozen_units
            assert FP32 * (gathers * psi_all - left_out) <= ag, comm
            if not walking_tree_order:
                assert ag <= gathers * FP32 * (psi_all + padding_all), comm
        if case["stage"] != 3 and not late:  # the same buckets both ways
            assert comm["reduce_scatter"] == synced_backwards * comm["all_gather"], (step, comm)
        flags = synced_backwards * FP32 * res.flags_per_backward  # Note [ran on no rank]
        # the recorded orders, once: 5 numbers per unit, 1 per bucket (Note [one order])
        flags += FP32 * (5 * res.n_units + res.n_buckets) if step == 0 and case["stage"] == 3 else 0
        flags += late_agreements(case, step, synced_backwards, res.n_buckets)
        cases.check_first_step_agreements(comm, flags + (FP32 if case["clip"] is not None else 0),
                                          case, step, res.n_units)
        # Note [buffers follow rank 0]: before each training forward outside no_sync
        forwards = synced_backwards * (2 if case["two_forwards"] else 1)
        assert comm["broadcast"] == (forwards * res.buffer_bytes if n > 1 else 0), comm


def check_comm_across_replicas(results, case):
    """On a mesh with replicas (Note [collectives on a mesh] in zeroshard/_comm.py), per
    step the replicate dimension carries one all-reduce of each reduced shard (each
    reduce-scatter's input over S) and the second half of every job-wide all-reduce and
    broadcast, but not the gradient norm's sum (every replica holds the same shards);
    no gathers and no reduce-scatters. Without replicas it carries nothing."""
    replicas, s = cases.replicas(case), cases.shards(case)
    norm = FP32 if case["clip"] is not None else 0
    for res in results:
        for step, (within, across) in enumerate(zip(res.comm, res.comm_replicate)):
            if replicas == 1:
                assert not any(across.values()), (step, across)
                continue
            assert across["all_gather"] == across["reduce_scatter"] == 0, (step, across)
            assert within["reduce_scatter"] % s == 0, within
            assert across["all_reduce"] == (within["all_reduce"] - norm
                                            + within["reduce_scatter"] // s), (step, within, across)
            assert across["broadcast"] == within["broadcast"], (step, within, across)


def check_memory(results, case):
    n, stage = cases.shards(case), case["stage"]
    for res in results:
        psi, padded_max = res.psi, res.psi + padding_bound(res.n_buckets, res.n_params, n)
        mem = res.mem[-1]  # after the last backward, before step()
        all_lo, all_hi = res.psi_all, res.psi_all + padding_bound(res.n_all_buckets, res.n_all_params, n)
        if stage == 3:  # only shards: no full-size parameter storage outlives backward
            assert FP32 * all_lo / n <= mem["parameters"] <= FP32 * all_hi / n, mem
            assert FP32 * all_lo / n <= res.final_mem["parameters"] <= FP32 * all_hi / n
        else:
            assert FP32 * all_lo <= mem["parameters"] <= FP32 * all_hi, mem
        shard_lo, shard_hi = FP32 * psi / n, FP32 * padded_max / n
        full = FP32 * psi if stage == 1 else 0  # stage 1 keeps full gradient buffers too
        full_hi = FP32 * padded_max if stage == 1 else 0
        # a unit that got a gradient on no rank in the last step has no gradient shard
        skipped = cases.gets_no_gradient_anywhere(case, case["steps"] - 1)
        assert skipped or full + shard_lo <= mem["gradients"], (stage, mem)
        assert mem["gradients"] <= full_hi + shard_hi, (stage, mem)
        assert mem["master_parameters"] == 0  # fp32: the shard is a view of the parameters
        # Optimizer state is 1/N of what the same torch optimizer holds under DDP.
        per_element = res.ddp_state_bytes / psi
        scalars = 8 * res.n_buckets  # e.g. Adam's `step`, one per shard tensor
        states = res.final_mem["optimizer_states"]
        assert res.ddp_state_bytes / n <= states <= per_element * padded_max / n + scalars
        if stage >= 2 and not case.get("zeros_kept"):
            assert res.final_mem["gradients"] == 0  # zero_grad() dropped the shards


def check_stage2_peak(results, case):
    """During backward, stage 2 holds the shards plus at most two buckets (one filling,
    one in flight) of each param group, plus the gradient autograd just produced: from
    the second step, once buckets launch in the order they become ready (Note [launch
    order]; found by the thorough profile: stage 3 with one parameter per bucket had
    four buckets filling in the first step)."""
    reused_unit = (case["stage"] == 3 and runs_a_module_twice(case["model"])
                   and case["world_size"] > 1)
    if (case["stage"] == 1 or case["no_sync"] or case["model"].get("unused_branch")
            or case.get("skip_block") or case["model"].get("checkpoint") == "reentrant"
            or reused_unit):
        # no_sync keeps full gradients by design; an unused branch (or a block skipped on
        # some ranks) holds its bucket until backward ends (stage 3: until the backward walk
        # passes it), and the buckets after it in order wait; nested backwards (reentrant
        # checkpointing) may refill buckets late; a rank does not wait for a reused stage-3
        # unit's reduce-scatter before the next bucket (Note [runs before the walk moves on])
        return
    n = cases.shards(case)
    cap = case["bucket_mb"] * 2**20
    groups = 2 if case["groups"] else 1
    for res in results:
        if case["stage"] == 3:  # a bucket is a unit's parameters of one group, whatever the cap
            bucket_hi = res.largest_bucket_bytes
        else:
            bucket_hi = max(cap, res.largest_param_bytes) + FP32 * padding_bound(1, res.n_params, n)
        shards_hi = FP32 * (res.psi + padding_bound(res.n_buckets, res.n_params, n)) / n
        in_flight = 2 * groups * bucket_hi
        if case["stage"] == 3:
            # The root unit's buckets fill from backward's first gradients (a final norm,
            # an output head) to its last (the token embedding), beside the one filling and
            # the one in flight (thorough profile: an untied head, 6472 gradient bytes
            # against the two-bucket bound's 6380, every bucket filling at once).
            in_flight += res.root_bucket_bytes
        if case["stage"] == 3 and case["two_forwards"]:
            # Note [one order] in zeroshard/stage3.py: after two training forwards, whose
            # backwards interleave, every reduction waits for the end of backward, so all
            # the buckets fill at once (thorough profile: 688 gradient bytes against the
            # two-bucket bound's 684, four units of 80, 120, 120 and 24 bytes)
            in_flight = max(in_flight, FP32 * (res.psi + padding_bound(res.n_buckets, res.n_params, n)))
        bound = shards_hi + in_flight + res.largest_param_bytes
        assert 0 < res.peak_grad_bytes <= bound, (res.peak_grad_bytes, bound)


def check_stage3_peak(results, case):
    """Full parameters alive at once: at most the two largest units (the one computing
    and the one prefetched) plus the root, on top of the shards."""
    model = case["model"]
    if (case["stage"] != 3 or case.get("units") != "blocks" or model["kind"] != "transformer"
            or not case["reshard_after_forward"] or model.get("checkpoint") or model.get("reuse")):
        return
    n = cases.shards(case)
    for res in results:
        blocks = sorted(res.block_bytes)
        root = FP32 * res.psi_all - sum(blocks)
        padding = FP32 * padding_bound(res.n_all_buckets, res.n_all_params, n)
        shards = (FP32 * res.psi_all + padding) / n
        bound = shards + sum(blocks[-2:]) + root + padding
        assert 0 < res.peak_param_bytes <= bound, (res.peak_param_bytes, bound)


def check_every_invariant(results, case):
    check_matches_references(results, case)
    check_ranks_agree(results, case)
    check_comm_per_step(results, case)
    check_comm_across_replicas(results, case)
    check_memory(results, case)
    check_stage2_peak(results, case)
    check_stage3_peak(results, case)
    for res in results:  # a forward under no_grad: the outputs of the parameters it holds
        assert all(diff <= 1e-6 for diff in res.eval_diff), res.eval_diff


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)
