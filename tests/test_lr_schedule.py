from __future__ import annotations

import io

import pytest
import torch

import gmp_ext
from gmp_ext.training.lr_schedule import (
    PruningRestarts,
    RunSchedule,
    TransformerRecipe,
    pretrained_transformer,
    pruning_steps,
)


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
    assert recipe.schedule.state_dict() == measured.state_dict()
    assert recipe.steps_per_epoch == recipe.schedule.steps_per_epoch == 128
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
        ({"total_epochs": 0}, "total_epochs must be a finite number > 0, got 0"),
        ({"total_epochs": float("inf")}, "total_epochs must be a finite number > 0, got inf"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch must be a positive integer, got 2.5"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive integer, got 0"),
        ({"steps_per_epoch": None}, r"total_epochs=2.0 needs steps_per_epoch"),
        (
            {"total_epochs": 1, "steps_per_epoch": 8},
            r"total_epochs x steps_per_epoch \(1 x 8\) must be >= 16 optimizer steps .*got 8",
        ),
        ({"total_steps": 64}, "exactly one; got total_epochs=2.0, total_steps=64"),
        ({"total_epochs": None}, "exactly one; got total_epochs=None, total_steps=None"),
        ({"total_epochs": None, "total_steps": 0}, "total_steps must be a positive integer, got 0"),
        ({"total_epochs": None, "total_steps": 16.0}, "total_steps must be a positive integer"),
        ({"total_epochs": None, "total_steps": True}, "total_steps must be a positive integer"),
        (
            {"total_epochs": None, "total_steps": 15},
            r"total_steps \(15\) must be >= 16 optimizer steps",
        ),
    ],
)
def test_pretrained_transformer_recipe_rejects_bad_arguments(kwargs, match) -> None:
    args = {"sparsity": 0.9, "total_epochs": 2.0, "steps_per_epoch": 128, **kwargs}
    with pytest.raises(ValueError, match=match):
        pretrained_transformer(**args)


# -- the restarts land on the controller's cuts ------------------------------------------------


