"""DDP: identical masks on every rank, proven by one hash per mask."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

from gmp_ext.distributed.collectives import comm_device
from gmp_ext.kernels.dtensors import is_dtensor
from gmp_ext.kernels.layout import mask_bytes
from gmp_ext.model.mask_store import MaskEntry, get_store

DEBUG_ENV = "GMP_EXT_DEBUG_DISTRIBUTED"


def debug_checks_enabled() -> bool:
    """``GMP_EXT_DEBUG_DISTRIBUTED=1`` in a process group of more than one rank."""
    return (
        os.environ.get(DEBUG_ENV, "") not in ("", "0")
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def _hash64(*parts: bytes) -> int:
    digest = hashlib.blake2b(b"\0".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _mask_hash(entry: MaskEntry) -> int:
    numel = entry.numel
    data = entry.mask[: mask_bytes(numel)].cpu().numpy().tobytes()
    return _hash64(str(numel).encode(), data)


def verify_masks_across_ranks(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """RuntimeError unless every rank of ``group`` holds bit-identical masks for ``model``, as
    DDP replicas must; it names the first differing parameter and ranks. All-gathers one 64-bit
    hash per mask. Masks of sharded (DTensor) parameters differ per rank by design and are not
    compared. A collective: every rank calls it. ``group`` defaults to the DDP wrapper's process
    group, else the default group."""
    if group is None and isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("verify_masks_across_ranks needs an initialized process group")
    store = get_store(model)
    entries = {} if store is None else store.entries
    names = [n for n, e in entries.items() if not is_dtensor(e.param)]
    hashes = [_hash64(*(n.encode() for n in names))] + [_mask_hash(entries[n]) for n in names]
    device = comm_device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    world = dist.get_world_size(group)

    def gather(values: list[int]) -> list[list[int]]:
        local = torch.tensor(values, dtype=torch.int64, device=device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        return [p.tolist() for p in parts]

    ranks = [dist.get_global_rank(group, g) for g in range(world)]
    headers = gather([len(names), hashes[0]])
    odd = [ranks[g] for g, h in enumerate(headers) if h != headers[0]]
    if odd:
        raise RuntimeError(
            f"ranks {ranks[0]} and {odd[0]} mask different parameters ({headers[0][0]} vs "
            f"{headers[ranks.index(odd[0])][0]} masked); this rank masks {names}"
        )
    if not names:
        return
    table = gather(hashes[1:])
    for i, name in enumerate(names):
        odd = [ranks[g] for g in range(world) if table[g][i] != table[0][i]]
        if odd:
            raise RuntimeError(
                f"mask of parameter '{name}' differs across ranks: rank {ranks[0]} and rank(s) "
                f"{odd} hold different bits; DDP replicas must prune identically (weights "
                "diverged: another initialisation, a rank-local update, non-deterministic ops?)"
            )
