"""The warning for gradient accumulation that ``steps_per_epoch`` missed, under torch.compile:
the forward hook does not count in compiled code, the backward count does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo import compiled_autograd

from gmp_ext.training.controller import GMP, GMPWarning
from gmp_ext.training.schedule import GMPSchedule

from .utils import batch

SCHEDULE = GMPSchedule(0.2, 0.9, 1, 8)
ACCUMULATION = "runs {} training forward passes per optimizer step"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def accumulate_steps(model, opt, steps: int, accumulate: int, evals: int = 0) -> None:
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            x, y = batch(step * accumulate + micro, size=2)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        with torch.no_grad():  # evaluation passes in training mode: not counted
            for _ in range(evals):
                model(batch(0, size=2)[0])
        opt.step()


def compiled(backend: str | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return (model if backend is None else torch.compile(model, backend=backend)), opt


BACKENDS = [None, "eager", "aot_eager"]


@pytest.mark.parametrize("accumulate", [2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS, ids=["eager-mode", "eager", "aot_eager"])
def test_accumulation_steps_per_epoch_missed_warns(backend, accumulate):
    model, opt = compiled(backend)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8)
    with pytest.warns(GMPWarning, match=ACCUMULATION.format(accumulate)) as warned:
        accumulate_steps(model, opt, 2, accumulate, evals=2)
    assert f"pass steps_per_epoch={-(-8 // accumulate)}" in str(warned[0].message)
    accumulate_steps(model, opt, 2, accumulate)  # said once
    gmp.remove()


@pytest.mark.parametrize("backend", BACKENDS, ids=["eager-mode", "eager", "aot_eager"])
def test_stated_or_absent_accumulation_is_quiet(backend):
    model, opt = compiled(backend)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2, gradient_accumulation_steps=4)
    accumulate_steps(model, opt, 3, 4)
    gmp.remove()
    model, opt = compiled(backend)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8)
    accumulate_steps(model, opt, 3, 1, evals=3)  # one pass per step, evaluation in between
    model.eval()
    for step in range(2):  # eval-mode forwards with gradients on do not count either
        model(batch(step, size=2)[0])
        opt.step()
    gmp.remove()


@pytest.mark.parametrize("backend", BACKENDS, ids=["eager-mode", "eager", "aot_eager"])
def test_frozen_pruned_weights_are_checked_through_a_trained_parameter(backend):
    model, opt = compiled(backend)
    inner = getattr(model, "_orig_mod", model)
    inner.fc1.weight.requires_grad_(False)  # pruned while frozen, the rest trains
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8, params=["fc1.weight"])
    with pytest.warns(GMPWarning, match=ACCUMULATION.format(3)):
        accumulate_steps(model, opt, 2, 3)
    gmp.remove()


def test_accumulation_under_inductor_warns():
    model, opt = compiled("inductor")
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8)
    with pytest.warns(GMPWarning, match=ACCUMULATION.format(2)):
        accumulate_steps(model, opt, 2, 2)
    gmp.remove()


# Compiled autograd reads .grad of non-leaf tensors while it fakes its inputs.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_autograd_is_not_recompiled_by_the_count():
    # Dynamo traces the backward hook there: a count would guard the graph on its value, and
    # each micro-batch of a step would recompile it. So compiled autograd runs are not checked.
    model, opt = compiled("aot_eager")
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8)
    backward = torch.compile(backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), compiled_autograd._enable(backward):
        accumulate_steps(model, opt, 3, 3)
    gmp.remove()


def test_the_count_is_removed_with_the_controller():
    model, opt = compiled("aot_eager")
    hooks = model._orig_mod.fc1.weight._post_accumulate_grad_hooks
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=8)
    assert hooks is None and len(model._orig_mod.fc1.weight._post_accumulate_grad_hooks) == 1
    gmp.remove()
    assert not model._orig_mod.fc1.weight._post_accumulate_grad_hooks
    accumulate_steps(model, opt, 3, 2)
