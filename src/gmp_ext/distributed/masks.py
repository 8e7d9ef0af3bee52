"""Masks of sharded parameters: counts summed over shards, keep flags, export and import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gmp_ext.distributed.collectives import all_reduce, comm_device, mesh_of
from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels.dtensors import is_dtensor, local_tensor
from gmp_ext.kernels.layout import mask_bytes
from gmp_ext.model.mask_store import MaskEntry


def summed_over_shards(tensors: Sequence[torch.Tensor], counts: list[int]) -> list[int]:
    """Per-tensor counts of the local shards summed over the mesh for DTensors (one all-reduce
    for all of them: every rank must call it alike), the others as they are."""
    sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
    if sharded:
        mesh = mesh_of([tensors[i] for i in sharded], [f"tensors[{i}]" for i in sharded])
        device = local_tensor(tensors[sharded[0]]).device
        local = torch.tensor([counts[i] for i in sharded], dtype=torch.int64, device=device)
        for i, total in zip(sharded, all_reduce(local, mesh).tolist()):
            counts[i] = total
    return counts


def kept_counts(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[int]:
    """Elements each mask keeps, over all shards of a DTensor (a collective when some are)."""
    return summed_over_shards(
        tensors, primitives.count_kept([local_tensor(t) for t in tensors], list(masks))
    )


def zero_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Exact zeros of each tensor, over all shards of a DTensor (a collective when some are;
    ``int((dtensor == 0).sum())`` would count this rank's shard only)."""
    return summed_over_shards(
        tensors, [int((local_tensor(t).detach() == 0).sum()) for t in tensors]
    )


def mask_sparsities(entries: Mapping[str, MaskEntry]) -> dict[str, float]:
    """{name: fraction of the full parameter its mask prunes} (a collective when some are
    sharded)."""
    params = [e.param for e in entries.values()]
    kept = kept_counts(params, [e.mask for e in entries.values()])
    return {
        name: 1.0 - k / p.numel() if p.numel() else 0.0 for name, p, k in zip(entries, params, kept)
    }


def keep_flags(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The bool keep-mask of ``param`` (True = kept): for a DTensor, a DTensor laid out like it
    whose local tensor is the local shard's mask (``.full_tensor()`` gathers it)."""
    if not is_dtensor(param):
        return ops.unpack_mask(mask, param.shape)
    from torch.distributed.tensor import DTensor

    flags = ops.unpack_mask(mask, local_tensor(param).shape)
    return DTensor.from_local(
        flags,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=torch.empty(param.shape, device="meta").stride(),
    )


def _export_width(param: torch.Tensor) -> int:
    """Bytes of the largest shard's mask: Shard(0) gives ceil(rows / mesh size) rows or fewer."""
    rows = param.shape[0]
    per_row = param.numel() // rows if rows else 0
    return mask_bytes(-(-rows // param.device_mesh.size()) * per_row)  # type: ignore[attr-defined]


def export_sharded_mask(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's mask for a checkpoint: a uint8 DTensor [mesh size, width] placed
    Shard(0) whose row c is coordinate c's packed local mask, zero-padded to the largest shard's
    width. torch.distributed.checkpoint writes each row once and loads it back on the same
    coordinate; torch.save pickles this rank's row."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = param.device_mesh  # type: ignore[attr-defined]
    width = _export_width(param)
    used = mask_bytes(local_tensor(param).numel())
    if used > width:
        raise RuntimeError(f"a local shard of {used} mask bytes exceeds Shard(0)'s {width}")
    row = torch.zeros((1, width), dtype=torch.uint8, device=comm_device(mesh.device_type))
    row[0, :used] = mask[:used]
    return DTensor.from_local(
        row,
        mesh,
        [Shard(0)],
        run_check=False,
        shape=torch.Size((mesh.size(), width)),
        stride=(width, 1),
    )


def import_sharded_mask(param: torch.Tensor, packed: object, name: str) -> torch.Tensor:
    """A mask saved by :func:`export_sharded_mask` for the same sharding, in the mask storage
    layout of this rank's shard; ValueError naming ``name`` otherwise."""
    size, width = param.device_mesh.size(), _export_width(param)  # type: ignore[attr-defined]
    if (
        not is_dtensor(packed)
        or packed.dtype != torch.uint8  # type: ignore[attr-defined]
        or tuple(packed.shape) != (size, width)  # type: ignore[attr-defined]
        or tuple(packed.placements) != tuple(param.placements)  # type: ignore[attr-defined]
    ):
        raise ValueError(
            f"mask of parameter '{name}' must be the uint8 DTensor [{size}, {width}] placed "
            f"Shard(0) that GMP.state_dict() saves for this parameter sharded over {size} ranks, "
            f"got {packed!r:.200}; masks of a sharded run load into the same sharding only"
        )
    row = local_tensor(packed).reshape(-1)  # type: ignore[arg-type]
    numel = local_tensor(param).numel()
    used = mask_bytes(numel)
    if bool(row[used:].any()) or (numel % 8 and int(row[used - 1]) >> (numel % 8)):
        raise ValueError(
            f"mask of parameter '{name}' has bits set past the {numel} elements of this rank's "
            "shard (saved with another sharding, or loaded on another rank?)"
        )
    mask = primitives.new_mask(param)
    mask[:used] = row[:used].to(mask.device)
    return mask
