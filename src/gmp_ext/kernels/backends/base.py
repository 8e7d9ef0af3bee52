"""What every backend offers: jobs (buffers prepared once, run many times) and the
``Backend`` interface, whose ops are written once over its job primitives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.layout import (
    DTYPE_CODES,
    KEY_SPACE_NATIVE,
    SELECTION_COLUMNS,
    TABLE_COLUMNS,
    KeyScale,
)

__all__ = ["Backend", "Job", "build_table", "new_job", "thread_count"]


def thread_count() -> int:
    """Threads the CPU kernels use: torch's."""
    return torch.get_num_threads()


def build_table(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    tile_elems: int = 0,
    scales: Sequence[KeyScale | None] | None = None,
) -> torch.Tensor:
    """int64 [n, 9] rows of csrc/common/tensor_table.h: TensorEntry."""
    rows, elem_base, tile_base = [], 0, 0
    for i, tensor in enumerate(tensors):
        numel = tensor.numel()
        mask_ptr = masks[i].data_ptr() if masks is not None else 0
        scale = scales[i] if scales is not None else None
        scaling = (0, 1, 1) if scale is None else scale.columns(tensor)
        dtype = DTYPE_CODES[tensor.dtype]
        rows.append([tensor.data_ptr(), mask_ptr, numel, dtype, elem_base, tile_base, *scaling])
        elem_base += numel
        if tile_elems:
            tile_base += -(-numel // tile_elems)
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), TABLE_COLUMNS)


_NONE = torch.empty(0, dtype=torch.uint8)


@dataclass(eq=False)
class Job:
    """Buffers of select -> build -> apply over a fixed list of tensors, made once by a
    backend's ``prepare`` and run any number of times: the tensor table (device-resident on
    CUDA), the counts to prune (``[n]`` for layer scope, ``[1]`` for global), the selection rows
    and the CUDA scratch. ``scope`` is "layer", "global", or None for a job that only builds
    or applies masks. ``scales`` (per tensor, None for |w|) are what a scaled tensor's |w| is
    multiplied by before it is ranked. The table holds raw addresses: ``tensors``, ``masks``
    and ``scales`` keep them alive, and a tensor whose storage moves needs a new job.

    On CUDA, ``ready`` is the event recorded on the preparing stream once the buffers are
    written, and ``streams`` the streams ordered after it (the preparing one, then each stream
    the job ran on): the backend makes any other stream wait for ``ready`` before its first
    launch (:meth:`order_on`). A CUDA graph that captured the job reads its buffers at
    every replay: keep the job (its prepared step, plan) alive as long as the graph."""

    tensors: list[torch.Tensor]
    masks: list[torch.Tensor]  # empty for a job that only selects
    scope: str | None
    key_space: int
    counts: torch.Tensor
    rows: torch.Tensor
    table: torch.Tensor = _NONE  # empty for the reference backend, which needs none
    scales: list[KeyScale | None] | None = None
    tiles: int = 0
    scratch: torch.Tensor = _NONE  # empty for a job that only builds or applies masks
    kept: torch.Tensor = _NONE  # where the build counts (``Backend.counts_in_build``): [n] int64
    ready: torch.cuda.Event | None = None  # CUDA only
    streams: set[int] = field(default_factory=set)  # CUDA only: ``cuda_stream`` handles
    written_counts: list[int] | None = None  # what set_counts last wrote, where ready is None

    def set_counts(self, counts: Sequence[int]) -> None:
        """Elements to prune, written without waiting for the device (read when select runs).
        On CUDA the copy is queued on the current stream, which becomes the one the job's other
        streams wait for (a graph replay does not: replay it on the stream that set the counts).
        A job without streams skips writing the counts it already holds (a repeated step)."""
        counts = list(counts)
        if self.ready is None:
            if counts != self.written_counts:
                self.counts.copy_(torch.tensor(counts, dtype=torch.int64), non_blocking=True)
                self.written_counts = counts
            return
        values = torch.tensor(counts, dtype=torch.int64)
        stream = torch.cuda.current_stream(self.counts.device)
        self.order_on(stream, torch.cuda.is_current_stream_capturing())
        self.counts.copy_(values, non_blocking=True)
        self.ready.record(stream)
        self.streams.clear()
        self.streams.add(stream.cuda_stream)

    def order_on(self, stream: torch.cuda.Stream, capturing: bool) -> None:
        """Orders CUDA ``stream`` after the writes of the job's buffers before its first launch
        there.

        Outside a capture the stream waits for ``ready`` and the buffers are recorded as used by
        it (the caching allocator then keeps them until its work is done). A capturing stream
        may not wait for an event recorded outside the capture (CUDA refuses the dependency);
        it may use the job once that event is complete (``torch.cuda.graph`` synchronizes before
        it captures), and a job still being written is refused."""
        if stream.cuda_stream in self.streams or self.ready is None:
            return
        if capturing:
            if not self.ready.query():
                written = min(self.streams, default=0)
                raise RuntimeError(
                    f"gmp_ext: the job's buffers, written on CUDA stream {written:#x}, may not "
                    f"have landed when stream {stream.cuda_stream:#x} captures it: synchronize "
                    "(or run it once on the capturing stream) before the capture"
                )
        else:
            stream.wait_event(self.ready)
            for buffer in (self.table, self.counts, self.rows, self.scratch, self.kept):
                buffer.record_stream(stream)
        self.streams.add(stream.cuda_stream)


