"""Reading a DeviceMesh: which dimension shards, and which layouts line the shards up
(zeroshard/_ranks.py, pure: no process group)."""

import types

import pytest
import torch

from zeroshard._ranks import _check_shard_order, _dimensions


def _mesh(ndim: int, names):
    return types.SimpleNamespace(ndim=ndim, mesh_dim_names=names)


@pytest.mark.parametrize("names, expected", [
    (("replicate", "shard"), (1, 0)), (("shard", "replicate"), (0, 1)),
    (("shard", "dp"), (0, 1)), (("dp", "shard"), (1, 0)),  # the one named "shard" shards
    (("replicate", "fsdp"), (1, 0)), (("dp", "replicate"), (0, 1)),
    # else the one alone in naming itself a shard or a replica (helper-86's probe: read
    # positionally, ("dp_shard", "dp_replicate") sharded over dp_replicate)
    (("dp_shard", "dp_replicate"), (0, 1)), (("dp_replicate", "dp_shard"), (1, 0)),
    (("Shard_0", "inter"), (0, 1)), (("intra", "replicas"), (0, 1)),
    (("dp", "fsdp"), (1, 0)), (None, (1, 0)),  # otherwise (replicate, shard), as FSDP2's HSDP
])
def test_the_dimension_named_shard_shards_else_the_second(names, expected):
    assert _dimensions(_mesh(2, names)) == expected


def test_a_one_dimensional_mesh_shards_over_its_dimension_whatever_its_name():
    assert _dimensions(_mesh(1, ("replicate",))) == (0, None)


def test_replicas_must_list_their_ranks_in_increasing_order():
    _check_shard_order(torch.tensor([[0, 1], [2, 3]]))
    _check_shard_order(torch.tensor([[0, 2], [1, 3]]))  # strided replicas line up too
    with pytest.raises(ValueError, match=r"\[3, 2\].*increasing order"):
        _check_shard_order(torch.tensor([[0, 1], [3, 2]]))
