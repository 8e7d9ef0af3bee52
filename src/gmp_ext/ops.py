"""Validated tensor-level ops: the one place where user input is checked.

Contract (README "The contract"):

* ``k = round(sparsity * n)`` elements are pruned, the count ``torch.nn.utils.prune`` uses.
* Pruned = the k smallest by (|w|, flat index in ``tensor.flatten()`` order); globally by
  (|w|, position of the tensor in the list, flat index). -0.0 equals +0.0, +-inf is the
  largest magnitude, a NaN weight is a ``ValueError`` and nothing is modified.
* Masks are packed: bit i (flat index) is bit ``i % 8`` of byte ``i // 8``, 1 = kept, the
  layout of ``numpy.packbits(..., bitorder="little")``; gmp_ext allocates ``ceil(n / 8)``
  bytes padded with zeros to a multiple of 16.

Every function dispatches to the backend of the tensors' device (``backends.backend_for``);
the backends return bit-identical results.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ._layout import (
    KEY_SPACE_WIDE,
    KEY_SPACE_WIDE64,
    MASK_ALIGN_BYTES,
    key_space_for,
    mask_bytes,
    mask_storage_bytes,
)
from .backends import REFERENCE, Backend, backend_for
from .dtensors import any_dtensor, local_tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "Threshold",
    "apply_masks_",
    "build_masks",
    "check_sparsity",
    "magnitude_masks",
    "pack_mask",
    "prune_count",
    "select",
    "select_global",
    "select_layerwise",
    "unpack_mask",
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


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """``sparsity`` as a float, or ValueError unless it is a finite real number in [0, 1] (a
    0-d real tensor counts as its value; reading it waits for its device)."""
    if isinstance(sparsity, torch.Tensor):
        if sparsity.dim() != 0 or sparsity.is_complex() or sparsity.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a number in [0, 1] or a 0-d real tensor, got a tensor of "
                f"shape {list(sparsity.shape)} and dtype {sparsity.dtype}"
            )
        sparsity = sparsity.item()
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, numbers.Real)
        or not math.isfinite(float(sparsity))
        or not 0.0 <= float(sparsity) <= 1.0
    ):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def prune_count(numel: int, sparsity: float) -> int:
    """Number of elements pruned: round(sparsity * numel), as torch.nn.utils.prune counts."""
    return round(sparsity * numel)


def _check_tensor(tensor: object, name: str) -> torch.Tensor:
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


def _names(tensors: Sequence[object], names: Sequence[str] | None, label: str) -> list[str]:
    if names is None:
        return [f"{label}[{i}]" for i in range(len(tensors))]
    if len(names) != len(tensors):
        raise ValueError(f"names has {len(names)} entries for {len(tensors)} tensors")
    return [f"parameter '{n}'" for n in names]


def _checked(
    tensors: Sequence[torch.Tensor], names: Sequence[str] | None, label: str = "tensors"
) -> tuple[list[torch.Tensor], list[str]]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{label} must be a sequence of tensors, got a single tensor")
    tensors = list(tensors)
    labels = _names(tensors, names, label)
    for tensor, lab in zip(tensors, labels):
        _check_tensor(tensor, lab)
    if any_dtensor(tensors):
        raise NotImplementedError(
            f"{label} holds DTensors; the tensor-level ops take local tensors "
            "(DTensor.to_local()); sharded parameters are pruned by gmp_ext.prune_step and GMP"
        )
    return tensors, labels


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous read-only view of the values (a copy only for non-contiguous tensors); a
    DTensor's local shard."""
    return local_tensor(tensor).detach().contiguous()


def _backend_of(tensors: Sequence[torch.Tensor], reference: bool = False) -> Backend:
    """The device's backend; float64 work always runs on the reference."""
    if reference or any(t.dtype == torch.float64 for t in tensors):
        return REFERENCE
    return backend_for(tensors[0].device)


def _groups(
    tensors: Sequence[torch.Tensor], reference: Sequence[bool] | None = None
) -> dict[tuple[str, bool], list[int]]:
    """Indices grouped by device and by whether they must run on the reference backend
    (float64, or selected in the float64 key space): one backend call per group."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, tensor in enumerate(tensors):
        on_reference = tensor.dtype == torch.float64 or bool(reference and reference[i])
        groups.setdefault((str(tensor.device), on_reference), []).append(i)
    return groups


def _raise_on_nan(
    rows: torch.Tensor, tensors: Sequence[torch.Tensor], labels: Sequence[str]
) -> None:
    nan_counts = rows[:, 3].tolist()
    if not any(nan_counts):
        return
    for tensor, label in zip(tensors, labels):
        count = int(torch.isnan(tensor).sum())
        if count:
            raise ValueError(
                f"{label} has {count} NaN value(s); magnitudes of NaN weights cannot be "
                "ranked (nothing was modified)"
            )


def _select_rows_layerwise(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Selection rows per tensor (on the tensor's device); raises before returning on NaN.
    Single-process tensors only (sharded ones: :mod:`gmp_ext.engine`)."""
    rows: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in _groups(tensors).values():
        group = [_flat(tensors[i]) for i in indices]
        result = _backend_of(group).select_layerwise(group, [ks[i] for i in indices])
        _raise_on_nan(result, group, [labels[i] for i in indices])
        for j, i in enumerate(indices):
            rows[i] = result[j]
    return rows  # type: ignore[return-value]


