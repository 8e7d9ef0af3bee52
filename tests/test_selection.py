"""Which parameters are pruned: tied and re-parametrized weights, the one name-and-pattern
rule, wrapper prefixes, frozen parameters (each fault kind of the field trial by name)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import gmp_ext
from gmp_ext import GMP, GMPSchedule, GMPWarning
from gmp_ext.model.parameters import matches, unwrap


class TiedLM(nn.Module):
    """An output layer sharing the embedding matrix, as most language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.body(self.embed(tokens)))))


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- tied weights ------------------------------------------------------------------------------


def test_tied_weights_of_excluded_modules_are_left_alone_with_a_warning():
    model = TiedLM()
    embedding = model.embed.weight.detach().clone()
    with pytest.warns(GMPWarning, match=r"'head.weight' \(also 'embed.weight' of Embedding\)"):
        summary = gmp_ext.prune_step(model, 0.5)
    assert list(summary) == ["body.weight"]
    assert torch.equal(model.embed.weight, embedding)
    assert set(gmp_ext.masks(model)) == {"body.weight"}


def test_tied_weights_opt_in_through_params():
    model = TiedLM()
    summary = gmp_ext.prune_step(model, 0.5, params=["head.weight", "body.weight"])
    assert summary == {"head.weight": 0.5, "body.weight": 0.5}
    assert int((model.embed.weight == 0).sum()) == 400  # the shared tensor, once


def test_tied_weights_excluded_under_any_of_their_names():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    summary = gmp_ext.prune_step(model, 0.5, exclude=["2.weight"])
    assert list(summary) == ["1.weight"]
    assert int((model[0].weight == 0).sum()) == 0


def test_tied_weights_in_the_controller_and_the_report():
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GMPWarning, match="tied weights left out"):
        gmp = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1)
    assert [row.name for row in gmp_ext.sparsity_report(model).rows] == ["body.weight"]
    assert int((model.embed.weight == 0).sum()) == 0
    gmp.remove()


# -- re-parametrized weights -------------------------------------------------------------------


def reparametrized_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        parametrizations.weight_norm(nn.Linear(16, 16)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(16, 4)),
    )


def test_reparametrized_weights_are_refused_naming_every_layer_and_the_fix():
    model = reparametrized_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot prune re-parametrized weights") as caught:
        gmp_ext.prune_step(model, 0.5)
    message = str(caught.value)
    assert "'2.weight'" in message and "'4.weight'" in message
    assert "_WeightNorm" in message and "_SpectralNorm" in message
    assert "remove_parametrizations(module, 'weight')" in message
    assert "'2.parametrizations.weight.original1'" in message and "exclude=" in message
    assert unchanged(model, before) and gmp_ext.masks(model) == {}
    for call in (
        lambda: gmp_ext.sparsity_report(model),
        lambda: gmp_ext.PrunePlan(model, 0.5),
        lambda: GMP(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            GMPSchedule(0.5, 0.5, 0, 1),
            steps_per_epoch=1,
        ),
    ):
        with pytest.raises(ValueError, match="'2.weight'"):
            call()


def test_reparametrized_weights_excluded_or_named_explicitly():
    model = reparametrized_model()
    assert gmp_ext.prune_step(model, 0.5, exclude=["2", "4"]) == {"0.weight": 0.5}
    gmp_ext.remove(model)
    # Masking a stored tensor the user names: spectral norm divides by a scalar, so the zeros
    # hold in the effective weight.
    original = "4.parametrizations.weight.original"
    assert gmp_ext.prune_step(model, 0.5, params=[original]) == {original: 0.5}
    assert int((model[4].weight == 0).sum()) == 32
    with pytest.raises(ValueError, match=r"'2.weight' \(torch.nn.utils.parametrize _WeightNorm"):
        gmp_ext.prune_step(model, 0.5, params=["2.weight"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("reparametrize", "fix"),
    [
        (lambda m: torch.nn.utils.weight_norm(m), r"torch.nn.utils.remove_weight_norm\(module\)"),
        (lambda m: torch.nn.utils.spectral_norm(m), r"remove_spectral_norm\(module\)"),
        (
            lambda m: prune.l1_unstructured(m, "weight", 0.5),
            r"weight_orig \* weight_mask; torch.nn.utils.prune.remove\(module, 'weight'\)",
        ),
    ],
    ids=["legacy_weight_norm", "legacy_spectral_norm", "torch_prune"],
)
def test_reparametrizing_hooks_are_refused_with_their_fix(reparametrize, fix):
    layer = nn.Linear(6, 6)
    reparametrize(layer)
    model = nn.Sequential(nn.Linear(6, 6), layer)
    with pytest.raises(ValueError, match=r"'1.weight' \(.*" + fix):
        gmp_ext.prune_step(model, 0.5)


def test_only_reparametrized_layers_say_so_not_exclude():
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="re-parametrized") as caught:
        gmp_ext.prune_step(model, 0.5)
    assert "after `exclude`" not in str(caught.value)
    parametrize.remove_parametrizations(model[0], "weight")
    assert gmp_ext.prune_step(model, 0.5) == {"0.weight": 0.5}


