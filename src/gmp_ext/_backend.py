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
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _reference
from ._layout import (
    DTYPE_CODES,
    KEY_SPACE_NATIVE,
    SELECTION_COLUMNS,
    TABLE_COLUMNS,
    mask_storage_bytes,
)

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
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), TABLE_COLUMNS)


_NONE = torch.empty(0, dtype=torch.uint8)


@dataclass(eq=False)
class Job:
    """Buffers of select -> build -> apply over a fixed list of tensors, made once by a
    backend's ``prepare`` and run any number of times: the tensor table (device-resident on
    CUDA), the counts to prune (``[n]`` for layer scope, ``[1]`` for global), the selection rows
    and the CUDA scratch. ``scope`` is "layer", "global", or None for a job that only builds
    or applies masks. The table holds raw addresses: ``tensors`` and ``masks`` keep them
    alive, and a tensor whose storage moves needs a new job."""

    tensors: list[torch.Tensor]
    masks: list[torch.Tensor]  # empty for a job that only selects
    scope: str | None
    key_space: int
    counts: torch.Tensor
    rows: torch.Tensor
    table: torch.Tensor = _NONE  # empty for the reference backend, which needs none
    tiles: int = 0
    scratch: torch.Tensor = _NONE  # empty for a job that only builds or applies masks

    def set_counts(self, counts: Sequence[int]) -> None:
        """Elements to prune, written without waiting for the device (read when select runs)."""
        self.counts.copy_(torch.tensor(list(counts), dtype=torch.int64), non_blocking=True)


def new_job(
    tensors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    scope: str | None,
    key_space: int,
    device: torch.device,
    table: torch.Tensor = _NONE,
    tiles: int = 0,
    scratch: torch.Tensor = _NONE,
) -> Job:
    """A job's buffers on ``device``: counts sized for ``scope``, zeroed selection rows."""
    n = len(tensors)
    counts = {"layer": n, "global": 1, None: 0}[scope]
    return Job(
        list(tensors),
        [] if masks is None else list(masks),
        scope,
        key_space,
        counts=torch.zeros(counts, dtype=torch.int64, device=device),
        rows=torch.zeros((n, SELECTION_COLUMNS), dtype=torch.int64, device=device),
        table=table,
        tiles=tiles,
        scratch=scratch,
    )


class Backend:
    """The ops every backend offers, written once over its job primitives (``prepare``,
    ``select``, ``build``, ``apply``)."""

    name: str

    def prepare(
        self,
        tensors: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor] | None = None,
        scope: str | None = None,
        key_space: int = KEY_SPACE_NATIVE,
    ) -> Job:
        raise NotImplementedError

    def select(self, job: Job) -> None:
        raise NotImplementedError

    def build(self, job: Job) -> None:
        raise NotImplementedError

    def apply(self, job: Job) -> None:
        raise NotImplementedError

    def select_layerwise(self, tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
        """Selection rows [n, 4]: tensor i prunes ks[i] elements."""
        job = self.prepare(tensors, None, "layer", KEY_SPACE_NATIVE)
        job.set_counts(ks)
        self.select(job)
        return job.rows

    def select_global(
        self, tensors: Sequence[torch.Tensor], k: int, key_space: int
    ) -> torch.Tensor:
        """Selection rows [n, 4] of one selection of k elements over all tensors."""
        job = self.prepare(tensors, None, "global", key_space)
        job.set_counts([k])
        self.select(job)
        return job.rows

    def build_masks(
        self,
        tensors: Sequence[torch.Tensor],
        selection: torch.Tensor,
        masks: Sequence[torch.Tensor],
    ) -> None:
        job = self.prepare(tensors, masks)
        job.rows = selection.to(job.rows.device).contiguous()
        self.build(job)

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        if tensors:
            self.apply(self.prepare(tensors, masks))

    def pack_bits(self, flags: torch.Tensor) -> torch.Tensor:
        """bool flags -> packed mask storage (bit i of byte i // 8 = flags[i], 1 = kept)."""
        raise NotImplementedError

    def unpack_bits(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        """Packed mask storage -> ``numel`` bool flags."""
        raise NotImplementedError


class CpuBackend(Backend):
    """Multi-threaded C++ kernels (csrc/cpu) on host memory; tensors must be contiguous."""

    name = "cpu"

    def __init__(self, module: ModuleType) -> None:
        self._C = module

    def prepare(self, tensors, masks=None, scope=None, key_space=KEY_SPACE_NATIVE) -> Job:
        cpu = torch.device("cpu")
        return new_job(tensors, masks, scope, key_space, cpu, table=build_table(tensors, masks))

    def select(self, job: Job) -> None:
        n, table, out = len(job.tensors), job.table.data_ptr(), job.rows.data_ptr()
        if job.scope == "layer":
            self._C.cpu_select_layerwise(table, n, job.counts.data_ptr(), out, _threads())
        else:
            k = int(job.counts[0])
            self._C.cpu_select_global(table, n, k, job.key_space, out, _threads())

    def build(self, job: Job) -> None:
        self._C.cpu_build_masks(
            job.table.data_ptr(), len(job.tensors), job.rows.data_ptr(), _threads()
        )

    def apply(self, job: Job) -> None:
        self._C.cpu_apply_masks(job.table.data_ptr(), len(job.tensors), _threads())

    def pack_bits(self, flags: torch.Tensor) -> torch.Tensor:
        flat = flags.reshape(-1).to(torch.uint8).contiguous()
        storage = torch.zeros(mask_storage_bytes(flat.numel()), dtype=torch.uint8)
        self._C.cpu_pack_bits(flat.data_ptr(), flat.numel(), storage.data_ptr(), _threads())
        return storage

    def unpack_bits(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        flags = torch.empty(numel, dtype=torch.uint8)
        self._C.cpu_unpack_bits(packed.data_ptr(), numel, flags.data_ptr(), _threads())
        return flags.view(torch.bool)


class ReferenceBackend(Backend):
    """Pure PyTorch on any device (``_reference.py``); its jobs read the counts on the host."""

    name = "reference"

    def prepare(self, tensors, masks=None, scope=None, key_space=KEY_SPACE_NATIVE) -> Job:
        device = tensors[0].device if tensors else torch.device("cpu")
        return new_job(tensors, masks, scope, key_space, device)

    def select(self, job: Job) -> None:
        if job.scope == "layer":
            rows = _reference.select_layerwise(job.tensors, job.counts.tolist())
        else:
            rows = _reference.select_global(job.tensors, int(job.counts[0]), job.key_space)
        job.rows.copy_(rows.reshape(job.rows.shape))

    def build(self, job: Job) -> None:
        _reference.build_masks(job.tensors, job.rows, job.masks)

    def apply(self, job: Job) -> None:
        _reference.apply_masks(job.tensors, job.masks)

    pack_bits = staticmethod(_reference.pack_bits)
    unpack_bits = staticmethod(_reference.unpack_bits)


REFERENCE = ReferenceBackend()
_instances: dict[str, Backend] = {}


def _native_backend(name: str) -> Backend:
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
