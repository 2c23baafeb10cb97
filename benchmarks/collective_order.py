"""Each rank's sequence of collectives at stage 3 on the some-ranks cases (Note [one order]).

    python benchmarks/collective_order.py

Trains every case of tests/test_some_ranks.py (units skipped on some ranks, outputs
unused on some ranks, nested units with no_sync, two forwards, checkpointing, a unit no
rank runs) with and without resharding, and prints per rank the number of calls by
collective, the mesh dimensions used (a process group is one: "shard"), and a digest of
the whole sequence of (dimension, collective, bytes): identical digests mean identical
sequences.
"""

from __future__ import annotations

import collections
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cases  # noqa: E402
from pool import WorkerPool  # noqa: E402
from test_some_ranks import CASES, LOOP  # noqa: E402


def summary(trace: list) -> str:
    kinds = dict(collections.Counter(op for _, op, _ in trace))
    dimensions = sorted({dimension for dimension, _, _ in trace})
    digest = hashlib.sha1(repr(trace).encode()).hexdigest()[:10]
    return f"{len(trace)} calls {kinds}, along {dimensions}, sha1 {digest}"


def main() -> None:
    pool = WorkerPool()
    try:
        for name, model, units, world_size, options in CASES:
            for reshard in (True, False):
                case = {**LOOP, **options, "model": dict(model), "stage": 3,
                        "world_size": world_size, "units": units,
                        "reshard_after_forward": reshard}
                results = pool.run(cases.train_side_by_side, world_size, case)
                identical = all(r["trace"] == results[0]["trace"] for r in results)
                print(f"{name}, reshard_after_forward={reshard}, {world_size} ranks: "
                      f"{'identical' if identical else 'DIFFERENT'}")
                for rank, res in enumerate(results):
                    print(f"    rank {rank}: {summary(res['trace'])}")
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
