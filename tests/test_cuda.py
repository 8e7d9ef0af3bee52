"""GPU-only checks: what the device-parametrized tests cannot see.

test_select, test_apply_masks and the rest already run on CUDA through the ``device`` fixture
(native CUDA against the reference on the GPU). This file adds what needs a GPU and more than
one backend at once:

* CUDA == C++ CPU == reference, bit for bit, on the same values (rows and whole mask storage),
  for fp32/fp16/bf16, heavy bf16 ties, all-zero tensors, sizes 0, 1, 33 and 2^20 + 7, and
  mixed-dtype global selections; the sample bracket's fallbacks on data aimed at the positions
  the device samples (misses, overflowing composites, a NaN outside the sample);
* a prune step as a prepared backend job (select + build + apply on pre-allocated buffers),
  ``gmp_ext.PrunePlan.step`` on a model (mixed dtypes, channels_last) and the fused apply
  (``backend.apply(job)``) captured in CUDA graphs and replayed on new weights at new sparsities;
* no host synchronisation: the job, ``PrunePlan.step`` and the per-optimizer-step apply return
  while the GPU is still busy, under ``torch.cuda.set_sync_debug_mode("error")``;
* opt-in (``-m slow``): a bf16 tensor of more than 2^31 elements (~4.3 GB) against a chunked
  histogram reference.

Everything skips without a GPU, or when GMP_EXT_TEST_DEVICE names another device.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import PrunePlan
from gmp_ext.kernels import primitives
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.engine import PreparedStep
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, key_space_for, mask_bytes

from .conftest import native_backend
from .utils import (
    DTYPE_IDS,
    DTYPES,
    SAMPLE_AIMS,
    SPARSITIES,
    aimed_at_sample,
    assert_same,
    weights,
)

CUDA = torch.device("cuda")
POISON = 0xA5

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("GMP_EXT_TEST_DEVICE", "cuda") != "cuda",
        reason="GMP_EXT_TEST_DEVICE excludes cuda",
    ),
]


@pytest.fixture
def device() -> torch.device:
    """Overrides conftest's device grid: ``native`` is the CUDA backend here."""
    return CUDA


@pytest.fixture
def cpu():
    return native_backend(torch.device("cpu"))


# Cross-backend identity ---------------------------------------------------------------------

SIZES = [0, 1, 33, (1 << 20) + 7]
KINDS = ["normal", "zeros", "pruned", "few_values", "equal", "specials"]


def _poisoned_mask(t: torch.Tensor) -> torch.Tensor:
    return primitives.new_mask(t).fill_(POISON)


def _check_masks(native, cpu, dev, host, dev_rows, host_rows, what: str) -> None:
    """Masks built by CUDA and CPU from their rows: equal bytes, equal to the reference, and
    neither touches the padding after ceil(n / 8) bytes."""
    dev_masks = [_poisoned_mask(t) for t in dev]
    host_masks = [_poisoned_mask(t) for t in host]
    native.build_masks(dev, dev_rows, dev_masks)
    cpu.build_masks(host, host_rows, host_masks)
    ref_masks = [primitives.new_mask(t) for t in host]
    _reference.build_masks(host, host_rows, ref_masks)
    for i, (d, h, r, t) in enumerate(zip(dev_masks, host_masks, ref_masks, host)):
        size = mask_bytes(t.numel())
        assert_same(d[:size], h[:size], f"{what}: mask {i} CUDA vs CPU")
        assert_same(d[:size], r[:size], f"{what}: mask {i} CUDA vs reference")
        assert bool((d[size:] == POISON).all()), f"{what}: mask {i} padding written"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_cuda_equals_cpu_and_reference(native, cpu, dtype, numel, kind):
    host = weights(numel, dtype, "cpu", kind)
    dev = host.to(CUDA)
    for sparsity in SPARSITIES:
        ks = [round(sparsity * numel)]
        what = f"{kind} n={numel} s={sparsity}"
        got = native.select_layerwise([dev], ks)
        want = cpu.select_layerwise([host], ks)
        assert got.device == dev.device
        assert_same(got, want, f"{what}: rows CUDA vs CPU")
        assert_same(got, _reference.select_layerwise([dev], ks), f"{what}: rows vs reference")
        _check_masks(native, cpu, [dev], [host], got, want, what)


