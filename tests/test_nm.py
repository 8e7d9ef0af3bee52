"""N:M selection: kernels against the reference and a brute-force oracle, the model API
(prune_step, PrunePlan, GMP with nm=), its errors, and the gradual ramp to an exact n:m."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gmp_ext
from gmp_ext.kernels import backends
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, key_space_for
from gmp_ext.pruning.strategies import NMSelection, check_nm

from .conftest import native_backend
from .utils import DTYPE_IDS, DTYPES, KINDS, assert_same, nm_oracle_keep, weights

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 8), (4, 8), (5, 16), (16, 32)]


def run_nm(backend, tensors, pattern, scope, counts, key_space=KEY_SPACE_NATIVE):
    """gather -> select over the lists -> build, on one backend; (lists, rows, masks)."""
    n, m = pattern
    masks = [gmp_ext.kernels.primitives.new_mask(t) for t in tensors]
    job = backend.prepare(tensors, masks, None, key_space)
    lists = [t.new_empty(t.numel() // m * (m - n)) for t in tensors]
    selection = backend.prepare(lists, None, scope, key_space)
    selection.set_counts(counts)
    backend.nm_gather(job, selection, pattern)
    backend.select(selection)
    backend.nm_build(job, selection.rows, pattern)
    return lists, selection.rows, masks


def oracle_keep(tensor: torch.Tensor, pattern: tuple[int, int], k: int) -> torch.Tensor:
    """The contract's keep flags by magnitude (flat): ranked by (|w|, index)."""
    return nm_oracle_keep(tensor.detach().double().abs().reshape(-1), *pattern, k)


def keep_of(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    return gmp_ext.kernels.ops.unpack_mask(mask.cpu(), (tensor.numel(),))


# -- kernels -------------------------------------------------------------------------------


# Every data kind and dtype for 2:4; the other patterns on the kinds that stress ranking.
KERNEL_CASES = [((2, 4), dtype, kind) for dtype in DTYPES for kind in KINDS] + [
    (pattern, dtype, kind)
    for pattern in PATTERNS
    if pattern != (2, 4)
    for dtype, kind in [
        (torch.float32, "normal"),
        (torch.bfloat16, "few_values"),
        (torch.float16, "specials"),
    ]
]


@pytest.mark.parametrize(
    ("pattern", "dtype", "kind"),
    KERNEL_CASES,
    ids=[f"{p[0]}:{p[1]}-{str(d)[6:]}-{k}" for p, d, k in KERNEL_CASES],
)
def test_native_equals_reference_layerwise(device, pattern, dtype, kind):
    native = native_backend(device)
    n, m = pattern
    # 0 and one group; sizes crossing the CUDA (2048) and CPU (65536) tiles.
    sizes = [0, m, 32 * 33, 2048 + 3 * 32, 65536 + 5 * 32]
    tensors = [weights(size, dtype, device, kind) for size in sizes]
    limit = 1 - n / m
    for sparsity in (0.0, 0.3 * limit, limit):
        counts = [round(sparsity * t.numel()) for t in tensors]
        lists, rows, masks = run_nm(native, tensors, pattern, "layer", counts)
        ref_lists, ref_rows, ref_masks = run_nm(
            backends.REFERENCE, tensors, pattern, "layer", counts
        )
        assert_same(rows.cpu(), ref_rows.cpu(), f"rows at {sparsity}")
        for i, t in enumerate(tensors):
            assert_same(lists[i], ref_lists[i], f"list of tensor {i}")
            assert_same(masks[i], ref_masks[i], f"mask of tensor {i} at {sparsity}")
            assert int((~keep_of(masks[i], t)).sum()) == counts[i]


@pytest.mark.parametrize("pattern", [(2, 4), (1, 8)], ids=["2:4", "1:8"])
def test_native_equals_reference_global_mixed_dtypes(device, pattern):
    native = native_backend(device)
    n, m = pattern
    tensors = [
        weights(4096, torch.float32, device, "normal"),
        weights(0, torch.bfloat16, device),
        weights(2048 + 64, torch.bfloat16, device, "few_values"),
        weights(65536 + 8 * 9, torch.float16, device, "pruned"),
    ]
    key_space = key_space_for({t.dtype for t in tensors})
    total = sum(t.numel() for t in tensors)
    for sparsity in (0.2, 1 - n / m):
        k = round(sparsity * total)
        _, rows, masks = run_nm(native, tensors, pattern, "global", [k], key_space)
        _, ref_rows, ref_masks = run_nm(
            backends.REFERENCE, tensors, pattern, "global", [k], key_space
        )
        assert_same(rows.cpu(), ref_rows.cpu(), "rows")
        for i in range(len(tensors)):
            assert_same(masks[i], ref_masks[i], f"mask {i}")
        assert sum(int((~keep_of(mk, t)).sum()) for mk, t in zip(masks, tensors)) == k


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_brute_force_oracle(device, dtype, kind):
    native = native_backend(device)
    for pattern in [(2, 4), (1, 4), (3, 8)]:
        tensor = weights(8 * 37, dtype, device, kind)
        n, m = pattern
        for k in (0, 1, 17, tensor.numel() // m * (m - n)):
            _, _, masks = run_nm(native, [tensor], pattern, "layer", [k])
            assert_same(
                keep_of(masks[0], tensor), oracle_keep(tensor, pattern, k), f"{pattern} k={k}"
            )


def test_nan_lists_a_nan_per_group_and_voids_the_selection(device):
    native = native_backend(device)
    tensor = weights(64, torch.float32, device)
    tensor[5] = float("nan")  # protected (NaN ranks highest), yet the list must show it
    for backend in (native, backends.REFERENCE):
        lists, rows, masks = run_nm(backend, [tensor], (2, 4), "layer", [8])
        assert torch.isnan(lists[0]).sum() == 1 and torch.isnan(lists[0][2])  # group 1, slot 0
        assert int(rows[0, 3]) > 0
        assert not masks[0].any()  # a NaN row leaves the (fresh, zero) mask as it was


# -- model API -----------------------------------------------------------------------------


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 4)
    )


