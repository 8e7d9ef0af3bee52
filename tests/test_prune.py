"""The fused prune step (``Backend.prune``: csrc/ops.h prune_layerwise / prune_global) against
the reference's select, build and apply: the same rows, masks and weights, bit for bit, on every
path the kernels take (the bucket gathered by the build, heavy ties that overflow it, the zero
fast path, NaN rows, k = 0 and k = n, small and empty entries, misaligned views, mixed dtypes,
the CPU's sample select on layers with structure and when its sample misleads it)."""

from __future__ import annotations

import pytest
import torch

from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends import REFERENCE
from gmp_ext.kernels.engine import PreparedStep
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KEY_SPACE_WIDE

from .utils import DTYPE_IDS, DTYPES, KINDS, assert_same, weights


def _prune_both(native, tensors, scope, counts, key_space=KEY_SPACE_NATIVE, old=None):
    """(rows, masks, weights) of native prune and of the reference's three stages, each on its
    own copies; ``old``: the masks before the step (random when None)."""
    device = tensors[0].device
    if old is None:
        old = [_reference.pack_bits(torch.rand(t.numel(), device=device) < 0.5) for t in tensors]
    results = []
    for backend in (native, REFERENCE):
        work = [t.clone() for t in tensors]
        masks = [m.clone() for m in old]
        rows = _step(backend, work, masks, counts, scope, key_space)
        results.append((rows.cpu(), masks, work))
    return results


def _step(backend, work, masks, counts, scope="layer", key_space=KEY_SPACE_NATIVE):
    """The native backend's prune, or the reference's select, build and apply; the rows."""
    job = backend.prepare(work, masks, scope, key_space)
    job.set_counts(counts)
    if backend is REFERENCE:
        backend.select(job)
        backend.build(job)
        backend.apply(job)
    else:
        backend.prune(job)
    return job.rows


