"""The per-step re-apply of a pruned model, eager and compiled, against PyTorch in the same run.

    python benchmarks/bench_compile.py [--layers 24] [--width 256] [--device cpu|cuda]
        [--repeats 50] [--threads T]

A model of ``--layers`` Linear(width, width) layers pruned to 90%; per row, the time of one
re-apply of every mask (p20/p50/p80 ms):

* ``apply_masks(model) eager``: the store's prepared job (what ``attach`` runs after a step);
* ``torch.ops.gmp_ext.apply_masks eager``: the operator called directly (dispatcher, argument
  checks and the kernel's table cache: the per-call cost eager paths avoid);
* ``apply_masks(model) compiled``: ``torch.compile(fullgraph=True)`` of the same call;
* ``_foreach_mul_ dense masks``: PyTorch, masks as weight-dtype tensors (the baseline).

Timing: rounds of one call per provider (wall clock on CPU, CUDA events on CUDA), so that a
shared machine's drift reaches every row alike. ``vs_foreach_mul`` = baseline p50 / row p50
(above 1: faster than PyTorch). Rows go to
benchmarks/results/compile_<device>_<layers>x<width>.json ($GMP_EXT_BENCH_OUT overrides the folder).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from utils import print_table, time_fn, write_rows

import gmp_ext
from gmp_ext.model.mask_store import get_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    model = model.to(device)
    gmp_ext.prune_step(model, 0.9)
    store = get_store(model)
    assert store is not None
    weights = [e.param.detach() for e in store.entries.values()]
    packed = [e.mask for e in store.entries.values()]
    dense = [(w != 0).to(w.dtype) for w in weights]
    compiled = torch.compile(lambda: gmp_ext.apply_masks(model), fullgraph=True)
    compiled()  # compiles outside the timed calls

    def by_operator() -> None:
        torch.ops.gmp_ext.apply_masks(weights, packed)

    calls = {
        "apply_masks(model) eager": lambda: gmp_ext.apply_masks(model),
        "torch.ops.gmp_ext.apply_masks eager": by_operator,
        "apply_masks(model) compiled": compiled,
        "_foreach_mul_ dense masks": lambda: torch._foreach_mul_(weights, dense),
    }
    # Rounds of one call per provider, so that the drifts of a shared machine reach all alike.
    samples: dict[str, list[float]] = {provider: [] for provider in calls}
    for fn in calls.values():
        time_fn(device, fn, repeats=1, warmup=5)
    for _ in range(args.repeats):
        for provider, fn in calls.items():
            samples[provider].append(time_fn(device, fn, repeats=1, warmup=0)["p50_ms"])
    rows = []
    for provider, times in samples.items():
        q = statistics.quantiles(times, n=5)
        result = {"p20_ms": q[0], "p50_ms": statistics.median(times), "p80_ms": q[-1]}
        rows.append(
            {
                "kernel": "apply_masks_step",
                "provider": provider,
                "model": f"{args.layers} x Linear({args.width})",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "repeats": len(times),
                **result,
            }
        )
    baseline = rows[-1]["p50_ms"]
    for row in rows:
        row["vs_foreach_mul"] = round(baseline / row["p50_ms"], 2)
    print_table(rows, ["model", "provider", "p20_ms", "p50_ms", "p80_ms", "vs_foreach_mul"])
    print(f"rows: {write_rows(f'compile_{device.type}_{args.layers}x{args.width}', rows)}")


if __name__ == "__main__":
    main()
