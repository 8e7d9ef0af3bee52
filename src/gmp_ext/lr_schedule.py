"""Learning-rate schedules tied to the pruning updates of a :class:`gmp_ext.GMPSchedule`.

Kurtic & Alistarh ("GMP*: Well-Tuned Gradual Magnitude Pruning Can Outperform Most
BERT-Pruning Methods", arXiv 2210.06384) re-warm the learning rate at every pruning step and
let it decay until the next one, so that each cut is followed by recovery at a high rate rather
than at whatever rate a single decay over the run has reached. Free of torch: the factor is for
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import bisect
import numbers

from .schedule import GMPSchedule

__all__ = ["PruningRestarts"]


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
