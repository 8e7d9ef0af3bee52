"""gmp_ext's warning category and how it is issued (a leaf module: every layer may import it)."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

__all__ = ["GMPWarning", "warn"]

# Frames in these folders are skipped when attributing a warning: gmp_ext's own, and torch's
# (an optimizer step hook is called from inside torch.optim).
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__)
)


class GMPWarning(UserWarning):
    """A pruning run is legal but probably not what was meant: tied or re-parametrized weights
    left out, a schedule the run will not finish, achieved sparsity off its target. A category
    of its own, so it can be filtered or turned into an error."""


def warn(message: str) -> None:
    """Issue a :class:`GMPWarning` attributed to the first caller outside gmp_ext and torch
    (the line of user code that led to it, however deep it was noticed)."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL_DIRS
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, GMPWarning, stacklevel=level + 1)
