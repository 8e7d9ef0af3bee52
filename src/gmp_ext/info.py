"""``python -m gmp_ext``: what this installation can do."""

from __future__ import annotations

import platform

import torch

from . import _backend
from ._version import __version__


def collect() -> dict[str, object]:
    """Versions, the compiled module's build, backends and visible GPUs."""
    module = _backend.native()
    build = dict(module.build_info()) if module is not None else {}
    info: dict[str, object] = {
        "gmp_ext": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "compiled module": "yes"
        if module is not None
        else f"missing ({_backend.native_error()!r})",
        "OpenMP": build.get("openmp", False),
        "CUDA kernels compiled": build.get("cuda", False),
        "CUDA architectures": build.get("cuda_architectures") or "-",
        "CUDA driver": module.cuda_driver_status() if build.get("cuda") else "-",
        "CPU threads (torch)": torch.get_num_threads(),
        "backends available": ", ".join(_backend.available_backends()),
        "backend override": _backend.forced_backend() or f"none ({_backend.ENV_BACKEND} unset)",
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
