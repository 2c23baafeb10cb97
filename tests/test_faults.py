"""Crash safety: torchrun jobs killed with SIGKILL resume from the last complete checkpoint.

Each case runs examples/train_gpt.py (through tests/fault_job.py) on 2 ranks: once
without interruption, once killed at a chosen point and then restarted with
--resume. Both export a plain full state dict at the end; they must be identical.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--steps", "8", "--batch-size", "4", "--seq-len", "16", "--vocab", "16", "--d-model", "32",
        "--layers", "2", "--heads", "2", "--log-every", "100", "--save-every", "2", "--stage", "2"]
TIMEOUT_S = 240


def torchrun(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=0", os.path.join(ROOT, "tests", "fault_job.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = torchrun(["--", *TINY, "--save-dir", str(folder / "ckpt"), "--export", str(folder / "final.pt")])
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(folder / "final.pt", weights_only=False)


@pytest.mark.parametrize("kill, resumes_at", [
    ("training:5:1", 4),   # rank 1 dies at step 5: the checkpoint of step 4 is the last one
    ("commit:2:0", 2),     # rank 0 dies in the save of step 4, just before it is published
    ("writing:3:1", 4),    # rank 1 dies halfway through writing its file in the save of step 6
])
def test_killed_job_resumes_to_the_same_parameters(tmp_path, uninterrupted, kill, resumes_at):
    ckpt, final = tmp_path / "ckpt", tmp_path / "final.pt"
    killed = torchrun(["--kill", kill, "--", *TINY, "--save-dir", str(ckpt)])
    assert killed.returncode != 0, "the job was supposed to die"
    assert not final.exists()
    resumed = torchrun(["--", *TINY, "--save-dir", str(ckpt), "--resume", "--export", str(final)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt} at step {resumes_at}" in resumed.stdout, resumed.stdout
    model_sd, optim_sd = torch.load(final, weights_only=False)
    for key, value in uninterrupted[0].items():
        assert torch.equal(value, model_sd[key]), key
    for index, state in uninterrupted[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_sd["state"][index][key]))


@pytest.mark.parametrize("stage, call, other", [
    (2, "full_state_dict", "exits"),  # the DDP habit at a script's end: gloo's "Connection closed"
    (1, "clip", "trains"),  # clipping on one rank mid-training: both ranks time out
])
def test_a_collective_some_rank_never_joins_fails_naming_the_likely_cause(stage, call, other):
    """Ranks that stop making the same calls (a helper's probes) failed with the backend's
    words alone ("Connection closed by peer", "Timed out waiting 5000ms for recv
    operation"), naming neither zeroshard nor the cause. The error, of its own type and
    message, now carries a note naming it (Note [a collective that fails])."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=0", os.path.join(ROOT, "tests", "stray_rank_job.py"),
               str(stage), call, other]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    raised = [line for line in done.stdout.splitlines() if " raised " in line]
    assert done.returncode != 0 and raised, done.stdout + done.stderr
    strays = ["rank 1"] if other == "trains" else []
    for rank in ["rank 0", *strays]:
        line = next((line for line in raised if line.startswith(rank)), None)
        assert line is not None, (rank, done.stdout + done.stderr)
        message, notes = line.split(" | notes: ")
        # the backend's own error, whole, of its own type ("Connection closed by peer",
        # "Timed out waiting 5000ms for recv operation", "Application timeout caused pair
        # closure")
        assert message.startswith(f"{rank} raised RuntimeError: "), line
        assert re.search(r"closed|timed out|timeout|reset", message, re.IGNORECASE), line
        assert "came while waiting for a collective" in notes, line
        assert "every rank must make the same zeroshard calls" in notes, line
        assert "`if rank == 0: opt.full_state_dict()`" in notes and "opt.clip_grad_norm_()" in notes
