"""gmp_ext's kernels as PyTorch operators: ``torch.ops.gmp_ext.*``.

The compiled module takes raw addresses, which Dynamo can neither trace nor bake into a graph.
These operators take tensors: ``torch.compile`` (and ``torch.library.opcheck``) see a call with
a schema, fake tensors get the outputs' shapes from the fake implementations, and the kernels
registered here for each device build (or reuse) the tensor table and call ``gmp_ext._C``.
Registration is Python only: the extension still never sees torch at build time. It uses
``Library.define`` with ``register_kernel`` and ``register_fake`` (torch >= 2.4) rather than
``torch.library.custom_op``, whose Python wrapper redispatches and bumps the version counter
of every mutated tensor (measured on CPU, a no-op kernel over 20 tensors: ~40 us per call
against ~9 us).

Operators (one device per call; ``n = len(tensors)``):

* ``select_layerwise(Tensor[] tensors, Tensor counts) -> Tensor``: selection rows, int64
  ``[n, 4]`` (``csrc/common/tensor_table.h: Selection``), tensor i pruning ``counts[i]``
  elements (``counts``: int64 ``[n]``).
* ``select_global(Tensor[] tensors, Tensor counts, int key_space) -> Tensor``: the rows of one
  selection of ``counts[0]`` elements over all tensors (``counts``: int64 ``[1]``), ranked in
  ``key_space`` (``_layout.KEY_SPACE_*``).
* ``build_masks(Tensor[] tensors, Tensor rows, Tensor(a!)[] masks, bool wide64=False) -> ()``:
  packed keep-masks from selection rows (int64 ``[n, 4]``), written into ``masks`` (a row
  counting NaNs leaves its mask unchanged). ``wide64`` says the rows were selected in the
  float64 key space, which only the reference builds: known on the host, it spares a device
  read (the native kernels reject or misread such rows).
* ``apply_masks(Tensor(a!)[] tensors, Tensor[] masks) -> ()``: zeroes, in place, every element
  whose mask bit is 0.
* ``prune(Tensor(a!)[] tensors, Tensor counts, Tensor(b!)[] masks, bool global_scope,
  int key_space) -> Tensor``: a whole prune step, ``select_layerwise`` (or, with
  ``global_scope``, ``select_global`` in ``key_space``) then ``build_masks`` and
  ``apply_masks``: returns the rows, writes ``masks``, zeroes the pruned elements of
  ``tensors``; the native kernels read the weights twice where they can (csrc/ops.h).
* ``nm_gather(Tensor[] tensors, Tensor(a!)[] lists, int n, int m) -> ()``: writes each tensor's
  N:M candidate list (``csrc/common/nm.h``: per group of ``m`` consecutive elements, its
  ``m - n`` smallest by (|w|, index), in index order) into ``lists[i]``, a 1-D tensor of
  ``numel // m * (m - n)`` elements of the tensor's dtype; the selection ops then rank the lists.
* ``nm_build_masks(Tensor[] tensors, Tensor rows, Tensor(a!)[] masks, int n, int m,
  bool wide64=False) -> ()``: N:M keep-masks from selection rows over the candidate lists
  (index = position in the list): protected elements and candidates above the cut are kept.

Weights are float32, float16, bfloat16 or float64 tensors of any strides (non-contiguous ones
are worked on through contiguous copies); masks are 1-D uint8 with at least ``ceil(numel / 8)``
bytes. Bad arguments raise ``ValueError``/``TypeError`` naming them, before anything is
written. Rows are returned on the tensors' device (``counts``' when the list is empty).

Kernels: ``cpu`` and ``cuda`` run the native backend of the device (``backends.backend_for``,
so ``GMP_EXT_BACKEND`` is honoured); float64 tensors, the float64 key space and a missing
``_C`` fall back to the pure-PyTorch reference, which is also the kernel of every other device.
The autograd fallback handles no gradient: callers run these under ``torch.no_grad()``.

Adding an operator (as the N:M ones were): write its schema in ``SCHEMAS`` (``Tensor(a!)`` on
what it writes), a fake implementation that checks the arguments and returns outputs of the
right shape, and one kernel over ``Backend`` jobs taking the backend as its first argument;
``_register`` registers the kernel for ``cpu`` and ``cuda`` and, with the reference backend,
for every other device. Tests: ``tests/test_library.py`` (``opcheck`` and native vs reference).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch

from gmp_ext.kernels.backends import REFERENCE, Backend, Job, backend_for
from gmp_ext.kernels.layout import (
    KEY_SPACE_NATIVE,
    KEY_SPACE_WIDE,
    KEY_SPACE_WIDE64,
    MASK_ALIGN_BYTES,
    SELECTION_COLUMNS,
    mask_bytes,
    mask_storage_bytes,
    valid_nm,
)

__all__ = [
    "NAMESPACE",
    "SCHEMAS",
    "WEIGHT_DTYPES",
    "apply_masks",
    "build_masks",
    "clear_job_cache",
    "nm_build_masks",
    "nm_gather",
    "pinned_jobs",
    "prune",
    "select_global",
    "select_layerwise",
]

NAMESPACE = "gmp_ext"
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCHEMAS = {
    "select_layerwise": "select_layerwise(Tensor[] tensors, Tensor counts) -> Tensor",
    "select_global": "select_global(Tensor[] tensors, Tensor counts, int key_space) -> Tensor",
    "build_masks": (
        "build_masks(Tensor[] tensors, Tensor rows, Tensor(a!)[] masks, bool wide64=False) -> ()"
    ),
    "apply_masks": "apply_masks(Tensor(a!)[] tensors, Tensor[] masks) -> ()",
    "prune": (
        "prune(Tensor(a!)[] tensors, Tensor counts, Tensor(b!)[] masks, bool global_scope, "
        "int key_space) -> Tensor"
    ),
    "nm_gather": "nm_gather(Tensor[] tensors, Tensor(a!)[] lists, int n, int m) -> ()",
    "nm_build_masks": (
        "nm_build_masks(Tensor[] tensors, Tensor rows, Tensor(a!)[] masks, int n, int m, "
        "bool wide64=False) -> ()"
    ),
}
_KEY_SPACES = (KEY_SPACE_NATIVE, KEY_SPACE_WIDE, KEY_SPACE_WIDE64)


# --- argument checks, shared by the fake implementations and the kernels --------------------


def _device_of(tensors: Sequence[torch.Tensor], fallback: torch.Tensor) -> torch.device:
    return tensors[0].device if len(tensors) else fallback.device


def _check_tensors(tensors: Sequence[torch.Tensor], name: str = "tensors") -> None:
    device = tensors[0].device if len(tensors) else None
    for i, tensor in enumerate(tensors):
        if tensor.layout != torch.strided or tensor.dtype not in WEIGHT_DTYPES:
            raise TypeError(
                f"{name}[{i}] must be a dense float32, float16, bfloat16 or float64 tensor, got "
                f"{tensor.layout} {tensor.dtype}"
            )
        if tensor.device != device:
            raise ValueError(
                f"{name}[{i}] is on {tensor.device}, {name}[0] on {device}: one device per call"
            )


def _check_counts(counts: torch.Tensor, expected: int) -> None:
    if counts.dtype != torch.int64 or tuple(counts.shape) != (expected,):
        raise ValueError(
            f"counts must be an int64 tensor of shape [{expected}], got {counts.dtype} of shape "
            f"{list(counts.shape)}"
        )


def _check_key_space(key_space: int) -> None:
    if key_space not in _KEY_SPACES:
        raise ValueError(f"key_space must be one of {_KEY_SPACES}, got {key_space}")


def _check_masks(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Call after :func:`_check_tensors` (which puts every tensor on one device)."""
    if len(masks) != len(tensors):
        raise ValueError(f"got {len(masks)} masks for {len(tensors)} tensors")
    device = tensors[0].device if len(tensors) else None
    for i, (tensor, mask) in enumerate(zip(tensors, masks)):
        if mask.dtype != torch.uint8 or mask.dim() != 1:
            raise TypeError(
                f"masks[{i}] must be a 1-D uint8 tensor of packed bits, got {mask.dtype} of "
                f"shape {list(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"masks[{i}] is on {mask.device}, tensors[{i}] on {device}")
        needed = mask_bytes(tensor.numel())
        if mask.numel() < needed:
            raise ValueError(
                f"masks[{i}] has {mask.numel()} bytes; tensors[{i}] of {tensor.numel()} "
                f"elements needs {needed}"
            )


def _check_rows(rows: torch.Tensor, n: int, device: torch.device) -> None:
    if rows.dtype != torch.int64 or tuple(rows.shape) != (n, SELECTION_COLUMNS):
        raise ValueError(
            f"rows must be an int64 tensor of shape [{n}, {SELECTION_COLUMNS}], got "
            f"{rows.dtype} of shape {list(rows.shape)}"
        )
    if n and rows.device != device:
        raise ValueError(f"rows are on {rows.device}, the tensors on {device}")


def _check_nm(tensors: Sequence[torch.Tensor], n: int, m: int) -> None:
    if not valid_nm(n, m):
        raise ValueError(f"n:m needs m a power of two from 2 to 32 and 1 <= n < m, got {n}:{m}")
    for i, tensor in enumerate(tensors):
        if tensor.numel() % m:
            raise ValueError(f"tensors[{i}] has {tensor.numel()} elements, not a multiple of m={m}")


def _check_lists(
    tensors: Sequence[torch.Tensor], lists: Sequence[torch.Tensor], n: int, m: int
) -> None:
    if len(lists) != len(tensors):
        raise ValueError(f"got {len(lists)} lists for {len(tensors)} tensors")
    for i, (tensor, listed) in enumerate(zip(tensors, lists)):
        size = tensor.numel() // m * (m - n)
        if listed.dtype != tensor.dtype or tuple(listed.shape) != (size,):
            raise ValueError(
                f"lists[{i}] must be a 1-D {tensor.dtype} tensor of {size} elements, got "
                f"{listed.dtype} of shape {list(listed.shape)}"
            )
        if listed.device != tensor.device:
            raise ValueError(f"lists[{i}] is on {listed.device}, tensors[{i}] on {tensor.device}")


def _new_rows(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros((n, SELECTION_COLUMNS), dtype=torch.int64, device=device)


# --- fake implementations (shapes only; torch.compile and FakeTensorMode run these) ----------


def _select_layerwise_fake(tensors: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    _check_tensors(tensors)
    _check_counts(counts, len(tensors))
    return _new_rows(len(tensors), _device_of(tensors, counts))


def _select_global_fake(
    tensors: list[torch.Tensor], counts: torch.Tensor, key_space: int
) -> torch.Tensor:
    _check_tensors(tensors)
    _check_counts(counts, 1)
    _check_key_space(key_space)
    return _new_rows(len(tensors), _device_of(tensors, counts))


def _build_masks_fake(
    tensors: list[torch.Tensor], rows: torch.Tensor, masks: list[torch.Tensor], wide64: bool = False
) -> None:
    _check_tensors(tensors)
    _check_masks(tensors, masks)
    _check_rows(rows, len(tensors), _device_of(tensors, rows))


def _apply_masks_fake(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    _check_tensors(tensors)
    _check_masks(tensors, masks)


def _prune_fake(
    tensors: list[torch.Tensor],
    counts: torch.Tensor,
    masks: list[torch.Tensor],
    global_scope: bool,
    key_space: int,
) -> torch.Tensor:
    _check_tensors(tensors)
    _check_counts(counts, 1 if global_scope else len(tensors))
    _check_key_space(key_space)
    if not global_scope and key_space != KEY_SPACE_NATIVE:
        raise ValueError(f"key_space: a per-tensor prune ranks native keys, got {key_space}")
    _check_masks(tensors, masks)
    return _new_rows(len(tensors), _device_of(tensors, counts))


def _nm_gather_fake(tensors: list[torch.Tensor], lists: list[torch.Tensor], n: int, m: int) -> None:
    _check_tensors(tensors)
    _check_nm(tensors, n, m)
    _check_lists(tensors, lists, n, m)


def _nm_build_masks_fake(
    tensors: list[torch.Tensor],
    rows: torch.Tensor,
    masks: list[torch.Tensor],
    n: int,
    m: int,
    wide64: bool = False,
) -> None:
    _build_masks_fake(tensors, rows, masks)
    _check_nm(tensors, n, m)


# --- kernels over backend jobs --------------------------------------------------------------

# Tables of recent calls, so a call repeated over the same storage (every step of a compiled
# training loop) builds no table and, on CUDA, copies none to the device. A table holds only
# what its key holds (addresses, sizes, dtypes, in order), so a hit is correct even when a
# freed tensor's address was reused; the cached jobs keep no tensor alive.
#
# The CUDA selection scratch is shared by the launches of one job, so a job belongs to one
# stream (the key holds the current stream: its copies and kernels run in that stream's order)
# and its launch sequences are serialized across Python threads by _LOCK (the bindings release
# the GIL). A CUDA graph bakes in the addresses of the job it captured: a job used while the
# current stream captures is pinned, never evicted nor dropped by clear_job_cache, and lives as
# long as the process (the graph may be replayed at any time).
_JOBS: OrderedDict[tuple, Job] = OrderedDict()
_PINNED: dict[tuple, Job] = {}
_JOB_CACHE_SIZE = 64
_LOCK = threading.RLock()


def clear_job_cache() -> None:
    """Drop the cached tables (and CUDA selection scratch) of the operators' kernels; the jobs
    CUDA graphs captured stay (see ``pinned_jobs``)."""
    with _LOCK:
        _JOBS.clear()


def pinned_jobs() -> int:
    """How many cached jobs CUDA graph captures pinned for the life of the process."""
    return len(_PINNED)


def _stream_id(device: torch.device) -> int:
    """The current stream of ``device`` (0 off CUDA), part of a cached job's key."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _job(
    backend: Backend,
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    scope: str | None,
    key_space: int,
) -> Job:
    """The cached job of a call; a CUDA caller holds _LOCK until its launches are queued."""
    if backend is REFERENCE:  # no table to build
        return backend.prepare(tensors, masks, scope, key_space)
    device = tensors[0].device  # every tensor's (checked)
    key = (
        backend.name,
        device,
        _stream_id(device),
        scope,
        key_space,
        tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors),
        None if masks is None else tuple(m.data_ptr() for m in masks),
    )
    with _LOCK:
        cached = _PINNED.get(key)
        if cached is None:
            cached = _JOBS.pop(key, None)
            if cached is None:
                job = backend.prepare(tensors, masks, scope, key_space)
                cached = replace(job, tensors=[], masks=[])
            if _capturing(device):
                _PINNED[key] = cached
            else:
                _JOBS[key] = cached
                if len(_JOBS) > _JOB_CACHE_SIZE:
                    _JOBS.popitem(last=False)
    return replace(cached, tensors=list(tensors), masks=[] if masks is None else list(masks))


def _on_reference(tensors: Sequence[torch.Tensor], key_space: int = KEY_SPACE_NATIVE) -> bool:
    return key_space == KEY_SPACE_WIDE64 or any(t.dtype == torch.float64 for t in tensors)


def _contiguous(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().contiguous() for t in tensors]


def _select(
    backend: Backend,
    tensors: list[torch.Tensor],
    counts: torch.Tensor,
    scope: str,
    key_space: int,
) -> torch.Tensor:
    device = _device_of(tensors, counts)
    rows = _new_rows(len(tensors), device)
    if not tensors:
        return rows
    work = _contiguous(tensors)
    if _on_reference(work, key_space):
        backend = REFERENCE
    job = _job(backend, work, None, scope, key_space)
    backend.select(replace(job, counts=counts.to(device).contiguous(), rows=rows))
    return rows


def _select_layerwise(
    backend: Backend, tensors: list[torch.Tensor], counts: torch.Tensor
) -> torch.Tensor:
    _select_layerwise_fake(tensors, counts)
    return _select(backend, tensors, counts, "layer", KEY_SPACE_NATIVE)


def _select_global(
    backend: Backend, tensors: list[torch.Tensor], counts: torch.Tensor, key_space: int
) -> torch.Tensor:
    _select_global_fake(tensors, counts, key_space)
    return _select(backend, tensors, counts, "global", key_space)


def _storage(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """``mask`` itself when it is mask storage the kernels can use (contiguous, padded,
    aligned for vector access), else a padded copy of its first ``mask_bytes(numel)`` bytes."""
    size = mask_storage_bytes(numel)
    if mask.numel() >= size and mask.data_ptr() % MASK_ALIGN_BYTES == 0 and mask.is_contiguous():
        return mask
    storage = torch.zeros(size, dtype=torch.uint8, device=mask.device)
    storage[: mask_bytes(numel)] = mask[: mask_bytes(numel)]
    return storage


def _write_back(targets: Sequence[torch.Tensor], staged: Sequence[torch.Tensor]) -> None:
    """Copies the contiguous stand-ins a kernel wrote into the tensors they stood in for."""
    for target, copy in zip(targets, staged):
        if copy is not target:
            target.copy_(copy)


def _write_back_masks(
    masks: Sequence[torch.Tensor], storage: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]
) -> None:
    """Copies the mask bytes written into padded stand-ins (:func:`_storage`) back to the masks."""
    for mask, stored, tensor in zip(masks, storage, tensors):
        if stored is not mask:
            nbytes = mask_bytes(tensor.numel())
            mask[:nbytes].copy_(stored[:nbytes])


def _build_masks(
    backend: Backend,
    tensors: list[torch.Tensor],
    rows: torch.Tensor,
    masks: list[torch.Tensor],
    wide64: bool = False,
) -> None:
    _build_masks_fake(tensors, rows, masks)
    if not tensors:
        return
    work = _contiguous(tensors)
    storage = [_storage(m, t.numel()) for t, m in zip(work, masks)]
    selection = rows.contiguous()
    if wide64 or _on_reference(work):
        backend = REFERENCE
    backend.build(replace(_job(backend, work, storage, None, KEY_SPACE_NATIVE), rows=selection))
    _write_back_masks(masks, storage, work)


def _prune(
    backend: Backend,
    tensors: list[torch.Tensor],
    counts: torch.Tensor,
    masks: list[torch.Tensor],
    global_scope: bool,
    key_space: int,
) -> torch.Tensor:
    rows = _prune_fake(tensors, counts, masks, global_scope, key_space)
    if not tensors:
        return rows
    with torch.no_grad():  # the tensors may be parameters; the kernels write in place
        work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        storage = [_storage(m, t.numel()) for t, m in zip(work, masks)]
        if _on_reference(work, key_space):
            backend = REFERENCE
        job = _job(backend, work, storage, "global" if global_scope else "layer", key_space)
        backend.prune(replace(job, counts=counts.to(rows.device).contiguous(), rows=rows))
        _write_back(tensors, work)
        _write_back_masks(masks, storage, work)
    return rows


def _nm_gather(
    backend: Backend, tensors: list[torch.Tensor], lists: list[torch.Tensor], n: int, m: int
) -> None:
    _nm_gather_fake(tensors, lists, n, m)
    if not tensors:
        return
    work = _contiguous(tensors)
    targets = [listed if listed.is_contiguous() else listed.contiguous() for listed in lists]
    if _on_reference(work):
        backend = REFERENCE
    source = _job(backend, work, None, None, KEY_SPACE_NATIVE)
    backend.nm_gather(source, _job(backend, targets, None, None, KEY_SPACE_NATIVE), (n, m))
    for listed, target in zip(lists, targets):
        if target is not listed:
            listed.copy_(target)


def _nm_build_masks(
    backend: Backend,
    tensors: list[torch.Tensor],
    rows: torch.Tensor,
    masks: list[torch.Tensor],
    n: int,
    m: int,
    wide64: bool = False,
) -> None:
    _nm_build_masks_fake(tensors, rows, masks, n, m)
    if not tensors:
        return
    work = _contiguous(tensors)
    storage = [_storage(mask, t.numel()) for t, mask in zip(work, masks)]
    if wide64 or _on_reference(work):
        backend = REFERENCE
    job = _job(backend, work, storage, None, KEY_SPACE_NATIVE)
    backend.nm_build(job, rows.contiguous(), (n, m))
    _write_back_masks(masks, storage, work)


def _apply_masks(backend: Backend, tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    _apply_masks_fake(tensors, masks)
    if not tensors:
        return
    with torch.no_grad():  # the tensors may be parameters; the kernels write in place
        work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        storage = [_storage(m, t.numel()) for t, m in zip(work, masks)]
        if _on_reference(work):
            backend = REFERENCE
        backend.apply(_job(backend, work, storage, None, KEY_SPACE_NATIVE))
        _write_back(tensors, work)


# --- registration ---------------------------------------------------------------------------

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _native_kernel(kernel: Callable[..., object]) -> Callable[..., object]:
    """``kernel`` on the backend of its tensors' device (native, or the reference fallback)."""

    def run(tensors: list[torch.Tensor], *args: object) -> object:
        # An empty list has nothing to run: its kernel only returns empty rows. CPU jobs share
        # nothing written (their rows and counts are the call's), so only CUDA calls serialize.
        if not tensors:
            return kernel(REFERENCE, tensors, *args)
        device = tensors[0].device
        with _LOCK if device.type == "cuda" else nullcontext():
            return kernel(backend_for(device), tensors, *args)

    return run


def _reference_kernel(kernel: Callable[..., object]) -> Callable[..., object]:
    def run(tensors: list[torch.Tensor], *args: object) -> object:
        return kernel(REFERENCE, tensors, *args)

    return run


def _register(name: str, kernel: Callable[..., object], fake: Callable[..., object]) -> None:
    _LIBRARY.define(SCHEMAS[name])
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    torch.library.register_kernel(qualname, ("cpu", "cuda"), _native_kernel(kernel), lib=_LIBRARY)
    torch.library.register_kernel(qualname, None, _reference_kernel(kernel), lib=_LIBRARY)


_register("select_layerwise", _select_layerwise, _select_layerwise_fake)
_register("select_global", _select_global, _select_global_fake)
_register("build_masks", _build_masks, _build_masks_fake)
_register("apply_masks", _apply_masks, _apply_masks_fake)
_register("prune", _prune, _prune_fake)
_register("nm_gather", _nm_gather, _nm_gather_fake)
_register("nm_build_masks", _nm_build_masks, _nm_build_masks_fake)


# --- typed calls (what the engine and the primitives use) ------------------------------------


def select_layerwise(tensors: Sequence[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """``torch.ops.gmp_ext.select_layerwise``: rows [n, 4], tensor i pruning ``counts[i]``."""
    return torch.ops.gmp_ext.select_layerwise(tensors, counts)


def select_global(
    tensors: Sequence[torch.Tensor], counts: torch.Tensor, key_space: int
) -> torch.Tensor:
    """``torch.ops.gmp_ext.select_global``: rows [n, 4] of one selection of ``counts[0]``."""
    return torch.ops.gmp_ext.select_global(tensors, counts, key_space)


def build_masks(
    tensors: Sequence[torch.Tensor],
    rows: torch.Tensor,
    masks: Sequence[torch.Tensor],
    wide64: bool = False,
) -> None:
    """``torch.ops.gmp_ext.build_masks``: writes the packed keep-masks into ``masks``."""
    torch.ops.gmp_ext.build_masks(tensors, rows, masks, wide64)


def apply_masks(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """``torch.ops.gmp_ext.apply_masks``: zeroes the pruned elements of ``tensors`` in place."""
    torch.ops.gmp_ext.apply_masks(tensors, masks)


def prune(
    tensors: Sequence[torch.Tensor],
    counts: torch.Tensor,
    masks: Sequence[torch.Tensor],
    global_scope: bool,
    key_space: int,
) -> torch.Tensor:
    """``torch.ops.gmp_ext.prune``: select, build the masks, zero the pruned; returns the rows."""
    return torch.ops.gmp_ext.prune(tensors, counts, masks, global_scope, key_space)


def nm_gather(
    tensors: Sequence[torch.Tensor], lists: Sequence[torch.Tensor], n: int, m: int
) -> None:
    """``torch.ops.gmp_ext.nm_gather``: writes each tensor's N:M candidate list into ``lists``."""
    torch.ops.gmp_ext.nm_gather(tensors, lists, n, m)


def nm_build_masks(
    tensors: Sequence[torch.Tensor],
    rows: torch.Tensor,
    masks: Sequence[torch.Tensor],
    n: int,
    m: int,
    wide64: bool = False,
) -> None:
    """``torch.ops.gmp_ext.nm_build_masks``: N:M keep-masks from rows over the candidate lists."""
    torch.ops.gmp_ext.nm_build_masks(tensors, rows, masks, n, m, wide64)
