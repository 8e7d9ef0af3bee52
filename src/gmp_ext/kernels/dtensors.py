"""DTensor helpers every layer uses (a leaf module: it imports nothing of gmp_ext)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

__all__ = ["any_dtensor", "is_dtensor", "local_tensor"]


def _dtensor_class() -> type | None:
    """DTensor, if torch.distributed.tensor was imported: no DTensor can exist before, and
    importing it here would cost every single-process user half a second."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(tensor: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def any_dtensor(tensors: Sequence[object]) -> bool:
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, without autograd history: the storage the kernels read and
    write, looked up on every call because FSDP2 may swap it. Other tensors as they are."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()  # type: ignore[attr-defined]
