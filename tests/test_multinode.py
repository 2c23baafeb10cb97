"""Past one machine: the example launched as two machines of two ranks would launch it
(``torchrun --nnodes=2`` with c10d rendezvous, one launcher per "machine"), training
on a 2x2 (replicate, shard) mesh that replicates across the two, against standalone
launches of the same four ranks."""

import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
# three steps of AdamW, whose steps are about the lr: 1e-4, 2e-4, 3e-4 (the warm-up)
SMALL = ["--steps", "3", "--batch-size", "2", "--seq-len", "8", "--vocab", "16", "--d-model", "16",
         "--layers", "2", "--heads", "2", "--log-every", "100", "--lr", "1e-3"]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(done, what: str) -> None:
    assert done.returncode == 0, f"{what}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _standalone(job: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=4", EXAMPLE, *job],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    _check(done, "standalone launch")


def _two_nodes(job: list[str]) -> None:
    """One torchrun per node; they meet at the c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
         f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=zeroshard-multinode-test", EXAMPLE, *job],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [launcher.communicate(timeout=TIMEOUT_S) for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    for node, (launcher, (out, err)) in enumerate(zip(launchers, outputs)):
        _check(subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err),
               f"node {node}")


def _parameters(path) -> dict[str, torch.Tensor]:
    model_state, _ = torch.load(path, weights_only=True)
    return model_state


def _initial_parameters() -> dict[str, torch.Tensor]:
    """The example's model before training: rank 0's initialisation (seed 0 + rank 0),
    which ZeroOptimizer broadcasts."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_gpt
    finally:
        sys.path.pop(0)
    args = train_gpt.parse_args(SMALL)
    torch.manual_seed(args.seed)
    model = train_gpt.GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq_len)
    return model.state_dict()


def test_two_nodes_train_a_2x2_mesh_to_the_parameters_of_one_node(tmp_path):
    """The two-node launch ends bit-equal to four ranks of one machine on the same mesh
    (the same reductions in the same order). Stage 3, whose gathers cross the mesh too;
    each stage on every mesh shape is drawn in-process against DDP over the four ranks
    by test_equivalence.py's hybrid test (each 4-rank launch costs 20-30 s of the
    suite's time on 2 cores: a third, against a plain 4-rank sharding, was dropped for
    that test's cases)."""
    stage = 3
    hybrid = ["--stage", str(stage), *SMALL, "--replicas", "2"]
    _two_nodes([*hybrid, "--export", str(tmp_path / "two_nodes.pt")])
    _standalone([*hybrid, "--export", str(tmp_path / "one_node.pt")])
    two_nodes, one_node = (_parameters(tmp_path / name) for name in ("two_nodes.pt", "one_node.pt"))
    initial = _initial_parameters()
    assert two_nodes.keys() == initial.keys()
    for name, value in two_nodes.items():
        assert torch.equal(value, one_node[name]), name
    moved = max((value - initial[name]).abs().max() for name, value in two_nodes.items())
    assert moved > 1e-4  # it trained: the three steps add up to about 6e-4
