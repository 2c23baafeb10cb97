"""examples/train_gpt.py with one rank killed by SIGKILL at a chosen point (torchrun job).

    torchrun --standalone --nproc_per_node=2 tests/fault_job.py --kill training:5:1 -- <train_gpt args>

--kill WHERE:AT:RANK, WHERE one of
    training  rank RANK kills itself at the start of step AT (its forward), mid-training;
    commit    rank RANK kills itself in save number AT, after every file of the new
              checkpoint is written and its folder renamed, just before LATEST names it;
    writing   rank RANK kills itself in save number AT, halfway through writing its file.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import train_gpt  # noqa: E402
import zeroshard.checkpoint  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(where: str, at: int, rank: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    if where == "training":
        forward, calls = train_gpt.GPT.forward, [0]

        def forward_then_die(self, idx):
            calls[0] += 1
            if calls[0] == at:
                die()
            return forward(self, idx)
        train_gpt.GPT.forward = forward_then_die
    elif where == "commit":
        replace, saves = zeroshard.checkpoint._replace_text, [0]

        def replace_then_die(file, text):
            saves[0] += 1
            if saves[0] == at:
                die()
            return replace(file, text)
        zeroshard.checkpoint._replace_text = replace_then_die
    elif where == "writing":
        save, files = zeroshard.checkpoint._save_synced, [0]

        def save_half_then_die(obj, file):
            if file.name.startswith("rank"):
                files[0] += 1
                if files[0] == at:
                    with open(file, "wb") as f:
                        f.write(b"\0" * 100)  # a partial file, then the crash
                        f.flush()
                    die()
            return save(obj, file)
        zeroshard.checkpoint._save_synced = save_half_then_die
    else:
        raise SystemExit(f"--kill: unknown point {where!r}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--kill"]:
        where, at, rank = argv[1].split(":")
        arm(where, int(at), int(rank))
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    sys.exit(train_gpt.main(argv))
