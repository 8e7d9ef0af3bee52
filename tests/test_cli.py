from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gmp_ext.app.cli import _parser, main

EXAMPLE_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "gmp_resnet.yaml"
RECIPE = """\
modifiers:
  - !GMPruningModifier
    init_sparsity: 0.05
    final_sparsity: 0.90
    start_epoch: 1
    end_epoch: 35
    update_frequency: 1
    inter_func: cubic
"""


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert stderr.startswith("gmp-ext: error: ")
    assert stderr.count("\n") == 1
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr


@pytest.fixture
def no_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the optional demo command as absent, whatever the checkout contains."""
    monkeypatch.setitem(sys.modules, "gmp_ext.app.demo", None)


@pytest.mark.usefixtures("no_demo")
def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gmp-ext")
    assert "info" in out
    assert "plot" in out
    assert "demo" not in out


@pytest.mark.usefixtures("no_demo")
def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: gmp-ext" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "gmp-ext: error: argument COMMAND: invalid choice" in err
    assert "frobnicate" in err


def test_info_calls_print_info(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = types.ModuleType("gmp_ext.app.info")
    info.print_info = lambda: print("gmp_ext 0.1.0 (fake)")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gmp_ext.app.info", info)
    assert main(["info"]) == 0
    assert capsys.readouterr().out == "gmp_ext 0.1.0 (fake)\n"


def test_info_import_failure_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gmp_ext.app.info", None)
    assert main(["info"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "gmp_ext.app.info")


def test_plot_writes_png_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "recipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "recipe_schedule.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert out.endswith("wrote recipe_schedule.png\n")
    assert "cubic interpolation, sparsity 0.05 -> 0.9" in out
    # no total_epochs in the recipe: end_epoch + 10% is shown
    assert "stabilization [0, 1), pruning [1, 35), fine-tuning [35, 38.5)" in out
    assert "target sparsity at the 35 update points" in out
    assert "      18: 0.7938" in out
    assert "      35: 0.9000" in out
    assert "learning rate" not in out


def test_plot_example_recipe_with_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out_path = tmp_path / "figs" / "resnet.png"
    argv = ["plot", str(EXAMPLE_RECIPE), "--out", str(out_path), "--steps-per-epoch", "7"]
    assert main([*argv, "--total-epochs", "60"]) == 0
    out = capsys.readouterr().out
    assert out_path.read_bytes().startswith(b"\x89PNG")
    assert "fine-tuning [35, 60)" in out
    assert "learning rate: 0.01, x0.1 at epochs: 43, 50" in out
    assert out.endswith(f"wrote {out_path}\n")


def test_plot_long_table_is_truncated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    recipe = tmp_path / "fine.yaml"
    recipe.write_text(
        "init_sparsity: 0\nfinal_sparsity: 0.5\nstart_epoch: 0\nend_epoch: 10\n"
        "update_frequency: 0.1\ntotal_epochs: 12\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(recipe), "--steps-per-epoch", "10"]) == 0
    out = capsys.readouterr().out
    assert "target sparsity at the 101 update points" in out
    assert "... 41 more ..." in out
    assert "     2.9: " in out
    assert "       3: " not in out
    assert "      10: 0.5000" in out
    assert "pruning [0, 10), fine-tuning [10, 12)" in out
    assert "stabilization" not in out


def test_plot_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nope.yaml")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "No such file", "nope.yaml")


def test_plot_invalid_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("0.05", "1.5"), encoding="utf-8")
    assert main(["plot", str(recipe)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "bad.yaml", "init_sparsity", "got 1.5")


def test_plot_invalid_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("init_sparsity: [\n", encoding="utf-8")
    assert main(["plot", str(recipe)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "invalid YAML")


def test_plot_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["plot", str(recipe), "--out", str(tmp_path / "x.png")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "plotting needs matplotlib")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "option", [["--steps-per-epoch", "0"], ["--steps-per-epoch", "2.5"], ["--total-epochs", "nan"]]
)
def test_plot_bad_options(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "recipe.yaml", *option]) == 2
    assert f"gmp-ext plot: error: argument {option[0]}" in capsys.readouterr().err


def test_demo_plugin_is_registered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = types.ModuleType("gmp_ext.app.demo", "Train a small model with GMP.\n\nMore text.")
    demo.__spec__ = importlib.machinery.ModuleSpec("gmp_ext.app.demo", None)
    demo.add_arguments = lambda parser: parser.add_argument("--epochs", type=int, default=1)  # type: ignore[attr-defined]
    demo.run = lambda args: print(f"demo for {args.epochs} epochs") or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gmp_ext.app.demo", demo)
    assert main(["--help"]) == 0
    assert "train a small model with GMP\n" in capsys.readouterr().out
    assert main(["demo", "--epochs", "3"]) == 0
    assert capsys.readouterr().out == "demo for 3 epochs\n"


class _BrokenDemoFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``gmp_ext.app.demo`` but fails to import it, like a missing optional dependency."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "gmp_ext.app.demo":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")


def test_broken_demo_does_not_break_other_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "gmp_ext.app.demo", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenDemoFinder(), *sys.meta_path])
    info = types.ModuleType("gmp_ext.app.info")
    info.print_info = lambda: print("info ok")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gmp_ext.app.info", info)
    assert main(["info"]) == 0
    assert capsys.readouterr().out == "info ok\n"
    assert main(["--help"]) == 0
    assert "(unavailable: No module named 'sklearn')" in capsys.readouterr().out
    assert main(["demo", "--epochs", "3"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "demo is unavailable", "sklearn")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from gmp_ext._version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gmp-ext {__version__}\n"


@pytest.mark.parametrize("command", [[], ["info"], ["plot"], ["demo"]])
def test_help_is_plain_text_with_every_option_explained(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if command == ["demo"]:
        pytest.importorskip("gmp_ext.app.demo")
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    for markup in ("`", "%%", "**", ":class:", ":func:"):
        assert markup not in text, markup
    parser, _ = _parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command[0]]  # type: ignore[union-attr]
    for action in parser._actions:
        assert action.help, action.option_strings or action.dest
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert "(default: " in action.help, action.option_strings


def test_demo_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gmp_ext.app.demo")
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR output directory (default: gmp_demo)" in text
    assert "--scope {layer,global} layer: every layer pruned to the target" in text
    assert "usage: gmp-ext demo" in text and "compare gradual magnitude pruning" in text


class _FakeNative:
    """The compiled module's driver-facing surface, for builds and machines not at hand."""

    def __init__(self, cuda: bool, driver_status: str = "ok") -> None:
        self._cuda = cuda
        self._driver_status = driver_status

    def build_info(self) -> dict[str, Any]:
        return {
            "openmp": True,
            "cuda": self._cuda,
            "cuda_architectures": "90" if self._cuda else "",
            "cuda_compiler_version": "12.4" if self._cuda else "",
        }

    def cuda_device_count(self) -> int:
        return 1 if self._driver_status == "ok" else -1

    def cuda_driver_status(self) -> str:
        return self._driver_status


