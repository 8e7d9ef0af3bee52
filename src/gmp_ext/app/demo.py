"""Compare gradual magnitude pruning with one-shot pruning on real data.

Two datasets (``--data``), nothing downloaded:

* ``digits`` (the default): scikit-learn's bundled handwritten digits (1,797 8x8 images, fixed
  stratified 70/30 split) and a 4-layer CNN with 38k prunable weights;
* ``fashion-mnist``: Zalando's Fashion-MNIST (60,000 training and 10,000 test 28x28 images),
  read with numpy from the idx files of the Debian package ``dataset-fashion-mnist`` (MIT), and
  a CNN with two 5x5 convolutions (16, 32 channels) and two linear layers, 215k prunable
  weights.

From one dense checkpoint per seed, with the same retraining budget and optimizer (SGD with
momentum and weight decay), three arms are compared:

* ``gmp``: stabilization, then sparsity from 5% to the target over about the first half of
  retraining (cubic schedule) through :class:`gmp_ext.GMP`, then fine-tuning with weight decay
  removed;
* ``oneshot_ft``: prune to the target at once, then retrain for the whole budget with the same
  learning rates, the same weight-decay removal and the masks re-applied after every step;
* ``oneshot``: prune the dense checkpoint to the target, no retraining.

All numbers are measured in the run; nothing is a constant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy
    import torch
    from matplotlib.figure import Figure

    Split = tuple[torch.Tensor, torch.Tensor]  # images (N, 1, H, W) in [0, 1], labels (N,)

ARMS = ("gmp", "oneshot_ft", "oneshot")
ARM_LABELS = {
    "gmp": "GMP (gradual)",
    "oneshot_ft": "one-shot + fine-tune",
    "oneshot": "one-shot, no fine-tune",
}
ARM_STYLES = {
    "gmp": {"color": "tab:blue", "marker": "."},
    "oneshot_ft": {"color": "tab:purple", "marker": "x"},
    "oneshot": {"color": "tab:brown", "linestyle": ":"},
}
DENSE_LR = 0.05
RETRAIN_LR = 0.01  # above the dense run's final 0.005: GMP retrains at a slightly higher rate
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
INIT_SPARSITY = 0.05

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "GMP_EXT_FASHION_MNIST_DIR"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
QUICK_TRAIN_IMAGES = 10_000
QUICK_TEST_IMAGES = 2_000  # evaluation is a large share of a short run


class DemoError(ValueError):
    """A problem with the user's input or environment: one line, exit code 2."""


@dataclass(frozen=True)
class RunBudget:
    """Budget and schedule of one run, in epochs of the training set."""

    dense_epochs: int
    epochs: int
    start_epoch: float
    end_epoch: float
    update_frequency: float
    lr_milestones: tuple[float, ...]
    curve_points: int  # test accuracy is measured this many times, evenly over retraining

    @property
    def curve_epochs(self) -> list[float]:
        return [self.epochs * (i + 1) / self.curve_points for i in range(self.curve_points)]


def _digits_budget(epochs: int, quick: bool) -> RunBudget:
    """One update per epoch (20 steps): pruning ends about half-way through retraining."""
    end = max(2, round(epochs / 2))
    return RunBudget(
        dense_epochs=15 if quick else 40,
        epochs=epochs,
        start_epoch=1,
        end_epoch=end,
        update_frequency=1.0,
        lr_milestones=tuple(sorted({max(end + 1, round(0.75 * epochs)), round(0.9 * epochs)})),
        curve_points=epochs,
    )


def _fashion_budget(epochs: int, quick: bool) -> RunBudget:
    """Epochs are long here (469 steps), so the schedule runs in fractions of retraining:
    stabilization for the first eighth, then 6 updates until half-way (59 optimizer steps apart
    with the default 2 epochs), learning-rate drops at 75% and 90%."""
    start, end = epochs / 8, epochs / 2
    return RunBudget(
        dense_epochs=1 if quick else 3,
        epochs=epochs,
        start_epoch=start,
        end_epoch=end,
        update_frequency=(end - start) / 6,
        lr_milestones=(0.75 * epochs, 0.9 * epochs),
        curve_points=max(4, epochs),
    )


