from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmp_ext.training.recipes import Recipe, load_recipe
from gmp_ext.training.schedule import INTERPOLATIONS, GMPSchedule, LRSteps

EXAMPLE_RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "gmp_resnet.yaml"

SPARSEML_RECIPE = """\
total_epochs: 55
lr:
  lr: 0.01
  milestones: [43, 50]
  gamma: 0.1
fine_tune_weight_decay: 0.0
modifiers:
  - !GMPruningModifier
    init_sparsity: 0.05
    final_sparsity: 0.90
    start_epoch: 1.0
    end_epoch: 35.0
    update_frequency: 1.0
    inter_func: cubic
    params: ['re:.*conv.*weight']
    global_sparsity: true
"""


def _schedule(**overrides: object) -> GMPSchedule:
    kwargs = {
        "init_sparsity": 0.05,
        "final_sparsity": 0.90,
        "start_epoch": 1,
        "end_epoch": 35,
        "update_frequency": 1.0,
        "interpolation": "cubic",
    }
    kwargs.update(overrides)
    return GMPSchedule(**kwargs)


# -- values -----------------------------------------------------------------------------------


def test_worked_examples() -> None:
    linear = _schedule(interpolation="linear")
    assert linear.sparsity_at(18.7) == pytest.approx(0.05 + 0.85 * 17 / 34, abs=1e-12)
    cubic = _schedule()
    assert cubic.sparsity_at(18) == pytest.approx(0.90 - 0.85 * 0.5**3, abs=1e-12)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_boundaries(interpolation: str) -> None:
    schedule = _schedule(interpolation=interpolation)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(0.99) == 0.0
    assert schedule.sparsity_at(1) == 0.05
    assert schedule.sparsity_at(1.5) == 0.05
    assert schedule.sparsity_at(34.999) < 0.90
    for epoch in (35, 35.5, 1000, math.inf):
        assert schedule.sparsity_at(epoch) == 0.90


def test_piecewise_constant_between_updates() -> None:
    schedule = _schedule()
    assert schedule.sparsity_at(18.999) == schedule.sparsity_at(18) > schedule.sparsity_at(17.999)


def test_update_point_reached_despite_rounding() -> None:
    # 18.0 must be update point 17 exactly, not the 16th one by float error.
    schedule = _schedule(interpolation="linear")
    assert schedule.sparsity_at(18.0) == pytest.approx(0.05 + 0.85 * 17 / 34, abs=1e-12)
    # step / steps_per_epoch = 0.3 lies just below start + 3 * 0.1 = 0.30000000000000004.
    fine = GMPSchedule(0.0, 0.5, 0.0, 1.0, 0.1, "linear")
    assert fine.sparsity_at(3 / 10) == pytest.approx(0.15, abs=1e-12)
    assert fine.sparsity_at(3 / 10 - 1e-6) == pytest.approx(0.10, abs=1e-12)


def test_non_integer_frequency_forces_last_update_at_end() -> None:
    schedule = GMPSchedule(0.0, 0.8, 0.0, 10.0, 3.0, "linear")
    assert schedule.update_points() == [0.0, 3.0, 6.0, 9.0, 10.0]
    assert schedule.sparsity_at(9.99) == pytest.approx(0.8 * 0.9, abs=1e-12)
    assert schedule.sparsity_at(10.0) == 0.8
    wide = GMPSchedule(0.1, 0.5, 2.0, 3.0, 5.0, "linear")
    assert wide.update_points() == [2.0, 3.0]
    assert wide.sparsity_at(2.9) == 0.1


def test_no_near_duplicate_point_at_end() -> None:
    # (0.7 - 0.1) / 0.2 is 2.9999999999999996 in floats; no extra point just before 0.7.
    schedule = GMPSchedule(0.0, 0.5, 0.1, 0.7, 0.2, "linear")
    assert schedule.update_points() == pytest.approx([0.1, 0.3, 0.5, 0.7])


def test_exponential_keeps_density_geometric() -> None:
    schedule = GMPSchedule(0.2, 0.95, 0.0, 10.0, 1.0, "exponential")
    for i in range(10):
        expected = 1 - (1 - 0.2) * ((1 - 0.95) / (1 - 0.2)) ** (i / 10)
        assert schedule.sparsity_at(i + 0.5) == pytest.approx(expected, abs=1e-12)
    assert schedule.sparsity_at(10) == 0.95
    constant = GMPSchedule(0.3, 0.3, 0.0, 10.0, 1.0, "exponential")
    assert constant.sparsity_at(5) == 0.3


def test_inverse_cubic() -> None:
    schedule = GMPSchedule(0.0, 0.8, 0.0, 8.0, 1.0, "inverse_cubic")
    assert schedule.sparsity_at(4) == pytest.approx(0.8 * (1 - 0.5 ** (1 / 3)), abs=1e-12)


