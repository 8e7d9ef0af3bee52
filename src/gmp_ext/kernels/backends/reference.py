"""The reference backend: the pure-PyTorch ops of ``gmp_ext.kernels.reference`` on any device."""

from __future__ import annotations

import torch

from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends.base import Backend, Job, new_job
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KEY_SPACE_WIDE

__all__ = ["ReferenceBackend"]


def _ranked(job: Job) -> list[torch.Tensor]:
    """What the job's selection ranks: the tensors, or their scaled |w| (float32) where scaled."""
    if job.scales is None:
        return job.tensors
    return [t if s is None else s.weighted(t) for t, s in zip(job.tensors, job.scales)]


class ReferenceBackend(Backend):
    """Pure PyTorch on any device (``_reference.py``); its jobs read the counts on the host."""

    name = "reference"

    def prepare(
        self, tensors, masks=None, scope=None, key_space=KEY_SPACE_NATIVE, scales=None
    ) -> Job:
        device = tensors[0].device if tensors else torch.device("cpu")
        return new_job(tensors, masks, scope, key_space, device, scales=scales)

    def select(self, job: Job) -> None:
        ranked = _ranked(job)
        if job.scope == "layer":
            rows = _reference.select_layerwise(ranked, job.counts.tolist())
            for i, scale in enumerate(job.scales or ()):
                if scale is not None:  # scaled keys are float32 ones: wide for every dtype
                    rows[i, 2] = KEY_SPACE_WIDE
        else:
            rows = _reference.select_global(ranked, int(job.counts[0]), job.key_space)
        job.rows.copy_(rows.reshape(job.rows.shape))

    def build(self, job: Job, zero_pruned: bool = False) -> None:
        _reference.build_masks(_ranked(job), job.rows, job.masks)
        if zero_pruned:
            _reference.apply_masks(job.tensors, job.masks)

    def nm_gather(self, job: Job, lists: Job, pattern: tuple[int, int]) -> None:
        for target, listed in zip(lists.tensors, _reference.nm_gather(_ranked(job), *pattern)):
            target.copy_(listed)

    def nm_build(self, job: Job, rows: torch.Tensor, pattern: tuple[int, int]) -> None:
        _reference.nm_build_masks(_ranked(job), rows, job.masks, *pattern)

    def apply(self, job: Job) -> None:
        _reference.apply_masks(job.tensors, job.masks)

    pack_bits = staticmethod(_reference.pack_bits)
    unpack_bits = staticmethod(_reference.unpack_bits)

    def histogram(
        self, job: Job, shift: int, width: int, prefixes: torch.Tensor | None, count_nan: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bins = 1 << width
        wanted = None if prefixes is None else prefixes.tolist()
        rows, nans = [], []
        for i, tensor in enumerate(_ranked(job)):
            keys = _reference.magnitude_keys(tensor, job.key_space)
            if wanted is not None:  # prefix -1 (a skipped row) matches no key
                keys = keys[(keys >> (shift + width)) == wanted[i]]
            rows.append(torch.bincount((keys >> shift) & (bins - 1), minlength=bins))
            nans.append(
                torch.isnan(tensor).sum() if count_nan else torch.zeros((), device=tensor.device)
            )
        return torch.stack(rows).long(), torch.stack(nans).long()

    def find_equal(self, job: Job, keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        found = []
        for tensor, key, rank in zip(_ranked(job), keys.tolist(), ranks.tolist()):
            if rank <= 0:
                found.append(-1)
                continue
            matches = (_reference.magnitude_keys(tensor, job.key_space) == key).nonzero()
            found.append(int(matches.reshape(-1)[rank - 1]))
        return torch.tensor(found, dtype=torch.int64, device=job.rows.device)