@dataclass(frozen=True)
class DataSpec:
    """What differs between the demo's datasets; the arms and the report are shared."""

    name: str
    batch: int
    default_epochs: int
    quick_epochs: int
    min_epochs: int
    budget: Callable[[int, bool], RunBudget]
    load: Callable[[argparse.Namespace], tuple[Split, Split]]
    make_model: Callable[[], torch.nn.Module]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        choices=sorted(DATASETS),
        default="digits",
        help="dataset: scikit-learn's bundled digits, or Fashion-MNIST from the Debian package "
        f"{FASHION_MNIST_PACKAGE} (default: digits)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="directory holding the Fashion-MNIST idx files (default: "
        f"${FASHION_MNIST_ENV} if set, else {FASHION_MNIST_DIR})",
    )
    parser.add_argument(
        "--sparsity",
        nargs="+",
        type=float,
        default=[0.9],
        metavar="S",
        help="target sparsities in (0, 1), e.g. 0.9 0.95 0.98 (default: 0.9)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="seeds per arm; a verdict needs at least 2 (default: 3)",
    )
    parser.add_argument(
        "--scope",
        choices=["layer", "global"],
        default="layer",
        help="layer: every layer pruned to the target; global: one threshold for all layers, "
        "so layers end at different sparsities (default: layer)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="retraining epochs per arm (default: 30 for digits, 2 for fashion-mnist)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("gmp_demo"),
        metavar="DIR",
        help="output directory (default: gmp_demo)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run for a smoke test: 1 seed, few epochs; fashion-mnist trains on "
        f"{QUICK_TRAIN_IMAGES:,} images and tests on {QUICK_TEST_IMAGES:,}",
    )


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DemoError(
            f"the demo needs {package}: pip install '.[demo]' (or pip install {package})"
        ) from None


def _check(args: argparse.Namespace) -> tuple[DataSpec, list[float], int, RunBudget]:
    spec = DATASETS[args.data]
    for s in args.sparsity:
        if not (math.isfinite(s) and 0.0 < s < 1.0):
            raise DemoError(f"--sparsity values must be in (0, 1), got {s:g}")
    if args.data_dir is not None and spec.name != "fashion-mnist":
        raise DemoError(f"--data-dir applies to --data fashion-mnist only, not --data {spec.name}")
    seeds = 1 if args.quick else args.seeds
    if seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {seeds}")
    if args.epochs is not None:
        epochs = args.epochs
    else:
        epochs = spec.quick_epochs if args.quick else spec.default_epochs
    if epochs < spec.min_epochs:
        raise DemoError(
            f"--epochs must be >= {spec.min_epochs} for --data {spec.name} (stabilization, "
            f"pruning, fine-tuning), got {epochs}"
        )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise DemoError(
            f"--out {args.out} is not writable ({error.strerror}); pick another directory"
        ) from None
    return spec, sorted(set(args.sparsity)), seeds, spec.budget(epochs, args.quick)


def load_digits_split() -> tuple[Split, Split]:
    """Fixed stratified 70/30 split of sklearn's digits, as float tensors in [0, 1]."""
    import torch

    datasets = _require("sklearn.datasets", "scikit-learn")
    model_selection = _require("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = digits.images.astype("float32") / 16.0
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )

    def as_tensors(images: numpy.ndarray, labels: numpy.ndarray) -> Split:
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()

    return as_tensors(x_train, y_train), as_tensors(x_test, y_test)


def fashion_mnist_dir(data_dir: Path | None) -> Path:
    """``--data-dir``, else ``$GMP_EXT_FASHION_MNIST_DIR``, else the Debian package's directory."""
    if data_dir is not None:
        return data_dir
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def read_idx(path: Path) -> numpy.ndarray:
    """A gzip-compressed idx file of unsigned bytes (the MNIST format) as a numpy array."""
    import numpy as np

    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise DemoError(f"{path} is not a readable gzip file ({error})") from None
    ndim = data[3] if len(data) >= 4 else 0
    if data[:3] != b"\x00\x00\x08" or ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DemoError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()})")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", ndim, 4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(shape):
        raise DemoError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)


