"""Mask apply after an optimizer step: gmp_ext's fused packed-mask apply against PyTorch.

    python benchmarks/bench_apply_masks.py [--models resnet50] [--dtype float32] [--device cpu]

gmp_ext applies 1-bit masks to every tensor in one native call (the table is built once, as
`gmp_ext.attach` does); the baselines multiply by dense masks of the weights' dtype with
`torch._foreach_mul_` and with a per-tensor `mul_` loop. Masks come from a real 90% magnitude
selection. Reports p50 milliseconds, the bytes each method must move and the effective GB/s.
"""

from __future__ import annotations

import argparse

import torch
from shapes import MODELS
from utils import print_table, time_cpu, weights_for, write_rows

from gmp_ext import _backend, ops

SPARSITY = 0.9


def bench_model(model: str, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict]:
    weights = weights_for(MODELS[model](), dtype, device)
    packed = ops.magnitude_masks(weights, SPARSITY)
    dense = [ops.unpack_mask(m, w.shape).to(w.dtype) for m, w in zip(packed, weights)]
    backend = _backend.backend_for(device)
    plan = backend.apply_plan(weights, packed)
    numel = sum(w.numel() for w in weights)
    packed_bytes = numel * (2 * weights[0].element_size() + 1 / 8)  # read + write W, read bits
    dense_bytes = numel * 3 * weights[0].element_size()  # read W and mask, write W
    methods = {
        "gmp_ext fused (packed)": (lambda: backend.run_apply(plan), packed_bytes),
        "gmp_ext ops.apply_masks_": (lambda: ops.apply_masks_(weights, packed), packed_bytes),
        "torch._foreach_mul_ (dense)": (lambda: torch._foreach_mul_(weights, dense), dense_bytes),
        "mul_ loop (dense)": (lambda: [w.mul_(m) for w, m in zip(weights, dense)], dense_bytes),
    }
    rows = []
    for provider, (fn, nbytes) in methods.items():
        timing = time_cpu(fn, repeats=repeats, warmup=3)
        rows.append(
            {
                "kernel": "apply_masks",
                "provider": provider,
                "model": model,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "numel": numel,
                "tensors": len(weights),
                "bytes": int(nbytes),
                **timing,
                "gbps": nbytes / timing["p50_ms"] / 1e6,
            }
        )
    baseline = next(r["p50_ms"] for r in rows if r["provider"].startswith("torch._foreach"))
    for row in rows:
        row["speedup_vs_foreach_mul"] = baseline / row["p50_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"], choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        rows += bench_model(
            model, getattr(torch, args.dtype), torch.device(args.device), args.repeats
        )
    path = write_rows(f"apply_masks_{args.device}_{args.dtype}", rows)
    print_table(rows, ["provider", "model", "dtype", "p50_ms", "gbps", "speedup_vs_foreach_mul"])
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
