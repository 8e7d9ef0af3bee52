"""`gmp-ext demo --quick` end to end on both datasets, its report, figures and one-line errors."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from matplotlib.colors import to_rgba

from gmp_ext.app import demo
from gmp_ext.app.cli import main
from gmp_ext.training.plotting import STAGE_COLORS

FASHION_MNIST = demo.fashion_mnist_dir(None)
FASHION_MNIST_ABSENT = not all(
    (FASHION_MNIST / name).is_file() for pair in demo.FASHION_MNIST_FILES.values() for name in pair
)


def _run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured in files, not terminals, as in a CI log (real
    files: an editable install's rebuild hook writes to their descriptors)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = _run(["demo", "--quick", "--out", str(out), "--sparsity", "0.9"])
    return code, out, stdout, stderr


def _budget(config: dict) -> demo.RunBudget:
    return demo.RunBudget(
        dense_epochs=config["dense_epochs"],
        epochs=config["epochs"],
        start_epoch=config["start_epoch"],
        end_epoch=config["end_epoch"],
        update_frequency=config["update_frequency"],
        lr_milestones=tuple(config["lr_milestones"]),
        curve_points=len(config["curve_epochs"]),
    )


def test_quick_demo_runs_and_reports(quick_run):
    code, out, _, _ = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["summary"]} == {"gmp", "oneshot_ft", "oneshot"}
    assert "| GMP (gradual) | 0.9 | 0.9000 |" in (out / "summary.md").read_text()
    assert results["figures"] == [
        "sparsity_per_layer_0.9.png",
        "telemetry_0.9.png",
        "schedule_lr.png",
        "accuracy.png",
    ]
    for name in results["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in results["runs"]:
        assert abs(run["achieved"] - run["target"]) <= 0.005, run["arm"]
        assert 0.0 <= run["accuracy"] <= 1.0
        assert len(run["curve"]) == (0 if run["arm"] == "oneshot" else 12)
    dense = next(iter(results["dense_accuracy"].values()))
    assert dense > 0.9, "the dense model must have learned the digits"
    assert results["config"]["data"] == "digits"
    assert results["config"]["prunable_weights"] == 16 * 9 + 32 * 16 * 9 + 512 * 64 + 640


def test_quick_demo_masks_match_weights(quick_run):
    _, out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        state = torch.load(out / run["checkpoint"], weights_only=True)
        for name, layer in run["layers"].items():
            weight = state[name]
            kept = np.packbits((weight != 0).reshape(-1).numpy(), bitorder="little")
            assert hashlib.sha256(kept.tobytes()).hexdigest() == layer["mask_sha256"], name
            assert layer["zeros"] == round(run["target"] * weight.numel()), name


def test_one_seed_gives_numbers_not_a_verdict(quick_run):
    _, out, stdout, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    gmp, oneshot_ft = (
        next(r for r in results["summary"] if r["arm"] == arm) for arm in ("gmp", "oneshot_ft")
    )
    expected = (
        f"sparsity 0.9: GMP {100 * gmp['accuracy_mean']:.2f}%, one-shot + fine-tune "
        f"{100 * oneshot_ft['accuracy_mean']:.2f}% from one seed (a verdict needs --seeds 2 or "
        "more)"
    )
    assert results["verdicts"] == [expected]
    assert expected in stdout.splitlines()
    summary = (out / "summary.md").read_text()
    assert f"- {expected}" in summary
    assert "test accuracy (1 seed)" in summary
    for text in (stdout, summary):
        assert "wins" not in text and "matches" not in text and "±" not in text
    assert gmp["accuracy_std"] is None


def test_verdicts_with_a_spread():
    def row(arm, target, mean, std):
        return {"arm": arm, "target": target, "accuracy_mean": mean, "accuracy_std": std}

    rows = [
        row("gmp", 0.9, 0.950, 0.010),
        row("oneshot_ft", 0.9, 0.945, 0.004),
        row("gmp", 0.98, 0.90, 0.02),
        row("oneshot_ft", 0.98, 0.80, 0.05),
        row("gmp", 0.99, 0.50, 0.01),
        row("oneshot_ft", 0.99, 0.60, 0.02),
    ]
    assert demo.verdicts(rows) == [
        "sparsity 0.9: one-shot + fine-tune matches GMP (difference within the seed spread)",
        "sparsity 0.98: GMP wins by 10.0 points",
        "sparsity 0.99: one-shot + fine-tune wins by 10.0 points",
    ]


def test_table_and_summary_show_the_spread_over_seeds():
    runs = [
        {"arm": arm, "target": 0.9, "seed": seed, "accuracy": acc, "achieved": 0.9, "wall_s": 1.0}
        for arm, accs in (
            ("gmp", (0.96, 0.94)),
            ("oneshot_ft", (0.90, 0.92)),
            ("oneshot", (0.5, 0.3)),
        )
        for seed, acc in enumerate(accs)
    ]
    dense = {0: 0.99, 1: 0.97}
    rows = demo.summarize(runs, dense)
    assert rows[0]["accuracy_std"] == pytest.approx(0.0141421, rel=1e-5)
    table = demo.format_table(rows, dense).splitlines()
    assert table[0] == "dense: 98.00 ± 1.41% test accuracy"
    assert "95.00 ± 1.41%" in table[2] and "+3.00" in table[2]
    results = {
        "command": "gmp-ext demo --seeds 2",
        "config": {"data": "digits", "seeds": 2, "epochs": 30},
        "threads": 1,
        "wall_s": 12.0,
        "versions": {"gmp_ext": "0.1.0", "torch": "2.13.0"},
        "dense_accuracy": dense,
        "summary": rows,
        "verdicts": demo.verdicts(rows),
    }
    summary = demo.markdown_summary(results)
    assert "| arm | target | achieved | test accuracy (mean ± std) |" in summary
    assert "| GMP (gradual) | 0.9 | 0.9000 | 95.00 ± 1.41% | +3.00 |" in summary
    assert "- sparsity 0.9: GMP wins by 4.0 points" in summary


def test_log_gets_lines_not_progress_bars(quick_run):
    _, _, _, stderr = quick_run
    assert "\r" not in stderr
    lines = stderr.splitlines()
    for job in ("dense seed 0", "gmp s=0.9 seed 0", "oneshot_ft s=0.9 seed 0"):
        assert sum(line.startswith(f"{job}: done in ") for line in lines) == 1, job


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_progress_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with demo._progress(3, "gmp s=0.9 seed 0") as bar:
        assert not bar.disable
        bar.update(3)
    assert "gmp s=0.9 seed 0" in terminal.getvalue()
    assert "done in" not in terminal.getvalue()


def test_accuracy_figure_labels_and_stage_colours(quick_run):
    _, out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    dense = {int(seed): acc for seed, acc in results["dense_accuracy"].items()}
    figure = demo.plot_accuracy(results["runs"], _budget(results["config"]), dense, "digits")
    (ax,) = figure.axes
    assert ax.get_title() == "digits: target sparsity 0.9\nmean of 1 seed"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [*STAGE_COLORS, *demo.ARM_LABELS.values(), "dense"]
    spans = {p.get_label(): p.get_facecolor() for p in ax.patches if p.get_label() in STAGE_COLORS}
    assert spans == {name: to_rgba(color, 0.15) for name, color in STAGE_COLORS.items()}


def test_per_layer_figure_says_target_and_seed(quick_run, tmp_path, monkeypatch):
    from gmp_ext.training import plotting

    _, out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    figures = []

    def keep(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    original = plotting.plot_sparsity_history
    monkeypatch.setattr(plotting, "plot_sparsity_history", keep)
    dense = {int(seed): acc for seed, acc in results["dense_accuracy"].items()}
    budget = _budget(results["config"])
    demo.write_figures(results["runs"], budget, dense, tmp_path, "digits", "layer")
    (figure,) = figures
    ax = figure.axes[0]
    assert ax.get_title() == "digits: GMP to sparsity 0.9, seed 0 of 1, layer scope (4 layers)"
    legend = {text.get_text() for text in ax.get_legend().get_texts()}
    # layer scope: every layer on the target, drawn once and named together
    assert "all 4 layers (same curve): 0.weight,\n2.weight, 6.weight, 8.weight" in legend


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def tiny_fashion_mnist(tmp_path) -> Path:
    """Idx files in Fashion-MNIST's layout: 640 training and 200 test images whose class is
    the row their bright stripe is on, so there is something to learn."""
    directory = tmp_path / "fashion"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 640), ("test", 200)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28))
        images[np.arange(count), 2 + 2 * labels] = 255
        images_name, labels_name = demo.FASHION_MNIST_FILES[split]
        _write_idx(directory / images_name, images)
        _write_idx(directory / labels_name, labels)
    return directory


def test_fashion_mnist_from_data_dir(tiny_fashion_mnist, tmp_path):
    out = tmp_path / "out"
    argv = ["demo", "--data", "fashion-mnist", "--data-dir", str(tiny_fashion_mnist)]
    code, _, _ = _run([*argv, "--quick", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["data"] == "fashion-mnist"
    assert (config["train_size"], config["test_size"]) == (640, 200)
    assert config["prunable_weights"] == 16 * 25 + 32 * 16 * 25 + 1568 * 128 + 1280
    assert (config["epochs"], config["dense_epochs"], config["batch"]) == (1, 1, 128)
    assert results["command"].startswith(
        f"gmp-ext demo --data fashion-mnist --data-dir {tiny_fashion_mnist} --sparsity 0.9"
    )
    for run in results["runs"]:
        assert abs(run["achieved"] - 0.9) <= 0.005, run["arm"]
    gmp = next(r for r in results["runs"] if r["arm"] == "gmp")
    assert len(gmp["history"]) >= 2, "the quick schedule still prunes in several steps"
    assert (out / "accuracy.png").is_file()


def test_fashion_mnist_dir_from_environment(tiny_fashion_mnist, monkeypatch):
    monkeypatch.setenv(demo.FASHION_MNIST_ENV, str(tiny_fashion_mnist))
    assert demo.fashion_mnist_dir(None) == tiny_fashion_mnist
    assert demo.fashion_mnist_dir(Path("/elsewhere")) == Path("/elsewhere")
    monkeypatch.delenv(demo.FASHION_MNIST_ENV)
    assert demo.fashion_mnist_dir(None) == Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("via", ["--data-dir", "environment"])
def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch, via):
    missing = tmp_path / "nowhere"
    argv = ["demo", "--data", "fashion-mnist", "--quick", "--out", str(tmp_path / "out")]
    if via == "--data-dir":
        argv += ["--data-dir", str(missing)]
    else:
        monkeypatch.setenv(demo.FASHION_MNIST_ENV, str(missing))
    code, _, err = _run(argv)
    assert code == 2
    assert err == (
        f"gmp-ext: error: Fashion-MNIST not found: no train-images-idx3-ubyte.gz in {missing}; "
        "install the Debian package dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist) or point --data-dir or $GMP_EXT_FASHION_MNIST_DIR at its idx "
        "files\n"
    )


def test_fashion_mnist_corrupt_file_is_one_line(tiny_fashion_mnist, tmp_path):
    labels = tiny_fashion_mnist / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))  # float32 idx, not bytes
    argv = ["demo", "--data", "fashion-mnist", "--data-dir", str(tiny_fashion_mnist)]
    code, _, err = _run([*argv, "--quick", "--out", str(tmp_path / "out")])
    assert code == 2
    assert err.startswith("gmp-ext: error: ") and err.count("\n") == 1
    assert f"{labels} is not an idx file of unsigned bytes (header 00000d01)" in err


@pytest.mark.skipif(
    FASHION_MNIST_ABSENT,
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST}: apt-get install "
    "dataset-fashion-mnist, or set GMP_EXT_FASHION_MNIST_DIR",
)
def test_fashion_mnist_quick_demo(tmp_path):
    code, stdout, _ = _run(["demo", "--data", "fashion-mnist", "--quick", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["config"]["train_size"], results["config"]["test_size"]) == (10_000, 2_000)
    assert results["dense_accuracy"]["0"] > 0.6, "one epoch on 10k images must learn something"
    for run in results["runs"]:
        for name, layer in run["layers"].items():
            assert layer["zeros"] == round(0.9 * layer["numel"]), (run["arm"], name)
    assert "a verdict needs --seeds 2 or more" in stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sparsity", "1.5"], "--sparsity values must be in (0, 1), got 1.5"),
        (["--sparsity", "0"], "got 0"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "2"], "--epochs must be >= 4 for --data digits"),
        (["--data", "fashion-mnist", "--epochs", "0"], "--epochs must be >= 1 for --data fashion"),
        (["--data-dir", "/tmp"], "--data-dir applies to --data fashion-mnist only"),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmp-ext: error:")
    assert message in err
    assert len(err.splitlines()) == 1


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_missing_dependency(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install '.[demo]'" in err and "scikit-learn" in err