def test_callable_interpolation() -> None:
    def square(x: float) -> float:
        return x * x

    schedule = GMPSchedule(0.0, 0.8, 0.0, 10.0, 1.0, square)
    assert schedule.sparsity_at(5) == pytest.approx(0.8 * 0.25, abs=1e-12)
    assert schedule.interpolation is square


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"init_sparsity": 1.5}, r"init_sparsity must be a finite number in \[0, 1\], got 1.5"),
        ({"init_sparsity": -0.1}, "init_sparsity"),
        ({"init_sparsity": True}, "init_sparsity.*got True"),
        ({"init_sparsity": "0.1"}, "init_sparsity.*got '0.1'"),
        ({"final_sparsity": math.nan}, "final_sparsity.*got nan"),
        ({"final_sparsity": 1.01}, "final_sparsity"),
        ({"final_sparsity": 0.01}, r"final_sparsity must be >= init_sparsity \(0.05\), got 0.01"),
        ({"start_epoch": -1}, "start_epoch must be a finite number >= 0, got -1"),
        ({"start_epoch": math.inf}, "start_epoch"),
        ({"end_epoch": 1}, r"end_epoch must be a finite number > start_epoch \(1.0\), got 1"),
        ({"end_epoch": 0.5}, "end_epoch"),
        ({"update_frequency": 0}, "update_frequency must be a finite number > 0, got 0"),
        ({"update_frequency": -1.0}, "update_frequency"),
        ({"interpolation": "quadratic"}, "interpolation must be .*linear, cubic.*'quadratic'"),
        ({"interpolation": 3}, "interpolation must be a callable"),
        (
            {"interpolation": "exponential", "final_sparsity": 1.0},
            "final_sparsity must be < 1 for interpolation 'exponential'",
        ),
        ({"interpolation": lambda x: x + 0.1}, r"f\(0\) == 0 and f\(1\) == 1"),
        ({"interpolation": lambda x: x * 0.9}, r"f\(0\) == 0 and f\(1\) == 1"),
        ({"interpolation": lambda x: x if x < 0.5 else x - 0.25 if x < 1 else 1.0}, "non-decr"),
        ({"interpolation": lambda x: math.nan}, "finite real numbers"),
        ({"interpolation": lambda x: "x"}, "finite real numbers"),
    ],
)
def test_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _schedule(**overrides)


@pytest.mark.parametrize("epoch", [math.nan, "1", None, True])
def test_bad_epoch(epoch: object) -> None:
    with pytest.raises(ValueError, match="epoch must be a real number"):
        _schedule().sparsity_at(epoch)


# -- stages and update points -----------------------------------------------------------------


def test_stage_at_boundaries() -> None:
    schedule = _schedule()
    assert schedule.stage_at(0) == "stabilization"
    assert schedule.stage_at(0.999) == "stabilization"
    assert schedule.stage_at(1) == "pruning"
    assert schedule.stage_at(34.999) == "pruning"
    assert schedule.stage_at(35) == "fine_tuning"
    assert schedule.stage_at(100) == "fine_tuning"


def test_update_points_and_next_update() -> None:
    schedule = _schedule()
    points = schedule.update_points()
    assert points == [float(e) for e in range(1, 36)]
    assert schedule.next_update(0) == 1.0
    assert schedule.next_update(1) == 2.0
    assert schedule.next_update(1.5) == 2.0
    assert schedule.next_update(34.5) == 35.0
    assert schedule.next_update(35) is None


def test_crossed_update() -> None:
    schedule = GMPSchedule(0.0, 0.5, 0.0, 2.0, 0.5, "linear")
    assert schedule.crossed_update(-math.inf, 0.0)  # the update at start_epoch = 0
    assert not schedule.crossed_update(0.0, 0.25)
    assert schedule.crossed_update(0.25, 0.5)
    assert not schedule.crossed_update(0.5, 0.75)
    assert schedule.crossed_update(0.0, 2.0)
    assert not schedule.crossed_update(2.0, 5.0)
    assert not schedule.crossed_update(1.0, 0.0)


@given(
    start=st.integers(0, 5),
    length=st.integers(1, 20),
    frequency=st.sampled_from([0.1, 0.25, 0.3, 1.0, 1.5, 7.0]),
    steps_per_epoch=st.integers(1, 13),
)
def test_controller_sees_every_update_once(
    start: int, length: int, frequency: float, steps_per_epoch: int
) -> None:
    """A controller stepping per batch crosses each reachable update point exactly once and
    the target changes only at those crossings."""
    schedule = GMPSchedule(0.1, 0.9, start, start + length, frequency, "cubic")
    prev_epoch, prev_sparsity, crossings = -math.inf, 0.0, 0
    for step in range((start + length + 1) * steps_per_epoch + 1):
        epoch = step / steps_per_epoch
        sparsity = schedule.sparsity_at(epoch)
        if schedule.crossed_update(prev_epoch, epoch):
            crossings += 1
        else:
            assert sparsity == prev_sparsity
        prev_epoch, prev_sparsity = epoch, sparsity
    points = schedule.update_points()
    reachable = {math.ceil(t * steps_per_epoch - 1e-6) for t in points}
    assert crossings == len(reachable)
    assert prev_sparsity == 0.9


