"""The score seam (gmp_ext.scores): what a prune step ranks, apart from what it zeroes.

Every mask here is checked against a pure-PyTorch oracle written from the contract: the
``round(s * numel)`` (layer) or ``round(s * total)`` (global) elements with the smallest score
values are pruned, ties by flat index (global: tensor position, then flat index), and those
elements of the weights become zero. Inputs are chosen so that the values the library computes
(Wanda's sums of squares, movement's ``-sum(w * grad)``) are exact in float32 whatever the
summation order: the oracle then agrees with the library to the last bit.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import GMPSchedule, GMPWarning
from gmp_ext.pruning.strategies import (
    GlobalSelection,
    LayerSelection,
    NMSelection,
    selection_from_dict,
)
from gmp_ext.scores import (
    FunctionScore,
    Magnitude,
    Movement,
    Score,
    Wanda,
    registered_scores,
    score_for,
    score_from_dict,
)

from .utils import assert_same, nm_oracle_keep

# -- oracles -----------------------------------------------------------------------------------


def oracle_keep(values: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the k smallest values, ties by flat index (stable sort)."""
    order = torch.sort(values.reshape(-1), stable=True).indices
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(values.shape)


def oracle_keep_global(values: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks pruning the k smallest values of all tensors, ties by (position, index)."""
    flat = torch.cat([v.reshape(-1) for v in values])
    keep = oracle_keep(flat, k)
    out, start = [], 0
    for v in values:
        out.append(keep[start : start + v.numel()].view(v.shape))
        start += v.numel()
    return out


def check_pruned_weights(
    model: nn.Module, before: dict[str, torch.Tensor], keeps: dict[str, torch.Tensor]
) -> None:
    """Pruned weights are exactly zero, kept ones (and every other parameter) unchanged."""
    for name, param in model.named_parameters():
        old = before[name]
        if name in keeps:
            keep = keeps[name]
            assert bool((param.detach()[~keep] == 0).all()), name
            assert_same(param.detach()[keep], old[keep], name)
        else:
            assert_same(param.detach(), old, name)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tied_values(shape: tuple[int, ...], generator: torch.Generator, kind: str) -> torch.Tensor:
    """Signed float32 values with heavy ties, -0.0 and +0.0 both present."""
    if kind == "levels":  # 7 levels: -0.75 .. 0.75
        values = torch.randint(-3, 4, shape, generator=generator).float() * 0.25
    else:  # bf16-like: few mantissa bits, many exact repeats
        values = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16).float()
        values[torch.rand(shape, generator=generator) < 0.3] = 0.0
        values = torch.where(torch.rand(shape, generator=generator) < 0.3, values.round(), values)
    zero = values == 0
    negative_zero = torch.rand(shape, generator=generator) < 0.5
    values[zero & negative_zero] = -0.0
    values[zero & ~negative_zero] = 0.0
    return values


# -- models ------------------------------------------------------------------------------------


class Odd(nn.Module):
    """Weights of odd sizes and one of a single element (no biases: only weights are pruned)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 5, bias=False)
        self.b = nn.Linear(1, 1, bias=False)
        self.c = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


ODD = ["a.weight", "b.weight", "c.weight"]


def odd_model(seed: int) -> Odd:
    torch.manual_seed(seed)
    return Odd()


def dyadic(shape: tuple[int, ...], generator: torch.Generator, scale: float) -> torch.Tensor:
    """Multiples of ``scale`` in [-4 * scale, 4 * scale] (0 excluded): exact in bf16 too."""
    values = torch.randint(1, 5, shape, generator=generator).float() * scale
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return values * sign


