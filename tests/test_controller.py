"""The GMP training controller: timing, exactness, resume, accumulation, AMP, targets, caps."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.kernels import ops
from gmp_ext.model.mask_store import MaskEntry
from gmp_ext.training.checkpoint import export_mask, import_mask
from gmp_ext.training.controller import GMP, GMPWarning
from gmp_ext.training.recipes import load_recipe
from gmp_ext.training.schedule import GMPSchedule

from .utils import batch, train, without_regrowth

LAYERS = ["conv.weight", "fc1.weight", "fc2.weight"]


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def make(seed: int = 0, optimizer: str = "sgd") -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return model, opt


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def zeros(model: nn.Module) -> dict[str, int]:
    return {n: int((p == 0).sum()) for n, p in model.named_parameters() if n in LAYERS}


def expected_updates(schedule: GMPSchedule, spe: int, steps: int) -> list[int]:
    first = [0] if schedule.crossed_update(-math.inf, 0) else []
    later = [s for s in range(1, steps + 1) if schedule.crossed_update((s - 1) / spe, s / spe)]
    return first + later


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_full_run_is_exact_at_every_step(optimizer):
    schedule = GMPSchedule(0.2, 0.8, 1, 4, 0.5)
    spe, total = 3, 21
    model, opt = make(optimizer=optimizer)
    decay = opt.param_groups[0]["weight_decay"]
    gmp = GMP(model, opt, schedule, steps_per_epoch=spe, fine_tune_weight_decay=0.0)
    seen = []
    previous: dict[str, torch.Tensor] = {}

    def check(_opt, _args, _kwargs):  # registered after the GMP: sees what the next step sees
        step = gmp.step_count
        target = schedule.sparsity_at(step / spe)
        ws = params(model)
        for name in LAYERS:
            assert zeros(model)[name] == ops.prune_count(ws[name].numel(), target), (step, name)
        for name, keep in gmp_ext.masks(model).items():
            assert bool((ws[name][~keep] == 0).all()), (step, name)
            assert int((~keep).sum()) == ops.prune_count(keep.numel(), target)
            if name in previous:  # momentum and decay moved pruned weights: they stay pruned
                assert not (keep & ~previous[name]).any(), (step, name)
            previous[name] = keep
        fine_tuning = step >= schedule.end_epoch * spe
        assert opt.param_groups[0]["weight_decay"] == (0.0 if fine_tuning else decay), step
        seen.append((step, gmp.stage))

    opt.register_step_post_hook(check)
    train(model, opt, range(total))

    assert [s for s, _ in seen] == list(range(1, total + 1))
    stages = dict(seen)
    assert (stages[2], stages[3], stages[11], stages[12]) == (
        "stabilization",
        "pruning",
        "pruning",
        "fine_tuning",
    )
    updates = expected_updates(schedule, spe, total)
    assert [r["step"] for r in gmp.history] == updates
    assert len(updates) == 7  # epochs 1, 1.5, ..., 4 reached at steps 3, 5, 6, 8, 9, 11, 12
    assert gmp.step_count == total and gmp.epoch == pytest.approx(7.0)
    assert gmp.sparsity == 0.8 and gmp.stage == "fine_tuning"
    # Pruned weights trained on and were re-zeroed: the loss moved the kept ones.
    assert all(zeros(model)[n] == round(0.8 * params(model)[n].numel()) for n in LAYERS)


def test_worked_example_needs_no_change_to_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    loader = [(torch.randn(16, 10), torch.randint(0, 4, (16,))) for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gmp = GMP(
        model,
        opt,
        GMPSchedule(0.05, 0.9, 1, 35),
        steps_per_epoch=len(loader),
        fine_tune_weight_decay=0.0,
    )
    for _epoch in range(60):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gmp.epoch_end()
    assert gmp.step_count == 120 and gmp.stage == "fine_tuning"
    assert len(gmp.history) == 35  # epochs 1, 2, ..., 35
    assert opt.param_groups[0]["weight_decay"] == 0.0
    for name in ("0.weight", "2.weight"):
        p = params(model)[name]
        assert int((p == 0).sum()) == round(0.9 * p.numel())


def test_schedule_in_steps():
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.1, 0.5, 2, 6, 2), steps_per_epoch=1)
    train(model, opt, range(7))
    assert [r["step"] for r in gmp.history] == [2, 4, 6]
    assert [r["epoch"] for r in gmp.history] == [2.0, 4.0, 6.0]


def test_multiple_update_points_in_one_step_prune_to_the_latest():
    schedule = GMPSchedule(0.1, 0.7, 0, 2, 0.25, "linear")
    model, opt = make()
    gmp = GMP(model, opt, schedule, steps_per_epoch=2)
    train(model, opt, range(4))
    targets = [(r["step"], r["target"]) for r in gmp.history]
    assert targets == [(s, schedule.sparsity_at(s / 2)) for s in range(5)]
    # Step 1 reaches epoch 0.5, crossing the points 0.25 and 0.5: the later one's target counts.
    assert targets[1][1] == pytest.approx(0.1 + 0.6 * 0.25)
    assert zeros(model)["fc1.weight"] == round(0.7 * 1024)


def run_with_resume(split: int, total: int, optimizer: str, schedule: GMPSchedule):
    spe = 3
    model, opt = make(optimizer=optimizer)
    gmp = GMP(model, opt, schedule, steps_per_epoch=spe, fine_tune_weight_decay=0.0)
    train(model, opt, range(split))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "gmp": gmp.state_dict()}, buffer
    )
    gmp.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, opt = make(seed=1, optimizer=optimizer)  # other initial weights: the load must matter
    gmp = GMP(model, opt, schedule, steps_per_epoch=spe, fine_tune_weight_decay=0.0)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    gmp.load_state_dict(saved["gmp"])
    assert gmp.step_count == split
    train(model, opt, range(split, total))
    return model, gmp


@pytest.mark.parametrize(
    ("optimizer", "split"),
    [("sgd", 7), ("adamw", 7), ("sgd", 2), ("adamw", 14)],
    ids=["sgd-mid-pruning", "adamw-mid-pruning", "sgd-stabilization", "adamw-fine-tuning"],
)
def test_resume_is_bit_identical(optimizer, split):
    # update every epoch = 3 steps: a split at step 7 lies between the updates at steps 6 and 9
    schedule = GMPSchedule(0.1, 0.8, 1, 4)
    total = 18
    reference, opt = make(optimizer=optimizer)
    reference_gmp = GMP(reference, opt, schedule, steps_per_epoch=3, fine_tune_weight_decay=0.0)
    train(reference, opt, range(total))

    resumed, gmp = run_with_resume(split, total, optimizer, schedule)
    for name, p in params(reference).items():
        assert torch.equal(p, params(resumed)[name]), name
    assert without_regrowth(gmp.history) == without_regrowth(reference_gmp.history)
    assert gmp.last_update == reference_gmp.last_update
    assert gmp.step_count == reference_gmp.step_count == total


def test_resume_restores_fine_tune_weight_decay_without_optimizer_state():
    schedule = GMPSchedule(0.1, 0.5, 0, 1)
    model, opt = make()
    gmp = GMP(model, opt, schedule, steps_per_epoch=2, fine_tune_weight_decay=0.0)
    train(model, opt, range(3))
    state = gmp.state_dict()
    assert state["weight_decay"]["original"] == [1e-3]
    model2, opt2 = make()
    gmp2 = GMP(model2, opt2, schedule, steps_per_epoch=2, fine_tune_weight_decay=0.0)
    assert opt2.param_groups[0]["weight_decay"] == 1e-3
    gmp2.load_state_dict(state)
    assert opt2.param_groups[0]["weight_decay"] == 0.0
    assert gmp2.stage == "fine_tuning"


def saved_state() -> dict:
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.6, 0, 2), steps_per_epoch=2)
    train(model, opt, range(3))
    return gmp.state_dict()


def renamed(state: dict) -> dict:
    shapes = {("head" if n == "fc2.weight" else n): s for n, s in state["shapes"].items()}
    return dict(state, shapes=shapes)


def short_mask(state: dict) -> dict:
    bad = {**state["masks"]["conv.weight"], "mask": torch.zeros(3, dtype=torch.uint8)}
    return dict(state, masks={**state["masks"], "conv.weight": bad})


@pytest.mark.parametrize(
    ("hidden", "spe", "corrupt", "message"),
    [
        (17, 2, None, r"shapes differ for \[\"'fc1.weight' \[16, 64\] != \[17, 64\]"),
        (16, 2, renamed, r"missing from the state \['fc2.weight'\].*\['head'\]"),
        (16, 4, None, r"saved with a different steps_per_epoch \(2, now 4\)"),
        (16, 2, lambda s: {"step": 3}, "not a GMP state_dict"),
        (16, 2, short_mask, r"mask of parameter 'conv.weight' has 3 bytes; its 72 elements need 9"),
    ],
    ids=["shapes", "names", "config", "keys", "mask"],
)
def test_load_state_dict_validates_and_modifies_nothing(hidden, spe, corrupt, message):
    state = saved_state() if corrupt is None else corrupt(saved_state())
    torch.manual_seed(3)
    model = Net(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.6, 0, 2), steps_per_epoch=spe)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks, history = gmp_ext.masks(model), gmp.history
    with pytest.raises(ValueError, match=message):
        gmp.load_state_dict(state)
    assert gmp.step_count == 0 and gmp.history == history
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(m, masks[n]) for n, m in gmp_ext.masks(model).items())


def test_saved_masks_round_trip_and_are_checked():
    param = nn.Parameter(torch.randn(45))
    mask = ops.magnitude_masks([param.detach()], 0.4)[0]
    packed = export_mask(MaskEntry(param, mask))
    assert packed.shape == (6,) and packed.device.type == "cpu"
    restored = import_mask(param, packed, "w")
    assert torch.equal(ops.unpack_mask(restored, (45,)), ops.unpack_mask(mask, (45,)))
    assert restored.numel() == mask.numel()  # the storage layout, padding included
    bad = packed.clone()
    bad[-1] |= 0x80
    with pytest.raises(ValueError, match="'w' has bits set past its 45 elements"):
        import_mask(param, bad, "w")
    with pytest.raises(ValueError, match="'w' must be a 1-D uint8 tensor"):
        import_mask(param, packed.float(), "w")


def test_gradient_accumulation_counts_optimizer_steps():
    schedule = GMPSchedule(0.2, 0.6, 1, 3)
    model, opt = make()
    accumulate = 4
    gmp = GMP(model, opt, schedule, steps_per_epoch=2, gradient_accumulation_steps=accumulate)
    for step in range(6):
        opt.zero_grad()
        for micro in range(accumulate):
            x, y = batch(step * accumulate + micro, size=2)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        opt.step()
    assert gmp.step_count == 6 and gmp.epoch == 3.0
    assert [r["step"] for r in gmp.history] == [2, 4, 6]
    assert zeros(model)["fc1.weight"] == round(0.6 * 1024)


def accumulate_steps(model, opt, steps: int, accumulate: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            x, y = batch(step * accumulate + micro, size=2)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        opt.step()


def test_gradient_accumulation_given_in_micro_batches_warns_early_naming_the_fit():
    # The quick start with 4 micro-batches per step and steps_per_epoch=len(loader)=8.
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.9, 1, 8), steps_per_epoch=8)
    with pytest.warns(GMPWarning, match="runs 4 training forward passes per optimizer step") as w:
        accumulate_steps(model, opt, 2, 4)
    message = str(w[0].message)
    assert "pass steps_per_epoch=2" in message and "comes only after 32 real epochs" in message
    assert "gradient_accumulation_steps=4" in message
    assert w[0].filename == __file__  # attributed to the user's optimizer.step()
    accumulate_steps(model, opt, 4, 4)  # said once
    with torch.no_grad():
        model(batch(0)[0])  # evaluation passes are not counted
    gmp.remove()


def test_one_forward_per_step_or_announced_accumulation_is_quiet():
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.9, 1, 8), steps_per_epoch=8)
    train(model, opt, range(4))
    model.eval()
    for step in range(4):  # eval-mode forwards do not count either
        model(batch(step)[0])
    model.train()
    train(model, opt, range(4, 6))
    gmp.remove()
    model, opt = make()
    gmp = GMP(
        model, opt, GMPSchedule(0.2, 0.9, 1, 8), steps_per_epoch=2, gradient_accumulation_steps=4
    )
    accumulate_steps(model, opt, 4, 4)
    with pytest.warns(GMPWarning, match=r"runs 2 training .* \(gradient_accumulation_steps=4\)"):
        accumulate_steps(model, opt, 2, 2)
    gmp.remove()


def test_run_length_check_says_where_the_run_stops():
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.9, 1, 8, interpolation="linear"), steps_per_epoch=4)
    assert gmp.check_run_length(32) is True
    with pytest.warns(
        GMPWarning,
        match=r"takes 8 optimizer steps \(schedule epoch 2\), .* end_epoch 8 = step 32: it stops "
        r"at sparsity 0.3, in the pruning stage",
    ):
        assert gmp.check_run_length(8) is False
    gmp.remove()


def test_skipped_steps_are_not_counted():
    schedule = GMPSchedule(0.2, 0.6, 1, 2)
    model, opt = make()
    gmp = GMP(model, opt, schedule, steps_per_epoch=2)
    scaler = torch.amp.GradScaler("cpu")
    for step in range(6):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if step in (1, 2):
            model.fc1.weight.grad[0, 0] = float("inf")  # overflow: the scaler skips the step
        scaler.step(opt)
        scaler.update()
    assert gmp.step_count == 4
    # A loop iteration that never reaches optimizer.step() is not a step either.
    x, y = batch(99)
    nn.functional.cross_entropy(model(x), y).backward()
    assert gmp.step_count == 4
    assert [r["step"] for r in gmp.history] == [2, 4]


def test_layer_sparsity_scales_the_curve():
    schedule = GMPSchedule(0.2, 0.8, 0, 2, 0.5)
    model, opt = make()
    finals = {"fc1.weight": 0.4, r"re:(conv|fc\d)\.weight": 0.6}
    gmp = GMP(model, opt, schedule, steps_per_epoch=2, layer_sparsity=finals)
    train(model, opt, range(5))
    expected_final = {"conv.weight": 0.6, "fc1.weight": 0.4, "fc2.weight": 0.6}
    assert len(gmp.history) == 5
    for record in gmp.history:
        value = record["target"]
        for name, layer in record["layers"].items():
            scaled = value * expected_final[name] / 0.8
            assert layer["target"] == pytest.approx(scaled, abs=1e-12), (record["step"], name)
    first, last = gmp.history[0]["layers"], gmp.history[-1]["layers"]
    assert first["fc1.weight"]["target"] == pytest.approx(0.2 * 0.4 / 0.8)
    assert {n: v["target"] for n, v in last.items()} == expected_final  # exact at the end
    ws = params(model)
    for name, final in expected_final.items():
        assert zeros(model)[name] == round(final * ws[name].numel())
    assert gmp.layer_targets(0.8) == expected_final

    with pytest.raises(ValueError, match=r"layer_sparsity entries \['fc3.weight'\] match no"):
        GMP(model, opt, schedule, steps_per_epoch=2, layer_sparsity={"fc3.weight": 0.5})
    with pytest.raises(ValueError, match=r"layer_sparsity\['fc1.weight'\] must be"):
        GMP(model, opt, schedule, steps_per_epoch=2, layer_sparsity={"fc1.weight": 1.5})


class Three(nn.Module):
    """Three 100-element layers whose magnitudes lie in disjoint ranges, a < b < c."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10)
        with torch.no_grad():
            for layer, scale in ((self.a, 1e-4), (self.b, 1e-2), (self.c, 1.0)):
                sign = torch.randint(0, 2, (10, 10)) * 2 - 1
                layer.weight.copy_(sign * (1 + torch.rand(10, 10)) * scale)


