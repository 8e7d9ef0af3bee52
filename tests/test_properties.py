"""Property tests: on arbitrary small inputs with ties, every backend meets the contract."""

from __future__ import annotations

import pytest
import torch

from gmp_ext.kernels import ops
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.layout import key_space_for

from .conftest import native_backend
from .utils import check_pruned_set

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

# A few magnitudes with both signs and both zeros, so ties are the rule, not the exception.
VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, float("inf"), -float("inf"), 1e-30]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensor_lists(draw):
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.integers(0, 300), min_size=1, max_size=4))
    mixed = draw(st.booleans())
    tensors = []
    for i, n in enumerate(sizes):
        values = draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n))
        tensors.append(torch.tensor(values, dtype=DTYPES[i % 3] if mixed else dtype))
    return tensors


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(tensors=tensor_lists(), sparsity=st.floats(0.0, 1.0))
def test_native_equals_reference_and_contract(tensors, sparsity):
    # The compiled CPU kernels, never the reference standing in for them (skips without _C).
    native = native_backend(torch.device("cpu"))
    ks = [ops.prune_count(t.numel(), sparsity) for t in tensors]
    rows = native.select_layerwise(tensors, ks)
    assert torch.equal(rows, _reference.select_layerwise(tensors, ks))
    for t, k, mask in zip(tensors, ks, ops.magnitude_masks(tensors, sparsity)):
        check_pruned_set(t, ops.unpack_mask(mask, t.shape), k)

    space = key_space_for({t.dtype for t in tensors})
    k = ops.prune_count(sum(t.numel() for t in tensors), sparsity)
    rows = native.select_global(tensors, k, space)
    assert torch.equal(rows, _reference.select_global(tensors, k, space))
    masks = ops.magnitude_masks(tensors, sparsity, scope="global")
    keep = torch.cat([ops.unpack_mask(m, t.shape) for m, t in zip(masks, tensors)])
    check_pruned_set(torch.cat([t.float() for t in tensors]), keep, k)