class ConvNet(nn.Module):
    """Conv2d -> ReLU -> Linear with dyadic conv weights: on dyadic inputs every activation,
    square and sum is exact in float32 (and the activations in bf16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def conv_net(dtype: torch.dtype = torch.float32) -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():
        net.conv.weight.copy_(
            dyadic(net.conv.weight.shape, torch.Generator().manual_seed(1), 1 / 8)
        )
    return net.to(dtype)


def conv_batches(dtype: torch.dtype = torch.float32, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(-3, 4, (4, 2, 6, 6), generator=g) * 0.5).to(dtype) for _ in range(count)]


def capture_inputs(modules: dict[str, nn.Module]) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Record every input each module sees (forward pre-hooks)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, args, name=name):
            seen[name].append(args[0].detach().clone())

        handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def exact_sums(inputs: list[torch.Tensor], feature_dim: int) -> torch.Tensor:
    """Sum of squares of each input feature over every row, in float64; asserted exact in
    float32 (so the summation order cannot matter)."""
    total = None
    for x in inputs:
        x = x.double().movedim(feature_dim, -1)
        sums = x.reshape(-1, x.shape[-1]).square().sum(0)
        total = sums if total is None else total + sums
    assert total is not None
    assert torch.equal(total.float().double(), total), "test inputs must give exact float32 sums"
    return total.float()


def wanda_oracle(weight: torch.Tensor, sums: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[dim] = -1
    return weight.detach().float().abs() * sums.sqrt().view(shape)


# -- 1. exactness of signed function scores ----------------------------------------------------


def counts_around_negatives(negatives: int, numel: int) -> list[int]:
    return sorted(
        {min(max(k, 0), numel) for k in (0, 1, negatives - 1, negatives, negatives + 1, numel)}
    )


@pytest.mark.parametrize("kind", ["levels", "bf16"])
@pytest.mark.parametrize("seed", range(4))
def test_function_score_layer_scope_is_exact(kind, seed):
    g = torch.Generator().manual_seed(seed)
    reference = odd_model(seed)
    values = {n: tied_values(tuple(p.shape), g, kind) for n, p in reference.named_parameters()}
    seen: list[tuple[str, tuple[int, ...]]] = []

    def score(name: str, param: torch.Tensor) -> torch.Tensor:
        seen.append((name, tuple(param.shape)))
        return values[name].clone()

    for name, v in values.items():
        numel, negatives = v.numel(), int((v < 0).sum())
        for k in counts_around_negatives(negatives, numel):
            assert gmp_ext.kernels.ops.prune_count(numel, k / numel) == k
            model = odd_model(seed)
            before = snapshot(model)
            seen.clear()
            achieved = gmp_ext.prune_step(model, k / numel, params=[name], score=score)
            assert seen == [(name, tuple(v.shape))]
            assert achieved == {name: 1.0 - (numel - k) / numel}  # MaskEntry.sparsity
            keep = gmp_ext.masks(model)[name]
            expected = oracle_keep(v, k)
            assert torch.equal(keep, expected), (name, k, negatives, v.flatten().tolist())
            check_pruned_weights(model, before, {name: keep})

    # All three at once, each with its own count (a sparsity dict): c - 1, c, c + 1 per tensor.
    for offset in (-1, 0, 1):
        model = odd_model(seed)
        before = snapshot(model)
        ks = {n: min(max(int((v < 0).sum()) + offset, 0), v.numel()) for n, v in values.items()}
        gmp_ext.prune_step(model, {n: ks[n] / values[n].numel() for n in values}, score=score)
        keeps = gmp_ext.masks(model)
        assert list(keeps) == ODD
        for name, v in values.items():
            assert torch.equal(keeps[name], oracle_keep(v, ks[name])), (name, offset)
        check_pruned_weights(model, before, keeps)


@pytest.mark.parametrize("kind", ["levels", "bf16"])
@pytest.mark.parametrize("seed", range(4))
def test_function_score_global_scope_is_exact(kind, seed):
    g = torch.Generator().manual_seed(100 + seed)
    reference = odd_model(seed)
    values = {n: tied_values(tuple(p.shape), g, kind) for n, p in reference.named_parameters()}
    ordered = [values[n] for n in ODD]
    total = sum(v.numel() for v in ordered)
    negatives = sum(int((v < 0).sum()) for v in ordered)
    for k in counts_around_negatives(negatives, total):
        model = odd_model(seed)
        before = snapshot(model)
        gmp_ext.prune_step(
            model, k / total, scope="global", score=lambda name, param: values[name].clone()
        )
        keeps = gmp_ext.masks(model)
        assert list(keeps) == ODD
        for name, expected in zip(ODD, oracle_keep_global(ordered, k)):
            assert torch.equal(keeps[name], expected), (name, k, negatives)
        assert sum(int((~m).sum()) for m in keeps.values()) == k
        check_pruned_weights(model, before, keeps)


def test_signed_zero_and_subnormal_values_rank_exactly():
    # -0.0 == +0.0 (ties by index); the smallest subnormals rank above zero, below 1e-40.
    tiny = torch.tensor(1.4e-45).item()
    values = torch.tensor([[tiny, 0.0, -0.0, -tiny, 1e-40, -1.0, 0.0, 2 * tiny, -tiny]])
    for scope in ("layer", "global"):
        for k in range(values.numel() + 1):
            model = nn.Linear(9, 1, bias=False)
            gmp_ext.prune_step(model, k / 9, scope=scope, score=lambda name, param: values.clone())
            keep = gmp_ext.masks(model)["weight"]
            assert torch.equal(keep, oracle_keep(values, k)), (scope, k)


# -- 2. Wanda one-shot with calibration --------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wanda_calibration_matches_the_input_norm_oracle(dtype, scope):
    net = conv_net(dtype)
    before = snapshot(net)
    batches = conv_batches(dtype)
    seen, handles = capture_inputs({"conv.weight": net.conv, "fc.weight": net.fc})
    achieved = gmp_ext.prune_step(net, 0.6, scope=scope, score="wanda", calibration=batches)
    for handle in handles:
        handle.remove()
    assert set(achieved) == {"conv.weight", "fc.weight"}
    assert [len(v) for v in seen.values()] == [3, 3]  # the model ran once per batch
    values = {
        "conv.weight": wanda_oracle(before["conv.weight"], exact_sums(seen["conv.weight"], 1), 1),
        "fc.weight": wanda_oracle(before["fc.weight"], exact_sums(seen["fc.weight"], -1), 1),
    }
    keeps = gmp_ext.masks(net)
    if scope == "layer":
        expected = {n: oracle_keep(v, round(0.6 * v.numel())) for n, v in values.items()}
    else:
        total = sum(v.numel() for v in values.values())
        expected = dict(zip(values, oracle_keep_global(list(values.values()), round(0.6 * total))))
    for name in values:
        assert torch.equal(keeps[name], expected[name]), name
    check_pruned_weights(net, before, keeps)
    # The hooks were removed after calibration: running the model again observes nothing.
    assert not net.conv._forward_pre_hooks and not net.fc._forward_pre_hooks


def test_wanda_weighs_by_input_norms_not_by_magnitude():
    # Equal |w| everywhere: the features with the larger inputs keep their weights.
    net = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.5)
    x = torch.tensor([[1.0, 3.0, 0.5, 2.0]]).repeat(5, 1)
    gmp_ext.prune_step(net, 0.5, score="wanda", calibration=[x])
    expected = torch.tensor([[False, True, False, True], [False, True, False, True]])
    assert torch.equal(gmp_ext.masks(net)["weight"], expected)


def test_calibration_runs_in_eval_mode_and_restores_the_modes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 3, bias=False), nn.Dropout(0.5))
    net.train()
    net[2].eval()  # a mixed state, restored as it was
    weight = net[1].weight.detach().clone()
    g = torch.Generator().manual_seed(12)
    xs = [torch.randint(-2, 3, (6, 4), generator=g).float() for _ in range(2)]
    gmp_ext.prune_step(net, 0.5, score="wanda", calibration=xs)
    # In eval mode the dropout passes the inputs through: the norms are the inputs' own.
    expected = oracle_keep(wanda_oracle(weight, exact_sums(xs, -1), 1), 6)
    assert torch.equal(gmp_ext.masks(net)["1.weight"], expected)
    assert [m.training for m in net.modules()] == [True, True, True, False]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x if shift is None else x + shift)


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_calibration_batches_are_tensors_tuples_or_dicts(form):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(-2, 3, (6, 4), generator=g).float() for _ in range(2)]
    zero = torch.zeros(4)
    batches = {
        "tensor": xs,
        "tuple": [(x, zero) for x in xs],
        "dict": [{"x": x, "shift": zero} for x in xs],
    }[form]
    torch.manual_seed(0)
    net = TwoInputs()
    weight = net.fc.weight.detach().clone()
    gmp_ext.prune_step(net, 0.5, score="wanda", calibration=batches)
    sums = exact_sums(xs, -1)
    expected = oracle_keep(wanda_oracle(weight, sums, 1), 6)
    assert torch.equal(gmp_ext.masks(net)["fc.weight"], expected)


# -- 3. Wanda on transformers' Conv1D, GPT-2 and PEFT/LoRA -------------------------------------

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, **_TOKENS
    )
    torch.manual_seed(0)
    return transformers.GPT2Model(config)


def gpt2_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(3, 50, (2, 8), generator=g)} for _ in range(2)]


def test_wanda_on_a_conv1d_ranks_rows_of_its_in_out_weight():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(12, 4)  # weight [in=4, out=12]
    model = nn.Sequential(layer)
    weight = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randint(-3, 4, (2, 5, 4), generator=g) * 0.5 for _ in range(2)]
    gmp_ext.prune_step(model, 0.5, score="wanda", calibration=xs)
    values = wanda_oracle(weight, exact_sums(xs, -1), 0)  # feature j scales row j
    assert torch.equal(gmp_ext.masks(model)["0.weight"], oracle_keep(values, 24))


def test_wanda_on_tiny_gpt2_prunes_exact_counts():
    model = tiny_gpt2()
    achieved = gmp_ext.prune_step(model, 0.5, score="wanda", calibration=gpt2_batches())
    names = list(gmp_ext.select_parameters(model))
    assert list(achieved) == names and len(names) == 4
    params = dict(model.named_parameters())
    for name, keep in gmp_ext.masks(model).items():
        numel = params[name].numel()
        assert int((~keep).sum()) == round(0.5 * numel), name
        assert int((params[name] == 0).sum()) == round(0.5 * numel), name
        assert torch.equal(params[name] != 0, keep), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_wanda_on_a_lora_wrapped_gpt2_prunes_the_base_weights_exactly():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    wrapped = peft.get_peft_model(tiny_gpt2(), config)
    lora_before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora_before
    achieved = gmp_ext.prune_step(wrapped, 0.75, score="wanda", calibration=gpt2_batches())
    assert set(achieved) == set(gmp_ext.select_parameters(tiny_gpt2()))
    base = wrapped.base_model.model
    for name in achieved:
        weight = gmp_ext.model.parameters.parameter_by_name(base, name)
        assert int((weight == 0).sum()) == round(0.75 * weight.numel()), name
    for name, param in wrapped.named_parameters():
        if name in lora_before:
            assert torch.equal(param, lora_before[name]), name


# -- 4. movement -------------------------------------------------------------------------------


def movement_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False))


MOVEMENT_NAMES = ["0.weight", "1.weight"]


def accumulate_twice(model: nn.Module, movement: Movement, seed: int) -> dict[str, torch.Tensor]:
    """Two accumulations of dyadic non-zero weights and gradients (exact products and sums);
    returns the expected totals -(w1 * g1 + w2 * g2)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in MOVEMENT_NAMES}
    for _ in range(2):
        with torch.no_grad():
            for name in MOVEMENT_NAMES:
                param = params[name]
                param.copy_(dyadic(tuple(param.shape), g, 0.5))  # no zero weight
                param.grad = torch.randint(-2, 3, param.shape, generator=g) * 0.25
                expected[name] += param.detach() * param.grad
        movement.accumulate()
    return {n: -v for n, v in expected.items()}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_movement_accumulates_and_prunes_the_oracle(scope):
    model = movement_model()
    movement = Movement()
    assert movement.attach(model, MOVEMENT_NAMES) == []  # no optimizer: accumulate() by hand
    expected = accumulate_twice(model, movement, seed=6)
    assert movement.steps == 2
    params = dict(model.named_parameters())
    values = movement.values(MOVEMENT_NAMES, [params[n] for n in MOVEMENT_NAMES])
    for name, value in zip(MOVEMENT_NAMES, values):
        assert torch.equal(value, expected[name]), name
    ordered = [expected[n] for n in MOVEMENT_NAMES]
    # Prune exactly the negatives plus one more: the cut is at the sign change.
    negatives = sum(int((v < 0).sum()) for v in ordered)
    before = snapshot(model)
    if scope == "layer":
        ks = {n: int((v < 0).sum()) + 1 for n, v in expected.items()}
        sparsity = {n: ks[n] / expected[n].numel() for n in MOVEMENT_NAMES}
        gmp_ext.prune_step(model, sparsity, score=movement)
        wanted = {n: oracle_keep(expected[n], ks[n]) for n in MOVEMENT_NAMES}
    else:
        total = sum(v.numel() for v in ordered)
        gmp_ext.prune_step(model, (negatives + 1) / total, scope="global", score=movement)
        wanted = dict(zip(MOVEMENT_NAMES, oracle_keep_global(ordered, negatives + 1)))
    keeps = gmp_ext.masks(model)
    for name in MOVEMENT_NAMES:
        assert torch.equal(keeps[name], wanted[name]), name
    check_pruned_weights(model, before, keeps)
    # The update closed the window.
    assert movement.steps == 0
    assert all(not t.any() for t in movement.state_dict()["totals"].values())


