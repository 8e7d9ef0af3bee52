"""The CPU backend: multi-threaded C++ kernels of csrc/cpu on host memory."""

from __future__ import annotations

from types import ModuleType

import torch

from gmp_ext.kernels.backends.base import Backend, Job, build_table, new_job, thread_count
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, mask_storage_bytes

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    """Multi-threaded C++ kernels (csrc/cpu) on host memory; tensors must be contiguous."""

    name = "cpu"
    counts_in_build = True  # each tile's mask words counted while they are in L1

    def __init__(self, module: ModuleType) -> None:
        self._C = module

    def prepare(
        self, tensors, masks=None, scope=None, key_space=KEY_SPACE_NATIVE, scales=None
    ) -> Job:
        table = build_table(tensors, masks, scales=scales)
        job = new_job(tensors, masks, scope, key_space, torch.device("cpu"), table, scales=scales)
        if masks is not None:
            job.kept = torch.zeros(len(tensors), dtype=torch.int64)
        return job

    def select(self, job: Job) -> None:
        n, table, out = len(job.tensors), job.table.data_ptr(), job.rows.data_ptr()
        if job.scope == "layer":
            self._C.cpu_select_layerwise(table, n, job.counts.data_ptr(), out, thread_count())
        else:
            k = int(job.counts[0])
            self._C.cpu_select_global(table, n, k, job.key_space, out, thread_count())

    def prune(self, job: Job) -> None:
        """Select + build + zero in two reads of the weights when the first radix pass leaves
        a bucket that fits the candidate buffer (csrc/ops.h: prune_layerwise)."""
        n, table, out = len(job.tensors), job.table.data_ptr(), job.rows.data_ptr()
        if job.scope == "layer":
            self._C.cpu_prune_layerwise(table, n, job.counts.data_ptr(), out, thread_count())
        else:
            k = int(job.counts[0])
            self._C.cpu_prune_global(table, n, k, job.key_space, out, thread_count())

    def build(self, job: Job, zero_pruned: bool = False) -> None:
        table, n, rows = job.table.data_ptr(), len(job.tensors), job.rows.data_ptr()
        kept = job.kept.data_ptr() if len(job.kept) == n else 0  # a job made without masks: none
        self._C.cpu_build_masks(table, n, rows, thread_count(), zero_pruned, kept)

    def nm_gather(self, job: Job, lists: Job, pattern: tuple[int, int]) -> None:
        n, m = pattern
        table, count = job.table.data_ptr(), len(job.tensors)
        self._C.cpu_nm_gather(table, count, n, m, lists.table.data_ptr(), thread_count())

    def nm_build(self, job: Job, rows: torch.Tensor, pattern: tuple[int, int]) -> None:
        n, m = pattern
        table, count = job.table.data_ptr(), len(job.tensors)
        self._C.cpu_nm_build_masks(table, count, n, m, rows.data_ptr(), thread_count())

    def apply(self, job: Job) -> None:
        self._C.cpu_apply_masks(job.table.data_ptr(), len(job.tensors), thread_count())

    def count_kept(self, job: Job) -> list[int]:
        n, out = len(job.tensors), torch.empty(len(job.tensors), dtype=torch.int64)
        self._C.cpu_count_kept(job.table.data_ptr(), n, out.data_ptr(), thread_count())
        return out.tolist()

    def pack_bits(self, flags: torch.Tensor) -> torch.Tensor:
        flat = flags.reshape(-1).to(torch.uint8).contiguous()
        storage = torch.zeros(mask_storage_bytes(flat.numel()), dtype=torch.uint8)
        self._C.cpu_pack_bits(flat.data_ptr(), flat.numel(), storage.data_ptr(), thread_count())
        return storage

    def unpack_bits(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        flags = torch.empty(numel, dtype=torch.uint8)
        self._C.cpu_unpack_bits(packed.data_ptr(), numel, flags.data_ptr(), thread_count())
        return flags.view(torch.bool)

    def histogram(
        self, job: Job, shift: int, width: int, prefixes: torch.Tensor | None, count_nan: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(job.tensors)
        out = torch.empty((n, 1 << width), dtype=torch.int64)
        nans = torch.zeros(n, dtype=torch.int64)
        self._C.cpu_histogram(
            job.table.data_ptr(),
            n,
            job.key_space,
            shift,
            1 << width,
            shift + width,
            0 if prefixes is None else prefixes.data_ptr(),
            out.data_ptr(),
            nans.data_ptr() if count_nan else 0,
            thread_count(),
        )
        return out, nans

    def find_equal(self, job: Job, keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(job.tensors), dtype=torch.int64)
        self._C.cpu_find_equal(
            job.table.data_ptr(),
            len(job.tensors),
            job.key_space,
            keys.data_ptr(),
            ranks.data_ptr(),
            out.data_ptr(),
            thread_count(),
        )
        return out
