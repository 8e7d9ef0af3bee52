"""Constants shared with the C++ headers (csrc/common/): dtype codes, key spaces, mask layout,
and the scale columns of a tensor table row."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# csrc/common/dtype.h: DType
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# csrc/common/dtype.h: KeySpace. WIDE64 exists only in the reference backend (float64 weights).
KEY_SPACE_NATIVE = 0
KEY_SPACE_WIDE = 1
KEY_SPACE_WIDE64 = 2

# csrc/common/bitpack.h: kMaskAlignBytes
MASK_ALIGN_BYTES = 16

# csrc/common/tensor_table.h: TensorEntry and Selection column counts
TABLE_COLUMNS = 9
SELECTION_COLUMNS = 4


class KeyScale(NamedTuple):
    """What a scaled tensor ranks (csrc/common/tensor_table.h: TensorEntry::scale): |w| times
    ``factors[j]`` for every element whose index along dimension ``dim`` is ``j``, one float32
    multiply each (Wanda: the input features' norms), computed by the kernels as they read the
    weights. ``factors``: float32, contiguous, ``>= 0``, on the weight's device, ``shape[dim]``
    of them."""

    factors: torch.Tensor
    dim: int

    def columns(self, tensor: torch.Tensor) -> tuple[int, int, int]:
        """The row's (scale, scale_inner, scale_count) for contiguous ``tensor``; ValueError
        unless the factors are as the class says (the kernels read them by address)."""
        factors, dim, shape = self.factors, self.dim, tensor.shape
        if not isinstance(dim, int) or not 0 <= dim < tensor.dim():
            raise ValueError(f"KeyScale.dim must be in [0, {tensor.dim()}), got {dim!r}")
        if (
            factors.dtype != torch.float32
            or not factors.is_contiguous()
            or factors.device != tensor.device
            or factors.shape != (shape[dim],)
        ):
            raise ValueError(
                f"KeyScale.factors must be {shape[dim]} contiguous float32 values on "
                f"{tensor.device} (dimension {dim} of {tuple(shape)}), got "
                f"{tuple(factors.shape)} {factors.dtype} on {factors.device}"
                f"{'' if factors.is_contiguous() else ', not contiguous'}"
            )
        return factors.data_ptr(), math.prod(shape[dim + 1 :]), shape[dim]

    def weighted(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranked values themselves: ``|tensor| * factors`` along ``dim``, float32 (the
        reference the kernels match bit for bit)."""
        shape = [1] * tensor.dim()
        shape[self.dim] = -1
        return tensor.detach().abs().float().mul_(self.factors.view(shape))

    def moved(self, source: int, destination: int, ndim: int) -> KeyScale:
        """The same factors for the tensor's view ``movedim(source, destination)``."""
        order = list(range(ndim))
        order.insert(destination % ndim, order.pop(source % ndim))
        return KeyScale(self.factors, order.index(self.dim))


# csrc/common/nm.h: kMaxGroup and valid_group
MAX_NM_GROUP = 32


def valid_nm(n: int, m: int) -> bool:
    """An N:M pattern the kernels take: ``m`` a power of two from 2 to MAX_NM_GROUP (so groups
    tile the kernels' 64-element mask words) and ``1 <= n < m``."""
    return 2 <= m <= MAX_NM_GROUP and m & (m - 1) == 0 and 1 <= n < m


def mask_bytes(numel: int) -> int:
    """Bytes of a packed mask: ceil(numel / 8)."""
    return -(-numel // 8)


def mask_storage_bytes(numel: int) -> int:
    """Bytes gmp_ext allocates for a packed mask: mask_bytes padded to MASK_ALIGN_BYTES."""
    return -(-mask_bytes(numel) // MASK_ALIGN_BYTES) * MASK_ALIGN_BYTES


def key_space_for(dtypes: set[torch.dtype]) -> int:
    """Key space of a global selection: native when one dtype, else the common 32-bit one."""
    if torch.float64 in dtypes:
        return KEY_SPACE_WIDE64
    return KEY_SPACE_NATIVE if len(dtypes) <= 1 else KEY_SPACE_WIDE


def check_native_layout(info: dict[str, object]) -> None:
    """RuntimeError unless the compiled module's layout (``_C.build_info()``) is the one
    mirrored here: a stale build would otherwise read tables and masks wrongly."""
    expected = {
        "mask_align_bytes": MASK_ALIGN_BYTES,
        "table_columns": TABLE_COLUMNS,
        "selection_columns": SELECTION_COLUMNS,
        "dtype_codes": {
            str(dtype).removeprefix("torch."): code for dtype, code in DTYPE_CODES.items()
        },
        "key_spaces": {"native": KEY_SPACE_NATIVE, "wide": KEY_SPACE_WIDE},
    }
    wrong = {
        key: (info.get(key), value) for key, value in expected.items() if info.get(key) != value
    }
    if wrong:
        listed = ", ".join(
            f"{k}: built {got!r}, expected {want!r}" for k, (got, want) in wrong.items()
        )
        raise RuntimeError(
            f"gmp_ext._C was built with another memory layout than this gmp_ext expects "
            f"({listed}); reinstall gmp_ext (pip install .) so the two match"
        )
