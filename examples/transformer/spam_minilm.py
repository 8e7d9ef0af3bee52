"""Prune a pretrained transformer with the Hugging Face Trainer: all-MiniLM-L6-v2 fine-tuned for
spam / ham on the SpamAssassin public corpus, gradual pruning (magnitude, Wanda or movement
scores) against one-shot pruning plus fine-tuning at the same training budget.

Fetch the model and the data first (once): ``bash examples/transformer/fetch.sh``; then e.g.

    python examples/transformer/spam_minilm.py --sparsity 0.9 --seeds 0 --out spam.json

Per seed: a random 2,048 / 1,024 train / test split of the 6,046 emails (spam-1, spam-2 are spam;
easy-ham-1, easy-ham-2, hard-ham-1 are ham), subject and body (headers and HTML tags dropped),
64 tokens; the word, position and token-type embeddings are frozen; the dense model is fine-tuned
for ``--steps`` optimizer steps (AdamW, learning rate decayed linearly to 0), then every arm
starts from that dense checkpoint and trains ``--steps`` more with the same optimizer and batch.
The 36 weight matrices of the 6 encoder layers (query, key, value, attention output,
intermediate, output) are pruned; the pooler and the classifier stay dense. Arms:

* ``oneshot_ft``: prune the dense checkpoint to the target at once (``gmp_ext.prune_step``),
  then fine-tune with the masks re-applied after every step (``gmp_ext.attach``);
* ``oneshot_wanda_ft``: as ``oneshot_ft``, ranked by Wanda (``score="wanda"``: |w| times the
  norm of the input feature), the input norms taken over ``--calibration`` training batches
  (model inputs, no labels, the model in eval mode, no gradients) of the seed's training split;
  the calibration passes are forward passes only, not optimizer steps;
* ``gmp``: the naive setting, as a user first sets it up: ``GMPCallback`` with sparsity 5% ->
  target along the cubic curve from 1/4 to 1/2 of the budget, updates every 1/16 of it, the
  Trainer's linear learning-rate decay;
* ``gmp_large_first``: the first pruning step at the dense checkpoint is large (``--init``,
  default 0.7), then cubic to the target by ``--end`` of the budget (default half), updates
  every 1/16 of it;
* ``gmp_large_first_rewarm``: as ``gmp_large_first``, and the learning rate re-warmed to its
  peak at every pruning update, decaying linearly until the next one, then to 0 over
  fine-tuning (the sawtooth schedule of Kurtic & Alistarh, arXiv 2210.06384);
* ``gmp_rewarm``: the naive schedule with that re-warmed learning rate;
* ``recipe``: gmp_ext's preset for pretrained transformers,
  ``gmp_ext.training.lr_schedule.pretrained_transformer`` (the schedule and learning rate of
  ``gmp_large_first_rewarm --init 0.7 --end 0.25``: 70% at step 0, cubic to the target by a
  quarter of the budget, the rate re-warmed at every update);
* ``recipe_wanda``, ``recipe_movement``: the ``recipe`` arm with ``score="wanda"`` (input norms
  accumulated by forward hooks over the training batches since the last update) or
  ``score="movement"`` (``-sum(w * grad)`` over the optimizer steps since the last update). A
  score that observes training cannot prune at step 0 (GMP refuses such a schedule), so these
  arms run the recipe shifted by one update interval: the first update (``min(0.7, target)``)
  comes after an observation window of 1/16 of the budget (``start_epoch`` = one
  ``update_frequency``), then cubic to the target by the same end (a quarter of the budget),
  an update every 1/16; the same total steps, and the same learning rate (restarts at steps 0,
  1/16, 2/16, 3/16 and 4/16 of the budget, as ``recipe``). So they have 4 pruning updates to
  ``recipe``'s 5 and fine-tune the first 1/16 of the budget dense. The JSON records each arm's
  ``score``, its ``schedule`` and, for these arms, ``observe_steps``.

Every arm trains ``--steps`` optimizer steps. With ``--eval-every``, the test passes of the
accuracy curve run forward through the model, and a Wanda score under GMP counts them among
its observations (its hooks see every forward pass): keep ``--eval-every 0`` (the default) for
the Wanda arms of a comparison. Under ``recipe_movement`` the pruned weights are zero, so their
movement score is exactly 0 and ranks above every kept weight that moved toward zero: updates
after the first prune such weights and keep (as zeros) some pruned ones, GMP warns that the
achieved sparsity differs from the target, and the kept zeros train again afterwards.

The five-arm comparison of issue 23 (one-shot magnitude / Wanda + fine-tuning, gradual
magnitude / Wanda / movement; 90% and 97%, 3 seeds)::

    python examples/transformer/spam_minilm.py --sparsity 0.9 0.97 --seeds 0 1 2 \\
        --arms oneshot_ft oneshot_wanda_ft recipe recipe_wanda recipe_movement --out issue23.json

Accuracy is measured on the test split after the last step; every number in the JSON is measured.
``achieved`` is the encoder matrices' fraction of zeros at the end, ``at_target`` whether their
zeros are exactly the target's count (``round(target * numel)`` per matrix).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("GMP_EXT_CACHE", Path.home() / ".cache" / "gmp_ext"))
ARMS = (
    "oneshot_ft",
    "gmp",
    "gmp_large_first",
    "gmp_large_first_rewarm",
    "gmp_rewarm",
    "recipe",
    "oneshot_wanda_ft",
    "recipe_wanda",
    "recipe_movement",
)
# The score each arm ranks by (gmp_ext.scores); the arms not named here rank by magnitude.
ARM_SCORES = {"oneshot_wanda_ft": "wanda", "recipe_wanda": "wanda", "recipe_movement": "movement"}
SPAM_GROUPS = ("spam-1", "spam-2")
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")


def email_text(raw: str) -> str:
    """Subject and body of a raw email, HTML tags and runs of whitespace collapsed."""
    head, _, body = raw.partition("\n\n")
    subject = re.search(r"^Subject:(.*)$", head, re.MULTILINE | re.IGNORECASE)
    body = re.sub(r"<[^>]*>", " ", body)
    text = (subject.group(1) if subject else "") + " \n " + body
    return re.sub(r"\s+", " ", text).strip()


def load_corpus(data_dir: Path) -> list[tuple[str, int]]:
    """(text, label) for every email, label 1 = spam, in file-name order."""
    rows = []
    for group in SPAM_GROUPS + HAM_GROUPS:
        files = sorted((data_dir / group).glob("*.txt"))
        if not files:
            raise SystemExit(f"no emails in {data_dir / group}; run examples/transformer/fetch.sh")
        for path in files:
            raw = path.read_text(encoding="utf-8", errors="replace")
            rows.append((email_text(raw), int(group in SPAM_GROUPS)))
    return rows


def encoder_weights(name: str, param: Any) -> bool:
    """The 36 encoder weight matrices (6 layers x query, key, value, and 3 dense layers)."""
    return ".encoder.layer." in name and name.endswith(".weight") and param.dim() == 2


class Encoded:
    """A tokenized split as the Trainer's dataset: dicts of tensors."""

    def __init__(self, tokenizer: Any, rows: list[tuple[str, int]], max_length: int) -> None:
        import torch

        enc = tokenizer(
            [t for t, _ in rows],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        self.tensors = dict(enc)
        self.tensors["labels"] = torch.tensor([y for _, y in rows])

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()}


