"""The prune-step engine: selection rows for single-process or sharded parameters alike.

Above this module nothing branches on whether a parameter is a DTensor: sharded parameters
(FSDP2) are selected by :mod:`gmp_ext.distributed` (histograms all-reduced between passes),
the others by the backend kernels through :mod:`gmp_ext.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import distributed, primitives
from .dtensors import any_dtensor

__all__ = ["select_rows_global", "select_rows_layerwise"]


def select_rows_layerwise(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Selection rows (``csrc/common/tensor_table.h``) where tensor i prunes ``ks[i]``
    elements; a DTensor's are rows of its local shard, selected together across its mesh (a
    collective). Raises ValueError naming the tensor on NaN, before anything is modified."""
    if any_dtensor(tensors):
        return distributed.select_layerwise_sharded(tensors, labels, ks)
    return primitives.select_rows_layerwise(tensors, labels, ks)


def select_rows_global(
    tensors: Sequence[torch.Tensor], labels: Sequence[str], k: int
) -> list[torch.Tensor]:
    """Rows of one selection of the ``k`` smallest elements over all tensors (ties: tensor
    position, then flat index); sharded tensors are selected across their mesh."""
    if any_dtensor(tensors):
        return distributed.select_global_sharded(tensors, labels, k)
    return primitives.select_rows_global(tensors, labels, k)
