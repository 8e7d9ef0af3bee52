"""Selection: native kernels against the reference (exact), and the contract itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KEY_SPACE_WIDE, key_space_for

from .utils import (
    DTYPE_IDS,
    DTYPES,
    KINDS,
    SAMPLE_AIMS,
    SIZES,
    SPARSITIES,
    aimed_at_sample,
    assert_same,
    check_pruned_set,
    weights,
)


def _ks(tensors, sparsity):
    return [round(sparsity * t.numel()) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_matches_reference(native, device, dtype, numel, kind):
    t = weights(numel, dtype, device, kind)
    for sparsity in SPARSITIES:
        ks = _ks([t], sparsity)
        got = native.select_layerwise([t], ks)
        want = _reference.select_layerwise([t], ks)
        assert_same(got, want, f"{kind} n={numel} s={sparsity}")
        mask = primitives.new_mask(t)
        native.build_masks([t], got, [mask])
        keep = _reference.unpack_bits(mask, numel)
        check_pruned_set(t, keep, ks[0])


def test_layerwise_batches_many_sizes_in_one_call(native, device):
    tensors = [
        weights(n, dt, device, kind)
        for n in SIZES
        for dt in DTYPES
        for kind in ("normal", "pruned")
    ]
    ks = [round(((i * 37) % 101) / 100 * t.numel()) for i, t in enumerate(tensors)]
    assert_same(native.select_layerwise(tensors, ks), _reference.select_layerwise(tensors, ks))


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 3,
        [torch.bfloat16] * 3,
        [torch.float16] * 3,
        [torch.float32, torch.bfloat16, torch.float16],
    ],
    ids=["fp32", "bf16", "fp16", "mixed"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_global_matches_reference(native, device, dtypes, kind):
    sizes = [70001, 0, 1, 4099]
    tensors = [weights(n, dtypes[i % 3], device, kind) for i, n in enumerate(sizes)]
    key_space = key_space_for({t.dtype for t in tensors})
    assert key_space == (KEY_SPACE_NATIVE if len(set(dtypes)) == 1 else KEY_SPACE_WIDE)
    total = sum(sizes)
    for sparsity in SPARSITIES:
        k = round(sparsity * total)
        got = native.select_global(tensors, k, key_space)
        assert_same(got, _reference.select_global(tensors, k, key_space), f"s={sparsity}")
        masks = [primitives.new_mask(t) for t in tensors]
        native.build_masks(tensors, got, masks)
        keep = torch.cat(
            [_reference.unpack_bits(m, t.numel()).cpu() for m, t in zip(masks, tensors)]
        )
        values = torch.cat([t.float().reshape(-1).cpu() for t in tensors])
        check_pruned_set(values, keep, k)


def _steady_state(tensors, sparsity):
    """The tensors after a prune at ``sparsity``: the pruned weights hold +0.0 (-0.0 where the
    sign was negative, which ties with it), as the zero fast path expects to find them."""
    out = []
    for t in tensors:
        t = t.clone()
        flat = t.reshape(-1)
        order = torch.argsort(flat.float().abs().cpu(), stable=True)[: round(sparsity * t.numel())]
        flat[order.to(t.device)] *= 0.0
        out.append(t)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_steady_state_zero_fast_path(native, device, dtype):
    # Sizes around the small-entry limit and one entry large enough to be shared by all threads;
    # k equal to the zeros (fast path), one below, and one above (the normal digit passes).
    sizes = [1 << 20, 100, 16384, 16385, 70001, 200003]
    tensors = _steady_state([weights(n, dtype, device) for n in sizes], 0.5)
    zeros = [int((t == 0).sum()) for t in tensors]
    for delta in (0, -1, 1, -(1 << 12)):
        ks = [min(max(z + delta, 0), t.numel()) for z, t in zip(zeros, tensors)]
        got = native.select_layerwise(tensors, ks)
        assert_same(got, _reference.select_layerwise(tensors, ks), f"layer k=zeros{delta:+d}")
        k = min(max(sum(zeros) + delta, 0), sum(sizes))
        key_space = key_space_for({dtype})
        got = native.select_global(tensors, k, key_space)
        assert_same(
            got, _reference.select_global(tensors, k, key_space), f"global k=zeros{delta:+d}"
        )


def _cpu_sampled_positions(numel: int) -> torch.Tensor:
    """The elements the CPU's sample select reads of ``numel`` (csrc/cpu/sample_select.cpp:
    sample_size, sample_keys): m keys, the power of two below (0.3 n)^(2/3) within [2^10, 2^16],
    in runs of 8, one run from each of m / 8 equal strides at a Fibonacci-hashed offset."""
    m = 1024
    while m < 1 << 16 and 100 * (2 * m) ** 3 <= 9 * numel**2:
        m *= 2
    runs = m // 8
    stride = numel // runs
    span = stride - 7
    starts = [
        r * stride + (((((r * 0x9E3779B97F4A7C15) % (1 << 64)) >> 32) * span) >> 32)
        for r in range(runs)
    ]
    return (torch.tensor(starts)[:, None] + torch.arange(8)).flatten()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("aim", SAMPLE_AIMS)
def test_cpu_sample_select_falls_back_exactly_on_data_aimed_at_its_sample(
    native, device, aim, dtype
):
    """Values chosen where the CPU samples (fp32, and 16-bit ones, whose native keys take the
    16-lane read): its bracket misses low or high, many more elements than expected fall inside
    it, a NaN hides outside it, or exact ties of the target's value crowd it. Per layer (one
    tensor) and global (two, the runs crossing between them), the rows stay exact and the NaN
    is counted."""
    if device.type != "cpu":
        pytest.skip("the CPU's sample positions (the device's: test_cuda.py)")
    sizes = [(1 << 20) + 11, 70001]
    numel = sum(sizes)
    generator = torch.Generator().manual_seed(7)
    for scope in ("layer", "global"):
        total = sizes[0] if scope == "layer" else numel
        picked = _cpu_sampled_positions(total)
        for sparsity in (0.01, 0.5, 0.9):
            values = aimed_at_sample(total, picked, sparsity, aim, generator).to(dtype)
            k = round(sparsity * total)
            what = f"{aim} {scope} s={sparsity}"
            if scope == "layer":
                got = native.select_layerwise([values], [k])
                assert_same(got, _reference.select_layerwise([values], [k]), what)
            else:
                tensors = list(values.split(sizes))
                got = native.select_global(tensors, k, KEY_SPACE_NATIVE)
                want = _reference.select_global(tensors, k, KEY_SPACE_NATIVE)
                assert_same(got, want, what)
            # A global selection reports its NaN count on every row.
            assert got[:, 3].tolist() == [int(aim == "nan outside")] * len(got), what


def test_global_ties_break_by_tensor_position_then_index(native, device):
    a = torch.full((10,), 0.25, device=device)
    b = torch.full((10,), 0.25, device=device)
    masks = ops.magnitude_masks([a, b], 0.75, scope="global")
    keep_a = ops.unpack_mask(masks[0], a.shape)
    keep_b = ops.unpack_mask(masks[1], b.shape)
    assert not keep_a.any()
    assert keep_b.tolist() == [False] * 5 + [True] * 5


def test_global_equals_concatenated_layer_selection(native, device):
    tensors = [weights(n, torch.float32, device, "few_values") for n in (1000, 333, 2048)]
    joined = torch.cat([t.reshape(-1) for t in tensors])
    for sparsity in (0.2, 0.5, 0.8):
        per_tensor = ops.magnitude_masks(tensors, sparsity, scope="global")
        keep = torch.cat([ops.unpack_mask(m, t.shape) for m, t in zip(per_tensor, tensors)])
        (whole,) = ops.magnitude_masks([joined], sparsity)
        assert torch.equal(keep, ops.unpack_mask(whole, joined.shape))


def test_matches_torch_prune_on_tie_free_input(device):
    for numel, amount in [(1000, 0.3), (4097, 0.9), (333, 0.5)]:
        linear = torch.nn.Linear(numel, 1, bias=False).to(device)
        weight = linear.weight.detach().clone()
        prune.l1_unstructured(linear, "weight", amount=amount)
        (mask,) = ops.magnitude_masks([weight], amount)
        assert torch.equal(ops.unpack_mask(mask, weight.shape), linear.weight_mask.bool())


def test_global_matches_torch_global_unstructured(device):
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20)).to(device)
    weights_before = [m.weight.detach().clone() for m in model]
    prune.global_unstructured(
        [(m, "weight") for m in model], pruning_method=prune.L1Unstructured, amount=0.6
    )
    masks = ops.magnitude_masks(weights_before, 0.6, scope="global")
    for m, mask, w in zip(model, masks, weights_before):
        assert torch.equal(ops.unpack_mask(mask, w.shape), m.weight_mask.bool())


def test_select_thresholds(device):
    t = torch.tensor([0.5, -0.1, 0.3, -0.3, 0.0, 2.0], device=device)
    th = ops.select(t, 0.5)
    assert (th.k, th.value, th.index) == (3, pytest.approx(0.3, rel=1e-7), 2)
    assert ops.select(t, 0.0) == ops.Threshold(0, 0.0, 0, -1, KEY_SPACE_NATIVE)
    bf = ops.select(t.bfloat16(), 1.0)
    assert bf.value == 2.0 and bf.index == 5
    half = ops.select(t.half(), 0.5)
    assert half.value == float(np.float16(0.3))


def test_select_global_reports_per_tensor_counts(device):
    a = torch.arange(1.0, 11.0, device=device)
    b = torch.arange(0.5, 10.5, device=device)
    th = ops.select_global([a, b], 0.5)
    assert [x.k for x in th] == [5, 5]
    assert th[0].value == th[1].value == 5.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_is_rejected_naming_the_tensor(device, dtype):
    t = weights(100, dtype, device)
    t[17] = float("nan")
    before = t.clone()
    with pytest.raises(ValueError, match=r"tensors\[1\] has 1 NaN"):
        ops.select_layerwise([weights(10, dtype, device), t], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        ops.magnitude_masks([weights(10, dtype, device), t], 0.5, scope="global")
    with pytest.raises(ValueError, match="NaN"):
        ops.select(t, 0.0)
    assert_same(t, before)


def test_native_counts_nans_in_every_bucket(native, device):
    # NaN payloads that share the infinity bucket of the 16-bit high digit, and ones above it.
    bits = torch.tensor([0x7F800001, 0x7FC00000, 0xFF800001 - (1 << 32)], dtype=torch.int32)
    for b in bits:
        t = torch.cat([torch.randn(70000), torch.tensor([float("inf")])])
        t[5] = b.view(torch.float32)
        rows = native.select_layerwise([t.to(device)], [10])
        assert int(rows[0, 3]) == 1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_bad_sparsity(device, bad):
    with pytest.raises(ValueError, match="sparsity"):
        ops.select(torch.ones(4, device=device), bad)


def test_bad_tensors():
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int64"):
        ops.select_layerwise([torch.ones(3, dtype=torch.int64)], 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.select_layerwise([[1.0, 2.0]], 0.5)
    with pytest.raises(TypeError, match="single tensor"):
        ops.select_layerwise(torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="meta device"):
        ops.select(torch.empty(3, device="meta"), 0.5)
    with pytest.raises(ValueError, match="3 sparsities for 2 tensors"):
        ops.select_layerwise([torch.ones(2), torch.ones(2)], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scope"):
        ops.magnitude_masks([torch.ones(2)], 0.5, scope="block")


def test_non_contiguous_uses_flatten_order(device):
    base = torch.randn(8, 16, 3, 3, device=device)
    channels_last = base.to(memory_format=torch.channels_last)
    transposed = torch.randn(40, 30, device=device).t()
    for t in (channels_last, transposed):
        assert not t.is_contiguous()
        (mask,) = ops.magnitude_masks([t], 0.7)
        (want,) = ops.magnitude_masks([t.contiguous()], 0.7)
        assert torch.equal(mask, want)


def test_float64_goes_through_reference(device):
    t = torch.randn(1000, dtype=torch.float64, device=device)
    th = ops.select(t, 0.25)
    assert th.value == float(t.abs().sort().values[249])
    masks = ops.magnitude_masks([t, t.float()], 0.5, scope="global")
    assert all(m.dtype == torch.uint8 for m in masks)
