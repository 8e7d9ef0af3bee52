"""Deploying a pruned transformer: prune -> LoRA fine-tune and merge -> re-apply the masks ->
quantize -> re-apply -> check -> export -> reload in a fresh process.

    python examples/deploy_recipe.py [--out DIR] [--sparsity 0.9]

A tiny GPT-2 built from a config (no download) stands for a pruned model; a real run prunes
while training (``gmp_ext.GMP`` or the Trainer's ``GMPCallback``) and goes on from the same
point. Every step that rewrites weights after pruning puts values back where the masks prune:
a LoRA merge adds ``B @ A`` to every weight it targets, a quantizer whose grid has no exact zero
rounds a zero to its nearest grid value. ``gmp_ext.check_masks`` counts them per layer,
``gmp_ext.apply_masks`` re-zeroes them, and ``gmp_ext.export`` writes an ordinary dense
checkpoint (``from_pretrained`` and vLLM read it as it is) with the masks in a sidecar
(``gmp_masks.safetensors``, ``gmp_masks.json``) that ``gmp_ext.load_masks`` attaches again.
Needs transformers, peft and safetensors; runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import gmp_ext

# Run in a fresh interpreter: the exported directory is all it gets.
RELOAD = """
import sys, torch, gmp_ext
from transformers import AutoModelForSequenceClassification
directory, reference = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
gmp_ext.load_masks(model, directory)
check = gmp_ext.check_masks(model)
expected = torch.load(reference)
with torch.no_grad():
    logits = model(input_ids=expected["input_ids"]).logits
same = torch.equal(logits, expected["logits"])
print(f"fresh process: {len(gmp_ext.masks(model))} masks, refilled weights: {check.refilled}, "
      f"sparsity {gmp_ext.sparsity_report(model).sparsity:.4f}, logits identical: {same}")
sys.exit(0 if check.ok and same else 1)
"""


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, **tokens)
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(config)


def lora_fine_tune(model: nn.Module, steps: int) -> nn.Module:
    """Train LoRA adapters a few steps on random tokens, then merge them into the weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    wrapped = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 128, (8, 16), generator=generator)
        labels = torch.randint(0, 2, (8,), generator=generator)
        wrapped(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return wrapped.merge_and_unload()


def fake_quantize_(model: nn.Module, bits: int = 8) -> None:
    """Per-tensor asymmetric fake quantization with a float offset (the tensor's minimum), as
    min-max weight quantizers do: the grid ``min + k * scale`` rarely holds 0, so pruned
    weights come back as small non-zeros. (An integer zero point, as in
    ``torch.fake_quantize_per_tensor_affine``, keeps 0 exact.)"""
    levels = 2**bits - 1
    with torch.no_grad():
        for weight in gmp_ext.select_parameters(model).values():
            low, high = weight.min(), weight.max()
            scale = (high - low).clamp_min(1e-12) / levels
            weight.copy_(torch.round((weight - low) / scale) * scale + low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="export directory (default: a temporary one)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    model = tiny_gpt2()
    gmp_ext.prune_step(model, args.sparsity)
    print(f"pruned: {len(gmp_ext.masks(model))} weights at {args.sparsity:.0%} sparsity")

    model = lora_fine_tune(model, steps=3)  # merge_and_unload returns the pruned model itself
    check = gmp_ext.check_masks(model)
    print(f"after the LoRA merge: {check.refilled} pruned weights are non-zero again\n{check}")
    gmp_ext.apply_masks(model)
    assert gmp_ext.check_masks(model).ok

    fake_quantize_(model)
    check = gmp_ext.check_masks(model)
    print(f"after 8-bit fake quantization: {check.refilled} pruned weights are non-zero again")
    gmp_ext.apply_masks(model)  # the pruned weights are exact zeros again (0 is off the grid)
    check = gmp_ext.check_masks(model)
    assert check.ok, check
    print(f"re-applied: {check.pruned} pruned weights, all zero")

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch) / "export"
        written = gmp_ext.export(model, directory)
        print(f"exported to {directory}: {sorted(p.name for p in Path(directory).iterdir())}")
        print(f"  ({len(written)} masks in the sidecar; config.json is the model's own)")
        input_ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids).logits
        reference = Path(scratch) / "reference.pt"
        torch.save({"input_ids": input_ids, "logits": logits}, reference)
        done = subprocess.run(
            [sys.executable, "-P", "-c", RELOAD, str(directory), str(reference)], check=False
        )
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