def load_fashion_mnist(data_dir: Path | None, quick: bool) -> tuple[Split, Split]:
    """Fashion-MNIST's training and test sets as float tensors in [0, 1]; ``quick`` keeps the
    first 10,000 training and 2,000 test images (the files' order is shuffled, so the classes
    stay balanced)."""
    import torch

    directory = fashion_mnist_dir(data_dir)
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DemoError(
            f"Fashion-MNIST not found: no {missing[0]} in {directory}; install the Debian "
            f"package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}) or "
            f"point --data-dir or ${FASHION_MNIST_ENV} at its idx files"
        )
    splits = []
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(directory / images_name), read_idx(directory / labels_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DemoError(
                f"{directory}: {images_name} has shape {images.shape} and {labels_name} "
                f"{labels.shape}; expected N images and N labels"
            )
        if quick:
            keep = QUICK_TRAIN_IMAGES if split == "train" else QUICK_TEST_IMAGES
            images, labels = images[:keep], labels[:keep]
        x = torch.from_numpy(images.astype("float32") / 255.0).unsqueeze(1)
        splits.append((x, torch.from_numpy(labels.astype("int64"))))
    return splits[0], splits[1]


def make_model() -> torch.nn.Module:
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


def make_fashion_model() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


DATASETS = {
    "digits": DataSpec(
        name="digits",
        batch=64,
        default_epochs=30,
        quick_epochs=12,
        min_epochs=4,  # the schedule updates once per epoch
        budget=_digits_budget,
        load=lambda args: load_digits_split(),
        make_model=make_model,
    ),
    "fashion-mnist": DataSpec(
        name="fashion-mnist",
        batch=128,
        default_epochs=2,
        quick_epochs=1,
        min_epochs=1,
        budget=_fashion_budget,
        load=lambda args: load_fashion_mnist(args.data_dir, args.quick),
        make_model=make_fashion_model,
    ),
}


def _batches(data: Split, seed: int, epoch: int, batch: int) -> Iterator[Split]:
    import torch

    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
    for start in range(0, len(y), batch):
        index = order[start : start + batch]
        yield x[index], y[index]


def _steps_per_epoch(data: Split, batch: int) -> int:
    return math.ceil(len(data[1]) / batch)


def accuracy(model: torch.nn.Module, data: Split, chunk: int = 1000) -> float:
    import torch

    x, y = data
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
            for i in range(0, len(y), chunk)
        )
    model.train()
    return correct / len(y)