def groups_of(param: torch.Tensor, m: int) -> torch.Tensor:
    """Groups of m along the input channels: of a Conv weight [out, in, *kernel], at each
    kernel position."""
    param = param.detach()
    if param.dim() > 2:
        param = param.movedim(1, -1)
    return param.reshape(-1, m)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)], ids=["2:4", "1:4", "4:8"])
def test_prune_step_ramps_to_exact_nm(scope, pattern):
    n, m = pattern
    net = model()
    params = {k: p for k, p in net.named_parameters() if k.endswith("weight")}
    total = sum(p.numel() for p in params.values())
    limit = 1 - n / m
    previous = None
    for sparsity in (0.1 * limit, 0.5 * limit, limit):
        gmp_ext.prune_step(net, sparsity, nm=pattern, scope=scope)
        masks = gmp_ext.masks(net)
        pruned = {k: int((~mk).sum()) for k, mk in masks.items()}
        if scope == "layer":
            assert pruned == {k: round(sparsity * p.numel()) for k, p in params.items()}
        else:
            assert sum(pruned.values()) == round(sparsity * total)
        for name, keep in masks.items():
            kept_per_group = groups_of(keep, m).sum(1)
            assert int(kept_per_group.min()) >= n, name  # no group loses more than m - n
            assert torch.equal(groups_of(params[name], m) != 0, groups_of(keep, m))
        if previous is not None:  # a gradual ramp on fixed weights only adds pruned weights
            assert all(bool((masks[k] <= previous[k]).all()) for k in masks)
        previous = masks
    for name, keep in previous.items():
        assert bool((groups_of(keep, m).sum(1) == n).all()), f"{name} is not exactly {n}:{m}"


def test_channels_last_conv_groups_follow_the_logical_rows():
    net = model()
    reference = model()
    reference.load_state_dict(net.state_dict())
    net[0].weight.data = net[0].weight.data.to(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    gmp_ext.prune_step(net, 0.5, nm=(2, 4))
    gmp_ext.prune_step(reference, 0.5, nm=(2, 4))
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    assert net[0].weight.stride() != reference[0].weight.stride()


def test_prune_plan_equals_prune_step():
    net, twin = model(), model()
    twin.load_state_dict(net.state_dict())
    # The conv's reduction dimension (input channels) is not its last: prune_step only.
    plan = gmp_ext.PrunePlan(net, 0.25, nm=(2, 4), exclude="0")
    for sparsity in (0.25, 0.5):
        plan.set_sparsity(sparsity)
        plan.step()
        achieved = plan.check()
        assert achieved == gmp_ext.prune_step(twin, sparsity, nm=(2, 4), exclude="0")
        for a, b in zip(net.parameters(), twin.parameters()):
            assert torch.equal(a, b)


def test_prune_plan_refuses_nm_across_a_transposed_layout():
    net = model()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(NotImplementedError, match=r"'0.weight' \(dimension 1 of \(8, 8, 3, 3\)\)"):
        gmp_ext.PrunePlan(net, 0.5, nm=(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert gmp_ext.masks(net) == {}


def test_nan_weights_raise_naming_the_parameter_and_modify_nothing():
    net = model()
    net[3].weight.data[2, 5] = float("nan")
    net[3].weight.data[7, 1] = float("nan")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"parameter '3.weight' has 2 NaN"):
        gmp_ext.prune_step(net, 0.5, nm=(2, 4))
    for k, v in net.state_dict().items():
        assert_same(v, before[k], k)  # bit patterns: NaN == NaN
    assert gmp_ext.masks(net) == {}
    plan = gmp_ext.PrunePlan(net, 0.5, nm=(2, 4), exclude="0")
    plan.step()
    with pytest.raises(ValueError, match=r"parameter '3.weight' \(2\)"):
        plan.check()


@pytest.mark.parametrize(
    "nm", [(2, 3), (0, 4), (4, 4), (2, 64), (2.0, 4), "2:4", (2, 4, 8), (True, 4)]
)
def test_bad_nm_is_a_clear_error(nm):
    net = model()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="nm"):
        gmp_ext.prune_step(net, 0.5, nm=nm)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_sparsity_above_the_pattern_limit_is_an_error():
    net = model()
    with pytest.raises(ValueError, match=r"above 1 - n/m = 0.5 of the 2:4 pattern"):
        gmp_ext.prune_step(net, 0.6, nm=(2, 4))
    assert gmp_ext.masks(net) == {}
    with pytest.raises(ValueError, match=r"above 1 - n/m = 0.75"):
        gmp_ext.prune_step(net, 0.8, nm=(1, 4), scope="global")


def test_rows_not_divisible_by_m_name_the_parameter():
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"parameter '0.weight' of shape \(4, 6\).*exclude"):
        gmp_ext.prune_step(net, 0.5, nm=(2, 4))
    gmp_ext.prune_step(net, 0.5, nm=(2, 4), exclude=["0.weight"])
    assert list(gmp_ext.masks(net)) == ["1.weight"]
    bias = nn.Linear(4, 8)
    with pytest.raises(ValueError, match=r"parameter 'bias' of shape \(8,\)"):
        gmp_ext.prune_step(bias, 0.5, nm=(2, 4), params=["bias"])


