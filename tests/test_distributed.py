"""Distributed GMP: the native histogram passes here, the real thing in spawned gloo groups.

One group of 2 and one of 3 CPU processes (3 makes uneven and empty shards) each run every
check of tests/distributed_worker.py once; each check is reported as its own test.
"""

from __future__ import annotations

import importlib.util
import queue
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmp_ext import distributed
from gmp_ext.distributed import select as sharded_select
from gmp_ext.kernels import backends, dtensors
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KEY_SPACE_WIDE, KEY_SPACE_WIDE64

from .utils import weights

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

TESTS = Path(__file__).parent
# Loaded under its file name: spawned processes import it by that name from the tests folder.
_spec = importlib.util.spec_from_file_location(
    "distributed_worker", TESTS / "distributed_worker.py"
)
worker = importlib.util.module_from_spec(_spec)
sys.modules["distributed_worker"] = worker
_spec.loader.exec_module(worker)

GROUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def group_results(request, tmp_path_factory) -> dict[int, dict[str, str | None]]:
    """{rank: {check: None or traceback}} of one spawned gloo group running every check."""
    world = request.param
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args = (world, _free_port(), results, str(tmp_path_factory.mktemp(f"world{world}")))
    processes = [
        ctx.Process(target=worker.main, args=(rank, *args, list(worker.CHECKS)))
        for rank in range(world)
    ]
    sys.path.insert(0, str(TESTS))  # spawn hands the children this sys.path
    try:
        for process in processes:
            process.start()
    finally:
        sys.path.remove(str(TESTS))
    reports: dict[int, dict[str, str | None]] = {}
    try:
        for _ in processes:
            rank, report = results.get(timeout=GROUP_TIMEOUT_S)
            reports[rank] = report
    except queue.Empty:
        pytest.fail(f"the group of {world} reported {sorted(reports)} within {GROUP_TIMEOUT_S} s")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return reports


@pytest.mark.parametrize("check", list(worker.CHECKS))
def test_distributed(group_results, check):
    reports = [report[check] for report in group_results.values()]
    if all(r is not None and r.startswith(worker.SKIPPED) for r in reports):
        pytest.skip(reports[0][len(worker.SKIPPED) :])
    failed = {rank: report[check] for rank, report in group_results.items() if report[check]}
    assert not failed, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failed.items())


# -- the native passes against their PyTorch twin, in this process ------------------------------

native = pytest.mark.skipif(backends.native() is None, reason="gmp_ext._C is not built")


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    """Several tiles, an empty tensor, heavy ties, both zeros, infinities and NaNs."""
    tensors = [
        weights(70_001, dtype, kind="normal"),
        weights(0, dtype),
        weights(1000, dtype, kind="few_values"),
        weights(300, dtype, kind="pruned"),
        weights(129, dtype, kind="specials"),
    ]
    tensors[4][5] = float("nan")
    tensors[0][7::1000] = float("nan")
    return tensors


def _passes(tensors, key_space):
    """The compiled CPU backend's radix passes and the reference's, over the same tensors."""
    shards = [t.contiguous() for t in tensors]
    cpu, reference = backends.native_backend("cpu"), backends.REFERENCE
    host = torch.device("cpu")
    return (
        sharded_select._Passes(cpu, cpu.prepare(shards, None, None, key_space), host),
        sharded_select._Passes(reference, reference.prepare(shards, None, None, key_space), host),
    )


@native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_space", [KEY_SPACE_NATIVE, KEY_SPACE_WIDE])
def test_native_histogram_matches_torch(dtype, key_space, threads, monkeypatch):
    monkeypatch.setattr(backends.cpu, "thread_count", lambda: threads)
    tensors = _tensors(dtype)
    cpu, reference = _passes(tensors, key_space)
    bits = 31 if key_space == KEY_SPACE_WIDE or dtype == torch.float32 else 15
    for shift, width in ((bits - 11, 11), (max(bits - 21, 0), 10)):
        prefix_of = [
            int(_reference.magnitude_keys(t, key_space)[0]) >> (shift + width) if t.numel() else 0
            for t in tensors
        ]
        prefix_of[2] = -1  # skipped
        for prefixes in (None, torch.tensor(prefix_of)):
            for count_nan in (False, True):
                got = cpu.histogram(shift, width, prefixes, count_nan)
                expected = reference.histogram(shift, width, prefixes, count_nan)
                assert torch.equal(got[0], expected[0]), (shift, width, prefixes)
                assert torch.equal(got[1], expected[1]), (shift, width, prefixes, count_nan)
    assert cpu.histogram(bits - 11, 11, None, True)[1].tolist() == [70, 0, 0, 0, 1]


@native
@pytest.mark.parametrize("threads", [1, 2])
def test_native_find_equal_matches_torch(threads, monkeypatch):
    monkeypatch.setattr(backends.cpu, "thread_count", lambda: threads)
    tensors = [weights(n, torch.bfloat16, kind="few_values") for n in (140_000, 5, 0, 999)]
    cpu, reference = _passes(tensors, KEY_SPACE_WIDE)
    keys = torch.tensor([int(_reference.magnitude_keys(tensors[0], KEY_SPACE_WIDE)[3]), 0, 0, 0])
    keys[3] = int(_reference.magnitude_keys(tensors[3], KEY_SPACE_WIDE)[-1])
    count = int((_reference.magnitude_keys(tensors[0], KEY_SPACE_WIDE) == keys[0]).sum())
    for first in (1, 2, count // 2, count):  # first and last tie, across the 64K-element tiles
        ranks = torch.tensor([first, 0, 0, 1])
        assert torch.equal(cpu.find_equal(keys, ranks), reference.find_equal(keys, ranks))
    with pytest.raises(RuntimeError, match="entry 0: rank .* exceeds the number of elements"):
        cpu.find_equal(keys, torch.tensor([count + 1, 0, 0, 0]))


@native
def test_native_histogram_rejects_bad_arguments():
    table = backends.base.build_table([torch.zeros(4)])
    out = torch.empty(8, dtype=torch.int64)
    module = backends.native()
    with pytest.raises(ValueError, match="bins must be a power of two"):
        module.cpu_histogram(table.data_ptr(), 1, KEY_SPACE_WIDE, 0, 6, 6, 0, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="shifts must be in"):
        module.cpu_histogram(table.data_ptr(), 1, KEY_SPACE_WIDE, 0, 8, 32, 0, out.data_ptr(), 0, 1)


def test_digit_plan_covers_the_key_bits_in_few_small_digits():
    assert sharded_select._digit_plan(KEY_SPACE_WIDE) == [(20, 11), (10, 10), (0, 10)]
    plan = sharded_select._digit_plan(KEY_SPACE_WIDE64)
    assert [w for _, w in plan] == [11, 11, 11, 10, 10, 10]
    assert plan[-1][0] == 0 and all(
        s == plan[i + 1][0] + plan[i + 1][1] for i, (s, _) in enumerate(plan[:-1])
    )


def test_single_process_tensors_are_not_dtensors():
    t = torch.zeros(3)
    assert not dtensors.is_dtensor(t)
    assert dtensors.local_tensor(t) is t
    assert not distributed.debug_checks_enabled()
