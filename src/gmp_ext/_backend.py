"""Backend table: which implementation of the ops runs for a device.

``cuda`` and ``cpu`` call the compiled module ``gmp_ext._C`` with raw pointers; ``reference``
is pure PyTorch (``_reference.py``). ``GMP_EXT_BACKEND=cuda|cpu|reference`` forces one. When
``_C`` cannot be imported the package still works on ``reference`` and warns once; asking for a
native backend explicitly then raises with the install hint and the original import error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from . import _reference
from ._layout import DTYPE_CODES, SELECTION_COLUMNS, TABLE_COLUMNS, mask_storage_bytes

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
            from . import _C

            _native = _C
        except ImportError as error:
            _native_error = error
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


def _threads() -> int:
    return torch.get_num_threads()


def build_table(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    tile_elems: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """int64 [n, 6] rows of csrc/common/tensor_table.h: TensorEntry."""
    rows, elem_base, tile_base = [], 0, 0
    for i, tensor in enumerate(tensors):
        numel = tensor.numel()
        mask_ptr = masks[i].data_ptr() if masks is not None else 0
        rows.append(
            [tensor.data_ptr(), mask_ptr, numel, DTYPE_CODES[tensor.dtype], elem_base, tile_base]
        )
        elem_base += numel
        if tile_elems:
            tile_base += -(-numel // tile_elems)
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), TABLE_COLUMNS)
    return table if device is None else table.to(device)


def _selection_rows(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty((n, SELECTION_COLUMNS), dtype=torch.int64, device=device)


class CpuBackend:
    """Multi-threaded C++ kernels (csrc/cpu) on host memory; tensors must be contiguous."""

    name = "cpu"

    def __init__(self, module: ModuleType) -> None:
        self._C = module

    def select_layerwise(self, tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
        table = build_table(tensors)
        k = torch.tensor(list(ks), dtype=torch.int64)
        out = _selection_rows(len(tensors), torch.device("cpu"))
        self._C.cpu_select_layerwise(
            table.data_ptr(), len(tensors), k.data_ptr(), out.data_ptr(), _threads()
        )
        return out

    def select_global(
        self, tensors: Sequence[torch.Tensor], k: int, key_space: int
    ) -> torch.Tensor:
        table = build_table(tensors)
        out = _selection_rows(len(tensors), torch.device("cpu"))
        self._C.cpu_select_global(
            table.data_ptr(), len(tensors), k, key_space, out.data_ptr(), _threads()
        )
        return out

    def build_masks(
        self,
        tensors: Sequence[torch.Tensor],
        selection: torch.Tensor,
        masks: Sequence[torch.Tensor],
    ) -> None:
        table = build_table(tensors, masks)
        rows = selection.contiguous()
        self._C.cpu_build_masks(table.data_ptr(), len(tensors), rows.data_ptr(), _threads())

    def apply_plan(
        self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """The table of one fused apply; the mask store caches it between optimizer steps."""
        return build_table(tensors, masks), 0

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        self.run_apply(self.apply_plan(tensors, masks))

    def run_apply(self, plan: tuple[torch.Tensor, int]) -> None:
        table, _ = plan
        self._C.cpu_apply_masks(table.data_ptr(), table.shape[0], _threads())

    def pack_bits(self, flags: torch.Tensor) -> torch.Tensor:
        flat = flags.reshape(-1).to(torch.uint8).contiguous()
        storage = torch.zeros(mask_storage_bytes(flat.numel()), dtype=torch.uint8)
        self._C.cpu_pack_bits(flat.data_ptr(), flat.numel(), storage.data_ptr(), _threads())
        return storage

    def unpack_bits(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        flags = torch.empty(numel, dtype=torch.uint8)
        self._C.cpu_unpack_bits(packed.data_ptr(), numel, flags.data_ptr(), _threads())
        return flags.view(torch.bool)


class ReferenceBackend:
    """Pure PyTorch on any device (``_reference.py``)."""

    name = "reference"

    select_layerwise = staticmethod(_reference.select_layerwise)
    select_global = staticmethod(_reference.select_global)
    build_masks = staticmethod(_reference.build_masks)
    apply_masks = staticmethod(_reference.apply_masks)
    pack_bits = staticmethod(_reference.pack_bits)
    unpack_bits = staticmethod(_reference.unpack_bits)

    @staticmethod
    def apply_plan(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
        return list(tensors), list(masks)

    @staticmethod
    def run_apply(plan) -> None:
        _reference.apply_masks(*plan)


REFERENCE = ReferenceBackend()
_instances: dict[str, object] = {}


def _native_backend(name: str):
    if name not in _instances:
        module = native()
        if module is None:
            raise RuntimeError(_install_hint())
        if name == "cuda":
            from ._cuda import CudaBackend

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


def backend_for(device: torch.device):
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
        return _native_backend(forced)
    if device.type == "cpu" and native() is not None:
        return _native_backend("cpu")
    if device.type == "cuda" and cuda_kernels_available():
        return _native_backend("cuda")
    if native() is None and not _warned_missing:
        _warned_missing = True
        warnings.warn(
            _install_hint() + " Falling back to the pure-PyTorch reference backend.",
            RuntimeWarning,
            stacklevel=3,
        )
    return REFERENCE
