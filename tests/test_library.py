"""The torch.ops.gmp_ext operators: schemas, opcheck, native == reference, errors, and
torch.compile (fullgraph, inductor) of apply_masks, PrunePlan.step and an attached optimizer."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.kernels import library
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.layout import (
    KEY_SPACE_NATIVE,
    KEY_SPACE_WIDE,
    KEY_SPACE_WIDE64,
    key_space_for,
    mask_storage_bytes,
)

from .utils import DTYPE_IDS, DTYPES, assert_models_equal, assert_same, weights

OPS = torch.ops.gmp_ext
ALL_DTYPES = [*DTYPES, torch.float64]
ALL_DTYPE_IDS = [*DTYPE_IDS, "fp64"]


def _tensors(dtype: torch.dtype, device, sizes=(1, 33, 64, 1009)) -> list[torch.Tensor]:
    return [weights(n, dtype, device, "few_values") for n in sizes]


def _masks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        torch.zeros(mask_storage_bytes(t.numel()), dtype=torch.uint8, device=t.device)
        for t in tensors
    ]


def _counts(tensors: list[torch.Tensor], sparsity: float = 0.5) -> torch.Tensor:
    return torch.tensor([round(sparsity * t.numel()) for t in tensors], dtype=torch.int64)


def _random_masks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_reference.pack_bits(torch.rand(t.numel(), device=t.device) < 0.4) for t in tensors]


def _opcheck(op, args) -> None:
    # The returned report names each check; opcheck raises on the first failure.
    report = torch.library.opcheck(op, args)
    assert report and set(report.values()) == {"SUCCESS"}, report


def test_namespace_holds_the_operators_with_annotated_mutation():
    for name, schema in library.SCHEMAS.items():
        op = getattr(OPS, name).default
        assert str(op._schema) == f"gmp_ext::{schema}"
        written = {a.name for a in op._schema.arguments if a.alias_info and a.alias_info.is_write}
        expected = {
            "build_masks": {"masks"},
            "apply_masks": {"tensors"},
            "nm_gather": {"lists"},
            "nm_build_masks": {"masks"},
            "prune": {"tensors", "masks"},
        }
        assert written == expected.get(name, set())


# --- opcheck: schema, fake tensors, autograd registration, AOT dispatch --------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_DTYPE_IDS)
def test_opcheck_every_operator(device, dtype):
    tensors = _tensors(dtype, device)
    counts = _counts(tensors)
    _opcheck(OPS.select_layerwise.default, (tensors, counts))
    total = torch.tensor([sum(t.numel() for t in tensors) // 3])
    key_space = KEY_SPACE_WIDE64 if dtype == torch.float64 else KEY_SPACE_NATIVE
    _opcheck(OPS.select_global.default, (tensors, total, key_space))
    rows = OPS.select_layerwise(tensors, counts)
    _opcheck(OPS.build_masks.default, (tensors, rows, _masks(tensors)))
    _opcheck(OPS.apply_masks.default, (tensors, _random_masks(tensors)))
    _opcheck(OPS.prune.default, (tensors, counts, _random_masks(tensors), False, KEY_SPACE_NATIVE))
    _opcheck(OPS.prune.default, (tensors, total, _random_masks(tensors), True, key_space))


def _lists(tensors: list[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    return [t.new_zeros(t.numel() // m * (m - n)) for t in tensors]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_DTYPE_IDS)
@pytest.mark.parametrize("pattern", [(2, 4), (3, 8)], ids=["2:4", "3:8"])
def test_opcheck_nm_operators(device, dtype, pattern):
    n, m = pattern
    tensors = _tensors(dtype, device, sizes=(0, 8, 64, 1024 + 8))
    tensors.append(weights(8 * 6, dtype, device).reshape(6, 8).t())  # non-contiguous
    _opcheck(OPS.nm_gather.default, (tensors, _lists(tensors, n, m), n, m))
    lists = _lists(tensors, n, m)
    library.nm_gather(tensors, lists, n, m)
    rows = library.select_layerwise(lists, _counts(lists, 0.6))
    _opcheck(OPS.nm_build_masks.default, (tensors, rows, _masks(tensors), n, m))
    _opcheck(OPS.nm_gather.default, ([], [], n, m))


def test_native_nm_operators_equal_reference(native, device, monkeypatch):
    tensors = [
        weights(k, dtype, device, kind)
        for k, dtype, kind in [
            (4096, torch.float32, "normal"),
            (2048 + 64, torch.bfloat16, "few_values"),
            (64, torch.float16, "specials"),
            (0, torch.float32, "normal"),
        ]
    ]
    results = []
    for backend in (None, "reference"):
        if backend:
            monkeypatch.setenv("GMP_EXT_BACKEND", backend)
        lists = _lists(tensors, 2, 4)
        library.nm_gather(tensors, lists, 2, 4)
        rows = library.select_layerwise(lists, _counts(lists, 0.7))
        masks = _masks(tensors)
        library.nm_build_masks(tensors, rows, masks, 2, 4)
        results.append((lists, rows, masks))
    (lists, rows, masks), (ref_lists, ref_rows, ref_masks) = results
    assert_same(rows.cpu(), ref_rows.cpu(), "rows")
    for i in range(len(tensors)):
        assert_same(lists[i], ref_lists[i], f"list {i}")
        assert_same(masks[i], ref_masks[i], f"mask {i}")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: library.nm_gather([t], [t.new_zeros(16)], 2, 3), "power of two"),
        (lambda t: library.nm_gather([t[:30]], [t.new_zeros(15)], 2, 4), "not a multiple"),
        (lambda t: library.nm_gather([t], [t.new_zeros(31)], 2, 4), r"lists\[0\] must be"),
        (lambda t: library.nm_gather([t], [t.new_zeros(16).half()], 2, 4), r"lists\[0\] must be"),
    ],
)
def test_bad_nm_arguments_name_the_value(call, match):
    tensor = weights(32, torch.float32)
    before = tensor.clone()
    with pytest.raises(ValueError, match=match):
        call(tensor)
    assert torch.equal(tensor, before)


def test_opcheck_mixed_dtypes_and_non_contiguous(device):
    tensors = [
        weights(35 * 9, torch.float32, device).view(35, 9).t(),
        weights(301, torch.bfloat16, device)[::2],
        weights(130, torch.float16, device),
    ]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    counts = _counts(tensors, 0.7)
    _opcheck(OPS.select_layerwise.default, (tensors, counts))
    total = torch.tensor([200])
    _opcheck(OPS.select_global.default, (tensors, total, KEY_SPACE_WIDE))
    rows = OPS.select_global(tensors, total, KEY_SPACE_WIDE)
    _opcheck(OPS.build_masks.default, (tensors, rows, _masks(tensors)))
    _opcheck(OPS.apply_masks.default, (tensors, _random_masks(tensors)))
    _opcheck(OPS.prune.default, (tensors, total, _random_masks(tensors), True, KEY_SPACE_WIDE))
    _opcheck(OPS.prune.default, (tensors, counts, _random_masks(tensors), False, KEY_SPACE_NATIVE))


def test_opcheck_empty_lists(device):
    counts = torch.zeros(0, dtype=torch.int64, device=device)
    _opcheck(OPS.select_layerwise.default, ([], counts))
    _opcheck(OPS.select_global.default, ([], torch.zeros(1, dtype=torch.int64), 0))
    rows = torch.zeros((0, 4), dtype=torch.int64, device=device)
    _opcheck(OPS.build_masks.default, ([], rows, []))
    _opcheck(OPS.apply_masks.default, ([], []))
    _opcheck(OPS.prune.default, ([], counts, [], False, 0))
    assert OPS.select_layerwise([], counts).shape == (0, 4)


# --- native kernels against the reference (GMP_EXT_BACKEND=reference runs the same op) -----


def _run_all(tensors: list[torch.Tensor], sparsity: float):
    counts = _counts(tensors, sparsity)
    layer = OPS.select_layerwise(tensors, counts)
    total = torch.tensor([round(sparsity * sum(t.numel() for t in tensors))])
    key_space = key_space_for({t.dtype for t in tensors})
    global_rows = OPS.select_global(tensors, total, key_space)
    masks = _masks(tensors)
    OPS.build_masks(tensors, global_rows, masks, key_space == KEY_SPACE_WIDE64)
    applied = [t.clone() for t in tensors]
    OPS.apply_masks(applied, masks)
    pruned = [t.clone() for t in tensors]
    pruned_masks = _random_masks(tensors)
    pruned_rows = OPS.prune(pruned, counts, pruned_masks, False, KEY_SPACE_NATIVE)
    return layer, global_rows, masks, applied, pruned_rows, pruned_masks, pruned


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 1.0])
def test_native_operators_equal_reference(native, device, monkeypatch, sparsity):
    tensors = [
        weights(1, torch.float32, device),
        weights(33 * 7, torch.bfloat16, device, "pruned").view(33, 7).t(),
        weights(1009, torch.float16, device, "specials"),
        weights(4096, torch.float32, device, "few_values"),
    ]
    torch.manual_seed(0)
    got = _run_all(tensors, sparsity)
    monkeypatch.setenv("GMP_EXT_BACKEND", "reference")
    torch.manual_seed(0)
    want = _run_all(tensors, sparsity)
    kinds = ("layer rows", "global rows", "masks", "weights", "prune rows", "prune masks", "pruned")
    for kind, a, b in zip(kinds, got, want):
        for i, (x, y) in enumerate(zip(a, b) if isinstance(a, list) else [(a, b)]):
            assert_same(x, y, f"{kind} {i}")


def test_rows_match_the_reference_module(device):
    tensors = _tensors(torch.float32, device) + _tensors(torch.float64, device, (5, 77))
    counts = _counts(tensors, 0.6)
    rows = OPS.select_layerwise(tensors, counts)
    want = _reference.select_layerwise([t.cpu() for t in tensors], counts.tolist())
    assert_same(rows.cpu(), want)
    assert rows.device == tensors[0].device


def test_nan_row_leaves_its_mask_and_weights_as_they_were(device):
    bad = weights(100, torch.float32, device)
    bad[7] = float("nan")
    good = weights(50, torch.float32, device)
    rows = OPS.select_layerwise([bad, good], torch.tensor([10, 10]))
    assert rows[:, 3].tolist() == [1, 0]
    masks = [m.fill_(0xA5) for m in _masks([bad, good])]
    before = masks[0].clone()
    OPS.build_masks([bad, good], rows, masks)
    assert_same(masks[0], before)
    assert not torch.equal(masks[1], torch.full_like(masks[1], 0xA5))


def test_apply_through_unaligned_short_and_strided_masks(device):
    tensor = weights(300, torch.float32, device).view(20, 15).t()  # non-contiguous
    flags = torch.rand(300, device=device) < 0.5
    packed = _reference.pack_bits(flags)[:38]  # ceil(300 / 8) bytes: no padding
    buffer = torch.zeros(80, dtype=torch.uint8, device=device)
    buffer[1:39] = packed  # misaligned
    strided = torch.zeros(76, dtype=torch.uint8, device=device)
    strided[::2] = packed
    # The mask's flat order is the logical (row-major) one, whatever the strides.
    want = torch.where(flags.view(15, 20), tensor, torch.zeros((), device=device))
    for mask in (packed, buffer[1:39], strided[::2]):
        got = tensor.clone()
        OPS.apply_masks([got], [mask])
        assert_same(got, want)


def test_build_writes_through_a_misaligned_mask(device):
    tensor = weights(200, torch.bfloat16, device)
    rows = OPS.select_layerwise([tensor], torch.tensor([120]))
    want = _masks([tensor])
    OPS.build_masks([tensor], rows, want)
    buffer = torch.zeros(40, dtype=torch.uint8, device=device)
    OPS.build_masks([tensor], rows, [buffer[3:28]])
    assert_same(buffer[3:28], want[0][:25])
    assert int(buffer[:3].sum()) == 0 and int(buffer[28:].sum()) == 0


# --- bad arguments: ValueError/TypeError naming the argument, nothing written ---------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t, m: OPS.select_layerwise(t, torch.tensor([1])), ValueError, r"counts .*\[2\]"),
        (lambda t, m: OPS.select_layerwise(t, torch.tensor([1.0, 2.0])), ValueError, "counts"),
        (lambda t, m: OPS.select_global(t, torch.tensor([1]), 7), ValueError, "key_space"),
        (lambda t, m: OPS.apply_masks(t, m[:1]), ValueError, "1 masks for 2 tensors"),
        (lambda t, m: OPS.apply_masks(t, [m[0], m[1][:3]]), ValueError, r"masks\[1\] has 3"),
        (lambda t, m: OPS.apply_masks(t, [m[0], m[1].float()]), TypeError, r"masks\[1\]"),
        (
            lambda t, m: OPS.apply_masks([t[0], t[1].long()], m),
            TypeError,
            r"tensors\[1\] .*torch.int64",
        ),
        (
            lambda t, m: OPS.build_masks(t, torch.zeros(2, 3, dtype=torch.int64), m),
            ValueError,
            "rows",
        ),
        (lambda t, m: OPS.prune(t, torch.tensor([1]), m, False, 0), ValueError, r"counts .*\[2\]"),
        (lambda t, m: OPS.prune(t, torch.tensor([1, 1]), m, True, 0), ValueError, "counts"),
        (lambda t, m: OPS.prune(t, torch.tensor([1, 1]), m, False, 1), ValueError, "key_space"),
        (lambda t, m: OPS.prune(t, torch.tensor([1]), m[:1], True, 0), ValueError, "1 masks"),
    ],
)
def test_bad_arguments_name_the_value_and_change_nothing(call, error, match):
    tensors = [weights(40, torch.float32), weights(70, torch.float32)]
    masks = _masks(tensors)
    before = [t.clone() for t in tensors] + [m.clone() for m in masks]
    with pytest.raises(error, match=match):
        call(tensors, masks)
    for got, want in zip(tensors + masks, before):
        assert_same(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match=r"tensors\[1\] is on cuda"):
        OPS.select_layerwise([torch.ones(3), torch.ones(3, device="cuda")], torch.tensor([1, 1]))


def test_cached_tables_keep_no_tensor_alive(device):
    tensor = weights(500, torch.float32, device)
    alive = weakref.ref(tensor)
    OPS.apply_masks([tensor], _random_masks([tensor]))
    OPS.select_layerwise([tensor], torch.tensor([100]))
    del tensor
    gc.collect()
    assert alive() is None


# --- torch.compile ----------------------------------------------------------------------------

needs_compile = pytest.mark.skipif(
    not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
    reason="torch.compile is not supported here",
)


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield torch._dynamo
    torch._dynamo.reset()


class Small(nn.Module):
    """Three dtypes, a channels_last conv (non-contiguous) and a float64 layer (reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(45, 31)
        self.half = nn.Linear(17, 9).to(torch.bfloat16)
        self.wide = nn.Linear(7, 5).to(torch.float64)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)


