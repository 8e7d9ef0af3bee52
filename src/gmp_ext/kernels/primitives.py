"""Unchecked select / build / apply primitives over the operators, for single-process tensors.

The layer under :mod:`gmp_ext.kernels.ops` (which validates user input) and the model layer (which
chooses parameters): these functions trust their arguments. Selection rows and thresholds
follow the contract in ``gmp_ext.kernels.ops``. Select and build call the ``torch.ops.gmp_ext``
operators (:mod:`gmp_ext.kernels.library`), as does apply under ``torch.compile`` (eagerly it calls
the backend); float64 tensors, and selections in the float64 key space, run on the reference
backend.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from gmp_ext.kernels import library
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends import REFERENCE, Backend, backend_for
from gmp_ext.kernels.dtensors import local_tensor
from gmp_ext.kernels.layout import (
    KEY_SPACE_WIDE,
    KEY_SPACE_WIDE64,
    key_space_for,
    mask_bytes,
    mask_storage_bytes,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "Threshold",
    "apply_in_place",
    "apply_sparse_in_place",
    "backend_of",
    "build",
    "check_one_device",
    "check_tensor",
    "count_kept",
    "groups",
    "local_values",
    "new_mask",
    "popcount",
    "raise_on_nan",
    "raise_on_nan_counts",
    "select_rows_global",
    "select_rows_layerwise",
    "thresholds",
    "uses_reference",
    "wide64",
]


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Threshold(NamedTuple):
    """Where one tensor's selection cuts: prune (key, flat index) <= (key, index).

    ``value`` is |w| of the last pruned element (0.0 when ``k == 0``), ``index`` its flat
    index, or -1 when no element with magnitude ``value`` is pruned in this tensor (always so
    when ``k == 0``; in global scope also for tensors after the one holding the cut).
    """

    k: int
    value: float
    key: int
    index: int  # type: ignore[assignment]  # the field shadows tuple.index, by design
    key_space: int


def check_tensor(tensor: object, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; gmp_ext prunes float32, float16 and bfloat16 "
            "tensors (float64 on the reference backend)"
        )
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device and has no values to rank; materialise it first "
            "(e.g. module.to_empty(device=...) and load the weights)"
        )
    return tensor


def local_values(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous read-only view of the values (a copy only for non-contiguous tensors); a
    DTensor's local shard."""
    return local_tensor(tensor).detach().contiguous()


def backend_of(tensors: Sequence[torch.Tensor], reference: bool = False) -> Backend:
    """The device's backend; float64 work always runs on the reference."""
    if reference or any(t.dtype == torch.float64 for t in tensors):
        return REFERENCE
    return backend_for(tensors[0].device)


def groups(
    tensors: Sequence[torch.Tensor], reference: Sequence[bool] | None = None
) -> dict[tuple[str, bool], list[int]]:
    """Indices grouped by device and by whether they must run on the reference backend
    (float64, or selected in the float64 key space): one backend call per group."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, tensor in enumerate(tensors):
        on_reference = tensor.dtype == torch.float64 or bool(reference and reference[i])
        groups.setdefault((str(tensor.device), on_reference), []).append(i)
    return groups


def raise_on_nan(
    rows: torch.Tensor, tensors: Sequence[torch.Tensor], labels: Sequence[str]
) -> None:
    raise_on_nan_counts(rows[:, 3].tolist(), tensors, labels)


def raise_on_nan_counts(
    nan_counts: Sequence[int], tensors: Sequence[torch.Tensor], labels: Sequence[str]
) -> None:
    """ValueError naming the first tensor holding NaN when a selection counted any (and a
    ValueError all the same when none of ``tensors`` holds one: what was ranked did)."""
    if not any(nan_counts):
        return
    for tensor, label in zip(tensors, labels):
        count = int(torch.isnan(tensor).sum())
        if count:
            raise ValueError(
                f"{label} has {count} NaN value(s); magnitudes of NaN weights cannot be "
                "ranked (nothing was modified)"
            )
    raise ValueError(
        f"the selection counted {sum(nan_counts)} NaN key(s) in what it ranked of "
        f"{', '.join(labels)}; they cannot be ranked (nothing was modified)"
    )


def select_rows_layerwise(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Selection rows per tensor (on the tensor's device); raises before returning on NaN.
    Single-process tensors only (sharded ones: :mod:`gmp_ext.kernels.engine`)."""
    rows: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in groups(tensors).values():
        group = [local_values(tensors[i]) for i in indices]
        counts = torch.tensor([ks[i] for i in indices], dtype=torch.int64)
        result = library.select_layerwise(group, counts)
        raise_on_nan(result, group, [labels[i] for i in indices])
        for j, i in enumerate(indices):
            rows[i] = result[j]
    return rows  # type: ignore[return-value]


def check_one_device(tensors: Sequence[torch.Tensor]) -> None:
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(
            f"global selection needs all tensors on one device, got {', '.join(devices)}"
        )


