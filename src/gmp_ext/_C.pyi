# Stubs of the compiled module (csrc/bindings.cpp). Addresses and counts are plain integers.
# CI checks that they name exactly the module's functions (python -m mypy.stubtest gmp_ext._C).
from typing import Any

def build_info() -> dict[str, Any]: ...
def cpu_max_threads() -> int: ...
def cpu_select_layerwise(table: int, n: int, k: int, out: int, threads: int) -> None: ...
def cpu_select_global(
    table: int, n: int, k: int, key_space: int, out: int, threads: int
) -> None: ...
def cpu_prune_layerwise(table: int, n: int, k: int, out: int, threads: int) -> None: ...
def cpu_prune_global(
    table: int, n: int, k: int, key_space: int, out: int, threads: int
) -> None: ...
def cpu_build_masks(
    table: int, n: int, selection: int, threads: int, zero_pruned: bool = False, kept: int = 0
) -> None: ...
def cpu_histogram(
    table: int,
    n: int,
    key_space: int,
    shift: int,
    bins: int,
    prefix_shift: int,
    prefixes: int,
    out: int,
    nan_counts: int,
    threads: int,
) -> None: ...
def cpu_find_equal(
    table: int, n: int, key_space: int, keys: int, ranks: int, out: int, threads: int
) -> None: ...
def cpu_apply_masks(table: int, n: int, threads: int) -> None: ...
def cpu_nm_gather(table: int, entries: int, n: int, m: int, lists: int, threads: int) -> None: ...
def cpu_nm_build_masks(
    table: int, entries: int, n: int, m: int, selection: int, threads: int
) -> None: ...
def cpu_count_kept(table: int, n: int, out: int, threads: int) -> None: ...
def cpu_pack_bits(bools: int, numel: int, packed: int, threads: int) -> None: ...
def cpu_unpack_bits(packed: int, numel: int, bools: int, threads: int) -> None: ...

# Present only in builds with CUDA.
def cuda_device_count() -> int: ...
def cuda_driver_status() -> str: ...
def cuda_apply_masks(table: int, n: int, total_tiles: int, stream: int) -> None: ...
def cuda_select_scratch_bytes(n: int, total_numel: int, mode: int) -> int: ...
def cuda_select_layerwise(
    table: int,
    n: int,
    k: int,
    out: int,
    scratch: int,
    scratch_bytes: int,
    total_tiles: int,
    stream: int,
) -> None: ...
def cuda_select_global(
    table: int,
    n: int,
    k: int,
    key_space: int,
    out: int,
    scratch: int,
    scratch_bytes: int,
    total_tiles: int,
    stream: int,
) -> None: ...
def cuda_prune_layerwise(
    table: int,
    n: int,
    k: int,
    out: int,
    scratch: int,
    scratch_bytes: int,
    total_tiles: int,
    stream: int,
) -> None: ...
def cuda_prune_global(
    table: int,
    n: int,
    k: int,
    key_space: int,
    out: int,
    scratch: int,
    scratch_bytes: int,
    total_tiles: int,
    stream: int,
) -> None: ...
def cuda_build_masks(
    table: int,
    n: int,
    selection: int,
    total_tiles: int,
    stream: int,
    zero_pruned: bool = False,
    kept: int = 0,
) -> None: ...
def cuda_count_kept(table: int, n: int, kept: int, total_tiles: int, stream: int) -> None: ...
def cuda_nm_gather(
    table: int, entries: int, n: int, m: int, lists: int, total_tiles: int, stream: int
) -> None: ...
def cuda_nm_build_masks(
    table: int, entries: int, n: int, m: int, selection: int, total_tiles: int, stream: int
) -> None: ...