def test_movement_without_accumulation_ranks_the_gradients_present():
    model = movement_model()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, generator=g)
    model(x).square().sum().backward()
    params = dict(model.named_parameters())
    values = {n: -(params[n].detach() * params[n].grad) for n in MOVEMENT_NAMES}
    before = snapshot(model)
    gmp_ext.prune_step(model, 0.5, score="movement")
    keeps = gmp_ext.masks(model)
    for name in MOVEMENT_NAMES:
        assert torch.equal(
            keeps[name], oracle_keep(values[name], round(0.5 * values[name].numel()))
        )
    check_pruned_weights(model, before, keeps)


def test_movement_ranks_weights_already_at_zero_lowest():
    model = movement_model()
    g = torch.Generator().manual_seed(11)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in MOVEMENT_NAMES:
            params[name].copy_(torch.randint(-2, 3, params[name].shape, generator=g) * 0.5)
            params[name].grad = torch.randint(-2, 3, params[name].shape, generator=g) * 0.25
    values = {
        n: torch.where(params[n] == 0, -torch.inf, -(params[n].detach() * params[n].grad))
        for n in MOVEMENT_NAMES
    }
    zeros = {n: int((params[n] == 0).sum()) for n in MOVEMENT_NAMES}
    assert all(0 < z < 12 for z in zeros.values())
    got = Movement().values(MOVEMENT_NAMES, [params[n] for n in MOVEMENT_NAMES])
    for name, value in zip(MOVEMENT_NAMES, got):
        assert torch.equal(value, values[name]), name
    # Fewer than the zeros (the first zeros by index), exactly them, and past them.
    for extra in (-1, 0, 3):
        twin = movement_model()
        twin.load_state_dict(model.state_dict())
        for name, param in twin.named_parameters():
            param.grad = params[name].grad.clone()
        ks = {n: zeros[n] + extra for n in MOVEMENT_NAMES}
        sparsity = {n: ks[n] / params[n].numel() for n in MOVEMENT_NAMES}
        gmp_ext.prune_step(twin, sparsity, score="movement")
        keeps = gmp_ext.masks(twin)
        for name in MOVEMENT_NAMES:
            assert torch.equal(keeps[name], oracle_keep(values[name], ks[name])), (name, extra)
            if extra >= 0:
                assert not bool(keeps[name][params[name] == 0].any()), (name, extra)


# -- 5. GMP with wanda and movement ------------------------------------------------------------


class SpyWanda(Wanda):
    """Wanda that keeps the values of its last update (to check the recorded thresholds)."""

    def factors(self, names, params):
        scales = super().factors(names, params)
        self.last = {n: s.weighted(p) for n, s, p in zip(names, scales, params)}
        return scales


