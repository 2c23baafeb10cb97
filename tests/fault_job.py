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


def die_on_call(owner, name: str, at: int, counts=lambda *args: True,
                before_dying=lambda *args: None) -> None:
    """Replace ``owner.name`` with a wrapper that kills the process on the ``at``-th call
    for which ``counts(*args)`` holds (after ``before_dying(*args)``)."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args):
        if counts(*args):
            calls[0] += 1
            if calls[0] == at:
                before_dying(*args)
                die()
        return original(*args)
    setattr(owner, name, wrapper)


def write_partial_file(obj, file) -> None:
    with open(file, "wb") as f:
        f.write(b"\0" * 100)  # the start of the file, then the crash
        f.flush()


def arm(where: str, at: int, rank: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    if where == "training":
        die_on_call(train_gpt.GPT, "forward", at)
    elif where == "commit":
        die_on_call(zeroshard.checkpoint, "_replace_text", at)
    elif where == "writing":
        die_on_call(zeroshard.checkpoint, "_save_synced", at,
                    counts=lambda obj, file: file.name.startswith("rank"),
                    before_dying=write_partial_file)
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