def _perturb(*models: nn.Module, seed: int) -> None:
    for model in models:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))


def _explain(dynamo, fn):
    explained = dynamo.explain(fn)()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@needs_compile
def test_compiled_apply_masks_is_one_graph_and_matches_eager(dynamo, device):
    compiled = Small().to(device)
    gmp_ext.prune_step(compiled, 0.6)
    eager = copy.deepcopy(compiled)
    gmp_ext.prune_step(eager, 0.6)  # the copy's own masks: the same bits

    def reapply() -> None:
        gmp_ext.apply_masks(compiled)

    _explain(dynamo, reapply)
    step = torch.compile(reapply, fullgraph=True)
    for seed in range(3):
        _perturb(compiled, eager, seed=seed)
        step()
        gmp_ext.apply_masks(eager)
        assert_models_equal(compiled, eager, f"round {seed}")
        assert int((compiled.fc.weight == 0).sum()) == round(0.6 * 45 * 31)


@needs_compile
def test_compiled_apply_follows_a_replaced_parameter(dynamo):
    # The store binds names to the model's current parameters under Dynamo as it does eagerly.
    compiled = Small()
    gmp_ext.prune_step(compiled, 0.5)
    eager = copy.deepcopy(compiled)
    gmp_ext.prune_step(eager, 0.5)
    step = torch.compile(lambda: gmp_ext.apply_masks(compiled), fullgraph=True)
    step()
    for model in (compiled, eager):
        torch.manual_seed(3)
        model.fc.weight = nn.Parameter(torch.randn(31, 45))
    step()
    gmp_ext.apply_masks(eager)
    assert_models_equal(compiled, eager, "replaced fc.weight")
    assert int((compiled.fc.weight == 0).sum()) == round(0.5 * 45 * 31)