def test_layerwise_batch_of_mixed_sizes_and_dtypes(native, cpu):
    host = [
        weights(n, dt, "cpu", kind)
        for n in [0, 1, 33, 2047, 2048, 2049, 16384, 16385, 65537, (1 << 20) + 7]
        for dt in DTYPES
        for kind in ("normal", "few_values")
    ]
    dev = [t.to(CUDA) for t in host]
    for sparsity in (0.0, 0.3, 0.9, 1.0):
        ks = [round(((i * 37) % 101) / 100 * sparsity * t.numel()) for i, t in enumerate(host)]
        got = native.select_layerwise(dev, ks)
        want = cpu.select_layerwise(host, ks)
        assert_same(got, want, f"s={sparsity}: rows CUDA vs CPU")
        _check_masks(native, cpu, dev, host, got, want, f"batch s={sparsity}")


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 3,
        [torch.bfloat16] * 3,
        [torch.float16] * 3,
        [torch.float32, torch.bfloat16, torch.float16],
        [torch.bfloat16, torch.float16, torch.float16],
    ],
    ids=["fp32", "bf16", "fp16", "mixed", "bf16+fp16"],
)
@pytest.mark.parametrize("kind", ["normal", "zeros", "pruned", "few_values", "specials"])
def test_global_cuda_equals_cpu_and_reference(native, cpu, dtypes, kind):
    sizes = [(1 << 20) + 7, 0, 1, 33, 70001, 16385]
    host = [weights(n, dtypes[i % 3], "cpu", kind) for i, n in enumerate(sizes)]
    dev = [t.to(CUDA) for t in host]
    key_space = key_space_for({t.dtype for t in host})
    for sparsity in SPARSITIES:
        k = round(sparsity * sum(sizes))
        what = f"{kind} s={sparsity}"
        got = native.select_global(dev, k, key_space)
        want = cpu.select_global(host, k, key_space)
        assert_same(got, want, f"{what}: rows CUDA vs CPU")
        assert_same(got, _reference.select_global(dev, k, key_space), f"{what}: vs reference")
        _check_masks(native, cpu, dev, host, got, want, what)


@pytest.mark.parametrize("kind", ["normal", "equal", "few_values", "zeros"])
def test_bf16_heavy_ties_on_many_tiles(native, cpu, kind):
    """4M bf16 weights hold a few thousand distinct magnitudes (or one): the ties at the
    threshold overflow the candidate slots and are resolved tile by tile."""
    host = [weights((1 << 22) + 3, torch.bfloat16, "cpu", kind), weights(5000, torch.bfloat16)]
    dev = [t.to(CUDA) for t in host]
    for sparsity in (0.1, 0.5, 0.9, 0.999):
        ks = [round(sparsity * t.numel()) for t in host]
        got = native.select_layerwise(dev, ks)
        want = cpu.select_layerwise(host, ks)
        assert_same(got, want, f"layer s={sparsity}")
        _check_masks(native, cpu, dev, host, got, want, f"layer s={sparsity}")
        k = round(sparsity * sum(t.numel() for t in host))
        got = native.select_global(dev, k, KEY_SPACE_NATIVE)
        want = cpu.select_global(host, k, KEY_SPACE_NATIVE)
        assert_same(got, want, f"global s={sparsity}")
        assert_same(got, _reference.select_global(dev, k, KEY_SPACE_NATIVE), "vs reference")


