"""Pure-PyTorch reference backend: the test oracle, the fallback and the benchmark baseline.

Every function has the contract of its native twin in ``_backend`` (same arguments, same
results bit for bit), written for clarity rather than speed: selection is a stable sort of the
magnitude keys, so ties fall to the lowest index exactly as the radix kernels resolve them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmp_ext.kernels.layout import (
    KEY_SPACE_NATIVE,
    KEY_SPACE_WIDE,
    KEY_SPACE_WIDE64,
    mask_storage_bytes,
)

__all__ = [
    "apply_masks",
    "build_masks",
    "count_kept",
    "magnitude_keys",
    "nm_build_masks",
    "nm_candidates",
    "nm_gather",
    "pack_bits",
    "popcount",
    "select_global",
    "select_layerwise",
    "unpack_bits",
]

_SIGN_CLEAR_64 = 0x7FFF_FFFF_FFFF_FFFF


def magnitude_keys(tensor: torch.Tensor, key_space: int) -> torch.Tensor:
    """int64 keys ordered like |w| (csrc/common/keys.h), in flat ``tensor.flatten()`` order."""
    flat = tensor.detach().reshape(-1)
    if key_space == KEY_SPACE_WIDE64 or flat.dtype == torch.float64:
        return flat.double().view(torch.int64) & _SIGN_CLEAR_64
    if flat.dtype == torch.float32 or (key_space == KEY_SPACE_WIDE and flat.dtype == torch.float16):
        return flat.float().view(torch.int32).to(torch.int64) & 0x7FFF_FFFF
    keys16 = flat.view(torch.int16).to(torch.int64) & 0x7FFF
    if key_space == KEY_SPACE_WIDE:  # bfloat16: its bits are the high half of the fp32 bits
        return keys16 << 16
    if key_space != KEY_SPACE_NATIVE:
        raise ValueError(f"unknown key space {key_space}")
    return keys16


def _kth_smallest(keys: torch.Tensor, k: int) -> tuple[int, int]:
    """(key, index) of the k-th smallest (key, index) pair; (0, -1) for k == 0."""
    if k == 0:
        return 0, -1
    order = torch.sort(keys, stable=True).indices
    index = int(order[k - 1])
    return int(keys[index]), index


def _rows(values: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device).reshape(len(values), 4)


def select_layerwise(tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
    """Per-tensor selection rows [n, 4]: (key, index, key space, NaN count)."""
    rows = []
    for tensor, k in zip(tensors, ks):
        nan_count = int(torch.isnan(tensor).sum())
        key, index = (0, -1) if nan_count else _kth_smallest(magnitude_keys(tensor, 0), k)
        rows.append([key, index, KEY_SPACE_NATIVE, nan_count])
    return _rows(rows, tensors[0].device if tensors else torch.device("cpu"))


def select_global(tensors: Sequence[torch.Tensor], k: int, key_space: int) -> torch.Tensor:
    """One selection over the concatenation in (key, tensor position, flat index) order."""
    device = tensors[0].device if tensors else torch.device("cpu")
    nan_count = sum(int(torch.isnan(t).sum()) for t in tensors)
    if nan_count or k == 0:
        key, index = 0, -1
    else:
        keys = torch.cat([magnitude_keys(t, key_space).to(device) for t in tensors])
        key, index = _kth_smallest(keys, k)
    rows, base = [], 0
    for tensor in tensors:
        numel = tensor.numel()
        local = -1 if index < 0 else min(max(index - base, -1), numel - 1)
        rows.append([key, local, key_space, nan_count])
        base += numel
    return _rows(rows, device)


def keep_flags(tensor: torch.Tensor, key: int, index: int, key_space: int) -> torch.Tensor:
    """Flat bool keep-flags: (key, flat index) > (threshold key, threshold index)."""
    keys = magnitude_keys(tensor, key_space)
    positions = torch.arange(keys.numel(), device=keys.device)
    return (keys > key) | ((keys == key) & (positions > index))


def build_masks(
    tensors: Sequence[torch.Tensor], selection: torch.Tensor, masks: Sequence[torch.Tensor]
) -> None:
    """Writes each tensor's packed keep-mask into ``masks`` (uint8, padded storage); a row with
    NaNs leaves its mask as it was."""
    for tensor, row, mask in zip(tensors, selection.tolist(), masks):
        key, index, key_space, nan_count = row
        if nan_count > 0:
            continue
        packed = pack_bits(keep_flags(tensor, key, index, key_space))
        mask.copy_(packed.to(mask.device))


def nm_candidates(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Flat bool flags of the N:M candidates (csrc/common/nm.h): per group of ``m`` consecutive
    keys, the ``m - n`` lowest in (key, index) order."""
    groups = keys.reshape(-1, m)
    order = torch.sort(groups, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=keys.device).expand_as(order).contiguous())
    return (ranks < m - n).reshape(-1)


