"""Where the real peak memory of a training step goes, per stage, beside DDP and the peers.

    python benchmarks/memory_breakdown.py --world-size 2 --out benchmarks/results/breakdown_mlp_ws2
    python benchmarks/memory_breakdown.py --model gpt --size example --world-size 2

"Why did it not fit?" For each method, in fresh processes (gloo on CPU, with
MALLOC_MMAP_THRESHOLD_=1048576 so freed buffers leave RSS at once), a warm-up step,
then --steps steps whose phases (forward, backward, optimizer step, zero_grad) are
measured one by one: at each phase's start the RSS and every live tensor (found
through the garbage collector), and the phase's RSS high-water mark. All figures are
above the RSS before the model was built, after the same method trained a tiny model
for two steps (the runtime's one-time costs are then not counted; compare.py's peaks,
taken from process-group start, include them). The phase with the highest peak is split into:

- parameters, gradients, optimizer states: the live storages of the module's
  parameters, their ``.grad`` and the optimizer's state (a DTensor's local shard;
  zeroshard: what ``memory_report()`` counts, master copies with the parameters);
- activations: the storages autograd saved for backward, counted by a saved-tensors
  hook in the warm-up step only (such a hook turns off zeroshard stage 3's own, Note
  [saved tensors], so the measured steps run without it, as users run them);
- other tensors: every other live storage (DDP's buckets, FSDP's flat or padded
  buffers, a stage's reduce buffers, gathered units, ...);
- the phase's transient: its high-water mark above its start (gradients being
  produced and reduced and collectives' buffers in backward, the optimizer's own
  temporaries in the step);
- rest: RSS not held by a live Python tensor (the allocator, gloo, the runtime, and
  buffers held in C++ only, such as DDP's gradient buckets).

The larger rank's peak is reported. Output: breakdown.json, breakdown.md (the table
and a text bar per method) and breakdown.png (needs matplotlib). CPU only (the phases
are read from /proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import SIZES, baseline_after_warm_up, free_port, rss_kib, setup, spawn_ranks  # noqa: E402
from train_gpt import GPT, Block  # noqa: E402  (compare.py put examples/ on the path)

CATEGORIES = ("parameters", "gradients", "optimizer states", "activations", "other tensors",
              "transient", "rest")
DEFAULT_METHODS = ("ddp,ddp+zero_redundancy,fsdp2_no_reshard,fsdp2_reshard,"
                   "zeroshard1,zeroshard2,zeroshard3")
MLP = dict(layers=16, width=1024, batch=64)  # 16.8M parameters


class Blocks(nn.Module):
    """The MLP as a stack of blocks (``blocks``, like the GPT's), so the same
    wrapping code applies: FSDP shards each block, zeroshard's stage 3 gathers each."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of each distinct storage among ``tensors``."""
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            try:
                storage = _local(tensor).untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue  # a wrapper without storage of its own
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
    return found


def _optimizer_state(opt) -> list:
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its local optimizer there
    return [v for state in inner.state.values() for v in state.values()]


class Census:
    """Live storages by category at one moment, in bytes."""

    def __init__(self, model, opt, saved: dict[int, int], activations: int | None = None) -> None:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on torch.distributed.reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            live = _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
        params = _storages(model.parameters())
        if hasattr(opt, "memory_report"):  # zeroshard: its own count of what it holds
            report = opt.memory_report()
            figures = {"parameters": report["parameters"] + report["master_parameters"],
                       "gradients": report["gradients"],
                       "optimizer states": report["optimizer_states"]}
            claimed = sum(figures.values())
        else:
            grads = _storages(p.grad for p in model.parameters() if p.grad is not None)
            states = _storages(_optimizer_state(opt))
            figures = {"parameters": sum(params.values()), "gradients": sum(grads.values()),
                       "optimizer states": sum(states.values())}
            # A tensor made in C++ (DDP's p.grad) has no Python object until Python reads
            # it, so the garbage collector may not list it: count it here too.
            live.update({**params, **grads, **states})
            claimed = sum({**params, **grads, **states}.values())
        # what autograd saved and still lives, weights saved for backward aside (or, in a
        # step run without the counting hook, what the first step's count found)
        figures["activations"] = activations if activations is not None else sum(
            size for ptr, size in saved.items() if ptr in live and ptr not in params)
        self.live = max(sum(live.values()), claimed + figures["activations"])
        figures["other tensors"] = self.live - claimed - figures["activations"]
        self.figures = figures


def build(args, rank: int, tiny: bool):
    """The model and a function computing its loss on this rank's fixed batch."""
    torch.manual_seed(0)
    if args.model == "mlp":
        layers, width = (2, 8) if tiny else (MLP["layers"], MLP["width"])
        model = Blocks(layers, width)
        x = torch.randn(MLP["batch"], width, generator=torch.Generator().manual_seed(rank))
        return model, lambda module: module(x).square().mean()
    size = SIZES[args.size]
    model = GPT(size["vocab"], 16 if tiny else size["d_model"], 1 if tiny else size["layers"],
                2 if tiny else size["heads"], size["seq_len"])
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(rank))

    def loss_of(module):
        logits = module(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, size["vocab"]), tokens[:, 1:].reshape(-1))
    return model, loss_of


