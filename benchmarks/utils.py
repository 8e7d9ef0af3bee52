"""Timing, memory and reporting helpers shared by the benchmark scripts.

CPU timings are wall-clock; CUDA timings are ``torch.cuda.Event`` pairs around each call, with
L2 evicted (a read of a buffer several times the L2) before every timed call. Every rate is
relative to a device-to-device copy measured in the same run (``copy_gbps``): no figure in
these scripts is written down ahead of time.

``GMP_EXT_BENCH_OUT=<folder>`` sends the JSON rows there instead of ``benchmarks/results``.
``python benchmarks/utils.py summarize FILE.json ...`` prints the rows of result files.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gmp_ext

RESULTS = Path(__file__).parent / "results"
ENV_OUT = "GMP_EXT_BENCH_OUT"
GIB = 1 << 30


def weights_for(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """Trained-looking weights: N(0, 1/fan_in) per tensor (never zeros: that would time ties).

    On CPU the values come from a seeded CPU generator (as before); on CUDA they are drawn on the
    device with a seeded CUDA generator, so LLaMA-7B's 6.7e9 weights take no host memory.
    """
    device = torch.device(device)
    on_device = device.type == "cuda"
    generator = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)
    tensors = []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        if on_device:
            t = torch.randn(shape, generator=generator, device=device)
        else:
            t = torch.randn(shape, generator=generator)
        t /= math.sqrt(fan_in)
        tensors.append(t.to(dtype=dtype, device=device))
        del t
    return tensors


def quantiles(samples: list[float]) -> dict[str, float]:
    """p20, p50 and p80 of timed samples (ms), and their count."""
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return {
        "p20_ms": q[0],
        "p50_ms": statistics.median(samples),
        "p80_ms": q[-1],
        "repeats": len(samples),
    }


def time_cpu(
    fn: Callable[..., object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Wall-clock milliseconds: p20/p50/p80 over `repeats` after `warmup` calls.

    With ``setup``, each call is ``fn(setup())`` and ``setup`` runs outside the timed region.
    """

    def call() -> float:
        args = (setup(),) if setup is not None else ()
        start = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        call()
    return quantiles([call() for _ in range(repeats)])


_flush_buffers: dict[int, torch.Tensor] = {}


