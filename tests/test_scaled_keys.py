"""Scaled keys (Wanda): the kernels rank |w| times per-feature factors as they read the weights;
rows, masks and zeroed weights equal the reference backend's, which ranks the product made in
PyTorch (``KeyScale.weighted``), bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import gmp_ext
from gmp_ext.kernels.backends import REFERENCE
from gmp_ext.kernels.engine import PreparedStep
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, KEY_SPACE_WIDE, KeyScale, key_space_for
from gmp_ext.kernels.primitives import new_mask
from gmp_ext.pruning.strategies import NMPattern
from gmp_ext.scores import Score

from .utils import DTYPE_IDS, DTYPES, assert_same, weights

# (shape, feature dimension): a Linear's rows (inner 1), a conv's channels (inner 9), a
# transposed layout (Conv1D: dimension 0, inner = its columns), one element, empty, and sizes
# around the CPU's small-entry, sample-select and tile limits.
SHAPES = [
    ((1, 1), 1),
    ((0, 5), 1),
    ((3, 11), 1),
    ((7, 5, 3, 3), 1),
    ((64, 32, 3, 3), 1),
    ((33, 65), 0),
    ((129, 127), 1),
    ((64, 1025), 1),
    ((300, 701), 1),
    ((701, 300), 0),
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}@{d}" for s, d in SHAPES]
FACTORS = ["normal", "ties", "zeros"]


def _factors(count: int, kind: str, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(count)
    if kind == "normal":
        f = torch.rand(count, generator=g) * 3
    elif kind == "ties":  # few distinct factors: the products tie across features
        f = torch.randint(1, 4, (count,), generator=g).float() * 0.5
    else:  # features never seen (zero norms), some of them
        f = torch.rand(count, generator=g)
        f[::3] = 0.0
    return f.to(device)


def _weights(shape, dtype, device, kind: str) -> torch.Tensor:
    return weights(torch.Size(shape).numel(), dtype, device, kind).reshape(shape)


def _run(backend, tensors, scales, scope, counts, key_space, fused):
    """Rows, masks and weights after one prune step of copies of ``tensors``."""
    tensors = [t.clone() for t in tensors]
    masks = [new_mask(t) for t in tensors]
    job = backend.prepare(tensors, masks, scope, key_space, scales)
    job.set_counts(counts)
    if fused:
        backend.prune(job)
    else:
        backend.select(job)
        backend.build(job, zero_pruned=True)
    return job.rows.clone(), masks, tensors


def _assert_backends_agree(native, tensors, scales, scope, counts, key_space, what):
    for fused in (False, True):
        got = _run(native, tensors, scales, scope, counts, key_space, fused)
        want = _run(REFERENCE, tensors, scales, scope, counts, key_space, fused)
        label = f"{what} fused={fused}"
        assert_same(got[0], want[0], f"{label} rows")
        for i, (a, b) in enumerate(zip(got[1], want[1])):
            assert_same(a, b, f"{label} mask {i}")
        for i, (a, b) in enumerate(zip(got[2], want[2])):
            assert_same(a, b, f"{label} weights {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "dim"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("factor_kind", FACTORS)
def test_layerwise_scaled_matches_reference(native, device, dtype, shape, dim, factor_kind):
    # specials: +-inf (inf keys), -0, subnormals (their products too); ties: few magnitudes.
    kind = {"normal": "specials", "ties": "few_values", "zeros": "normal"}[factor_kind]
    w = _weights(shape, dtype, device, kind)
    scale = KeyScale(_factors(shape[dim], factor_kind, device), dim)
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        counts = [round(sparsity * w.numel())]
        what = f"{shape}@{dim} {factor_kind} s={sparsity}"
        _assert_backends_agree(native, [w], [scale], "layer", counts, KEY_SPACE_NATIVE, what)
    rows = _run(native, [w], [scale], "layer", [w.numel() // 2], KEY_SPACE_NATIVE, False)[0]
    assert int(rows[0, 2]) == KEY_SPACE_WIDE  # scaled keys are float32 products


@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32] * 3, [torch.bfloat16] * 3, [torch.float16, torch.bfloat16, torch.float32]],
    ids=["fp32", "bf16", "mixed"],
)
def test_global_scaled_matches_reference(native, device, dtypes):
    shapes = [((300, 701), 1), ((7, 5, 3, 3), 1), ((33, 65), 0)]
    tensors = [_weights(s, dt, device, "normal") for (s, _), dt in zip(shapes, dtypes)]
    scales = [KeyScale(_factors(s[d], "normal", device), d) for s, d in shapes]
    scales[1] = None  # a tensor ranked by |w| among scaled ones
    # Scaled keys are float32 products: a 16-bit weight's selection compares them in the wide space.
    key_space = key_space_for(set(dtypes) | {torch.float32})
    total = sum(t.numel() for t in tensors)
    for sparsity in (0.0, 0.3, 0.9, 1.0):
        counts = [round(sparsity * total)]
        what = f"{dtypes} s={sparsity}"
        _assert_backends_agree(native, tensors, scales, "global", counts, key_space, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scaled_nan_keys_are_counted(native, device, dtype):
    """A NaN weight, and an infinite one against a zero factor, make NaN keys: the selection
    counts them (a void row: masks left as they were, as for NaN weights)."""
    w = _weights((40, 700), dtype, device, "normal")
    factors = _factors(700, "normal", device)
    factors[5] = 0.0
    w[3, 5] = float("inf")
    w[7, 9] = float("nan")
    scale = KeyScale(factors, 1)
    _assert_backends_agree(native, [w], [scale], "layer", [1000], KEY_SPACE_NATIVE, "NaN keys")
    rows = _run(native, [w], [scale], "layer", [1000], KEY_SPACE_NATIVE, True)[0]
    assert int(rows[0, 3]) == 2


def test_scaled_selection_refuses_native_space_for_16_bit_weights(native, device):
    w = _weights((8, 300), torch.bfloat16, device, "normal")
    scale = KeyScale(_factors(300, "normal", device), 1)
    with pytest.raises(ValueError, match="needs the wide key space"):
        _run(native, [w], [scale], "global", [100], KEY_SPACE_NATIVE, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nm_scaled_matches_reference(native, device, dtype, scope, monkeypatch):
    """2:4 over scaled keys: the candidate lists hold float32 products."""
    tensors = [
        _weights((16, 64), dtype, device, "few_values"),
        _weights((6, 32), dtype, device, "normal"),
    ]
    scales = [KeyScale(_factors(64, "ties", device), 1), KeyScale(_factors(32, "zeros", device), 1)]
    key_space = key_space_for({dtype, torch.float32}) if scope == "global" else KEY_SPACE_NATIVE
    counts = [200, 40] if scope == "layer" else [240]
    results = []
    for backend in (native.name, "reference"):
        monkeypatch.setenv("GMP_EXT_BACKEND", backend)
        work = [t.clone() for t in tensors]
        masks = [new_mask(t) for t in work]
        step = PreparedStep(work, masks, scope, key_space, NMPattern(2, 4), scales=scales)
        assert {g.backend.name for g in step.groups} == {backend}
        step.set_counts(counts, scope == "layer")
        step.run()
        results.append((torch.stack(step.rows()), masks, work))
    (rows, masks, work), (ref_rows, ref_masks, ref_work) = results
    assert_same(rows, ref_rows, "rows")
    for a, b in zip(masks + work, ref_masks + ref_work):
        assert_same(a, b, "masks and weights")


def test_prepared_step_takes_scales_or_ranked_not_both():
    w = torch.randn(4, 8)
    scale = KeyScale(torch.ones(8), 1)
    with pytest.raises(ValueError, match="not both"):
        PreparedStep([w], [new_mask(w)], "layer", ranked=[w.abs()], scales=[scale])


def _linear_with_an_unseen_feature(dtype=torch.float32):
    """A Linear whose input feature 2 is always 0 (a zero norm) and whose weight on it is inf."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
    x = torch.randn(16, 8, dtype=dtype)
    x[:, 2] = 0
    return model, x


