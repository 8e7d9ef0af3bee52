from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from gmp_ext.training.plotting import (
    STAGE_COLORS,
    plot_schedule,
    plot_sparsity_history,
    plot_telemetry,
)
from gmp_ext.training.schedule import GMPSchedule, LRSteps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEDULE = GMPSchedule(0.05, 0.90, 1, 35, 1.0, "cubic")
STAGES = {"stabilization", "pruning", "fine-tuning"}


def _line(ax: Any, label: str) -> Any:
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


def _legend(ax: Any) -> set[str]:
    return {text.get_text() for text in ax.get_legend().get_texts()}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_plot_schedule_sparsity_per_step(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "schedule.png"
    figure = plot_schedule(SCHEDULE, 40, 10, path=path)
    assert isinstance(figure.canvas, FigureCanvasAgg)
    (ax,) = figure.axes
    line = _line(ax, "target sparsity")
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    assert xs == list(range(401))
    assert ys[:10] == [0.0] * 10
    for epoch in SCHEDULE.update_points():
        step = round(epoch * 10)
        assert ys[step] == SCHEDULE.sparsity_at(epoch)
        assert ys[step + 9] == ys[step]  # held until the next update
    assert ys[-1] == 0.9
    assert _legend(ax) >= STAGES
    assert [child.get_xlabel() for child in ax.child_axes] == ["epoch"]
    _assert_png(path)


def test_plot_schedule_without_stabilization_stage() -> None:
    schedule = GMPSchedule(0.0, 0.5, 0, 3, 1.0, "linear")
    figure = plot_schedule(schedule, 3, 4)
    assert _legend(figure.axes[0]) == {"pruning", "target sparsity"}


def test_plot_schedule_with_lr_steps() -> None:
    lr = LRSteps(0.01, (43, 50), 0.1)
    figure = plot_schedule(SCHEDULE, 55, 5, lr=lr)
    sparsity_ax, lr_ax = figure.axes
    assert sparsity_ax.get_shared_x_axes().joined(sparsity_ax, lr_ax)
    ys = list(_line(lr_ax, "learning rate").get_ydata())
    assert len(ys) == 55 * 5 + 1
    assert ys == [lr.lr_at(step / 5) for step in range(len(ys))]
    assert ys[43 * 5 - 1] == 0.01
    assert ys[43 * 5] == pytest.approx(0.001)
    assert lr_ax.get_yscale() == "log"
    assert lr_ax.get_xlabel() == "optimizer step"


def test_plot_schedule_with_lr_callable() -> None:
    figure = plot_schedule(SCHEDULE, 40, 2, lr=lambda epoch: 0.1 * (1 - epoch / 80))
    ys = list(_line(figure.axes[1], "learning rate").get_ydata())
    assert ys[0] == 0.1
    assert ys[-1] == pytest.approx(0.05)
    assert figure.axes[1].get_yscale() == "linear"


@pytest.mark.parametrize(
    ("per_step", "expected"),
    [
        # stepped per epoch: milestones count epochs, so the decay lands at step 2 * 3 = 6
        (False, [0.5] * 6 + [0.05] * 3),
        # stepped per optimizer step: milestones count steps
        (True, [0.5, 0.5, 0.05, 0.05, 0.05, 0.005, 0.005, 0.005, 0.005]),
    ],
)
def test_plot_schedule_with_lr_scheduler_factory(per_step: bool, expected: list[float]) -> None:
    torch = pytest.importorskip("torch")

    def factory(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 5], gamma=0.1)

    schedule = GMPSchedule(0.0, 0.5, 0, 2)
    figure = plot_schedule(
        schedule, 8 / 3, 3, lr_scheduler=factory, base_lr=0.5, lr_per_step=per_step
    )
    ys = list(_line(figure.axes[1], "learning rate").get_ydata())
    assert ys == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_epochs": 0}, "total_epochs must be a finite number > 0, got 0"),
        ({"total_epochs": float("nan")}, "total_epochs"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch must be an integer > 0, got 2.5"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"steps_per_epoch": True}, "steps_per_epoch"),
        ({"lr": LRSteps(0.1), "lr_scheduler": lambda opt: None}, "not both"),
        ({"lr_scheduler": lambda opt: None, "base_lr": -1}, "base_lr must be"),
    ],
)
def test_plot_schedule_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"total_epochs": 40, "steps_per_epoch": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        plot_schedule(SCHEDULE, **arguments)


def _records(steps_per_epoch: int = 4) -> list[dict[str, Any]]:
    records = []
    for step in (8, 0, 4, 12):  # unordered on purpose
        epoch = step / steps_per_epoch
        target = SCHEDULE.sparsity_at(epoch)
        layers = {"conv1": {"achieved": target, "threshold": 0.1 * step}}
        if step >= 4:  # a layer registered later only appears in later records
            layers["fc"] = {"achieved": target * 0.9, "threshold": 0.2}
        records.append({"epoch": epoch, "step": step, "target": target, "layers": layers})
    return records


