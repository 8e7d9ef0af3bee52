"""What a score costs: an eager ``prune_step`` ranking |w| (magnitude), Wanda and movement
values, against a pure-PyTorch per-layer ``torch.kthvalue`` mask loop in the same run; and
movement's per-optimizer-step accumulation as a share of a training step.

Rows: ``scores_<model>_<device>_<dtype>.json``. Each prune call starts from the same dense
weights (restored outside the timed region) and, for Wanda and movement, the same observed
state (input norms, accumulated ``-w * grad``: random positive norms and N(0, 1) totals).
The training step is forward + backward + AdamW over the same weights as a stack of bias-free
layers (Linear: ``--tokens`` rows of input; Conv: a batch of 2 at 14x14), the accumulation is
``Movement.accumulate()`` over the same weights with their gradients. ``--before REV`` also
times the magnitude step of gmp_ext's Python package as it was at commit REV (with this
build's compiled module, whose sources must be unchanged since), in a subprocess of the same
run: the before/after row of a change to the Python layer.

    python benchmarks/bench_scores.py --models resnet50 bert_base --before fdc3042
    python benchmarks/bench_scores.py --device cuda --models bert_base --dtype bfloat16 float32

On CUDA the weights, the observed state and the training step's inputs are on the device and
every call is timed with CUDA events (``utils.measure``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from utils import (
    add_common_arguments,
    copy_reference,
    measure,
    print_table,
    rates,
    weights_for,
    write_rows,
)

import gmp_ext

SPARSITY = 0.9


class Stack(nn.Module):
    """Bias-free layers holding the given weights; forward runs the Linear ones in a chain
    where shapes allow (a training step's cost), every layer on its own input otherwise."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for w in weights:
            if w.dim() == 2:
                layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=False)
            else:
                layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False)
            layer.weight = nn.Parameter(w.clone())
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(self, tokens: int) -> torch.Tensor:
        total = torch.zeros((), device=self.layers[0].weight.device)
        for layer in self.layers:
            w = layer.weight
            seeded = torch.Generator(w.device).manual_seed(0)  # made where the step runs
            if w.dim() == 2:
                shape: tuple[int, ...] = (tokens, w.shape[1])
            else:
                pad = (w.shape[2] - 1) // 2
                shape = (2, w.shape[1], 14 + 2 * pad, 14 + 2 * pad)
            x = torch.randn(shape, generator=seeded, device=w.device, dtype=w.dtype)
            total = total + layer(x).square().float().mean()
        return total


def _observed(stack: Stack, names: list[str]) -> tuple[dict, dict]:
    """Wanda and movement states as a run would have them: positive norms, signed totals."""
    generator = torch.Generator().manual_seed(1)
    sums, totals = {}, {}
    for name, (_, param) in zip(names, stack.named_parameters()):
        features = param.shape[1]
        sums[name] = (torch.rand(features, generator=generator) + 0.5).to(param.device)
        totals[name] = torch.randn(param.shape, generator=generator).to(param.device)
    return {"sums": sums, "tokens": 1}, {"totals": totals, "steps": 1}


