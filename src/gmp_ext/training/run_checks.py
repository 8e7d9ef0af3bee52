"""Checks that a GMP run will reach the end of its schedule: gradient accumulation that
``steps_per_epoch`` missed, and runs planned (or stopped) too short."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from gmp_ext.exceptions import warn
from gmp_ext.kernels.dtensors import is_dtensor
from gmp_ext.pruning.strategies import Selection
from gmp_ext.training.schedule import Schedule

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["PassCounter", "check_counts", "check_epoch_steps", "check_run_length"]


class PassCounter:
    """Counts the model's training passes between optimizer steps and warns once when, two steps
    in a row, there are more than ``expected``: with gradient accumulation,
    ``steps_per_epoch=len(loader)`` counts micro-batches, and the run then ends long before its
    schedule does.

    Two counts, of which a step takes the larger: forward passes of the model in training mode
    with gradients on (a forward pre-hook), and backward passes that accumulate into one trainable
    parameter's ``.grad`` (a post-accumulate-grad hook; the autograd engine runs it also when the
    forward is compiled). Neither counts inside code that Dynamo compiles, where a Python side
    effect would recompile the graph at every count. So under ``torch.compile`` only the
    backward count checks a run, and no count does with compiled autograd
    (``torch._dynamo.config.compiled_autograd``), when no parameter outside a DTensor (FSDP2)
    trains, or when the counted parameter stops training or is replaced
    (``load_state_dict(assign=True)``) after GMP was created.
    """

    # The forward hook lives in the model's hook registry, so it is pickled and deep-copied with
    # the model (torch.save(model), AveragedModel): it holds counters only. A tensor's
    # post-accumulate-grad hooks are neither pickled nor deep-copied.
    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.forwards = 0  # since the last optimizer step
        self.backwards = 0  # since the last optimizer step
        self.before = 0  # before the last optimizer step
        self.warned = False

    def attach(self, module: nn.Module, params: Iterable[torch.Tensor]) -> list[RemovableHandle]:
        """Count the training forward passes of ``module`` and the backward passes of the first
        of ``params`` that trains and is not a DTensor: FSDP2 calls a shard's hook only when it
        reduces the gradient, and one on a CPU-offloaded shard keeps it from overlapping the
        gradient's copy to the host."""
        handles = [module.register_forward_pre_hook(self.forward_hook)]
        counted = next((p for p in params if p.requires_grad and not is_dtensor(p)), None)
        if counted is not None:
            handles.append(counted.register_post_accumulate_grad_hook(self.backward_hook))
        return handles

    def forward_hook(self, module: nn.Module, _args: object) -> None:
        if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.forwards += 1

    def backward_hook(self, _param: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.backwards += 1

    def step(self, schedule: Schedule, steps_per_epoch: int) -> None:
        """Called after every optimizer step of a run with this schedule."""
        observed, before = max(self.forwards, self.backwards), self.before
        self.forwards, self.backwards, self.before = 0, 0, observed
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
