"""N:M prune step by weight layout: the same weights stored ``[out, in]`` (nn.Linear, groups
along the contiguous dimension) and ``[in, out]`` (transformers' Conv1D, groups along dimension
0: selected through a permuted copy, mask permuted back), against a pure-PyTorch 2:4 step over
the same layout in the same run.

    python benchmarks/bench_nm_layout.py [--shapes 768x768 768x3072 ...] [--repeats 9]

Each row times ``gmp_ext.prune_step(model, 0.5, nm=(2, 4))`` on fresh weights (copied in outside
the timed region) and ``torch``: per weight, ``movedim`` to put the input dimension last, top-2
|w| of each group of 4, scatter a keep mask, multiply. ``ratio`` is the row's p50 over the
``[out, in]`` gmp_ext row's.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from utils import environment, print_table, time_cpu, weights_for, write_rows

import gmp_ext


class InputMajor(nn.Module):
    """A Conv1D-like layer: y = x @ weight, weight [in, out]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


gmp_ext.register_layer(InputMajor, reduction_dim=0)


def model_of(weights: list[torch.Tensor], layout: str) -> nn.Module:
    layers = []
    for w in weights:
        if layout == "[out, in]":
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data.copy_(w)
            layers.append(linear)
        else:
            layers.append(InputMajor(w.t().contiguous()))
    return nn.Sequential(*layers)


def torch_two_four(model: nn.Module, dims: list[int]) -> None:
    with torch.no_grad():
        for param, dim in zip(model.parameters(), dims):
            view = param.movedim(dim, -1)
            groups = view.reshape(-1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
            param.mul_(keep.reshape(view.shape).movedim(-1, dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["768x768", "3072x768", "768x3072"])
    parser.add_argument("--layers", type=int, default=4, help="copies of the shape set")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] * args.layers
    weights = weights_for(shapes)
    rows = []
    for layout in ("[out, in]", "[in, out]"):
        model = model_of(weights, layout)
        dims = [1 if layout == "[out, in]" else 0] * len(weights)
        originals = [p.detach().clone() for p in model.parameters()]

        def fresh(model: nn.Module = model, originals: list[torch.Tensor] = originals) -> None:
            with torch.no_grad():
                for p, o in zip(model.parameters(), originals):
                    p.copy_(o)

        providers = {
            "gmp_ext prune_step": lambda _, model=model: gmp_ext.prune_step(model, 0.5, nm=(2, 4)),
            "torch movedim + topk": lambda _, model=model, dims=dims: torch_two_four(model, dims),
        }
        for provider, fn in providers.items():
            timing = time_cpu(fn, repeats=args.repeats, warmup=2, setup=fresh)
            rows.append({"layout": layout, "provider": provider, **timing})
    base = next(r["p50_ms"] for r in rows if r["provider"] == "gmp_ext prune_step")
    for row in rows:
        row["ratio"] = row["p50_ms"] / base
        row["numel"] = sum(w.numel() for w in weights)
    path = write_rows("nm_layout_cpu_float32", rows)
    print(f"{environment()['commit']}: {len(weights)} weights, {rows[0]['numel']} elements")
    print_table(rows, ["layout", "provider", "p50_ms", "p20_ms", "p80_ms", "ratio"])
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
