"""Which ranks an optimizer's model states are sharded over, and which hold copies.

A plain process group of N ranks shards the states N ways. A 2-D DeviceMesh
(replicate × shard, as FSDP2's hybrid sharding) shards them S ways within each
row and keeps R identical copies, one per row: gradients are reduce-scattered
within the shard group, then averaged across the replicate group on the shard
only; parameters are gathered within the shard group only. ``_comm.py`` takes a
``Ranks`` wherever it takes a group and sends each collective along the dimensions
it needs (Note [collectives on a mesh] there).
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

SHARD, REPLICATE = "shard", "replicate"


@dataclasses.dataclass(frozen=True, eq=False)
class Ranks:
    """This rank's place: ``shard_rank`` of ``shard_size`` ranks that split the model
    states, in replica ``replica`` of ``replicas`` identical copies.

    ``rank`` and ``size`` number every rank of the job (replica-major, so rank 0
    is shard 0 of replica 0); ``replicate`` is None when there is one replica."""

    shard: dist.ProcessGroup
    replicate: dist.ProcessGroup | None
    shard_rank: int
    shard_size: int
    replica: int = 0
    replicas: int = 1

    @property
    def rank(self) -> int:
        return self.replica * self.shard_size + self.shard_rank

    @property
    def size(self) -> int:
        return self.replicas * self.shard_size

    def dimensions(self) -> list[tuple[str, dist.ProcessGroup]]:
        """(name, group) of each dimension a job-wide collective runs along, shard first."""
        return [(SHARD, self.shard)] + ([(REPLICATE, self.replicate)] if self.replicate else [])

    def shard_only(self) -> Ranks:
        """These ranks' shard group alone: for a sum over the shards, which every
        replica holds alike (the gradient norm)."""
        return Ranks(self.shard, None, self.shard_rank, self.shard_size)


def ranks_from(process_group, mesh) -> Ranks:
    """The ``Ranks`` of ``ZeroOptimizer(process_group=..., mesh=...)``; a local check
    (no collective), so every rank raises the same error for bad arguments."""
    if mesh is not None and process_group is not None:
        raise ValueError("pass either mesh= or process_group=, not both: a mesh brings its "
                         "own process groups (use mesh=None to shard over process_group)")
    if mesh is None:
        group = process_group if process_group is not None else dist.group.WORLD
        return Ranks(group, None, dist.get_rank(group), dist.get_world_size(group))
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
                        f"{type(mesh).__name__}; build one with init_device_mesh(device_type, "
                        f"(replicas, shards), mesh_dim_names=('replicate', 'shard'))")
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh has {mesh.ndim} dimensions {tuple(mesh.shape)}; zeroshard takes a "
                         "1-D mesh (shard) or a 2-D one (replicate, shard)")
    if mesh.get_coordinate() is None:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not in the mesh "
                         f"{mesh.mesh.tolist()}; build ZeroOptimizer only on the mesh's ranks")
    shard_dim, replicate_dim = _dimensions(mesh)
    replicas = mesh.size(replicate_dim) if replicate_dim is not None else 1
    return Ranks(mesh.get_group(shard_dim),
                 mesh.get_group(replicate_dim) if replicas > 1 else None,
                 mesh.get_local_rank(shard_dim), mesh.size(shard_dim),
                 mesh.get_local_rank(replicate_dim) if replicas > 1 else 0, replicas)


def _dimensions(mesh) -> tuple[int, int | None]:
    """(shard dimension, replicate dimension or None): by name where the mesh names
    its dimensions "shard" and "replicate", else (replicate, shard) in that order, as
    FSDP2's hybrid sharding reads a 2-D mesh."""
    if mesh.ndim == 1:
        return 0, None
    names = mesh.mesh_dim_names or ()
    if set(names) == {SHARD, REPLICATE}:
        return names.index(SHARD), names.index(REPLICATE)
    return 1, 0