@needs_compile
def test_other_models_stores_do_not_recompile_the_apply(dynamo):
    # The store is found by one guarded key: pruning, dropping or collecting another model
    # (its store leaving the registry, even mid-compile) neither recompiles nor breaks guards,
    # nor does a layer class no model had before (the per-class caches grow).
    model = Small()
    gmp_ext.prune_step(model, 0.5)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    step = torch.compile(lambda: gmp_ext.apply_masks(model), backend=counter, fullgraph=True)
    step()
    for i in range(3):
        other = type(f"Fresh{i}", (nn.Linear,), {})(8, 8)
        gmp_ext.prune_step(other, 0.5)
        step()
        gmp_ext.remove(other)
        step()
        del other
        gc.collect()
        step()
    assert counter.frame_count == 1


@needs_compile
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_compiled_plan_step_is_one_graph_and_matches_eager(dynamo, device, scope):
    compiled, eager = Small().to(device), Small().to(device)
    eager.load_state_dict(compiled.state_dict())
    if scope == "global":  # one selection needs one key space: no float64 layer
        compiled.wide, eager.wide = nn.Identity(), nn.Identity()
    plans = [gmp_ext.PrunePlan(m, 0.4, scope=scope) for m in (compiled, eager)]

    def prune() -> None:
        plans[0].step()

    _explain(dynamo, prune)
    plans[1].step()
    step = torch.compile(prune, fullgraph=True)
    for i, sparsity in enumerate([0.4, 0.75, 0.0, 1.0]):
        for plan in plans:
            plan.set_sparsity(sparsity)  # the counts the compiled graph reads
        step()
        plans[1].step()
        assert plans[0].check() == plans[1].check()
        assert_models_equal(compiled, eager, f"{scope} s={sparsity}")
        _perturb(compiled, eager, seed=i)


