"""Warning categories of gmp_ext (a leaf module: every layer may import it)."""

from __future__ import annotations

__all__ = ["GMPWarning"]


class GMPWarning(UserWarning):
    """A pruning run is legal but probably not what was meant: tied or re-parametrized weights
    left out, a schedule the run will not finish, achieved sparsity off its target. A category
    of its own, so it can be filtered or turned into an error."""
