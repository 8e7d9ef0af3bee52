"""gmp_ext: fast, exact gradual magnitude pruning (GMP) for PyTorch.

Quick start::

    import gmp_ext
    gmp_ext.prune_step(model, 0.9)          # exactly round(0.9 * n) zeros per layer
    gmp_ext.attach(model, optimizer)        # keep them zero after every optimizer.step()
    print(gmp_ext.sparsity_report(model))
"""

from __future__ import annotations

import torch  # noqa: F401  (loaded before gmp_ext._C so both share torch's OpenMP runtime)

from gmp_ext import deploy, distributed, scores
from gmp_ext._version import __version__
from gmp_ext.deploy import is_nm_sparse, load_sparse, save_sparse, to_semi_structured
from gmp_ext.deploy.exporter import MaskCheck, check_masks, export, load_masks
from gmp_ext.distributed import verify_masks_across_ranks
from gmp_ext.exceptions import GMPWarning
from gmp_ext.kernels import ops
from gmp_ext.model.layers import register_layer
from gmp_ext.model.parameters import select_parameters
from gmp_ext.pruning import strategies
from gmp_ext.pruning.plan import PrunePlan
from gmp_ext.pruning.pruner import (
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
from gmp_ext.training import lr_schedule
from gmp_ext.training.controller import GMP
from gmp_ext.training.recipes import load_recipe
from gmp_ext.training.schedule import GMPSchedule

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
    "load_recipe",
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
