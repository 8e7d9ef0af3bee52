"""On-disk size of sparse checkpoints (gmp_ext.save_sparse) against the dense weights.

    python benchmarks/bench_sparse_checkpoint.py [--model bert_base] [--tensors 6]
        [--dtype float32 bfloat16] [--sparsity 0.5 0.9 0.98] [--repeats 3]

Builds Linear layers with the first ``--tensors`` weight shapes of ``--model`` (default: one
BERT-base encoder layer, 7.1M weights), prunes them with ``gmp_ext.prune_step`` at each
sparsity (unstructured) and to 2:4 (the 2 smallest |w| of every group of 4 zeroed), saves each
with ``gmp_ext.save_sparse`` and reads the bytes every pruned weight's parts take in the file
from the safetensors header. ``ratio`` is those bytes over the dense weights' bytes;
``file_vs_torch_save`` compares the whole file with ``torch.save(model.state_dict())``. Every
checkpoint is loaded back with ``gmp_ext.load_sparse`` into a fresh model and compared tensor by
tensor (``status``). Rows go to benchmarks/results/sparse_checkpoint_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import tempfile
from pathlib import Path

import torch
from shapes import MODELS
from torch import nn
from utils import print_table, time_cpu, weights_for, write_rows

import gmp_ext


def build(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> nn.Sequential:
    model = nn.Sequential(*(nn.Linear(s[1], s[0], bias=True, dtype=dtype) for s in shapes))
    with torch.no_grad():
        for layer, weight in zip(model, weights_for(shapes, dtype)):
            layer.weight.copy_(weight)
    return model


def prune_24(model: nn.Sequential) -> None:
    with torch.no_grad():
        for layer in model:
            groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
            order = groups.abs().float().argsort(dim=-1, stable=True)
            groups.scatter_(-1, order[..., :2], 0.0)


def stored_bytes(path: Path, prefixes: set[str]) -> int:
    """Data bytes of the tensors ``<prefix>.<part>`` in a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for key, entry in header.items():
        prefix, _, part = key.rpartition(".")
        if prefix in prefixes and part in ("shape", "compressed", "bitmask", "row_offsets"):
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def measure(model: nn.Sequential, shapes, dtype, label: str, repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save = time_cpu(lambda: gmp_ext.save_sparse(model, folder), repeats=repeats, warmup=0)
        report = gmp_ext.save_sparse(model, folder)
        fresh = build(shapes, dtype)
        load = time_cpu(lambda: gmp_ext.load_sparse(fresh, folder), repeats=repeats, warmup=0)
        same = all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        )
        torch.save(model.state_dict(), folder / "dense.pt")
        weights = [f"{i}.weight" for i in range(len(model))]
        formats = sorted({report[w].format for w in weights})
        on_disk = stored_bytes(
            folder / gmp_ext.deploy.WEIGHTS_FILE, {str(i) for i in range(len(model))}
        )
        dense = sum(math.prod(s) for s in shapes) * torch.finfo(dtype).bits // 8
        zeros = sum(int((layer.weight == 0).sum()) for layer in model)
        return {
            "kernel": "sparse_checkpoint",
            "provider": "gmp_ext.save_sparse",
            "dtype": str(dtype).replace("torch.", ""),
            "pruning": label,
            "sparsity": zeros / sum(math.prod(s) for s in shapes),
            "format": ",".join(formats),
            "tensors": len(shapes),
            "dense_bytes": dense,
            "stored_bytes": on_disk,
            "ratio": on_disk / dense,
            "report_bytes": sum(report[w].stored_bytes for w in weights),
            "file_bytes": (folder / gmp_ext.deploy.WEIGHTS_FILE).stat().st_size,
            "torch_save_bytes": (folder / "dense.pt").stat().st_size,
            "save_ms": save["p50_ms"],
            "load_ms": load["p50_ms"],
            "status": "ok" if same else "round trip differs",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert_base", choices=sorted(MODELS))
    parser.add_argument("--tensors", type=int, default=6, help="the first N weight shapes")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.9, 0.98])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = [s for s in MODELS[args.model]() if len(s) == 2][: args.tensors]
    rows = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        for sparsity in args.sparsity:
            model = build(shapes, dtype)
            gmp_ext.prune_step(model, sparsity)
            rows.append(measure(model, shapes, dtype, f"unstructured {sparsity:g}", args.repeats))
        model = build(shapes, dtype)
        prune_24(model)
        rows.append(measure(model, shapes, dtype, "2:4", args.repeats))
        for row in rows[-len(args.sparsity) - 1 :]:
            row["file_vs_torch_save"] = row["file_bytes"] / row["torch_save_bytes"]
            print(f"  {row['dtype']:8} {row['pruning']:18} ratio {row['ratio']:.4f}", flush=True)
    path = write_rows("sparse_checkpoint_cpu", rows)
    print_table(
        rows,
        ["dtype", "pruning", "format", "dense_bytes", "stored_bytes", "ratio",
         "file_vs_torch_save", "save_ms", "load_ms", "status"],
    )  # fmt: skip
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
