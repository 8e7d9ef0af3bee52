"""CUDA backend: the kernels of csrc/cuda driven with torch-owned memory.

Tables, k arrays and scratch are allocated by torch on the tensors' device (the caching
allocator, never cudaMalloc in the extension) and every launch goes on torch's current stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import _reference
from ._backend import build_table

_MODE_LAYERWISE = 0
_MODE_GLOBAL = 1


class CudaBackend:
    name = "cuda"

    def __init__(self, module: ModuleType) -> None:
        self._C = module
        self.tile_elems = int(module.build_info()["cuda_tile_elems"])

    def _tiles(self, tensors: Sequence[torch.Tensor]) -> int:
        return sum(-(-t.numel() // self.tile_elems) for t in tensors)

    @staticmethod
    def _stream(device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def _scratch(self, n: int, total: int, mode: int, device: torch.device) -> torch.Tensor:
        nbytes = int(self._C.cuda_select_scratch_bytes(n, total, mode))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def select_layerwise(self, tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
        device = tensors[0].device
        with torch.cuda.device(device):
            table = build_table(tensors, None, self.tile_elems, device)
            k = torch.tensor(list(ks), dtype=torch.int64).to(device)
            out = torch.empty((len(tensors), 4), dtype=torch.int64, device=device)
            scratch = self._scratch(len(tensors), sum(t.numel() for t in tensors), 0, device)
            self._C.cuda_select_layerwise(
                table.data_ptr(),
                len(tensors),
                k.data_ptr(),
                out.data_ptr(),
                scratch.data_ptr(),
                scratch.numel(),
                self._tiles(tensors),
                self._stream(device),
            )
        return out

    def select_global(
        self, tensors: Sequence[torch.Tensor], k: int, key_space: int
    ) -> torch.Tensor:
        device = tensors[0].device
        with torch.cuda.device(device):
            table = build_table(tensors, None, self.tile_elems, device)
            out = torch.empty((len(tensors), 4), dtype=torch.int64, device=device)
            scratch = self._scratch(len(tensors), sum(t.numel() for t in tensors), 1, device)
            self._C.cuda_select_global(
                table.data_ptr(),
                len(tensors),
                k,
                key_space,
                out.data_ptr(),
                scratch.data_ptr(),
                scratch.numel(),
                self._tiles(tensors),
                self._stream(device),
            )
        return out

    def build_masks(
        self,
        tensors: Sequence[torch.Tensor],
        selection: torch.Tensor,
        masks: Sequence[torch.Tensor],
    ) -> None:
        device = tensors[0].device
        with torch.cuda.device(device):
            table = build_table(tensors, masks, self.tile_elems, device)
            rows = selection.to(device).contiguous()
            self._C.cuda_build_masks(
                table.data_ptr(),
                len(tensors),
                rows.data_ptr(),
                self._tiles(tensors),
                self._stream(device),
            )

    def apply_plan(
        self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """Device-resident table + tile count, built once and reused every step."""
        table = build_table(tensors, masks, self.tile_elems, tensors[0].device)
        return table, self._tiles(tensors)

    def apply_masks(self, tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        if tensors:
            self.run_apply(self.apply_plan(tensors, masks))

    def run_apply(self, plan: tuple[torch.Tensor, int]) -> None:
        """One launch for all tensors of the device; no host metadata per step."""
        table, tiles = plan
        with torch.cuda.device(table.device):
            self._C.cuda_apply_masks(
                table.data_ptr(), table.shape[0], tiles, self._stream(table.device)
            )

    pack_bits = staticmethod(_reference.pack_bits)
    unpack_bits = staticmethod(_reference.unpack_bits)
