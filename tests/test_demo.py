"""`gmp-ext demo --quick` end to end, and its one-line errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from gmp_ext.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--quick", "--out", str(out), "--sparsity", "0.9"])
    return code, out


def test_quick_demo_runs_and_reports(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["summary"]} == {"gmp", "oneshot_ft", "oneshot"}
    assert "| GMP (gradual) | 0.9 | 0.9000 |" in (out / "summary.md").read_text()
    for name in ("sparsity_per_layer.png", "schedule_lr.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in results["runs"]:
        assert abs(run["achieved"] - run["target"]) <= 0.005, run["arm"]
        assert 0.0 <= run["accuracy"] <= 1.0
    dense = next(iter(results["dense_accuracy"].values()))
    assert dense > 0.9, "the dense model must have learned the digits"


def test_quick_demo_masks_match_weights(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        state = torch.load(out / run["checkpoint"], weights_only=True)
        for name, layer in run["layers"].items():
            weight = state[name]
            kept = np.packbits((weight != 0).reshape(-1).numpy(), bitorder="little")
            assert hashlib.sha256(kept.tobytes()).hexdigest() == layer["mask_sha256"], name
            assert layer["zeros"] == round(run["target"] * weight.numel()), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sparsity", "1.5"], "--sparsity values must be in (0, 1), got 1.5"),
        (["--sparsity", "0"], "got 0"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "2"], "--epochs must be >= 4"),
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
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install '.[demo]'" in err and "scikit-learn" in err
