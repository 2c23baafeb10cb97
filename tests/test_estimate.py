"""The estimator against the ZeRO paper's Table 1 (7.5B parameters, N=64, K=12)."""


import pytest

import zeroshard

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


def test_cli_prints_the_paper_table():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "zeroshard", "estimate", "--params", "7.5e9",
                          "--world-size", "64"], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[2]: line for line in out.splitlines() if "ZeRO stage" in line}
    assert "120 GB" in out
    assert "31.4 GB" in rows["1"] and "16.6 GB" in rows["2"] and "1.88 GB" in rows["3"]


def test_cli_counts_a_model_given_as_an_import_path():
    import os
    import subprocess
    import sys
    from pathlib import Path
    from models import estimate_cli_example
    psi = sum(p.numel() for p in estimate_cli_example().parameters())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-m", "zeroshard", "estimate", "--model",
                          "models:estimate_cli_example", "--world-size", "2", "--precision", "fp32"],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert out.startswith(f"{psi} parameters"), out
    dp_bytes = 16 * psi  # fp32 Adam: 4 + 4 + 8 bytes per parameter
    assert f"{dp_bytes / 1e3:.3g} KB" in out, (dp_bytes, out)
