"""CUDA backend: the kernels of csrc/cuda driven with torch-owned memory.

Tables, counts, selection rows and scratch are allocated by torch on the tensors' device (the
caching allocator, never cudaMalloc in the extension) when a job is prepared; running a job is
launches only, on torch's current stream, with nothing read back: a prepared job can be captured
in a CUDA graph, and the counts it prunes can change between replays (``Job.set_counts``).

Streams: a job's buffers are written on the stream current at ``prepare``; its first launch on
any other stream makes that stream wait for them (``Job.order_on``). A job may run on one stream at
a time: its scratch is shared by its launches. Graphs: preparing allocates and copies the table
from host memory, which a capture cannot hold, so ``prepare`` refuses while the current stream
captures; a captured job must stay alive (with its step or plan) as long as the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends.base import Backend, Job, build_table, new_job
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KeyScale

_SCRATCH_MODE = {"layer": 0, "global": 1}


def _capturing() -> bool:
    """Whether the current stream is capturing a CUDA graph (the tests replace this)."""
    return torch.cuda.is_current_stream_capturing()


class CudaBackend(Backend):
    name = "cuda"
    counts_in_build = True  # each warp adds its tile's kept bits: one read-back for all masks

    def __init__(self, module: ModuleType) -> None:
        self._C = module
        self.tile_elems = int(module.build_info()["cuda_tile_elems"])

    def prepare(
        self,
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        scope: str | None = None,
        key_space: int = KEY_SPACE_NATIVE,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> Job:
        device = tensors[0].device if tensors else torch.device("cuda")
        if _capturing():
            raise RuntimeError(
                "gmp_ext: cannot prepare a CUDA job while the current stream captures a CUDA "
                "graph (its tensor table is copied from host memory): prepare it before the "
                "capture (make the PrunePlan, or run the step or operator once on the capturing "
                "stream)"
            )
        with torch.cuda.device(device):
            table = build_table(tensors, masks, self.tile_elems, scales)
            table = table.to(device, non_blocking=True)
            tiles = sum(-(-t.numel() // self.tile_elems) for t in tensors)
            scratch = torch.empty(0, dtype=torch.uint8, device=device)
            if scope is not None:  # a job that only builds or applies masks needs none
                total = sum(t.numel() for t in tensors)
                mode = _SCRATCH_MODE[scope]
                nbytes = int(self._C.cuda_select_scratch_bytes(len(tensors), total, mode))
                scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            job = new_job(tensors, masks, scope, key_space, device, table, tiles, scratch, scales)
            # On the device for every job: Job.order_on records all of a job's buffers.
            job.kept = torch.zeros(len(tensors), dtype=torch.int64, device=device)
            stream = torch.cuda.current_stream(device)
            job.ready = torch.cuda.Event()
            job.ready.record(stream)
            job.streams.add(stream.cuda_stream)
        return job

    @staticmethod
    def _stream(job: Job) -> int:
        stream = torch.cuda.current_stream(job.rows.device)
        job.order_on(stream, _capturing())
        return stream.cuda_stream

    def select(self, job: Job) -> None:
        self._select(job, prune=False)

    def prune(self, job: Job) -> None:
        """Select + build + zero as one launch sequence; where the first pass's bucket fits the
        candidate slots, the build is the selection's compacting pass (two reads of the
        weights; csrc/cuda/select.cu)."""
        self._select(job, prune=True)

    def _select(self, job: Job, prune: bool) -> None:
        n = len(job.tensors)
        scratch = (job.scratch.data_ptr(), job.scratch.numel(), job.tiles, self._stream(job))
        with torch.cuda.device(job.rows.device):
            if job.scope == "layer":
                run = self._C.cuda_prune_layerwise if prune else self._C.cuda_select_layerwise
                run(job.table.data_ptr(), n, job.counts.data_ptr(), job.rows.data_ptr(), *scratch)
            else:
                run = self._C.cuda_prune_global if prune else self._C.cuda_select_global
                run(
                    job.table.data_ptr(),
                    n,
                    job.counts.data_ptr(),
                    job.key_space,
                    job.rows.data_ptr(),
                    *scratch,
                )

    def build(self, job: Job, zero_pruned: bool = False) -> None:
        table, n, rows = job.table.data_ptr(), len(job.tensors), job.rows.data_ptr()
        with torch.cuda.device(job.rows.device):
            stream = self._stream(job)
            kept = job.kept.data_ptr()
            self._C.cuda_build_masks(table, n, rows, job.tiles, stream, zero_pruned, kept)

    def nm_gather(self, job: Job, lists: Job, pattern: tuple[int, int]) -> None:
        n, m = pattern
        with torch.cuda.device(job.rows.device):
            self._C.cuda_nm_gather(
                job.table.data_ptr(),
                len(job.tensors),
                n,
                m,
                lists.table.data_ptr(),
                job.tiles,
                self._stream(job),
            )

    def nm_build(self, job: Job, rows: torch.Tensor, pattern: tuple[int, int]) -> None:
        n, m = pattern
        with torch.cuda.device(job.rows.device):
            self._C.cuda_nm_build_masks(
                job.table.data_ptr(),
                len(job.tensors),
                n,
                m,
                rows.data_ptr(),
                job.tiles,
                self._stream(job),
            )

    def apply(self, job: Job) -> None:
        """One launch for all tensors of the job; no host metadata per step."""
        with torch.cuda.device(job.rows.device):
            self._C.cuda_apply_masks(
                job.table.data_ptr(), len(job.tensors), job.tiles, self._stream(job)
            )

    def count_kept(self, job: Job) -> list[int]:
        """One launch for all masks of the job, one read-back."""
        with torch.cuda.device(job.rows.device):
            stream = self._stream(job)
            n, kept = len(job.tensors), job.kept.data_ptr()
            self._C.cuda_count_kept(job.table.data_ptr(), n, kept, job.tiles, stream)
        return job.kept.tolist()

    pack_bits = staticmethod(_reference.pack_bits)
    unpack_bits = staticmethod(_reference.unpack_bits)
