"""Packed masks: layout equals numpy.packbits(bitorder="little"); native == reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends import REFERENCE
from gmp_ext.kernels.layout import (
    KEY_SPACE_NATIVE,
    MASK_ALIGN_BYTES,
    mask_bytes,
    mask_storage_bytes,
)

from .utils import DTYPE_IDS, DTYPES, SIZES, assert_same, weights


@pytest.mark.parametrize("numel", SIZES)
def test_pack_matches_numpy_packbits(device, numel):
    flags = torch.rand(numel, device=device) < 0.3
    packed = ops.pack_mask(flags)
    want = np.packbits(flags.cpu().numpy(), bitorder="little")
    assert packed.numel() == mask_storage_bytes(numel)
    assert packed.numel() - mask_bytes(numel) < MASK_ALIGN_BYTES
    assert np.array_equal(packed[: mask_bytes(numel)].cpu().numpy(), want)
    assert not packed[mask_bytes(numel) :].any(), "padding must be zero"
    assert torch.equal(ops.unpack_mask(packed, flags.shape), flags)


@pytest.mark.parametrize("numel", SIZES)
def test_native_pack_unpack_equal_reference(native, device, numel):
    flags = torch.rand(numel, device=device) < 0.5
    assert_same(native.pack_bits(flags), _reference.pack_bits(flags))
    packed = _reference.pack_bits(flags)
    assert_same(native.unpack_bits(packed, numel), _reference.unpack_bits(packed, numel))


@pytest.mark.parametrize("numel", SIZES)
def test_popcount_counts_the_kept_flags(device, numel):
    """Whole 64-bit words and the bytes after them, in a padded mask and in one of exactly
    mask_bytes(numel) bytes (a tail of 1-7 bytes on the CPU's word path)."""
    flags = torch.rand(numel, device=device) < 0.7
    padded = ops.pack_mask(flags)
    exact = padded[: mask_bytes(numel)].clone()
    assert primitives.popcount(padded, numel) == int(flags.sum())
    assert primitives.popcount(exact, numel) == int(flags.sum())


def test_native_count_kept_equals_reference(native, device):
    """All sizes in one call (entries split across tiles and threads), bf16 and transposed
    tensors among them, masks of random bytes: bits past numel in the last byte are set and
    must not count."""
    dtypes = (torch.float32, torch.bfloat16)
    tensors = [weights(numel, dtype, device) for numel in SIZES for dtype in dtypes]
    tensors.append(torch.randn(67, 129, device=device).t())
    masks = [
        torch.randint(0, 256, (mask_storage_bytes(t.numel()),), dtype=torch.uint8, device=device)
        for t in tensors
    ]
    want = [int(_reference.unpack_bits(m, t.numel()).sum()) for t, m in zip(tensors, masks)]
    assert _reference.count_kept(tensors, masks) == want
    assert native.count_kept(native.prepare(tensors, masks)) == want
    assert native.count_kept(native.prepare([], [])) == []


def test_count_kept_routes_float64_to_the_reference(device):
    tensors = [weights(1000, torch.float64, device), weights(1000, torch.float32, device)]
    flags = [torch.rand(1000, device=device) < p for p in (0.2, 0.9)]
    masks = [ops.pack_mask(f) for f in flags]
    assert primitives.count_kept(tensors, masks) == [int(f.sum()) for f in flags]


def test_unpack_accepts_exact_numpy_buffer():
    flags = torch.rand(3, 5, 7) < 0.5
    raw = torch.from_numpy(np.packbits(flags.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(ops.unpack_mask(raw, flags.shape), flags)


def test_mask_bytes_per_weight():
    # ceil(n / 8) bytes plus at most 15 bytes of padding: 1 bit per weight.
    for numel in (1, 8, 9, 1000, 10**6 + 1):
        assert mask_bytes(numel) == -(-numel // 8)
        assert mask_bytes(numel) <= mask_storage_bytes(numel) < mask_bytes(numel) + 16


def test_new_mask_is_zeroed_aligned_storage(device):
    """Mask storage from new_mask (on the CPU a memset of its own, not torch.zeros) is all zero
    bytes, mask_storage_bytes long and MASK_ALIGN_BYTES aligned, also where freed memory full
    of ones is handed out again."""
    for numel in (0, 1, 33, 70001, 1 << 20):
        for _ in range(3):
            junk = torch.full((mask_storage_bytes(numel) + 64,), 0xFF, dtype=torch.uint8)
            del junk
            mask = primitives.new_mask(torch.empty(numel, device=device))
            assert mask.dtype == torch.uint8 and mask.device.type == device.type
            assert mask.shape == (mask_storage_bytes(numel),)
            assert mask.data_ptr() % MASK_ALIGN_BYTES == 0 or numel == 0
            assert not bool(mask.any()), numel


def test_build_masks_from_thresholds(device):
    t = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.0, 1.0], device=device)
    th = ops.select(t, 0.5)
    (mask,) = ops.build_masks([t], [th])
    assert ops.unpack_mask(mask, t.shape).tolist() == [True, False, True, True, False, False]


def test_pack_unpack_bad_input():
    with pytest.raises(TypeError, match="bool tensor"):
        ops.pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match="needs 2"):
        ops.unpack_mask(torch.zeros(1, dtype=torch.uint8), (3, 3))
    with pytest.raises(TypeError, match="uint8"):
        ops.unpack_mask(torch.zeros(2), (3,))
    with pytest.raises(ValueError, match="outside tensor"):
        ops.build_masks([torch.ones(3)], [ops.Threshold(1, 1.0, 0, 5, 0)])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_rows_with_nans_leave_their_masks_as_they_were(native, device, backend):
    """A selection void for NaN weights must not corrupt masks: such rows build nothing."""
    impl = native if backend == "native" else _reference
    tensors = [torch.randn(1, device=device), torch.zeros(33, device=device)]
    tensors.append(torch.randn(5000, device=device))
    masks = [primitives.new_mask(t).fill_(0xA5) for t in tensors]
    rows = torch.tensor(
        [[0, -1, 0, 1], [0, 10, 0, 0], [0, -1, 0, 7]], dtype=torch.int64, device=device
    )
    impl.build_masks(tensors, rows, masks)
    assert bool((masks[0] == 0xA5).all()) and bool((masks[2] == 0xA5).all())
    want = _reference.pack_bits(torch.arange(33, device=device) > 10)
    assert_same(masks[1][: mask_bytes(33)], want[: mask_bytes(33)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_build_that_zeroes_the_pruned_equals_build_then_apply(native, device, dtype):
    """build(zero_pruned=True), the apply fused into the build, against the reference's build
    followed by its apply: the same masks and weights, a NaN row zeroing by its old mask, full
    and partial tiles, a view one element off 16-byte alignment. A backend that counts in its
    build counts the masks as it left them (the NaN row's old one too)."""
    backing = weights(70001 + 1, dtype, device)
    tensors = [
        weights(2048 * 3, dtype, device, "pruned"),
        weights(70001, dtype, device),
        backing[1:],  # data one element past 16-byte alignment: the scalar paths
        weights(33, dtype, device, "few_values"),
        weights(100, dtype, device),
    ]
    tensors[4][7] = float("nan")
    ks = [round(0.6 * t.numel()) for t in tensors]
    old = [_reference.pack_bits(torch.rand(t.numel(), device=device) < 0.5) for t in tensors]
    results = []
    for backend in (native, REFERENCE):
        work = (
            [t.clone() for t in tensors[:2]]
            + [backing.clone()[1:]]
            + [t.clone() for t in tensors[3:]]
        )
        masks = [m.clone() for m in old]
        job = backend.prepare(work, None, "layer", KEY_SPACE_NATIVE)
        job.set_counts(ks)
        backend.select(job)
        build = backend.prepare(work, masks, None, KEY_SPACE_NATIVE)
        build.rows = job.rows
        if backend is REFERENCE:
            backend.build(build)
            backend.apply(build)
        else:
            backend.build(build, zero_pruned=True)
            if backend.counts_in_build:
                assert build.kept.tolist() == _reference.count_kept(work, masks)
        results.append((work, masks, job.rows))
    (work, masks, rows), (ref_work, ref_masks, ref_rows) = results
    assert_same(rows.cpu(), ref_rows.cpu(), "rows")
    assert int(rows[4, 3]) == 1  # the NaN row: its old mask is applied, not rebuilt
    for i in range(len(tensors)):
        assert_same(masks[i], ref_masks[i], f"mask {i}")
        assert_same(work[i], ref_work[i], f"weights {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("zero_pruned", [False, True], ids=["mask", "mask+zero"])
def test_build_around_ties_at_every_word_position(native, device, dtype, zero_pruned):
    """Rows whose threshold index falls at the start, inside and at the end of a 64-element word
    and outside the tensor, over heavy ties of the threshold key (words all of one side and
    straddling words, ties on both sides of each word boundary), +-inf among the kept, and -0.0
    as the only pruned value of some vectors (it must become +0.0), in tensors of 5 words and 17
    elements: native build (and build-and-zero) == the reference's build (and apply), masks and
    weights to the bit; a build alone writes no weight."""
    numel = 64 * 5 + 17
    # Ties (|0.25|) at positions 6 and 7 of every 8: at both ends of each word boundary.
    mixed = torch.tensor([0.5, 0.0, -0.0, float("inf"), float("-inf"), 1e-3, 0.25, -0.25])
    signed_zeros = torch.tensor([1.0, -0.0, -2.0, 0.0])  # ties at 0: the pruned are zeros
    cases = [
        (mixed, 0.25, (-1, 0, 6, 62, 63, 64, 70, 127, 128, 200, numel - 1)),
        (signed_zeros, 0.0, (-1, 1, 63, 100, numel - 1)),
    ]
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    for base, tie, indexes in cases:
        values = base[torch.arange(numel) % len(base)].to(dtype).to(device)
        key = int(torch.tensor([tie], dtype=dtype).view(int_type))
        for index in indexes:
            rows = torch.tensor([[key, index, KEY_SPACE_NATIVE, 0]], dtype=torch.int64)
            results = []
            for backend in (native, REFERENCE):
                work = [values.clone()]
                masks = [primitives.new_mask(work[0]).fill_(0x5A)]
                job = backend.prepare(work, masks, None, KEY_SPACE_NATIVE)
                job.rows = rows.to(device)
                if backend is REFERENCE:
                    backend.build(job)
                    if zero_pruned:
                        backend.apply(job)
                else:
                    backend.build(job, zero_pruned=zero_pruned)
                results.append((work[0], masks[0]))
            (got, got_mask), (want, want_mask) = results
            where = f"tie {tie}, index {index}"
            n = mask_bytes(numel)
            assert_same(got_mask[:n], want_mask[:n], f"mask, {where}")
            assert_same(got.view(int_type), want.view(int_type), f"weights, {where}")
            if not zero_pruned:
                assert_same(got.view(int_type), values.view(int_type), f"{where}: no writes")
