"""benchmarks/gpu_session.sh cannot pass empty: its preflight, run where there is no GPU.

The preflight stage builds nothing: it checks nvcc, Python.h, the build tools, torch's CUDA
device, and stops with exit 3 and the reason on one line (stdout and $OUT/summary.txt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
BASH = shutil.which("bash")

# What a GPU session running these tests (stage build-test) would pass down.
SESSION_VARIABLES = {
    "DEVICE",
    "STAGE_SECONDS",
    "CUDACXX",
    "GMP_EXT_CPU_ONLY",
    "GMP_EXT_CUDA_ARCHS",
    "PYTHON",
    "TARGET_MODELS",
    "MODELS",
    "TESTS_SECONDS",
    "BENCH_ARGS",
    "PYTEST_STOP",
}

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not found: gpu_session.sh needs it")


def run_session(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    inherited = {k: v for k, v in os.environ.items() if k not in SESSION_VARIABLES}
    environment = {
        **inherited,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        **env,
    }
    start = time.monotonic()
    result = subprocess.run(
        [BASH, str(SCRIPT), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - start


def failure_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("FAILED at preflight: ")]
    assert lines, text
    return lines[0]


def test_script_syntax():
    result = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_stage_is_refused(tmp_path):
    result, _ = run_session(tmp_path, "no-such-stage")
    assert result.returncode == 2
    assert "usage" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_preflight_without_a_gpu_fails_fast_with_one_line(tmp_path):
    result, seconds = run_session(tmp_path, "preflight")
    assert seconds < 30, seconds
    assert result.returncode == 3, result.stdout + result.stderr
    line = failure_line(result.stdout)
    assert "no CUDA device" in line
    assert "torch.cuda.is_available() is False" in line
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert line in summary.splitlines()
    assert summary.splitlines()[1] == line  # under the header: the first thing read
    # The preflight builds nothing.
    assert not (tmp_path / "work" / "build.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_the_session_stops_before_the_build_without_a_gpu(tmp_path):
    # The fault this guards against: the session ran 160 s here and exited 0 with no GPU row.
    guard = tmp_path / "python_without_pip"  # should the preflight pass, nothing is installed
    guard.write_text(
        f"#!{BASH}\n"
        'for a in "$@"; do [[ "$a" == pip ]] && { echo "pip refused" >&2; exit 99; }; done\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    guard.chmod(0o755)
    result, seconds = run_session(tmp_path, "session", PYTHON=str(guard))
    assert seconds < 30, seconds
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no CUDA device" in failure_line(result.stdout)
    assert not (tmp_path / "work" / "build.log").exists()
    assert "pip refused" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_preflight_names_every_problem(tmp_path):
    result, _ = run_session(
        tmp_path, "preflight", GMP_EXT_CPU_ONLY="ON", CUDACXX=str(tmp_path / "no-nvcc")
    )
    assert result.returncode == 3
    line = failure_line(result.stdout)
    assert line.index("no CUDA device") < line.index("GMP_EXT_CPU_ONLY=ON is set")
    assert "CUDACXX=" in line and "is not executable" in line


def test_preflight_reports_a_missing_python_h(tmp_path):
    # A python whose sysconfig names an include folder without Python.h.
    wrapper = tmp_path / "python_without_headers"
    wrapper.write_text(
        f"#!{BASH}\n"
        f'exec "{sys.executable}" -c \'\n'
        "import sys, sysconfig\n"
        "paths = sysconfig.get_paths\n"
        'sysconfig.get_paths = lambda *a, **k: {**paths(*a, **k), "include": "/nonexistent"}\n'
        "sys.argv = sys.argv[1:]\n"
        'exec(compile(sys.stdin.read(), "<stdin>", "exec"))\n'
        '\' "$@"\n'
    )
    wrapper.chmod(0o755)
    result, _ = run_session(tmp_path, "preflight", DEVICE="cpu", PYTHON=str(wrapper))
    assert result.returncode == 3, result.stdout + result.stderr
    line = failure_line(result.stdout)
    assert "Python.h missing" in line and "/nonexistent" in line
    assert "CUDA" not in line  # DEVICE=cpu: no GPU check


def test_device_cpu_skips_the_gpu_checks_explicitly(tmp_path):
    result, seconds = run_session(tmp_path, "preflight", DEVICE="cpu")
    assert seconds < 30, seconds
    out = result.stdout
    assert "preflight: DEVICE=cpu: GPU checks skipped" in out
    assert "no CUDA device" not in out
    summary = (tmp_path / "out" / "summary.txt").read_text()
    if result.returncode == 0:
        assert "preflight     OK   DEVICE=cpu: GPU checks skipped" in summary
    else:  # a machine without Python.h or the build tools: said so, and not for want of a GPU
        assert result.returncode == 3
        line = failure_line(out)
        assert "CUDA" not in line and "nvcc" not in line