def constant(sparsity: float) -> GMPSchedule:
    return GMPSchedule(sparsity, sparsity, 0, 1)


def pruned(model: nn.Module) -> dict[str, int]:
    return {n: int((~m).sum()) for n, m in gmp_ext.masks(model).items()}


def test_caps_redistribute_the_budget_until_none_binds():
    model = Three()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caps = {"a.weight": 0.2, "re:b\\..*": 0.9}
    GMP(model, opt, constant(0.6), steps_per_epoch=1, scope="global", max_sparsity=caps)
    # Uncapped, a (100) and 80 of b go. a is capped at 20; the 160 left then take all of b,
    # which is now over its cap of 90; the last 70 come from c alone.
    assert pruned(model) == {"a.weight": 20, "b.weight": 90, "c.weight": 70}
    masks = gmp_ext.masks(model)
    for name, k in (("a.weight", 20), ("b.weight", 90)):
        expected = ops.unpack_mask(ops.magnitude_masks([weights[name]], k / 100)[0], (10, 10))
        assert torch.equal(masks[name], expected), name
    expected_c = ops.unpack_mask(ops.magnitude_masks([weights["c.weight"]], 0.7)[0], (10, 10))
    assert torch.equal(masks["c.weight"], expected_c)
    gmp_ext.remove(model)

    uncapped = Three()
    GMP(
        uncapped,
        torch.optim.SGD(uncapped.parameters(), lr=0.1),
        constant(0.6),
        steps_per_epoch=1,
        scope="global",
    )
    assert pruned(uncapped) == {"a.weight": 100, "b.weight": 80, "c.weight": 0}