class SpyMovement(Movement):
    def values(self, names, params):
        self.last = dict(zip(names, [v.clone() for v in super().values(names, params)]))
        return list(self.last.values())


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


MLP_WEIGHTS = ["0.weight", "2.weight", "4.weight"]


def mlp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)


def mlp_train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = mlp_batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


SCHEDULE = {
    "init_sparsity": 0.2,
    "final_sparsity": 0.75,
    "start_epoch": 1,
    "end_epoch": 4,
    "update_frequency": 1,
}
SPE = 3  # updates at steps 3, 6, 9, 12


def mlp_gmp(score, seed: int = 0, momentum: float = 0.9, **kwargs):
    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    gmp = gmp_ext.GMP(
        model, optimizer, GMPSchedule(**SCHEDULE), steps_per_epoch=SPE, score=score, **kwargs
    )
    return model, optimizer, gmp


def check_final_masks_and_thresholds(model, gmp, spy) -> None:
    assert [r["step"] for r in gmp.history] == [3, 6, 9, 12]
    assert gmp.history[-1]["target"] == 0.75
    keeps = gmp_ext.masks(model)
    assert list(keeps) == MLP_WEIGHTS
    for name, keep in keeps.items():
        k = round(0.75 * keep.numel())
        assert int((~keep).sum()) == k, name  # exactly the final count
        assert torch.equal(keep, oracle_keep(spy.last[name], k)), name
        recorded = gmp.history[-1]["layers"][name]["threshold"]
        assert recorded == float(spy.last[name][~keep].max()), name  # the value at the cut


def test_gmp_with_wanda_reaches_the_exact_final_sparsity():
    spy = SpyWanda()
    model, optimizer, gmp = mlp_gmp(spy)
    mlp_train(model, optimizer, range(15))
    check_final_masks_and_thresholds(model, gmp, spy)
    params = dict(model.named_parameters())
    for name, keep in gmp_ext.masks(model).items():
        assert int((params[name] == 0).sum()) == round(0.75 * keep.numel()), name
        assert torch.equal(params[name] != 0, keep), name
    for record in gmp.history:
        assert record["achieved"] == pytest.approx(record["target"], abs=0.02)
        for name in MLP_WEIGHTS:
            assert isinstance(record["layers"][name]["threshold"], float)
    assert gmp.state_dict()["config"]["score"] == {"name": "wanda"}


def test_gmp_wanda_counts_training_passes_only():
    reference, reference_opt, reference_gmp = mlp_gmp("wanda")
    mlp_train(reference, reference_opt, range(13))
    model, optimizer, gmp = mlp_gmp("wanda")
    g = torch.Generator().manual_seed(13)
    for step in range(13):
        mlp_train(model, optimizer, range(step, step + 1))
        model.eval()  # an evaluation pass between updates, on other data: not counted
        with torch.no_grad():
            model(torch.randn(32, 12, generator=g) * 100)
        model.train()
    assert gmp.config.score.tokens == 8  # the one training batch since the update at step 12
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert_same(b, a, name)
    masks, reference_masks = gmp_ext.masks(model), gmp_ext.masks(reference)
    assert all(torch.equal(masks[n], reference_masks[n]) for n in MLP_WEIGHTS)
    thresholds = [r["layers"][n]["threshold"] for r in gmp.history for n in MLP_WEIGHTS]
    assert thresholds == [
        r["layers"][n]["threshold"] for r in reference_gmp.history for n in MLP_WEIGHTS
    ]


def test_gmp_with_movement_prunes_exact_counts_and_records_thresholds():
    spy = SpyMovement()
    model, optimizer, gmp = mlp_gmp(spy)
    mlp_train(model, optimizer, range(12))  # the last update is at step 12
    assert spy.steps == 0  # the update closed the window
    check_final_masks_and_thresholds(model, gmp, spy)
    for name, keep in gmp_ext.masks(model).items():
        assert bool((model.get_parameter(name)[~keep] == 0).all()), name
    assert gmp.state_dict()["config"]["score"] == {"name": "movement"}


def test_gmp_movement_updates_leave_exact_zeros_in_the_weights():
    # The controller's contract (controller.py): every layer holds exactly round(target * numel)
    # zeros right after an update, and pruned weights stay pruned as the sparsity grows: a
    # pruned weight accumulates no movement (w = 0), and movement ranks zero weights lowest.
    model, optimizer, gmp = mlp_gmp("movement")
    previous: dict[str, torch.Tensor] = {}
    for step in range(13):
        with warnings.catch_warnings():
            warnings.simplefilter("error", GMPWarning)
            mlp_train(model, optimizer, range(step, step + 1))
        if gmp.last_update is not None and gmp.last_update["step"] == step + 1:
            target = gmp.last_update["target"]
            for name, keep in gmp_ext.masks(model).items():
                zeros = int((model.get_parameter(name) == 0).sum())
                assert zeros == round(target * keep.numel()), (step, name)
                if name in previous:
                    assert not bool((keep & ~previous[name]).any()), (step, name)
            previous = gmp_ext.masks(model)


# -- 6. checkpoints: resume bit for bit --------------------------------------------------------


# With momentum, a pruned weight's optimizer state differs after a resume (loading zeroes it,
# the uninterrupted run keeps what it gathered since the last update): the runs agree only
# while no pruned weight is ever kept again.
@pytest.mark.parametrize(
    ("score", "momentum"),
    [("wanda", 0.9), ("movement", 0.0), ("movement", 0.9)],
    ids=["wanda", "movement-sgd", "movement-momentum"],
)
def test_resume_in_the_middle_of_a_window_is_bit_identical(score, momentum):
    total, split = 15, 7  # updates at 3, 6, 9, 12: step 7 is inside the window 6..9
    reference, reference_opt, reference_gmp = mlp_gmp(score, momentum=momentum)
    mlp_train(reference, reference_opt, range(total))

    model, optimizer, gmp = mlp_gmp(score, momentum=momentum)
    mlp_train(model, optimizer, range(split))
    state = gmp.state_dict()
    assert state["config"]["score"] == {"name": score}
    observed = state["score_state"]
    if score == "wanda":
        assert set(observed["sums"]) == set(MLP_WEIGHTS)
        assert observed["tokens"] == 8  # one batch of 8 rows since the update at step 6
        assert observed["sums"]["0.weight"].shape == (12,)
    else:
        assert set(observed["totals"]) == set(MLP_WEIGHTS)
        assert observed["steps"] == 1
        assert observed["totals"]["2.weight"].shape == (8, 16)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "gmp": state}, buffer)
    gmp.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for key, value in saved["gmp"]["score_state"].items():
        if isinstance(value, dict):
            assert value.keys() == observed[key].keys()
            for name in value:
                assert torch.equal(value[name], observed[key][name]), (key, name)
        else:
            assert value == observed[key]

    # Other initial weights: the load matters.
    model, optimizer, gmp = mlp_gmp(score, seed=1, momentum=momentum)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    gmp.load_state_dict(saved["gmp"])
    assert gmp.step_count == split
    resumed = gmp.config.score.state_dict()
    for key, value in observed.items():
        if isinstance(value, dict):
            assert all(torch.equal(resumed[key][n], value[n]) for n in value), key
        else:
            assert resumed[key] == value
    mlp_train(model, optimizer, range(split, total))

    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert_same(b, a, name)
    reference_masks, masks = gmp_ext.masks(reference), gmp_ext.masks(model)
    assert list(masks) == list(reference_masks)
    for name in masks:
        assert torch.equal(masks[name], reference_masks[name]), name
    assert [r["layers"][n]["threshold"] for r in gmp.history for n in MLP_WEIGHTS] == [
        r["layers"][n]["threshold"] for r in reference_gmp.history for n in MLP_WEIGHTS
    ]


