"""GMP's cost in a training step: an AdamW step with and without pruning, in the same process.

    python benchmarks/bench_train_step.py [--models bert_base resnet50] [--device cpu|cuda]
        [--dtype float32] [--every N] [--repeats R] [--batch B] [--seq S] [--image P]
        [--threads T]

Defaults: CPU batch 1, 64 tokens, 64x64 images, N = 3, R = 2 (2.7 minutes with --threads 1 on
a shared, loaded 2-core VM; the small inputs make the weight-sized work of pruning a larger share
of the step than in real training, so CPU overheads are upper bounds); CUDA batch 32, 128
tokens, 224x224, N = 10, R = 5.

Models (random weights, nothing downloaded):

* ``bert_base``: transformers' ``BertModel`` from the default ``BertConfig`` (BERT-base: 12
  layers, hidden 768; its 73 Linear weights are the 85M of ``shapes.bert_base``), dropout off,
  loss = mean square of the last hidden state;
* ``resnet50``: a ResNet-50 built from ``nn.Conv2d``/``BatchNorm2d`` with torchvision's layer
  shapes (the 54 conv and fc weights of ``shapes.resnet50``), cross-entropy over 1000 classes.

Variants, each on the same model and optimizer state (AdamW, lr 1e-4, weight decay 0.01):

* ``dense``: no pruning;
* ``gmp_ext attach``: every Linear/Conv weight pruned to ``--sparsity`` by ``gmp_ext.prune_step``
  once, then ``gmp_ext.attach``: one fused packed-mask apply after every optimizer step;
* ``gmp_ext attach + prune_step every N``: the same, plus ``gmp_ext.prune_step`` at the same
  sparsity at the start of every block of N steps (a constant-sparsity GMP update);
* ``torch prune.l1_unstructured``: ``torch.nn.utils.prune`` on the same weights (a forward
  pre-hook recomputes ``weight = weight_orig * weight_mask`` on every forward);
* ``_foreach_mul_ dense masks``: masks as weight-dtype tensors, ``torch._foreach_mul_`` after
  every step.

Timing: a block is N optimizer steps (zero_grad, forward, loss, backward, step, and whatever the
variant adds), timed with CUDA events on CUDA and the wall clock on CPU. Each round sets up every
variant in turn, times one block and removes the variant again; the first round is a warm-up,
then ``--repeats`` rounds. A row's p20/p50/p80 are per step (block / N) over the rounds and
``overhead_pct`` compares its p50 with the dense row of the same model. Rows go to
benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn.utils import prune
from utils import free_memory, print_table, quantiles, time_fn, write_rows

import gmp_ext


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.down = None
        if stride != 1 or inplanes != out:
            self.down = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.body(x) + skip)


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for block in range(blocks):
            layers.append(Bottleneck(inplanes, width, 2 if block == 0 and i > 0 else 1))
            inplanes = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=True)


def _batch(model_name: str, args, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if model_name == "bert_base":
        ids = torch.randint(0, 30522, (args.batch, args.seq), generator=g).to(device)
        return ids, None
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    return x.to(device), y.to(device)


def _loss(model_name: str, model: nn.Module, x, y) -> torch.Tensor:
    if model_name == "bert_base":
        return model(input_ids=x).last_hidden_state.float().pow(2).mean()
    return nn.functional.cross_entropy(model(x).float(), y)


def _pruned_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights gmp_ext prunes by default: those of every Linear and Conv2d."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@torch.no_grad()
def _foreach_mul(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    torch._foreach_mul_(weights, masks)


class Variant:
    """Sets up pruning on the model, adds its work to each step, and removes it again."""

    def __init__(self, name: str, setup, after_step=None, block_start=None, teardown=None):
        self.name = name
        self.setup = setup
        self.after_step = after_step
        self.block_start = block_start
        self.teardown = teardown


def _variants(model: nn.Module, optimizer, sparsity: float, every: int) -> list[Variant]:
    masks: list[torch.Tensor] = []
    weights = [getattr(m, n) for m, n in _pruned_weights(model)]

    def attach():
        gmp_ext.prune_step(model, sparsity)
        gmp_ext.attach(model, optimizer)

    def detach():
        gmp_ext.remove(model)

    def torch_prune():
        for module, name in _pruned_weights(model):
            prune.l1_unstructured(module, name, amount=sparsity)

    def torch_unprune():
        for module, name in _pruned_weights(model):
            prune.remove(module, name)

    def dense_masks():
        masks[:] = [
            gmp_ext.kernels.ops.unpack_mask(m, w.shape).to(w.dtype)
            for m, w in zip(gmp_ext.kernels.ops.magnitude_masks(weights, sparsity), weights)
        ]

    return [
        Variant("dense", lambda: None),
        Variant("gmp_ext attach", attach, teardown=detach),
        Variant(
            f"gmp_ext attach + prune_step every {every}",
            attach,
            block_start=lambda: gmp_ext.prune_step(model, sparsity),
            teardown=detach,
        ),
        Variant("torch prune.l1_unstructured", torch_prune, teardown=torch_unprune),
        Variant(
            "_foreach_mul_ dense masks",
            dense_masks,
            after_step=lambda: _foreach_mul(weights, masks),
            teardown=masks.clear,
        ),
    ]


def run_model(model_name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    model = (bert_base() if model_name == "bert_base" else resnet50()).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x, y = _batch(model_name, args, device)
    n_pruned = sum(getattr(m, n).numel() for m, n in _pruned_weights(model))
    shape = (
        f"batch {args.batch} x seq {args.seq}"
        if model_name == "bert_base"
        else (f"batch {args.batch} x {args.image}x{args.image}")
    )

    def step(variant: Variant) -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model_name, model, x, y).backward()
        optimizer.step()
        if variant.after_step is not None:
            variant.after_step()

    variants = [
        v
        for v in _variants(model, optimizer, args.sparsity, args.every)
        if not args.providers or any(p in v.name for p in args.providers)
    ]
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    errors: dict[str, str] = {}
    # Rounds of one block per variant (the first a warm-up), so that drifts of a shared machine
    # reach every variant alike.
    for round_ in range(args.repeats + 1):
        start = time.perf_counter()
        for variant in variants:
            if variant.name in errors:
                continue

            def block(variant=variant) -> None:
                if variant.block_start is not None:
                    variant.block_start()
                for _ in range(args.every):
                    step(variant)

            variant.setup()
            try:
                ms = time_fn(device, block, repeats=1, warmup=0)["p50_ms"]
                if round_ > 0:
                    samples[variant.name].append(ms / args.every)
            except (RuntimeError, MemoryError) as error:
                errors[variant.name] = f"error: {' '.join(str(error).split())[:300]}"
            finally:
                if variant.teardown is not None:
                    variant.teardown()
        elapsed = time.perf_counter() - start
        print(f"  {model_name}: round {round_} of {args.repeats} ({elapsed:.0f} s)", flush=True)
    rows = []
    for variant in variants:
        row = {
            "kernel": "train_step",
            "provider": variant.name,
            "model": model_name,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "input": shape,
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()),
            "pruned_weights": n_pruned,
            "sparsity": args.sparsity,
            "steps_per_block": args.every,
        }
        if variant.name in errors:
            row["status"] = errors[variant.name]
        else:
            row.update(quantiles(samples[variant.name]), status="ok")
        rows.append(row)
    dense = next((r["p50_ms"] for r in rows if r["provider"] == "dense" and "p50_ms" in r), None)
    for row in rows:
        if dense and "p50_ms" in row:
            row["overhead_pct"] = round(100 * (row["p50_ms"] / dense - 1), 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["bert_base", "resnet50"], choices=["bert_base", "resnet50"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--every", type=int, help="steps per block (N; CPU 3, CUDA 10)")
    parser.add_argument("--repeats", type=int, help="timed blocks per variant (CPU 2, CUDA 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--providers", nargs="*", help="substrings of the variants to run")
    parser.add_argument("--batch", type=int, help="default: 1 on CPU, 32 on CUDA")
    parser.add_argument("--seq", type=int, help="BERT tokens per sequence (CPU 64, CUDA 128)")
    parser.add_argument("--image", type=int, help="ResNet input side (CPU 64, CUDA 224)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (32 if cuda else 1)
    args.seq = args.seq or (128 if cuda else 64)
    args.image = args.image or (224 if cuda else 64)
    args.every = args.every or (10 if cuda else 3)
    args.repeats = args.repeats or (5 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows: list[dict] = []
    for model_name in args.models:
        rows += run_model(model_name, args, device, dtype)
        free_memory(device)
        path = write_rows(f"train_step_{device.type}", rows)
    print_table(rows, ["model", "provider", "input", "p50_ms", "overhead_pct", "status"])
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