def new_job(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    scope: str | None,
    key_space: int,
    device: torch.device,
    table: torch.Tensor = _NONE,
    tiles: int = 0,
    scratch: torch.Tensor = _NONE,
    scales: Sequence[KeyScale | None] | None = None,
) -> Job:
    """A job's buffers on ``device``: counts sized for ``scope``, zeroed selection rows.
    ValueError for a global job whose native key space cannot hold its scaled keys."""
    n = len(tensors)
    if scope == "global" and key_space == KEY_SPACE_NATIVE and scales is not None:
        for i, (tensor, scale) in enumerate(zip(tensors, scales)):
            if scale is not None and tensor.dtype != torch.float32:
                raise ValueError(
                    f"tensor {i} ({tensor.dtype}) is scaled: its keys are float32 products, so "
                    "a global selection over it needs the wide key space"
                )
    counts = {"layer": n, "global": 1, None: 0}[scope]
    return Job(
        list(tensors),
        [] if masks is None else list(masks),
        scope,
        key_space,
        counts=torch.zeros(counts, dtype=torch.int64, device=device),
        rows=torch.zeros((n, SELECTION_COLUMNS), dtype=torch.int64, device=device),
        table=table,
        scales=None if scales is None else list(scales),
        tiles=tiles,
        scratch=scratch,
    )


class Backend:
    """The ops every backend offers, written once over its job primitives (``prepare``,
    ``select``, ``build``, ``apply``)."""

    name: str
    counts_in_build = False  # whether build() also writes each new mask's kept count to job.kept

    def prepare(
        self,
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        scope: str | None = None,
        key_space: int = KEY_SPACE_NATIVE,
        scales: Sequence[KeyScale | None] | None = None,
    ) -> Job:
        """The job's buffers (its selection ranks ``scales[i]``-scaled |w| where given)."""
        raise NotImplementedError

    def select(self, job: Job) -> None:
        raise NotImplementedError

    def build(self, job: Job, zero_pruned: bool = False) -> None:
        """Writes ``job.masks`` from ``job.rows``; with ``zero_pruned`` also zeroes the elements
        the new masks prune (the apply in the same pass over the weights)."""
        raise NotImplementedError

    def apply(self, job: Job) -> None:
        raise NotImplementedError

    def prune(self, job: Job) -> None:
        """A whole prune step of a job with masks and a scope: :meth:`select`, then
        :meth:`build` with ``zero_pruned`` (same rows, masks and weights). Backends with a fused
        kernel read the weights fewer times."""
        self.select(job)
        self.build(job, zero_pruned=True)

    def nm_gather(self, job: Job, lists: Job, pattern: tuple[int, int]) -> None:
        """Writes the N:M candidate lists (csrc/common/nm.h) of ``job.tensors`` into
        ``lists.tensors`` (``numel // m * (m - n)`` elements each, of the tensor's dtype), which
        ``lists``' selection then ranks."""
        raise NotImplementedError

    def nm_build(self, job: Job, rows: torch.Tensor, pattern: tuple[int, int]) -> None:
        """Writes ``job.masks`` from selection ``rows`` over the candidate lists: protected
        elements and candidates above the cut are kept."""
        raise NotImplementedError

    def select_layerwise(self, tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
        """Selection rows [n, 4]: tensor i prunes ks[i] elements."""
        job = self.prepare(tensors, None, "layer", KEY_SPACE_NATIVE)
        job.set_counts(ks)
        self.select(job)
        return job.rows

    def select_global(
        self, tensors: Sequence[torch.Tensor], k: int, key_space: int
    ) -> torch.Tensor:
        """Selection rows [n, 4] of one selection of k elements over all tensors."""
        job = self.prepare(tensors, None, "global", key_space)
        job.set_counts([k])
        self.select(job)
        return job.rows

    def build_masks(
        self,
        tensors: Sequence[torch.Tensor],
        selection: torch.Tensor,
        masks: Sequence[torch.Tensor],
    ) -> None:
        job = self.prepare(tensors, masks)
        job.rows = selection.to(job.rows.device).contiguous()
        self.build(job)

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        if tensors:
            self.apply(self.prepare(tensors, masks))

    def count_kept(self, job: Job) -> list[int]:
        """Set bits among the first ``numel`` bits of each of the job's masks: the elements it
        keeps. The default counts on the tensors' device in PyTorch."""
        return _reference.count_kept(job.tensors, job.masks)

    def pack_bits(self, flags: torch.Tensor) -> torch.Tensor:
        """bool flags -> packed mask storage (bit i of byte i // 8 = flags[i], 1 = kept)."""
        raise NotImplementedError

    def unpack_bits(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        """Packed mask storage -> ``numel`` bool flags."""
        raise NotImplementedError

    def histogram(
        self, job: Job, shift: int, width: int, prefixes: torch.Tensor | None, count_nan: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor of a job prepared with ``scope=None``: the histogram of key digit
        ``(key >> shift) & (2**width - 1)`` over the keys whose higher bits equal
        ``prefixes[i]`` (all keys when None; -1 matches none), [n, 2**width] int64, and the NaN
        count of each tensor when ``count_nan`` (else zeros). One radix pass of the sharded
        selection (:mod:`gmp_ext.distributed`)."""
        raise NotImplementedError

    def find_equal(self, job: Job, keys: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """Per tensor: the flat index of the ``ranks[i]``-th element (1-based) whose key is
        ``keys[i]``, -1 where ``ranks[i] <= 0``."""
        raise NotImplementedError