def test_caps_that_all_bind_warn():
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GMPWarning, match=r"all layers \(60 zeros, expected 180\)"):
        GMP(
            model,
            opt,
            constant(0.6),
            steps_per_epoch=1,
            scope="global",
            max_sparsity={"re:.*": 0.2},
        )
    assert pruned(model) == dict.fromkeys(["a.weight", "b.weight", "c.weight"], 20)


def test_caps_and_targets_need_the_right_scope():
    model, opt = make()
    with pytest.raises(ValueError, match="max_sparsity needs scope='global'"):
        GMP(model, opt, constant(0.5), steps_per_epoch=1, max_sparsity={"fc1.weight": 0.5})
    with pytest.raises(ValueError, match="layer_sparsity needs scope='layer'"):
        GMP(
            model,
            opt,
            constant(0.5),
            steps_per_epoch=1,
            scope="global",
            layer_sparsity={"fc1.weight": 0.5},
        )


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3", None])
def test_bad_steps_per_epoch(value):
    model, opt = make()
    with pytest.raises(ValueError, match=rf"steps_per_epoch must be an integer >= 1.*{value!r}"):
        GMP(model, opt, constant(0.5), steps_per_epoch=value)
    assert gmp_ext.masks(model) == {}


def test_bad_input_names_the_problem_and_attaches_nothing():
    model, _ = make()
    partial = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"\['conv.weight', 'fc1.weight'\] are pruned and trainable but in no param group of "
        r"the optimizer: add them to the optimizer, or leave them out with exclude=",
    ):
        GMP(model, partial, constant(0.5), steps_per_epoch=2)
    assert gmp_ext.masks(model) == {} and not partial._optimizer_step_post_hooks

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"schedule must be a gmp_ext.GMPSchedule \(or .*, got dict"
    ):
        GMP(model, opt, {"final_sparsity": 0.5}, steps_per_epoch=2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GMP(model, model.parameters(), constant(0.5), steps_per_epoch=2)
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global', got 'net'"):
        GMP(model, opt, constant(0.5), steps_per_epoch=2, scope="net")
    with pytest.raises(ValueError, match=r"total_epochs must be .* \(4.0\), got 3"):
        GMP(model, opt, GMPSchedule(0.1, 0.5, 1, 4), steps_per_epoch=2, total_epochs=3)
    with pytest.raises(ValueError, match=r"fine_tune_weight_decay must be .* got -1"):
        GMP(model, opt, constant(0.5), steps_per_epoch=2, fine_tune_weight_decay=-1)
    rprop = torch.optim.Rprop(model.parameters())
    with pytest.raises(ValueError, match="Rprop has no weight_decay option"):
        GMP(model, rprop, constant(0.5), steps_per_epoch=2, fine_tune_weight_decay=0.0)
    assert gmp_ext.masks(model) == {} and not opt._optimizer_step_post_hooks


def test_warnings():
    model, opt = make()
    train(model, opt, range(1))
    with pytest.warns(GMPWarning, match="the optimizer has already taken steps"):
        gmp = GMP(model, opt, GMPSchedule(0.1, 0.5, 1, 3), steps_per_epoch=2)
    train(model, opt, range(2))
    gmp.epoch_end()  # 2 steps, as declared: silent
    train(model, opt, range(3))
    with pytest.warns(
        GMPWarning, match="3 optimizer steps in this epoch, but steps_per_epoch is 2"
    ):
        gmp.epoch_end()

    model, opt = make()
    with torch.no_grad():
        model.fc2.weight.zero_()  # every kept weight of fc2 is exactly zero too
    with pytest.warns(GMPWarning, match=r"fc2.weight \(48 zeros, expected 24\)"):
        GMP(model, opt, constant(0.5), steps_per_epoch=2)


def test_history_records_and_logging(caplog):
    schedule = GMPSchedule(0.25, 0.5, 0, 1, 0.5)
    model, opt = make()
    with caplog.at_level(logging.INFO, logger="gmp_ext"):
        gmp = GMP(model, opt, schedule, steps_per_epoch=2)
        train(model, opt, range(3))
    assert [(r["step"], r["epoch"], r["target"], r["stage"]) for r in gmp.history] == [
        (0, 0.0, 0.25, "pruning"),
        (1, 0.5, pytest.approx(schedule.sparsity_at(0.5)), "pruning"),
        (2, 1.0, 0.5, "fine_tuning"),
    ]
    last = gmp.history[-1]["layers"]
    assert list(last) == LAYERS
    ws = params(model)
    for name, layer in last.items():
        w = ws[name].detach().abs().flatten()
        assert layer["target"] == 0.5
        assert layer["achieved"] == round(0.5 * w.numel()) / w.numel()
        assert layer["threshold"] > 0  # pruned weights moved in the step before the update
    assert gmp.last_update == {"step": 2, "epoch": 1.0, "target": 0.5}
    messages = [r.getMessage() for r in caplog.records if r.name == "gmp_ext"]
    assert len(messages) == 3 and "step 2" in messages[-1] and "fc1.weight 0.5000" in messages[-1]
    gmp.history.clear()  # a copy: the controller's record is untouched
    assert len(gmp.history) == 3


def test_threshold_is_the_cut_of_the_update():
    model, opt = make()
    ws = {n: p.detach().clone() for n, p in model.named_parameters()}
    gmp = GMP(model, opt, constant(0.5), steps_per_epoch=2)
    for name, layer in gmp.history[0]["layers"].items():
        w = ws[name].abs().flatten()
        assert layer["threshold"] == float(w.sort().values[round(0.5 * w.numel()) - 1])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.1, 0.6, 0, 2, 0.5), steps_per_epoch=2)
    train(model, opt, range(5))
    path = tmp_path / "history.png"
    figure = gmp.plot(path)
    assert path.stat().st_size > 0
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["target sparsity", *LAYERS]


