"""Properties of the pure partition math (no processes needed)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from zeroshard._layout import FlatLayout, assign_owners

layouts = st.builds(FlatLayout, st.lists(st.integers(0, 40), min_size=1, max_size=8).map(tuple),
                    st.integers(1, 8), align=st.sampled_from([1, 4, 32]))


@given(layouts)
def test_every_element_is_owned_by_exactly_one_rank(layout):
    owners = [0] * layout.padded_numel
    for rank in range(layout.world_size):
        for i in layout.shard_range(rank):
            owners[i] += 1
    assert owners == [1] * layout.padded_numel
    # ...and the per-parameter overlaps cover each parameter exactly once.
    for index, numel in enumerate(layout.numels):
        covered = [0] * numel
        for rank in range(layout.world_size):
            ov = layout.overlap(index, rank)
            if ov is not None:
                for j in range(ov.param_start, ov.param_stop):
                    covered[j] += 1
                # the overlap points at the same flat elements from both sides
                shard_start = layout.shard_range(rank).start + ov.shard_start
                assert shard_start == layout.param_range(index).start + ov.param_start
        assert covered == [1] * numel


@given(layouts)
def test_shards_are_equal_and_padding_is_an_alignment_gap_per_parameter_and_less_than_world_size(layout):
    """Note [aligned parameters]: each parameter starts at a multiple of ``align``, right
    after the one before it rounded up; past the last, less than N elements pad."""
    sizes = {len(layout.shard_range(r)) for r in range(layout.world_size)}
    assert sizes == {layout.shard_numel}
    assert layout.padded_numel % layout.world_size == 0
    assert layout.padded_numel == layout.numel + layout.padding
    end = 0
    for offset, numel in zip(layout.offsets, layout.numels):
        assert offset % layout.align == 0 and end <= offset < end + layout.align
        end = offset + numel
    assert end <= layout.padded_numel < end + layout.world_size
    assert 0 <= layout.padding < layout.world_size + (layout.align - 1) * len(layout.numels)


@given(layouts, st.integers(0, 2**31 - 1))
def test_flatten_shard_gather_unflatten_is_identity(layout, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) for n in layout.numels]
    flat = torch.zeros(layout.padded_numel)
    for index, t in enumerate(tensors):
        span = layout.param_range(index)
        flat[span.start:span.stop] = t
    shards = [flat[r.start:r.stop].clone() for r in map(layout.shard_range, range(layout.world_size))]
    gathered = torch.cat(shards)
    for index, t in enumerate(tensors):
        span = layout.param_range(index)
        assert torch.equal(gathered[span.start:span.stop], t)
    outside = torch.ones(layout.padded_numel, dtype=torch.bool)
    for index in range(len(layout.numels)):
        span = layout.param_range(index)
        outside[span.start:span.stop] = False
    assert torch.count_nonzero(gathered[outside]) == 0  # gaps and padding stay zero


# Note [whole-parameter ownership]: owners chosen by assign_owners
owned_buckets = st.tuples(st.lists(st.integers(0, 40), min_size=1, max_size=8).map(tuple),
                          st.integers(1, 6))


@given(owned_buckets, st.lists(st.floats(0, 100), min_size=6, max_size=6))
def test_each_parameter_lies_whole_in_its_owners_segment(bucket, carried):
    numels, world_size = bucket
    owners, work = assign_owners(numels, tuple(float(n) for n in numels), tuple(carried[:world_size]))
    layout = FlatLayout(numels, world_size, owners)
    segment = -(-max(layout.loads) // layout.align) * layout.align  # aligned segments
    assert layout.shard_numel == segment and layout.padded_numel == world_size * segment
    assert all(offset % layout.align == 0 for offset in layout.offsets)
    covered = [0] * layout.padded_numel
    for index, numel in enumerate(numels):
        for rank in range(world_size):
            overlap = layout.overlap(index, rank)
            if rank == owners[index] and numel:
                assert overlap == (0, numel, layout.param_range(index).start - layout.shard_range(rank).start)
            else:
                assert overlap is None
        for i in layout.param_range(index):
            covered[i] += 1
    assert max(covered, default=0) <= 1  # no two parameters share an element
    assert sorted(layout.owned(r) for r in range(world_size)) == sorted(
        [i for i, o in enumerate(owners) if o == r] for r in range(world_size))
    assert [round(w - c, 6) for w, c in zip(work, carried)] == [
        round(sum(float(n) for n, o in zip(numels, owners) if o == r), 6) for r in range(world_size)]


@given(owned_buckets)
def test_owners_balance_within_the_largest_parameter(bucket):
    """Largest first to the least loaded rank: no rank holds more than the least loaded
    one plus one parameter (the classic bound of greedy list scheduling)."""
    numels, world_size = bucket
    owners, _ = assign_owners(numels, tuple(float(n) for n in numels), (0.0,) * world_size)
    loads = FlatLayout(numels, world_size, owners, align=1).loads
    assert max(loads) - min(loads) <= max(numels)
    assert sum(loads) == sum(numels)


def test_work_carried_across_buckets_spreads_the_largest_parameters():
    """Three equal buckets of a 4-, a 3- and a 1-element parameter over three ranks.
    Without the carried work rank 0 would take the largest every time (work 12 / 9 / 3);
    with it the largest moves on, and the ranks' work ends within one parameter."""
    work, largest = (0.0, 0.0, 0.0), set()
    for _ in range(3):
        owners, work = assign_owners((4, 3, 1), (4.0, 3.0, 1.0), work)
        largest.add(owners[0])
    assert len(largest) > 1
    assert max(work) - min(work) <= 4 and sum(work) == 24