def test_prune_step_refuses_nan_scores_before_modifying():
    """inf x a zero norm is NaN: a ValueError naming the parameter, the weights untouched."""
    model, x = _linear_with_an_unseen_feature()
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"'0.weight': its 'wanda' score has 1 NaN"):
        gmp_ext.prune_step(model, 0.5, score="wanda", calibration=[x])
    assert_same(model[0].weight, before)
    assert gmp_ext.masks(model) == {}


def test_infinite_norms_are_refused():
    """Input norms that overflow float32 would make a zero weight's value NaN."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    x = torch.randn(16, 8)
    x[:, 3] = 1e20
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"'0.weight': its 'wanda' factors hold infinite"):
        gmp_ext.prune_step(model, 0.5, score="wanda", calibration=[x])
    assert_same(model[0].weight, before)


def test_plan_reports_nan_scores():
    model, x = _linear_with_an_unseen_feature()
    plan = gmp_ext.PrunePlan(model, 0.5, score="wanda")
    model(x)
    plan.step()
    with pytest.raises(ValueError, match=r"NaN 'wanda' scores in parameter '0.weight' \(1\)"):
        plan.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_plan_global_wanda_on_16_bit_weights(dtype):
    """Scaled keys are float32 products: a global plan over 16-bit weights selects them in the
    wide space, the same masks as an eager global step."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(  # noqa: E731
        torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(16, 8, bias=False)
    ).to(dtype)
    planned, eager = make(), make()
    eager.load_state_dict(planned.state_dict())
    x = torch.randn(8, 32, dtype=dtype)
    plan = gmp_ext.PrunePlan(planned, 0.5, scope="global", score="wanda")
    planned(x)
    plan.step()
    plan.check()
    gmp_ext.prune_step(eager, 0.5, scope="global", score="wanda", calibration=[x])
    for name, keep in gmp_ext.masks(planned).items():
        assert torch.equal(keep, gmp_ext.masks(eager)[name]), name
    assert sum(int((~k).sum()) for k in gmp_ext.masks(planned).values()) == (32 * 16 + 16 * 8) // 2