def worker(rank: int, world: int, port: int, method: str, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    block = nn.Linear if args.model == "mlp" else Block
    baseline = baseline_after_warm_up(method, *build(args, rank, tiny=True), block)
    model, loss_of = build(args, rank, tiny=False)
    module, opt, backward = setup(method, model, lr=1e-4, block=block)
    backward = backward or torch.Tensor.backward
    saved: dict[int, int] = {}

    def pack(tensor):
        saved.update(_storages([tensor]))
        return tensor

    def mark():
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the high-water mark starts again from the current RSS

    def mib(kib: int) -> float:
        return (kib - baseline) / 1024

    phases = {}  # name -> the census at its start and its peak, for the step with the highest
    saved_in_backward = 0  # activation bytes, counted in the warm-up step
    for step in range(1 + args.steps):
        saved.clear()
        loss = None

        def forward():
            nonlocal loss
            if step:  # run as users run it: a saved-tensor hook around the forward
                loss = loss_of(module)  # turns off stage 3's own (Note [saved tensors])
                return
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_of(module)

        for name, run in (("forward", forward), ("backward", lambda: backward(loss)),
                          ("step", opt.step), ("zero_grad", opt.zero_grad)):
            if not step and name == "backward":
                saved_in_backward = Census(module, opt, saved).figures["activations"]
            census = None if not step else Census(
                module, opt, saved, activations=saved_in_backward if name == "backward" else 0)
            start = rss_kib("VmRSS")
            mark()
            run()
            peak = rss_kib("VmHWM")
            if step and (name not in phases or mib(peak) > phases[name]["peak"]):
                figures = {k: v / 2**20 for k, v in census.figures.items()}
                figures["transient"] = (peak - start) / 1024
                figures["rest"] = mib(start) - census.live / 2**20
                phases[name] = {"peak": mib(peak), "figures": figures}
    results.put({"rank": rank, "phases": phases})
    dist.barrier()
    dist.destroy_process_group()


def run(method: str, args) -> dict:
    """One method in fresh processes; the phases of the rank with the highest peak."""
    out = spawn_ranks(worker, args.world_size, (free_port(), method, args), args.timeout,
                      measure_memory=True)

    def highest(r):
        return max(phase["peak"] for phase in r["phases"].values())
    worst = max(out, key=highest)
    name = max(worst["phases"], key=lambda n: worst["phases"][n]["peak"])
    return {"method": method, "peak_mib": highest(worst), "peak_phase": name,
            "figures": worst["phases"][name]["figures"],
            "phase_peaks": {n: p["peak"] for n, p in worst["phases"].items()}}


def table(rows: list[dict]) -> str:
    lines = ["| method | peak MiB | × DDP | peak in | " + " | ".join(CATEGORIES) + " |",
             "|---" * (4 + len(CATEGORIES)) + "|"]
    ddp = next((r["peak_mib"] for r in rows if r["method"] == "ddp" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * (2 + len(CATEGORIES)))
            continue
        ratio = f"{r['peak_mib'] / ddp:.2f}" if ddp else "—"
        lines.append(f"| {r['method']} | {r['peak_mib']:.0f} | {ratio} | {r['peak_phase']} | "
                     + " | ".join(f"{r['figures'][c]:.1f}" for c in CATEGORIES) + " |")
    return "\n".join(lines)


def text_bars(rows: list[dict], width: int = 60) -> str:
    """One bar per method, a letter per category, scaled to the largest peak."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return ""
    scale = width / max(r["peak_mib"] for r in ok)
    letters = dict(zip(CATEGORIES, "PGOAXTR"))
    out = ["```", "  ".join(f"{letters[c]} {c}" for c in CATEGORIES)]
    for r in ok:
        bar = "".join(letters[c] * round(max(0.0, r["figures"][c]) * scale) for c in CATEGORIES)
        out.append(f"{r['method']:>22} |{bar}")
    out.append("```")
    return "\n".join(out)


def chart(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(ok) + 1.5))
    names = [r["method"] for r in ok]
    left = [0.0] * len(ok)
    for category in CATEGORIES:
        widths = [max(0.0, r["figures"][category]) for r in ok]
        ax.barh(names, widths, left=left, label=category)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("MiB per rank at the peak phase (above the RSS before the model)")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"wrote {path}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    p.add_argument("--size", choices=sorted(SIZES), default="example", help="GPT size")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; see compare.py")
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=HERE / "results" / "breakdown_latest")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        print("note: runs on CPU/gloo; the phases are read from /proc", flush=True)
    rows = []
    for method in args.methods.split(","):
        try:
            rows.append(run(method, args))
            print(f"{method}: peak {rows[-1]['peak_mib']:.0f} MiB in {rows[-1]['peak_phase']}",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - one method failing must not hide the others
            rows.append({"method": method, "error": f"{type(error).__name__}: {error}"[:200]})
            print(f"{method}: {rows[-1]['error']}", flush=True)
    command = "python benchmarks/memory_breakdown.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    what = (f"{MLP['layers']} x Linear({MLP['width']}, {MLP['width']}) MLP, batch {MLP['batch']}"
            if args.model == "mlp" else f"examples/train_gpt.py GPT {SIZES[args.size]}")
    header = (f"{command}\n\nmodel: {what}, fp32 AdamW, {args.world_size} ranks, CPU/gloo, "
              f"torch {torch.__version__}, {os.cpu_count()} cores; MiB per rank above the RSS "
              f"before the model was built, at the start of the phase with the highest peak "
              f"(the larger rank)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breakdown.json").write_text(json.dumps({"command": command, "rows": rows},
                                                        indent=1))
    text = header + "\n" + table(rows) + "\n\n" + text_bars(rows) + "\n"
    (args.out / "breakdown.md").write_text(text)
    print(text)
    print(chart(rows, args.out / "breakdown.png"))


if __name__ == "__main__":
    main()
