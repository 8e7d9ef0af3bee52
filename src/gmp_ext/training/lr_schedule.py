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
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

from gmp_ext.training.schedule import GMPSchedule

__all__ = [
    "PruningRestarts",
    "RunSchedule",
    "TransformerRecipe",
    "pretrained_transformer",
    "pruning_steps",
]


def _positive_int(name: str, value: object) -> int:
    # bool is an Integral: True would pass as 1 and hide a typo.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def pruning_steps(schedule: GMPSchedule, steps_per_epoch: int) -> list[int]:
    """The optimizer steps after which :class:`gmp_ext.GMP` with this schedule and
    ``steps_per_epoch`` computes masks, ascending; 0 means at construction.

    The controller's own rule, asked of the schedule the way the controller asks it: step 0 when
    ``crossed_update(-inf, 0)``, step ``s >= 1`` when ``crossed_update((s - 1) / spe, s / spe)``.
    Only the steps next to each update point are asked: ``crossed_update`` counts an epoch within
    1e-9 (relative) of a point as reaching it, far less than one step from ``point * spe``.
    """
    if not isinstance(schedule, GMPSchedule):
        raise TypeError(f"schedule must be a GMPSchedule, got {type(schedule).__name__}")
    spe = _positive_int("steps_per_epoch", steps_per_epoch)

    def crossed(step: int) -> bool:
        previous = -math.inf if step == 0 else (step - 1) / spe
        return schedule.crossed_update(previous, step / spe)

    candidates = {
        step
        for point in schedule.update_points()
        for step in range(math.floor(point * spe) - 1, math.ceil(point * spe) + 2)
        if step >= 0
    }
    return sorted(step for step in candidates if crossed(step))


class PruningRestarts:
    """Learning-rate factor in [0, 1] per optimizer step: linear decay from 1 to 0 between
    consecutive pruning updates, restarted at 1 at every update of ``schedule``, and after the
    last update a linear decay from 1 to 0 at ``total_steps``.

    Use: ``LambdaLR(optimizer, PruningRestarts(schedule, steps_per_epoch, total_steps))``.
    ``LambdaLR`` sets the rate of optimizer step ``s + 1`` from ``factor(s)`` (``s`` steps
    taken), and the restarts are the steps after which :class:`gmp_ext.GMP` with the same
    ``steps_per_epoch`` prunes (:func:`pruning_steps`): the step right after every cut runs at
    the peak rate, and no other does. Steps before the first update (stabilization) decay from 1
    at step 0 to 0 at the first update.

    Its attributes (``bounds``: step 0, the updates and ``total_steps``; ``steps_per_epoch``;
    ``total_steps``) are builtins, so ``LambdaLR.state_dict()`` holding them loads with
    ``torch.load(weights_only=True)``, as the Hugging Face Trainer resumes a scheduler.

    Raises ValueError, naming the parameter, when ``steps_per_epoch`` or ``total_steps`` is not
    a positive integer, or when the schedule's last update lies after ``total_steps``.
    """

    def __init__(self, schedule: GMPSchedule, steps_per_epoch: int, total_steps: int) -> None:
        if not isinstance(schedule, GMPSchedule):
            raise TypeError(f"schedule must be a GMPSchedule, got {type(schedule).__name__}")
        self.steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch)
        self.total_steps = _positive_int("total_steps", total_steps)
        updates = pruning_steps(schedule, self.steps_per_epoch)
        if updates[-1] > self.total_steps:
            raise ValueError(
                f"total_steps must be >= the last pruning update (step {updates[-1]} = end_epoch "
                f"{schedule.end_epoch:g} x steps_per_epoch {steps_per_epoch}), got {total_steps}"
            )
        self.bounds = sorted({0, *updates, self.total_steps})

    def __call__(self, step: int) -> float:
        """The factor for optimizer step ``step + 1`` (``step`` steps taken); 0 from
        ``total_steps`` on."""
        if step >= self.total_steps:
            return 0.0
        i = bisect.bisect_right(self.bounds, step) - 1
        start, end = self.bounds[i], self.bounds[i + 1]
        return (end - step) / (end - start)


@dataclass(frozen=True)
class RunSchedule(GMPSchedule):
    """A :class:`gmp_ext.GMPSchedule` built for ``steps_per_epoch`` optimizer steps per epoch,
    as a learning-rate factor made with it is (:func:`pretrained_transformer`).

    :class:`gmp_ext.GMP` refuses it with another ``steps_per_epoch`` (ValueError naming both):
    its updates would then fall on other steps than the factor's restarts. ``state_dict`` is the
    plain schedule's; the checkpoint records ``steps_per_epoch`` beside it.
    """

    # A default only because the fields before it have one: 0 is rejected in __post_init__.
    steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        _positive_int("steps_per_epoch", self.steps_per_epoch)
        super().__post_init__()


