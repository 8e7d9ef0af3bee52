"""Checks that a GMP run will reach the end of its schedule: gradient accumulation that
``steps_per_epoch`` missed, and runs planned (or stopped) too short."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .exceptions import warn
from .schedule import Schedule
from .strategies import Selection

__all__ = ["ForwardCounter", "check_counts", "check_epoch_steps", "check_run_length"]


class ForwardCounter:
    """Counts the model's training forward passes between optimizer steps (a forward pre-hook)
    and warns once when, two steps in a row, there are more than ``expected``: with gradient
    accumulation, ``steps_per_epoch=len(loader)`` counts micro-batches, and the run then ends
    long before its schedule does."""

    # The hook lives in the model's hook registry, so it is pickled and deep-copied with the
    # model (torch.save(model), AveragedModel): it holds counters only.
    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.forwards = 0  # since the last optimizer step
        self.before = 0  # before the last optimizer step
        self.warned = False

    def hook(self, module: nn.Module, _args: object) -> None:
        # Compiled regions skip the count: a Python side effect there would break the graph.
        if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.forwards += 1

    def step(self, schedule: Schedule, steps_per_epoch: int) -> None:
        """Called after every optimizer step of a run with this schedule."""
        observed, before = self.forwards, self.before
        self.forwards, self.before = 0, observed
        # One odd step (an epoch's last, partial accumulation window) is no pattern.
        if self.warned or observed <= 1 or observed == (self.expected or 1) or observed != before:
            return
        self.warned = True
        spe, end = steps_per_epoch, schedule.end_epoch
        stated = "" if self.expected is None else f" (gradient_accumulation_steps={self.expected})"
        warn(
            f"GMP: the model runs {observed} training forward passes per optimizer step{stated}, "
            f"and steps_per_epoch={spe} counts optimizer steps. If {spe} is the number of "
            f"batches per epoch (len(loader)), pass steps_per_epoch={math.ceil(spe / observed)}: "
            f"as set, the schedule's end_epoch {end:g} comes only after {end * observed:g} real "
            f"epochs. If {spe} already counts optimizer steps, pass "
            f"gradient_accumulation_steps={observed} to say so."
        )


def check_run_length(schedule: Schedule, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether ``total_steps`` optimizer steps reach the schedule's ``end_epoch``; a GMPWarning
    saying where the run stops when not."""
    needed = math.ceil(schedule.end_epoch * steps_per_epoch)
    if total_steps >= needed:
        return True
    epoch = total_steps / steps_per_epoch
    warn(
        f"GMP: the run takes {total_steps} optimizer steps (schedule epoch {epoch:.4g}), but "
        f"the schedule reaches its final sparsity {schedule.final_sparsity:g} at end_epoch "
        f"{schedule.end_epoch:g} = step {needed}: it stops at sparsity "
        f"{schedule.sparsity_at(epoch):.4g}, in the {schedule.stage_at(epoch)} stage. Check "
        "steps_per_epoch (optimizer steps per epoch; with gradient accumulation, batches / "
        "accumulation steps) and the schedule's end_epoch."
    )
    return False


def check_epoch_steps(observed: int, steps_per_epoch: int) -> None:
    """Warn when an epoch took ``observed`` optimizer steps, not ``steps_per_epoch``."""
    if observed != steps_per_epoch:
        warn(
            f"GMP: {observed} optimizer steps in this epoch, but steps_per_epoch is "
            f"{steps_per_epoch}; the schedule's epochs will drift from the real ones"
        )


def check_counts(
    step: int,
    selection: Selection,
    params: Mapping[str, nn.Parameter],
    targets: Mapping[str, float],
    zeros: Mapping[str, int],
) -> None:
    """Warn when an update's zeros in the weights are not what the strategy pruned: kept
    weights that are exactly zero, or caps leaving too little room (global scope)."""
    names = list(params)
    expected = selection.expected_zeros(
        [params[n].numel() for n in names], [targets[n] for n in names]
    )
    if selection.per_tensor_targets:
        off = [
            f"{n} ({zeros[n]} zeros, expected {e})"
            for n, e in zip(names, expected)
            if zeros[n] != e
        ]
    else:
        found = sum(zeros.values())
        off = (
            [] if found == expected[0] else [f"all layers ({found} zeros, expected {expected[0]})"]
        )
    if off:
        warn(
            f"GMP step {step}: achieved sparsity differs from the target for "
            f"{'; '.join(off)}; kept weights are exactly zero or max_sparsity caps bind"
        )
