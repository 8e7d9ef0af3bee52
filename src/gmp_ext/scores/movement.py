"""Movement: how far training pushes each weight away from zero (Sanh et al., 2020).

Sanh, Wolf and Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (arXiv 2005.07683),
hard movement pruning: the score of a weight is ``S = -sum_t w_t * g_t`` over the optimizer steps
since the last update (a weight that gradient descent moves toward zero scores low, one it
moves away from zero scores high, whatever its size), and the smallest scores are pruned. The
accumulation is one fused ``torch._foreach_addcmul_`` over all pruned weights per optimizer
step, before the step (an optimizer step pre-hook: the gradients of the whole accumulated
batch, unscaled by a GradScaler that calls ``step``). Without an optimizer, call
:meth:`Movement.accumulate` after each backward pass; with nothing accumulated, a prune ranks
``-w * grad`` of the gradients present.

Weights that are exactly zero (the ones earlier updates pruned) rank below every other weight,
as they do by magnitude: a pruned weight accumulates nothing (``w = 0``), and ranking its 0
among the signed scores would prune kept weights in its place and leave it unmasked at zero,
so masks would churn and the zeros overshoot the target. Sparsity only rises, as in GMP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gmp_ext.model.parameters import parameter_by_name, unwrap
from gmp_ext.scores.base import Score, register_score

__all__ = ["Movement"]


@register_score
class Movement(Score):
    """``-sum(w * grad)`` since the last update (see the module)."""

    name = "movement"

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self.steps = 0  # accumulations in this window

    def attach(
        self, model: nn.Module, names: Sequence[str], optimizer: torch.optim.Optimizer | None = None
    ) -> list[Any]:
        self._model, self._names = unwrap(model)[0], list(names)
        if optimizer is None:
            return []
        return [optimizer.register_step_pre_hook(lambda *_: self.accumulate())]

    def accumulate(self) -> None:
        """Add ``-w * grad`` of the attached parameters to the totals (parameters without a
        gradient add nothing)."""
        if self._model is None:
            raise RuntimeError("Movement.accumulate needs the score attached to a model first")
        names, weights, grads = [], [], []
        for name in self._names:
            param = parameter_by_name(self._model, name)
            if param.grad is None:
                continue
            names.append(name)
            weights.append(param.detach().float())  # no copy for float32
            grads.append(param.grad.float())
        if not names:
            return
        totals = []
        for name, weight in zip(names, weights):
            total = self._totals.get(name)
            if total is None or total.shape != weight.shape:
                total = torch.zeros_like(weight)
            # A state loaded elsewhere (map_location) moves to the weight's device.
            total = self._totals[name] = total.to(weight.device)
            totals.append(total)
        with torch.no_grad():
            torch._foreach_addcmul_(totals, weights, grads, value=-1.0)
        self.steps += 1

    def values(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        values = []
        for name, param in zip(names, params):
            total = self._totals.get(name)
            weight = param.detach()
            if total is not None:
                moved = total.to(weight.device)
            elif param.grad is not None:
                moved = -(weight.float() * param.grad.float())
            else:
                raise ValueError(
                    f"score 'movement' has no gradient for parameter '{name}': attach it with "
                    "the optimizer (GMP does), call accumulate() after backward, or prune right "
                    "after a backward pass"
                )
            values.append(moved.masked_fill(weight == 0, -math.inf))
        return values

    def reset(self) -> None:
        for total in self._totals.values():
            total.zero_()
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"totals": {n: t.clone() for n, t in self._totals.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._totals = {n: t.clone() for n, t in state.get("totals", {}).items()}
        self.steps = int(state.get("steps", 0))
