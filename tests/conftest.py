from __future__ import annotations

import os
import random

import pytest
import torch

from gmp_ext.kernels import backends

# GMP_EXT_TEST_DEVICE=cpu|cuda restricts the device grid (default: every device present).
_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICES = [d for d in _DEVICES if os.environ.get("GMP_EXT_TEST_DEVICE", d) == d]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def native_backend(device: torch.device):
    """The native backend for the device, skipping when it is not built or has no kernels."""
    if backends.native() is None:
        pytest.skip("gmp_ext._C is not built")
    if device.type == "cuda":
        if not backends.cuda_kernels_available():
            pytest.skip("CUDA kernels unavailable")
        return backends.native_backend("cuda")
    return backends.native_backend("cpu")


@pytest.fixture
def native(device):
    return native_backend(device)