def test_from_recipe(tmp_path):
    model, opt = make()
    recipe = {
        "init_sparsity": 0.2,
        "final_sparsity": 0.5,
        "start_epoch": 0,
        "end_epoch": 1,
        "params": ["re:fc\\d\\.weight"],
        "global_sparsity": True,
        "fine_tune_weight_decay": 0.0,
        "total_epochs": 3,
    }
    gmp = GMP.from_recipe(model, opt, recipe, steps_per_epoch=2)
    assert gmp.scope == "global" and gmp.config.fine_tune_weight_decay == 0.0
    assert gmp.config.total_epochs == 3.0
    assert set(gmp_ext.masks(model)) == {"fc1.weight", "fc2.weight"}
    train(model, opt, range(2))
    assert opt.param_groups[0]["weight_decay"] == 0.0
    gmp.remove()

    pytest.importorskip("yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "modifiers:\n"
        "  - !GMPruningModifier\n"
        "    init_sparsity: 0.1\n"
        "    final_sparsity: 0.4\n"
        "    start_epoch: 0.0\n"
        "    end_epoch: 2.0\n"
        "    params: [conv.weight, fc2.weight]\n"
    )
    model, opt = make()
    gmp = GMP.from_recipe(model, opt, path, steps_per_epoch=2, exclude=["fc2.weight"])
    assert gmp.scope == "layer" and set(gmp_ext.masks(model)) == {"conv.weight"}
    assert gmp.schedule == load_recipe(path).schedule
    with pytest.raises(ValueError, match=r"params entry 're:head.\*' matches no parameter"):
        GMP.from_recipe(model, opt, dict(recipe, params=["re:head.*"]), steps_per_epoch=2)


