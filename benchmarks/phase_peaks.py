"""Where in a step the real peak is, method by method: the RSS high-water mark of each
phase (forward, backward, step, zero_grad) of every step, and at each step's start the
RSS against the bytes of the live tensors (what no tensor explains: the runtime's own),
and the bytes malloc keeps freed in its heaps then and after backward (resident,
unexplained by any live tensor: small activations freed in backward stay there).

    python benchmarks/phase_peaks.py --methods zeroshard2,fsdp2_no_reshard [--foreach]

MiB above the RSS right after process-group start, as compare.py measures (with
MALLOC_MMAP_THRESHOLD_=1048576, the high-water mark reset at each phase's start); the
larger rank. Methods, model and wrapping are compare.py's.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402
from train_gpt import GPT  # noqa: E402

PHASES = ("forward", "backward", "step", "zero_grad")
MIB = 2**20


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_free_bytes() -> float:
    """The bytes freed by the program that glibc's malloc keeps in its heaps (every
    arena's ``fordblks``, from ``mallinfo2``): resident once touched, so part of the
    RSS no live tensor explains (tensors under the mmap threshold, such as small
    activations, come from these heaps). NaN where there is no ``mallinfo2``."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return float("nan")
    mallinfo2.restype = _MallInfo2
    return mallinfo2().fordblks


def _live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of the tensors the garbage collector sees."""
    storages = {}
    warnings.simplefilter("ignore")  # attributes some objects deprecate, read in passing
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a wrapper (DTensor), a freed storage
                continue
    return sum(storages.values())


def worker(rank: int, world: int, port: int, method: str, size: dict, steps: int,
           foreach: bool | None, results) -> None:
    compare.join_group(rank, world, port)
    baseline = compare.rss_kib("VmRSS")
    torch.manual_seed(0)
    model = GPT(size["vocab"], size["d_model"], size["layers"], size["heads"], size["seq_len"])
    module, opt, backward = compare.setup(method, model, lr=1e-4, foreach=foreach)
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(rank))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def above_baseline(field: str) -> float:
        return (compare.rss_kib(field) - baseline) / 1024

    rows = []
    for _ in range(steps):
        gc.collect()
        row = {"rss at start": above_baseline("VmRSS"), "live tensors": _live_tensor_bytes() / MIB,
               "heap free at start": _malloc_free_bytes() / MIB}
        for phase in PHASES:
            _reset_high_water()
            if phase == "forward":
                loss = F.cross_entropy(module(x).reshape(-1, size["vocab"]), y.reshape(-1))
            elif phase == "backward":
                (backward or torch.Tensor.backward)(loss)
            elif phase == "step":
                opt.step()
            else:
                opt.zero_grad()
            row[phase] = above_baseline("VmHWM")
            if phase == "backward":
                row["heap free after backward"] = _malloc_free_bytes() / MIB
        rows.append(row)
    results.put({"rank": rank, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--size", choices=sorted(compare.SIZES), default="100m")
    p.add_argument("--methods", default="zeroshard2,fsdp2_no_reshard")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--foreach", action="store_const", const=True, default=None,
                   help="every method's AdamW with foreach=True (CUDA's default; CPU's is the "
                        "for-loop)")
    args = p.parse_args(argv)
    columns = ("rss at start", "live tensors", "heap free at start") + PHASES + (
        "heap free after backward",)
    print(f"python benchmarks/phase_peaks.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"model: examples/train_gpt.py GPT {compare.SIZES[args.size]}, fp32 AdamW"
          f"{' (foreach=True)' if args.foreach else ''}, "
          f"{args.world_size} ranks, CPU/gloo, torch {torch.__version__}; MiB above the RSS "
          "after process-group start: the RSS and the live tensors' bytes at each step's "
          "start, and each phase's high-water mark; malloc's free heap bytes (glibc's "
          "mallinfo2, every arena) at each step's start and after its backward; the larger "
          "rank\n")
    print("| method | step | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for method in args.methods.split(","):
        per_rank = compare.spawn_ranks(worker, args.world_size,
                                       (compare.free_port(), method, compare.SIZES[args.size],
                                        args.steps, args.foreach), args.timeout,
                                       measure_memory=True)
        for step in range(args.steps):
            larger = max((r["rows"][step] for r in per_rank), key=lambda row: max(row.values()))
            print(f"| {method} | {step} | " + " | ".join(f"{larger[c]:.0f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
