"""``gmp-ext demo``: what gradual magnitude pruning buys over one-shot pruning, on real data.

A small CNN is trained dense on scikit-learn's bundled handwritten digits (1,797 8x8 images,
fixed stratified split; nothing is downloaded). From that one dense checkpoint, with the same
retraining budget and optimizer (SGD with momentum and weight decay), three arms are compared:

* ``gmp``: 1 epoch of stabilization, then sparsity from 5% to the target over about the first
  half of retraining (cubic schedule, once per epoch) through :class:`gmp_ext.GMP`, then
  fine-tuning with weight decay removed;
* ``oneshot_ft``: prune to the target at once, then retrain for the whole budget with the same
  learning rates, the same weight-decay removal and the masks re-applied after every step;
* ``oneshot``: prune the dense checkpoint to the target, no retraining.

All numbers are measured in the run; nothing is a constant.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARMS = ("gmp", "oneshot_ft", "oneshot")
ARM_LABELS = {
    "gmp": "GMP (gradual)",
    "oneshot_ft": "one-shot + fine-tune",
    "oneshot": "one-shot, no fine-tune",
}
BATCH = 64
DENSE_LR = 0.05
RETRAIN_LR = 0.01  # above the dense run's final 0.005: GMP retrains at a slightly higher rate
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
INIT_SPARSITY = 0.05


class DemoError(ValueError):
    """A problem with the user's input or environment: one line, exit code 2."""


@dataclass(frozen=True)
class Plan:
    """Epoch budget of one run; the schedule and learning-rate drops derive from it."""

    dense_epochs: int
    epochs: int

    @property
    def end_epoch(self) -> int:  # pruning ends about half-way through retraining
        return max(2, round(self.epochs / 2))

    @property
    def lr_milestones(self) -> list[int]:
        return sorted(
            {max(self.end_epoch + 1, round(0.75 * self.epochs)), round(0.9 * self.epochs)}
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sparsity",
        nargs="+",
        type=float,
        default=[0.9],
        metavar="S",
        help="target sparsities in (0, 1), e.g. 0.9 0.95 0.98 (default: 0.9)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    parser.add_argument("--scope", choices=["layer", "global"], default="layer")
    parser.add_argument("--epochs", type=int, help="retraining epochs per arm (default: 30)")
    parser.add_argument("--out", type=Path, default=Path("gmp_demo"), help="output directory")
    parser.add_argument(
        "--quick", action="store_true", help="short run for a smoke test (1 seed, few epochs)"
    )


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DemoError(
            f"the demo needs {package}: pip install '.[demo]' (or pip install {package})"
        ) from None


def _check(args: argparse.Namespace) -> tuple[list[float], int, Plan]:
    for s in args.sparsity:
        if not (math.isfinite(s) and 0.0 < s < 1.0):
            raise DemoError(f"--sparsity values must be in (0, 1), got {s:g}")
    seeds = 1 if args.quick else args.seeds
    if seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {seeds}")
    epochs = args.epochs if args.epochs is not None else (12 if args.quick else 30)
    if epochs < 4:
        raise DemoError(
            f"--epochs must be >= 4 (stabilization, pruning, fine-tuning), got {epochs}"
        )
    plan = Plan(dense_epochs=15 if args.quick else 40, epochs=epochs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise DemoError(
            f"--out {args.out} is not writable ({error.strerror}); pick another directory"
        ) from None
    return sorted(set(args.sparsity)), seeds, plan


def load_digits_split():
    """Fixed stratified 70/30 split of sklearn's digits, as float tensors in [0, 1]."""
    import torch

    datasets = _require("sklearn.datasets", "scikit-learn")
    model_selection = _require("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = digits.images.astype("float32") / 16.0
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )

    def as_tensors(images, labels):
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()

    return as_tensors(x_train, y_train), as_tensors(x_test, y_test)


def make_model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _batches(data, seed: int, epoch: int):
    import torch

    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
    for start in range(0, len(y), BATCH):
        index = order[start : start + BATCH]
        yield x[index], y[index]


def _steps_per_epoch(data) -> int:
    return math.ceil(len(data[1]) / BATCH)


def accuracy(model, data) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        correct = (model(data[0]).argmax(1) == data[1]).float().mean().item()
    model.train()
    return correct


def _train_epochs(model, optimizer, scheduler, train, test, seed, epochs, bar, on_epoch=None):
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    curve = []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        for x, y in _batches(train, seed, epoch):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        curve.append(accuracy(model, test))
        bar.update(1)
    return curve


def _progress(total: int, desc: str):
    tqdm = _require("tqdm", "tqdm").tqdm
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, file=sys.stderr)


def train_dense(seed: int, plan: Plan, train, test):
    import torch

    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=DENSE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [round(0.7 * plan.dense_epochs)], gamma=0.1
    )
    with _progress(plan.dense_epochs, f"dense         seed {seed}") as bar:
        _train_epochs(model, optimizer, scheduler, train, test, seed, plan.dense_epochs, bar)
    return model


