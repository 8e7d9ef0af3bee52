"""Learning-rate schedules tied to the pruning updates of a :class:`gmp_ext.GMPSchedule`, and
the recipe for pretrained transformers that pairs one with its sparsity schedule.

Kurtic & Alistarh ("GMP*: Well-Tuned Gradual Magnitude Pruning Can Outperform Most
BERT-Pruning Methods", arXiv 2210.06384) re-warm the learning rate at every pruning step and
let it decay until the next one, so that each cut is followed by recovery at a high rate rather
than at whatever rate a single decay over the run has reached. Free of torch: the factor is for
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import bisect
import numbers
from typing import NamedTuple

from .schedule import GMPSchedule

__all__ = ["PruningRestarts", "TransformerRecipe", "pretrained_transformer"]


class PruningRestarts:
    """Learning-rate factor in [0, 1] per optimizer step: linear decay from 1 to 0 between
    consecutive pruning updates, restarted at 1 at every update of ``schedule``, and after the
    last update (``end_epoch``) a linear decay from 1 to 0 at ``total_steps``.

    Use: ``LambdaLR(optimizer, PruningRestarts(schedule, steps_per_epoch, total_steps))``.
    ``LambdaLR`` sets the rate of optimizer step ``s + 1`` from ``factor(s)`` (``s`` steps
    taken), and the controller prunes after step ``s`` when an update point falls at
    ``s / steps_per_epoch``: the step right after a cut runs at the peak rate. Steps before
    ``start_epoch`` (stabilization) decay from 1 at step 0 to 0 at the first update. Update
    points are rounded to whole steps, as the controller reaches them.

    Raises ValueError, naming the parameter, when ``steps_per_epoch`` or ``total_steps`` is not
    a positive integer, or when the schedule's last update lies after ``total_steps``.
    """

    def __init__(self, schedule: GMPSchedule, steps_per_epoch: int, total_steps: int) -> None:
        if not isinstance(schedule, GMPSchedule):
            raise TypeError(f"schedule must be a GMPSchedule, got {type(schedule).__name__}")
        for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        updates = sorted({round(p * steps_per_epoch) for p in schedule.update_points()})
        if updates[-1] > total_steps:
            raise ValueError(
                f"total_steps must be >= the last pruning update (step {updates[-1]} = end_epoch "
                f"{schedule.end_epoch:g} x steps_per_epoch {steps_per_epoch}), got {total_steps}"
            )
        # Restart points: step 0, every update, and total_steps closing the last segment.
        self.bounds = sorted({0, *updates, total_steps})
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        """The factor for optimizer step ``step + 1`` (``step`` steps taken); 0 from
        ``total_steps`` on."""
        if step >= self.total_steps:
            return 0.0
        i = bisect.bisect_right(self.bounds, step) - 1
        start, end = self.bounds[i], self.bounds[i + 1]
        return (end - step) / (end - start)


class TransformerRecipe(NamedTuple):
    """A sparsity schedule and the learning-rate factor that goes with it."""

    schedule: GMPSchedule
    lr_lambda: PruningRestarts


def pretrained_transformer(
    sparsity: float, total_epochs: float, steps_per_epoch: int, first_step: float = 0.7
) -> TransformerRecipe:
    """GMP for fine-tuning a pretrained transformer to ``sparsity`` in ``total_epochs`` epochs
    of ``steps_per_epoch`` optimizer steps, as measured to match one-shot pruning + fine-tuning
    at the same budget (docs/results.md, "A pretrained transformer"; after Kurtic & Alistarh,
    arXiv 2210.06384):

    * the first update, at epoch 0, prunes ``min(first_step, sparsity)`` at once (magnitude
      ranks a pretrained model's smallest weights well);
    * then the cubic curve to ``sparsity`` by a quarter of the run, an update every 1/16 of it;
      three quarters of the run fine-tune at the final sparsity;
    * the learning rate back at its peak after every update, decaying linearly until the next
      one, then to 0 at the end of the run (:class:`PruningRestarts`).

    Returns ``(schedule, lr_lambda)``: give ``schedule`` to :class:`gmp_ext.GMP` (or
    ``GMPCallback``) and ``lr_lambda`` to ``torch.optim.lr_scheduler.LambdaLR`` over an
    optimizer whose ``lr`` is the peak rate::

        schedule, lr_lambda = pretrained_transformer(0.9, epochs, steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    Raises ValueError naming the parameter: ``sparsity`` and ``first_step`` outside (0, 1),
    ``total_epochs`` not positive, ``steps_per_epoch`` not a positive integer, or a run too
    short for one optimizer step between updates (``total_epochs * steps_per_epoch < 16``).
    """
    for name, value in (("sparsity", sparsity), ("first_step", first_step)):
        if not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if not isinstance(total_epochs, numbers.Real) or not float(total_epochs) > 0.0:
        raise ValueError(f"total_epochs must be > 0, got {total_epochs!r}")
    if not isinstance(steps_per_epoch, numbers.Integral) or isinstance(steps_per_epoch, bool):
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    total_steps = round(total_epochs * steps_per_epoch)
    if steps_per_epoch < 1 or total_steps < 16:
        raise ValueError(
            f"total_epochs x steps_per_epoch must be >= 16 optimizer steps (one per update "
            f"interval), got {total_epochs!r} x {steps_per_epoch!r}"
        )
    schedule = GMPSchedule(
        min(first_step, sparsity), sparsity, 0.0, total_epochs / 4, total_epochs / 16
    )
    return TransformerRecipe(schedule, PruningRestarts(schedule, steps_per_epoch, total_steps))
