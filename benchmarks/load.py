"""Competing processes for timing under CPU contention, bounded in time and cleaned up.

    with competing_load("omp", processes=2, seconds=120):
        ...  # time something while two other processes keep the cores busy

Kinds of load (each process, until it is stopped or ``seconds`` pass):

* ``omp``: what a test process does: torch ops on 2^20 floats with every core's OpenMP thread,
  thousands of short parallel regions a second whose threads spin at their barriers;
* ``busy``: a pure Python loop (one thread);
* ``copy``: ``torch`` copies of 64 MiB with one thread (memory traffic).

``python benchmarks/load.py omp 2 30`` runs the load on its own (e.g. beside another command).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

KINDS = ("omp", "busy", "copy")


def _work(kind: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    if kind == "busy":
        x = 0
        while time.monotonic() < deadline:
            for _ in range(100_000):
                x += 1
        return
    import torch

    if kind == "copy":
        torch.set_num_threads(1)
        src, dst = torch.ones(1 << 24), torch.empty(1 << 24)
        while time.monotonic() < deadline:
            dst.copy_(src)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = torch.randn(1 << 20), torch.randn(1 << 20)
    while time.monotonic() < deadline:
        for _ in range(100):
            x.mul_(0.5).add_(y)
        x.copy_(y)


@contextlib.contextmanager
def competing_load(kind: str, processes: int, seconds: float) -> Iterator[None]:
    """Runs ``processes`` workers of ``kind`` while the block runs (each stops after ``seconds``
    at the latest); they are terminated, then killed, on the way out."""
    if kind not in KINDS:
        raise ValueError(f"unknown load {kind!r}; one of {KINDS}")
    workers = [
        subprocess.Popen([sys.executable, __file__, kind, "1", str(seconds)])
        for _ in range(processes)
    ]
    try:
        time.sleep(1.0)  # let them start (torch import) before anything is timed
        yield
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def main() -> None:
    kind, processes, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    if processes == 1:
        _work(kind, seconds)
        return
    with competing_load(kind, processes, seconds):
        time.sleep(seconds)


if __name__ == "__main__":
    main()