def test_plot_sparsity_history_from_records(tmp_path: Path) -> None:
    path = tmp_path / "history.png"
    figure = plot_sparsity_history(_records(), path=path)
    (ax,) = figure.axes
    target = _line(ax, "target sparsity")
    assert list(target.get_xdata()) == [0, 4, 8, 12]
    assert list(target.get_ydata()) == [SCHEDULE.sparsity_at(s / 4) for s in (0, 4, 8, 12)]
    conv = _line(ax, "conv1")
    assert list(conv.get_xdata()) == [0, 4, 8, 12]
    fc = _line(ax, "fc")
    assert list(fc.get_xdata()) == [4, 8, 12]
    assert list(fc.get_ydata()) == pytest.approx(
        [SCHEDULE.sparsity_at(s / 4) * 0.9 for s in (4, 8, 12)]
    )
    assert ax.child_axes == []  # no steps_per_epoch: no epoch axis
    _assert_png(path)


def test_plot_sparsity_history_with_schedule() -> None:
    figure = plot_sparsity_history(_records(), schedule=SCHEDULE)
    (ax,) = figure.axes
    target = _line(ax, "target sparsity")
    xs, ys = list(target.get_xdata()), list(target.get_ydata())
    assert xs == list(range(35 * 4 + 1))  # steps_per_epoch inferred, drawn through end_epoch
    assert ys == [SCHEDULE.sparsity_at(s / 4) for s in xs]
    # nothing recorded after end_epoch, so there is no fine-tuning span to shade
    assert _legend(ax) == {"stabilization", "pruning", "target sparsity", "conv1", "fc"}
    assert [child.get_xlabel() for child in ax.child_axes] == ["epoch"]


def test_plot_sparsity_history_until_step_shows_fine_tuning() -> None:
    figure = plot_sparsity_history(_records(), schedule=SCHEDULE, until_step=50 * 4)
    (ax,) = figure.axes
    assert list(_line(ax, "target sparsity").get_xdata()) == list(range(50 * 4 + 1))
    conv = _line(ax, "conv1")
    assert list(conv.get_xdata()) == [0, 4, 8, 12, 200]  # held from the last update
    assert conv.get_ydata()[-1] == conv.get_ydata()[-2]
    assert "fine-tuning" in _legend(ax)


def test_plot_sparsity_history_groups_coinciding_layers() -> None:
    # Layers pruned to the same target differ only by rounding k = round(s * n) per layer:
    # drawn separately they would hide each other, so they share one named line.
    layers = {f"layer{i}": {"achieved": 0.5 + 0.0005 * i, "threshold": 0.0} for i in range(9)}
    layers["odd"] = {"achieved": 0.25, "threshold": 0.0}
    records = [{"epoch": 1.0, "step": 10, "target": 0.5, "layers": layers}]
    (ax,) = plot_sparsity_history(records).axes
    label = "9 layers (same curve): layer0, layer1, layer2, ..., layer8"
    assert _legend(ax) == {"target sparsity", textwrap.fill(label, 36), "odd"}
    assert len(ax.get_lines()) == 3
    assert ax.get_title() == "Sparsity per layer (10 layers)"


def test_plot_sparsity_history_identical_layers_named_together() -> None:
    layers = {name: {"achieved": 0.3, "threshold": 0.0} for name in ("conv", "fc")}
    records = [{"epoch": 1.0, "step": 4, "target": 0.3, "layers": layers}]
    figure = plot_sparsity_history(records, until_step=8, title="digits: GMP to 0.3, seed 1")
    (ax,) = figure.axes
    line = _line(ax, "all 2 layers (same curve): conv, fc")
    assert list(line.get_xdata()) == [4, 8]
    assert line.get_marker() != "None"  # the points show even where the target line lies on top
    assert ax.get_title() == "digits: GMP to 0.3, seed 1 (2 layers)"


def _hundred_layer_history() -> tuple[list[str], list[dict[str, Any]]]:
    """A global-scope-like run: 98 layers near the median, a classifier pruned far less and an
    embedding pruned more."""
    names = [f"blocks.{i}.weight" for i in range(98)] + ["embed.weight", "classifier.weight"]
    records = []
    for epoch in range(1, 11):
        target = SCHEDULE.sparsity_at(epoch)
        achieved = {name: target * (0.9 + 0.002 * i) for i, name in enumerate(names)}
        achieved["classifier.weight"] = 0.4 * target
        achieved["embed.weight"] = min(1.0, 1.1 * target)
        layers = {n: {"achieved": a, "threshold": 0.0} for n, a in achieved.items()}
        records.append(
            {"epoch": float(epoch), "step": 4 * epoch, "target": target, "layers": layers}
        )
    return names, records