def flush_l2(device: torch.device | str | None = None) -> None:
    """Evicts the L2 cache by reading a buffer four times its size (read-only: no write-back
    lands in the next timed region)."""
    index = torch.device(device or "cuda").index
    index = torch.cuda.current_device() if index is None else index
    buffer = _flush_buffers.get(index)
    if buffer is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 64 << 20
        buffer = torch.ones(max(4 * l2, 64 << 20) // 4, dtype=torch.float32, device=index)
        _flush_buffers[index] = buffer
    buffer.amax()


def time_cuda(
    fn: Callable[..., object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
    flush: bool = True,
) -> dict[str, float]:
    """CUDA-event milliseconds on the current stream: p20/p50/p80 over `repeats` after
    `warmup` calls. One event pair per call; L2 is flushed before each timed call.

    Host work inside ``fn`` (Python, launches, host syncs) counts whenever the GPU waits for it,
    as in training. ``setup`` runs outside the timed region, as in ``time_cpu``.
    """

    def call(timed: bool) -> float:
        args = (setup(),) if setup is not None else ()
        if flush:
            flush_l2()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) if timed else 0.0

    for _ in range(warmup):
        call(False)
    return quantiles([call(True) for _ in range(repeats)])


def time_fn(
    device: torch.device | str,
    fn: Callable[..., object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> dict[str, float]:
    """CUDA events on CUDA devices, wall-clock otherwise."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, repeats, warmup, setup)
    return time_cpu(fn, repeats, warmup, setup)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device | str) -> None:
    """Drops garbage and, on CUDA, the caching allocator's unused blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def available_bytes(device: torch.device | str) -> int:
    """Memory a method could still take: free device memory (after emptying the cache) on
    CUDA, MemAvailable of /proc/meminfo on CPU."""
    if torch.device(device).type == "cuda":
        free_memory(device)
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


def _cuda_broken() -> str | None:
    """The error text when the CUDA context no longer works (a sticky kernel fault)."""
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        return str(error)
    return None


def _probe(
    device: torch.device, fn: Callable[..., object], setup: Callable[[], object] | None
) -> tuple[float, float]:
    """One timed call: (milliseconds, peak MiB it added on CUDA or NaN). Its set-up state and
    output are released on return."""
    args = (setup(),) if setup is not None else ()
    if device.type != "cuda":
        start_s = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start_s) * 1e3, math.nan
    flush_l2()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn(*args)
    end.record()
    end.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return start.elapsed_time(end), max(extra, 0) / 2**20


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--models, --dtype and --device, shared by the benchmark scripts."""
    from shapes import MODELS

    parser.add_argument("--models", nargs="+", default=["resnet50"], choices=sorted(MODELS))
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--device", default="cpu")


def copy_reference(device: torch.device, copy_gib: float | None) -> dict:
    """The copy row every result is compared with, measured now and printed."""
    copy = copy_gbps(device, int(copy_gib * 2**30) if copy_gib else None)
    print(f"copy reference: {copy['gbps']:.1f} GB/s (read + write), p50 {copy['p50_ms']:.3f} ms")
    return copy


def measure(
    device: torch.device | str,
    fn: Callable[..., object],
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
    slow_ms: float = 1000.0,
    failure: str = "refused",
    confirm_slow: bool = False,
) -> dict[str, object]:
    """Times ``fn`` the way a slow baseline can afford.

    One probe call is timed first (on CUDA it also gives ``extra_mb``, the peak memory the call
    adds: ``max_memory_allocated`` over ``memory_allocated`` before it). If the probe took
    longer than ``slow_ms`` it is the result (``repeats: 1``); otherwise ``warmup`` more calls
    and ``repeats`` timed ones follow. With ``confirm_slow`` (gmp_ext's own rows, which are
    fast) a slow probe is taken for a hiccup of the machine and the full timing runs anyway.
    Failures become a ``status``: ``"OOM"``, or ``"refused: <message>"`` for errors PyTorch
    raises on purpose (size or dtype limits; ``failure`` names the prefix: gmp_ext's own rows
    say ``"error"``); a broken CUDA context re-raises.
    """
    device = torch.device(device)
    result: dict[str, object] = {"status": "ok"}
    try:
        probe_ms, extra_mb = _probe(device, fn, setup)
        if not math.isnan(extra_mb):
            result["extra_mb"] = extra_mb
        if probe_ms > slow_ms and not confirm_slow:
            result.update(quantiles([probe_ms]))
        else:
            result.update(time_fn(device, fn, repeats, warmup, setup))
    except (RuntimeError, MemoryError, ValueError, TypeError, IndexError) as error:
        if device.type == "cuda" and _cuda_broken() is not None:
            raise
        text = " ".join(str(error).split())[:300]
        result = {"status": "OOM" if _is_oom(error) else f"{failure}: {text}"}
    free_memory(device)
    return result


def copy_gbps(device: torch.device | str, nbytes: int | None = None, repeats: int = 10) -> dict:
    """The device's copy bandwidth, measured now: ``dst.copy_(src)`` on random data, counting
    bytes read plus bytes written. Default buffer: 4 GiB on CUDA (twice over: 8 GiB in all),
    256 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 4 * GIB if device.type == "cuda" else 256 << 20
    numel = nbytes // 4
    buffers = [torch.randn(numel, device=device)]
    buffers.append(torch.empty_like(buffers[0]))
    timing = time_fn(device, lambda: buffers[1].copy_(buffers[0]), repeats=repeats, warmup=2)
    buffers.clear()
    free_memory(device)
    moved = 2 * numel * 4
    return {
        "kernel": "copy",
        "provider": "torch copy_ (device to device)",
        "device": str(device),
        "bytes": moved,
        **timing,
        "gbps": moved / timing["p50_ms"] / 1e6,
        "status": "ok",
    }


def rates(p50_ms: float, nbytes: float, floor_bytes: float, copy: float) -> dict[str, float]:
    """gbps = nbytes / time; pct_of_copy = gbps / copy GB/s; floor_ratio = time over the time
    the copy bandwidth needs for the compulsory bytes (1.0 = as fast as a copy of them)."""
    gbps = nbytes / p50_ms / 1e6
    return {
        "gbps": gbps,
        "pct_of_copy": 100.0 * gbps / copy,
        "floor_ms": floor_bytes / copy / 1e6,
        "floor_ratio": p50_ms / (floor_bytes / copy / 1e6),
    }


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
    env: dict[str, object] = {
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
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        env["gpu_sms"] = props.multi_processor_count
        env["gpu_l2_mb"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    try:
        from gmp_ext.kernels import backends

        module = backends.native()
        if module is not None:
            info = module.build_info()
            env["gmp_ext_cuda_archs"] = info.get("cuda_architectures", "")
    except Exception:  # diagnostics only
        pass
    return env


def results_dir() -> Path:
    """Where rows go: $GMP_EXT_BENCH_OUT when set, else benchmarks/results."""
    folder = os.environ.get(ENV_OUT)
    return Path(folder) if folder else RESULTS


def write_rows(name: str, rows: list[dict[str, object]]) -> Path:
    """Long-format rows (one per kernel x provider x size) plus the environment, as JSON."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1) + "\n")
    return path


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    text = str(value)
    return text if len(text) <= 48 else text[:45] + "..."


SUMMARY_COLUMNS = [
    "kernel",
    "provider",
    "model",
    "dtype",
    "tokens",
    "p50_ms",
    "repeats",
    "gbps",
    "pct_of_copy",
    "floor_ratio",
    "extra_mb",
    "speedup_vs_kthvalue",
    "read_passes",
    "speedup_vs_foreach_mul",
    "speedup_vs_dense",
    "status",
]


def summarize(paths: list[str]) -> None:
    """Prints the rows of result files (the columns any of them has)."""
    for name in paths:
        path = Path(name)
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in rows)]
        env = data.get("environment", {})
        print(f"\n== {path.name}  ({env.get('gpu') or env.get('cpu')}, torch {env.get('torch')})")
        print_table(rows, columns)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "summarize":
        summarize(sys.argv[2:])
    else:
        print("usage: python benchmarks/utils.py summarize FILE.json [...]")