def evaluate(model: Any, data: Encoded) -> dict[str, float]:
    """Test accuracy and the fraction predicted spam (a collapsed model predicts one class)."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(data), 256):
            batch = {k: v[i : i + 256] for k, v in data.tensors.items() if k != "labels"}
            preds.append(model(**batch).logits.argmax(-1))
    pred = torch.cat(preds)
    return {
        "accuracy": float((pred == data.tensors["labels"]).float().mean()),
        "predicted_spam": float(pred.float().mean()),
    }


def train(
    model: Any,
    train_set: Encoded,
    args: argparse.Namespace,
    seed: int,
    callbacks: list[Any],
    lr_factor: Any = None,
) -> None:
    """``args.steps`` optimizer steps of the Hugging Face Trainer (AdamW, linear decay to 0, or
    ``lr_factor(step)`` times the peak rate)."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            seed=seed,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        optimizers: Any = (None, None)
        if lr_factor is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
            optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor))
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=train_set,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        trainer.train()


def curve_callback(test_set: Encoded, every: int, curve: list[list[float]]) -> Any:
    """Test accuracy every ``every`` optimizer steps (and at step 0), appended to ``curve`` as
    [step, accuracy]."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.record(0, kw["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step % every == 0:
                self.record(state.global_step, kw["model"])

        def record(self, step: int, model: Any) -> None:
            curve.append([step, evaluate(model, test_set)["accuracy"]])
            model.train()

    return Curve()


def mask_callback() -> Any:
    """Re-apply the one-shot masks after every optimizer step of the Trainer."""
    import torch
    from transformers import TrainerCallback

    import gmp_ext

    class KeepMasks(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            opt = kw["optimizer"]
            inner = getattr(opt, "optimizer", None)  # accelerate's wrapper steps the inner one
            gmp_ext.attach(kw["model"], inner if isinstance(inner, torch.optim.Optimizer) else opt)

    return KeepMasks()


def calibration_batches(train_set: Encoded, count: int, batch: int, seed: int) -> list[dict]:
    """``count`` batches of ``batch`` training examples, drawn at random (seeded) without
    replacement, as keyword inputs of the model (no labels)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set), generator=generator)[: count * batch]
    inputs = {k: v for k, v in train_set.tensors.items() if k != "labels"}
    return [
        {k: v[order[i : i + batch]] for k, v in inputs.items()} for i in range(0, len(order), batch)
    ]