def _train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    seed: int,
    epochs: int,
    batch: int,
    lr_milestones: tuple[float, ...],
    bar: Any,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """SGD for ``epochs`` epochs, learning rate x0.1 at each milestone epoch; the scheduler
    steps per optimizer step, so milestones may fall inside an epoch. The hooks get the number
    of optimizer steps done."""
    import torch

    steps_per_epoch = _steps_per_epoch(train, batch)
    milestone_steps = [math.ceil(m * steps_per_epoch - 1e-9) for m in lr_milestones]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_steps, gamma=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    step = 0
    for epoch in range(epochs):
        for x, y in _batches(train, seed, epoch, batch):
            if before_step is not None:
                before_step(step)
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:
                after_step(step)
        bar.update(1)


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar on a terminal. In a log (stderr not a terminal) a bar's carriage-return
    redraws would pile up, so there is one line per finished job instead."""
    tqdm = _require("tqdm", "tqdm").tqdm
    interactive = sys.stderr.isatty()
    started = time.perf_counter()
    with tqdm(
        total=total,
        desc=desc,
        unit="epoch",
        leave=False,
        file=sys.stderr,
        disable=not interactive,
    ) as bar:
        yield bar
    if not interactive:
        print(f"{desc}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def train_dense(seed: int, budget: RunBudget, spec: DataSpec, train: Split) -> torch.nn.Module:
    import torch

    torch.manual_seed(seed)
    model = spec.make_model()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=DENSE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    milestones = (round(0.7 * budget.dense_epochs),)
    with _progress(budget.dense_epochs, f"dense seed {seed}") as bar:
        _train(model, optimizer, train, seed, budget.dense_epochs, spec.batch, milestones, bar)
    return model


def _layer_record(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
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


def _retrain_optimizer(model: torch.nn.Module) -> torch.optim.SGD:
    import torch

    return torch.optim.SGD(
        model.parameters(), lr=RETRAIN_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )


def run_arm(
    arm: str,
    dense: torch.nn.Module,
    target: float,
    seed: int,
    budget: RunBudget,
    spec: DataSpec,
    scope: str,
    train: Split,
    test: Split,
    out: Path,
) -> dict[str, Any]:
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
        steps = _steps_per_epoch(train, spec.batch)
        schedule = gmp_ext.GMPSchedule(
            INIT_SPARSITY,
            target,
            budget.start_epoch,
            budget.end_epoch,
            budget.update_frequency,
            "cubic",
        )
        before_step = None
        controller = None
        if arm == "gmp":
            controller = gmp_ext.GMP(
                model,
                optimizer,
                schedule,
                steps_per_epoch=steps,
                scope=scope,
                fine_tune_weight_decay=0.0,
                total_epochs=budget.epochs,
            )
        else:
            gmp_ext.prune_step(model, target, scope=scope)
            gmp_ext.attach(model, optimizer)

            def before_step(step: int) -> None:  # GMP's weight-decay removal, at the same step
                if schedule.stage_at(step / steps) == "fine_tuning":
                    for group in optimizer.param_groups:
                        group["weight_decay"] = 0.0

        curve: list[float] = []
        curve_steps = {round(epoch * steps) for epoch in budget.curve_epochs}

        def after_step(step: int) -> None:
            if step in curve_steps:
                curve.append(accuracy(model, test))

        with _progress(budget.epochs, f"{arm} s={target:g} seed {seed}") as bar:
            _train(
                model,
                optimizer,
                train,
                seed,
                budget.epochs,
                spec.batch,
                budget.lr_milestones,
                bar,
                before_step,
                after_step,
            )
        result["curve"] = curve
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


def _spread(values: list[float]) -> float | None:
    """Standard deviation over seeds; None for one seed, which has no spread."""
    return statistics.stdev(values) if len(values) > 1 else None


def _percent(mean: float, spread: float | None) -> str:
    return f"{100 * mean:.2f}%" if spread is None else f"{100 * mean:.2f} ± {100 * spread:.2f}%"


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
                    "accuracy_std": _spread(accs),
                    "drop_vs_dense": dense_mean - statistics.fmean(accs),
                    "wall_s": statistics.fmean(r["wall_s"] for r in group),
                }
            )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per target comparing GMP with one-shot + fine-tune, spread included; with a
    single seed there is no spread to judge a gap against, so only the numbers are given."""
    lines = []
    for target in sorted({r["target"] for r in rows}):
        gmp = next(r for r in rows if r["arm"] == "gmp" and r["target"] == target)
        ft = next(r for r in rows if r["arm"] == "oneshot_ft" and r["target"] == target)
        gap = gmp["accuracy_mean"] - ft["accuracy_mean"]
        if gmp["accuracy_std"] is None or ft["accuracy_std"] is None:
            verdict = (
                f"GMP {100 * gmp['accuracy_mean']:.2f}%, one-shot + fine-tune "
                f"{100 * ft['accuracy_mean']:.2f}% from one seed (a verdict needs --seeds 2 or "
                "more)"
            )
        elif abs(gap) <= max(gmp["accuracy_std"], ft["accuracy_std"]) or abs(gap) < 0.002:
            verdict = "one-shot + fine-tune matches GMP (difference within the seed spread)"
        elif gap > 0:
            verdict = f"GMP wins by {100 * gap:.1f} points"
        else:
            verdict = f"one-shot + fine-tune wins by {100 * -gap:.1f} points"
        lines.append(f"sparsity {target:g}: {verdict}")
    return lines


