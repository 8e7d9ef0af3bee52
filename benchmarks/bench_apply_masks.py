"""Mask apply after an optimizer step: gmp_ext's fused packed-mask apply against PyTorch.

    python benchmarks/bench_apply_masks.py [--models resnet50 bert_base llama_7b]
        [--dtype float32 bfloat16] [--device cpu|cuda] [--repeats 20]

gmp_ext applies 1-bit masks to every tensor in one native call: the table is built once with
``backend.prepare`` and each step is ``backend.apply(job)``, as ``gmp_ext.attach`` does
(on CUDA also as a CUDA-graph replay of that call). Baselines: dense masks of the weights'
dtype with ``torch._foreach_mul_`` and with a per-tensor ``mul_`` loop, and the forward
pre-hook of ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask`` per module, the
work it does before every forward). Masks come from a real 90% magnitude selection of
N(0, 1/fan_in) weights.

gmp_ext's apply stores only the vectors it changes. Its first rows run on the weights as the
previous call left them, pruned weights at zero (the state after an optimizer step whose gradients
and state are masked): the apply reads W and the bits and writes nothing. The row "every vector
changed" copies the unmasked weights back before each call (untimed), so it zeroes as much as the
dense baselines do.

Per row: p20/p50/p80 ms (CUDA events, L2 flushed before each call), ``bytes`` the method moves
(packed: read + write W, read the bits; dense: read W and the mask, write W), ``gbps`` =
bytes / p50, ``pct_of_copy`` against a device-to-device copy measured in the same run, and
``floor_ratio`` = p50 / (bytes_floor / copy bandwidth) with bytes_floor = read W + read bits +
write W, the least any apply must move. Rows go to
benchmarks/results/apply_masks_<device>_<dtype>.json ($GMP_EXT_BENCH_OUT overrides the folder).
"""

from __future__ import annotations

import argparse

import torch
from shapes import MODELS
from torch import nn
from torch.nn.utils import prune
from utils import (
    add_common_arguments,
    available_bytes,
    copy_reference,
    free_memory,
    measure,
    print_table,
    rates,
    weights_for,
    write_rows,
)

from gmp_ext.kernels import backends, ops
from gmp_ext.kernels.layout import mask_bytes

