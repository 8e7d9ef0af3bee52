"""Warning categories of gmp_ext (a leaf module: every layer may import it)."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["GMPWarning", "warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class GMPWarning(UserWarning):
    """A pruning run is legal but probably not what was meant: tied or re-parametrized weights
    left out, a schedule the run will not finish, achieved sparsity off its target. A category
    of its own, so it can be filtered or turned into an error."""


def warn(message: str) -> None:
    """Issue a :class:`GMPWarning` attributed to the first caller outside gmp_ext (the line of
    user code that led to it, however deep in the package it was noticed)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, GMPWarning, stacklevel=level + 1)
