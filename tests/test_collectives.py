"""The collectives layer, below any stage: zeroshard/_comm.py's collectives move the
right data and count DESIGN.md's bytes; a hanging one fails within the time limit;
and stage 3's cross-rank comparisons (zeroshard/_agreement.py) give every rank the
answer computed here from all ranks' notes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cases_agreement
import cases_api
from invariants import FP32
from pool import ODD_MESHES, WorkerError, mesh_shape


@pytest.mark.parametrize("n, mesh", [(1, None), (2, None), (3, None), (4, None), (4, (2, 2)),
                                     (4, (4, 1)), (4, (1, 4)), (3, (3, 1)), (2, (2, 1)),
                                     (4, "2x2 strided"), (4, "2x2 rank 0 in replica 1")])
def test_collectives_move_the_right_data_and_count_design_bytes(pool, n, mesh):
    """Over a group of n ranks, or n ranks as a (replicas, shards) mesh: reduce-scatter and
    all-gather within the replica (a reduction over every rank: the replicas' shards are
    all-reduced too), all-reduce and broadcast over every rank (from global rank 0, in
    whichever replica it is), each counted along the dimension it ran (Note [collectives
    on a mesh] in zeroshard/_comm.py)."""
    replicas, s = mesh_shape(mesh) if mesh else (1, n)
    layout = ODD_MESHES.get(mesh) if isinstance(mesh, str) else None
    layout = layout or [list(range(q * s, (q + 1) * s)) for q in range(replicas)]
    for r, out in enumerate(pool.run(cases_api.collectives_are_counted, n, mesh)):
        assert out["rank"] == r  # the job's ranks in the order of their global ranks
        replica = next(q for q, row in enumerate(layout) if r in row)
        shard = layout[replica].index(r)
        assert out["shard_rank"] == shard
        mean = (n + 1) / 2  # over all n ranks of (rank + 1)
        assert out["reduce_scatter"] == [2 * shard * mean, (2 * shard + 1) * mean]
        assert out["all_gather"] == [float(k) for k in layout[replica] for _ in range(2)]
        assert out["all_reduce"] == sum(range(n))
        assert out["broadcast"] == [0.0, 0.0, 0.0]
        # all-gather: output bytes; reduce-scatter: input bytes; others: the tensor
        dims = 2 if replicas > 1 else 1
        assert out["bytes"] == {"reduce_scatter": 4 * 2 * s, "all_gather": 4 * 2 * s,
                                "all_reduce": 8 * dims + 4 * 2 * (dims - 1),
                                "broadcast": 2 * 3 * dims}
        assert out["calls"] == {"reduce_scatter": 1, "all_gather": 1,
                                "all_reduce": dims + dims - 1, "broadcast": dims}
        across = {("all_reduce", "replicate"): 8 + 4 * 2, ("broadcast", "replicate"): 6}
        assert out["by_dim"] == {("reduce_scatter", "shard"): 4 * 2 * s,
                                 ("all_gather", "shard"): 4 * 2 * s, ("all_reduce", "shard"): 8,
                                 ("broadcast", "shard"): 6, **(across if replicas > 1 else {})}
        assert out["after_reset"] == dict.fromkeys(out["bytes"], 0)


@pytest.mark.parametrize("numel, dtype", [(2 * 1031, "float32"), (2 * 77, "bfloat16")])
def test_two_ranks_reduce_scatter_like_an_all_reduce(pool, numel, dtype):
    """Note [two ranks exchange halves]: two reduce-scatters in flight at once give each
    rank exactly its slice of gloo's all-reduce of the same tensors (SUM, and AVG as the
    sum halved), and leave their inputs as they were (stage 1 reduces its gradient
    buffers without a copy)."""
    for rank, out in enumerate(pool.run(cases_api.two_reduce_scatters_in_flight, 2, numel,
                                        dtype)):
        assert out == {"equal": [True, True], "inputs_kept": True}, rank


def test_a_hanging_collective_fails_within_the_time_limit_and_the_pool_recovers(pool):
    with pytest.raises(WorkerError, match="rank 0: no answer"):
        pool.run(cases_api.hang, 2, timeout=5)
    assert pool.run(cases_api.rank_of, 4) == [0, 1, 2, 3]


world_sizes = st.integers(1, 4)


@settings(max_examples=25)
@given(world_sizes.flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, 5), st.integers(0, 5), st.integers(0, 4))).flatmap(
        lambda nuk: st.tuples(
        st.just(nuk[0]),
        st.lists(st.lists(st.booleans(), min_size=nuk[1], max_size=nuk[1]),
                 min_size=nuk[0], max_size=nuk[0]),
        st.lists(st.lists(st.booleans(), min_size=nuk[2], max_size=nuk[2]),
                 min_size=nuk[0], max_size=nuk[0]),
        st.lists(st.lists(st.booleans(), min_size=nuk[3], max_size=nuk[3]),
                 min_size=nuk[0], max_size=nuk[0]),
        # steps per rank: mostly alike; far apart; 2**20 apart (equal modulo what is sent)
        st.one_of(st.integers(0, 3 * 2**24).map(lambda k: [k] * nuk[0]),
                  st.lists(st.integers(0, 3 * 2**24), min_size=nuk[0], max_size=nuk[0]),
                  st.integers(0, 2**24).map(lambda k: [k + 1] + [k] * (nuk[0] - 1))))))
def test_ran_and_late_is_set_on_every_rank_where_any_rank_set_it(pool, drawn):
    """...and every rank learns whether they all took as many steps (Note [steps on some
    ranks only]), exactly, at any count (counts are sent modulo 2**20: a difference of
    a multiple of it goes unseen, the drawn counts aside)."""
    n, ran, late, read, steps = drawn
    steps_agree = len({k % 2**20 for k in steps}) == 1
    expected = ([any(r[i] for r in ran) for i in range(len(ran[0]))],
                [any(r[i] for r in late) for i in range(len(late[0]))],
                [any(r[i] for r in read) for i in range(len(read[0]))], steps_agree)
    assert pool.run(cases_agreement.ran_and_late, n, ran, late, read, steps) == [expected] * n


@st.composite
def recorded_notes(draw):
    """Per rank: first-entry positions in forward and backward (-1: not entered), flags
    of units entered twice, and per bucket how many units were entered before it was
    ready. Some ranks copy rank 0's orders, some record their own."""
    n, units, buckets = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(0, 4))

    def order():
        entered = draw(st.integers(0, units))
        positions = draw(st.permutations(range(units)))
        return [p if p < entered else -1 for p in positions]

    base = (order(), order())
    notes = []
    for _ in range(n):
        forward, backward = base if draw(st.booleans()) else (order(), order())
        notes.append((forward, backward,
                      draw(st.lists(st.booleans(), min_size=units, max_size=units)),
                      draw(st.lists(st.integers(0, units), min_size=buckets, max_size=buckets))))
    return n, notes


@settings(max_examples=25)
@given(recorded_notes())
def test_recorded_orders_agree_exactly_when_every_rank_recorded_the_same(pool, drawn):
    n, notes = drawn
    answers = pool.run(cases_agreement.recorded_orders, n, notes)
    agreed = all(note[:2] == notes[0][:2] for note in notes)
    units, buckets = len(notes[0][0]), len(notes[0][3])
    for orders, sent in answers:
        assert orders.agreed == agreed
        assert orders.repeated == [any(note[2][u] for note in notes) for u in range(units)]
        assert orders.entered_before_ready == [max(note[3][b] for note in notes)
                                               for b in range(buckets)]
        # one all-reduce: two orders and their negation, a flag per unit, a count per bucket
        assert sent == {"all_reduce": FP32 * (5 * units + buckets)}


@settings(max_examples=15)
@given(st.integers(1, 4).flatmap(lambda n: st.lists(st.integers(0, 6), min_size=n, max_size=n)))
def test_next_gather_gives_every_rank_the_highest_and_lowest_code(pool, codes):
    assert pool.run(cases_agreement.next_gather, len(codes), codes) == [(max(codes), min(codes))] * len(codes)