@given(
    init=st.floats(0, 1),
    final=st.floats(0, 1),
    start=st.floats(0, 50),
    length=st.floats(0.01, 50),
    frequency=st.floats(0.01, 10),
    interpolation=st.sampled_from(INTERPOLATIONS),
    epochs=st.lists(st.floats(0, 200), min_size=2, max_size=20),
)
def test_monotone_and_bounded(
    init: float,
    final: float,
    start: float,
    length: float,
    frequency: float,
    interpolation: str,
    epochs: list[float],
) -> None:
    init, final = min(init, final), max(init, final)
    if interpolation == "exponential" and final == 1.0:
        final = 0.999
        init = min(init, final)
    schedule = GMPSchedule(init, final, start, start + length, frequency, interpolation)
    values = [schedule.sparsity_at(e) for e in sorted(epochs)]
    assert values == sorted(values)
    for epoch, value in zip(sorted(epochs), values):
        if epoch < start - 1e-6:  # closer than that counts as reached (float tolerance)
            assert value == 0.0
        elif epoch >= start:
            assert init <= value <= final


# -- equality and serialisation ---------------------------------------------------------------


def test_eq_hash_repr() -> None:
    a = GMPSchedule(0, 0.5, 0, 10)
    b = GMPSchedule(0.0, 0.5, 0.0, 10.0, 1.0, "cubic")
    assert a == b
    assert hash(a) == hash(b)
    assert a != GMPSchedule(0, 0.5, 0, 10, interpolation="linear")
    assert repr(a) == (
        "GMPSchedule(init_sparsity=0.0, final_sparsity=0.5, start_epoch=0.0, end_epoch=10.0, "
        "update_frequency=1.0, interpolation='cubic')"
    )


def test_state_dict_round_trip() -> None:
    schedule = _schedule(interpolation="exponential", update_frequency=0.5)
    state = schedule.state_dict()
    assert state == {
        "init_sparsity": 0.05,
        "final_sparsity": 0.9,
        "start_epoch": 1.0,
        "end_epoch": 35.0,
        "update_frequency": 0.5,
        "interpolation": "exponential",
    }
    assert GMPSchedule.from_state_dict(state) == schedule
    with pytest.raises(ValueError, match="built-in interpolation 'exponential'"):
        GMPSchedule.from_state_dict(state, interpolation=lambda x: x)