def _kthvalue_loop(params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            flat = p.reshape(-1)
            k = max(1, round(SPARSITY * flat.numel()))
            threshold = flat.abs().kthvalue(k).values
            p.mul_(p.abs() > threshold)


def time_magnitude(model: str, dtype: torch.dtype, repeats: int) -> dict:
    """The eager magnitude prune step alone (what ``--before`` runs in the old package)."""
    from shapes import MODELS

    stack = Stack(weights_for(MODELS[model](), dtype=dtype))
    params = list(stack.parameters())
    dense = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, d in zip(params, dense):
                p.copy_(d)

    return measure(
        "cpu",
        lambda _: gmp_ext.prune_step(stack, SPARSITY),
        repeats=repeats,
        setup=restore,
        confirm_slow=True,
    )


def time_before(rev: str, model: str, dtype_name: str, repeats: int) -> dict:
    """:func:`time_magnitude` with gmp_ext's package at ``rev`` (a subprocess)."""
    root = Path(__file__).resolve().parents[1]
    compiled = next(Path(gmp_ext.__file__).parent.glob("_C*.so"))
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(
            ["git", "archive", rev, "src/gmp_ext"], cwd=root, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        package = Path(folder) / "src"
        shutil.copy(compiled, package / "gmp_ext" / compiled.name)
        env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{Path(__file__).parent}"}
        out = subprocess.run(
            [sys.executable, __file__, "--magnitude-only", model, dtype_name, str(repeats)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(
    model: str, dtype: torch.dtype, device: torch.device, tokens: int, repeats: int, copy: dict
) -> list[dict]:
    from shapes import MODELS

    from gmp_ext.scores import Movement, Wanda

    weights = weights_for(MODELS[model](), dtype=dtype, device=device)
    stack = Stack(weights)
    names = [n for n, _ in stack.named_parameters()]
    params = [p for _, p in stack.named_parameters()]
    dense = [p.detach().clone() for p in params]
    wanda_state, movement_state = _observed(stack, names)
    wanda, movement = Wanda(), Movement()
    movement.attach(stack, names)
    wanda.attach(stack, names)  # hooks unused here: the state is loaded before each call

    def restore() -> None:
        with torch.no_grad():
            for p, d in zip(params, dense):
                p.copy_(d)
        wanda.load_state_dict(wanda_state)
        movement.load_state_dict(movement_state)

    nbytes = sum(p.numel() * p.element_size() for p in params)
    base = {"model": model, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    rows = []
    providers = {
        "gmp_ext prune_step magnitude": lambda _: gmp_ext.prune_step(stack, SPARSITY),
        "gmp_ext prune_step wanda": lambda _: gmp_ext.prune_step(stack, SPARSITY, score=wanda),
        "gmp_ext prune_step movement": lambda _: gmp_ext.prune_step(
            stack, SPARSITY, score=movement
        ),
        "torch kthvalue loop (magnitude)": lambda _: _kthvalue_loop(params),
    }
    for provider, fn in providers.items():
        timing = measure(device, fn, repeats=repeats, setup=restore, confirm_slow=True)
        row = {"kernel": "prune_step", "provider": provider, **base, **timing}
        if timing.get("status") == "ok":
            row.update(rates(float(timing["p50_ms"]), nbytes, nbytes, copy["gbps"]))
        rows.append(row)
        gmp_ext.remove(stack)

    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-4)

    def train_step(_: object) -> None:
        optimizer.zero_grad(set_to_none=False)
        stack(tokens).backward()
        optimizer.step()

    restore()
    stack(tokens).backward()  # gradients for the accumulation rows
    timing = measure(device, lambda _: movement.accumulate(), repeats=repeats, setup=lambda: None)
    rows.append({"kernel": "movement_accumulate", "provider": "gmp_ext", **base, **timing})
    timing = measure(device, train_step, repeats=repeats, setup=lambda: None)
    rows.append({"kernel": "train_step", "provider": f"AdamW, {tokens} tokens", **base, **timing})
    magnitude = rows[0].get("p50_ms")
    for row in rows:
        if row.get("status") == "ok" and row["kernel"] == "prune_step" and magnitude:
            row["x_magnitude"] = float(row["p50_ms"]) / float(magnitude)
    step_ms, accumulate_ms = rows[-1].get("p50_ms"), rows[-2].get("p50_ms")
    if step_ms and accumulate_ms:
        rows[-2]["pct_of_train_step"] = 100 * float(accumulate_ms) / float(step_ms)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--magnitude-only"]:  # the subprocess of --before
        model, dtype_name, repeats = sys.argv[2:5]
        print(json.dumps(time_magnitude(model, getattr(torch, dtype_name), int(repeats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=256, help="input rows per Linear layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="also time the magnitude step at this git revision")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.before and device.type != "cpu":
        parser.error("--before times the CPU path only")
    copy = copy_reference(device, None)
    for model in args.models:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            rows = run(model, dtype, device, args.tokens, args.repeats, copy)
            if args.before:
                timing = time_before(args.before, model, dtype_name, args.repeats)
                base = {k: rows[0][k] for k in ("kernel", "model", "dtype", "device")}
                provider = f"gmp_ext prune_step magnitude (at {args.before})"
                rows.insert(1, {**base, "provider": provider, **timing})
                rows[1]["x_magnitude"] = float(timing["p50_ms"]) / float(rows[0]["p50_ms"])
            path = write_rows(f"scores_{model}_{device.type}_{dtype_name}", [copy, *rows])
            print_table(
                rows,
                ["kernel", "provider", "p50_ms", "x_magnitude", "pct_of_train_step", "status"],
            )
            print(f"wrote {path}")
    assert math.isfinite(copy["gbps"])


if __name__ == "__main__":
    main()