def test_remove_detaches_everything():
    model, opt = make()
    gmp = GMP(model, opt, GMPSchedule(0.3, 0.6, 0, 2), steps_per_epoch=2)
    train(model, opt, range(1))
    gmp.remove()
    assert gmp_ext.masks(model) == {} and not opt._optimizer_step_post_hooks
    train(model, opt, range(1, 4))
    assert gmp.step_count == 1
    assert zeros(model)["fc1.weight"] < round(0.3 * 1024)  # no longer re-zeroed


def test_pruned_weights_cannot_revive_at_an_update():
    """A pruned weight pushed far off zero by its momentum in the update's own step must not
    outrank kept weights: the masks are re-applied before they are recomputed."""
    model, opt = make()
    schedule = GMPSchedule(0.5, 0.6, 0, 2, 1.0, "linear")
    gmp = GMP(model, opt, schedule, steps_per_epoch=2)
    train(model, opt, range(1))
    keep = gmp_ext.masks(model)["fc1.weight"]
    pruned = (~keep).reshape(-1).nonzero()[0, 0]
    opt.state[model.fc1.weight]["momentum_buffer"].view(-1)[pruned] = -1e3  # a huge push up
    train(model, opt, range(1, 2))  # step 2 reaches the update at epoch 1
    assert gmp.history[-1]["step"] == 2
    assert not gmp_ext.masks(model)["fc1.weight"].reshape(-1)[pruned]
    assert model.fc1.weight.reshape(-1)[pruned] == 0