def format_table(rows: list[dict[str, Any]], dense_acc: dict[int, float]) -> str:
    dense = list(dense_acc.values())
    header = ("arm", "target", "achieved", "test accuracy", "drop vs dense", "wall s")
    lines = [header]
    for r in rows:
        lines.append(
            (
                ARM_LABELS[r["arm"]],
                f"{r['target']:.2f}",
                f"{r['achieved']:.4f}",
                _percent(r["accuracy_mean"], r["accuracy_std"]),
                f"{100 * r['drop_vs_dense']:+.2f}",
                f"{r['wall_s']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"dense: {_percent(statistics.fmean(dense), _spread(dense))} test accuracy"]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(text)


def write_figures(
    runs: list[dict],
    budget: RunBudget,
    dense_acc: dict[int, float],
    out: Path,
    data: str,
    scope: str,
) -> list[Path]:
    """Per target, seed 0's GMP run: sparsity per layer against optimizer step, and beside it
    mask churn and regrowth per update. The schedule and learning rate of the highest target.
    Test accuracy against epoch, a panel per target."""
    _require("matplotlib", "matplotlib")
    from gmp_ext.training.plotting import plot_schedule, plot_sparsity_history, plot_telemetry
    from gmp_ext.training.schedule import GMPSchedule, LRSteps

    paths = []
    seeds = len(dense_acc)
    shown = sorted(
        (r for r in runs if r["arm"] == "gmp" and r["seed"] == 0), key=lambda r: r["target"]
    )
    for run in shown:
        steps = run["steps_per_epoch"]
        path = out / f"sparsity_per_layer_{run['target']:g}.png"
        plot_sparsity_history(
            run["history"],
            path,
            schedule=GMPSchedule.from_state_dict(run["schedule"]),
            steps_per_epoch=steps,
            until_step=budget.epochs * steps,
            title=f"{data}: GMP to sparsity {run['target']:g}, seed 0 of {seeds}, {scope} scope",
        )
        paths.append(path)
        if any(r.get("regrowth") is not None for r in run["history"]):  # two updates at least
            path = out / f"telemetry_{run['target']:g}.png"
            plot_telemetry(
                run["history"], path, title=f"{data}: GMP to sparsity {run['target']:g}, seed 0"
            )
            paths.append(path)
    path = out / "schedule_lr.png"
    lr = LRSteps(RETRAIN_LR, budget.lr_milestones, 0.1)
    schedule = GMPSchedule.from_state_dict(shown[-1]["schedule"])
    plot_schedule(schedule, budget.epochs, shown[-1]["steps_per_epoch"], lr=lr, path=path)
    paths.append(path)
    path = out / "accuracy.png"
    plot_accuracy(runs, budget, dense_acc, data).savefig(path, dpi=110)
    paths.append(path)
    return paths


def plot_accuracy(
    runs: list[dict], budget: RunBudget, dense_acc: dict[int, float], data: str
) -> Figure:
    """Test accuracy against retraining epoch, mean over seeds, a panel per target; the stages
    shaded in the colours of every other figure (gmp_ext.training.plotting.STAGE_COLORS)."""
    from gmp_ext.training.plotting import new_figure, shade_stages
    from gmp_ext.training.schedule import GMPSchedule

    targets = sorted({r["target"] for r in runs})
    seeds = len(dense_acc)
    figure = new_figure(figsize=(4.5 * len(targets) + 2.0, 4.2))
    axes = figure.subplots(1, len(targets), squeeze=False)[0]
    dense = statistics.fmean(dense_acc.values())
    for ax, target in zip(axes, targets):
        schedule = GMPSchedule(
            INIT_SPARSITY, target, budget.start_epoch, budget.end_epoch, budget.update_frequency
        )
        shade_stages(ax, schedule, budget.epochs)
        for arm in ARMS:
            group = [r for r in runs if r["arm"] == arm and r["target"] == target]
            if arm == "oneshot":
                mean = statistics.fmean(r["accuracy"] for r in group)
                ax.axhline(100 * mean, label=ARM_LABELS[arm], **ARM_STYLES[arm])
                continue
            points = zip(*(r["curve"] for r in group))
            mean_curve = [100 * statistics.fmean(point) for point in points]
            ax.plot(budget.curve_epochs, mean_curve, label=ARM_LABELS[arm], **ARM_STYLES[arm])
        ax.axhline(100 * dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlim(0, budget.epochs)
        ax.set_title(f"{data}: target sparsity {target:g}\nmean of {seeds} seed{'s' * (seeds > 1)}")
        ax.set_xlabel("retraining epoch")
        ax.set_ylabel("test accuracy (%)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    return figure


def _command_line(args: argparse.Namespace) -> str:
    words = ["gmp-ext", "demo"]
    if args.data != "digits":
        words += ["--data", args.data]
    if args.data_dir is not None:
        words += ["--data-dir", str(args.data_dir)]
    words += ["--sparsity", *(f"{s:g}" for s in args.sparsity)]
    words += ["--seeds", str(args.seeds), "--scope", args.scope, "--out", str(args.out)]
    if args.epochs is not None:
        words += ["--epochs", str(args.epochs)]
    return " ".join(words + (["--quick"] if args.quick else []))


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """The whole demo; returns what results.json holds."""
    spec, sparsities, seeds, budget = _check(args)
    for module, package in (("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        _require(module, package)
    import torch

    started = time.perf_counter()
    # The layers are small (batches of 64-128 images): intra-op threads only add hand-offs, and
    # on a busy machine spinning OpenMP workers can slow such a loop down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _execute(args, spec, sparsities, seeds, budget, started)
    finally:
        torch.set_num_threads(threads)


def _execute(
    args: argparse.Namespace,
    spec: DataSpec,
    sparsities: list[float],
    seeds: int,
    budget: RunBudget,
    started: float,
) -> dict[str, Any]:
    import torch

    import gmp_ext

    train, test = spec.load(args)
    runs, dense_acc = [], {}
    for seed in range(seeds):
        dense = train_dense(seed, budget, spec, train)
        dense_acc[seed] = accuracy(dense, test)
        for target in sparsities:
            for arm in ARMS:
                runs.append(
                    run_arm(
                        arm, dense, target, seed, budget, spec, args.scope, train, test, args.out
                    )
                )
    rows = summarize(runs, dense_acc)
    results = {
        "command": _command_line(args),
        "config": {
            "data": spec.name,
            "sparsity": sparsities,
            "seeds": seeds,
            "scope": args.scope,
            "epochs": budget.epochs,
            "dense_epochs": budget.dense_epochs,
            "start_epoch": budget.start_epoch,
            "end_epoch": budget.end_epoch,
            "update_frequency": budget.update_frequency,
            "lr_milestones": list(budget.lr_milestones),
            "curve_epochs": budget.curve_epochs,
            "retrain_lr": RETRAIN_LR,
            "batch": spec.batch,
            "train_size": len(train[1]),
            "test_size": len(test[1]),
            "prunable_weights": sum(layer["numel"] for layer in runs[0]["layers"].values()),
        },
        "versions": {"gmp_ext": gmp_ext.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "dense_accuracy": dense_acc,
        "summary": rows,
        "verdicts": verdicts(rows),
        "runs": runs,
    }
    figures = write_figures(runs, budget, dense_acc, args.out, spec.name, args.scope)
    results["figures"] = [p.name for p in figures]
    results["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown_summary(results))
    return results


def markdown_summary(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table with the command that produced it."""
    config = results["config"]
    dense = list(results["dense_accuracy"].values())
    seeds = config["seeds"]
    lines = [
        f"`{results['command']}` ({config['data']}, {seeds} seed{'s' * (seeds > 1)}, "
        f"{config['epochs']} retraining epochs, {results['threads']} thread(s), "
        f"{results['wall_s']:.0f} s; gmp_ext {results['versions']['gmp_ext']}, torch "
        f"{results['versions']['torch']})",
        "",
        f"Dense: {_percent(statistics.fmean(dense), _spread(dense))} test accuracy.",
        "",
        f"| arm | target | achieved | test accuracy ({'mean ± std' if seeds > 1 else '1 seed'})"
        " | drop vs dense (points) |",
        "|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(
            f"| {ARM_LABELS[r['arm']]} | {r['target']:g} | {r['achieved']:.4f} | "
            f"{_percent(r['accuracy_mean'], r['accuracy_std'])} | "
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