def test_nm_with_a_selection_object_is_ambiguous():
    with pytest.raises(ValueError, match="not both"):
        gmp_ext.prune_step(model(), 0.5, nm=(2, 4), scope=NMSelection(2, 4))
    assert check_nm([2, 4]) == (2, 4)


def test_empty_tensor_and_one_group():
    net = nn.Linear(4, 1)
    gmp_ext.prune_step(net, 0.5, nm=(2, 4))
    assert int((net.weight == 0).sum()) == 2
    empty = nn.Module()
    empty.weight = nn.Parameter(torch.empty(0, 8))
    assert gmp_ext.prune_step(empty, 0.5, nm=(2, 4), params=["weight"]) == {"weight": 0.0}


# -- the GMP controller --------------------------------------------------------------------


def test_gmp_run_ramps_gradually_to_exact_two_four():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    schedule = gmp_ext.GMPSchedule(
        init_sparsity=0.05, final_sparsity=0.5, start_epoch=0, end_epoch=4, update_frequency=1
    )
    gmp = gmp_ext.GMP(net, optimizer, schedule, steps_per_epoch=2, nm=(2, 4))
    for step in range(12):
        x = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(step))
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    targets = [record["target"] for record in gmp.history]
    assert targets == sorted(targets) and len(set(targets)) >= 4  # a ramp, not one step
    assert targets[0] == pytest.approx(0.05) and targets[-1] == 0.5
    for name, keep in gmp_ext.masks(net).items():
        assert bool((groups_of(keep, 4).sum(1) == 2).all()), name
    for name, p in net.named_parameters():
        if name.endswith("weight"):
            assert bool(((groups_of(p, 4) != 0).sum(1) <= 2).all()), name
    state = gmp.state_dict()
    assert state["config"]["nm"] == [2, 4]
    resumed_net = model()
    resumed = gmp_ext.GMP(
        resumed_net,
        torch.optim.SGD(resumed_net.parameters(), lr=0.01),
        schedule,
        steps_per_epoch=2,
    )
    with pytest.raises(ValueError, match="nm"):
        resumed.load_state_dict(state)


def test_gmp_rejects_a_schedule_beyond_the_pattern():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    schedule = gmp_ext.GMPSchedule(
        init_sparsity=0.05, final_sparsity=0.6, start_epoch=0, end_epoch=3
    )
    with pytest.raises(ValueError, match=r"final_sparsity 0.6, above 1 - n/m = 0.5 of nm=\(2, 4\)"):
        gmp_ext.GMP(net, optimizer, schedule, steps_per_epoch=1, nm=(2, 4))
    with pytest.raises(ValueError, match="max_sparsity does not combine"):
        gmp_ext.GMP(
            net,
            optimizer,
            gmp_ext.GMPSchedule(init_sparsity=0.05, final_sparsity=0.5, start_epoch=0, end_epoch=3),
            steps_per_epoch=1,
            scope="global",
            nm=(2, 4),
            max_sparsity={"3.weight": 0.4},
        )
    assert gmp_ext.masks(net) == {}


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(0, 9),
    groups=st.integers(1, 6),
    fraction=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_properties_of_an_nm_prune_step(pattern, rows, groups, fraction, dtype, kind, seed):
    torch.manual_seed(seed)
    n, m = pattern
    weight = weights(rows * groups * m, dtype, kind=kind).reshape(rows, groups * m)
    layer = nn.Module()
    layer.weight = nn.Parameter(weight)
    sparsity = fraction * (1 - n / m)
    gmp_ext.prune_step(layer, sparsity, nm=pattern, params=["weight"])
    keep = gmp_ext.masks(layer)["weight"]
    assert int((~keep).sum()) == round(sparsity * weight.numel())
    assert torch.equal(
        keep.reshape(-1), oracle_keep(weight, pattern, round(sparsity * weight.numel()))
    )
    if rows:
        assert int(groups_of(keep, m).sum(1).min()) >= n
