"""PrunePlan: the prepared prune step, against prune_step on copies of the same model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import PrunePlan

from .utils import assert_models_equal, assert_same, weights


class Mixed(nn.Module):
    """Layers of three dtypes and awkward sizes, one conv in channels_last (non-contiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3)
        self.small = nn.Linear(5, 1)
        self.big = nn.Linear(301, 67)
        self.half = nn.Linear(33, 17).to(torch.bfloat16)
        self.fp16 = nn.Linear(9, 130).to(torch.float16)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        with torch.no_grad():  # heavy ties, the case the tie-break decides
            self.big.weight.copy_(
                weights(self.big.weight.numel(), torch.float32, kind="few_values").view(67, 301)
            )


def _pair(device: torch.device, dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module]:
    model = Mixed().to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model, copy.deepcopy(model)


def _perturb(*models: nn.Module, seed: int) -> None:
    """The same update to every model: pruned weights become non-zero, as after a step."""
    for model in models:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_steps_equal_prune_step(device, scope):
    planned, stepped = _pair(device)
    plan = PrunePlan(planned, 0.3, scope=scope)
    for i, sparsity in enumerate([0.3, 0.6, 0.6, 0.95, 0.0, 1.0]):
        plan.set_sparsity(sparsity)
        plan.step()
        summary = plan.check()
        want = gmp_ext.prune_step(stepped, sparsity, scope=scope)
        assert summary == want
        assert_models_equal(planned, stepped, f"{scope} s={sparsity}")
        _perturb(planned, stepped, seed=i)


def test_per_layer_sparsity_dict(device):
    planned, stepped = _pair(device)
    names = gmp_ext.select_parameters(planned)
    targets = {name: (i + 1) / (len(names) + 1) for i, name in enumerate(names)}
    plan = PrunePlan(planned, targets)
    assert plan.counts == {
        n: round(s * p.numel()) for (n, p), s in zip(names.items(), targets.values())
    }
    plan.step()
    assert plan.check() == gmp_ext.prune_step(stepped, targets)
    assert_models_equal(planned, stepped, "dict")


def test_float64_parameters_run_on_the_reference(device):
    planned, stepped = _pair(device, torch.float64)
    plan = PrunePlan(planned, 0.7, scope="global")
    plan.step()
    assert plan.check() == gmp_ext.prune_step(stepped, 0.7, scope="global")
    assert_models_equal(planned, stepped, "float64")


