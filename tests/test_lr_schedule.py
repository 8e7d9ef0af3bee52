from __future__ import annotations

import pytest
import torch

import gmp_ext
from gmp_ext.lr_schedule import PruningRestarts, pretrained_transformer


def _schedule() -> gmp_ext.GMPSchedule:
    # Updates at epochs 1, 1.5 and 2: steps 4, 6 and 8 with 4 steps per epoch.
    return gmp_ext.GMPSchedule(0.5, 0.9, start_epoch=1, end_epoch=2, update_frequency=0.5)


def test_worked_example() -> None:
    factor = PruningRestarts(_schedule(), steps_per_epoch=4, total_steps=12)
    got = [factor(s) for s in range(14)]
    want = [1, 0.75, 0.5, 0.25, 1, 0.5, 1, 0.5, 1, 0.75, 0.5, 0.25, 0, 0]
    assert got == want


def test_update_at_step_zero_and_last_update_at_total() -> None:
    schedule = gmp_ext.GMPSchedule(0.7, 0.9, start_epoch=0, end_epoch=1, update_frequency=0.5)
    factor = PruningRestarts(schedule, steps_per_epoch=2, total_steps=2)
    assert [factor(s) for s in range(3)] == [1, 1, 0]


def test_peak_rate_right_after_each_cut() -> None:
    """With the controller and LambdaLR, the step after every mask update runs at the peak."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = gmp_ext.GMP(model, opt, _schedule(), steps_per_epoch=4)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, PruningRestarts(_schedule(), 4, 12))
    cut_after, rates = [], []
    for step in range(1, 13):
        rates.append(opt.param_groups[0]["lr"])
        before = len(gmp.history)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        lrs.step()
        if len(gmp.history) > before:
            cut_after.append(step)
    assert cut_after == [4, 6, 8]
    assert [rates[s] for s in cut_after] == [0.1, 0.1, 0.1]  # rates[s] is step s + 1's rate
    assert rates[0] == 0.1 and rates[3] == pytest.approx(0.025)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive integer, got 0"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch must be a positive integer, got 2.5"),
        ({"steps_per_epoch": True}, "steps_per_epoch must be a positive integer, got True"),
        ({"total_steps": -1}, "total_steps must be a positive integer, got -1"),
        ({"total_steps": 7}, r"total_steps must be >= the last pruning update \(step 8"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"steps_per_epoch": 4, "total_steps": 12, **kwargs}
    with pytest.raises(ValueError, match=message):
        PruningRestarts(_schedule(), **args)  # type: ignore[arg-type]


def test_schedule_type() -> None:
    with pytest.raises(TypeError, match="schedule must be a GMPSchedule, got dict"):
        PruningRestarts({}, 4, 12)  # type: ignore[arg-type]


def test_pretrained_transformer_recipe_is_the_measured_schedule() -> None:
    """The preset builds what examples/transformer/spam_minilm.py measured as
    ``gmp_large_first_rewarm --init 0.7 --end 0.25`` (2 epochs of 128 steps)."""
    recipe = pretrained_transformer(0.9, 2.0, 128)
    measured = gmp_ext.GMPSchedule(0.7, 0.9, 0.0, 2.0 * 0.25, 2.0 / 16)
    assert recipe.schedule == measured
    factor = PruningRestarts(measured, 128, 256)
    assert [recipe.lr_lambda(s) for s in range(260)] == [factor(s) for s in range(260)]
    assert recipe.lr_lambda.bounds == [0, 16, 32, 48, 64, 256]
    # A target at or below the first step: one cut at epoch 0, re-selected at every update.
    assert pretrained_transformer(0.5, 2.0, 128).schedule.init_sparsity == 0.5


def test_pretrained_transformer_recipe_drives_a_run_to_the_target() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule, lr_lambda = pretrained_transformer(0.8, total_epochs=4, steps_per_epoch=8)
    gmp = gmp_ext.GMP(model, opt, schedule, steps_per_epoch=8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for _ in range(32):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    assert gmp.history[0]["step"] == 0 and gmp.history[0]["target"] == pytest.approx(0.7)
    assert gmp.history[-1]["target"] == pytest.approx(0.8)
    zeros = sum(int((m.weight == 0).sum()) for m in model)
    assert zeros == sum(round(0.8 * m.weight.numel()) for m in model)
    assert scheduler.get_last_lr()[0] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"sparsity": 0.0}, "sparsity must be in"),
        ({"first_step": 1.5}, "first_step must be in"),
        ({"total_epochs": 0}, "total_epochs must be > 0"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch must be a positive integer"),
        ({"steps_per_epoch": 0}, "must be >= 16 optimizer steps"),
        ({"total_epochs": 1, "steps_per_epoch": 8}, r"got 1 x 8"),
    ],
)
def test_pretrained_transformer_recipe_rejects_bad_arguments(kwargs, match) -> None:
    args = {"sparsity": 0.9, "total_epochs": 2.0, "steps_per_epoch": 128, **kwargs}
    with pytest.raises(ValueError, match=match):
        pretrained_transformer(**args)
