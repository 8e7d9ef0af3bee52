"""gmp_ext: fast, exact gradual magnitude pruning (GMP) for PyTorch.

Quick start::

    import gmp_ext
    gmp_ext.prune_step(model, 0.9)          # exactly round(0.9 * n) zeros per layer
    gmp_ext.attach(model, optimizer)        # keep them zero after every optimizer.step()
    print(gmp_ext.sparsity_report(model))
"""

from __future__ import annotations

import torch  # noqa: F401  (loaded before gmp_ext._C so both share torch's OpenMP runtime)

from . import deploy, distributed, lr_schedule, ops, scores, strategies
from ._version import __version__
from .controller import GMP
from .deploy import is_nm_sparse, load_sparse, save_sparse, to_semi_structured
from .distributed import verify_masks_across_ranks
from .exceptions import GMPWarning
from .exporter import MaskCheck, check_masks, export, load_masks
from .layers import register_layer
from .plan import PrunePlan
from .pruner import (
    SparsityReport,
    apply_masks,
    attach,
    masks,
    prune_step,
    remove,
    sparsity_report,
    zero_pruned_grads,
    zero_pruned_state,
)
from .schedule import GMPSchedule
from .selection import select_parameters

__all__ = [
    "GMP",
    "GMPSchedule",
    "GMPWarning",
    "MaskCheck",
    "PrunePlan",
    "SparsityReport",
    "__version__",
    "apply_masks",
    "attach",
    "check_masks",
    "deploy",
    "distributed",
    "export",
    "is_nm_sparse",
    "load_masks",
    "load_sparse",
    "lr_schedule",
    "masks",
    "ops",
    "prune_step",
    "register_layer",
    "remove",
    "save_sparse",
    "scores",
    "select_parameters",
    "sparsity_report",
    "strategies",
    "to_semi_structured",
    "verify_masks_across_ranks",
    "zero_pruned_grads",
    "zero_pruned_state",
]
