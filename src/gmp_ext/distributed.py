"""Distributed GMP on torch.distributed: DDP replicas and FSDP2 / DTensor shards.

**DDP.** Replicas hold identical weights and the selection is deterministic (ties go to the
lowest index), so every rank computes the same masks on its own, without communication.
:func:`verify_masks_across_ranks` proves it with one 64-bit hash per mask; with
``GMP_EXT_DEBUG_DISTRIBUTED=1`` every :func:`gmp_ext.prune_step` runs it. Names are the user's
model names; the ``module.`` prefix DDP adds is accepted and dropped.

**Sharded parameters.** A DTensor placed ``Shard(0)`` on a 1-D mesh (what FSDP2's
``fully_shard`` makes) holds on mesh coordinate c a contiguous block of rows, so in flat order
the elements of coordinate c follow those of every coordinate before it. The selection is the
single-process radix select over the |w| keys of the local shards, with the histograms of each
pass summed over the mesh's process group:

1. a pass histograms one digit of the keys of every shard, among the keys whose higher digits
   are the prefix chosen so far; one all-reduce carries all parameters' histograms, and every
   rank then picks the same bucket (the one holding the k-th key) and the rank inside it;
2. after the last digit every rank knows the threshold key T and the rank r of the cut among
   the elements equal to T; the ranks all-gather how many elements equal T they hold (read off
   the last local histogram), and each rank places r in its own shard: all of its ties are
   pruned, none, or, on the one rank holding the r-th, those up to a local index found by one
   scan of the shard.

That is the single-process contract on the full tensors (k = round(s * n) of the full size,
ties to the lowest global index; in global scope by tensor position first), and the weights
never move. Rows are written per local shard, so the mask build and the fused apply are the
single-process kernels on the local tensors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import ops, primitives
from ._layout import KEY_SPACE_WIDE, KEY_SPACE_WIDE64, mask_bytes
from .backends import REFERENCE, Backend, Job, backend_for
from .dtensors import is_dtensor, local_tensor
from .mask_store import MaskEntry, get_store

__all__ = [
    "COMM_STATS",
    "DEBUG_ENV",
    "CommStats",
    "select_global_sharded",
    "select_layerwise_sharded",
    "verify_masks_across_ranks",
]

DEBUG_ENV = "GMP_EXT_DEBUG_DISTRIBUTED"

# Digits of at most 11 bits: a 31-bit key takes three passes of 11, 10 and 10 bits, so a
# per-layer selection all-reduces 2048 + 1024 + 1024 int64 counts (32 KiB) per parameter.
# The single-process kernels' 16-bit first digit would save one round-trip but cost 768 KiB per
# parameter, hundreds of MB per update for hundreds of layers; 8-bit digits add a fourth pass.
_DIGIT_BITS = 11


# -- meshes and collectives --------------------------------------------------------------------


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
class _Mesh:
    """A 1-D mesh's process group and this rank's place in it."""

    group: dist.ProcessGroup
    size: int
    coordinate: int
    order: tuple[int, ...]  # group rank of each mesh coordinate (all_gather's order)
    device: torch.device  # where its collectives run


def _comm_device(device_type: str) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def _mesh(tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> _Mesh:
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
    return _Mesh(
        group=group,
        size=mesh.size(),
        coordinate=mesh.get_local_rank(),
        order=tuple(dist.get_group_rank(group, r) for r in mesh.mesh.tolist()),
        device=_comm_device(mesh.device_type),
    )


def _all_reduce(buffer: torch.Tensor, mesh: _Mesh) -> torch.Tensor:
    """The sum over the mesh, in a new tensor (the local counts are still needed)."""
    staged = buffer.to(mesh.device, copy=True)
    dist.all_reduce(staged, group=mesh.group)
    COMM_STATS.calls += 1
    COMM_STATS.bytes += staged.numel() * staged.element_size()
    return staged.to(buffer.device)


def _all_gather(buffer: torch.Tensor, mesh: _Mesh) -> torch.Tensor:
    """[mesh size, *buffer.shape], row c from mesh coordinate c."""
    staged = buffer.to(mesh.device)
    parts = [torch.empty_like(staged) for _ in range(mesh.size)]
    dist.all_gather(parts, staged, group=mesh.group)
    COMM_STATS.calls += 1
    COMM_STATS.bytes += staged.numel() * staged.element_size()
    return torch.stack([parts[g] for g in mesh.order]).to(buffer.device)


# -- the passes over local shards --------------------------------------------------------------


@dataclass(eq=False)
class _Passes:
    """The local shards of one selection, the key space they are ranked in, and the backend
    job whose radix passes histogram them (the compiled CPU passes for 31-bit keys on the
    host; the reference's PyTorch passes for CUDA shards and float64 keys)."""

    backend: Backend
    job: Job
    device: torch.device

    @property
    def key_space(self) -> int:
        return self.job.key_space

    def numels(self) -> torch.Tensor:
        counts = [t.numel() for t in self.job.tensors]
        return torch.tensor(counts, dtype=torch.int64, device=self.device)

    def histogram(
        self, shift: int, width: int, prefixes: torch.Tensor | None, count_nan: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.histogram(self.job, shift, width, prefixes, count_nan)

    def find_equal(self, keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        return self.backend.find_equal(self.job, keys, ranks)


def _passes(tensors: Sequence[torch.Tensor], key_space: int) -> _Passes:
    """The radix passes over the tensors' local shards."""
    shards = [primitives.local_values(t) for t in tensors]
    devices = {s.device for s in shards}
    if len(devices) > 1:
        raise ValueError(f"sharded parameters have local shards on several devices: {devices}")
    device = devices.pop()
    backend: Backend = REFERENCE
    if key_space == KEY_SPACE_WIDE and device.type == "cpu":
        backend = backend_for(device)
    return _Passes(backend, backend.prepare(shards, None, None, key_space), device)


def _digit_plan(key_space: int) -> list[tuple[int, int]]:
    """(shift, width) of each pass, most significant digit first, widths as even as possible."""
    bits = 63 if key_space == KEY_SPACE_WIDE64 else 31
    passes = -(-bits // _DIGIT_BITS)
    plan, shift = [], bits
    for i in range(passes):
        width = bits // passes + (i < bits % passes)
        shift -= width
        plan.append((shift, width))
    return plan


def _bucket(counts: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``counts``: the bucket holding the rank-th (1-based) element and the rank
    inside it (rank 0, a row with nothing to prune, stays 0 in bucket 0)."""
    cum = counts.cumsum(1)
    bucket = torch.searchsorted(cum, ranks.unsqueeze(1)).clamp_(max=counts.shape[1] - 1)
    below = cum.gather(1, bucket) - counts.gather(1, bucket)
    return bucket.squeeze(1), ranks - below.squeeze(1)


def _check_first_pass(
    nans: torch.Tensor, counts: torch.Tensor, numels: list[int], labels: Sequence[str]
) -> None:
    """A NaN in any shard is a ValueError on every rank (the counts are global); shards that do
    not add up to their tensors would mean a layout other than Shard(0)."""
    for count, label in zip(nans.tolist(), labels):
        if count:
            raise ValueError(
                f"{label} has {count} NaN value(s) across its shards; magnitudes of NaN weights "
                "cannot be ranked (nothing was modified)"
            )
    totals = counts.sum(1).tolist()
    expected = numels if len(totals) == len(numels) else [sum(numels)]
    if totals != expected:
        raise RuntimeError(
            f"the local shards of all ranks hold {totals} elements, the parameters {expected}: "
            "the DTensors are not laid out as Shard(0) on their mesh"
        )


def _select(
    passes: _Passes,
    mesh: _Mesh,
    ks: list[int],
    labels: Sequence[str],
    numels: list[int],
    *,
    layer: bool,
) -> torch.Tensor:
    """Selection rows [n, 4] of the local shards: k[i] of tensor i (layer scope), or the one
    k over all tensors in (key, tensor position, flat index) order."""
    n = len(labels)
    ranks = torch.tensor(ks, dtype=torch.int64, device=passes.device)
    active = ranks > 0
    prefix = torch.zeros_like(ranks)
    local = bucket = None
    for j, (shift, width) in enumerate(_digit_plan(passes.key_space)):
        # After the first pass (whose NaN counts cover every row) rows with k == 0 are skipped.
        prefixes = torch.where(active, prefix, -1).expand(n).contiguous() if j else None
        local, nans = passes.histogram(shift, width, prefixes, count_nan=j == 0)
        counts = local if layer else local.sum(0, keepdim=True)
        if j == 0:
            reduced = _all_reduce(torch.cat([counts.reshape(-1), nans]), mesh)
            counts = reduced[:-n].view_as(counts)
            _check_first_pass(reduced[-n:], counts, numels, labels)
            if not bool(active.any()):
                break
        else:
            counts = _all_reduce(counts, mesh)
        bucket, ranks = _bucket(counts, ranks)
        prefix = (prefix << width) | bucket

    index = torch.full((n,), -1, dtype=torch.int64, device=passes.device)
    if bool(active.any()):
        # The shard's elements equal to the threshold key T, and those before the shard in the
        # selection's order: earlier coordinates of the same tensor, in global scope also every
        # shard of the earlier tensors.
        ties = local.gather(1, bucket.expand(n).unsqueeze(1)).squeeze(1)  # type: ignore[union-attr]
        gathered = _all_gather(ties, mesh)
        if layer:
            before = gathered[: mesh.coordinate].sum(0)
        else:
            flat = gathered.t().reshape(-1)
            before = (flat.cumsum(0) - flat).view(n, mesh.size)[:, mesh.coordinate]
        want = ranks.expand(n) - before  # rank of the cut among this shard's ties
        index = torch.where(want > ties, passes.numels() - 1, index)
        owner = (want >= 1) & (want <= ties)
        if bool(owner.any()):
            found = passes.find_equal(prefix.expand(n).contiguous(), torch.where(owner, want, 0))
            index = torch.where(owner, found, index)
    key = prefix.expand(n)  # 0 for rows with k == 0: with index -1 nothing is pruned
    space = torch.full_like(index, passes.key_space)
    return torch.stack([key, index, space, torch.zeros_like(index)], 1)


def select_layerwise_sharded(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Selection rows (as ``primitives.select_rows_layerwise``) when some tensors are DTensors:
    rows of the local shards for those (selected together, a collective every rank must join), the
    single-process rows for the others (after the collectives, so an error in a rank-local
    tensor cannot leave the other ranks waiting)."""
    rows: list[torch.Tensor | None] = [None] * len(tensors)
    sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
    mesh = _mesh([tensors[i] for i in sharded], [labels[i] for i in sharded])
    # float64 weights rank in their own 63-bit key space (single-process: the reference backend).
    for space in (KEY_SPACE_WIDE, KEY_SPACE_WIDE64):
        group = [
            i for i in sharded if (tensors[i].dtype == torch.float64) == (space != KEY_SPACE_WIDE)
        ]
        if group:
            members = [tensors[i] for i in group]
            result = _select(
                _passes(members, space),
                mesh,
                [ks[i] for i in group],
                [labels[i] for i in group],
                [t.numel() for t in members],
                layer=True,
            )
            for j, i in enumerate(group):
                rows[i] = result[j]
    plain = [i for i, t in enumerate(tensors) if not is_dtensor(t)]
    if plain:
        plain_rows = primitives.select_rows_layerwise(
            [tensors[i] for i in plain], [labels[i] for i in plain], [ks[i] for i in plain]
        )
        for i, row in zip(plain, plain_rows):
            rows[i] = row
    return rows  # type: ignore[return-value]


def select_global_sharded(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], k: int
) -> list[torch.Tensor]:
    """Selection rows for ``primitives.select_rows_global`` over DTensors (a collective): the k
    smallest of all their elements in (|w|, tensor position, global flat index) order, in the
    common 31-bit key space (63-bit when one of them is float64)."""
    mixed = [label for t, label in zip(tensors, labels) if not is_dtensor(t)]
    if mixed:
        raise NotImplementedError(
            f"global scope over sharded (DTensor) and unsharded parameters together: {mixed} "
            "are not sharded; shard them too (fully_shard the root module) or use scope='layer'"
        )
    space = KEY_SPACE_WIDE64 if any(t.dtype == torch.float64 for t in tensors) else KEY_SPACE_WIDE
    mesh = _mesh(tensors, labels)
    numels = [t.numel() for t in tensors]
    return list(_select(_passes(tensors, space), mesh, [k], labels, numels, layer=False))


# -- masks of sharded parameters ---------------------------------------------------------------


def summed_over_shards(tensors: Sequence[torch.Tensor], counts: list[int]) -> list[int]:
    """Per-tensor counts of the local shards summed over the mesh for DTensors (one all-reduce
    for all of them: every rank must call it alike), the others as they are."""
    sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
    if sharded:
        mesh = _mesh([tensors[i] for i in sharded], [f"tensors[{i}]" for i in sharded])
        device = local_tensor(tensors[sharded[0]]).device
        local = torch.tensor([counts[i] for i in sharded], dtype=torch.int64, device=device)
        for i, total in zip(sharded, _all_reduce(local, mesh).tolist()):
            counts[i] = total
    return counts


def kept_counts(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[int]:
    """Elements each mask keeps, over all shards of a DTensor (a collective when some are)."""
    return summed_over_shards(
        tensors, [primitives.popcount(m, local_tensor(t).numel()) for t, m in zip(tensors, masks)]
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
    row = torch.zeros((1, width), dtype=torch.uint8, device=_comm_device(mesh.device_type))
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


# -- DDP: identical masks on every rank --------------------------------------------------------


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
    device = _comm_device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
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