def test_loading_a_state_saved_with_another_score_is_refused():
    model, optimizer, gmp = mlp_gmp("wanda")
    mlp_train(model, optimizer, range(4))
    state = gmp.state_dict()
    other, _, other_gmp = mlp_gmp("movement", seed=1)
    before = snapshot(other)
    with pytest.raises(
        ValueError, match=r"score \(\{'name': 'wanda'\}, now \{'name': 'movement'\}\)"
    ):
        other_gmp.load_state_dict(state)
    check_pruned_weights(other, before, {})
    assert gmp_ext.masks(other) == {}
    assert other_gmp.step_count == 0
    assert other_gmp.config.score.state_dict() == {"totals": {}, "steps": 0}


# -- 7. PrunePlan ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_plan_with_a_score_equals_prune_step(scope):
    g = torch.Generator().manual_seed(8)
    values = {
        n: tied_values(tuple(p.shape), g, "levels") for n, p in odd_model(0).named_parameters()
    }

    def score(name, param):
        return values[name].clone()

    planned, stepped = odd_model(0), odd_model(0)
    plan = gmp_ext.PrunePlan(planned, 0.3, scope=scope, score=score)
    for sparsity in (0.3, 0.6):
        plan.set_sparsity(sparsity)
        plan.step()
        achieved = plan.check()
        assert achieved == pytest.approx(
            gmp_ext.prune_step(stepped, sparsity, scope=scope, score=score), abs=0
        )
        a, b = gmp_ext.masks(planned), gmp_ext.masks(stepped)
        assert list(a) == list(b) == ODD
        for name in ODD:
            assert torch.equal(a[name], b[name]), (sparsity, name)
        for (name, p), q in zip(planned.named_parameters(), stepped.parameters()):
            assert_same(p, q, name)
    ordered = [values[n] for n in ODD]
    if scope == "layer":
        expected = [oracle_keep(v, round(0.6 * v.numel())) for v in ordered]
    else:
        expected = oracle_keep_global(ordered, round(0.6 * sum(v.numel() for v in ordered)))
    for name, keep in zip(ODD, expected):
        assert torch.equal(gmp_ext.masks(planned)[name], keep), name


def test_prune_plan_with_wanda_observes_forward_passes():
    planned, stepped = conv_net(), conv_net()
    batches = conv_batches()
    plan = gmp_ext.PrunePlan(planned, 0.5, score="wanda")
    with torch.no_grad():
        for x in batches:
            planned(x)
    plan.step()
    gmp_ext.prune_step(stepped, 0.5, score="wanda", calibration=batches)
    a, b = gmp_ext.masks(planned), gmp_ext.masks(stepped)
    assert list(a) == list(b) == ["conv.weight", "fc.weight"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for (name, p), q in zip(planned.named_parameters(), stepped.parameters()):
        assert_same(p, q, name)


# -- 8. N:M with wanda -------------------------------------------------------------------------


class NMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, bias=False)
        self.fc = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x), self.fc(x.flatten(2)[..., :16])


def nm_net() -> NMNet:
    net = NMNet()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # few levels: heavy ties inside the groups
        net.conv.weight.copy_(torch.randint(0, 3, net.conv.weight.shape, generator=g) * 0.25)
        net.fc.weight.copy_(torch.randint(0, 3, net.fc.weight.shape, generator=g) * 0.25)
    return net


def nm_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    # +-1 and +-2: features share a few distinct norms, so the values tie too.
    return [
        (torch.randint(0, 2, (2, 8, 4, 4), generator=g) * 2 - 1)
        * torch.randint(1, 3, (2, 8, 4, 4), generator=g).float()
        for _ in range(2)
    ]


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_nm_with_wanda_keeps_the_largest_values_of_each_group(sparsity):
    n, m = 2, 4
    net = nm_net()
    before = snapshot(net)
    batches = nm_batches()
    fc_inputs = [x.flatten(2)[..., :16] for x in batches]
    gmp_ext.prune_step(net, sparsity, nm=(n, m), score="wanda", calibration=batches)
    keeps = gmp_ext.masks(net)
    # The conv's groups run along its input channels at each kernel position (a permuted view).
    conv_values = wanda_oracle(before["conv.weight"], exact_sums(batches, 1), 1)
    conv_view = conv_values.movedim(1, -1).reshape(-1, 8)
    k_conv = round(sparsity * conv_values.numel())
    conv_keep = nm_oracle_keep(conv_view, n, m, k_conv).view(4, 3, 3, 8).movedim(-1, 1)
    fc_values = wanda_oracle(before["fc.weight"], exact_sums(fc_inputs, -1), 1)
    fc_keep = nm_oracle_keep(fc_values, n, m, round(sparsity * fc_values.numel()))
    assert torch.equal(keeps["conv.weight"], conv_keep)
    assert torch.equal(keeps["fc.weight"], fc_keep)
    check_pruned_weights(net, before, keeps)
    for name, values in (("conv.weight", conv_view), ("fc.weight", fc_values)):
        keep = keeps[name]
        groups = (keep.movedim(1, -1) if keep.dim() > 2 else keep).reshape(-1, m)
        kept = groups.sum(1)
        assert int(kept.min()) >= n, name
        if sparsity == 0.5:  # exactly n of every m, the n largest (value, index)
            assert bool((kept == n).all()), name
            for row, group in zip(values.reshape(-1, m).tolist(), groups.tolist()):
                largest = sorted(range(m), key=lambda i: (row[i], i))[m - n :]
                assert sorted(i for i in range(m) if group[i]) == sorted(largest), name