def test_state_dict_survives_torch_weights_only_load(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    schedule = _schedule(update_frequency=0.25)
    torch.save({"schedule": schedule.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert GMPSchedule.from_state_dict(loaded["schedule"]) == schedule


def _square(x: float) -> float:
    return x * x


def test_state_dict_with_callable_needs_it_again() -> None:
    schedule = _schedule(interpolation=_square)
    state = schedule.state_dict()
    assert state["interpolation"] == f"{__name__}._square"
    with pytest.raises(ValueError, match=r"callable interpolation '.*_square'.*pass it again"):
        GMPSchedule.from_state_dict(state)
    with pytest.raises(ValueError, match="interpolation must be callable"):
        GMPSchedule.from_state_dict(state, interpolation="cubic")  # type: ignore[arg-type]
    assert GMPSchedule.from_state_dict(state, interpolation=_square) == schedule


def test_state_dict_bad_keys() -> None:
    state = _schedule().state_dict()
    with pytest.raises(ValueError, match=r"unknown key.*'extra'"):
        GMPSchedule.from_state_dict({**state, "extra": 1})
    del state["end_epoch"]
    with pytest.raises(ValueError, match=r"missing key.*end_epoch"):
        GMPSchedule.from_state_dict(state)


# -- recipes ----------------------------------------------------------------------------------


def test_load_recipe_reads_a_sparseml_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(SPARSEML_RECIPE, encoding="utf-8")
    assert load_recipe(path).schedule == _schedule()
    recipe = load_recipe(str(path))
    assert recipe == Recipe(
        schedule=_schedule(),
        params=("re:.*conv.*weight",),
        global_sparsity=True,
        lr=LRSteps(0.01, (43, 50), 0.1),
        total_epochs=55.0,
        fine_tune_weight_decay=0.0,
    )


def test_from_dict_bare_mapping_and_defaults() -> None:
    data = {"init_sparsity": 0, "final_sparsity": 0.8, "start_epoch": 2, "end_epoch": 12}
    assert load_recipe(data).schedule == GMPSchedule(0.0, 0.8, 2.0, 12.0, 1.0, "cubic")
    recipe = load_recipe({**data, "params": "__ALL_PRUNABLE__", "num_epochs": 20})
    assert recipe.params == ("__ALL_PRUNABLE__",)
    assert recipe.total_epochs == 20.0
    assert recipe.lr is None
    assert recipe.global_sparsity is False
    assert recipe.fine_tune_weight_decay is None


def test_untagged_modifier_mapping() -> None:
    data = {
        "modifiers": [
            {
                "GMPruningModifier": {
                    "init_sparsity": 0.05,
                    "final_sparsity": 0.9,
                    "start_epoch": 1,
                    "end_epoch": 35,
                }
            }
        ]
    }
    assert load_recipe(data).schedule == _schedule()


def test_example_recipe_loads() -> None:
    recipe = load_recipe(EXAMPLE_RECIPE)
    assert recipe.schedule == _schedule()
    assert recipe.lr == LRSteps(0.01, (43, 50), 0.1)
    assert recipe.total_epochs == 55.0


_BASE = {"init_sparsity": 0.05, "final_sparsity": 0.9, "start_epoch": 1, "end_epoch": 35}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**_BASE, "sparsity": 0.5}, "unknown key.*'sparsity'.*allowed: init_sparsity"),
        ({"init_sparsity": 0.1, "start_epoch": 0}, "missing required key.*final_sparsity"),
        ({**_BASE, "inter_func": "quadratic"}, "inter_func must be one of.*'quadratic'"),
        ({**_BASE, "init_sparsity": 2}, "init_sparsity must be"),
        ({**_BASE, "total_epochs": 20}, r"total_epochs must be a finite number >= end_epoch"),
        ({**_BASE, "total_epochs": 40, "num_epochs": 40}, "not both"),
        ({**_BASE, "num_epochs": "many"}, "num_epochs must be"),
        ({**_BASE, "params": []}, "params must be"),
        ({**_BASE, "params": [1]}, "params must be"),
        ({**_BASE, "global_sparsity": "yes"}, "global_sparsity must be true or false"),
        ({**_BASE, "fine_tune_weight_decay": -1}, "fine_tune_weight_decay must be"),
        ({**_BASE, "lr": 0.1}, "lr must be a mapping"),
        ({**_BASE, "lr": {"milestones": [3]}}, "lr: missing required key lr"),
        ({**_BASE, "lr": {"lr": 0.1, "step": 3}}, "lr: unknown key.*'step'"),
        ({**_BASE, "lr": {"lr": 0.1, "milestones": 3}}, "milestones must be a list"),
        ({**_BASE, "lr": {"lr": 0.1, "milestones": [-1]}}, "milestones must be"),
        ({**_BASE, "lr": {"lr": 0.1, "gamma": 0}}, "gamma must be"),
        ({"modifiers": {}}, "modifiers must be a list"),
        ({"modifiers": []}, "expected exactly one GMPruningModifier, found 0"),
        ({"modifiers": [{"GMPruningModifier": _BASE}] * 2}, "exactly one.*found 2"),
        ({"modifiers": [{"SetLearningRateModifier": {}}]}, "unsupported modifier"),
        ({"modifiers": ["GMPruningModifier"]}, "each modifier must be a tagged mapping"),
        ({"modifiers": [{"GMPruningModifier": None}]}, "GMPruningModifier must be a mapping"),
        ({"modifiers": [{"GMPruningModifier": {**_BASE, "lr": 1}}]}, "GMPruningModifier: unk"),
        ({"modifiers": [{"GMPruningModifier": _BASE}], **_BASE}, "recipe: unknown key"),
    ],
)
def test_recipe_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_recipe(data)


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(ValueError, match="recipe must be a mapping, got list"):
        load_recipe([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modifiers:\n  - !GMPruningModifier 3\n", "tag !GMPruningModifier must be applied to a"),
        ("init_sparsity: [\n", "invalid YAML"),
        ("- 1\n", "recipe must be a mapping"),
    ],
)
def test_yaml_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        load_recipe("/nonexistent/recipe.yaml")


def test_lr_steps_matches_multistep_lr() -> None:
    torch = pytest.importorskip("torch")
    steps = LRSteps(0.1, [5, 2, 5], 0.5)
    assert steps.milestones == (2.0, 5.0, 5.0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5, 2, 5], gamma=0.5)
    for epoch in range(8):
        assert steps.lr_at(epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        assert steps.lr_at(epoch + 0.5) == steps.lr_at(epoch)
        optimizer.step()
        scheduler.step()
