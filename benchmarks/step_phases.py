"""Where a step's time goes, method by method, in one process group: wall time of
forward, backward, step and zero_grad, and the process's CPU time and minor page
faults per step (rank 0, all its threads; the faults also phase by phase), medians
over the steps and rounds.

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/step_phases.py --methods ddp,zeroshard1

CPU time and page faults move far less between runs than wall time on a shared
machine (wall time here drifts by tens of percent between runs), so they separate
the cost of a change from the machine's drift: run the old and the new code in turn
(``PYTHONPATH=<a copy of the old code>``) and compare. With MALLOC_MMAP_THRESHOLD_
set as compare.py sets it for memory, every buffer over 1 MiB is fresh memory, a
fault per 4 KiB page when first written. Methods, model and wrapping are compare.py's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402

PHASES = ("forward", "backward", "step", "zero_grad")


def _usage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def worker(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    size = compare.SIZES[args.size]
    methods = args.methods.split(",")
    figures = {m: {k: [] for k in (*PHASES, "cpu_s", "faults", *(f"faults_{p}" for p in PHASES))}
               for m in methods}
    for round_ in range(args.rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            torch.manual_seed(0)
            model = compare.GPT(size["vocab"], size["d_model"], size["layers"], size["heads"],
                                size["seq_len"])
            module, opt, backward = compare.setup(method, model, lr=1e-4)
            g = torch.Generator().manual_seed(rank)
            tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1), generator=g)
            x, y = tokens[:, :-1], tokens[:, 1:]
            for step in range(args.warmup + args.steps):
                dist.barrier()
                cpu, faults = _usage()
                marks, fault_marks = [time.perf_counter()], [faults]

                def mark():
                    marks.append(time.perf_counter())
                    fault_marks.append(_usage()[1])
                loss = F.cross_entropy(module(x).reshape(-1, size["vocab"]), y.reshape(-1))
                mark()
                (backward or torch.Tensor.backward)(loss)
                mark()
                opt.step()
                mark()
                opt.zero_grad()
                mark()
                cpu_after, faults_after = _usage()
                if step >= args.warmup:
                    for i, phase in enumerate(PHASES):
                        figures[method][phase].append(marks[i + 1] - marks[i])
                        figures[method][f"faults_{phase}"].append(fault_marks[i + 1] - fault_marks[i])
                    figures[method]["cpu_s"].append(cpu_after - cpu)
                    figures[method]["faults"].append(faults_after - faults)
            del module, opt, model
    if rank == 0:
        print("| method | " + " | ".join(f"{p} s" for p in PHASES)
              + " | wall s | CPU s (rank 0) | minor faults (rank 0) | faults "
              + " / ".join(PHASES) + " |")
        print("|---" * (len(PHASES) + 5) + "|")
        for method in methods:
            median = {k: statistics.median(v) for k, v in figures[method].items()}
            wall = sum(median[p] for p in PHASES)
            print(f"| {method} | " + " | ".join(f"{median[p]:.3f}" for p in PHASES)
                  + f" | {wall:.3f} | {median['cpu_s']:.3f} | {median['faults']:,.0f} | "
                  + " / ".join(f"{median[f'faults_{p}']:,.0f}" for p in PHASES) + " |")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ddp,zeroshard1,zeroshard2,zeroshard3")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--size", choices=sorted(compare.SIZES), default="100m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    mp.spawn(worker, args=(args.world_size, compare.free_port(), args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
