"""Fused multi-tensor apply: native == reference, all dtypes in one call, in place."""

from __future__ import annotations

import pytest
import torch

from gmp_ext.kernels import ops
from gmp_ext.kernels import reference as _reference

from .utils import DTYPES, SIZES, assert_same, weights


def _random_masks(tensors, density=0.4):
    return [_reference.pack_bits(torch.rand(t.numel(), device=t.device) < density) for t in tensors]


def test_apply_matches_reference_mixed_dtypes_one_call(native, device):
    tensors = [weights(n, DTYPES[i % 3], device, "specials") for i, n in enumerate(SIZES)]
    masks = _random_masks(tensors)
    want = [t.clone() for t in tensors]
    _reference.apply_masks(want, masks)
    native.apply_masks(tensors, masks)
    for got, exp in zip(tensors, want):
        assert_same(got, exp)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_all_pruned_and_all_kept_words(native, device, density):
    tensors = [weights(n, torch.float32, device) for n in (64, 4096, 100003)]
    before = [t.clone() for t in tensors]
    native.apply_masks(tensors, _random_masks(tensors, density))
    for t, b in zip(tensors, before):
        assert_same(t, b if density == 1.0 else torch.zeros_like(b))


def test_pruned_become_positive_zero_and_kept_are_untouched(device):
    t = torch.tensor([-1.0, -0.0, float("inf"), -float("inf"), 2.5], device=device)
    keep = torch.tensor([False, True, False, True, True], device=device)
    ops.apply_masks_([t], [ops.pack_mask(keep)])
    assert_same(t, torch.tensor([0.0, -0.0, 0.0, -float("inf"), 2.5], device=device))


def test_non_contiguous_in_place(device):
    t = torch.randn(8, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    keep = torch.rand(t.shape, device=device) < 0.5
    want = t.masked_fill(~keep, 0)
    storage = t.data_ptr()
    ops.apply_masks_([t], [ops.pack_mask(keep)])
    assert t.data_ptr() == storage and not t.is_contiguous()
    assert_same(t, want)


def test_unpadded_user_mask_is_accepted(device):
    t = torch.randn(37, device=device)
    keep = torch.rand(37, device=device) < 0.5
    exact = ops.pack_mask(keep)[:5].clone()  # ceil(37 / 8) bytes, no padding
    ops.apply_masks_([t], [exact])
    assert torch.equal(t != 0, keep)


def test_bad_masks_leave_tensors_untouched(device):
    t = torch.randn(20, device=device)
    before = t.clone()
    with pytest.raises(ValueError, match="at least 3 bytes"):
        ops.apply_masks_([t], [torch.zeros(2, dtype=torch.uint8, device=device)])
    with pytest.raises(TypeError, match="uint8"):
        ops.apply_masks_([t], [torch.zeros(20, dtype=torch.bool, device=device)])
    with pytest.raises(ValueError, match="1 masks for 2 tensors"):
        ops.apply_masks_([t, t], [torch.zeros(3, dtype=torch.uint8, device=device)])
    assert_same(t, before)