def _assert_same_step(results):
    (rows, masks, work), (ref_rows, ref_masks, ref_work) = results
    assert_same(rows, ref_rows, "rows")
    for i, (mask, ref_mask) in enumerate(zip(masks, ref_masks)):
        assert_same(mask, ref_mask, f"mask {i}")
        assert_same(work[i], ref_work[i], f"weights {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_layerwise_prune_equals_select_build_apply(native, device, dtype, kind, sparsity):
    sizes = [0, 1, 33, 16385, 70001, 200003]  # empty, small entries, one and several tiles
    tensors = [weights(n, dtype, device, kind) for n in sizes]
    counts = [round(sparsity * t.numel()) for t in tensors]
    _assert_same_step(_prune_both(native, tensors, "layer", counts))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_global_prune_equals_select_build_apply(native, device, dtype, kind, sparsity):
    tensors = [weights(n, dtype, device, kind) for n in (70001, 0, 1, 33, 131072)]
    total = sum(t.numel() for t in tensors)
    _assert_same_step(_prune_both(native, tensors, "global", [round(sparsity * total)]))


def test_global_prune_over_mixed_dtypes_in_the_wide_key_space(native, device):
    tensors = [weights(70001, dtype, device) for dtype in DTYPES]
    tensors += [weights(5000, torch.float16, device, "pruned")]
    total = sum(t.numel() for t in tensors)
    for sparsity in (0.2, 0.7):
        results = _prune_both(native, tensors, "global", [round(sparsity * total)], KEY_SPACE_WIDE)
        _assert_same_step(results)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_steps_that_ramp_the_sparsity_keep_equal(native, device, dtype):
    """A gradual ramp on the same weights: each step starts from the last one's zeros and masks
    (the bucket path, then the zero fast path once the count stops rising)."""
    tensors = [weights(n, dtype, device) for n in (70001, 131072, 999)]
    ones = [torch.ones(t.numel(), dtype=torch.bool, device=device) for t in tensors]
    states = {
        backend: ([t.clone() for t in tensors], [_reference.pack_bits(o) for o in ones])
        for backend in (native, REFERENCE)
    }
    for sparsity in (0.1, 0.4, 0.7, 0.7, 0.9, 0.9):
        counts = [round(sparsity * t.numel()) for t in tensors]
        for backend, (work, masks) in states.items():
            _step(backend, work, masks, counts)
        (work, masks), (ref_work, ref_masks) = states.values()
        for i in range(len(tensors)):
            assert_same(masks[i], ref_masks[i], f"mask {i} at {sparsity}")
            assert_same(work[i], ref_work[i], f"weights {i} at {sparsity}")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nan_rows_leave_masks_and_zero_by_the_old_ones(native, device, scope):
    tensors = [weights(70001, torch.float32, device), weights(20000, torch.float32, device)]
    tensors[1][123] = float("nan")
    counts = [35000, 10000] if scope == "layer" else [50000]
    results = _prune_both(native, tensors, scope, counts)
    _assert_same_step(results)
    rows = results[0][0]
    assert int(rows[1, 3]) == 1
    if scope == "layer":
        assert int(rows[0, 3]) == 0  # the other entry is pruned as usual


def test_misaligned_views(native, device):
    for dtype in DTYPES:
        backing = weights(200003 + 1, dtype, device)
        for scope, counts in (("layer", [120000]), ("global", [50000])):
            results = _prune_both(native, [backing[1:]], scope, counts)
            _assert_same_step(results)


def test_bucket_path_prunes_exactly_k_with_index_order_ties(native, device):
    """bf16 weights of few distinct magnitudes spread so that the threshold's ties fit the
    candidate buffer: the k smallest by (|w|, index), ties broken by index."""
    values = torch.arange(1, 2001, device=device, dtype=torch.float32) * 1e-3
    t = values.repeat(100)[torch.randperm(200000, device=device)].to(torch.bfloat16)
    k = 123457
    (_, masks, work), _ = results = _prune_both(native, [t], "layer", [k])
    _assert_same_step(results)
    keep = _reference.unpack_bits(masks[0], t.numel())
    assert int((~keep).sum()) == k
    assert bool((work[0][~keep] == 0).all())


def _layers_like_real_ones(n, device):
    """fp32 layers whose magnitudes are not independent of their position: a scale per row of
    64 (filters), runs of 8 nearly equal weights, sorted both ways, heavy tails. Sample select
    (csrc/cpu/sample_select.cpp) brackets the threshold from a sample of runs; these are the
    layouts that could mislead it."""
    g = torch.Generator().manual_seed(7)
    normal = torch.randn(n, generator=g)
    rows = torch.rand(n // 64 + 1, generator=g).repeat_interleave(64)[:n] * 4
    layers = [
        normal * rows,
        torch.randn(n // 8 + 1, generator=g).repeat_interleave(8)[:n] + 1e-4 * normal,
        normal.abs().sort().values,
        normal.abs().sort(descending=True).values,
        torch.distributions.Cauchy(0.0, 1.0).sample((n,)),
    ]
    return [t.to(device) for t in layers]


def _sampled_positions(n):
    """The elements sample select samples from an n-element layer (sample_keys in
    csrc/cpu/sample_select.cpp, mirrored here)."""
    m = 1024  # sample_size: the power of two nearest below (0.3 n)^(2/3), in [1024, 65536]
    while m < 65536 and 100.0 * (2.0 * m) ** 3 <= 9.0 * n * n:
        m *= 2
    runs = m // 8
    stride = n // runs
    hashes = [((r * 0x9E3779B97F4A7C15) % 2**64) >> 32 for r in range(runs)]
    starts = [r * stride + (h * (stride - 7) >> 32) for r, h in enumerate(hashes)]
    return torch.tensor(starts).repeat_interleave(8) + torch.arange(8).repeat(runs)


@pytest.mark.parametrize("sparsity", [1e-4, 0.05, 0.5, 0.9, 0.999])
def test_layers_with_structure_prune_exactly(native, device, sparsity):
    n = 100003  # one thread per layer: each holds under 1 / (2 * threads) of the elements
    tensors = _layers_like_real_ones(n, device)
    counts = [round(sparsity * n)] * len(tensors)
    _assert_same_step(_prune_both(native, tensors, "layer", counts))


def test_layers_with_structure_at_k_1_and_n(native, device):
    n = 70001
    tensors = _layers_like_real_ones(n, device)
    for k in (1, 2, n - 1, n):
        _assert_same_step(_prune_both(native, tensors, "layer", [k] * len(tensors)))


def test_a_misleading_sample_falls_back_exactly(native, device):
    """Every sampled element is made larger than all the others, so the sample's bracket lies
    above the true threshold: the kernel must find the miss and select by histogram."""
    tensors = []
    for n in (50000, 300007, 1 << 19):
        t = torch.randn(n) * 0.02
        t[_sampled_positions(n)] = 1.0 + torch.rand(len(_sampled_positions(n)))
        tensors.append(t.to(device))
    # Most elements, so that each of the others is selected by one thread.
    tensors.append(torch.randn(1 << 21, device=device))
    counts = [t.numel() // 2 for t in tensors]
    _assert_same_step(_prune_both(native, tensors, "layer", counts))
    _assert_same_select(native, tensors, "layer", counts)


def test_a_misleading_global_sample_falls_back_exactly(native, device):
    sizes = (40000, 7, 250001, 123457)
    flat = torch.randn(sum(sizes)) * 0.02
    positions = _sampled_positions(flat.numel())
    flat[positions] = 1.0 + torch.rand(len(positions))
    tensors = [t.to(device) for t in flat.split(sizes)]
    counts = [flat.numel() // 2]
    _assert_same_step(_prune_both(native, tensors, "global", counts))
    _assert_same_select(native, tensors, "global", counts)


def _assert_same_select(native, tensors, scope, counts):
    rows = []
    for backend in (native, REFERENCE):
        job = backend.prepare([t.clone() for t in tensors], None, scope, KEY_SPACE_NATIVE)
        job.set_counts(counts)
        backend.select(job)
        rows.append(job.rows.cpu())
    assert_same(rows[0], rows[1], "select rows")


def test_prepared_step_kept_counts_are_the_masks_counts(native, device):
    """After the fused prune (nothing counted: counted over the job's table) and after a build
    that zeroes (counted in the build where the backend does), the step's kept counts are the
    masks' set bits among each tensor's numel; a NaN row counts the mask it left."""
    tensors = [weights(n, torch.float32, device) for n in (1, 63, 70001, 2048 * 3 + 5)]
    tensors.append(weights(100, torch.bfloat16, device))
    tensors[2][5] = float("nan")
    masks = [_reference.pack_bits(torch.rand(t.numel(), device=device) < 0.5) for t in tensors]
    step = PreparedStep(tensors, masks, "layer")
    step.set_counts([round(0.7 * t.numel()) for t in tensors], per_tensor=True)
    step.run()
    assert step.kept_counts() == _reference.count_kept(tensors, masks)
    step.set_counts([round(0.2 * t.numel()) for t in tensors], per_tensor=True)
    step.run(build=False, apply=False)
    step.run(select=False)
    assert step.groups[0].counted == native.counts_in_build
    assert step.kept_counts() == _reference.count_kept(tensors, masks)
