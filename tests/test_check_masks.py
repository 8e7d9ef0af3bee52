"""gmp_ext.check_masks: the weights that came back where the masks prune, per layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gmp_ext

# peft's get_peft_model reads a deprecated transformers property.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_counts_refilled_weights_per_layer():
    model = net()
    gmp_ext.prune_step(model, 0.75)
    check = gmp_ext.check_masks(model)
    assert check.ok and check.refilled == 0
    assert [(r.name, r.shape, r.pruned) for r in check.rows] == [
        ("0.weight", (32, 16), 384),
        ("2.weight", (8, 32), 192),
    ]
    keep = gmp_ext.masks(model)["0.weight"]
    pruned = (~keep).nonzero()
    kept = keep.nonzero()[0]
    with torch.no_grad():
        model[0].weight[tuple(pruned[0])] = 0.5
        model[0].weight[tuple(pruned[1])] = -2.0
        model[0].weight[tuple(pruned[2])] = float("nan")
        model[0].weight[tuple(pruned[3])] = -0.0  # a zero all the same
        model[0].weight[tuple(kept)] = 7.0  # kept weights are not counted
        model[2].bias.fill_(3.0)  # nor unmasked parameters
    check = gmp_ext.check_masks(model)
    assert not check.ok and check.refilled == 3
    assert check.as_dict() == {"0.weight": 3, "2.weight": 0}
    assert math.isnan(check.rows[0].max_abs) and check.rows[1].max_abs == 0.0
    with torch.no_grad():
        model[0].weight[tuple(pruned[2])] = 0.0
    assert gmp_ext.check_masks(model).rows[0].max_abs == 2.0
    lines = str(gmp_ext.check_masks(model)).splitlines()
    assert lines[0].split() == ["name", "shape", "pruned", "refilled", "max", "|w|"]
    assert lines[1].split() == ["0.weight", "32x16", "384", "2", "2"]
    assert lines[-1].split() == ["total", "576", "2", "2"]
    assert gmp_ext.apply_masks(model) == 2
    assert gmp_ext.check_masks(model).ok


def test_names_of_a_model_holding_a_pruned_submodule():
    pruned = net()
    gmp_ext.prune_step(pruned, 0.5)
    outer = nn.Sequential(pruned, nn.Linear(8, 2))
    assert [r.name for r in gmp_ext.check_masks(outer).rows] == ["0.0.weight", "0.2.weight"]
    assert [r.name for r in gmp_ext.check_masks(pruned[0]).rows] == ["weight"]


def test_no_masks_and_non_modules_are_errors():
    with pytest.raises(ValueError, match="holds no masks for this model"):
        gmp_ext.check_masks(net())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gmp_ext.check_masks(net().state_dict())


def test_lora_merge_refills_and_apply_masks_restores():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, pad_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(config)
    gmp_ext.prune_step(model, 0.9)
    lora = peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    merged = peft.get_peft_model(model, lora).merge_and_unload()
    check = gmp_ext.check_masks(merged)
    assert not check.ok
    refilled = {name for name, count in check.as_dict().items() if count}
    assert refilled == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    for row in check.rows:
        if row.name in refilled:  # the LoRA delta is dense: every pruned weight came back
            assert row.refilled == row.pruned == round(0.9 * 32 * 96), row
    gmp_ext.apply_masks(merged)
    assert gmp_ext.check_masks(merged).ok


def test_a_quantizer_without_an_exact_zero_refills():
    model = net()
    gmp_ext.prune_step(model, 0.9)
    weight = model[0].weight
    with torch.no_grad():
        # An integer zero point keeps 0 on the grid: nothing comes back.
        scale = float(weight.abs().max()) / 127
        weight.copy_(torch.fake_quantize_per_tensor_affine(weight, scale, 3, -128, 127))
    assert gmp_ext.check_masks(model).ok
    with torch.no_grad():
        # Min-max quantization with a float offset: the grid min + k * scale misses 0.
        low, high = weight.min(), weight.max()
        step = (high - low) / 255
        weight.copy_(torch.round((weight - low) / step) * step + low)
    check = gmp_ext.check_masks(model)
    assert check.as_dict() == {"0.weight": round(0.9 * 512), "2.weight": 0}
    assert 0 < check.rows[0].max_abs <= float(step) / 2 + 1e-7
    gmp_ext.apply_masks(model)
    assert gmp_ext.check_masks(model).ok
