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
from collections.abc import Sequence

import torch

from gmp_ext.kernels import primitives
from gmp_ext.kernels.backends import backend_for
from gmp_ext.kernels.dtensors import any_dtensor
from gmp_ext.kernels.layout import (
    KEY_SPACE_WIDE64,
    MASK_ALIGN_BYTES,
    mask_bytes,
    mask_storage_bytes,
)
from gmp_ext.kernels.primitives import SUPPORTED_DTYPES, Threshold

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
        primitives.check_tensor(tensor, lab)
    if any_dtensor(tensors):
        raise NotImplementedError(
            f"{label} holds DTensors; the tensor-level ops take local tensors "
            "(DTensor.to_local()); sharded parameters are pruned by gmp_ext.prune_step and GMP"
        )
    return tensors, labels


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
    return primitives.thresholds(primitives.select_rows_layerwise(tensors, labels, ks), tensors, ks)


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
    rows = primitives.select_rows_global(tensors, labels, k)
    masks = primitives.build(tensors, rows, primitives.wide64(tensors))
    kept = primitives.count_kept(tensors, masks)
    counts = [t.numel() - c for t, c in zip(tensors, kept)]
    return primitives.thresholds(rows, tensors, counts)


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
            raise TypeError(f"thresholds[{i}] must be a gmp_ext.kernels.ops.Threshold, got {th!r}")
        if not -1 <= th.index < max(tensor.numel(), 1):
            raise ValueError(f"thresholds[{i}].index {th.index} is outside tensor {i}")
        rows.append(
            torch.tensor(
                [th.key, th.index, th.key_space, 0], dtype=torch.int64, device=tensor.device
            )
        )
    return primitives.build(tensors, rows, [th.key_space == KEY_SPACE_WIDE64 for th in thresholds])


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
        rows = primitives.select_rows_layerwise(tensors, labels, _layer_counts(tensors, sparsity))
    elif scope == "global":
        k = prune_count(sum(t.numel() for t in tensors), check_sparsity(sparsity))
        rows = primitives.select_rows_global(tensors, labels, k) if tensors else []
        return primitives.build(tensors, rows, primitives.wide64(tensors))
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return primitives.build(tensors, rows)


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
    primitives.apply_in_place(tensors, masks)


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
