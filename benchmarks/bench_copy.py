"""Copy bandwidth of the device, the ceiling every other benchmark is compared with.

    python benchmarks/bench_copy.py [--device cpu|cuda] [--sizes-mib 64 256 1024 4096]

Times ``dst.copy_(src)`` on random float32 buffers of each size (CUDA events with L2 flushed
before each call on CUDA, wall clock on CPU) and reports bytes read + written per second. Sizes
below a few times the L2 measure the cache, not the memory: the other benchmarks use the
largest size. Rows go to benchmarks/results/copy_<device>.json ($GMP_EXT_BENCH_OUT overrides).
"""

from __future__ import annotations

import argparse

import torch
from utils import available_bytes, copy_gbps, print_table, write_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes-mib", nargs="+", type=int, help="buffer sizes (MiB)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = args.sizes_mib or (
        [16, 64, 256, 1024, 4096, 16384] if device.type == "cuda" else [16, 64, 256, 1024]
    )
    rows = []
    for mib in sizes:
        nbytes = mib << 20
        if 2.2 * nbytes > available_bytes(device):
            rows.append(
                {
                    "kernel": "copy",
                    "device": str(device),
                    "buffer_mib": mib,
                    "status": "skipped: does not fit twice",
                }
            )
            continue
        row = copy_gbps(device, nbytes, repeats=args.repeats)
        rows.append({**row, "buffer_mib": mib, "status": "ok"})
        print(f"  {mib:6} MiB  {row['p50_ms']:9.3f} ms  {row['gbps']:8.1f} GB/s", flush=True)
    path = write_rows(f"copy_{device.type}", rows)
    print_table(rows, ["kernel", "device", "buffer_mib", "p50_ms", "gbps", "status"])
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
