"""Shared test helpers: inputs with ties, and exact comparisons that say where they differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmp_ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SIZES = [0, 1, 2, 31, 33, 64, 65, 127, 1009, 16384, 16385, 65537, (1 << 20) + 7]
SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.999, 1.0]


def weights(numel: int, dtype: torch.dtype, device="cpu", kind: str = "normal") -> torch.Tensor:
    """Weights shaped like real ones, with the ties pruning meets in practice."""
    if kind == "normal":
        t = torch.randn(numel) * 0.02
    elif kind == "zeros":  # already-pruned tensor: everything ties at 0
        t = torch.zeros(numel)
    elif kind == "equal":
        t = torch.full((numel,), -0.5)
    elif kind == "pruned":  # half exact zeros (+0 and -0), the rest normal
        t = torch.randn(numel) * 0.02
        t[::2] = 0.0
        t[1::4] = -0.0
    elif kind == "few_values":  # heavy ties: 5 distinct magnitudes with both signs
        t = (torch.randint(-5, 6, (numel,)) * 0.125).float()
    elif kind == "specials":
        t = torch.randn(numel)
        if numel:
            t[:: max(numel // 7, 1)] = float("inf")
            t[1 :: max(numel // 5, 1)] = -float("inf")
            t[2 :: max(numel // 3, 1)] = -0.0
            t[0] = 1e-40  # fp32 subnormal (fp16/bf16: flushed or rounded by the cast)
    else:
        raise ValueError(kind)
    return t.to(dtype=dtype, device=device)


KINDS = ["normal", "zeros", "equal", "pruned", "few_values", "specials"]


# Data aimed at a sample bracket's sampled positions (the CPU's: test_select.py, the device's:
# test_cuda.py): the bracket misses low or high, far more elements than the sample showed fall
# inside it, a NaN hides outside the sample, or exact ties of the sample's target crowd it.
SAMPLE_AIMS = ["sample small", "sample large", "crowd", "nan outside", "ties at target"]


def aimed_at_sample(
    numel: int, picked: torch.Tensor, sparsity: float, aim: str, generator: torch.Generator
) -> torch.Tensor:
    """N(0, 1) fp32 values with the ``aim`` of SAMPLE_AIMS against the sampled ``picked``."""
    values = torch.randn(numel, generator=generator)
    outside = torch.ones(numel, dtype=torch.bool)
    outside[picked] = False
    target = values[picked].abs().kthvalue(max(1, round(sparsity * len(picked)))).values
    if aim == "sample small":
        values[picked] *= 1e-3
    elif aim == "sample large":
        values[picked] *= 1e3
    elif aim == "crowd":
        spread = torch.empty(int(outside.sum())).uniform_(0.999, 1.001, generator=generator)
        values[outside] = target * spread
    elif aim == "nan outside":
        values[outside.nonzero()[numel // 3]] = float("nan")
    else:
        values[outside & (torch.arange(numel) % 7 == 0)] = target
    return values


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 != +0.0 and NaN == NaN in comparisons."""
    if not t.dtype.is_floating_point:
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def nm_oracle_keep(values: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """N:M from the contract, by brute force over ``values`` (the ranked keys, reduction
    dimension last): in each group of m the m - n smallest (value, index) are candidates; the k
    smallest candidates by (value, flat index) are pruned. The keep flags, ``values``' shape."""
    flat = values.reshape(-1).tolist()
    candidates = []
    for start in range(0, len(flat), m):
        ranked = sorted(range(start, start + m), key=lambda i: (flat[i], i))
        candidates += ranked[: m - n]
    pruned = sorted(candidates, key=lambda i: (flat[i], i))[:k]
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[pruned] = False
    return keep.view(values.shape)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise equality; on failure name the first positions that differ."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a = _bits(actual.detach().cpu().contiguous()).reshape(-1)
    e = _bits(expected.detach().cpu().contiguous()).reshape(-1)
    diff = (a != e).nonzero().reshape(-1)
    assert diff.numel() == 0, (
        f"{what}: {diff.numel()} of {a.numel()} differ; first at {diff[:5].tolist()}: "
        f"{a[diff[:5]].tolist()} vs {e[diff[:5]].tolist()}"
    )


def assert_models_equal(a: nn.Module, b: nn.Module, what: str) -> None:
    """Same parameters (bit for bit) and the same gmp_ext masks, by name."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_same(p, q, f"{what}: {name}")
    masks_a, masks_b = gmp_ext.masks(a), gmp_ext.masks(b)
    assert list(masks_a) == list(masks_b)
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), f"{what}: mask {name}"


def check_pruned_set(tensor: torch.Tensor, keep: torch.Tensor, k: int) -> None:
    """Contract check independent of any implementation: k pruned, the smallest |w| first,
    and among equal |w| the lowest flat indices pruned first."""
    flat = tensor.detach().float().abs().reshape(-1).cpu()
    keep = keep.reshape(-1).cpu()
    assert int((~keep).sum()) == k
    if 0 < k < flat.numel():
        assert flat[~keep].max() <= flat[keep].min()
        cut = flat[~keep].max()
        tie_pruned = ((flat == cut) & ~keep).nonzero().reshape(-1)
        tie_kept = ((flat == cut) & keep).nonzero().reshape(-1)
        if tie_pruned.numel() and tie_kept.numel():
            assert tie_pruned.max() < tie_kept.min()


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Data fixed by the step index, so an interrupted run sees what an uninterrupted one does."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 2, 6, 6, generator=g), torch.randint(0, 3, (size,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def without_regrowth(history: list[dict]) -> list[dict]:
    """GMP records without regrowth, for comparing a resumed run with an uninterrupted one:
    loading the GMP state zeroes the pruned entries of the optimizer state, so the pruned weights
    the next steps move (regrowth) may differ while every kept weight and mask is identical."""

    def strip(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "regrowth"}

    return [
        {**strip(r), "layers": {n: strip(row) for n, row in r["layers"].items()}} for r in history
    ]


class TokenPairs(torch.utils.data.Dataset):
    """Random token sequences of 8 ids in [low, vocab) labelled by their first id's parity: a
    Hugging Face Trainer dataset for tiny models built from configs."""

    def __init__(self, n: int = 16, vocab: int = 100, low: int = 0) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(low, vocab, (n, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_gpt2(lm_head: bool = False) -> nn.Module:
    """A 2-layer GPT-2 (transformers' Conv1D weights) from a config, seeded: no download."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, **_TOKENS
    )
    torch.manual_seed(0)
    if lm_head:
        return transformers.GPT2LMHeadModel(config)
    return transformers.GPT2ForSequenceClassification(config)


def tiny_bert() -> nn.Module:
    """A 2-layer BERT classifier from a config, seeded: no download."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)
