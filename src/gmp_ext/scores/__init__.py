"""Scores: what a prune step ranks (the seam is :mod:`gmp_ext.scores.base`).

``score=`` in :func:`gmp_ext.prune_step`, :class:`gmp_ext.PrunePlan`, :class:`gmp_ext.GMP`, the
callbacks and recipes takes a registered name (``"magnitude"``, the default; ``"wanda"``;
``"movement"``), a :class:`Score`, or a function ``f(name, param) -> values``.

Global scope compares the values of all layers on one scale: magnitude compares |w| across
layers as GMP always has; Wanda compares ``|w| * ||x_j||``, which grows with a layer's input
scale; movement compares accumulated ``-w * grad``. Layer scope (the default) compares values
only within each weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from gmp_ext.scores.base import (
    KeyScale,
    Ranked,
    Scaled,
    Score,
    ScoreSpec,
    rank_tensors,
    register_score,
    registered_scores,
    score_from_dict,
)
from gmp_ext.scores.function import FunctionScore
from gmp_ext.scores.magnitude import Magnitude
from gmp_ext.scores.movement import Movement
from gmp_ext.scores.wanda import Wanda

__all__ = [
    "FunctionScore",
    "KeyScale",
    "Magnitude",
    "Movement",
    "Ranked",
    "Scaled",
    "Score",
    "ScoreSpec",
    "Wanda",
    "rank_tensors",
    "register_score",
    "registered_scores",
    "score_for",
    "score_from_dict",
]


def score_for(spec: ScoreSpec) -> Score:
    """The score ``score=`` names: None or ``"magnitude"`` -> :class:`Magnitude`, another
    registered name -> a new instance, a :class:`Score` -> itself, a callable ->
    :class:`FunctionScore`. ValueError for anything else, naming the registered scores."""
    if spec is None:
        return Magnitude()
    if isinstance(spec, Score):
        return spec
    if isinstance(spec, str):
        known = registered_scores()
        if spec not in known:
            raise ValueError(
                f"score must be one of {sorted(known)}, a gmp_ext.scores.Score or a function "
                f"f(name, param) -> values, got {spec!r}"
            )
        return known[spec]()
    if isinstance(spec, type) and issubclass(spec, Score):
        return spec()
    if callable(spec):
        return FunctionScore(cast(Callable[[str, torch.Tensor], torch.Tensor], spec))
    raise ValueError(
        f"score must be a registered name, a gmp_ext.scores.Score or a function "
        f"f(name, param) -> values, got {spec!r}"
    )