class StepSchedule:
    """Not a GMPSchedule: 0 until epoch 1, then 0.5 (fine-tuning from epoch 2)."""

    final_sparsity = 0.5
    end_epoch = 2.0

    def sparsity_at(self, epoch: float) -> float:
        return 0.0 if epoch < 1 else 0.5

    def stage_at(self, epoch: float) -> str:
        return "stabilization" if epoch < 1 else "pruning" if epoch < 2 else "fine_tuning"

    def crossed_update(self, previous: float, current: float) -> bool:
        return previous < 1 <= current

    def state_dict(self) -> dict:
        return {"kind": "step", "at": 1, "sparsity": 0.5}


def test_any_object_with_the_schedule_protocol_drives_gmp():
    model, opt = make()
    gmp = GMP(model, opt, StepSchedule(), steps_per_epoch=2)
    train(model, opt, range(5))
    assert [r["step"] for r in gmp.history] == [2] and gmp.stage == "fine_tuning"
    assert zeros(model)["fc1.weight"] == 512
    assert gmp.state_dict()["config"]["schedule"] == {"kind": "step", "at": 1, "sparsity": 0.5}


def test_config_is_validated_once_frozen_and_recorded():
    import dataclasses

    model, opt = make()
    gmp = GMP(model, opt, constant(0.5), steps_per_epoch=2, gradient_accumulation_steps=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gmp.config.scope = "global"
    recorded = gmp.state_dict()["config"]
    assert recorded == gmp.config.to_dict() and recorded["gradient_accumulation_steps"] == 2
    # Options that never change the weights may differ on resume.
    model2, opt2 = make()
    GMP(model2, opt2, constant(0.5), steps_per_epoch=2).load_state_dict(gmp.state_dict())


def test_model_with_a_controller_still_pickles_and_deep_copies():
    import copy
    import io

    model, opt = make()
    schedule = GMPSchedule(0.2, 0.6, 0, 2, interpolation=lambda x: x)  # a lambda: unpicklable
    gmp = GMP(model, opt, schedule, steps_per_epoch=2)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the forward hook GMP adds holds counters only
    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), model.parameters()))
    gmp.remove()
