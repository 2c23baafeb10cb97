"""Properties of the pure partition math (no processes needed)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from zeroshard._layout import FlatLayout

layouts = st.builds(FlatLayout, st.lists(st.integers(0, 40), min_size=1, max_size=8).map(tuple),
                    st.integers(1, 8))


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
def test_shards_are_equal_and_padding_is_less_than_world_size(layout):
    sizes = {len(layout.shard_range(r)) for r in range(layout.world_size)}
    assert sizes == {layout.shard_numel}
    assert 0 <= layout.padding < layout.world_size
    assert layout.padded_numel % layout.world_size == 0
    assert layout.padded_numel == layout.numel + layout.padding


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
    assert torch.count_nonzero(gathered[layout.numel:]) == 0  # padding stays zero
