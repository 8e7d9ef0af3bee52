"""The radix selection over DTensor shards: histograms all-reduced between passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gmp_ext.distributed.collectives import (
    Mesh,
    all_gather,
    all_reduce,
    mesh_of,
)
from gmp_ext.kernels import primitives
from gmp_ext.kernels.backends import REFERENCE, Backend, Job, backend_for
from gmp_ext.kernels.dtensors import is_dtensor
from gmp_ext.kernels.layout import KEY_SPACE_WIDE, KEY_SPACE_WIDE64

# Digits of at most 11 bits: a 31-bit key takes three passes of 11, 10 and 10 bits, so a
# per-layer selection all-reduces 2048 + 1024 + 1024 int64 counts (32 KiB) per parameter.
# The single-process kernels' 16-bit first digit would save one round-trip but cost 768 KiB per
# parameter, hundreds of MB per update for hundreds of layers; 8-bit digits add a fourth pass.
_DIGIT_BITS = 11


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
    mesh: Mesh,
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
            reduced = all_reduce(torch.cat([counts.reshape(-1), nans]), mesh)
            counts = reduced[:-n].view_as(counts)
            _check_first_pass(reduced[-n:], counts, numels, labels)
            if not bool(active.any()):
                break
        else:
            counts = all_reduce(counts, mesh)
        bucket, ranks = _bucket(counts, ranks)
        prefix = (prefix << width) | bucket

    index = torch.full((n,), -1, dtype=torch.int64, device=passes.device)
    if bool(active.any()):
        # The shard's elements equal to the threshold key T, and those before the shard in the
        # selection's order: earlier coordinates of the same tensor, in global scope also every
        # shard of the earlier tensors.
        ties = local.gather(1, bucket.expand(n).unsqueeze(1)).squeeze(1)  # type: ignore[union-attr]
        gathered = all_gather(ties, mesh)
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
    mesh = mesh_of([tensors[i] for i in sharded], [labels[i] for i in sharded])
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
    mesh = mesh_of(tensors, labels)
    numels = [t.numel() for t in tensors]
    return list(_select(_passes(tensors, space), mesh, [k], labels, numels, layer=False))