def wide64(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Rows of a global selection that lives in the float64 key space."""
    return [uses_reference(key_space_for({t.dtype for t in tensors}))] * len(tensors)


def uses_reference(key_space: int) -> bool:
    """Whether rows in ``key_space`` are built on the reference backend (float64 keys)."""
    return key_space == KEY_SPACE_WIDE64


def select_rows_global(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], k: int
) -> list[torch.Tensor]:
    check_one_device(tensors)
    flat = [local_values(t) for t in tensors]
    key_space = key_space_for({t.dtype for t in tensors})
    result = library.select_global(flat, torch.tensor([k], dtype=torch.int64), key_space)
    raise_on_nan(result, flat, labels)
    return list(result)


def key_to_value(key: int, key_space: int, dtype: torch.dtype) -> float:
    if key_space == KEY_SPACE_WIDE64 or dtype == torch.float64:
        return struct.unpack("<d", struct.pack("<q", key))[0]
    if key_space == KEY_SPACE_WIDE or dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", key))[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", key << 16))[0]
    return float(np.array([key], dtype=np.uint16).view(np.float16)[0])


def thresholds(
    rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], ks: Sequence[int]
) -> list[Threshold]:
    result = []
    for row, tensor, k in zip(rows, tensors, ks):
        key, index, key_space, _ = (int(v) for v in row.tolist())
        value = key_to_value(key, key_space, tensor.dtype) if k else 0.0
        result.append(Threshold(k, value, key, index, key_space))
    return result


_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # numpy >= 2.0


def popcount(mask: torch.Tensor, numel: int) -> int:
    """Set bits among the first ``numel`` of a packed mask (kept elements; bits past ``numel``
    are never set). On the CPU numpy counts 64-bit words in place; elsewhere the reference
    counts on the device (see :func:`count_kept` for many masks at once)."""
    if mask.device.type == "cpu" and _HAS_BITWISE_COUNT:
        # numpy slices cost less than torch's
        array = mask.numpy()[: mask_bytes(numel)]
        whole = len(array) & ~7
        count = int(np.bitwise_count(array[:whole].view(np.uint64)).sum(dtype=np.int64))
        if whole < len(array):
            count += int(np.bitwise_count(array[whole:]).sum(dtype=np.int64))
        return count
    return int(_reference.popcount(mask, numel))


def count_kept(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[int]:
    """Elements each tensor's mask keeps (set bits among its first ``numel``): one job and one
    backend call per device, not a count per mask."""
    counts = [0] * len(tensors)
    for (_, reference), indices in groups(tensors).items():
        group = [tensors[i] for i in indices]
        backend = backend_of(group, reference)
        job = backend.prepare(group, [masks[i] for i in indices])
        for i, count in zip(indices, backend.count_kept(job)):
            counts[i] = count
    return counts


def new_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Zeroed mask storage for the tensor (a DTensor: for its local shard). On the CPU zeroed
    by one memset on the calling thread: ``torch.zeros`` fills a mask of 32 KiB or more in a
    parallel region, which on cores other processes keep busy waits for a descheduled thread
    (the 54 masks of the ResNet-50 set: 145 ms under two busy processes, 0.14 ms idle)."""
    local = local_tensor(tensor)
    size = mask_storage_bytes(local.numel())
    if local.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.zeros(size, dtype=torch.uint8, device=local.device)
    storage = torch.empty(size, dtype=torch.uint8)
    storage.numpy().fill(0)
    return storage


def build(
    tensors: Sequence[torch.Tensor],
    rows: Sequence[torch.Tensor],
    wide64: Sequence[bool] | None = None,
    out: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Packed masks from selection rows; ``wide64`` marks rows in the float64 key space (known
    on the host, so no device sync is needed to route them to the reference). ``out[i]``, when
    given, is mask storage of tensor i to overwrite instead of allocating."""
    masks = [
        given if out is not None and (given := out[i]) is not None else new_mask(t)
        for i, t in enumerate(tensors)
    ]
    for (_, on_reference), indices in groups(tensors, wide64).items():
        group = [local_values(tensors[i]) for i in indices]
        selection = torch.stack([rows[i] for i in indices])
        library.build_masks(group, selection, [masks[i] for i in indices], on_reference)
    return masks


def apply_in_place(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Unchecked apply for callers that own well-formed masks (the mask store). It may run at
    every step (gradients, optimizer state), so eagerly it calls the backend without the
    operator's dispatch and checks (measured: about 3 us more per tensor on CPU)."""
    with torch.no_grad():
        for indices in groups(tensors).values():
            group_masks = [masks[i] for i in indices]
            if torch.compiler.is_compiling():
                library.apply_masks([tensors[i] for i in indices], group_masks)
                continue
            targets = [tensors[i].detach() for i in indices]
            contiguous = [t if t.is_contiguous() else t.contiguous() for t in targets]
            backend_of(contiguous).apply_masks(contiguous, group_masks)
            for target, staged in zip(targets, contiguous):
                if staged is not target:
                    target.copy_(staged)


def apply_sparse_in_place(tensor: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Zero, in place, the stored values of a sparse COO ``tensor`` whose element the packed
    ``mask`` of the dense tensor (flat index order, on the tensor's device) prunes.

    Indices and the coalesced flag are kept and the values are written where they lie, so every
    holder of the tensor (``param.grad``, an optimizer about to step) sees the masked values.
    An uncoalesced tensor's duplicates of a pruned element are each zeroed, so their sum is.
    Only the mask bytes of the stored elements are read (a sparse gradient of an embedding
    touches few of its rows); ``chunk`` bounds the int64 index temporaries, in elements.
    """
    with torch.no_grad():
        values = tensor._values()
        sparse_shape = tensor.shape[: tensor.sparse_dim()]
        inner = math.prod(values.shape[1:])  # elements per stored index (an embedding's row)
        # Row-major linear index over the sparse dimensions: the element's flat index / inner.
        strides = [math.prod(sparse_shape[d + 1 :]) for d in range(len(sparse_shape))]
        scale = torch.tensor(strides, dtype=torch.int64, device=values.device)
        rows = (tensor._indices() * scale[:, None]).sum(0)
        offsets = torch.arange(inner, dtype=torch.int64, device=values.device)
        step = max(1, chunk // max(inner, 1))
        for start in range(0, rows.numel(), step):
            flat = rows[start : start + step, None] * inner + offsets
            kept = (mask[flat >> 3] >> (flat & 7).to(torch.uint8)) & 1
            part = values[start : start + step]
            part.masked_fill_(kept.view(part.shape) == 0, 0)
