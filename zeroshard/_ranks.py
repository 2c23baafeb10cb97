"""Which ranks an optimizer's model states are sharded over, and which hold copies.

A plain process group of N ranks shards the states N ways. A 2-D DeviceMesh
(replicate × shard, as FSDP2's hybrid sharding) shards them S ways within each
replica and keeps R identical copies, one per replica: gradients are
reduce-scattered within the shard group, then averaged across the replicate group
on the shard only; parameters are gathered within the shard group only.
``_comm.py`` takes a ``Ranks`` wherever it takes a group and sends each collective
along the dimensions it needs (Note [collectives on a mesh] there).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

SHARD, REPLICATE = "shard", "replicate"


@dataclasses.dataclass(frozen=True, eq=False)
class Ranks:
    """This rank's place among the job's ranks.

    ``shard_rank`` of the ``shard_size`` ranks of ``shard`` that split the model
    states (the rank in that group, which is the order of the shards), in one of
    ``replicas`` replicas that hold them alike over ``replicate`` (None: one
    replica). ``rank`` numbers every rank of the job in the order of their global
    ranks, so rank 0 is the lowest; ``first_replica`` is True in rank 0's replica.
    A job-wide broadcast goes from ``shard_source`` (the rank of this replica that
    shares rank 0's place in the shard order) and then from ``replicate_source``
    (the rank of rank 0's replica that holds this rank's shard): global ranks."""

    shard: dist.ProcessGroup
    replicate: dist.ProcessGroup | None
    shard_rank: int
    shard_size: int
    replicas: int
    rank: int
    first_replica: bool
    shard_source: int
    replicate_source: int | None

    @property
    def size(self) -> int:
        return self.replicas * self.shard_size

    def dimensions(self) -> list[tuple[str, dist.ProcessGroup, int]]:
        """(name, group, global rank a broadcast comes from) of each dimension a
        job-wide collective runs along, shard first."""
        along = [(SHARD, self.shard, self.shard_source)]
        if self.replicate is not None:
            along.append((REPLICATE, self.replicate, self.replicate_source))
        return along

    def shard_only(self) -> Ranks:
        """These ranks' shard group alone: for a sum over the shards, which every
        replica holds alike (the gradient norm)."""
        return dataclasses.replace(self, replicate=None, replicas=1, rank=self.shard_rank,
                                   first_replica=True, replicate_source=None)


def ranks_from(process_group, mesh) -> Ranks:
    """The ``Ranks`` of ``ZeroOptimizer(process_group=..., mesh=...)``; local checks (no
    collective), so every rank raises the same error for bad arguments."""
    if mesh is not None and process_group is not None:
        raise ValueError("pass either mesh= or process_group=, not both: a mesh brings its "
                         "own process groups (use mesh=None to shard over process_group)")
    if mesh is None:
        group = process_group if process_group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        return Ranks(group, None, rank, dist.get_world_size(group), 1, rank, True,
                     dist.get_global_rank(group, 0), None)
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
                        f"{type(mesh).__name__}; build one with init_device_mesh(device_type, "
                        f"(replicas, shards), mesh_dim_names=('replicate', 'shard'))")
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh has {mesh.ndim} dimensions {tuple(mesh.shape)}; zeroshard takes a "
                         "1-D mesh (shard) or a 2-D one (replicate, shard)")
    me = dist.get_rank()
    if mesh.get_coordinate() is None:
        raise ValueError(f"this process (global rank {me}) is not in the mesh "
                         f"{mesh.mesh.tolist()}; build ZeroOptimizer only on the mesh's ranks")
    shard_dim, replicate_dim = _dimensions(mesh)
    grid = mesh.mesh.view(1, -1) if mesh.ndim == 1 else mesh.mesh.movedim(shard_dim, 1)
    replicas = grid.shape[0]
    if replicas > 1:
        _check_shard_order(grid)
    replica, place = _where(grid, me)
    ordered = sorted(grid.flatten().tolist())
    first_replica, first_place = _where(grid, ordered[0])
    shard = mesh.get_group(shard_dim)
    return Ranks(shard, mesh.get_group(replicate_dim) if replicas > 1 else None,
                 dist.get_rank(shard), grid.shape[1], replicas, ordered.index(me),
                 replica == first_replica, int(grid[replica, first_place]),
                 int(grid[first_replica, place]) if replicas > 1 else None)


def mesh_as_read(mesh) -> str | None:
    """What of ``mesh`` decides the groups: its ranks and the dimension read as the shard
    one (compared across ranks at construction, Note [meshes compared over the job])."""
    if mesh is None:
        return None
    return f"ranks {mesh.mesh.tolist()} sharded along dimension {_dimensions(mesh)[0]}"


def job_ranks(ranks: Ranks, mesh) -> Ranks:
    """Note [meshes compared over the job]:
        Construction compares the ranks' settings and layouts in one all-reduce
        (_placement.py), and on a mesh that ran in the mesh's own groups, which are
        what differs when the ranks' meshes do: a rank naming its dimensions the other
        way round, or holding another mesh, waited in a group the others never entered,
        for the mesh groups' timeout (torch's default, 30 minutes), and so did a mesh
        given on some ranks only (helper-86's probes). A mesh that spans the job (every
        rank of the default group builds the optimizer) compares over the default group
        instead, as a job without a mesh does, the mesh as each rank reads it among the
        settings: every rank meets every other in it and each names its difference. A
        mesh over part of the job keeps its own groups."""
    if mesh is None or mesh.mesh.numel() != dist.get_world_size():
        return ranks
    return ranks_from(None, None)


def _dimensions(mesh) -> tuple[int, int | None]:
    """(shard dimension, replicate dimension or None) of a 1-D or 2-D mesh: the dimension
    named "shard" shards (or the one not named "replicate"); else the one alone in
    naming itself a shard ("dp_shard") or a replica ("dp_replicate"); otherwise
    (replicate, shard) in that order, as FSDP2's hybrid sharding reads a 2-D mesh. A
    mesh named ("dp_shard", "dp_replicate") was read in that positional order, 4 shards
    where its names asked for 4 replicas (helper-86's probe)."""
    if mesh.ndim == 1:
        return 0, None
    names = tuple(mesh.mesh_dim_names or ())
    if SHARD in names:
        return names.index(SHARD), 1 - names.index(SHARD)
    if REPLICATE in names:
        return 1 - names.index(REPLICATE), names.index(REPLICATE)
    for part, shards in (("shard", True), ("replic", False)):
        named = [i for i, name in enumerate(names) if part in name.lower()]
        if len(named) == 1:
            return (named[0], 1 - named[0]) if shards else (1 - named[0], named[0])
    return 1, 0


def _check_shard_order(grid: torch.Tensor) -> None:
    """Each replica's ranks (a row of ``grid``: replicas × shards) must rise along the
    shard dimension. A shard group orders its shards by global rank (the order its
    all-gathers concatenate in), while the replicate groups join the ranks at one
    place along the dimension: the two agree only then."""
    for row in grid.tolist():
        if row != sorted(row):
            raise ValueError(
                f"the mesh's ranks {row} share a replica out of order; list each replica's "
                "ranks in increasing order along the shard dimension (init_device_mesh does), "
                "so that the k-th shard of every replica is the same part of the model")


def _where(grid: torch.Tensor, rank: int) -> tuple[int, int]:
    """(replica, place along the shard dimension) of global ``rank`` in ``grid``."""
    replica, shard = (grid == rank).nonzero()[0].tolist()
    return replica, shard
