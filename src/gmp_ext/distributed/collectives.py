"""Meshes and collectives of the sharded selection, with their byte counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Collectives issued by the sharded selection in this process and their payload bytes (the
    size of each buffer handed to all_reduce / all_gather), since the last :meth:`reset`."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0


COMM_STATS = CommStats()


@dataclass(frozen=True)
class Mesh:
    """A 1-D mesh's process group and this rank's place in it."""

    group: dist.ProcessGroup
    size: int
    coordinate: int
    order: tuple[int, ...]  # group rank of each mesh coordinate (all_gather's order)
    device: torch.device  # where its collectives run


def comm_device(device_type: str) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def mesh_of(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> Mesh:
    """The common mesh of sharded parameters; NotImplementedError for layouts other than
    Shard(0) on one 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh = None
    for tensor, label in zip(tensors, labels):
        tensor_mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
        if tensor_mesh.ndim != 1:
            raise NotImplementedError(
                f"{label} is a DTensor on a {tensor_mesh.ndim}-D device mesh; gmp_ext selects "
                "over Shard(0) placements on 1-D meshes only (FSDP2's fully_shard without HSDP "
                "or tensor parallelism)"
            )
        if type(placements[0]) is not Shard or placements[0].dim != 0:
            raise NotImplementedError(
                f"{label} is a DTensor placed {placements[0]!r}; gmp_ext selects over Shard(0) "
                "placements only (what fully_shard makes)"
            )
        if mesh is None:
            mesh = tensor_mesh
        elif tensor_mesh != mesh:
            raise NotImplementedError(
                f"{label} is sharded on another device mesh than {labels[0]}; gmp_ext selects "
                "over parameters of one mesh per call"
            )
    assert mesh is not None
    group = mesh.get_group()
    return Mesh(
        group=group,
        size=mesh.size(),
        coordinate=mesh.get_local_rank(),
        order=tuple(dist.get_group_rank(group, r) for r in mesh.mesh.tolist()),
        device=comm_device(mesh.device_type),
    )


def all_reduce(buffer: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The sum over the mesh, in a new tensor (the local counts are still needed)."""
    staged = buffer.to(mesh.device, copy=True)
    dist.all_reduce(staged, group=mesh.group)
    COMM_STATS.calls += 1
    COMM_STATS.bytes += staged.numel() * staged.element_size()
    return staged.to(buffer.device)


def all_gather(buffer: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """[mesh size, *buffer.shape], row c from mesh coordinate c."""
    staged = buffer.to(mesh.device)
    parts = [torch.empty_like(staged) for _ in range(mesh.size)]
    dist.all_gather(parts, staged, group=mesh.group)
    COMM_STATS.calls += 1
    COMM_STATS.bytes += staged.numel() * staged.element_size()
    return torch.stack([parts[g] for g in mesh.order]).to(buffer.device)
