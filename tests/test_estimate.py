"""The estimator against the ZeRO paper's Table 1 (7.5B parameters, N=64, K=12)."""


import pytest
import torch

import zeroshard
from zeroshard import cli
from zeroshard._layout import ALIGN

GB = 1e9


@pytest.mark.parametrize("stage,expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_paper_table_1(stage, expected_gb):
    got = zeroshard.estimate_memory(7.5e9, 64, stage) / GB
    assert got == pytest.approx(expected_gb, abs=0.05)


def test_fp32_adam_is_16_bytes_per_parameter_under_dp():
    table = zeroshard.estimate_memory(1000, 4, param_bytes=4, grad_bytes=4, optimizer_bytes=8)
    assert table["dp"] == 16000
    assert table[3] == 4000


def test_bad_stage_names_the_value():
    with pytest.raises(ValueError, match="got 5"):
        zeroshard.estimate_memory(10, 2, 5)


@pytest.mark.parametrize("args,words", [
    ((-5, 2), ["num_params", "-5"]), ((float("nan"), 2), ["num_params", "nan"]),
    ((10, 4.5), ["world_size", "4.5"]), ((10, True), ["world_size", "True"]),
    ((10, 2, True), ["stage", "True"])])
def test_bad_figures_are_refused_naming_them(args, words):
    """A helper's probe: negative bytes, "nan B", a fraction of a rank and stage=True (as
    stage 1) were printed as figures."""
    with pytest.raises(ValueError) as refusal:
        zeroshard.estimate_memory(*args)
    assert all(word in str(refusal.value) for word in words), refusal.value
    with pytest.raises(ValueError, match="optimizer_bytes.*-4"):
        zeroshard.estimate_memory(10, 2, optimizer_bytes=-4)
    with pytest.raises(ValueError, match="shard_size.*True"):
        zeroshard.estimate_memory(10, 2, shard_size=True)
    # what stays accepted (a reviewer's probe): 4-bit weights, a whole float, a numel sum
    assert zeroshard.estimate_memory(1000, 8.0, 2, param_bytes=0.5) == 500 + (2000 + 12000) / 8
    assert zeroshard.estimate_memory(torch.tensor(1000), 4) == zeroshard.estimate_memory(1000, 4)
    # a stage given as a tensor or a whole float (a raw KeyError for the tensor before)
    assert zeroshard.estimate_memory(1000, 4, torch.tensor(2)) == zeroshard.estimate_memory(1000, 4, 2)
    assert zeroshard.estimate_memory(1000, 4, 2.0) == zeroshard.estimate_memory(1000, 4, 2)


def test_cli_prints_the_paper_table():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "zeroshard", "estimate", "--params", "7.5e9",
                          "--world-size", "64"], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[2]: line for line in out.splitlines() if "ZeRO stage" in line}
    assert "120 GB" in out
    assert "31.4 GB" in rows["1"] and "16.6 GB" in rows["2"] and "1.88 GB" in rows["3"]
    # zeroshard's own stage 1: one more 2-byte gradient shard, 7.5e9 * 2 / 64 = 234 MB
    assert "zeroshard's stage 1 holds 31.6 GB" in out and "(234 MB)" in out, out


def estimate_command(capsys, *argv) -> tuple[int, str, str]:
    """``python -m zeroshard estimate *argv`` run in this process (its exit code, stdout
    and stderr): starting Python and torch again took 3 s a call. The paper-table test
    above runs the real command."""
    try:
        code = cli.main(["estimate", *argv])
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_fractional_bytes_per_parameter(capsys):
    """4-bit weights: the README said the CLI took fractional bytes, and it refused 0.5
    (an int option) and had no option for the weights' bytes (a helper's walk through
    the README)."""
    code, out, _ = estimate_command(capsys, "--params", "1e9", "--world-size", "4",
                                    "--param-bytes", "0.5", "--grad-bytes", "2",
                                    "--optimizer-bytes", "2")
    assert code == 0 and "(0.5+2+2 bytes per parameter)" in out, out
    rows = {line.split()[2]: line for line in out.splitlines() if "ZeRO stage" in line}
    # stage 3: (0.5 + 2 + 2) * 1e9 / 4 = 1.125 GB; stage 1: (0.5 + 2) * 1e9 + 2e9 / 4 = 3 GB
    assert "1.12 GB" in rows["3"] and "3 GB" in rows["1"], out
    code, _, err = estimate_command(capsys, "--params", "1e9", "--world-size", "4",
                                    "--grad-bytes", "-1")
    assert code != 0 and "grad_bytes" in err and "-1" in err


