"""Thin adapters that run :class:`gmp_ext.training.controller.GMP` inside training frameworks.

Each framework's module is imported on its own (``gmp_ext.integrations.lightning``,
``gmp_ext.integrations.transformers``) and needs that framework; this package needs neither.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gmp_ext.exceptions import GMPWarning
from gmp_ext.training.controller import GMP
from gmp_ext.training.schedule import GMPSchedule


def start_gmp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: GMPSchedule,
    steps_per_epoch: int,
    saved: Mapping[str, Any] | None,
    gmp_kwargs: Mapping[str, Any],
    resuming: bool = False,
) -> GMP:
    """The controller of a trainer's run, continuing ``saved`` (a GMP state) if given (or
    about to be loaded by the caller, ``resuming``).

    When resuming, frameworks restore the weights and the optimizer's state before a callback
    can build the controller, so its step-0 work meets an optimizer that has stepped and weights
    sparser than the step-0 target (pruning them again only picks weights that are already
    zero). That step 0 is then replaced by ``saved``, so its warnings are silenced.
    """
    with warnings.catch_warnings():
        if saved is not None or resuming:
            warnings.simplefilter("ignore", GMPWarning)
        gmp = GMP(model, optimizer, schedule, steps_per_epoch=steps_per_epoch, **gmp_kwargs)
    if saved is not None:
        gmp.load_state_dict(saved)
    return gmp