def test_nm_refuses_negative_scores_and_modifies_nothing():
    net = nn.Linear(8, 4, bias=False)
    before = snapshot(net)
    with pytest.raises(ValueError, match="non-negative"):
        gmp_ext.prune_step(net, 0.5, nm=(2, 4), score=lambda name, param: param - param.mean())
    check_pruned_weights(net, before, {})
    assert gmp_ext.masks(net) == {}
    plan = gmp_ext.PrunePlan(net, 0.5, nm=(2, 4), score=lambda name, param: -param.abs() - 1)
    with pytest.raises(ValueError, match="non-negative"):
        plan.step()
    check_pruned_weights(net, before, {})
    assert all(bool(k.all()) for k in gmp_ext.masks(net).values())


# -- 9. errors ---------------------------------------------------------------------------------


def test_an_unknown_score_name_lists_the_registered_ones():
    net = conv_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'magnitude', 'movement', 'wanda'.*'wandaa'"):
        gmp_ext.prune_step(net, 0.5, score="wandaa")
    check_pruned_weights(net, before, {})
    assert gmp_ext.masks(net) == {}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    schedule = GMPSchedule(**SCHEDULE)
    with pytest.raises(ValueError, match="'wandaa'"):
        gmp_ext.GMP(net, optimizer, schedule, steps_per_epoch=SPE, score="wandaa")
    with pytest.raises(ValueError, match="'wandaa'"):
        gmp_ext.PrunePlan(net, 0.5, score="wandaa")
    with pytest.raises(ValueError, match=r"unknown score 'nope'; registered: \['magnitude'"):
        score_from_dict({"name": "nope"})
    assert gmp_ext.masks(net) == {}


def test_nan_in_a_score_names_the_parameter_and_modifies_nothing():
    net = odd_model(0)
    gmp_ext.prune_step(net, 0.25)  # earlier masks: they must survive the failed step
    masks_before, before = gmp_ext.masks(net), snapshot(net)

    def score(name, param):
        values = param.abs().float()
        if name == "c.weight":
            values[1, 2] = float("nan")
            values[0, 0] = float("nan")
        return values

    with pytest.raises(ValueError, match=r"parameter 'c.weight': its 'function' score has 2 NaN"):
        gmp_ext.prune_step(net, 0.75, score=score)
    with pytest.raises(ValueError, match=r"parameter 'c.weight'.*2 NaN"):
        gmp_ext.prune_step(net, 0.75, scope="global", score=score)
    check_pruned_weights(net, before, {})
    masks_after = gmp_ext.masks(net)
    assert list(masks_after) == list(masks_before)
    assert all(torch.equal(masks_after[n], masks_before[n]) for n in masks_before)

    plan = gmp_ext.PrunePlan(net, 0.75, score=score)
    with pytest.raises(ValueError, match=r"parameter 'c.weight'.*2 NaN"):
        plan.step()
    check_pruned_weights(net, before, {})
    masks_after = gmp_ext.masks(net)
    assert all(torch.equal(masks_after[n], masks_before[n]) for n in masks_before)


def test_a_score_of_the_wrong_shape_or_dtype_names_the_parameter():
    net = odd_model(0)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"parameter 'a.weight', got \(35,\)"):
        gmp_ext.prune_step(net, 0.5, score=lambda name, param: param.reshape(-1))
    with pytest.raises(ValueError, match=r"parameter 'a.weight' values of dtype torch.int64"):
        gmp_ext.prune_step(
            net, 0.5, score=lambda name, param: torch.ones_like(param, dtype=torch.long)
        )
    check_pruned_weights(net, before, {})
    assert gmp_ext.masks(net) == {}


def test_wanda_without_observations_says_it_has_seen_no_input():
    net = conv_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"has seen no input to parameter 'conv.weight'"):
        gmp_ext.prune_step(net, 0.5, score="wanda")
    with pytest.raises(ValueError, match="no batches"):
        gmp_ext.prune_step(net, 0.5, score="wanda", calibration=[])
    with pytest.raises(ValueError, match=r"score 'magnitude' observes none"):
        gmp_ext.prune_step(net, 0.5, calibration=conv_batches())
    check_pruned_weights(net, before, {})
    assert gmp_ext.masks(net) == {}
    assert not net.conv._forward_pre_hooks and not net.fc._forward_pre_hooks


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


def test_wanda_refuses_attention_projections_and_grouped_convs_by_name():
    net = Attention()
    before = snapshot(net)
    batches = [torch.randn(3, 2, 8)]
    with pytest.raises(ValueError, match=r"parameter 'attn.in_proj_weight'.*MultiheadAttention"):
        gmp_ext.prune_step(net, 0.5, score="wanda", calibration=batches)
    with pytest.raises(ValueError, match=r"parameter 'grouped.weight'.*groups=2"):
        gmp_ext.prune_step(net, 0.5, params=["grouped.weight"], score="wanda", calibration=batches)
    check_pruned_weights(net, before, {})
    assert gmp_ext.masks(net) == {}
    # Leaving them out works.
    gmp_ext.prune_step(net, 0.5, params=["fc.weight"], score="wanda", calibration=batches)
    assert list(gmp_ext.masks(net)) == ["fc.weight"]
    assert int((net.fc.weight == 0).sum()) == 16


def test_movement_without_a_gradient_names_the_parameter():
    model = movement_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no gradient for parameter '0.weight'"):
        gmp_ext.prune_step(model, 0.5, score="movement")
    model(torch.randn(2, 6)).sum().backward()
    model[1].weight.grad = None
    with pytest.raises(ValueError, match=r"no gradient for parameter '1.weight'"):
        gmp_ext.prune_step(model, 0.5, score="movement")
    check_pruned_weights(model, before, {})
    assert gmp_ext.masks(model) == {}
    with pytest.raises(RuntimeError, match="attached"):
        Movement().accumulate()


@pytest.mark.parametrize("score", ["wanda", "movement", Wanda(), lambda name, param: param.abs()])
def test_gmp_with_an_observing_score_refuses_a_schedule_pruning_at_epoch_0(score):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = snapshot(model)
    schedule = GMPSchedule(**{**SCHEDULE, "start_epoch": 0})
    with pytest.raises(ValueError, match=r"prunes at epoch 0.*start_epoch"):
        gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=SPE, score=score)
    check_pruned_weights(model, before, {})
    assert gmp_ext.masks(model) == {}
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    # Magnitude prunes at once.
    other = mlp()
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.05)
    gmp_ext.GMP(other, other_optimizer, schedule, steps_per_epoch=SPE, score="magnitude")
    assert list(gmp_ext.masks(other)) == MLP_WEIGHTS


