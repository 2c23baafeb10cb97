"""Where in backward the real peak comes, method by method: the RSS through one backward.

    python benchmarks/backward_timeline.py --world-size 2 --methods fsdp2_no_reshard,zeroshard2

memory_breakdown.py says which phase of a step peaks and what was live when it
began; this says when, inside backward, the peak comes. For each method, in fresh
processes (gloo on CPU, MALLOC_MMAP_THRESHOLD_=1048576 so freed buffers leave RSS at
once; the same runtime warm-up as memory_breakdown.py), after --warmup full steps a
thread samples the RSS every 0.2 ms through one backward, while a hook on each
block's output marks when backward reaches that block. Only public hooks on the
model's own modules are used, so every method is measured alike. Reported: the RSS
above the one before the model was built, at backward's start, as backward enters
every ``--every``-th block and after the last one, at its end, and its peak with the
event it followed. The larger rank's peak is reported. CPU only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import baseline_after_warm_up, free_port, rss_kib, setup, spawn_ranks  # noqa: E402
from memory_breakdown import build  # noqa: E402
from train_gpt import Block  # noqa: E402  (compare.py put examples/ on the path)

SAMPLE_S = 0.0002


class Timeline:
    """RSS samples and named events, both timed, through one backward."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.events: list[tuple[float, str, int]] = []
        self._running = False
        self._thread: threading.Thread | None = None

    def event(self, name: str) -> None:
        self.events.append((time.perf_counter(), name, rss_kib("VmRSS")))

    def _sample(self) -> None:
        while self._running:
            self.samples.append((time.perf_counter(), rss_kib("VmRSS")))
            time.sleep(SAMPLE_S)

    def __enter__(self) -> Timeline:
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.event("start")
        return self

    def __exit__(self, *exc) -> None:
        self.event("end")
        self._running = False
        self._thread.join()

    def peak(self) -> tuple[int, str]:
        """The highest RSS seen (samples and events) and the last event before it."""
        when, kib = max(self.samples + [(t, k) for t, _, k in self.events], key=lambda s: s[1])
        before = [name for t, name, _ in self.events if t <= when]
        return kib, before[-1] if before else "start"


def mark_blocks(model, timeline: Timeline, every: int) -> list:
    """A forward hook on each block that marks, through a hook on its output, when
    backward reaches the block."""
    blocks = [m for m in model.modules() if isinstance(m, (Block, torch.nn.Linear))
              and m is not model]
    if not any(isinstance(m, Block) for m in blocks):  # the MLP: its Linear layers
        blocks = [m for m in blocks if isinstance(m, torch.nn.Linear)]
    else:
        blocks = [m for m in blocks if isinstance(m, Block)]
    last = len(blocks) - 1
    handles = []
    for index, block in enumerate(blocks):
        if index % every and index != last:
            continue

        def arm(module, inputs, output, name=f"block {index}"):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: timeline.event(name))
        # first among the block's forward hooks, so the mark comes before any method's
        # own pre-backward work at that block (its hook on the output runs after ours)
        handles.append(block.register_forward_hook(arm, prepend=True))
    return handles


def worker(rank: int, world: int, port: int, method: str, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    block = torch.nn.Linear if args.model == "mlp" else Block
    baseline = baseline_after_warm_up(method, *build(args, rank, tiny=True), block)
    model, loss_of = build(args, rank, tiny=False)
    module, opt, backward = setup(method, model, lr=1e-4, block=block)
    backward = backward or torch.Tensor.backward
    for _ in range(args.warmup):
        backward(loss_of(module))
        opt.step()
        opt.zero_grad()
    timeline = Timeline()
    handles = mark_blocks(model, timeline, args.every)
    loss = loss_of(module)
    with timeline:
        backward(loss)
    for handle in handles:
        handle.remove()
    mib = lambda kib: (kib - baseline) / 1024  # noqa: E731
    peak, after = timeline.peak()
    results.put({"rank": rank, "peak": mib(peak), "peak_after": after,
                 "events": [(name, mib(kib)) for _, name, kib in timeline.events]})
    dist.barrier()
    dist.destroy_process_group()


def run(method: str, args) -> dict:
    out = spawn_ranks(worker, args.world_size, (free_port(), method, args), args.timeout,
                      measure_memory=True)
    worst = max(out, key=lambda r: r["peak"])
    return {"method": method, **worst}


def table(rows: list[dict]) -> str:
    names = next((r["events"] for r in rows if "events" in r), [])
    columns = [name for name, _ in names]
    lines = ["| method | peak | peak came after | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | skipped: {r['error']} |")
            continue
        level = dict(r["events"])
        cells = [f"{level[c]:.0f}" if c in level else "" for c in columns]
        lines.append(f"| {r['method']} | {r['peak']:.0f} | {r['peak_after']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model", choices=("mlp", "gpt"), default="gpt")
    p.add_argument("--size", default="100m", help="GPT size (compare.py's SIZES)")
    p.add_argument("--methods", default="ddp,fsdp2_no_reshard,zeroshard2,fsdp1_full_shard,"
                                        "fsdp2_reshard,zeroshard3")
    p.add_argument("--warmup", type=int, default=1, help="full steps before the measured backward")
    p.add_argument("--every", type=int, default=3, help="mark every n-th block (and the last)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=None, help="a folder for timeline.md")
    args = p.parse_args(argv)
    rows = []
    for method in args.methods.split(","):
        try:
            rows.append(run(method, args))
            print(f"{method}: peak {rows[-1]['peak']:.0f} MiB after {rows[-1]['peak_after']}",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - one method failing must not hide the others
            rows.append({"method": method, "error": f"{type(error).__name__}: {error}"[:200]})
            print(f"{method}: {rows[-1]['error']}", flush=True)
    command = "python benchmarks/backward_timeline.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = (f"{command}\n\nmodel: {args.model} {args.size if args.model == 'gpt' else ''}, fp32 "
            f"AdamW, {args.world_size} ranks, CPU/gloo, torch {torch.__version__}; MiB above "
            "the RSS before the model was built, as backward enters each marked block (in "
            "backward's order); the larger rank\n\n" + table(rows) + "\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "timeline.md").write_text(text)


if __name__ == "__main__":
    main()
