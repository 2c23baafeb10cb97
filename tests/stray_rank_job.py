"""Two ranks that stop making the same zeroshard calls (torchrun job, gloo, CPU).

    torchrun --standalone --nproc_per_node=2 tests/stray_rank_job.py STAGE CALL OTHER

Both ranks train one step; then rank 0 alone makes CALL (``full_state_dict``: a DDP
habit, ``if rank == 0: save(...)``; ``clip``: ``opt.clip_grad_norm_``), while rank 1
does OTHER: ``exits`` (destroys its process group and leaves) or ``trains`` (another
step). Each rank prints what it raised, if anything, as ``rank R raised TYPE: MESSAGE |
notes: NOTES``.
The process group's timeout is 5 s, so a collective nobody joins fails quickly.
"""

import datetime
import fcntl
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import zeroshard


def main(stage: int, call: str, other: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2)

    def train_step() -> None:
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    train_step()
    try:
        if rank == 0:
            if call == "full_state_dict":
                opt.full_state_dict()
            else:
                model(torch.randn(4, 8)).pow(2).mean().backward()
                opt.clip_grad_norm_(1.0)
        elif other == "exits":
            dist.destroy_process_group()
            return
        else:
            train_step()
            train_step()
    except Exception as error:  # noqa: BLE001 - printed for the test to read
        notes = " | ".join(getattr(error, "__notes__", ()))
        # one rank at a time: the two ranks share torchrun's stdout, and a write to a pipe
        # larger than PIPE_BUF may interleave with the other's (fresh-clone CI once read a
        # line holding " | notes: " twice)
        with open(os.path.join(tempfile.gettempdir(), "zeroshard-stray-report.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            print(f"rank {rank} raised {type(error).__name__}: {error} | notes: {notes}",
                  flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