def _check_one_device(tensors: Sequence[torch.Tensor]) -> None:
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(
            f"global selection needs all tensors on one device, got {', '.join(devices)}"
        )


def _wide64(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Rows of a global selection that lives in the float64 key space."""
    return [key_space_for({t.dtype for t in tensors}) == KEY_SPACE_WIDE64] * len(tensors)


def _select_rows_global(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], k: int
) -> list[torch.Tensor]:
    _check_one_device(tensors)
    flat = [_flat(t) for t in tensors]
    key_space = key_space_for({t.dtype for t in tensors})
    result = _backend_of(flat).select_global(flat, k, key_space)
    _raise_on_nan(result, flat, labels)
    return list(result)


def _key_to_value(key: int, key_space: int, dtype: torch.dtype) -> float:
    if key_space == KEY_SPACE_WIDE64 or dtype == torch.float64:
        return struct.unpack("<d", struct.pack("<q", key))[0]
    if key_space == KEY_SPACE_WIDE or dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", key))[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", key << 16))[0]
    return float(np.array([key], dtype=np.uint16).view(np.float16)[0])


def _thresholds(
    rows: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], ks: Sequence[int]
) -> list[Threshold]:
    result = []
    for row, tensor, k in zip(rows, tensors, ks):
        key, index, key_space, _ = (int(v) for v in row.tolist())
        value = _key_to_value(key, key_space, tensor.dtype) if k else 0.0
        result.append(Threshold(k, value, key, index, key_space))
    return result


def select(tensor: torch.Tensor, sparsity: float, *, name: str = "tensor") -> Threshold:
    """Exact magnitude threshold of one tensor at ``sparsity``."""
    return select_layerwise([tensor], [sparsity], names=None if name == "tensor" else [name])[0]


def select_layerwise(
    tensors: Sequence[torch.Tensor],
    sparsities: float | Sequence[float],
    *,
    names: Sequence[str] | None = None,
) -> list[Threshold]:
    """Per-tensor thresholds: tensor i prunes round(sparsities[i] * numel) elements."""
    tensors, labels = _checked(tensors, names)
    ks = _layer_counts(tensors, sparsities)
    return _thresholds(_select_rows_layerwise(tensors, labels, ks), tensors, ks)


def _layer_counts(
    tensors: Sequence[torch.Tensor], sparsities: float | Sequence[float]
) -> list[int]:
    if isinstance(sparsities, numbers.Real) and not isinstance(sparsities, bool):
        sparsities = [float(sparsities)] * len(tensors)
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence):
        raise ValueError(f"sparsity must be a number or a sequence of numbers, got {sparsities!r}")
    if len(sparsities) != len(tensors):
        raise ValueError(f"got {len(sparsities)} sparsities for {len(tensors)} tensors")
    return [
        prune_count(t.numel(), check_sparsity(s, f"sparsity[{i}]"))
        for i, (t, s) in enumerate(zip(tensors, sparsities))
    ]


def select_global(
    tensors: Sequence[torch.Tensor], sparsity: float, *, names: Sequence[str] | None = None
) -> list[Threshold]:
    """One threshold over all tensors: round(sparsity * total) elements pruned in all.

    Returns one :class:`Threshold` per tensor whose ``k`` is the count pruned in that tensor.
    """
    tensors, labels = _checked(tensors, names)
    k = prune_count(sum(t.numel() for t in tensors), check_sparsity(sparsity))
    if not tensors:
        return []
    rows = _select_rows_global(tensors, labels, k)
    masks = _build(tensors, rows, _wide64(tensors))
    counts = [t.numel() - _popcount(m, t.numel()) for t, m in zip(tensors, masks)]
    return _thresholds(rows, tensors, counts)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(mask: torch.Tensor, numel: int, chunk: int = 1 << 18) -> int:
    """Set bits among the first ``numel`` of a packed mask (kept elements). Chunks keep the
    int64 temporaries at 4 MB, so counting adds nothing to a prune step's memory peak; the sum
    stays on the device until the end (one read-back)."""
    data = mask[: mask_bytes(numel)]
    table = _POPCOUNT.to(mask.device)
    total = torch.zeros((), dtype=torch.int64, device=mask.device)
    for i in range(0, data.numel(), chunk):
        total += table[data[i : i + chunk].long()].sum()
    return int(total)


def _new_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Zeroed mask storage for the tensor (a DTensor: for its local shard)."""
    local = local_tensor(tensor)
    return torch.zeros(mask_storage_bytes(local.numel()), dtype=torch.uint8, device=local.device)


def _build(
    tensors: Sequence[torch.Tensor],
    rows: Sequence[torch.Tensor],
    wide64: Sequence[bool] | None = None,
    out: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Packed masks from selection rows; ``wide64`` marks rows in the float64 key space (known
    on the host, so no device sync is needed to route them to the reference). ``out[i]``, when
    given, is mask storage of tensor i to overwrite instead of allocating."""
    masks = [
        given if out is not None and (given := out[i]) is not None else _new_mask(t)
        for i, t in enumerate(tensors)
    ]
    for (_, on_reference), indices in _groups(tensors, wide64).items():
        group = [_flat(tensors[i]) for i in indices]
        selection = torch.stack([rows[i] for i in indices])
        _backend_of(group, on_reference).build_masks(group, selection, [masks[i] for i in indices])
    return masks


def build_masks(
    tensors: Sequence[torch.Tensor],
    thresholds: Sequence[Threshold],
    *,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Packed keep-masks (uint8) of each tensor for the given thresholds."""
    tensors, _ = _checked(tensors, names)
    if len(thresholds) != len(tensors):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(tensors)} tensors")
    rows = []
    for i, (tensor, th) in enumerate(zip(tensors, thresholds)):
        if not isinstance(th, Threshold):
            raise TypeError(f"thresholds[{i}] must be a gmp_ext.ops.Threshold, got {th!r}")
        if not -1 <= th.index < max(tensor.numel(), 1):
            raise ValueError(f"thresholds[{i}].index {th.index} is outside tensor {i}")
        rows.append(
            torch.tensor(
                [th.key, th.index, th.key_space, 0], dtype=torch.int64, device=tensor.device
            )
        )
    return _build(tensors, rows, [th.key_space == KEY_SPACE_WIDE64 for th in thresholds])


def magnitude_masks(
    tensors: Sequence[torch.Tensor],
    sparsity: float | Sequence[float],
    *,
    scope: str = "layer",
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Select and build in one call: packed keep-masks at ``sparsity``."""
    tensors, labels = _checked(tensors, names)
    if scope == "layer":
        rows = _select_rows_layerwise(tensors, labels, _layer_counts(tensors, sparsity))
    elif scope == "global":
        k = prune_count(sum(t.numel() for t in tensors), check_sparsity(sparsity))
        rows = _select_rows_global(tensors, labels, k) if tensors else []
        return _build(tensors, rows, _wide64(tensors))
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return _build(tensors, rows)


def _check_mask(mask: object, tensor: torch.Tensor, label: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8:
        raise TypeError(f"mask of {label} must be a uint8 tensor of packed bits (see pack_mask)")
    if mask.device != tensor.device:
        raise ValueError(f"mask of {label} is on {mask.device}, the tensor on {tensor.device}")
    if mask.dim() != 1 or mask.numel() < mask_bytes(tensor.numel()):
        raise ValueError(
            f"mask of {label} must be 1-D with at least {mask_bytes(tensor.numel())} bytes "
            f"for {tensor.numel()} elements, got shape {tuple(mask.shape)}"
        )
    return mask


def _padded(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """The mask in gmp_ext's storage layout (copied only when a caller's buffer differs)."""
    size = mask_storage_bytes(numel)
    if mask.is_contiguous() and mask.numel() >= size and mask.data_ptr() % MASK_ALIGN_BYTES == 0:
        return mask
    padded = torch.zeros(size, dtype=torch.uint8, device=mask.device)
    padded[: mask_bytes(numel)] = mask[: mask_bytes(numel)]
    return padded


def apply_masks_(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    *,
    names: Sequence[str] | None = None,
) -> None:
    """Zero, in place, every element whose mask bit is 0: one fused native call per device."""
    tensors, labels = _checked(tensors, names)
    if len(masks) != len(tensors):
        raise ValueError(f"got {len(masks)} masks for {len(tensors)} tensors")
    masks = [
        _padded(_check_mask(m, t, lab), t.numel()) for t, m, lab in zip(tensors, masks, labels)
    ]
    apply_in_place(tensors, masks)


def apply_in_place(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Unchecked apply for callers that own well-formed masks (the mask store)."""
    with torch.no_grad():
        for indices in _groups(tensors).values():
            targets = [tensors[i].detach() for i in indices]
            contiguous = [t if t.is_contiguous() else t.contiguous() for t in targets]
            _backend_of(contiguous).apply_masks(contiguous, [masks[i] for i in indices])
            for target, staged in zip(targets, contiguous):
                if staged is not target:
                    target.copy_(staged)


def pack_mask(flags: torch.Tensor) -> torch.Tensor:
    """bool tensor (True = kept) -> packed uint8 mask in flatten() order."""
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool:
        raise TypeError(f"flags must be a bool tensor, got {getattr(flags, 'dtype', type(flags))}")
    return backend_for(flags.device).pack_bits(flags.reshape(-1))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Packed uint8 mask -> bool tensor of ``shape`` (True = kept)."""
    numel = math.prod(shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError("packed must be a 1-D uint8 tensor of packed bits")
    if packed.numel() < mask_bytes(numel):
        raise ValueError(
            f"packed has {packed.numel()} bytes; shape {tuple(shape)} needs {mask_bytes(numel)}"
        )
    return backend_for(packed.device).unpack_bits(packed.contiguous(), numel).view(tuple(shape))
