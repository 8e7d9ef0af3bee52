"""Masks follow the model: parameters the model replaced, submodules of a pruned model, one
controller and one set of hooks per model and optimizer."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import GMP, GMPSchedule, GMPWarning


def model_and_dense() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def overwrite_on_conversion():
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def replace_by_assign(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(dense, assign=True)


def replace_by_conversion(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(dense)
    with overwrite_on_conversion():
        model.to(torch.bfloat16)


def replace_by_setattr(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    model[0].weight = nn.Parameter(dense["0.weight"].clone())
    model[2].weight = nn.Parameter(dense["2.weight"].clone())


REPLACEMENTS = [replace_by_assign, replace_by_conversion, replace_by_setattr]


def zero_fraction(model: nn.Module) -> dict[str, float]:
    return {
        n: float((model.get_parameter(n) == 0).float().mean()) for n in ("0.weight", "2.weight")
    }


@pytest.mark.parametrize("replace", REPLACEMENTS)
def test_replaced_parameters_apply_masks_report_and_masks(replace):
    model, dense = model_and_dense()
    gmp_ext.prune_step(model, 0.5)
    kept = gmp_ext.masks(model)
    replace(model, dense)
    assert zero_fraction(model) == {"0.weight": 0.0, "2.weight": 0.0}  # dense again
    gmp_ext.apply_masks(model)
    assert zero_fraction(model) == {"0.weight": 0.5, "2.weight": 0.5}
    assert gmp_ext.sparsity_report(model).sparsity == 0.5
    for name, keep in gmp_ext.masks(model).items():
        assert torch.equal(keep, kept[name]) and torch.equal(keep, model.get_parameter(name) != 0)


@pytest.mark.parametrize("replace", REPLACEMENTS)
def test_replaced_parameters_attach_and_optimizer_state(replace):
    model, dense = model_and_dense()
    gmp_ext.prune_step(model, 0.5)
    replace(model, dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built on the new ones
    gmp_ext.attach(model, opt, mask_gradients=True)
    model(torch.randn(8, 16, dtype=model[0].weight.dtype)).sum().backward()
    opt.step()
    assert zero_fraction(model) == {"0.weight": 0.5, "2.weight": 0.5}
    assert gmp_ext.zero_pruned_state(model, opt) == 2


def test_replaced_parameters_in_the_controller_and_its_checkpoint():
    model, dense = model_and_dense()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gmp = GMP(model, opt, GMPSchedule(0.25, 0.5, 0, 2), steps_per_epoch=1)
    replace_by_assign(model, dense)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()  # epoch 1: an update on the weights the model now holds
    assert zero_fraction(model) == {"0.weight": 0.46875, "2.weight": 0.46875}
    assert gmp.history[-1]["layers"]["0.weight"]["achieved"] == 0.46875
    state = gmp.state_dict()
    assert state["shapes"] == {"0.weight": [32, 16], "2.weight": [4, 32]}
    replace_by_setattr(model, dense)
    gmp.load_state_dict(state)
    assert zero_fraction(model) == {"0.weight": 0.46875, "2.weight": 0.46875}
    gmp.remove()


def test_replaced_parameters_in_a_prune_plan():
    model, dense = model_and_dense()
    plan = gmp_ext.PrunePlan(model, 0.5)
    plan.step()
    replace_by_assign(model, dense)
    plan.step()
    assert zero_fraction(model) == {"0.weight": 0.5, "2.weight": 0.5}
    assert plan.check() == {"0.weight": 0.5, "2.weight": 0.5}


def test_parameter_of_another_shape_or_gone_is_a_clear_error():
    model, _ = model_and_dense()
    gmp_ext.prune_step(model, 0.5)
    model[2].weight = nn.Parameter(torch.ones(4, 8))
    for call in (gmp_ext.apply_masks, gmp_ext.masks, gmp_ext.sparsity_report):
        with pytest.raises(ValueError, match=r"'2.weight' was replaced by one of shape \[4, 8\]"):
            call(model)
    assert int((model[2].weight == 0).sum()) == 0 and int((model[0].weight == 0).sum()) == 256
    del model[2]
    with pytest.raises(ValueError, match="no longer has the parameter '2.weight'"):
        gmp_ext.apply_masks(model)
    gmp_ext.remove(model)
    assert gmp_ext.masks(model) == {}


def test_submodule_named_like_a_method():
    model = nn.Module()
    model.half = nn.Linear(8, 8)  # `model.half` is nn.Module.half: getattr finds the method
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.apply_masks(model)
    assert set(gmp_ext.masks(model)) == {"half.weight"}


# -- submodules of a pruned model --------------------------------------------------------------


def nested() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 2))


def test_submodule_of_a_pruned_model_reads_its_own_masks():
    model = nested()
    gmp_ext.prune_step(model, 0.5)
    encoder = model[0]
    assert set(gmp_ext.masks(encoder)) == {"0.weight", "1.weight"}
    assert torch.equal(gmp_ext.masks(encoder)["1.weight"], gmp_ext.masks(model)["0.1.weight"])
    assert [row.name for row in gmp_ext.sparsity_report(encoder).rows] == ["0.weight", "1.weight"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gmp_ext.apply_masks(encoder)  # its own parameters only
    assert int((encoder[0].weight == 0).sum()) == 32 and int((model[1].weight == 0).sum()) == 0
    model[0][0].weight.grad = torch.ones(8, 8)
    assert gmp_ext.zero_pruned_grads(encoder) == 1
    assert int((model[0][0].weight.grad == 0).sum()) == 32


def test_pruning_inside_or_around_a_pruned_model_is_refused():
    model = nested()
    gmp_ext.prune_step(model, 0.5)
    with pytest.raises(ValueError, match="this module is '0' of a model whose masks gmp_ext holds"):
        gmp_ext.prune_step(model[0], 0.7)
    outer = nn.Sequential(model)
    with pytest.raises(ValueError, match=r"submodule '0' of this model already holds .*remove"):
        gmp_ext.prune_step(outer, 0.7)
    assert gmp_ext.sparsity_report(model).sparsity == 0.5


# -- one controller, one set of hooks ----------------------------------------------------------


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, 16)).sum().backward()
    opt.step()


def test_a_second_controller_replaces_the_first():
    model, _ = model_and_dense()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1)
    step(model, opt)
    with pytest.warns(GMPWarning, match=r"already had a GMP controller \(at step 1, target 0.5\)"):
        second = GMP(model, opt, GMPSchedule(0.5, 0.75, 1, 2), steps_per_epoch=1)
    assert len(opt._optimizer_step_post_hooks) == 1
    step(model, opt)
    step(model, opt)
    assert first.step_count == 1 and second.step_count == 2
    assert zero_fraction(model) == {"0.weight": 0.75, "2.weight": 0.75}


def test_attach_twice_keeps_one_set_of_hooks():
    model, _ = model_and_dense()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.attach(model, opt)
    handle = gmp_ext.attach(model, opt, mask_gradients=True)
    assert len(opt._optimizer_step_post_hooks) == 1 and len(opt._optimizer_step_pre_hooks) == 1
    other = torch.optim.SGD(model.parameters(), lr=0.01)
    gmp_ext.attach(model, other)  # another optimizer: its own hooks
    assert len(other._optimizer_step_post_hooks) == 1
    handle.remove()
    assert not opt._optimizer_step_post_hooks


def test_attach_beside_a_controller_is_refused_and_the_controller_takes_over_attach():
    model, _ = model_and_dense()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.attach(model, opt)
    gmp = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1)
    assert len(opt._optimizer_step_post_hooks) == 1  # the controller's alone
    with pytest.raises(ValueError, match="a GMP controller already re-applies"):
        gmp_ext.attach(model, opt)
    gmp.remove()