@needs_compile
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_compiled_nm_plan_step_is_one_graph_and_matches_eager(dynamo, device, scope):
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8).to(torch.bfloat16)).to(device)

    compiled, eager = make(), make()
    eager.load_state_dict(compiled.state_dict())
    plans = [gmp_ext.PrunePlan(m, 0.2, scope=scope, nm=(2, 4)) for m in (compiled, eager)]

    def prune() -> None:
        plans[0].step()

    _explain(dynamo, prune)
    plans[1].step()
    step = torch.compile(prune, fullgraph=True)
    for i, sparsity in enumerate([0.2, 0.5, 0.0, 0.35]):
        for plan in plans:
            plan.set_sparsity(sparsity)
        step()
        plans[1].step()
        assert plans[0].check() == plans[1].check()
        assert_models_equal(compiled, eager, f"{scope} s={sparsity}")
        _perturb(compiled, eager, seed=i)
    kept = gmp_ext.masks(compiled)["0.weight"].reshape(-1, 4).sum(1)
    assert int(kept.min()) >= 2


@needs_compile
def test_compiled_plan_step_leaves_masks_of_nan_weights(dynamo):
    model = Small()
    del model.wide
    plan = gmp_ext.PrunePlan(model, 0.5)
    plan.step()
    before = gmp_ext.masks(model)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
        model.conv.weight.add_(1.0)
    torch.compile(plan.step, fullgraph=True)()
    with pytest.raises(ValueError, match="parameter 'fc.weight' \\(1\\)"):
        plan.check()
    assert torch.equal(gmp_ext.masks(model)["fc.weight"], before["fc.weight"])