INSUFFICIENT = "CUDA driver version is insufficient for CUDA runtime version"


@pytest.mark.parametrize(
    ("native", "driver_found", "kernels", "driver"),
    [
        # nvcc at build time, no driver on this machine: the runtime's "insufficient" is wrong
        (_FakeNative(True, INSUFFICIENT), False, "yes (CUDA 12.4)", "no NVIDIA driver found"),
        # a driver older than the CUDA runtime: the runtime's message is the right one
        (_FakeNative(True, INSUFFICIENT), True, "yes (CUDA 12.4)", INSUFFICIENT),
        (_FakeNative(True), True, "yes (CUDA 12.4)", "ok"),
        (_FakeNative(False), False, "no: CPU-only build", "not used by this build (no NVIDIA"),
        (_FakeNative(False), True, "no: CPU-only build", "not used by this build (NVIDIA"),
    ],
)
def test_info_driver_status(
    monkeypatch: pytest.MonkeyPatch,
    native: _FakeNative,
    driver_found: bool,
    kernels: str,
    driver: str,
) -> None:
    from gmp_ext.app import info
    from gmp_ext.kernels import backends

    monkeypatch.setattr(backends, "native", lambda: native)
    monkeypatch.setattr(info, "nvidia_driver_found", lambda: driver_found)
    collected = info.collect()
    assert str(collected["CUDA kernels compiled"]).startswith(kernels)
    assert str(collected["CUDA driver"]).startswith(driver)
    assert "insufficient" not in str(collected["CUDA driver"]) or driver_found


@pytest.mark.parametrize("loads", [True, False])
def test_nvidia_driver_found_loads_libcuda(monkeypatch: pytest.MonkeyPatch, loads: bool) -> None:
    from gmp_ext.app import info

    tried = []

    def cdll(name: str) -> object:
        tried.append(name)
        if not loads:
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(info.ctypes, "CDLL", cdll)
    assert info.nvidia_driver_found() is loads
    assert tried == ["nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"]
