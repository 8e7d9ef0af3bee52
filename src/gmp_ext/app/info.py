"""``python -m gmp_ext``: what this installation can do."""

from __future__ import annotations

import ctypes
import platform
import sys
from types import ModuleType
from typing import Any

import torch

from gmp_ext._version import __version__
from gmp_ext.kernels import backends


def nvidia_driver_found() -> bool:
    """Whether the NVIDIA driver's library loads. Without it the CUDA runtime reports "CUDA
    driver version is insufficient for CUDA runtime version" although there is no driver at
    all, so the driver status below says so plainly instead."""
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _cuda_driver(module: ModuleType | None, build: dict[str, Any]) -> str:
    found = nvidia_driver_found()
    if module is None or not build.get("cuda"):
        return f"not used by this build ({'' if found else 'no '}NVIDIA driver found)"
    status = module.cuda_driver_status()
    if status == "ok":
        return "ok"
    if not found:
        return "no NVIDIA driver found: the CUDA kernels cannot run here"
    return status  # a driver is installed but unusable, e.g. older than the CUDA runtime


def collect() -> dict[str, object]:
    """Versions, the compiled module's build, backends and visible GPUs."""
    module = backends.native()
    build = dict(module.build_info()) if module is not None else {}
    if module is None:
        kernels = "-"
    elif build.get("cuda"):
        kernels = f"yes (CUDA {build.get('cuda_compiler_version') or 'version unknown'})"
    else:
        kernels = "no: CPU-only build (GMP_EXT_CPU_ONLY, or no nvcc when it was built)"
    info: dict[str, object] = {
        "gmp_ext": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "compiled module": "yes"
        if module is not None
        else f"missing ({backends.native_error()!r})",
        "OpenMP": build.get("openmp", False),
        "CUDA kernels compiled": kernels,
        "CUDA architectures": build.get("cuda_architectures") or "-",
        "CUDA driver": _cuda_driver(module, build),
        "CPU threads (torch)": torch.get_num_threads(),
        "backends available": ", ".join(backends.available_backends()),
        "backend override": backends.forced_backend() or f"none ({backends.ENV_BACKEND} unset)",
    }
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    info["visible GPUs"] = "; ".join(f"{i}: {name}" for i, name in enumerate(gpus)) or "none"
    return info


def print_info() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