def observed_recipe(target: float, epochs: float, steps_per_epoch: int) -> Any:
    """The ``recipe`` arm's schedule shifted for a score that observes training: the same
    first step, end and update interval, but the first update one interval (1/16 of the run)
    after step 0 instead of at it."""
    from gmp_ext.training.lr_schedule import RunSchedule, pretrained_transformer

    preset = pretrained_transformer(target, epochs, steps_per_epoch).schedule
    return RunSchedule(
        preset.init_sparsity,
        preset.final_sparsity,
        preset.start_epoch + preset.update_frequency,
        preset.end_epoch,
        preset.update_frequency,
        preset.interpolation,
        steps_per_epoch=steps_per_epoch,
    )


def run_arm(
    arm: str,
    dense: Any,
    target: float,
    seed: int,
    data: tuple[Encoded, Encoded],
    args: argparse.Namespace,
) -> dict[str, Any]:
    import torch

    import gmp_ext
    from gmp_ext.integrations.transformers import GMPCallback
    from gmp_ext.training.lr_schedule import PruningRestarts, pretrained_transformer

    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    steps_per_epoch = -(-len(data[0]) // args.batch)
    epochs = args.steps / steps_per_epoch
    start = time.perf_counter()
    lr_factor = None
    callback: Any = None
    schedule: Any = None
    score = ARM_SCORES.get(arm, "magnitude")
    record: dict[str, Any] = {"arm": arm, "target": target, "seed": seed, "score": score}
    if arm == "oneshot_ft":
        gmp_ext.prune_step(model, target, params=encoder_weights, scope=args.scope)
        callback = mask_callback()
    elif arm == "oneshot_wanda_ft":
        batches = calibration_batches(data[0], args.calibration, args.batch, seed)
        model.eval()  # calibration without dropout; the Trainer sets train mode again
        gmp_ext.prune_step(
            model,
            target,
            params=encoder_weights,
            scope=args.scope,
            score=score,
            calibration=batches,
        )
        record["calibration_examples"] = sum(len(b["input_ids"]) for b in batches)
        callback = mask_callback()
    elif arm == "recipe":
        schedule, lr_factor = pretrained_transformer(target, epochs, steps_per_epoch)
        callback = GMPCallback(schedule, params=encoder_weights, scope=args.scope, log_layers=False)
    elif arm in ("recipe_wanda", "recipe_movement"):
        # The recipe's learning rate, unchanged: its restarts (step 0 and every update) fall on
        # the same steps for the shifted schedule.
        _, lr_factor = pretrained_transformer(target, epochs, steps_per_epoch)
        schedule = observed_recipe(target, epochs, steps_per_epoch)
        if lr_factor.bounds != PruningRestarts(schedule, steps_per_epoch, args.steps).bounds:
            raise SystemExit(f"{arm}: the shifted schedule's updates miss the recipe's restarts")
        record["observe_steps"] = round(schedule.start_epoch * steps_per_epoch)
        callback = GMPCallback(
            schedule, params=encoder_weights, scope=args.scope, log_layers=False, score=score
        )
    else:
        if arm in ("gmp", "gmp_rewarm"):
            schedule = gmp_ext.GMPSchedule(0.05, target, epochs / 4, epochs / 2, epochs / 16)
        else:
            init = min(args.init, target)
            schedule = gmp_ext.GMPSchedule(init, target, 0.0, epochs * args.end, epochs / 16)
        if arm.endswith("rewarm"):
            lr_factor = PruningRestarts(schedule, steps_per_epoch, args.steps)
        callback = GMPCallback(schedule, params=encoder_weights, scope=args.scope, log_layers=False)
    curve: list[list[float]] = []
    callbacks = [callback]
    if args.eval_every > 0:
        callbacks.append(curve_callback(data[1], args.eval_every, curve))
    train(model, data[0], args, seed, callbacks, lr_factor)
    if schedule is not None:
        record["schedule"] = {
            k: v for k, v in schedule.state_dict().items() if isinstance(v, (int, float, str))
        }
    record["train_s"] = time.perf_counter() - start
    record.update(evaluate(model, data[1]))
    if curve:
        record["curve"] = curve
    weights = [p for n, p in model.named_parameters() if encoder_weights(n, p)]
    zeros = sum(int((p == 0).sum()) for p in weights)
    record["achieved"] = zeros / sum(p.numel() for p in weights)
    # The exact count of zeros the target means: round(target * numel) per matrix (layer
    # scope), or of all of them (global scope), as gmp_ext counts.
    numels = [p.numel() for p in weights]
    if args.scope == "global":
        expected = round(target * sum(numels))
    else:
        expected = sum(round(target * n) for n in numels)
    record["at_target"] = zeros == expected
    record["pruned_matrices"] = len(weights)
    if isinstance(callback, GMPCallback) and callback.gmp is not None:
        record["updates"] = [
            {"step": h["step"], "sparsity": h.get("target")} for h in callback.gmp.history
        ]
    return record


def dense_model(seed: int, train_set: Encoded, args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(args.model_dir), num_labels=2)
    for p in model.base_model.embeddings.parameters():
        p.requires_grad_(False)
    # The dense run depends only on the seed and the training arguments: reuse it if saved.
    key = f"seed{seed}_steps{args.steps}_batch{args.batch}_lr{args.lr:g}_len{args.max_length}"
    saved = args.dense_dir / f"dense_{key}.pt" if args.dense_dir is not None else None
    if saved is not None and saved.is_file():
        model.load_state_dict(torch.load(saved, weights_only=True))
        return model
    train(model, train_set, args, seed, [])
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), saved)
    return model