def test_a_refused_gmp_leaves_the_model_free_for_the_next_one():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = GMPSchedule(**{**SCHEDULE, "start_epoch": 0})
    with pytest.raises(ValueError, match="start_epoch") as refused:
        gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=SPE, score="wanda")
    # The caught exception (its traceback) is still alive here, as in any `except ... as e`.
    gmp = gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=SPE)
    assert refused.value is not None
    assert list(gmp_ext.masks(model)) == MLP_WEIGHTS
    assert gmp.history[0]["step"] == 0


def test_score_specs():
    assert isinstance(score_for(None), Magnitude) and isinstance(score_for("magnitude"), Magnitude)
    assert isinstance(score_for("wanda"), Wanda) and isinstance(score_for(Movement), Movement)
    given = Movement()
    assert score_for(given) is given
    function = score_for(lambda name, param: param)
    assert isinstance(function, FunctionScore) and function.to_dict()["name"] == "function"
    assert {"magnitude", "wanda", "movement"} <= set(registered_scores())
    for cls in (Magnitude, Wanda, Movement):
        assert isinstance(score_from_dict(cls().to_dict()), cls)
    with pytest.raises(ValueError, match="registered"):
        score_for(3)
    assert issubclass(Wanda, Score)


def test_recipes_pass_the_score_on():
    recipe = gmp_ext.load_recipe({**SCHEDULE, "score": "wanda"})
    assert recipe.score == "wanda"
    assert recipe.gmp_options()["score"] == "wanda"
    assert "score" not in gmp_ext.load_recipe(SCHEDULE).gmp_options()
    with pytest.raises(ValueError, match="score must be a score name"):
        gmp_ext.load_recipe({**SCHEDULE, "score": 3})
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = gmp_ext.GMP.from_recipe(
        model, optimizer, {**SCHEDULE, "score": "movement"}, steps_per_epoch=SPE
    )
    assert isinstance(gmp.config.score, Movement)
    assert gmp.state_dict()["config"]["score"] == {"name": "movement"}
    # A keyword argument overrides the recipe's score.
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = gmp_ext.GMP.from_recipe(
        model, optimizer, {**SCHEDULE, "score": "movement"}, steps_per_epoch=SPE, score="wanda"
    )
    assert isinstance(gmp.config.score, Wanda)


# -- 10. selection strategies in GMP -----------------------------------------------------------


def nm_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def run_nm_gmp(**kwargs) -> tuple[nn.Module, gmp_ext.GMP]:
    model = nm_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = GMPSchedule(
        init_sparsity=0.1, final_sparsity=0.5, start_epoch=1, end_epoch=3, update_frequency=1
    )
    gmp = gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=SPE, **kwargs)
    for step in range(10):
        x, _ = mlp_batch(step)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model, gmp


def test_gmp_nm_selection_equals_nm_and_round_trips():
    by_selection, gmp = run_nm_gmp(selection=NMSelection(2, 4))
    by_nm, nm_gmp = run_nm_gmp(nm=(2, 4))
    a, b = gmp_ext.masks(by_selection), gmp_ext.masks(by_nm)
    assert list(a) == list(b) == ["0.weight", "2.weight", "4.weight"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert bool((a[name].reshape(-1, 4).sum(1) == 2).all()), name
    for (name, p), q in zip(by_selection.named_parameters(), by_nm.parameters()):
        assert_same(p, q, name)
    config = gmp.state_dict()["config"]
    assert config["selection"] == {"name": "nm", "n": 2, "m": 4, "scope": "layer"}
    assert config["nm"] == [2, 4] == nm_gmp.state_dict()["config"]["nm"]
    rebuilt = selection_from_dict(config["selection"])
    assert isinstance(rebuilt, NMSelection) and rebuilt.to_dict() == config["selection"]
    assert selection_from_dict(LayerSelection().to_dict()).to_dict() == {"name": "layer"}
    assert selection_from_dict(GlobalSelection().to_dict()).to_dict() == {"name": "global"}
    with pytest.raises(ValueError, match=r"unknown selection 'diagonal'"):
        selection_from_dict({"name": "diagonal"})


def test_gmp_selection_with_scope_is_ambiguous():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="not both"):
        gmp_ext.GMP(
            model,
            optimizer,
            GMPSchedule(**SCHEDULE),
            steps_per_epoch=SPE,
            selection=GlobalSelection(),
            scope="global",
        )
    with pytest.raises(ValueError, match="not both"):
        gmp_ext.GMP(
            model,
            optimizer,
            GMPSchedule(**SCHEDULE),
            steps_per_epoch=SPE,
            selection=NMSelection(2, 4),
            nm=(2, 4),
        )
    assert gmp_ext.masks(model) == {}


def test_gmp_global_selection_with_wanda_prunes_the_global_count():
    spy = SpyWanda()
    model, optimizer, gmp = mlp_gmp(spy, selection=GlobalSelection())
    mlp_train(model, optimizer, range(13))
    assert gmp.state_dict()["config"]["selection"] == {"name": "global"}
    keeps = gmp_ext.masks(model)
    total = sum(k.numel() for k in keeps.values())
    expected = oracle_keep_global([spy.last[n] for n in MLP_WEIGHTS], round(0.75 * total))
    for name, keep in zip(MLP_WEIGHTS, expected):
        assert torch.equal(keeps[name], keep), name
    cut = max(float(spy.last[n][~keeps[n]].max()) for n in MLP_WEIGHTS if (~keeps[n]).any())
    assert {gmp.history[-1]["layers"][n]["threshold"] for n in MLP_WEIGHTS} == {cut}


def test_wanda_refuses_attention_out_proj_by_name():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'0\.out_proj\.weight'.*out_proj without calling it"):
        gmp_ext.prune_step(
            model,
            0.5,
            params=["0.out_proj.weight"],
            score="wanda",
            calibration=[torch.randn(3, 1, 8)],
        )
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert gmp_ext.masks(model) == {}


@pytest.mark.parametrize(("k", "cut"), [(1, -3.0), (2, -2.0), (3, -1.0), (4, 0.0), (5, 1.0)])
def test_signed_threshold_is_the_largest_pruned_value(k, cut):
    model = nn.Linear(4, 2, bias=False)
    values = torch.tensor([[-3.0, -1.0, 2.0, 5.0], [-2.0, 0.0, 1.0, 4.0]])
    gmp_ext.prune_step(model, k / 8, score=lambda name, param: values)
    assert gmp_ext.pruning.pruner.entries_of(model)["weight"].threshold == cut
    keep = gmp_ext.masks(model)["weight"]
    assert float(values[~keep].max()) == cut and int((~keep).sum()) == k


# -- every device present (CUDA where there is one: the same masks as the oracle) ---------------


