"""Timing, memory and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gmp_ext

RESULTS = Path(__file__).parent / "results"


def weights_for(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """Trained-looking weights: N(0, 1/fan_in) per tensor (never zeros: that would time ties)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        t = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        tensors.append(t.to(dtype=dtype, device=device))
    return tensors


def time_cpu(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Wall-clock milliseconds: p20/p50/p80 over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return {"p20_ms": q[0], "p50_ms": statistics.median(samples), "p80_ms": q[-1]}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mb() -> float:
    """High-water resident set of this process (Linux VmHWM; getrusage's survives exec)."""
    return _status_mb("VmHWM")


def reset_peak_rss_mb() -> float:
    """Resets the high-water mark to the current resident set and returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def environment() -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "gmp_ext": gmp_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
        "cuda": torch.version.cuda or "",
    }


def write_rows(name: str, rows: list[dict[str, object]]) -> Path:
    """Long-format rows (one per kernel x provider x size) plus the environment, as JSON."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1) + "\n")
    return path


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