def test_cli_counts_a_model_given_as_an_import_path(capsys):
    from models import estimate_cli_example, estimate_cli_example_frozen
    psi = sum(p.numel() for p in estimate_cli_example().parameters())
    code, out, _ = estimate_command(capsys, "--model", "models:estimate_cli_example",
                                    "--world-size", "2", "--precision", "fp32")
    assert code == 0 and out.startswith(f"{psi} parameters"), out
    dp_bytes = 16 * psi  # fp32 Adam: 4 + 4 + 8 bytes per parameter
    assert f"{dp_bytes / 1e3:.3g} KB" in out, (dp_bytes, out)
    # its frozen parameters apart: weights only (they were counted as trainable)
    code, out, _ = estimate_command(capsys, "--model", "models:estimate_cli_example_frozen",
                                    "--world-size", "2", "--precision", "fp32")
    model = estimate_cli_example_frozen()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 0 < trainable < psi and frozen > 0
    assert code == 0 and out.startswith(f"{trainable} parameters (+{frozen:.4g} frozen"), out
    assert f"{(16 * trainable + 4 * frozen) / 1e3:.3g} KB" in out, out
    # --frozen-params beside --model: refused (the model's own count replaced it, silently)
    code, out, err = estimate_command(capsys, "--model", "models:estimate_cli_example",
                                      "--frozen-params", "1e6", "--world-size", "2")
    assert code == 2 and "--frozen-params goes with --params" in err, (out, err)


def test_hybrid_divides_model_states_by_the_shard_size():
    """64 ranks as 8 replicas x 8 shards: each replica holds the states divided by 8."""
    psi = 7.5e9
    table = zeroshard.estimate_memory(psi, 64, shard_size=8)
    assert table[1] == 2 * psi + 2 * psi + 12 * psi / 8
    assert table[2] == 2 * psi + (2 + 12) * psi / 8
    assert table[3] == 16 * psi / 8
    assert zeroshard.estimate_memory(psi, 64, shard_size=64) == zeroshard.estimate_memory(psi, 64)
    with pytest.raises(ValueError, match="got 7"):
        zeroshard.estimate_memory(psi, 64, shard_size=7)


def test_cli_takes_the_shard_size(capsys):
    code, out, _ = estimate_command(capsys, "--params", "7.5e9", "--world-size", "64",
                                    "--shard-size", "8")
    rows = {line.split()[2]: line for line in out.splitlines() if "ZeRO stage" in line}
    assert code == 0 and "8 replicas x 8 shards" in out
    assert "15 GB" in rows["3"] and "41.2 GB" in rows["1"], out


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memory_report_on_a_mesh_follows_the_hybrid_formula(pool, stage, frozen):
    """On a 2x2 mesh memory_report() (real storages) is the formula with S = 2, fp32 Adam,
    up to the padding of each bucket to a multiple of 2; with a frozen weight, the
    formula's ``frozen_params`` (counted as trainable, the estimate of a LoRA model read
    2.4 to 3.8 times its memory_report(): a helper's probe)."""
    import cases_api
    for psi, psi_frozen, buckets, report in pool.run(cases_api.memory_on_a_mesh, 4, stage,
                                                     (2, 2), frozen):
        assert (psi_frozen > 0) == frozen
        stored = report.pop("stored elements")  # sharding_report()'s, frozen shards included
        if stage == 3:  # every parameter is a shard: what the shards store is what it holds
            assert report["parameters"] == 4 * stored, (report, stored)
        total = sum(report.values())
        # after backward, before step(): Adam's states exist from the previous step
        expected = zeroshard.estimate_memory(psi, 4, stage, param_bytes=4, grad_bytes=4,
                                             optimizer_bytes=8, shard_size=2,
                                             frozen_params=psi_frozen)
        # stage 1 keeps the reduced gradient shard beside its full gradient buffers
        expected += 4 * psi / 2 if stage == 1 else 0
        padding = buckets * 4 * 5  # an element per bucket in each flat buffer, shard and state
        # and before each of the 4 parameters, an alignment gap of fewer than ALIGN elements
        # in each of them (Note [aligned parameters] in zeroshard/_layout.py)
        padding += 4 * 5 * 4 * (ALIGN - 1)
        scalars = 8 * buckets  # Adam's step counter per shard tensor
        assert expected <= total <= expected + padding + scalars, (stage, report, expected)