class TransformerRecipe(NamedTuple):
    """A sparsity schedule and the learning-rate factor that goes with it; unpacks as
    ``schedule, lr_lambda``."""

    schedule: RunSchedule
    lr_lambda: PruningRestarts

    @property
    def steps_per_epoch(self) -> int:
        """The ``steps_per_epoch`` to give :class:`gmp_ext.GMP` (1 for a run given in steps)."""
        return self.schedule.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """The run's optimizer steps; the learning rate reaches 0 there."""
        return self.lr_lambda.total_steps


def pretrained_transformer(
    sparsity: float,
    total_epochs: float | None = None,
    steps_per_epoch: int | None = None,
    first_step: float = 0.7,
    *,
    total_steps: int | None = None,
) -> TransformerRecipe:
    """GMP for fine-tuning a pretrained transformer to ``sparsity``, as measured to match
    one-shot pruning + fine-tuning at the same budget (docs/results.md, "A pretrained
    transformer"; after Kurtic & Alistarh, arXiv 2210.06384):

    * the first update, at step 0, prunes ``min(first_step, sparsity)`` at once (magnitude
      ranks a pretrained model's smallest weights well);
    * then the cubic curve to ``sparsity`` by a quarter of the run, an update every 1/16 of it;
      three quarters of the run fine-tune at the final sparsity;
    * the learning rate back at its peak after every update, decaying linearly until the next
      one, then to 0 at the end of the run (:class:`PruningRestarts`).

    The run's length is ``total_epochs`` epochs of ``steps_per_epoch`` optimizer steps
    (``round(total_epochs * steps_per_epoch)`` steps), or ``total_steps`` optimizer steps; with
    ``total_steps``, ``steps_per_epoch`` only sets the schedule's epochs (default 1: the schedule
    is in steps). Returns ``(schedule, lr_lambda)``, also ``recipe.steps_per_epoch``: give
    ``schedule`` to :class:`gmp_ext.GMP` with that ``steps_per_epoch`` (another is a
    ValueError) and ``lr_lambda`` to ``torch.optim.lr_scheduler.LambdaLR`` over an optimizer
    whose ``lr`` is the peak rate::

        recipe = pretrained_transformer(0.9, total_steps=len(loader) * epochs)
        gmp = gmp_ext.GMP(model, optimizer, recipe.schedule, steps_per_epoch=recipe.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda)

    With the Hugging Face Trainer, ``GMPCallback.pretrained_transformer(sparsity)``
    (:mod:`gmp_ext.integrations.transformers`) builds it for the Trainer's run and sets its
    learning rate.

    Raises ValueError naming the parameter: ``sparsity`` and ``first_step`` outside (0, 1),
    both or neither of ``total_epochs`` and ``total_steps``, ``total_epochs`` not positive or
    without ``steps_per_epoch``, ``steps_per_epoch`` or ``total_steps`` not a positive integer,
    or a run too short for one optimizer step between updates (fewer than 16 steps).
    """
    for name, value in (("sparsity", sparsity), ("first_step", first_step)):
        if not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if (total_epochs is None) == (total_steps is None):
        raise ValueError(
            "give the run's length as total_epochs (with steps_per_epoch) or total_steps, "
            f"exactly one; got total_epochs={total_epochs!r}, total_steps={total_steps!r}"
        )
    spe = 1 if steps_per_epoch is None else _positive_int("steps_per_epoch", steps_per_epoch)
    if total_epochs is not None:
        if not isinstance(total_epochs, numbers.Real) or not 0.0 < float(total_epochs) < math.inf:
            raise ValueError(f"total_epochs must be a finite number > 0, got {total_epochs!r}")
        if steps_per_epoch is None:
            raise ValueError(
                f"total_epochs={total_epochs!r} needs steps_per_epoch (optimizer steps per "
                "epoch); or give total_steps instead"
            )
        epochs = float(total_epochs)
        steps = round(epochs * spe)
        length = f"total_epochs x steps_per_epoch ({total_epochs!r} x {steps_per_epoch!r})"
    else:
        steps = _positive_int("total_steps", total_steps)
        epochs = steps / spe
        length = f"total_steps ({total_steps!r})"
    if steps < 16:
        raise ValueError(
            f"{length} must be >= 16 optimizer steps (one per update interval), got {steps}"
        )
    schedule = RunSchedule(
        min(first_step, sparsity), sparsity, 0.0, epochs / 4, epochs / 16, steps_per_epoch=spe
    )
    return TransformerRecipe(schedule, PruningRestarts(schedule, spe, steps))