def _signed_levels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, shape, generator=generator) * 0.5).float()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_function_score_on_each_device(device, scope):
    model = nn.Sequential(nn.Linear(9, 7), nn.Linear(7, 5)).to(device)
    values = {"0.weight": _signed_levels((7, 9), 1), "1.weight": _signed_levels((5, 7), 2)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gmp_ext.prune_step(
        model, 0.6, scope=scope, score=lambda name, param: values[name].to(param.device)
    )
    masks = gmp_ext.masks(model)
    names = list(values)
    if scope == "layer":
        expected = [oracle_keep(values[n], round(0.6 * values[n].numel())) for n in names]
    else:
        total = sum(v.numel() for v in values.values())
        expected = oracle_keep_global([values[n] for n in names], round(0.6 * total))
    for name, keep in zip(names, expected):
        assert torch.equal(masks[name].cpu(), keep), name
        weight = dict(model.named_parameters())[name].detach()
        assert torch.equal(weight.cpu(), torch.where(keep, before[name].cpu(), 0.0)), name


def test_wanda_and_plan_on_each_device(device):
    model = nn.Sequential(nn.Linear(16, 12, bias=False)).to(device)
    batches = [torch.randn(5, 16, device=device) for _ in range(3)]
    # Summed batch by batch on the device, as the hooks sum them: the same float32 sums.
    norms = sum(b.float().square().sum(0) for b in batches).sqrt()
    values = model[0].weight.detach().abs().float() * norms
    expected = oracle_keep(values.cpu(), round(0.75 * values.numel()))
    planned = nn.Sequential(nn.Linear(16, 12, bias=False)).to(device)
    planned.load_state_dict(model.state_dict())
    gmp_ext.prune_step(model, 0.75, score="wanda", calibration=batches)
    assert torch.equal(gmp_ext.masks(model)["0.weight"].cpu(), expected)
    plan = gmp_ext.PrunePlan(planned, 0.75, score=lambda name, param: values)
    plan.step()
    assert plan.check() == {"0.weight": 0.75}
    assert torch.equal(gmp_ext.masks(planned)["0.weight"].cpu(), expected)
    assert torch.equal(planned[0].weight, model[0].weight)


# -- review findings: each weight its own state, inputs of every layout, nothing left behind ---


class _Gated(nn.Module):
    """One module owning two matmul weights that see the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3))
        self.w2 = nn.Parameter(torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x @ self.w1.T, x @ self.w2.T], dim=-1)


def test_wanda_keeps_one_sum_per_weight_of_a_module():
    gmp_ext.register_layer(_Gated, ("w1", "w2"), 1)
    model = nn.Sequential(_Gated())
    wanda = Wanda()
    handles = wanda.attach(model, ["0.w1", "0.w2"])
    for _ in range(3):
        model(torch.ones(1, 3))
    for handle in handles:
        handle.remove()
    sums = wanda.state_dict()["sums"]
    assert torch.equal(sums["0.w1"], torch.full((3,), 3.0))
    assert torch.equal(sums["0.w2"], torch.full((3,), 3.0))
    assert wanda._sums["0.w1"] is not wanda._sums["0.w2"]


def test_wanda_reads_channels_of_unbatched_conv_input():
    model = nn.Sequential(nn.Conv2d(4, 2, 1, bias=False))
    x = torch.ones(4, 3, 5)  # [C, H, W]: channels first, no batch
    x[0] *= 10
    wanda = Wanda()
    handles = wanda.attach(model, ["0.weight"])
    model(x)
    for handle in handles:
        handle.remove()
    assert torch.equal(wanda.state_dict()["sums"]["0.weight"], torch.tensor([1500.0, 15, 15, 15]))


def test_signed_threshold_with_minus_inf_among_the_pruned_negatives():
    model = nn.Linear(4, 1, bias=False)
    values = torch.tensor([[-1.0, 3.0, -float("inf"), 2.0]])
    gmp_ext.prune_step(model, 0.5, score=lambda name, param: values)
    assert gmp_ext.pruning.pruner.entries_of(model)["weight"].threshold == -1.0


def test_a_refused_score_leaves_the_running_controller_as_it_was():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = gmp_ext.GMP(model, optimizer, GMPSchedule(**SCHEDULE), steps_per_epoch=SPE)
    hooks = dict(optimizer._optimizer_step_post_hooks)
    with pytest.raises(ValueError, match="in_proj_weight"):
        gmp_ext.GMP(model, optimizer, GMPSchedule(**SCHEDULE), steps_per_epoch=SPE, score="wanda")
    assert dict(optimizer._optimizer_step_post_hooks) == hooks
    assert gmp_ext.model.mask_store.get_store(model).controller() is first
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)


def test_plans_with_a_score_leave_no_hooks_behind():
    import gc

    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="above 1 - n/m"):
        plan = gmp_ext.PrunePlan(model, 0.9, nm=(2, 4), score="wanda")
    assert not model[0]._forward_pre_hooks and gmp_ext.masks(model) == {}
    plan = gmp_ext.PrunePlan(model, 0.5, score="wanda")
    assert len(model[0]._forward_pre_hooks) == 1
    model(torch.randn(3, 8))
    plan.step()  # Wanda's first step makes the plan's factor vectors
    step = plan._step
    model(torch.randn(3, 8))
    plan.step()
    assert plan._step is step  # the plan's buffers keep its tables bound
    del plan, step
    gc.collect()
    assert not model[0]._forward_pre_hooks


def test_scored_prune_steps_are_not_cached():
    model = nn.Sequential(nn.Linear(8, 8))
    gmp_ext.prune_step(model, 0.5, score=lambda name, param: param.detach().abs() + 1)
    assert not gmp_ext.model.mask_store.get_store(model)._prune_steps
    gmp_ext.prune_step(model, 0.6)
    assert len(gmp_ext.model.mask_store.get_store(model)._prune_steps) == 1


def test_score_state_loads_onto_the_parameters_device(device):
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).to(device)
    movement = Movement()
    movement.attach(model, ["0.weight"])
    saved = {"totals": {"0.weight": torch.randn(4, 6)}, "steps": 2}  # as map_location="cpu" gives
    movement.load_state_dict(saved)
    model(torch.randn(2, 6, device=device)).sum().backward()
    movement.accumulate()
    grad = model[0].weight.grad
    expected = (
        saved["totals"]["0.weight"].to(device).addcmul(model[0].weight.detach(), grad, value=-1)
    )
    assert torch.equal(movement.state_dict()["totals"]["0.weight"], expected)
    wanda = Wanda()
    handles = wanda.attach(model, ["0.weight"])
    wanda.load_state_dict({"sums": {"0.weight": torch.ones(6)}, "tokens": 1})
    model(torch.ones(1, 6, device=device))
    for handle in handles:
        handle.remove()
    assert torch.equal(wanda.state_dict()["sums"]["0.weight"].cpu(), torch.full((6,), 2.0))
