"""The backend table: which implementation of the ops runs for a device.

``cuda`` and ``cpu`` call the compiled module ``gmp_ext._C`` with raw pointers; ``reference``
is pure PyTorch (``gmp_ext.kernels.reference``). ``GMP_EXT_BACKEND=cuda|cpu|reference`` forces one.
When ``_C`` cannot be imported the package still works on ``reference`` and warns once; asking
for a native backend explicitly then raises with the install hint and the original import error.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from gmp_ext.kernels.backends.base import Backend, Job
from gmp_ext.kernels.backends.cpu import CpuBackend
from gmp_ext.kernels.backends.cuda import CudaBackend
from gmp_ext.kernels.backends.reference import ReferenceBackend
from gmp_ext.kernels.layout import check_native_layout

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "REFERENCE",
    "Backend",
    "Job",
    "available_backends",
    "backend_for",
    "cuda_kernels_available",
    "forced_backend",
    "native",
    "native_backend",
    "native_error",
]

BACKENDS = ("cuda", "cpu", "reference")
ENV_BACKEND = "GMP_EXT_BACKEND"

_native: ModuleType | None = None
_native_error: BaseException | None = None
_native_loaded = False
_warned_missing = False


def native() -> ModuleType | None:
    """The compiled module, or None (the import error is kept for messages)."""
    global _native, _native_error, _native_loaded
    if not _native_loaded:
        _native_loaded = True
        try:  # torch is imported first so its OpenMP runtime is the one both share
            module = importlib.import_module("gmp_ext._C")  # optional: a build may lack it
        except ImportError as error:
            _native_error = error
        else:
            check_native_layout(module.build_info())
            _native = module
    return _native


def native_error() -> BaseException | None:
    native()
    return _native_error


def _install_hint() -> str:
    return (
        "gmp_ext's compiled module gmp_ext._C is not available "
        f"({native_error()!r}). Reinstall with `pip install .` from the source tree "
        "(a C++17 compiler is needed; nvcc adds the CUDA kernels), "
        f"or set {ENV_BACKEND}=reference to run the pure-PyTorch backend."
    )


def cuda_kernels_available() -> bool:
    """True when _C was built with the CUDA selection kernels and a driver answers."""
    module = native()
    return (
        module is not None
        and hasattr(module, "cuda_select_layerwise")
        and module.cuda_device_count() > 0
    )


def available_backends() -> list[str]:
    names = []
    if cuda_kernels_available():
        names.append("cuda")
    if native() is not None:
        names.append("cpu")
    names.append("reference")
    return names


REFERENCE = ReferenceBackend()
_instances: dict[str, Backend] = {}


def native_backend(name: str) -> Backend:
    """The ``cpu`` or ``cuda`` backend over the compiled module (RuntimeError with the install
    hint when it is missing)."""
    if name not in _instances:
        module = native()
        if module is None:
            raise RuntimeError(_install_hint())
        if name == "cuda":
            _instances[name] = CudaBackend(module)
        else:
            _instances[name] = CpuBackend(module)
    return _instances[name]


def forced_backend() -> str | None:
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND} must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def backend_for(device: torch.device) -> Backend:
    """The backend that runs ops on tensors of ``device`` (honours GMP_EXT_BACKEND)."""
    global _warned_missing
    forced = forced_backend()
    if forced == "reference":
        return REFERENCE
    if forced is not None:
        if forced != device.type:
            raise RuntimeError(
                f"{ENV_BACKEND}={forced} cannot run tensors on device {device}; "
                f"use {ENV_BACKEND}=reference or move the tensors"
            )
        if forced == "cuda" and not cuda_kernels_available():
            raise RuntimeError(
                f"{ENV_BACKEND}=cuda, but gmp_ext._C has no usable CUDA kernels "
                "(run `python -m gmp_ext` for the build and driver status)"
            )
        return native_backend(forced)
    if device.type == "cpu" and native() is not None:
        return native_backend("cpu")
    if device.type == "cuda" and cuda_kernels_available():
        return native_backend("cuda")
    if native() is None and not _warned_missing:
        _warned_missing = True
        warnings.warn(
            _install_hint() + " Falling back to the pure-PyTorch reference backend.",
            RuntimeWarning,
            stacklevel=3,
        )
    return REFERENCE