def _layer_record(model) -> dict[str, dict[str, Any]]:
    """Per pruned layer: size, zeros counted in the weights, and a digest of the packed mask
    (numpy.packbits little-endian of gmp_ext.masks) that tests compare with the weights."""
    import numpy as np

    import gmp_ext

    params = dict(model.named_parameters())
    record = {}
    for name, keep in gmp_ext.masks(model).items():
        packed = np.packbits(keep.reshape(-1).numpy(), bitorder="little")
        weight = params[name].detach()
        record[name] = {
            "numel": weight.numel(),
            "zeros": int((weight == 0).sum()),
            "sparsity": int((weight == 0).sum()) / weight.numel(),
            "mask_sha256": hashlib.sha256(packed.tobytes()).hexdigest(),
        }
    return record


def _achieved(layers: dict[str, dict[str, Any]]) -> float:
    return sum(v["zeros"] for v in layers.values()) / sum(v["numel"] for v in layers.values())


def _retrain_optimizer(model):
    import torch

    return torch.optim.SGD(
        model.parameters(), lr=RETRAIN_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )


def run_arm(arm: str, dense, target: float, seed: int, plan: Plan, scope: str, train, test, out):
    """One arm from a copy of the dense checkpoint; returns its measured record."""
    import torch

    import gmp_ext

    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    result: dict[str, Any] = {"arm": arm, "target": target, "seed": seed}
    if arm == "oneshot":
        gmp_ext.prune_step(model, target, scope=scope)
        result["curve"] = []
    else:
        optimizer = _retrain_optimizer(model)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, plan.lr_milestones, gamma=0.1)
        steps = _steps_per_epoch(train)
        on_epoch = None
        controller = None
        if arm == "gmp":
            schedule = gmp_ext.GMPSchedule(INIT_SPARSITY, target, 1, plan.end_epoch, 1.0, "cubic")
            controller = gmp_ext.GMP(
                model,
                optimizer,
                schedule,
                steps_per_epoch=steps,
                scope=scope,
                fine_tune_weight_decay=0.0,
                total_epochs=plan.epochs,
            )
        else:
            gmp_ext.prune_step(model, target, scope=scope)
            gmp_ext.attach(model, optimizer)

            def on_epoch(epoch: int) -> None:  # the same weight-decay removal as GMP's
                if epoch == plan.end_epoch:
                    for group in optimizer.param_groups:
                        group["weight_decay"] = 0.0

        with _progress(plan.epochs, f"{arm:<13} s={target:g} seed {seed}") as bar:
            result["curve"] = _train_epochs(
                model, optimizer, scheduler, train, test, seed, plan.epochs, bar, on_epoch
            )
        if controller is not None:
            result["history"] = controller.history
            result["schedule"] = controller.schedule.state_dict()
            result["steps_per_epoch"] = steps
    result["wall_s"] = time.perf_counter() - start
    result["accuracy"] = accuracy(model, test)
    result["layers"] = _layer_record(model)
    result["achieved"] = _achieved(result["layers"])
    result["checkpoint"] = f"models/{arm}_s{target:g}_seed{seed}.pt"
    (out / "models").mkdir(exist_ok=True)
    torch.save(model.state_dict(), out / result["checkpoint"])
    return result


