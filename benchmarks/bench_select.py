"""Threshold selection: gmp_ext against pure PyTorch, per layer and global.

    python benchmarks/bench_select.py [--models resnet50] [--dtype float32] [--device cpu]

Times (p50 of 5 after a warm-up) and the peak extra memory of each method, measured in a
fresh subprocess as the growth of the peak resident set (CPU) or of
torch.cuda.max_memory_allocated (CUDA) over the weights themselves. Writes long-format rows to
benchmarks/results/select_<device>.json and prints a table with speed-ups against
torch.kthvalue measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from shapes import MODELS
from utils import peak_rss_mb, print_table, reset_peak_rss_mb, time_cpu, weights_for, write_rows

from gmp_ext import ops

SPARSITY = 0.9


def _k(numel: int) -> int:
    return max(ops.prune_count(numel, SPARSITY), 1)


def _methods(scope: str):
    if scope == "layer":
        return {
            "gmp_ext": lambda ws: ops.select_layerwise(ws, SPARSITY),
            "torch.kthvalue loop": lambda ws: [
                torch.kthvalue(w.abs().reshape(-1), _k(w.numel())) for w in ws
            ],
            "torch.topk(sorted=False) loop": lambda ws: [
                torch.topk(w.abs().reshape(-1), _k(w.numel()), largest=False, sorted=False)
                for w in ws
            ],
            "torch.sort loop": lambda ws: [torch.sort(w.abs().reshape(-1)) for w in ws],
        }
    return {
        "gmp_ext": lambda ws: ops._select_rows_global(
            ws, [f"w{i}" for i in range(len(ws))], _k(sum(w.numel() for w in ws))
        ),
        "gmp_ext + masks": lambda ws: ops.magnitude_masks(ws, SPARSITY, scope="global"),
        "torch.cat + kthvalue": lambda ws: torch.kthvalue(
            torch.cat([w.abs().reshape(-1) for w in ws]), _k(sum(w.numel() for w in ws))
        ),
        "torch.cat + topk(sorted=False)": lambda ws: torch.topk(
            torch.cat([w.abs().reshape(-1) for w in ws]),
            _k(sum(w.numel() for w in ws)),
            largest=False,
            sorted=False,
        ),
    }


def _extra_memory_mb(model: str, dtype: str, device: str, scope: str, method: str) -> float:
    """Peak memory the method adds on top of the weights, in a fresh process."""
    args = [
        sys.executable,
        __file__,
        "--measure",
        method,
        "--models",
        model,
        "--dtype",
        dtype,
        "--device",
        device,
        "--scope",
        scope,
    ]
    # A fixed mmap threshold stops glibc from keeping freed temporaries of the set-up in its
    # heap, where the method could reuse them without raising the peak resident set.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mb"]


def _measure(args) -> None:
    weights = weights_for(MODELS[args.models[0]](), getattr(torch, args.dtype), args.device)
    fn = _methods(args.scope)[args.measure]
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(weights)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = reset_peak_rss_mb()
        fn(weights)
        extra = peak_rss_mb() - base
    print(json.dumps({"extra_mb": max(extra, 0.0)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"], choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scope", choices=["layer", "global"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    args = parser.parse_args()
    if args.measure:
        _measure(args)
        return

    rows = []
    for model in args.models:
        weights = weights_for(MODELS[model](), getattr(torch, args.dtype), args.device)
        numel = sum(w.numel() for w in weights)
        weight_mb = sum(w.numel() * w.element_size() for w in weights) / 2**20
        for scope in ("layer", "global"):
            baseline = None
            for method, fn in _methods(scope).items():
                timing = time_cpu(lambda fn=fn, ws=weights: fn(ws), repeats=args.repeats)
                row = {
                    "kernel": f"select_{scope}",
                    "provider": method,
                    "model": model,
                    "dtype": args.dtype,
                    "device": args.device,
                    "numel": numel,
                    "tensors": len(weights),
                    "weights_mb": round(weight_mb, 1),
                    **timing,
                }
                if not args.no_memory:
                    row["extra_mb"] = _extra_memory_mb(
                        model, args.dtype, args.device, scope, method
                    )
                if "kthvalue" in method:
                    baseline = row["p50_ms"]
                rows.append(row)
            for row in rows:
                if row["kernel"] == f"select_{scope}" and row["model"] == model and baseline:
                    row["speedup_vs_kthvalue"] = baseline / row["p50_ms"]
    path = write_rows(f"select_{args.device}_{args.dtype}", rows)
    print_table(rows, ["kernel", "provider", "model", "p50_ms", "speedup_vs_kthvalue", "extra_mb"])
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
