"""A user function as a score: ``score=lambda name, param: values``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gmp_ext.scores.base import Score

__all__ = ["FunctionScore"]


class FunctionScore(Score):
    """Values from ``fn(name, param)`` (a tensor of the parameter's shape, any sign: the
    smallest are pruned) at every update. Not registered by name: a checkpoint records the
    function's qualified name, and resuming needs the same function passed again."""

    name = "function"

    def __init__(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"a score function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def values(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.fn(name, param.detach()) for name, param in zip(names, params)]

    def params(self) -> dict[str, str]:
        """The function's qualified name, for records only: a function does not round-trip."""
        return {"function": getattr(self.fn, "__qualname__", type(self.fn).__name__)}