class _Factors(Score):
    name = "test_factors"
    scaled = True

    def __init__(self, make) -> None:
        self.make = make

    def factors(self, names, params):
        return self.make(params)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: [KeyScale(torch.ones(p.shape[1]), 1) for p in ps][:1], "2 parameters"),
        (lambda ps: [KeyScale([1.0] * p.shape[1], 1) for p in ps], "a KeyScale along"),
        (lambda ps: [KeyScale(torch.ones(p.shape[1] + 1), 1) for p in ps], "factors of shape"),
        (lambda ps: [KeyScale(-torch.ones(p.shape[1]), 1) for p in ps], "negative"),
        (lambda ps: [KeyScale(torch.full((p.shape[1],), math.nan), 1) for p in ps], "NaN"),
    ],
    ids=["too_few", "not_a_tensor", "wrong_length", "negative", "nan"],
)
def test_bad_factors_are_refused_naming_the_parameter(make, match):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        gmp_ext.prune_step(model, 0.5, score=_Factors(make))
    for p, b in zip(model.parameters(), before):
        assert_same(p, b)


@pytest.mark.parametrize(
    "factors",
    [torch.ones(16)[::2], torch.ones(8, dtype=torch.float64), torch.ones(7)],
    ids=["non_contiguous", "float64", "wrong_length"],
)
def test_engine_refuses_factors_the_kernels_cannot_read(factors):
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="KeyScale.factors must be 8 contiguous float32"):
        PreparedStep([w], [new_mask(w)], "layer", scales=[KeyScale(factors, 1)])


def test_compiled_plan_refuses_scores_made_eagerly():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    plan = gmp_ext.PrunePlan(model, 0.5, score="wanda")
    model(torch.randn(3, 8))
    with pytest.raises(Exception, match="cannot run under torch.compile"):
        torch.compile(plan.step, backend="eager", fullgraph=True)()