def _mix(x: int) -> int:
    """splitmix64's finalizer, as csrc/cuda/select.cu: mix."""
    m = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _sampled_positions(numel: int) -> torch.Tensor:
    """The elements kSampleBracket samples from one tensor of ``numel`` (per-layer, or alone in
    a global selection): as many keys as its slots hold beside the tie counts (32 slots of two
    keys per tile of 2048, less one a tile), at most 2^16, in runs of 8 at hashed offsets of
    equal strides."""
    tiles = -(-numel // 2048)
    runs = min(1 << 16, 2 * (tiles * 32 - tiles)) // 8
    stride = tiles * 256 // runs
    starts = [8 * (r * stride + (((_mix(r) >> 32) * stride) >> 32)) for r in range(runs)]
    positions = (torch.tensor(starts)[:, None] + torch.arange(8)).flatten()
    return positions[positions < numel]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("aim", SAMPLE_AIMS)
def test_sample_bracket_falls_back_exactly_on_data_aimed_at_its_sample(native, cpu, dtype, aim):
    """Values chosen where the device samples: the bracket misses low or high, its composites
    overflow the slots, a NaN hides outside it, or exact ties of the target's value crowd it.
    The rows stay exact (the emulator's differential runs count these as misses)."""
    numel = (1 << 21) + 11
    picked = _sampled_positions(numel)
    generator = torch.Generator().manual_seed(7)
    for sparsity in (0.01, 0.5, 0.9):
        values = aimed_at_sample(numel, picked, sparsity, aim, generator)
        host = values.to(dtype)
        dev = host.to(CUDA)
        ks = [round(sparsity * numel)]
        what = f"{aim} s={sparsity}"
        got = native.select_layerwise([dev], ks)
        assert_same(got, cpu.select_layerwise([host], ks), f"{what}: layer rows CUDA vs CPU")
        assert_same(got, _reference.select_layerwise([dev], ks), f"{what}: layer vs reference")
        got = native.select_global([dev], ks[0], KEY_SPACE_NATIVE)
        want = cpu.select_global([host], ks[0], KEY_SPACE_NATIVE)
        assert_same(got, want, f"{what}: global rows CUDA vs CPU")
        _check_masks(native, cpu, [dev], [host], got, want, what)


# CUDA graphs ---------------------------------------------------------------------------------


class RawStep:
    """One prune step as the engine's prepared step (select + build + apply on buffers
    allocated once): nothing is allocated and nothing is read back when it runs, so it can be
    captured in a CUDA graph, and the counts it prunes can be rewritten between replays."""

    def __init__(self, native, tensors, ks=None, k=None, key_space=KEY_SPACE_NATIVE):
        self.tensors = tensors
        self.ks, self.k, self.key_space = ks, k, key_space
        self.masks = [primitives.new_mask(t) for t in tensors]
        scope = "layer" if ks is not None else "global"
        self.step = PreparedStep(tensors, self.masks, scope, key_space)
        (group,) = self.step.groups  # one device: the native backend's one job
        assert group.backend is native
        self.set_counts(ks=ks, k=k)

    @property
    def rows(self) -> torch.Tensor:
        return self.step.groups[0].job.rows

    def set_counts(self, ks=None, k=None) -> None:
        self.ks, self.k = ks, k
        self.step.set_counts(ks if ks is not None else [k], per_tensor=ks is not None)

    def __call__(self) -> None:
        self.step.run()

    def load(self, values) -> None:
        """New weights into the same storage; rows and masks poisoned."""
        for t, v in zip(self.tensors, values):
            t.copy_(v)
        self.rows.fill_(-7)
        for m in self.masks:
            m.fill_(POISON)

    def check(self, values, what: str) -> None:
        if self.ks is not None:
            rows = _reference.select_layerwise(values, self.ks)
        else:
            rows = _reference.select_global(values, self.k, self.key_space)
        assert_same(self.rows, rows, f"{what}: rows")
        for i, (t, v, m) in enumerate(zip(self.tensors, values, self.masks)):
            want = primitives.new_mask(v)
            _reference.build_masks([v], rows[i : i + 1], [want])
            size = mask_bytes(v.numel())
            assert_same(m[:size], want[:size], f"{what}: mask {i}")
            pruned = v.clone()
            _reference.apply_masks([pruned], [want])
            assert_same(t, pruned, f"{what}: tensor {i}")


STEP_SIZES = [(1 << 20) + 7, 33, 0, 16385, 70001, 1, 2048]


def _step_values(dtypes, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    kinds = ["normal", "few_values", "pruned"]
    return [weights(n, dt, CUDA, kinds[i % 3]) for i, (n, dt) in enumerate(zip(STEP_SIZES, dtypes))]


def _raw_step(native, scope: str, dtypes, sparsity: float = 0.7) -> RawStep:
    tensors = [torch.empty(n, dtype=dt, device=CUDA) for n, dt in zip(STEP_SIZES, dtypes)]
    if scope == "layer":
        return RawStep(native, tensors, ks=[round(sparsity * n) for n in STEP_SIZES])
    k = round(sparsity * sum(STEP_SIZES))
    return RawStep(native, tensors, k=k, key_space=key_space_for(set(dtypes)))


def _warm_up(fn) -> None:
    """Runs ``fn`` once on a side stream (kernels loaded, as torch asks before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


MIXED = [torch.float32, torch.bfloat16, torch.float16] * 2 + [torch.float32]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("dtypes", [MIXED, [torch.bfloat16] * 7], ids=["mixed", "bf16"])
def test_prune_step_replays_from_a_cuda_graph(native, scope, dtypes):
    step = _raw_step(native, scope, dtypes)
    values = _step_values(dtypes, 0)
    step.load(values)
    _warm_up(step)
    step.check(values, "eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, sparsity in ((1, 0.7), (2, 0.2), (3, 0.95)):
        # The graph reads the counts from device memory: a new sparsity needs no new capture.
        if scope == "layer":
            step.set_counts(ks=[round(sparsity * n) for n in STEP_SIZES])
        else:
            step.set_counts(k=round(sparsity * sum(STEP_SIZES)))
        values = _step_values(dtypes, seed)
        step.load(values)
        graph.replay()
        torch.cuda.synchronize()
        step.check(values, f"replay {seed} s={sparsity}")


def test_fused_apply_replays_from_a_cuda_graph(native):
    dtypes = MIXED
    tensors = [torch.empty(n, dtype=dt, device=CUDA) for n, dt in zip(STEP_SIZES, dtypes)]
    masks = [primitives.new_mask(t) for t in tensors]
    job = native.prepare(tensors, masks)

    def load(seed: int):
        values = _step_values(dtypes, seed)
        for t, v, m in zip(tensors, values, masks):
            t.copy_(v)
            m.copy_(_reference.pack_bits(torch.rand(v.numel(), device=CUDA) < 0.3))
        return values

    load(0)
    _warm_up(lambda: native.apply(job))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        native.apply(job)
    for seed in (1, 2):
        values = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        _reference.apply_masks(values, masks)
        for i, (t, v) in enumerate(zip(tensors, values)):
            assert_same(t, v, f"replay {seed}: tensor {i}")


class PlanNet(nn.Module):
    """Mixed dtypes, a channels_last conv (staged through a contiguous copy) and odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
        self.fc = nn.Linear(1000, 333)
        self.bf16 = nn.Linear(257, 129).to(torch.bfloat16)
        self.fp16 = nn.Linear(33, 65).to(torch.float16)


def _same_models(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_same(p, q, f"{what}: {name}")
    masks_a, masks_b = gmp_ext.masks(a), gmp_ext.masks(b)
    for name, keep in masks_a.items():
        assert torch.equal(keep, masks_b[name]), f"{what}: mask {name}"


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_plan_replays_from_a_cuda_graph(scope):
    model = PlanNet().to(CUDA)
    plan = PrunePlan(model, 0.5, scope=scope)
    _warm_up(plan.step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.step()
    for seed, sparsity in ((1, 0.5), (2, 0.8), (3, 0.3)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        twin = copy.deepcopy(model)
        plan.set_sparsity(sparsity)
        graph.replay()
        assert plan.check() == gmp_ext.prune_step(twin, sparsity, scope=scope)
        _same_models(model, twin, f"{scope} replay {seed}")


@pytest.mark.parametrize("repeat", ["prune_step", "PrunePlan"])
def test_global_prune_step_memory_under_a_tenth_of_the_weights(repeat):
    """Issue #3: the peak extra memory of a global prune step (selection scratch, rows, tables,
    counting; for PrunePlan also making the plan) stays under 10% of the bf16 weights' bytes
    once masks exist."""
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(4)])
    model = model.to(CUDA, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gmp_ext.prune_step(model, 0.5, scope="global")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if repeat == "prune_step":
        gmp_ext.prune_step(model, 0.9, scope="global")
    else:
        plan = PrunePlan(model, 0.9, scope="global")
        plan.step()
        plan.check()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.10 * weight_bytes, (
        f"{extra / 2**20:.1f} MiB extra for {weight_bytes / 2**20:.0f} MiB"
    )
    assert gmp_ext.sparsity_report(model).sparsity == pytest.approx(0.9, abs=1e-6)


def test_mask_store_apply_of_a_channels_last_model_replays_from_a_cuda_graph():
    """attach's per-step apply with a channels_last conv (staged through a cached contiguous
    copy) captured once and replayed after weight updates."""
    model = PlanNet().to(CUDA)
    gmp_ext.prune_step(model, 0.7)
    keep = gmp_ext.masks(model)
    params = dict(model.named_parameters())
    _warm_up(lambda: gmp_ext.apply_masks(model))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gmp_ext.apply_masks(model)
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name in keep:
                params[name].add_(torch.randn_like(params[name]))
        want = {n: torch.where(k, params[n].detach(), 0) for n, k in keep.items()}
        graph.replay()
        torch.cuda.synchronize()
        for name in keep:
            assert_same(params[name], want[name], f"replay {seed}: {name}")


# No host synchronisation ---------------------------------------------------------------------

_cycles_per_ms: list[float] = []


def _spin(ms: float) -> None:
    """Queues a kernel that keeps the current stream busy for at least ``ms`` milliseconds
    (calibrated at the fastest clock seen, so a clock boost cannot shorten it)."""
    if not _cycles_per_ms:
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            _cycles_per_ms.append(20_000_000 / start.elapsed_time(end))
    torch.cuda._sleep(int(ms * max(_cycles_per_ms)))


def _returns_while_gpu_busy(fn) -> tuple[bool, float]:
    """(whether the stream was still busy when ``fn`` returned, host ms ``fn`` took), with
    torch's sync debug mode raising on any synchronising torch call inside ``fn``."""
    torch.cuda.synchronize()
    _spin(400)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        start = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - start) * 1e3
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return busy, host_ms


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_raw_prune_step_does_not_wait_for_the_gpu(native, scope):
    step = _raw_step(native, scope, MIXED)
    values = _step_values(MIXED, 5)
    step.load(values)
    _warm_up(step)
    step.load(values)
    busy, host_ms = _returns_while_gpu_busy(step)
    assert busy, f"select + build + apply waited for the GPU ({host_ms:.1f} ms on the host)"
    step.check(values, "after the spin")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_plan_step_does_not_wait_for_the_gpu(scope):
    model = PlanNet().to(CUDA)
    twin = copy.deepcopy(model)
    plan = PrunePlan(model, 0.6, scope=scope)
    _warm_up(plan.step)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    busy, host_ms = _returns_while_gpu_busy(plan.step)
    assert busy, f"PrunePlan.step waited for the GPU ({host_ms:.1f} ms on the host)"
    assert plan.check() == gmp_ext.prune_step(twin, 0.6, scope=scope)
    _same_models(model, twin, scope)


def test_mask_store_apply_does_not_wait_for_the_gpu():
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256)).to(CUDA)
    model[2].half()
    gmp_ext.prune_step(model, 0.8)
    gmp_ext.apply_masks(model)  # the plan is cached from here on
    keep = gmp_ext.masks(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in keep:
            params[name].add_(0.5)  # pruned weights become non-zero, as after an update
    expected = {n: torch.where(keep[n], params[n].detach(), 0).clone() for n in keep}
    busy, host_ms = _returns_while_gpu_busy(lambda: gmp_ext.apply_masks(model))
    assert busy, f"gmp_ext.apply_masks waited for the GPU ({host_ms:.1f} ms on the host)"
    for name, want in expected.items():
        assert_same(params[name].detach(), want, name)


# More than 2^31 elements (opt in: -m slow) ---------------------------------------------------

BIG = (1 << 31) + 12_345
PAST = (1 << 31) + 1_001  # thresholds placed at or after this index
CHUNK = 1 << 27
BINS = 1 << 15


def _keys(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """bf16 magnitude keys (csrc/common/keys.h: the bits without the sign) of t[start:stop]."""
    return t[start:stop].view(torch.int16).to(torch.int32) & 0x7FFF


def _chunks(n: int):
    return ((a, min(a + CHUNK, n)) for a in range(0, n, CHUNK))


def _histogram(t: torch.Tensor) -> torch.Tensor:
    hist = torch.zeros(BINS, dtype=torch.int64, device=CUDA)
    for a, b in _chunks(t.numel()):
        hist += torch.bincount(_keys(t, a, b), minlength=BINS)
    return hist


def _count_before(t: torch.Tensor, key: int, stop: int) -> int:
    return sum(int((_keys(t, a, min(b, stop)) == key).sum()) for a, b in _chunks(stop))


def _kth(t: torch.Tensor, hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(key, flat index) of the k-th smallest (key, index): a chunked exact reference."""
    cumulative = hist.cumsum(0)
    key = int(torch.searchsorted(cumulative, torch.tensor([k], device=CUDA)))
    rank = k - (int(cumulative[key - 1]) if key else 0)
    for a, b in _chunks(t.numel()):
        hits = (_keys(t, a, b) == key).nonzero().reshape(-1)
        if rank <= hits.numel():
            return key, a + int(hits[rank - 1])
        rank -= hits.numel()
    raise AssertionError("k is larger than the tensor")


@pytest.mark.slow
def test_bf16_tensor_over_2_31_elements(native):
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs ~16 GB of free GPU memory")
    t = torch.empty(BIG, dtype=torch.bfloat16, device=CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for a, b in _chunks(BIG):
        t[a:b].normal_(generator=generator)
    t[::3] = 0.5  # ~716M ties of one key: far more than the candidate slots hold
    half_key = int(torch.tensor([0.5], dtype=torch.bfloat16).view(torch.int16))
    hist = _histogram(t)
    cumulative = hist.cumsum(0)

    def k_at(key: int) -> int:
        """k whose threshold is the first element with ``key`` at or after index PAST."""
        below = int(cumulative[key - 1]) if key else 0
        return below + _count_before(t, key, PAST) + 1

    natural_key, _ = _kth(t, hist, round(0.9 * BIG))
    ks = [round(0.9 * BIG), k_at(half_key), k_at(natural_key)]
    for k in ks:
        key, index = _kth(t, hist, k)
        row = native.select_layerwise([t], [k])[0].tolist()
        assert row[:2] == [key, index], f"k={k}: got {row}, want key {key} index {index}"
        assert row[3] == 0
    assert _kth(t, hist, ks[1])[1] >= PAST  # the tie-heavy threshold lies past 2^31

    # Global over [t, small]: the small tensor's ties come after all of t's.
    small = weights(1000, torch.bfloat16, CUDA, "few_values")
    small[::2] = 0.5
    k = ks[1] + int((_keys(small, 0, small.numel()) < half_key).sum())
    key, index = _kth(t, hist, ks[1])
    rows = native.select_global([t, small], k, KEY_SPACE_NATIVE).tolist()
    assert [r[:2] for r in rows] == [[key, index], [key, -1]], rows

    # Mask build and apply at the tie-heavy threshold, checked chunk by chunk.
    k = ks[1]
    rows = native.select_layerwise([t], [k])
    mask = primitives.new_mask(t)
    native.build_masks([t], rows, [mask])
    assert BIG - primitives.popcount(mask, BIG) == k
    original = t.clone()
    native.apply_masks([t], [mask])
    for a, b in _chunks(BIG):
        keys = _keys(original, a, b)
        positions = torch.arange(a, b, device=CUDA)
        keep = (keys > key) | ((keys == key) & (positions > index))
        want = _reference.pack_bits(keep)[: mask_bytes(b - a)]
        assert_same(mask[a // 8 : a // 8 + mask_bytes(b - a)], want, f"mask [{a}, {b})")
        kept = torch.where(keep, original[a:b], torch.zeros((), dtype=t.dtype, device=CUDA))
        assert_same(t[a:b], kept, f"applied [{a}, {b})")