def summarize(runs: list[dict], dense_acc: dict[int, float]) -> list[dict[str, Any]]:
    dense_mean = statistics.fmean(dense_acc.values())
    rows = []
    for target in sorted({r["target"] for r in runs}):
        for arm in ARMS:
            group = [r for r in runs if r["arm"] == arm and r["target"] == target]
            accs = [r["accuracy"] for r in group]
            rows.append(
                {
                    "arm": arm,
                    "target": target,
                    "seeds": len(group),
                    "achieved": statistics.fmean(r["achieved"] for r in group),
                    "accuracy_mean": statistics.fmean(accs),
                    "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "drop_vs_dense": dense_mean - statistics.fmean(accs),
                    "wall_s": statistics.fmean(r["wall_s"] for r in group),
                }
            )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per target comparing GMP with one-shot + fine-tune, spread included."""
    lines = []
    for target in sorted({r["target"] for r in rows}):
        gmp = next(r for r in rows if r["arm"] == "gmp" and r["target"] == target)
        ft = next(r for r in rows if r["arm"] == "oneshot_ft" and r["target"] == target)
        gap = gmp["accuracy_mean"] - ft["accuracy_mean"]
        noise = max(gmp["accuracy_std"], ft["accuracy_std"])
        if abs(gap) <= noise or abs(gap) < 0.002:
            verdict = "one-shot + fine-tune matches GMP (difference within the seed spread)"
        elif gap > 0:
            verdict = f"GMP wins by {100 * gap:.1f} points"
        else:
            verdict = f"one-shot + fine-tune wins by {100 * -gap:.1f} points"
        lines.append(f"sparsity {target:g}: {verdict}")
    return lines


def format_table(rows: list[dict[str, Any]], dense_acc: dict[int, float]) -> str:
    dense = list(dense_acc.values())
    spread = statistics.stdev(dense) if len(dense) > 1 else 0.0
    header = ("arm", "target", "achieved", "test accuracy", "drop vs dense", "wall s")
    lines = [header]
    for r in rows:
        lines.append(
            (
                ARM_LABELS[r["arm"]],
                f"{r['target']:.2f}",
                f"{r['achieved']:.4f}",
                f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}%",
                f"{100 * r['drop_vs_dense']:+.2f}",
                f"{r['wall_s']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"dense: {100 * statistics.fmean(dense):.2f} ± {100 * spread:.2f}% test accuracy"]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(text)


def write_figures(
    runs: list[dict], plan: Plan, dense_acc: dict[int, float], out: Path
) -> list[Path]:
    """Sparsity per layer vs step (stages shaded), learning rate vs step, accuracy vs epoch."""
    _require("matplotlib", "matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plotting import plot_schedule, plot_sparsity_history
    from .schedule import GMPSchedule, LRSteps

    paths = []
    first = next(r for r in runs if r["arm"] == "gmp")
    schedule = GMPSchedule.from_state_dict(first["schedule"])
    steps = first["steps_per_epoch"]
    path = out / "sparsity_per_layer.png"
    plot_sparsity_history(
        first["history"],
        path,
        schedule=schedule,
        steps_per_epoch=steps,
        until_step=plan.epochs * steps,
    )
    paths.append(path)
    path = out / "schedule_lr.png"
    plot_schedule(
        schedule, plan.epochs, steps, lr=LRSteps(RETRAIN_LR, plan.lr_milestones, 0.1), path=path
    )
    paths.append(path)

    targets = sorted({r["target"] for r in runs})
    figure = Figure(figsize=(5.0 * len(targets), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(targets), squeeze=False)[0]
    dense = statistics.fmean(dense_acc.values())
    for ax, target in zip(axes, targets):
        for arm in ARMS:
            group = [r for r in runs if r["arm"] == arm and r["target"] == target]
            if arm == "oneshot":
                mean = statistics.fmean(r["accuracy"] for r in group)
                ax.axhline(100 * mean, color="tab:red", ls=":", label=ARM_LABELS[arm])
                continue
            curves = [r["curve"] for r in group]
            mean_curve = [100 * statistics.fmean(c[i] for c in curves) for i in range(plan.epochs)]
            ax.plot(range(1, plan.epochs + 1), mean_curve, marker=".", label=ARM_LABELS[arm])
        ax.axhline(100 * dense, color="gray", ls="--", label="dense")
        ax.axvspan(0, 1, color="tab:green", alpha=0.08)
        ax.axvspan(1, plan.end_epoch, color="tab:orange", alpha=0.08)
        ax.axvspan(plan.end_epoch, plan.epochs, color="tab:blue", alpha=0.05)
        ax.set_title(f"target sparsity {target:g}")
        ax.set_xlabel("retraining epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path = out / "accuracy.png"
    figure.savefig(path, dpi=110)
    paths.append(path)
    return paths


def _command_line(args: argparse.Namespace) -> str:
    words = ["gmp-ext", "demo", "--sparsity", *(f"{s:g}" for s in args.sparsity)]
    words += ["--seeds", str(args.seeds), "--scope", args.scope, "--out", str(args.out)]
    if args.epochs is not None:
        words += ["--epochs", str(args.epochs)]
    return " ".join(words + (["--quick"] if args.quick else []))


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """The whole demo; returns what results.json holds."""
    sparsities, seeds, plan = _check(args)
    for module, package in (
        ("sklearn", "scikit-learn"),
        ("matplotlib", "matplotlib"),
        ("tqdm", "tqdm"),
    ):
        _require(module, package)
    import torch

    started = time.perf_counter()
    # The layers are tiny (8x8 images, batches of 64): intra-op threads only add hand-offs, and
    # on a busy machine spinning OpenMP workers can slow such a loop down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _execute(args, sparsities, seeds, plan, started)
    finally:
        torch.set_num_threads(threads)


def _execute(args, sparsities, seeds, plan, started) -> dict[str, Any]:
    import torch

    import gmp_ext

    train, test = load_digits_split()
    runs, dense_acc = [], {}
    for seed in range(seeds):
        dense = train_dense(seed, plan, train, test)
        dense_acc[seed] = accuracy(dense, test)
        for target in sparsities:
            for arm in ARMS:
                runs.append(
                    run_arm(arm, dense, target, seed, plan, args.scope, train, test, args.out)
                )
    rows = summarize(runs, dense_acc)
    results = {
        "command": _command_line(args),
        "config": {
            "sparsity": sparsities,
            "seeds": seeds,
            "scope": args.scope,
            "epochs": plan.epochs,
            "dense_epochs": plan.dense_epochs,
            "end_epoch": plan.end_epoch,
            "lr_milestones": plan.lr_milestones,
            "retrain_lr": RETRAIN_LR,
            "batch": BATCH,
            "train_size": len(train[1]),
            "test_size": len(test[1]),
        },
        "versions": {"gmp_ext": gmp_ext.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "dense_accuracy": dense_acc,
        "summary": rows,
        "verdicts": verdicts(rows),
        "runs": runs,
    }
    results["figures"] = [p.name for p in write_figures(runs, plan, dense_acc, args.out)]
    results["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown_summary(results))
    return results


def markdown_summary(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table with the command that produced it."""
    config = results["config"]
    dense = list(results["dense_accuracy"].values())
    spread = statistics.stdev(dense) if len(dense) > 1 else 0.0
    lines = [
        f"`{results['command']}` ({config['seeds']} seeds, {config['epochs']} retraining epochs, "
        f"{results['threads']} thread(s), {results['wall_s']:.0f} s; gmp_ext "
        f"{results['versions']['gmp_ext']}, torch {results['versions']['torch']})",
        "",
        f"Dense: {100 * statistics.fmean(dense):.2f} ± {100 * spread:.2f}% test accuracy.",
        "",
        "| arm | target | achieved | test accuracy (mean ± std) | drop vs dense (points) |",
        "|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(
            f"| {ARM_LABELS[r['arm']]} | {r['target']:g} | {r['achieved']:.4f} | "
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}% | "
            f"{100 * r['drop_vs_dense']:+.2f} |"
        )
    lines += ["", *(f"- {line}" for line in results["verdicts"]), ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = execute(args)
    print(format_table(results["summary"], results["dense_accuracy"]))
    for line in results["verdicts"]:
        print(line)
    print(
        f"wrote {args.out / 'results.json'}, summary.md and {', '.join(results['figures'])} "
        f"in {args.out} ({results['wall_s']:.0f} s)"
    )
    return 0
