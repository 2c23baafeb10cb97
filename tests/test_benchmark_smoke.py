"""The benchmark scripts still run end to end (tiny model, two methods; no timing asserted).

Each script's ``main`` runs in this process (its ranks in fresh processes, as always):
a command of its own started Python, torch and matplotlib again, 3 s a script."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *argv: str) -> None:
    """``python benchmarks/<script>.py *argv``, in this process; the environment as it was
    (the scripts set glibc's malloc threshold while their ranks start)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    with mock.patch.dict(os.environ):
        importlib.import_module(script).main(list(argv))


def test_compare_smoke_runs_and_reports_measured_zeroshard_comm(tmp_path):
    run_benchmark("compare", "--smoke", "--methods", "ddp,zeroshard3", "--out", str(tmp_path))
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert "error" not in rows["ddp"] and "error" not in rows["zeroshard3"], rows
    # stage 3, fp32: all-gather twice (forward, backward) and reduce-scatter once: 3 x 4Ψ
    psi = rows["zeroshard3"]["psi"]
    assert 3 * 4 * psi <= rows["zeroshard3"]["comm_bytes"] <= 3 * 4 * psi * 1.01
    assert "| zeroshard3 | 3 |" in (tmp_path / "results.md").read_text()


def test_frozen_backward_smoke_gathers_the_frozen_blocks_in_forward_only(tmp_path):
    """frozen_backward.py runs end to end; zeroshard's step all-gathers every parameter
    for forward and all but the frozen blocks' for backward (Note [frozen units backward
    never reads] in zeroshard/_walk.py), plus padding, in fp32, from the model's sizes."""
    run_benchmark("frozen_backward", "--methods", "ddp,zeroshard3", "--vocab", "64",
                  "--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "8",
                  "--frozen-blocks", "2", "--warmup", "2", "--steps", "1", "--out", str(tmp_path))
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in out["rows"]}
    theory = 4 * (2 * out["total"] - out["frozen_blocks"])
    assert theory <= rows["zeroshard3"]["all_gather_bytes"] <= theory * 1.02, (theory, rows)
    assert rows["ddp"]["all_gather_bytes"] is None


def test_memory_breakdown_smoke_counts_ddps_model_states_from_the_model(tmp_path):
    """memory_breakdown.py runs end to end; its DDP row's parameters and AdamW states are
    the smoke GPT's 4Ψ and 8Ψ + a 4-byte step per parameter, computed here."""
    run_benchmark("memory_breakdown", "--model", "gpt", "--size", "smoke", "--steps", "1",
                  "--methods", "ddp,zeroshard2", "--out", str(tmp_path))
    rows = {r["method"]: r for r in json.loads((tmp_path / "breakdown.json").read_text())["rows"]}
    assert "error" not in rows["ddp"] and "error" not in rows["zeroshard2"], rows
    from compare import SIZES, GPT  # run_benchmark put benchmarks/ on the path, compare.py examples/
    size = SIZES["smoke"]
    params = list(GPT(size["vocab"], size["d_model"], size["layers"], size["heads"],
                      size["seq_len"]).parameters())
    psi = sum(p.numel() for p in params)
    mib = 2**20
    figures = rows["ddp"]["figures"]
    assert figures["parameters"] * mib == pytest.approx(4 * psi, abs=1), figures
    assert figures["optimizer states"] * mib == pytest.approx(8 * psi + 4 * len(params), abs=1)
    assert "| zeroshard2 |" in (tmp_path / "breakdown.md").read_text()


def test_device_agreement_runs_and_finds_zeroshard_bitwise_equal_to_ddp(tmp_path):
    """What a GPU session runs first (benchmarks/device_check.sh) still runs here, on
    CPU/gloo: it exits 1 if a case's parameters differ from DDP's by one bit, or a
    resumed stage-3 run from the uninterrupted one."""
    run_benchmark("device_agreement", "--world-size", "2", "--steps", "3",
                  "--cases", "zeroshard2,zeroshard3", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "agreement.json").read_text())["rows"]
    assert rows["zeroshard2"]["difference_from_ddp"] == 0, rows
    assert rows["zeroshard3"]["difference_from_ddp"] == 0, rows
    assert rows["zeroshard3"]["resumed_difference"] == 0, rows
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], check=True)


def test_allocated_peaks_smoke_holds_at_least_the_model_states(tmp_path):
    """allocated_peaks.py runs end to end, and each peak holds at least the model states
    alive through a step, from the smoke GPT's Ψ: DDP its parameters, gradients and
    AdamW's two moments (16Ψ bytes); stage 2 its parameters, and its shards of the
    gradients and moments (4Ψ + 12Ψ/2). A profiler that missed allocations would fall
    below."""
    run_benchmark("allocated_peaks", "--size", "smoke", "--methods", "ddp,zeroshard2",
                  "--out", str(tmp_path))
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    from compare import SIZES, GPT
    size = SIZES["smoke"]
    psi = sum(p.numel() for p in GPT(size["vocab"], size["d_model"], size["layers"],
                                      size["heads"], size["seq_len"]).parameters())
    mib = 2**20
    assert rows["ddp"]["peak_mib"] * mib >= 16 * psi, (rows, psi)
    assert rows["zeroshard2"]["peak_mib"] * mib >= 4 * psi + 12 * psi / 2, (rows, psi)
    assert "| zeroshard2 | 2 |" in (tmp_path / "results.md").read_text()