@needs_compile
def test_compiled_optimizer_step_with_attach_adds_no_break(dynamo):
    from torch._dynamo.utils import counters

    def run(gmp: dict | None):
        dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        twin = copy.deepcopy(model)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
        if gmp is not None:
            for m, optimizer in zip((model, twin), optimizers):
                gmp_ext.prune_step(m, 0.5)
                gmp_ext.attach(m, optimizer, **gmp)
        step = torch.compile(lambda: optimizers[0].step())
        for i in range(2):  # the second step recompiles (momentum buffers now exist)
            for m in (model, twin):
                torch.manual_seed(i)
                m(torch.randn(4, 16)).square().sum().backward()
            step()
            optimizers[1].step()
            if i == 0:
                breaks = dict(counters["graph_break"])
                graphs = counters["stats"]["unique_graphs"]
        return model, twin, breaks, graphs

    _, _, dense_breaks, dense_graphs = run(None)
    # Captured graphs beside the optimizer's: the re-apply after its step (both), the gradient
    # masking before it (mask_gradients), each beyond one of torch.optim's graph_break() calls.
    for gmp, added in (({}, 1), ({"mask_gradients": True}, 2)):
        model, twin, breaks, graphs = run(gmp)
        assert breaks == dense_breaks, gmp  # torch.optim's own graph_break() calls only
        assert graphs == dense_graphs + added, gmp
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p == 0, q == 0), gmp  # compiled SGD may round differently
        assert int((model[0].weight == 0).sum()) == 256
        if gmp:
            assert int((model[0].weight.grad == 0).sum()) >= 256
