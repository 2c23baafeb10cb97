"""Checkpoints: save on N ranks at stage S, load on M ranks at stage T; full state dicts; bad input.

Each resharding case saves with ``save_checkpoint`` and ``full_state_dict`` on N
ranks, then on M ranks loads the checkpoint into one fresh run and the full state
dict into another: both must hold the same state and train identically, and a
resume on the saving layout must match the run that never stopped.
"""

import itertools
import math

import pytest
import torch

import cases_ckpt
import cases_owned
from pool import mesh_shape

MLP = {"kind": "mlp", "d_in": 5, "hidden": 9, "d_out": 3, "depth": 2, "frozen": True,
       "unused_branch": False}
TRANSFORMER = {"kind": "transformer", "vocab": 13, "d": 8, "heads": 2, "layers": 2, "seq": 5,
               "tied": True, "frozen": True}
STAGE_PAIRS = list(itertools.product([1, 2, 3], [1, 2, 3]))
PRECISION_PAIRS = [(False, False), (True, False), (False, True), (True, True)]  # bf16 on save/load


def reshard_case(n: int, m: int, index: int) -> dict:
    """Every N -> M in 1-4 once; S -> T and the precision pairs cycle, so all nine stage
    pairs and all four precision pairs appear."""
    (s, t), (bf16_save, bf16_load) = STAGE_PAIRS[index % 9], PRECISION_PAIRS[index % 4]
    transformer = index % 2 == 1
    return {
        "model": TRANSFORMER if transformer else MLP,
        "optimizer": "AdamW" if index % 3 else "SGD",
        "save": {"n": n, "stage": s, "bf16": bf16_save, "bucket_mb": 1e-3,
                 "units": "blocks" if transformer else None},
        "load": {"n": m, "stage": t, "bf16": bf16_load, "bucket_mb": (1e-3, 25, 1e-6)[index % 3],
                 "units": "blocks" if transformer else None},
        "steps_before": 2, "steps_after": 2,
    }


RESHARD_CASES = [reshard_case(n, m, i) for i, (n, m) in
                 enumerate(itertools.product([1, 2, 3, 4], [1, 2, 3, 4]))]


def mesh_case(save_mesh, load_mesh, index: int) -> dict:
    """A resharding case between the pool's meshes ((replicas, shards) or a name) and
    plain groups (a number of ranks)."""
    sizes = [mesh if isinstance(mesh, int) else math.prod(mesh_shape(mesh))
             for mesh in (save_mesh, load_mesh)]
    cfg = reshard_case(*sizes, index)
    for side, mesh in zip(("save", "load"), (save_mesh, load_mesh)):
        cfg[side]["mesh"] = None if isinstance(mesh, int) else mesh
    return cfg


# On a mesh rank 0's replica writes the shards and every rank its extra: onto any
# other mesh, plain group, stage and precision, and back; also from meshes whose
# replicas are not runs of consecutive ranks, or where rank 0 is in the second one.
MESH_CASES = [mesh_case(save, load, index) for index, (save, load) in enumerate([
    ((2, 2), 4), (4, (2, 2)), ((2, 2), (1, 3)), ((2, 2), (4, 1)), ((4, 1), (2, 2)),
    ((2, 1), (2, 2)), ((2, 2), 1), ((2, 2), (2, 2)), ((1, 3), (2, 1)),
    ("2x2 strided", 4), ("2x2 rank 0 in replica 1", (2, 2)), (4, "2x2 rank 0 in replica 1")])]


def owned_case(optimizer: str, save, load, index: int) -> dict:
    """A resharding case whose optimizer steps parameters whole (Note [whole-parameter
    ownership]): (ranks or a mesh, stage, bf16) on each side."""
    cfg = mesh_case(save[0], load[0], index)
    cfg["optimizer"] = optimizer
    for side, (_, stage, bf16) in zip(("save", "load"), (save, load)):
        cfg[side].update(stage=stage, bf16=bf16)
    return cfg


