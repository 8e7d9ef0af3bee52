"""Forward pass of 2:4-sparse Linear layers (gmp_ext.to_semi_structured) against dense, on a GPU.

    python benchmarks/bench_semi_structured.py [--dtype float16 bfloat16] [--tokens 2048 8192]
        [--repeats 20]

Needs a CUDA GPU of compute capability 8.0+ (PyTorch's cuSPARSELt / CUTLASS semi-structured
kernels); elsewhere it prints why it skips and exits 0. Layers: LLaMA-7B's attention
projection (4096 x 4096), MLP up (11008 x 4096) and down (4096 x 11008) as single Linear
layers, and the MLP block (up, SiLU, down) as one model. Weights are drawn N(0, 1/fan_in) and
pruned to 2:4 (the 2 smallest |w| of every group of 4 zeroed); the dense row runs the same
pruned weights. Each provider converts a copy with ``gmp_ext.to_semi_structured(model,
backend=...)``. Timing: CUDA events around each forward under ``torch.inference_mode``, L2
evicted before each call, p20/p50/p80 of ``--repeats`` after 5 warm-up calls. ``max_abs_diff``
is the largest difference from the dense output. Rows (with the GPU's name) go to
benchmarks/results/semi_structured_cuda.json. Takes well under a minute on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
from torch import nn
from utils import print_table, time_fn, write_rows

import gmp_ext

HIDDEN, INTER = 4096, 11008
LAYERS = {
    "attn_proj 4096x4096": lambda dt: nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=dt),
    "mlp_up 11008x4096": lambda dt: nn.Linear(HIDDEN, INTER, bias=False, dtype=dt),
    "mlp_down 4096x11008": lambda dt: nn.Linear(INTER, HIDDEN, bias=False, dtype=dt),
    "mlp_block": lambda dt: nn.Sequential(
        nn.Linear(HIDDEN, INTER, bias=False, dtype=dt),
        nn.SiLU(),
        nn.Linear(INTER, HIDDEN, bias=False, dtype=dt),
    ),
}


def draw_24_sparse(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]))
                groups = w.reshape(w.shape[0], -1, 4)
                order = groups.abs().float().argsort(dim=-1, stable=True)
                groups.scatter_(-1, order[..., :2], 0.0)


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} is sm_{major}{minor}; 2:4 kernels need sm_80+"
    return None


def backends() -> list[str]:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    found = ["cusparselt"] if cusparselt is not None and cusparselt.is_available() else []
    return [*found, "cutlass"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    reason = skip_reason()
    if reason is not None:
        print(f"bench_semi_structured: skipped ({reason})")
        sys.exit(0)
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    rows = []
    torch.manual_seed(0)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for layer_name, make in LAYERS.items():
            with device:  # parameters created on the GPU
                dense = make(dtype)
            draw_24_sparse(dense)
            macs = sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Linear))
            models = {"dense (cuBLAS)": dense}
            for backend in backends():
                sparse = copy.deepcopy(dense)
                try:
                    gmp_ext.to_semi_structured(sparse, backend=backend)
                    models[f"gmp_ext.to_semi_structured ({backend})"] = sparse
                except (RuntimeError, ValueError) as error:
                    rows.append({"kernel": layer_name, "provider": backend, "status": str(error)})
            for tokens in args.tokens:
                x = torch.randn(
                    tokens, HIDDEN if "down" not in layer_name else INTER, device=device
                )
                x = x.to(dtype)
                with torch.inference_mode():
                    expected = dense(x)
                    base = None
                    for provider, model in models.items():
                        out = model(x)
                        diff = (out.float() - expected.float()).abs().max().item()
                        timing = time_fn(
                            device, lambda m=model, x=x: m(x), repeats=args.repeats, warmup=5
                        )
                        base = base or timing["p50_ms"]
                        rows.append(
                            {
                                "kernel": layer_name,
                                "provider": provider,
                                "dtype": dtype_name,
                                "tokens": tokens,
                                **timing,
                                "tflops_dense_equiv": 2 * tokens * macs / timing["p50_ms"] / 1e9,
                                "speedup_vs_dense": base / timing["p50_ms"],
                                "max_abs_diff": diff,
                                "max_rel_diff": diff / expected.float().abs().max().item(),
                                "gpu": gpu,
                                "status": "ok",
                            }
                        )
                        print(
                            f"  {dtype_name:8} {layer_name:20} {tokens:5} {provider:40} "
                            f"{timing['p50_ms']:8.3f} ms  x{base / timing['p50_ms']:.2f}",
                            flush=True,
                        )
            del models, dense
            torch.cuda.empty_cache()
    path = write_rows("semi_structured_cuda", rows)
    print_table(
        rows,
        ["kernel", "provider", "dtype", "tokens", "p50_ms", "speedup_vs_dense", "max_abs_diff",
         "status"],
    )  # fmt: skip
    print(f"rows: {path}  ({gpu})")


if __name__ == "__main__":
    main()