def test_plot_sparsity_history_hundred_layers(tmp_path: Path) -> None:
    names, records = _hundred_layer_history()
    path = tmp_path / "many.png"
    figure = plot_sparsity_history(
        records, path, schedule=SCHEDULE, until_step=200, title="synthetic, seed 0, global"
    )
    ax, heat_ax, colorbar_ax = figure.axes
    legend = _legend(ax)
    assert {"classifier.weight", "embed.weight"} <= legend  # the outliers are named
    assert {"median of the 100 layers", "range of the 100 layers", "target sparsity"} <= legend
    assert legend >= STAGES
    assert len(legend) <= 3 + 2 + 3 + 5  # stages, median and range, target, 5 outliers
    assert ax.get_title() == "synthetic, seed 0, global (100 layers)"
    # The heat map names every layer, in model order, first on top.
    assert [label.get_text() for label in heat_ax.get_yticklabels()] == names
    assert heat_ax.get_ylim() == (100, 0)
    (mesh,) = heat_ax.collections
    values = mesh.get_array().reshape(100, 10)
    assert values[99, 9] == pytest.approx(0.4 * SCHEDULE.sparsity_at(10))
    assert heat_ax.get_xlabel() == "optimizer step"
    assert colorbar_ax.get_ylabel() == "achieved sparsity"
    _assert_png(path)


def test_plot_sparsity_history_without_records_draws_the_schedule() -> None:
    # GMP.plot() before the first mask update: the plan alone, said so in the title.
    figure = plot_sparsity_history([], schedule=SCHEDULE, steps_per_epoch=4, until_step=3)
    (ax,) = figure.axes
    target = _line(ax, "target sparsity")
    assert list(target.get_xdata()) == list(range(35 * 4 + 1))
    assert list(target.get_ydata()) == [SCHEDULE.sparsity_at(s / 4) for s in range(35 * 4 + 1)]
    assert ax.get_title() == (
        "Sparsity per layer: no mask update yet (step 3), scheduled target only"
    )
    assert _legend(ax) == {"stabilization", "pruning", "target sparsity"}


def test_stage_colours_are_one_definition() -> None:
    figures = [
        plot_schedule(SCHEDULE, 40, 2),
        plot_sparsity_history(_records(), schedule=SCHEDULE, until_step=160),
    ]
    for figure in figures:
        ax = figure.axes[0]
        spans = {
            patch.get_label(): patch.get_facecolor()
            for patch in ax.patches
            if patch.get_label() in STAGES
        }
        assert spans == {name: to_rgba(STAGE_COLORS[name], 0.15) for name in STAGES}


def test_plot_sparsity_history_errors() -> None:
    with pytest.raises(ValueError, match="records is empty and no schedule was given"):
        plot_sparsity_history([])
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        plot_sparsity_history([], schedule=SCHEDULE)
    records = [{"epoch": 0.0, "step": 0, "target": 0.0, "layers": {}}]
    with pytest.raises(ValueError, match="pass steps_per_epoch"):
        plot_sparsity_history(records, schedule=SCHEDULE)
    with pytest.raises(ValueError, match="steps_per_epoch must be"):
        plot_sparsity_history(records, steps_per_epoch=0)


def test_missing_matplotlib_is_reported_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(
        ImportError, match=r"plotting needs matplotlib: pip install 'gmp_ext\[plot\]'"
    ):
        plot_schedule(SCHEDULE, 40, 10)
    with pytest.raises(ImportError, match="plotting needs matplotlib"):
        plot_sparsity_history(_records())


def _telemetry_records(layers: int) -> list[dict[str, Any]]:
    records = []
    for i, step in enumerate((0, 4, 8, 12)):
        first = i == 0
        rows = {
            f"layer{j}": {
                "achieved": 0.2 * i,
                "churn": None if first else 0.1 * i + 0.01 * j,
                "regrowth": None if first else 10 * i + j,
            }
            for j in range(layers)
        }
        records.append(
            {
                "step": step,
                "epoch": step / 4,
                "target": 0.2 * i,
                "churn": None if first else 0.1 * i,
                "regrowth": None if first else 10 * i * layers,
                "layers": rows,
            }
        )
    return records


def test_plot_telemetry_draws_churn_and_regrowth_per_update(tmp_path):
    records = _telemetry_records(3)
    path = tmp_path / "telemetry.png"
    figure = plot_telemetry(records[::-1], path, title="run")  # any order
    assert path.read_bytes()[:8] == PNG_MAGIC
    churn_ax, regrowth_ax = figure.axes
    total = _line(churn_ax, "all layers")
    assert list(total.get_xdata()) == [4, 8, 12]  # the first update has no churn
    assert list(total.get_ydata()) == [r["churn"] for r in records[1:]]
    assert list(_line(regrowth_ax, "all layers").get_ydata()) == [30, 60, 90]
    assert list(_line(regrowth_ax, "layer2").get_ydata()) == [12, 22, 32]
    assert churn_ax.get_title() == "run (3 layers)"
    assert _legend(churn_ax) == {"all layers", "layer0", "layer1", "layer2"}
    assert regrowth_ax.get_xlabel() == "optimizer step"


def test_plot_telemetry_many_layers_draws_the_totals():
    figure = plot_telemetry(_telemetry_records(12))
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["all layers"]


def test_plot_telemetry_needs_two_updates():
    with pytest.raises(ValueError, match="no record has churn or regrowth"):
        plot_telemetry(_telemetry_records(2)[:1])