# Muon over the Linear weights beside AdamW, and Adafactor over everything: each
# parameter's state lives whole on its owner, which moves with the layout.
OWNED_CASES = [owned_case(optimizer, save, load, index) for index, (optimizer, save, load) in enumerate([
    ("Muon+AdamW", (2, 2, False), (3, 3, False)), ("Muon+AdamW", (3, 3, False), (1, 1, False)),
    ("Muon+AdamW", (4, 1, True), (2, 2, False)), ("Muon+AdamW", ((2, 2), 3, False), (4, 2, True)),
    ("Muon+AdamW", (2, 3, False), (2, 3, False)), ("Adafactor", (2, 1, False), (4, 3, False)),
    ("Adafactor", (3, 2, False), (2, 1, True)), ("Adafactor", (2, 3, False), (2, 3, False))])]


def _case_id(c):
    precision = {False: "fp32", True: "bf16"}

    def ranks(side):
        mesh = c[side].get("mesh")
        if isinstance(mesh, str):
            return mesh.replace(" ", "_")
        return f"{mesh[0]}x{mesh[1]}" if mesh else str(c[side]["n"])
    return (f"N{ranks('save')}s{c['save']['stage']}{precision[c['save']['bf16']]}-to-"
            f"M{ranks('load')}s{c['load']['stage']}{precision[c['load']['bf16']]}"
            + ("" if c in RESHARD_CASES + MESH_CASES else "-" + c["optimizer"]))


