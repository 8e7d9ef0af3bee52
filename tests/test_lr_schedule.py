from __future__ import annotations

import pytest
import torch

import gmp_ext
from gmp_ext.lr_schedule import PruningRestarts


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