SPARSITY = 0.9
MEMORY_HEADROOM = 0.92


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _graph_of(fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first, as torch asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Bench:
    def __init__(self, model, dtype, device, repeats, copy, rows, save) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.repeats, self.copy, self.rows, self.save = repeats, copy, rows, save

    def row(self, provider: str, nbytes: float, floor: float, result: dict, **extra) -> dict:
        row = {
            "kernel": "apply_masks",
            "provider": provider,
            "model": self.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            **extra,
            "bytes": int(nbytes),
            "bytes_floor": int(floor),
            **result,
        }
        if row["status"] == "ok":
            row.update(rates(row["p50_ms"], nbytes, floor, self.copy))
            row["copy_gbps"] = self.copy
        self.rows.append(row)
        self.save()
        print(
            f"  {self.model} {row['dtype']} {provider:40} "
            + (f"{row['p50_ms']:9.3f} ms" if row["status"] == "ok" else row["status"]),
            flush=True,
        )
        return row

    def run(self, provider, fn, nbytes, floor, need=0.0, setup=None, **extra) -> dict:
        free = available_bytes(self.device)
        if need > MEMORY_HEADROOM * free:
            result = {"status": f"skipped: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
        else:
            result = measure(self.device, fn, self.repeats, warmup=3, setup=setup)
        return self.row(provider, nbytes, floor, result, **extra)


def bench_model(model, dtype, device, repeats, copy, rows, save) -> None:
    weights = weights_for(MODELS[model](), dtype, device)
    numel = sum(w.numel() for w in weights)
    n_max = max(w.numel() for w in weights)
    size = weights[0].element_size()
    common = {"numel": numel, "tensors": len(weights)}
    packed = ops.magnitude_masks(weights, SPARSITY)
    backend = backends.backend_for(device)
    job = backend.prepare(weights, packed)
    bits = sum(mask_bytes(w.numel()) for w in weights)
    floor = 2 * numel * size + bits  # read + write W, read the bits
    dense_bytes = 3 * numel * size  # read W and mask, write W
    bench = Bench(model, dtype, device, repeats, copy, rows, save)

    start = len(rows)
    # First, while the weights are unmasked: a copy of them to restore before each call.
    need = numel * size
    source = None
    if need <= MEMORY_HEADROOM * available_bytes(device):
        source = [w.clone() for w in weights]
    bench.run(
        "gmp_ext fused (packed), every vector changed",
        lambda *_: backend.apply(job),  # takes what the setup returns
        floor,
        floor,
        need=need if source is None else 0.0,
        setup=None if source is None else lambda: torch._foreach_copy_(weights, source),
        **common,
    )
    source = None
    free_memory(device)
    bench.run("gmp_ext fused (packed)", lambda: backend.apply(job), floor, floor, **common)
    if device.type == "cuda":
        try:
            graph = _graph_of(lambda: backend.apply(job))
            bench.run("gmp_ext fused (packed), CUDA graph", graph.replay, floor, floor, **common)
            del graph
        except RuntimeError as error:
            status = {"status": "error: " + " ".join(str(error).split())[:300]}
            bench.row("gmp_ext fused (packed), CUDA graph", floor, floor, status, **common)
    fused = lambda: ops.apply_masks_(weights, packed)  # noqa: E731
    bench.run("gmp_ext ops.apply_masks_", fused, floor, floor, **common)

    need = numel * size + n_max * 2
    if need > MEMORY_HEADROOM * available_bytes(device):
        dense = None
    else:
        dense = [ops.unpack_mask(m, w.shape).to(w.dtype) for m, w in zip(packed, weights)]
    bench.run(
        "torch._foreach_mul_ (dense)",
        lambda: torch._foreach_mul_(weights, dense),
        dense_bytes,
        floor,
        need=need if dense is None else 0.0,
        **common,
    )
    bench.run(
        "mul_ loop (dense)",
        lambda: [w.mul_(m) for w, m in zip(weights, dense)],
        dense_bytes,
        floor,
        need=need if dense is None else 0.0,
        **common,
    )
    dense = None
    free_memory(device)

    # torch.nn.utils.prune keeps weight_orig (the weights), weight_mask (dense, same dtype) and
    # recomputes weight = weight_orig * weight_mask before every forward.
    need = 2 * numel * size + numel + n_max * size
    modules = None
    if need <= MEMORY_HEADROOM * available_bytes(device):
        modules = nn.ModuleList(_Holder(w) for w in weights)
        for module, mask in zip(modules, packed):
            prune.custom_from_mask(module, "weight", ops.unpack_mask(mask, module.weight.shape))
        hooks = [(m, h) for m in modules for h in m._forward_pre_hooks.values()]
    else:
        hooks = []
    bench.run(
        "torch.nn.utils.prune pre-hook (dense)",
        lambda: [hook(module, None) for module, hook in hooks],
        dense_bytes,
        floor,
        need=need if modules is None else 0.0,
        **common,
    )
    modules = hooks = None
    free_memory(device)

    baseline = next(
        (
            r["p50_ms"]
            for r in rows[start:]
            if r["provider"].startswith("torch._foreach") and r["status"] == "ok"
        ),
        None,
    )
    for row in rows[start:]:
        if baseline and row["status"] == "ok":
            row["speedup_vs_foreach_mul"] = baseline / row["p50_ms"]
    save()
    weights = packed = job = None
    free_memory(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-gib", type=float, help="copy reference buffer (GiB)")
    args = parser.parse_args()
    device = torch.device(args.device)
    copy = copy_reference(device, args.copy_gib)
    paths = []
    for dtype in args.dtype:
        rows: list[dict] = [{**copy, "dtype": dtype}]
        name = f"apply_masks_{device.type}_{dtype}"

        def save(rows=rows, name=name):
            return write_rows(name, rows)

        for model in args.models:
            torch_dtype = getattr(torch, dtype)
            bench_model(model, torch_dtype, device, args.repeats, copy["gbps"], rows, save)
        paths.append(save())
        print_table(
            rows[1:],
            [
                "provider",
                "model",
                "dtype",
                "p50_ms",
                "gbps",
                "pct_of_copy",
                "floor_ratio",
                "speedup_vs_foreach_mul",
                "status",
            ],
        )
    for path in paths:
        print(f"rows: {path}")


if __name__ == "__main__":
    main()