def nm_gather(tensors: Sequence[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    """Each tensor's N:M candidate list: its candidates in flat order, ``numel // m * (m - n)``
    elements of its dtype; a group holding NaN lists its first NaN in place of its first
    candidate."""
    lists = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        candidates = nm_candidates(magnitude_keys(flat, KEY_SPACE_NATIVE), n, m)
        listed = flat[candidates].reshape(-1, m - n).clone()
        nan = torch.isnan(flat.reshape(-1, m))
        has_nan = nan.any(1)
        first_nan = flat.reshape(-1, m).gather(1, nan.to(torch.uint8).argmax(1, keepdim=True))
        listed[:, 0] = torch.where(has_nan, first_nan[:, 0], listed[:, 0])
        lists.append(listed.reshape(-1))
    return lists


def nm_build_masks(
    tensors: Sequence[torch.Tensor],
    selection: torch.Tensor,
    masks: Sequence[torch.Tensor],
    n: int,
    m: int,
) -> None:
    """Writes N:M keep-masks from selection rows over the candidate lists (index = position in
    the list): protected elements and candidates above the cut are kept; a row with NaNs leaves
    its mask as it was."""
    for tensor, row, mask in zip(tensors, selection.tolist(), masks):
        key, index, key_space, nan_count = row
        if nan_count > 0:
            continue
        keys = magnitude_keys(tensor, key_space)
        candidates = nm_candidates(keys, n, m)
        positions = torch.cumsum(candidates, 0) - 1
        above = (keys > key) | ((keys == key) & (positions > index))
        mask.copy_(pack_bits(~candidates | above).to(mask.device))


def apply_masks(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Zeroes (to +0.0) every element whose mask bit is 0, in place."""
    with torch.no_grad():
        for tensor, mask in zip(tensors, masks):
            keep = unpack_bits(mask, tensor.numel()).view(tensor.shape)
            tensor.masked_fill_(~keep, 0)


_BIT_WEIGHTS = [1 << i for i in range(8)]


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Flat bool flags -> uint8 mask storage (numpy.packbits bitorder="little", zero-padded)."""
    flat = flags.reshape(-1).to(torch.uint8)
    numel = flat.numel()
    storage = torch.zeros(mask_storage_bytes(numel), dtype=torch.uint8, device=flat.device)
    padded = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[:numel] = flat
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    storage[: padded.numel() // 8] = (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return storage


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(mask: torch.Tensor, numel: int, chunk: int = 1 << 18) -> torch.Tensor:
    """Set bits among the first ``numel`` bits of a packed mask, as a 0-d int64 tensor on its
    device: bytes counted by a table lookup in chunks (int64 temporaries of 2 MB, nothing of the
    tensor's size on a device)."""
    table = _POPCOUNT.to(mask.device)
    total = torch.zeros((), dtype=torch.int64, device=mask.device)
    whole = mask[: numel // 8]
    for i in range(0, whole.numel(), chunk):
        total += table[whole[i : i + chunk].long()].sum()
    if numel % 8:  # the last byte's bits past numel are not the tensor's
        total += table[mask[numel // 8].long() & ((1 << numel % 8) - 1)]
    return total


def count_kept(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[int]:
    """Set bits among the first ``numel`` bits of each tensor's mask (its kept elements), one
    read-back for all."""
    totals = [popcount(mask, tensor.numel()) for tensor, mask in zip(tensors, masks)]
    return torch.stack(totals).tolist() if totals else []


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 mask storage -> flat bool flags of length ``numel``."""
    nbytes = -(-numel // 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:nbytes, None] >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()
