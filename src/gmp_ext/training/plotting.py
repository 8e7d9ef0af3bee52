"""Plots of GMP schedules and of the sparsity a run actually reached.

matplotlib is an optional extra, imported only when a plot is requested. Figures are built on
the Agg canvas directly rather than through pyplot, so plotting works headless, never switches
the user's backend and leaves no figures registered in pyplot's global state.
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmp_ext.training.schedule import GMPSchedule, LRSteps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "STAGE_COLORS",
    "new_figure",
    "plot_schedule",
    "plot_sparsity_history",
    "plot_telemetry",
    "shade_stages",
]

# The one definition of the stage colours, so a stage looks the same in every figure (the
# demo's accuracy figure included); they avoid the blues and purples of the demo's curves.
STAGE_COLORS = {"stabilization": "tab:gray", "pruning": "tab:red", "fine-tuning": "tab:green"}
_MAX_NAMED_CURVES = 10  # beyond that a legend would hide the plot
_OUTLIERS = 5
_LEGEND_WIDTH = 36  # characters per line of a legend entry naming several layers
_HEAT_ROW_INCHES = 0.13  # room for one layer name per row
_COLORBAR_INCHES = 0.2
_SAME_CURVE = 0.005  # sparsities this close are one line on the plot (k is rounded per layer)
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
Curve = tuple[tuple[int, float], ...]  # (optimizer step, achieved sparsity) points


def new_figure(**kwargs: Any) -> Figure:
    """A figure on the Agg canvas with constrained layout; ImportError without matplotlib."""
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


def shade_stages(
    ax: Axes, schedule: GMPSchedule, last: float, *, per_epoch: float = 1.0, label: bool = True
) -> None:
    """Shade the schedule's stages from x = 0 to ``last``, x counting ``per_epoch`` units per
    epoch (1 for an epoch axis, the steps per epoch for an optimizer-step axis); ``label``
    names them in the legend."""
    bounds = (0.0, schedule.start_epoch * per_epoch, schedule.end_epoch * per_epoch)
    for (name, color), lo, hi in zip(STAGE_COLORS.items(), bounds, (*bounds[1:], last)):
        hi = min(hi, last)
        if hi > lo:
            ax.axvspan(lo, hi, color=color, alpha=0.15, linewidth=0, label=name if label else None)


def _epoch_axis(ax: Axes, steps_per_epoch: float) -> None:
    def to_epochs(steps: Any) -> Any:  # matplotlib passes floats and arrays
        return steps / steps_per_epoch

    def to_steps(epochs: Any) -> Any:
        return epochs * steps_per_epoch

    top = ax.secondary_xaxis("top", functions=(to_epochs, to_steps))
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

    figure = new_figure(figsize=(8.0, 6.0 if lrs is not None else 4.0))
    axes = figure.subplots(2 if lrs is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for i, panel in enumerate(axes):
        shade_stages(panel, schedule, steps, per_epoch=steps_per_epoch, label=i == 0)
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
    *,
    title: str | None = None,
) -> Figure:
    """Draw the sparsity each layer actually reached against optimizer step.

    ``records`` are the controller's history entries, ``{"epoch", "step", "target", "layers":
    {name: {"achieved", "threshold"}}}``. Without ``schedule`` the recorded targets are drawn;
    with it, the stages are shaded and the planned target curve is drawn through ``end_epoch``
    (``steps_per_epoch`` is then inferred from the records' step / epoch if not given).
    ``until_step`` extends the plot to that optimizer step (the run's current one), so the
    sparsity held during fine-tuning shows too. Before the first mask update (no records) the
    scheduled target is drawn alone, which needs ``schedule``.

    Layers whose curves coincide (same update steps, sparsities within 0.005) share one line
    and one legend entry naming them. Up to 10 such curves are drawn and named; beyond that,
    the median and range over the layers are drawn, with the 5 layers furthest from the median
    named. With more than 10 layers a heat map
    below, one named row per layer, shows every layer's sparsity. ``title`` replaces
    "Sparsity per layer" at the start of the title.
    """
    records = sorted(records, key=lambda record: record["step"])
    if not records and schedule is None:
        raise ValueError("records is empty and no schedule was given: there is nothing to plot")
    reached = max(records[-1]["step"] if records else 0, until_step or 0)
    if steps_per_epoch is None and schedule is not None:
        ratios = [r["step"] / r["epoch"] for r in records if r["epoch"] > 0]
        if not ratios:
            raise ValueError("pass steps_per_epoch: no record has an epoch > 0 to infer it from")
        steps_per_epoch = ratios[-1]
    elif steps_per_epoch is not None:
        steps_per_epoch = _positive("steps_per_epoch", steps_per_epoch)

    names = list(dict.fromkeys(name for r in records for name in r["layers"]))
    heat_map = len(names) > _MAX_NAMED_CURVES
    heat_height = _HEAT_ROW_INCHES * len(names) + 1.0
    figure = new_figure(figsize=(9.0, 4.5 + heat_height if heat_map else 4.5))
    if heat_map:
        ax, heat_ax = figure.subplots(
            2, 1, sharex=True, gridspec_kw={"height_ratios": [4.5, heat_height]}
        )
    else:
        ax = figure.subplots()
    last_step = reached
    if schedule is not None:
        assert steps_per_epoch is not None  # given, or inferred above
        last_step = max(last_step, math.ceil(schedule.end_epoch * steps_per_epoch))
        shade_stages(ax, schedule, last_step, per_epoch=steps_per_epoch)
        xs = list(range(last_step + 1))
        target = [schedule.sparsity_at(s / steps_per_epoch) for s in xs]
    else:
        xs = [r["step"] for r in records]
        target = [r["target"] for r in records]
    ax.plot(
        xs,
        target,
        drawstyle="steps-post",
        color="black",
        linestyle="--",
        linewidth=1,
        zorder=3,  # above the layers, which often lie exactly on it
        label="target sparsity",
    )
    grouped: list[tuple[Curve, list[str]]] = []  # (curve, layers drawn by it)
    for name in names:
        points = [
            (r["step"], r["layers"][name]["achieved"]) for r in records if name in r["layers"]
        ]
        if points[-1][0] < reached:  # the sparsity holds until the next update
            points.append((reached, points[-1][1]))
        for curve, members in grouped:
            if _coincide(curve, points):
                members.append(name)
                break
        else:
            grouped.append((tuple(points), [name]))
    if len(grouped) <= _MAX_NAMED_CURVES:
        named = grouped
    else:
        named = _draw_spread(ax, records, names, reached, grouped)
    for i, (drawn, members) in enumerate(named):
        ax.plot(
            *zip(*drawn),
            drawstyle="steps-post",
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=4,
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            linewidth=1.2,
            label=_group_label(members, len(names)),
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("achieved sparsity")
    heading = title or "Sparsity per layer"
    if records:
        ax.set_title(f"{heading} ({len(names)} layers)")
    else:
        ax.set_title(f"{heading}: no mask update yet (step {reached}), scheduled target only")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if heat_map:
        _draw_heat_map(figure, heat_ax, records, names, reached, heat_height)
        heat_ax.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    if steps_per_epoch is not None:
        _epoch_axis(ax, steps_per_epoch)
    _save(figure, path)
    return figure


def plot_telemetry(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Draw mask churn and regrowth of every mask update against optimizer step, the companion
    of :func:`plot_sparsity_history` (``records``: ``gmp.history``;
    :mod:`gmp_ext.training.telemetry` defines both).

    Top panel: churn, the mask bits an update changed over the weights the previous masks
    kept; bottom panel: regrowth, the previously pruned weights found non-zero at the update
    (a count). Each panel draws all layers together and, with up to 10 layers, every layer.
    A first update has neither, so it is not drawn; a ValueError says so when no record has
    them. ``title`` replaces "Mask churn and regrowth per update". Saves a PNG to ``path`` if
    given.
    """
    records = sorted(records, key=lambda record: record["step"])
    later = [r for r in records if r.get("churn") is not None or r.get("regrowth") is not None]
    if not later:
        raise ValueError(
            "no record has churn or regrowth: they compare two mask updates (pass gmp.history "
            "after the second update)"
        )
    names = list(dict.fromkeys(name for r in later for name in r["layers"]))
    figure = new_figure(figsize=(9.0, 6.0))
    churn_ax, regrowth_ax = figure.subplots(2, 1, sharex=True)
    panels = (
        (churn_ax, "churn", "mask churn\n(changed / kept before)"),
        (regrowth_ax, "regrowth", "regrowth\n(pruned weights non-zero)"),
    )
    for ax, metric, ylabel in panels:
        points = [(r["step"], r[metric]) for r in later if r.get(metric) is not None]
        if points:
            ax.plot(*zip(*points), color="black", marker="o", linewidth=2, label="all layers")
        for i, name in enumerate(names if len(names) <= _MAX_NAMED_CURVES else []):
            rows = [(r["step"], r["layers"].get(name, {}).get(metric)) for r in later]
            layer = [(step, value) for step, value in rows if value is not None]
            if layer:
                ax.plot(
                    *zip(*layer),
                    marker=_MARKERS[i % len(_MARKERS)],
                    markersize=3,
                    linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                    linewidth=1,
                    label=name,
                )
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
    churn_ax.set_title(f"{title or 'Mask churn and regrowth per update'} ({len(names)} layers)")
    churn_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    regrowth_ax.set_xlabel("optimizer step")
    _save(figure, path)
    return figure


def _coincide(curve: Curve, points: list[tuple[int, float]]) -> bool:
    """Same update steps and sparsities within half a percent: on the plot one line would hide
    the other, so they are drawn once and named together."""
    return len(curve) == len(points) and all(
        step == other_step and abs(value - other_value) <= _SAME_CURVE
        for (step, value), (other_step, other_value) in zip(curve, points)
    )


def _group_label(members: list[str], total: int) -> str:
    if len(members) == 1:
        return members[0]
    shown = members if len(members) <= 4 else [*members[:3], "...", members[-1]]
    every = "all " if len(members) == total else ""
    label = f"{every}{len(members)} layers (same curve): {', '.join(shown)}"
    return textwrap.fill(label, _LEGEND_WIDTH, break_long_words=False)


def _draw_spread(
    ax: Axes,
    records: list[Mapping[str, Any]],
    names: list[str],
    reached: int,
    groups: list[tuple[Curve, list[str]]],
) -> list[tuple[Curve, list[str]]]:
    """Median and range over the layers at each update; returns the groups of layers furthest
    from the median (mean absolute distance over their updates), to be drawn and named."""
    steps = [r["step"] for r in records]
    values = [[layer["achieved"] for layer in r["layers"].values()] for r in records]
    median = dict(zip(steps, map(statistics.median, values)))
    edge = [*steps, reached] if reached > steps[-1] else steps
    hold = [*values, values[-1]] if reached > steps[-1] else values
    ax.fill_between(
        edge,
        [min(v) for v in hold],
        [max(v) for v in hold],
        step="post",
        color="tab:blue",
        alpha=0.2,
        linewidth=0,
        label=f"range of the {len(names)} layers",
    )
    ax.plot(
        edge,
        [statistics.median(v) for v in hold],
        drawstyle="steps-post",
        color="tab:blue",
        linewidth=2,
        label=f"median of the {len(names)} layers",
    )

    def distance(points: Curve) -> float:
        recorded = [(step, value) for step, value in points if step in median]
        return statistics.fmean(abs(value - median[step]) for step, value in recorded)

    ranked = sorted(groups, key=lambda item: distance(item[0]), reverse=True)
    return [item for item in ranked[:_OUTLIERS] if distance(item[0]) > 0]


def _draw_heat_map(
    figure: Figure,
    ax: Axes,
    records: list[Mapping[str, Any]],
    names: list[str],
    reached: int,
    height: float,
) -> None:
    """One row per layer (first layer on top), one column per update, held until the next;
    ``height`` in inches keeps the colour bar slim however many rows there are."""
    import numpy as np

    steps = [r["step"] for r in records]
    edges = [*steps, max(reached, steps[-1] + 1)]
    sparsity = np.full((len(names), len(records)), np.nan)
    for column, record in enumerate(records):
        for row, name in enumerate(names):
            if name in record["layers"]:
                sparsity[row, column] = record["layers"][name]["achieved"]
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), sparsity, vmin=0.0, vmax=1.0)
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(names, fontsize=7 if len(names) <= 40 else 5)
    ax.set_ylim(len(names), 0)
    ax.set_ylabel("layer")
    figure.colorbar(mesh, ax=ax, label="achieved sparsity", aspect=height / _COLORBAR_INCHES)