def test_masks_are_the_stores_and_attach_keeps_them(device):
    model = Mixed().to(device)
    gmp_ext.prune_step(model, 0.5)
    before = gmp_ext.masks(model)
    plan = PrunePlan(model, 0.5)
    # Existing masks are kept until the first step: re-applying them changes nothing.
    assert all(torch.equal(before[n], m) for n, m in gmp_ext.masks(model).items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gmp_ext.attach(model, optimizer)
    plan.set_sparsity(0.8)
    plan.step()
    plan.check()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # every weight moves; the hook re-zeroes the plan's masks
    params = dict(model.named_parameters())
    for name, keep in gmp_ext.masks(model).items():
        assert int((~keep).sum()) == round(0.8 * keep.numel()), name
        assert bool((params[name][~keep] == 0).all()), name


def test_new_parameters_start_with_every_weight_kept(device):
    model = Mixed().to(device)
    plan = PrunePlan(model, 0.5)
    assert all(bool(keep.all()) for keep in gmp_ext.masks(model).values())
    assert plan.names == list(gmp_ext.select_parameters(model))


def test_nan_weights_leave_masks_unchanged_and_check_names_them(device):
    model = Mixed().to(device)
    plan = PrunePlan(model, 0.5)
    plan.step()
    plan.check()
    before = gmp_ext.masks(model)
    with torch.no_grad():
        model.big.weight[3, 4] = float("nan")
        model.big.weight[5, 6] = float("nan")
    plan.set_sparsity(0.9)
    plan.step()
    with pytest.raises(ValueError, match=r"parameter 'big.weight' \(2\)") as error:
        plan.check()
    assert "conv.weight" not in str(error.value)
    after = gmp_ext.masks(model)
    assert torch.equal(after["big.weight"], before["big.weight"])
    for name in ("conv.weight", "small.weight", "half.weight"):  # the others moved on
        assert int((~after[name]).sum()) == round(0.9 * after[name].numel()), name


def test_global_nan_leaves_every_mask_unchanged(device):
    model = Mixed().to(device)
    plan = PrunePlan(model, 0.5, scope="global")
    plan.step()
    before = gmp_ext.masks(model)
    with torch.no_grad():
        model.small.weight[0, 0] = float("nan")
    plan.set_sparsity(0.9)
    plan.step()
    with pytest.raises(ValueError, match=r"1 NaN weights among .*every mask as before"):
        plan.check()
    for name, keep in gmp_ext.masks(model).items():
        assert torch.equal(keep, before[name]), name


def test_storage_moved_by_half_gets_new_tables(device):
    planned, stepped = _pair(device)
    plan = PrunePlan(planned, 0.4)
    plan.step()
    gmp_ext.prune_step(stepped, 0.4)
    planned.half()
    stepped.half()
    _perturb(planned, stepped, seed=3)
    plan.step()
    assert plan.check() == gmp_ext.prune_step(stepped, 0.4)
    assert_models_equal(planned, stepped, "after .half()")


@pytest.mark.parametrize(
    ("sparsity", "scope", "error", "match"),
    [
        (1.5, "layer", ValueError, r"sparsity must be a finite number in \[0, 1\], got 1.5"),
        ({"nope.weight": 0.5}, "layer", ValueError, r"names no parameter .*\['nope.weight'\]"),
        ({"big.weight": 0.5}, "global", ValueError, "needs scope='layer'"),
        (0.5, "rows", ValueError, "scope must be 'layer', 'global' or a Selection, got 'rows'"),
    ],
)
def test_bad_arguments_name_the_value_and_change_nothing(sparsity, scope, error, match):
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        PrunePlan(model, sparsity, scope=scope)
    assert gmp_ext.masks(model) == {}
    for name, value in model.state_dict().items():
        assert_same(value, before[name], name)


def test_set_sparsity_rejects_bad_values_and_keeps_the_counts():
    model = Mixed()
    plan = PrunePlan(model, 0.5)
    counts = plan.counts
    for bad, match in [
        (float("nan"), "got nan"),
        ({"nope": 0.1}, "not in the plan"),
        ({**dict.fromkeys(plan.names, 0.1), "big.weight": -1}, r"sparsity\['big.weight'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            plan.set_sparsity(bad)
        assert plan.counts == counts


def test_step_takes_the_masks_back_after_prune_step_replaced_them(device):
    planned, stepped = _pair(device)
    plan = PrunePlan(planned, 0.5)
    gmp_ext.prune_step(planned, 0.2)  # new mask tensors in the store
    gmp_ext.prune_step(stepped, 0.2)
    _perturb(planned, stepped, seed=1)
    plan.step()
    assert plan.check() == gmp_ext.prune_step(stepped, 0.5)
    assert_models_equal(planned, stepped, "after prune_step")
    gmp_ext.apply_masks(planned)  # the store applies the plan's masks
    assert_models_equal(planned, stepped, "after apply_masks")


def test_a_plan_that_cannot_be_prepared_registers_no_masks(monkeypatch):
    model = Mixed()
    monkeypatch.setenv("GMP_EXT_BACKEND", "cuda")  # no backend for the CPU parameters
    with pytest.raises(RuntimeError, match="GMP_EXT_BACKEND=cuda cannot run tensors on device cpu"):
        PrunePlan(model, 0.5)
    assert gmp_ext.masks(model) == {}