# -- names and patterns: one rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("fc.weight", "fc.weight", True),
        ("classifier", "classifier.weight", True),  # a module name: everything under it
        ("classifier", "classifier2.weight", False),
        ("layer.1", "layer.1.fc.weight", True),
        ("re:.*fc.*", "layer.1.fc.weight", True),
        ("re:fc", "layer.1.fc.weight", False),  # a regex matches the whole name
        (".*attn.*", "h.0.attn.c.weight", True),
        ("re:classifier", "classifier.weight", False),  # re: is only a regex
    ],
)
def test_one_pattern_rule(pattern, name, expected):
    assert matches(pattern, name) is expected


def features_and_classifier() -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("features", nn.Linear(8, 8))
    model.add_module("classifier", nn.Linear(8, 2))
    return model


def test_patterns_agree_between_exclude_layer_sparsity_and_params():
    model = features_and_classifier()
    assert list(gmp_ext.prune_step(model, 0.5, exclude=["classifier"])) == ["features.weight"]
    assert list(gmp_ext.prune_step(model, 0.5, exclude=["re:class.*"])) == ["features.weight"]
    assert list(gmp_ext.prune_step(model, 0.5, params=["classifier"])) == [
        "classifier.weight",
        "classifier.bias",
    ]
    model = features_and_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(
        model,
        opt,
        GMPSchedule(0.5, 0.5, 0, 1),
        steps_per_epoch=1,
        layer_sparsity={"classifier": 0.2},
    )
    assert gmp.layer_targets() == {"features.weight": 0.5, "classifier.weight": 0.2}


@pytest.mark.parametrize("where", ["exclude", "params", "layer_sparsity", "bad_regex"])
def test_a_pattern_matching_nothing_is_an_error(where):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {
        "exclude": lambda: gmp_ext.prune_step(model, 0.5, exclude=["classifer"]),
        "params": lambda: gmp_ext.prune_step(model, 0.5, params=["classifer"]),
        "layer_sparsity": lambda: GMP(
            model,
            opt,
            GMPSchedule(0.5, 0.5, 0, 1),
            steps_per_epoch=1,
            layer_sparsity={"classifer": 0.2},
        ),
        "bad_regex": lambda: gmp_ext.prune_step(model, 0.5, exclude=["re:classifer("]),
    }
    with pytest.raises(ValueError, match="classifer|not a regular expression"):
        calls[where]()
    assert unchanged(model, before) and gmp_ext.masks(model) == {}


# -- wrapper prefixes --------------------------------------------------------------------------


def test_wrapper_prefixes_data_parallel_and_compile():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    wrapped = torch.compile(nn.DataParallel(model))
    inner, prefix = unwrap(wrapped)
    assert inner is model and prefix == "_orig_mod.module."
    for name in ("_orig_mod.module.1.weight", "module.1.weight", "1.weight", "1"):
        assert list(gmp_ext.prune_step(wrapped, 0.5, exclude=[name])) == ["0.weight"]
    assert set(gmp_ext.masks(wrapped)) == {"0.weight"} == set(gmp_ext.masks(model))
    summary = gmp_ext.prune_step(
        wrapped, {"module.0.weight": 0.25, "_orig_mod.module.1.weight": 0.5}
    )
    assert summary == {"0.weight": 0.25, "1.weight": 0.5}


# -- frozen parameters -------------------------------------------------------------------------


def test_frozen_parameters_pruned_alike_by_prune_step_and_gmp():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    gmp = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1)
    assert set(gmp_ext.masks(model)) == {"0.weight", "1.weight"}
    assert int((model[0].weight == 0).sum()) == 32
    gmp.remove()


def test_trainable_parameter_outside_the_optimizer_names_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"\['0.weight'\] are pruned and trainable .* exclude="):
        GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1)
    gmp = GMP(model, opt, GMPSchedule(0.5, 0.5, 0, 1), steps_per_epoch=1, exclude=["0.weight"])
    assert set(gmp_ext.masks(model)) == {"1.weight"}
    gmp.remove()


# -- smaller ones ------------------------------------------------------------------------------


def test_zero_dim_tensor_sparsity_accepted_other_tensors_explained():
    model = nn.Sequential(nn.Linear(8, 8))
    assert gmp_ext.prune_step(model, torch.tensor(0.5)) == {"0.weight": 0.5}
    assert gmp_ext.prune_step(model, torch.tensor(0.75, dtype=torch.float64)) == {"0.weight": 0.75}
    with pytest.raises(ValueError, match=r"0-d real tensor, got a tensor of shape \[2\]"):
        gmp_ext.prune_step(model, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"finite number in \[0, 1\], got 1.5"):
        gmp_ext.prune_step(model, torch.tensor(1.5))


def test_gmp_warning_is_importable_from_the_top_level():
    from gmp_ext.training.controller import GMPWarning as from_controller

    assert gmp_ext.GMPWarning is from_controller and issubclass(GMPWarning, UserWarning)