def drive(
    schedule: gmp_ext.GMPSchedule, steps_per_epoch: int, lr_lambda: PruningRestarts, steps: int
) -> tuple[list[int], list[float]]:
    """A real GMP controller, optimizer and LambdaLR over a tiny model for ``steps`` optimizer
    steps: the steps after which the controller pruned, and the rate each step ran at
    (``rates[s]`` is step ``s + 1``'s; the peak is 0.5). No gradients: SGD leaves the weights
    alone, the step hooks run as in training."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gmp = gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [record["step"] for record in gmp.history], rates


def run_recipe(recipe: TransformerRecipe) -> tuple[list[int], list[float]]:
    return drive(recipe.schedule, recipe.steps_per_epoch, recipe.lr_lambda, recipe.total_steps)


@pytest.mark.parametrize("steps_per_epoch", [None, 7])
def test_pretrained_transformer_restarts_are_the_controllers_cuts(steps_per_epoch) -> None:
    """For every run length, the step right after each cut runs at exactly the peak rate and no
    other step does. A run of 100 steps cuts after steps 0, 7, 13, 19 and 25; rounding the
    update points (6.25, 12.5, 18.75) put restarts at 6, 12, 19 instead."""
    for total in range(17, 201):
        recipe = pretrained_transformer(0.9, total_steps=total, steps_per_epoch=steps_per_epoch)
        cuts, rates = run_recipe(recipe)
        assert len(cuts) == 5, total
        assert [s for s in range(total) if rates[s] == 0.5] == cuts, total
        assert recipe.lr_lambda.bounds == [*cuts, total], total
        if total == 100:
            assert cuts == [0, 7, 13, 19, 25]


@pytest.mark.parametrize("steps_per_epoch", [3, 10, 11])
def test_pretrained_transformer_in_epochs_restarts_are_the_controllers_cuts(steps_per_epoch):
    for tenths in range(55, 200, 6):  # 5.5 to 19.9 epochs, 16 to 219 steps
        recipe = pretrained_transformer(0.8, tenths / 10, steps_per_epoch)
        cuts, rates = run_recipe(recipe)
        assert recipe.total_steps == round(tenths / 10 * steps_per_epoch)
        assert [s for s in range(recipe.total_steps) if rates[s] == 0.5] == cuts, tenths


@pytest.mark.parametrize(
    ("schedule", "steps_per_epoch"),
    [
        (gmp_ext.GMPSchedule(0.1, 0.9, 0.35, 2.1, 0.3), 7),
        (gmp_ext.GMPSchedule(0.0, 0.8, 1.0, 3.0, 1 / 3), 10),
        (gmp_ext.GMPSchedule(0.2, 0.6, 0.0, 1.0, 0.1), 3),  # several update points per step
        (gmp_ext.GMPSchedule(0.5, 0.9, 2.5, 9.5, 1.0, "exponential"), 1),
    ],
)
def test_restarts_are_the_controllers_cuts_for_any_schedule(schedule, steps_per_epoch) -> None:
    total = int(schedule.end_epoch * steps_per_epoch) + 5
    cuts, rates = drive(
        schedule, steps_per_epoch, PruningRestarts(schedule, steps_per_epoch, total), total
    )
    assert cuts == pruning_steps(schedule, steps_per_epoch)
    # Step 1 starts the stabilization segment at the peak too.
    assert [s for s in range(total) if rates[s] == 0.5] == sorted({0, *cuts})


def test_pruning_steps_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="schedule must be a GMPSchedule, got dict"):
        pruning_steps({}, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer, got 0"):
        pruning_steps(_schedule(), 0)


# -- the preset and the controller on one clock -------------------------------------------------


def test_controller_refuses_the_preset_with_another_steps_per_epoch() -> None:
    """Built for 100 steps per epoch and run at 90, the last two cuts would get 0.29 and 0.33
    of the peak rate: an error naming both values instead."""
    recipe = pretrained_transformer(0.9, 4, 100)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"must be the schedule's own, 100 .*got 90"):
        gmp_ext.GMP(model, optimizer, recipe.schedule, steps_per_epoch=90)
    assert gmp_ext.masks(model) == {}  # nothing was pruned
    gmp_ext.GMP(model, optimizer, recipe.schedule, steps_per_epoch=recipe.steps_per_epoch)


def test_preset_in_steps_runs_on_steps() -> None:
    recipe = pretrained_transformer(0.9, total_steps=100)
    assert recipe.steps_per_epoch == 1 and recipe.total_steps == 100
    assert recipe.schedule.end_epoch == 25 and recipe.schedule.update_frequency == 6.25
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"must be the schedule's own, 1 .*got 10"):
        gmp_ext.GMP(model, optimizer, recipe.schedule, steps_per_epoch=10)
    # The same run with epochs of 10 steps: the same cuts, the schedule in epochs.
    in_epochs = pretrained_transformer(0.9, total_steps=100, steps_per_epoch=10)
    assert in_epochs.schedule.end_epoch == 2.5 and in_epochs.total_steps == 100
    assert in_epochs.lr_lambda.bounds == recipe.lr_lambda.bounds == [0, 7, 13, 19, 25, 100]


def test_run_schedule() -> None:
    schedule = RunSchedule(0.7, 0.9, 0.0, 1.0, 0.25, steps_per_epoch=8)
    plain = gmp_ext.GMPSchedule(0.7, 0.9, 0.0, 1.0, 0.25)
    assert schedule.state_dict() == plain.state_dict()
    assert schedule.update_points() == plain.update_points()
    assert schedule == RunSchedule(0.7, 0.9, 0.0, 1.0, 0.25, steps_per_epoch=8)
    assert schedule != RunSchedule(0.7, 0.9, 0.0, 1.0, 0.25, steps_per_epoch=9)
    for bad in (0, 2.5, True):  # 0 is also the default, so it must be given
        with pytest.raises(
            ValueError, match=f"steps_per_epoch must be a positive integer, got {bad}"
        ):
            RunSchedule(0.7, 0.9, 0.0, 1.0, 0.25, steps_per_epoch=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer, got 0"):
        RunSchedule.from_state_dict(plain.state_dict())


def test_factor_state_loads_with_weights_only() -> None:
    """The Hugging Face Trainer saves ``LambdaLR.state_dict()`` (which holds the factor's
    attributes) and loads it with ``weights_only=True`` when resuming."""
    recipe = pretrained_transformer(0.9, total_steps=100)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_lambda)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["lr_lambdas"] == [vars(recipe.lr_lambda)]
