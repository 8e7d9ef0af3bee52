"""Fused multi-tensor apply: native == reference, all dtypes in one call, in place."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from gmp_ext.kernels import backends, ops
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_negative_zeros_become_positive_zeros(native, device, dtype):
    """-0.0 in pruned places of a mixed word, an all-pruned word and a partial word: the stores
    skipped for elements already zero must still write +0.0 over -0.0."""
    t = torch.randn(64 * 3 + 5, device=device).to(dtype)
    keep = torch.rand(t.numel(), device=device) < 0.5
    keep[64:128] = False
    t[~keep] = -0.0
    native.apply_masks([t], [ops.pack_mask(keep)])
    want = torch.where(keep, t, torch.zeros_like(t))
    assert_same(t, want)
    assert not torch.signbit(t[~keep]).any()


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


_STEADY_STATE_SCRIPT = r"""
import sys, warnings
import numpy as np, torch
from gmp_ext.kernels import reference
from gmp_ext.kernels.backends import native_backend

path, stray = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
sizes = [(64, torch.float32), (4096 + 33, torch.float32), (100003, torch.float32),
         (4096 + 33, torch.bfloat16), (100003, torch.bfloat16)]
flags, chunks = [], []
for numel, dtype in sizes:
    keep = torch.rand(numel) < 0.3
    keep[:128] = False  # all-pruned words
    values = torch.where(keep, torch.randn(numel), 0.0).to(dtype)  # +0.0 (x * 0 may be -0.0)
    flags.append(keep)
    chunks.append(values.view(torch.uint8))
if stray:  # a pruned element that is not zero: the apply has to write it
    chunks[2].view(torch.float32)[1] = 1.0
offsets, blob = [], bytearray()
for chunk in chunks:
    offsets.append(len(blob))
    blob += bytes(chunk.numpy()) + bytes(-len(chunk) % 64)
open(path, "wb").write(bytes(blob))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch warns that the array is not writable: the point
    memory = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r"))
tensors = [memory[o:o + len(c)].view(dtype) for o, c, (_, dtype) in zip(offsets, chunks, sizes)]
cpu = native_backend("cpu")
masks = [reference.pack_bits(f) for f in flags]
cpu.apply_masks(tensors, masks)
zeros = [int((t == 0).sum()) for t in tensors]
rows = cpu.select_layerwise(tensors, zeros)  # prunes exactly the zeros
job = cpu.prepare(tensors, [torch.zeros_like(m) for m in masks])
job.rows = rows
cpu.build(job, zero_pruned=True)
print("no write")
"""


def test_a_steady_state_apply_and_build_write_no_weights(tmp_path):
    """Weights that already hold their pruned zeros, mapped read-only: the CPU apply and the
    build that zeroes leave every byte unwritten (a store would fault), full and partial words,
    all-pruned words, fp32 and bf16. With one pruned element not zero the apply must write, and
    faults: the check can fail."""
    if backends.native() is None:
        pytest.skip("gmp_ext._C is not built")
    runs = [
        subprocess.run(
            [sys.executable, "-c", _STEADY_STATE_SCRIPT, str(tmp_path / "w.bin"), stray],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for stray in ("0", "1")
    ]
    assert runs[0].returncode == 0 and "no write" in runs[0].stdout, runs[0].stderr
    assert runs[1].returncode == -signal.SIGSEGV, (runs[1].returncode, runs[1].stderr)
