"""Plots of GMP schedules and of the sparsity a run actually reached.

matplotlib is an optional extra, imported only when a plot is requested. Figures are built on
the Agg canvas directly rather than through pyplot, so plotting works headless, never switches
the user's backend and leaves no figures registered in pyplot's global state.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmp_ext.schedule import GMPSchedule, LRSteps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_schedule", "plot_sparsity_history"]

_STAGES = (
    ("stabilization", "tab:blue"),
    ("pruning", "tab:red"),
    ("fine-tuning", "tab:green"),
)
_MAX_LEGEND_LAYERS = 10


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'gmp_ext[plot]'") from exc
    figure = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)


def _positive(name: str, value: object) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number > 0:
            return number
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _shade_stages(
    ax: Axes, schedule: GMPSchedule, steps_per_epoch: float, last_step: float, label: bool
) -> None:
    bounds = (0.0, schedule.start_epoch * steps_per_epoch, schedule.end_epoch * steps_per_epoch)
    for (name, color), lo, hi in zip(_STAGES, bounds, (*bounds[1:], last_step)):
        hi = min(hi, last_step)
        if hi > lo:
            ax.axvspan(lo, hi, color=color, alpha=0.12, linewidth=0, label=name if label else None)


def _epoch_axis(ax: Axes, steps_per_epoch: float) -> None:
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
    )
    top.set_xlabel("epoch")


def _interpolation_name(schedule: GMPSchedule) -> str:
    interpolation = schedule.interpolation
    if isinstance(interpolation, str):
        return interpolation
    return getattr(interpolation, "__name__", type(interpolation).__name__)


def _scheduler_lrs(
    factory: Callable[[Any], Any], steps: int, steps_per_epoch: int, base_lr: float, per_step: bool
) -> list[float]:
    import torch

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = factory(optimizer)
    lrs = []
    for step in range(steps + 1):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        if per_step or (step + 1) % steps_per_epoch == 0:
            optimizer.step()  # a no-op without gradients; keeps the scheduler's order check quiet
            scheduler.step()
    return lrs


def plot_schedule(
    schedule: GMPSchedule,
    total_epochs: float,
    steps_per_epoch: int,
    lr: LRSteps | Callable[[float], float] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    lr_scheduler: Callable[[Any], Any] | None = None,
    base_lr: float = 0.1,
    lr_per_step: bool = False,
) -> Figure:
    """Draw target sparsity against optimizer step, as a controller stepping per batch sees it.

    The three stages are shaded. With a learning rate, a second panel below shows it against
    the same steps: ``lr`` is an :class:`LRSteps` or a callable ``epoch -> lr`` evaluated at
    ``step / steps_per_epoch``; alternatively ``lr_scheduler`` is a factory such as
    ``lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60])``, run on a dummy SGD
    optimizer starting at ``base_lr`` and stepped once per epoch (once per optimizer step if
    ``lr_per_step``), as the training loop would. Saves a PNG to ``path`` if given.
    """
    total = _positive("total_epochs", total_epochs)
    if (
        isinstance(steps_per_epoch, bool)
        or not isinstance(steps_per_epoch, int)
        or steps_per_epoch <= 0
    ):
        raise ValueError(f"steps_per_epoch must be an integer > 0, got {steps_per_epoch!r}")
    if lr is not None and lr_scheduler is not None:
        raise ValueError("pass lr or lr_scheduler, not both")
    steps = math.ceil(total * steps_per_epoch - 1e-9)
    xs = list(range(steps + 1))
    if isinstance(lr, LRSteps):
        lrs = [lr.lr_at(s / steps_per_epoch) for s in xs]
    elif lr is not None:
        lrs = [float(lr(s / steps_per_epoch)) for s in xs]
    elif lr_scheduler is not None:
        base = _positive("base_lr", base_lr)
        lrs = _scheduler_lrs(lr_scheduler, steps, steps_per_epoch, base, lr_per_step)
    else:
        lrs = None

    figure = _figure(figsize=(8.0, 6.0 if lrs is not None else 4.0))
    axes = figure.subplots(2 if lrs is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for i, panel in enumerate(axes):
        _shade_stages(panel, schedule, steps_per_epoch, steps, label=i == 0)
    sparsity = [schedule.sparsity_at(s / steps_per_epoch) for s in xs]
    ax.plot(xs, sparsity, drawstyle="steps-post", color="black", label="target sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("sparsity")
    ax.set_xlim(0, steps)
    ax.set_title(
        f"GMP {_interpolation_name(schedule)}: sparsity {schedule.init_sparsity:g} to "
        f"{schedule.final_sparsity:g}, epochs {schedule.start_epoch:g} to "
        f"{schedule.end_epoch:g}, update every {schedule.update_frequency:g} epoch(s)"
    )
    ax.legend(loc="lower right", fontsize="small")
    _epoch_axis(ax, steps_per_epoch)
    if lrs is not None:
        lr_ax = axes[1]
        lr_ax.plot(xs, lrs, drawstyle="steps-post", color="tab:purple", label="learning rate")
        if min(lrs) > 0 and max(lrs) / min(lrs) >= 10:
            lr_ax.set_yscale("log")  # step decays span decades; linear would flatten them to 0
        lr_ax.set_ylabel("learning rate")
    axes[-1].set_xlabel("optimizer step")
    _save(figure, path)
    return figure


def plot_sparsity_history(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str] | None = None,
    schedule: GMPSchedule | None = None,
    steps_per_epoch: float | None = None,
    until_step: int | None = None,
) -> Figure:
    """Draw the sparsity each layer actually reached against optimizer step.

    ``records`` are the controller's history entries, ``{"epoch", "step", "target", "layers":
    {name: {"achieved", "threshold"}}}``. Without ``schedule`` the recorded targets are drawn;
    with it, the stages are shaded and the planned target curve is drawn through ``end_epoch``
    (``steps_per_epoch`` is then inferred from the records' step / epoch if not given).
    ``until_step`` extends the plot to that optimizer step (the run's current one), so the
    sparsity held during fine-tuning shows too.
    """
    records = sorted(records, key=lambda record: record["step"])
    if not records:
        raise ValueError("records is empty: there is nothing to plot")
    reached = max(records[-1]["step"], until_step or 0)
    last_step = reached
    if steps_per_epoch is None and schedule is not None:
        ratios = [r["step"] / r["epoch"] for r in records if r["epoch"] > 0]
        if not ratios:
            raise ValueError("pass steps_per_epoch: no record has an epoch > 0 to infer it from")
        steps_per_epoch = ratios[-1]
    elif steps_per_epoch is not None:
        steps_per_epoch = _positive("steps_per_epoch", steps_per_epoch)

    figure = _figure(figsize=(8.0, 4.5))
    ax = figure.subplots()
    if schedule is not None:
        last_step = max(last_step, math.ceil(schedule.end_epoch * steps_per_epoch))
        _shade_stages(ax, schedule, steps_per_epoch, last_step, label=True)
        xs = list(range(last_step + 1))
        target = [schedule.sparsity_at(s / steps_per_epoch) for s in xs]
    else:
        xs = [r["step"] for r in records]
        target = [r["target"] for r in records]
    ax.plot(
        xs, target, drawstyle="steps-post", color="black", linestyle="--", label="target sparsity"
    )
    names = list(dict.fromkeys(name for r in records for name in r["layers"]))
    few = len(names) <= _MAX_LEGEND_LAYERS  # beyond that a legend would hide the plot
    for name in names:
        points = [
            (r["step"], r["layers"][name]["achieved"]) for r in records if name in r["layers"]
        ]
        if points[-1][0] < reached:  # the sparsity holds until the next update
            points.append((reached, points[-1][1]))
        ax.plot(
            *zip(*points),
            drawstyle="steps-post",
            marker=".",
            linewidth=1,
            label=name if few else None,
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("achieved sparsity")
    ax.set_title(f"Sparsity per layer ({len(names)} layers)")
    ax.legend(loc="lower right", fontsize="small")
    if steps_per_epoch is not None:
        _epoch_axis(ax, steps_per_epoch)
    _save(figure, path)
    return figure
