"""|w|: the default score, ranked by the kernels in place (no values tensor, the fused prune)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmp_ext.scores.base import Score, register_score

__all__ = ["Magnitude"]


@register_score
class Magnitude(Score):
    """Rank each weight by its magnitude |w| (gradual magnitude pruning)."""

    name = "magnitude"
    in_place = True

    def values(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        return None