def split(rows: list[tuple[str, int]], seed: int, n_train: int, n_test: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train : n_train + n_test]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=CACHE / "all-minilm-l6-v2")
    parser.add_argument("--data-dir", type=Path, default=CACHE / "spam-assassin" / "data")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="oneshot_wanda_ft, recipe_wanda, recipe_movement: one-shot Wanda + fine-tune, and "
        "the recipe with score wanda / movement, its first update after an observation window "
        "of 1/16 of the budget (see the module docstring)",
    )
    parser.add_argument("--scope", choices=["layer", "global"], default="layer")
    parser.add_argument("--init", type=float, default=0.7, help="first step of gmp_large_first*")
    parser.add_argument(
        "--end", type=float, default=0.5, help="gmp_large_first*: pruning ends at this fraction"
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=8,
        help="oneshot_wanda_ft: training batches (of --batch examples) for the Wanda input norms",
    )
    parser.add_argument("--steps", type=int, default=256, help="optimizer steps, dense and arm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--test", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="test accuracy every N steps of each arm (0: end)"
    )
    parser.add_argument("--plot", type=Path, help="PNG of the arms' accuracy curves (--eval-every)")
    parser.add_argument(
        "--dense-dir",
        type=Path,
        default=CACHE / "spam_minilm_dense",
        help="where dense checkpoints are saved and reused (per seed and training arguments)",
    )
    parser.add_argument("--out", type=Path, default=Path("spam_minilm.json"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoTokenizer

    import gmp_ext

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    rows = load_corpus(args.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    versions["gmp_ext"] = gmp_ext.__version__
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    report.update(versions=versions, emails=len(rows), spam=sum(y for _, y in rows), runs=[])
    start = time.perf_counter()
    for seed in args.seeds:
        tr, te = split(rows, seed, args.train, args.test)
        data = (Encoded(tokenizer, tr, args.max_length), Encoded(tokenizer, te, args.max_length))
        t0 = time.perf_counter()
        dense = dense_model(seed, data[0], args)
        record = {"arm": "dense", "target": 0.0, "seed": seed, "train_s": time.perf_counter() - t0}
        record.update(evaluate(dense, data[1]))
        report["runs"].append(record)
        print(json.dumps(record), flush=True)
        for target in args.sparsity:
            for arm in args.arms:
                record = run_arm(arm, dense, target, seed, data, args)
                report["runs"].append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "updates"}), flush=True)
        report["wall_s"] = time.perf_counter() - start
        args.out.write_text(json.dumps(report, indent=1))
    print_table(report["runs"])
    if args.plot is not None:
        plot_curves(report["runs"], args.plot)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against optimizer step, one panel per sparsity, one line per arm and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in runs if "curve" in r})
    if not targets:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for r in runs:
            if r["target"] == target and "curve" in r:
                steps, acc = zip(*r["curve"])
                ax.plot(steps, [100 * a for a in acc], label=f"{r['arm']} (seed {r['seed']})")
        ax.set(title=f"{target:.0%} sparsity", xlabel="optimizer step", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(runs: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        groups.setdefault((r["arm"], r["target"]), []).append(100 * r["accuracy"])
    print(f"{'arm':<24} {'sparsity':>8} {'seeds':>5} {'mean %':>7} {'stdev':>6}")
    for (arm, target), acc in groups.items():
        spread = f"{statistics.stdev(acc):6.2f}" if len(acc) > 1 else "     -"
        print(f"{arm:<24} {target:8.2f} {len(acc):5d} {statistics.mean(acc):7.2f} {spread}")


if __name__ == "__main__":
    main()
