"""Launch the README's main job K times per stage and count the launches that exit 0.

    python benchmarks/exit_stress.py --launches 30 --stages 1 2 3 [-- extra train_gpt.py args]
    python benchmarks/exit_stress.py --job hf-trainer --launches 80 --stages 3 [-- --trainer ddp]

Each launch is ``torchrun --standalone --nproc_per_node=N examples/train_gpt.py --stage S
--steps 3`` (``--job hf-trainer``: ``benchmarks/exit_hf_trainer_job.py --stage S``, whose
last collectives are HF Trainer's and the script's own). A launch that trains to the end
but aborts at exit (SIGABRT in a gloo
worker thread, Note [finished work] in zeroshard/_comm.py) counts as a failure; the
log of each failed launch is kept in --log-dir. Not part of the test suite: it takes
about 4 s per launch on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


JOBS = {"main": (os.path.join(ROOT, "examples", "train_gpt.py"), ["--steps", "3"]),
        "hf-trainer": (os.path.join(ROOT, "benchmarks", "exit_hf_trainer_job.py"), [])}


def launch(job: str, stage: int, nproc: int, extra: list[str]) -> subprocess.CompletedProcess:
    script, arguments = JOBS[job]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, "--stage", str(stage), *arguments, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="main")
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--log-dir", default=tempfile.gettempdir())
    parser.add_argument("extra", nargs="*", help="more arguments of the job, after --")
    args = parser.parse_args(argv)
    failed_any = False
    for stage in args.stages:
        ok, start = 0, time.perf_counter()
        for index in range(args.launches):
            done = launch(args.job, stage, args.nproc, args.extra)
            if done.returncode == 0:
                ok += 1
                continue
            failed_any = True
            log = os.path.join(args.log_dir, f"exit_stress_stage{stage}_{index}.log")
            with open(log, "w") as file:
                file.write(done.stdout + done.stderr)
            print(f"  stage {stage} launch {index}: exit code {done.returncode}, log {log}", flush=True)
        print(f"stage {stage}: {ok}/{args.launches} launches exited 0 "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
