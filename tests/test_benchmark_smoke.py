"""The comparison script still runs end to end (tiny model, two methods; no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compare_smoke_runs_and_reports_measured_zeroshard_comm(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--smoke",
                    "--methods", "ddp,zeroshard3", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert "error" not in rows["ddp"] and "error" not in rows["zeroshard3"], rows
    # stage 3, fp32: all-gather twice (forward, backward) and reduce-scatter once: 3 x 4Ψ
    psi = rows["zeroshard3"]["psi"]
    assert 3 * 4 * psi <= rows["zeroshard3"]["comm_bytes"] <= 3 * 4 * psi * 1.01
    assert "| zeroshard3 | 3 |" in (tmp_path / "results.md").read_text()
