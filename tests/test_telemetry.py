"""Telemetry of GMP's mask updates: ties, regrowth, mask churn, the logger and writers."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.training.controller import GMP, GMPWarning
from gmp_ext.training.schedule import GMPSchedule
from gmp_ext.training.telemetry import LAYER_METRICS, scalars

from .test_controller import LAYERS, Net
from .utils import DTYPE_IDS, DTYPES, batch, weights

# Updates at epochs 0, 1 and 2 = steps 0, 2 and 4 with two steps per epoch.
SCHEDULE = GMPSchedule(0.5, 0.8, 0, 2, 1.0)


def plain_sgd(seed: int = 0, lr: float = 0.05) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def step(model: nn.Module, opt: torch.optim.Optimizer, i: int, before_step=None) -> None:
    x, y = batch(i)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if before_step is not None:
        before_step()
    opt.step()


def pruned_flags(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: ~m for n, m in gmp_ext.masks(model).items()}


def test_first_update_has_no_regrowth_or_churn():
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    record = gmp.history[0]
    assert list(record["layers"]["fc1.weight"]) == list(LAYER_METRICS)
    for row in record["layers"].values():
        assert row["regrowth"] is None and row["churn"] is None
        assert row["newly_pruned"] is None and row["revived"] is None
    assert record["regrowth"] is None and record["churn"] is None


def test_injected_regrowth_is_counted():
    """Pruned weights moved outside the controlled step (here: a write between backward and
    step) are non-zero when the update re-masks them; with masked gradients and plain SGD
    nothing else moves them, so the count is exact."""
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2, mask_gradients=True)
    first = pruned_flags(model)

    def inject():
        with torch.no_grad():
            model.fc1.weight.add_(1.0)  # every pruned weight of fc1 becomes 1.0

    step(model, opt, 0)
    step(model, opt, 1, before_step=inject)  # the update of epoch 1 falls on this step
    record = gmp.history[1]
    assert record["step"] == 2
    regrowth = {n: row["regrowth"] for n, row in record["layers"].items()}
    assert regrowth == {
        "conv.weight": 0,
        "fc1.weight": int(first["fc1.weight"].sum()),
        "fc2.weight": 0,
    }
    assert record["regrowth"] == int(first["fc1.weight"].sum())
    # The next update sees no regrowth: nothing bypassed the masks since.
    step(model, opt, 2)
    step(model, opt, 3)
    assert all(row["regrowth"] == 0 for row in gmp.history[2]["layers"].values())


def test_regrowth_from_the_last_step_without_masked_gradients():
    """Without mask_gradients, the update step's own SGD step moves every pruned weight whose
    gradient is non-zero; regrowth counts exactly those."""
    lr = 0.05
    model, opt = plain_sgd(lr=lr)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    params = dict(model.named_parameters())
    step(model, opt, 0)
    expected = {}

    def record_expected():
        for name, flags in pruned_flags(model).items():
            moved = torch.zeros_like(params[name]).add_(params[name].grad, alpha=-lr) != 0
            expected[name] = int((moved & flags).sum())

    step(model, opt, 1, before_step=record_expected)
    got = {n: row["regrowth"] for n, row in gmp.history[1]["layers"].items()}
    assert got == expected and sum(expected.values()) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ties_count_the_threshold_magnitude(dtype, scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 7, bias=False), nn.Linear(7, 5, bias=False))
    with torch.no_grad():
        for p in model.parameters():  # 5 distinct magnitudes: heavy ties
            p.copy_(weights(p.numel(), torch.float32, kind="few_values").view_as(p))
    model.to(dtype)
    before = {n: p.detach().float().abs().flatten() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(model, opt, GMPSchedule(0.45, 0.5, 0, 1), steps_per_epoch=1, scope=scope)
    record = gmp.history[0]
    if scope == "layer":
        cuts = {n: w.sort().values[round(0.45 * w.numel()) - 1] for n, w in before.items()}
    else:
        everything = torch.cat(list(before.values()))
        cut = everything.sort().values[round(0.45 * everything.numel()) - 1]
        cuts = dict.fromkeys(before, cut)
    for name, w in before.items():
        row = record["layers"][name]
        assert row["threshold"] == float(cuts[name])
        assert row["ties"] == int((w == cuts[name]).sum()) > 1, name
    assert record["ties"] == sum(r["ties"] for r in record["layers"].values())


def test_no_ties_when_nothing_is_pruned():
    model, opt = plain_sgd()
    with torch.no_grad():
        model.fc1.weight[0, :5] = 0.0  # zeros would tie with the 0.0 threshold of k = 0
    with pytest.warns(GMPWarning, match="5 zeros, expected 0"):
        gmp = GMP(model, opt, GMPSchedule(0.0, 0.5, 0, 2), steps_per_epoch=1)
    assert gmp.history[0]["target"] == 0.0
    assert all(row["ties"] == 0 for row in gmp.history[0]["layers"].values())


def test_churn_counts_newly_pruned_and_revived():
    """A kept weight set to exactly zero ties with the pruned zeros; the lowest indices are
    pruned, so it is pruned and the highest-index pruned zero is revived."""
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.4, 0.1, 0.3, 0.2]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves but what the test writes
    gmp = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 2, 1.0), steps_per_epoch=1)
    assert gmp_ext.masks(model)["weight"].tolist() == [[True, False, True, False]]
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    model(torch.ones(1, 4)).sum().backward()
    with pytest.warns(GMPWarning, match="kept weights are exactly zero"):
        opt.step()
    assert gmp_ext.masks(model)["weight"].tolist() == [[False, False, True, True]]
    row = gmp.history[1]["layers"]["weight"]
    assert (row["newly_pruned"], row["revived"], row["churn"]) == (1, 1, 1.0)
    assert (row["ties"], row["threshold"], row["regrowth"]) == (3, 0.0, 0)


def test_churn_of_a_rising_schedule_matches_the_masks():
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    step(model, opt, 0)
    old = gmp_ext.masks(model)
    step(model, opt, 1)
    new = gmp_ext.masks(model)
    record = gmp.history[1]
    changed = kept = 0
    for name in LAYERS:
        newly = int((old[name] & ~new[name]).sum())
        revived = int((new[name] & ~old[name]).sum())
        row = record["layers"][name]
        assert (row["newly_pruned"], row["revived"]) == (newly, revived)
        assert row["churn"] == (newly + revived) / int(old[name].sum())
        changed, kept = changed + newly + revived, kept + int(old[name].sum())
    assert record["churn"] == changed / kept
    assert record["newly_pruned"] > 0


def test_records_survive_a_checkpoint():
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    for i in range(3):
        step(model, opt, i)
    buffer = io.BytesIO()
    torch.save(gmp.state_dict(), buffer)
    buffer.seek(0)
    resumed_model, resumed_opt = plain_sgd()
    resumed = GMP(resumed_model, resumed_opt, SCHEDULE, steps_per_epoch=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.history == gmp.history


def test_logger_lines(caplog):
    model, opt = plain_sgd()
    with caplog.at_level(logging.DEBUG, logger="gmp_ext"):
        GMP(model, opt, SCHEDULE, steps_per_epoch=2)
        step(model, opt, 0)
        step(model, opt, 1)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(info) == 2 and "regrowth -" in info[0] and "churn -" in info[0]
    assert "regrowth -" not in info[1] and "ties" in info[1]
    assert len(debug) == 2 * len(LAYERS)
    assert debug[-1].startswith("GMP step 2 fc2.weight: target 0.")
    assert "regrowth" in debug[-1] and "churn" in debug[-1]


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_log_to_writes_every_update():
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    early, late = FakeWriter(), FakeWriter()
    gmp.log_to(early, layers=False)
    step(model, opt, 0)
    step(model, opt, 1)
    handle = gmp.log_to(late, prefix="prune")  # the updates so far, at once
    assert {s for _, _, s in late.calls} == {0, 2}
    handle.remove()
    for i in range(2, 4):
        step(model, opt, i)
    assert {s for _, _, s in late.calls} == {0, 2}  # removed: the update at step 4 not written
    for writer, prefix, layers in ((early, "gmp", False), (late, "prune", True)):
        records = gmp.history if writer is early else gmp.history[:2]
        expected = [
            (tag, value, r["step"])
            for r in records
            for tag, value in scalars(r, prefix, layers).items()
        ]
        assert writer.calls == expected
    tags = {t for t, _, s in late.calls if s == 2}
    assert {
        "prune/regrowth",
        "prune/churn",
        "prune/fc1.weight/ties",
        "prune/conv.weight/churn",
    } <= tags
    assert "gmp/regrowth" not in {t for t, _, s in early.calls if s == 0}  # None at the first
    assert not any(t.count("/") > 1 for t, _, _ in early.calls)
    value = {(t, s): v for t, v, s in late.calls}
    assert value[("prune/fc1.weight/churn", 2)] == gmp.history[1]["layers"]["fc1.weight"]["churn"]


def test_log_to_rejects_bad_arguments():
    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    with pytest.raises(TypeError, match="writer must have an add_scalar"):
        gmp.log_to(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix must be a non-empty string, got ''"):
        gmp.log_to(FakeWriter(), prefix="")


def test_log_to_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    writer = SummaryWriter(str(tmp_path))
    gmp.log_to(writer)
    for i in range(4):
        step(model, opt, i)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    churn = [(e.step, e.value) for e in events.Scalars("gmp/churn")]
    assert churn == [
        (r["step"], pytest.approx(r["churn"])) for r in gmp.history if r["churn"] is not None
    ]
    assert [e.step for e in events.Scalars("gmp/fc1.weight/ties")] == [0, 2, 4]


def test_plot_telemetry_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    from gmp_ext.training.plotting import plot_telemetry

    model, opt = plain_sgd()
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2)
    for i in range(4):
        step(model, opt, i)
    figure = plot_telemetry(gmp.history, tmp_path / "t.png")
    churn = [line for line in figure.axes[0].get_lines() if line.get_label() == "all layers"]
    assert list(churn[0].get_ydata()) == [r["churn"] for r in gmp.history[1:]]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_empty_and_one_element_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 3), nn.Linear(1, 1, bias=False), nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(model, opt, GMPSchedule(0.5, 1.0, 0, 1), steps_per_epoch=1)
    model[2](torch.randn(2, 3)).sum().backward()
    opt.step()
    first, second = gmp.history
    # round(0.5 * 1) = 0: the one-element layer prunes nothing, so it has no threshold ties.
    assert first["layers"]["1.weight"]["ties"] == 0
    empty = second["layers"]["0.weight"]
    assert (empty["ties"], empty["regrowth"], empty["newly_pruned"], empty["churn"]) == (
        0,
        0,
        0,
        None,
    )
    single = second["layers"]["1.weight"]
    assert (single["newly_pruned"], single["revived"], single["churn"]) == (1, 0, 1.0)
    assert single["ties"] == 1  # its own weight, the cut at sparsity 1.0