@pytest.mark.parametrize("cfg", RESHARD_CASES + MESH_CASES + OWNED_CASES, ids=_case_id)
def test_checkpoint_reshards_to_any_world_size_and_stage(pool, tmp_path, cfg):
    folder = tmp_path / "run" / "ckpt"
    saved = pool.run(cases_ckpt.train_and_save, cfg["save"]["n"], cfg, str(folder))
    resumed = pool.run(cases_ckpt.resume_two_ways, cfg["load"]["n"], cfg, str(folder))
    full_model, full_optim = torch.load(tmp_path / "run" / "full.pt", weights_only=False)

    for rank, res in enumerate(resumed):
        assert res["extra"] == {"step": 2, "rank": rank if rank < cfg["save"]["n"] else 0}
        for a, b in zip(res["loaded"]["a"], res["loaded"]["b"]):
            assert torch.equal(a, b), rank
        for a, b in zip(res["a"], res["b"]):  # training goes on identically
            assert torch.equal(a, b), rank
        assert res["lr"] == full_optim["param_groups"][0]["lr"]
    # Both loads hold exactly the saved state: fp32 masters and optimizer states.
    state_a, state_b = resumed[0]["state_a"], resumed[0]["state_b"]
    for key, value in state_a[0].items():
        assert torch.equal(value, state_b[0][key]), key
        assert torch.equal(value.float(), full_model[key].to(value.dtype).float()), key
    assert state_a[1]["state"].keys() == full_optim["state"].keys()
    for index, state in full_optim["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(state_a[1]["state"][index][key]), torch.as_tensor(value))
            assert torch.equal(torch.as_tensor(state_b[1]["state"][index][key]), torch.as_tensor(value))

    if cfg["save"] == cfg["load"]:  # the same layout: the run that never stopped
        for rank, (res, uninterrupted) in enumerate(zip(resumed, saved)):
            for a, b in zip(res["a"], uninterrupted["continued"]):
                assert torch.equal(a, b), rank
    if "plain" in saved[0]:  # a plain model + optimizer loaded from full_state_dict()
        tol = ({"rtol": 1e-5, "atol": 1e-6} if cfg["optimizer"] == "SGD"
               else {"rtol": 1e-5, "atol": 1e-4})
        for a, b in zip(saved[0]["continued"], saved[0]["plain"]):
            torch.testing.assert_close(a, b, **tol)


def resume_on_the_same_layout(pool, tmp_path, n: int, stage: int, bf16: bool, optimizer: str):
    """Train, save and go on; then resume from the checkpoint ("a") and from the full
    state dict ("b") on the same layout. Returns (resumed, uninterrupted) per rank."""
    side = {"n": n, "stage": stage, "bf16": bf16, "bucket_mb": 1e-3, "units": "blocks"}
    cfg = {"model": TRANSFORMER, "optimizer": optimizer, "save": side, "load": dict(side),
           "steps_before": 2, "steps_after": 2}
    folder = tmp_path / "run" / "ckpt"
    saved = pool.run(cases_ckpt.train_and_save, n, cfg, str(folder))
    return zip(pool.run(cases_ckpt.resume_two_ways, n, cfg, str(folder)), saved)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_resume_on_the_same_layout_matches_the_run_that_never_stopped(pool, tmp_path, stage, bf16):
    for rank, (res, uninterrupted) in enumerate(
            resume_on_the_same_layout(pool, tmp_path, 3, stage, bf16, "AdamW")):
        for a, b in zip(res["a"], uninterrupted["continued"]):
            assert torch.equal(a, b), rank


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_with_fused_adamw_matches_the_run_that_never_stopped(pool, tmp_path, stage):
    """A fused (or capturable) optimizer reads ``step`` on the parameters' device: the
    loaded state must be placed as torch's own ``load_state_dict`` places it."""
    for rank, (res, uninterrupted) in enumerate(
            resume_on_the_same_layout(pool, tmp_path, 2, stage, False, "AdamW fused")):
        for a, b, c in zip(res["a"], res["b"], uninterrupted["continued"]):
            assert torch.equal(a, c) and torch.equal(b, c), rank


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_load_opens_each_rank_file_once_whatever_the_number_of_buckets(pool, tmp_path, stage):
    """Note [a checkpoint file read once]: every rank file was opened and unpickled again
    for every bucket, a load's time growing with the square of the buckets (6.4M
    parameters in 32 buckets: 4.7 s; in one: 0.3 s)."""
    folder = str(tmp_path / "ckpt")
    for rank, res in enumerate(pool.run(cases_ckpt.files_a_load_opens, 2, folder, stage)):
        assert res["buckets"] >= 6, res  # one or more per Linear
        assert res["opened"] == {"meta.pt": 1, "rank00000.pt": 1, "rank00001.pt": 1,
                                 f"extra{rank:05d}.pt": 1}, res
        assert res["same"], rank
        # the same layout: each rank keeps the pieces of its own file alone, what it
        # reads (all of every file's, held to the load's end, were 3.8 KB each of host
        # memory: helper-130)
        own = [res["in_files"][0], 0] if rank == 0 else [0, res["in_files"][1]]
        assert res["kept"] == own, res


def test_finding_madvise_where_the_c_library_cannot_be_opened_hands_nothing_back(monkeypatch):
    """On Windows ctypes.CDLL(None) raises TypeError: the import of zeroshard failed
    (helper-130), where the pages should simply stay until the load ends."""
    import ctypes
    import mmap

    from zeroshard import _file_pages

    def no_library(*args, **kwargs):
        raise TypeError("argument of type 'NoneType' is not iterable")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert _file_pages._find_madvise() is None
    monkeypatch.undo()
    monkeypatch.delattr(mmap, "MADV_DONTNEED", raising=False)
    assert _file_pages._find_madvise() is None


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_saved_on_a_big_endian_host_loads_its_values(pool, tmp_path, stage):
    """torch.load(mmap=True) swaps a big-endian file's bytes in place, in the mapped pages;
    handing those pages back to the kernel after a bucket read them brought back the
    file's unswapped bytes: values of 1e36 and NaN, silently (helper-130)."""
    folder = str(tmp_path / "ckpt")
    for rank, res in enumerate(pool.run(cases_ckpt.files_a_load_opens, 2, folder, stage, True)):
        assert res["same"], rank


@pytest.mark.parametrize("group", [{}, {"fused": True}, {"capturable": True}])
@pytest.mark.parametrize("key, value", [("step", torch.tensor(3.0)),
                                        ("mu_product", torch.tensor(0.5, dtype=torch.float64)),
                                        ("count", torch.tensor(2))])
def test_loaded_optimizer_scalars_are_placed_by_torchs_rule(group, key, value):
    """Note [special device hosting for step] in torch.optim: a saved scalar state lands
    where torch's own load_state_dict puts it (here a master on meta, so the device shows)."""
    from zeroshard._sharded_state import _placed_scalar
    master = torch.empty(4, dtype=torch.bfloat16, device="meta")
    groups = [{**group, "params": [0]}]
    expected = torch.optim.Optimizer._process_value_according_to_param_policy(
        master, value, 0, groups, key)
    placed = _placed_scalar(key, value, master, group)
    assert (placed.device, placed.dtype) == (expected.device, expected.dtype)


# which bad checkpoint -> words the error must contain (what is wrong, and where)
BAD_CHECKPOINTS = {
    "missing_file": ["rank00001.pt", "missing"],
    "truncated_file": ["rank00000.pt", "truncated"],
    "other_model": ["different model", "shape"],
    "other_groups": ["param groups", "param_groups"],
    "groups_in_another_order": ["in another order", "parameter 0 is 'body.0.weight' there and 'body.4.bias' here",
                                "register them as the saving run did"],
    "other_classes": ["param_groups[0]: torch.optim.Muon", "torch.optim.adamw.AdamW"],
    "not_a_checkpoint": ["not a zeroshard checkpoint", "LATEST"],
    "a_file": ["not a zeroshard checkpoint"],
    # (a helper's probes: a buffer broadcast across the model's, silently; the others left
    # waiting in the load's collectives by the rank that could not see the folder)
    "other_buffer_shape": ["buffer 'table' of shape (4,)", "(3, 4)"],
    # (the model's buffer kept its initial value; the checkpoint's was dropped: a helper's probe)
    "missing_buffer": ["does not hold this model's buffers", "missing ['table']"],
    "unexpected_buffer": ["does not hold this model's buffers", "unexpected ['table']"],
    "seen_by_one_rank": ["not a zeroshard checkpoint", "LATEST"],
    # one byte of a shard's values flipped, the size unchanged: it loaded, silently
    "corrupted_file": ["rank00001.pt", "is corrupted", "CRC-32", "load another"],
    # meta.pt holds the optimizer's scalars (Adam's step): one changed loaded, silently
    "corrupted_meta": ["meta.pt is corrupted", "CRC-32", "load another"],
    "missing_meta_checksum": ["meta.crc32 is missing", "load another"],
}


@pytest.mark.parametrize("which", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_on_every_rank_and_changes_nothing(pool, tmp_path, which):
    side = {"n": 2, "stage": 2, "bf16": False, "bucket_mb": 1e-3, "units": None}
    load = dict(side)
    if which == "other_buffer_shape":
        side["table"], load["table"] = (4,), (3, 4)
    elif which == "missing_buffer":
        load["table"] = (4,)
    elif which == "unexpected_buffer":
        side["table"] = (4,)
    cfg = {"model": MLP, "optimizer": "Muon+AdamW" if which == "other_classes" else "AdamW",
           "save": side, "load": load, "steps_before": 1, "steps_after": 0}
    folder = tmp_path / "run" / "ckpt"
    pool.run(cases_ckpt.train_and_save, 2, cfg, str(folder))
    version = folder / (folder / "LATEST").read_text()
    if which == "missing_file":
        (version / "rank00001.pt").unlink()
    elif which == "truncated_file":
        data = (version / "rank00000.pt").read_bytes()
        (version / "rank00000.pt").write_bytes(data[: len(data) // 2])
    elif which == "corrupted_file":
        _flip_a_byte_of(version / "rank00001.pt", "/data/")
    elif which == "corrupted_meta":
        _flip_a_byte_of(version / "meta.pt", "/data.pkl")
    elif which == "missing_meta_checksum":
        (version / "meta.crc32").unlink()
    elif which == "not_a_checkpoint":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif which == "a_file":
        folder = version / "meta.pt"
    for rank, res in enumerate(pool.run(cases_ckpt.load_bad_checkpoint, 2, cfg, str(folder), which)):
        assert res["error"] is not None, (rank, which)
        # rank 1 alone cannot see the folder; rank 1 checks rank00001.pt (Note [checksums])
        if which in ("seen_by_one_rank", "corrupted_file") and rank == 0:
            assert "another rank failed" in res["error"], res["error"]
            continue
        for word in BAD_CHECKPOINTS[which]:
            assert word in res["error"], (rank, word, res["error"])
        assert res["unchanged"], (rank, which)


def _flip_a_byte_of(file, record_name: str) -> None:
    """Flip one byte inside a record of a torch.save file (a tensor's data: "/data/"; the
    pickle: "/data.pkl"): the file keeps its size (torch.load checks no checksum)."""
    import zipfile
    with zipfile.ZipFile(file) as archive:
        record = next(i for i in archive.infolist() if record_name in i.filename and i.file_size)
    data = bytearray(file.read_bytes())
    # the record's bytes follow its local header (30 bytes + name + extra field)
    name_length = int.from_bytes(data[record.header_offset + 26:record.header_offset + 28], "little")
    extra_length = int.from_bytes(data[record.header_offset + 28:record.header_offset + 30], "little")
    start = record.header_offset + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x40
    file.write_bytes(bytes(data))


def test_a_save_to_folders_that_differ_across_ranks_is_refused_on_every_rank(pool, tmp_path):
    """``save_checkpoint(f"ckpt_{rank}", ...)``: rank 1 failed with a raw
    FileNotFoundError for a file under a folder rank 0 had made in its own path (a
    probe). Rank 1 now names the folder it cannot see and the fix, rank 0 says another
    rank failed, and a save to one folder afterwards loads back exactly."""
    base = str(tmp_path / "ckpt")
    for rank, (error, difference) in enumerate(
            pool.run(cases_ckpt.save_to_per_rank_folders, 2, base)):
        assert error is not None, rank
        if rank == 0:
            assert "another rank failed" in error, error
        else:
            assert f"rank 1 cannot find '{base}_1/v000000.partial', which rank 0 made" in error, error
            assert "pass the same folder on every rank" in error, error
        assert difference == 0.0, difference


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adafactor_state_sent_from_rank_0_keeps_each_parameters_own_states(pool, stage):
    """load_full_state_dict with the dicts on rank 0 sent every parameter of a bucket the
    first parameter's per-element states: Adafactor's vectors lost their ``variance``
    (the next step failed with torch's raw AssertionError on their owner, the other rank
    left waiting) or its matrices gained a zero one (a helper's probe)."""
    for rank, (keys, difference) in enumerate(pool.run(cases_ckpt.adafactor_state_from_rank0,
                                                       2, stage)):
        if rank == 0:
            assert keys["loaded"] == keys["saved"], keys
            assert any("variance" in k for k in keys["saved"].values()), keys
        assert difference == 0.0, difference


@pytest.mark.parametrize("first_persistent", [True, False])
def test_a_buffer_registered_in_two_modules_loads_back(pool, tmp_path, first_persistent):
    """``model.state_dict()`` names such a buffer twice, ``named_buffers()`` (and so a
    checkpoint) once: the buffer check refused the model's own checkpoint as missing
    'b.scale', and load_full_state_dict its own state dict as unexpected 'b.scale' (a
    reviewer's probe). Persistent in one of the two only, it was not saved at all."""
    for errors, restored in pool.run(cases_ckpt.a_buffer_registered_in_two_modules, 2,
                                     str(tmp_path / "ckpt"), first_persistent):
        assert errors == [None, None], errors
        assert torch.equal(restored, torch.ones(4)), restored


@pytest.mark.parametrize("length_on_load", [4, 6])
def test_a_checkpoint_restores_the_buffers_torch_restores(pool, tmp_path, length_on_load):
    """Note [buffers a checkpoint holds]: the persistent buffers, as torch's
    ``load_state_dict``. A computed (non-persistent) buffer was saved and restored: a
    changed one came back changed (a bf16-rounded ``inv_freq`` in an fp32 resume, a
    helper's probe), and one of another length was refused."""
    for error, same in pool.run(cases_ckpt.non_persistent_buffers, 2, str(tmp_path / "ckpt"),
                                length_on_load):
        assert error is None, error
        assert same


def test_a_stage3_load_inside_summon_full_params_is_refused(pool, tmp_path):
    for refusals, kept in pool.run(cases_ckpt.load_inside_summon, 2, str(tmp_path / "ckpt")):
        for refusal, action in zip(refusals, ["load_checkpoint()", "opt.load_full_state_dict()"]):
            assert f"zeroshard stage 3: {action} inside `with opt.summon_full_params():`" in refusal, refusal
            assert "after the block" in refusal, refusal
        assert kept


@pytest.mark.parametrize("optimizer", sorted(cases_ckpt.STEP_COUNTING))
@pytest.mark.parametrize("how", ["checkpoint", "full"])
def test_step_counts_that_differ_within_a_new_bucket_are_refused(pool, tmp_path, how, optimizer):
    for rank, (refusal, unchanged, resumed) in enumerate(pool.run(
            cases_ckpt.step_counts_that_differ_within_a_bucket, 2, str(tmp_path / "ckpt"), how,
            optimizer)):
        if optimizer == "Adagrad":  # Note [scalars that do not change the step]
            assert refusal is None, refusal
            assert unchanged < 1e-6 and resumed < 1e-6, (unchanged, resumed)
            continue
        if how == "full" and rank > 0:  # rank 0 holds the dicts, and checks them
            assert refusal.startswith("RuntimeError: another rank failed"), refusal
            assert unchanged and resumed < 1e-6, (unchanged, resumed)
            continue
        assert refusal.startswith("ValueError: ") and "step=1 for 'branch.bias' and step=3 for" \
            in refusal, refusal
        assert "bucket_size_mb" in refusal and "units=" in refusal, refusal
        assert unchanged
        assert resumed < 1e-6, resumed


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD", "AdamW_amsgrad_alone", "SGD_momentum_alone"])
@pytest.mark.parametrize("bucket_mb", [25, 1e-5])  # one bucket; the temperature alone
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_zero_dim_parameters_optimizer_state_loads_from_a_full_state_dict(pool, stage, bucket_mb,
                                                                             optimizer):
    """A 0-dim parameter's moments and a scalar ``step`` are alike 0-dim tensors in a
    plain optimizer state dict. Taken for scalars, the moments were refused as differing
    step counts (one bucket), or loaded 0-dim onto the temperature's 1-D shard, and the
    next step raised torch's raw broadcast error (a bucket of its own; a helper's
    probe). Now they load, and training goes on equal to DDP's, also where a state only
    the temperature's group has shows on no other parameter (a reviewer's probes: the
    first rule, keys shown per element elsewhere, took amsgrad's for a scalar)."""
    for error, difference in pool.run(cases_ckpt.a_zero_dim_parameters_state_through_full_state_dicts,
                                      2, stage, bucket_mb, optimizer):
        assert error is None, error
        assert difference < 1e-6, difference


@pytest.mark.parametrize("which, words", [("missing_key", ["missing keys"]),
                                          ("wrong_shape", ["has shape"]),
                                          ("other_groups", ["param groups of sizes"]),
                                          # (refused as differing step counts before)
                                          ("states_in_another_order",
                                           ["holds 'momentum_buffer' of shape", "another order"]),
                                          ("optimizer_on_rank1_only",
                                           ["rank 0 passed optimizer_state_dict=None", "1 other"])])
def test_bad_full_state_dict_is_refused_on_every_rank_and_changes_nothing(pool, tmp_path, which,
                                                                          words):
    side = {"n": 2, "stage": 3, "bf16": False, "bucket_mb": 1e-3, "units": None}
    cfg = {"model": MLP, "optimizer": "SGD", "save": side, "load": dict(side)}
    results = pool.run(cases_ckpt.load_bad_full_state, 2, cfg, str(tmp_path / "full.pt"), which)
    for rank, res in enumerate(results):
        assert res["error"] is not None and all(w in res["error"] for w in words), (rank, res)
        assert res["unchanged"], rank


@pytest.mark.parametrize("how", ["checkpoint", "full"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_load_where_a_layer_is_frozen_since_the_save_loads_every_layer(pool, tmp_path, stage,
                                                                        how):
    for difference in pool.run(cases_ckpt.load_where_a_layer_is_frozen_since, 2, stage,
                               str(tmp_path / "ckpt"), how):
        assert difference == 0, difference


def test_a_numpy_hyperparameter_is_saved_as_a_number_that_loads(pool, tmp_path):
    for lr, betas in pool.run(cases_ckpt.numpy_hyperparameters, 2, str(tmp_path / "ckpt")):
        assert (lr, betas) == (0.005, (0.8, 0.95)), (lr, betas)
        assert type(lr) is float and type(betas[0]) is float, (type(lr), type(betas[0]))


@pytest.mark.parametrize("allowed", [False, True])
def test_a_python_object_in_the_optimizer_state_is_refused_at_save_unless_allowed(
        pool, tmp_path, allowed):
    """Note [a checkpoint that loads]: a Python object in an optimizer's state (SCION's
    enum, AdaShift's deque) was saved without a word, and every load was then refused (a
    helper's sweep). Refused on every rank before anything is written, naming the type
    and torch's allow-list; with the type allowed, saved and loaded."""
    for result in pool.run(cases_owned.checkpoint_of_a_python_object, 2,
                           str(tmp_path / "ckpt"), allowed):
        if allowed:
            assert result["refusal"] is None, result
            assert result["loaded"] and set(result["loaded"]) == {"Pace"}, result
        else:
            assert "cases_owned.Pace" in result["refusal"], result
            assert "add_safe_globals" in result["refusal"] and "Nothing was written" in \
                result["refusal"], result
            assert "LATEST" not in result["files"], result



@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_qat_models_resume_names_its_first_forward_and_loads_after_it(pool, tmp_path, stage):
    fix = "run one forward under torch.no_grad() before building the ZeroOptimizer"
    outcomes = pool.run(cases_ckpt.a_qat_models_resume, 2, str(tmp_path / "ckpt"), stage)
    for from_checkpoint, from_full, difference in outcomes:
        assert "fake_quant" in from_checkpoint or "observer" in from_checkpoint, from_checkpoint
        assert fix in from_checkpoint, from_checkpoint
        assert from_full != "no error"  # refused on every rank
        assert difference is None or difference == 0.0, difference
    # the full state dicts are rank 0's: it names the buffer and the fix
    assert fix in outcomes[0][1] and "model_state_dict[" in outcomes[0][1], outcomes[0][1]
    assert outcomes[0][2] == 0.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_modules_extra_state_resumes_with_it(pool, tmp_path, stage):
    """Note [modules' extra state]: ``get_extra_state`` / ``set_extra_state`` (an amax the
    forward scales by, a count) come back with a checkpoint and with full state dicts (on
    every rank, or on rank 0 only), and training goes on as if it never stopped. The
    checkpoint lost them (an amax back at its initial value, silently), and
    ``load_full_state_dict`` refused its own ``full_state_dict()``'s ``_extra_state`` key
    as another model's (helper-101's probe). A checkpoint with such state is refused by a
    model without it, and extra state no weights-only load could read is refused at the
    save (Note [a checkpoint that loads]), nothing written."""
    for out in pool.run(cases_ckpt.modules_extra_state, 2, stage, str(tmp_path / "ckpt")):
        for way in ("checkpoint", "full state, every rank", "full state, rank 0"):
            difference, same_state = out[way]
            assert same_state, way
            assert difference == 0, (way, difference)
        assert "extra state" in out["refused"] and "block._extra_state" in out["refused"], \
            out["refused"]
        refusal = out["save refused"]
        assert refusal and "block._extra_state" in refusal and "deque" in refusal, refusal
        assert "add_safe_globals" in refusal and not out["written"], refusal


def test_extra_state_read_from_released_parameters_is_refused_on_every_rank(pool, tmp_path):
    """Note [modules' extra state]: at stage 3 a ``get_extra_state`` that reads the module's
    weight cannot run between passes. ``save_checkpoint`` and ``full_state_dict`` refuse
    on every rank, naming it and ``summon_full_params()`` (``full_state_dict`` raised on
    rank 0 alone, after its gathers, and the other ranks went on: helper-103); inside
    the block both save the weight's value."""
    for out in pool.run(cases_ckpt.extra_state_read_from_released_parameters, 2,
                        str(tmp_path / "ckpt"), timeout=60):
        for name in ("checkpoint", "full state"):
            assert out[name] and "ReadsItsWeight.get_extra_state()" in out[name] \
                and "summon_full_params" in out[name], (name, out[name])
        amax, expected = out["restored"]
        assert amax == expected and out["full"] == expected, out
