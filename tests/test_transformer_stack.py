"""The models of today's fine-tuning stack, built from configs (no downloads): BERT, GPT-2
(transformers' Conv1D), a Llama decoder, nn.TransformerEncoder, a ConvNet with a transposed
convolution, and GPT-2 under PEFT/LoRA. Every matmul weight is selected and pruned exactly, N:M
runs along each weight's reduction dimension (checked here by an independent reshape; on every
device present: the CUDA cases run where a GPU is), masks survive wrappers and a LoRA merge, and
the Hugging Face Trainer with fused AdamW, bf16 and gradient accumulation prunes exactly and
resumes mid-pruning bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import GMPSchedule, GMPWarning

from .utils import TokenPairs, tiny_bert, tiny_gpt2

transformers = pytest.importorskip("transformers")

# peft's get_peft_model reads a deprecated transformers property.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
    )


MODELS = {
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
    "llama": llama,
    "encoder": encoder,
    "convnet": convnet,
}


def matmul_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """{name: (weight, reduction dim)} of every matmul weight, enumerated here independently
    of gmp_ext: what the layer's forward reduces over."""
    found: dict[str, tuple[torch.Tensor, int]] = {}
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, *convs)):
            found[prefix + "weight"] = (module.weight, 1)  # [out, in, *kernel]
        elif isinstance(module, transposed):
            found[prefix + "weight"] = (module.weight, 0)  # [in, out, *kernel]
        elif isinstance(module, transformers.pytorch_utils.Conv1D):
            found[prefix + "weight"] = (module.weight, 0)  # y = x @ W, W [in, out]
        elif isinstance(module, nn.MultiheadAttention):
            found[prefix + "in_proj_weight"] = (module.in_proj_weight, 1)  # [3 embed, embed]
    return found


def input_groups(weight: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """Groups of m consecutive weights along the input dimension (at each kernel position)."""
    return weight.detach().movedim(dim, -1).reshape(-1, m)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_selection_prunes_every_matmul_weight_exactly(name, device):
    model = MODELS[name]().to(device)
    expected = matmul_weights(model)
    achieved = gmp_ext.prune_step(model, 0.9)
    assert set(achieved) == set(expected)
    for key, (weight, _) in expected.items():
        zeros = int((weight == 0).sum())
        assert zeros == round(0.9 * weight.numel()), key
    report = gmp_ext.sparsity_report(model)
    assert report.numel == sum(w.numel() for w, _ in expected.values())
    assert report.zeros == sum(int((w == 0).sum()) for w, _ in expected.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_global_scope_prunes_the_total_exactly(name):
    model = MODELS[name]()
    expected = matmul_weights(model)
    gmp_ext.prune_step(model, 0.9, scope="global")
    total = sum(w.numel() for w, _ in expected.values())
    assert sum(int((w == 0).sum()) for w, _ in expected.values()) == round(0.9 * total)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", list(MODELS))
def test_nm_runs_along_the_reduction_dimension(name, scope, device):
    model = MODELS[name]().to(device)
    expected = matmul_weights(model)
    gmp_ext.prune_step(model, 0.25, nm=(2, 4), scope=scope)  # halfway: no group over m - n
    for key, (weight, dim) in expected.items():
        assert int((input_groups(weight, dim, 4) == 0).sum(1).max()) <= 2, key
    gmp_ext.prune_step(model, 0.5, nm=(2, 4), scope=scope)
    for key, (weight, dim) in expected.items():
        kept = (input_groups(weight, dim, 4) != 0).sum(1)
        assert bool((kept == 2).all()), f"{key} is not 2:4 along dimension {dim}"
        assert gmp_ext.is_nm_sparse(weight, 2, 4, reduction_dim=dim), key
        masks = gmp_ext.masks(model)[key]
        assert torch.equal(masks, weight != 0), key  # the mask is in the weight's own order


def test_gpt2_conv1d_groups_are_input_features_not_output_features():
    model = tiny_gpt2()
    gmp_ext.prune_step(model, 0.5, nm=(2, 4))
    weight = model.transformer.h[0].attn.c_attn.weight  # [in 32, out 96]
    assert gmp_ext.is_nm_sparse(weight, reduction_dim=0)
    assert not gmp_ext.is_nm_sparse(weight, reduction_dim=1)


def test_gpt2_lm_head_tied_to_the_embedding_is_left_out_with_a_warning():
    model = tiny_gpt2(lm_head=True)
    with pytest.warns(GMPWarning, match=r"'lm_head.weight' \(also 'transformer.wte.weight'"):
        achieved = gmp_ext.prune_step(model, 0.9)
    assert set(achieved) == set(matmul_weights(model)) - {"lm_head.weight"}
    assert int((model.transformer.wte.weight == 0).sum()) == 0


def test_multihead_attention_with_separate_projections():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=8)
    achieved = gmp_ext.prune_step(attention, 0.5, nm=(2, 4))
    names = ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    assert sorted(achieved) == sorted(names)
    for name in names:
        weight = attention.get_parameter(name)
        assert bool(((input_groups(weight, 1, 4) != 0).sum(1) == 2).all()), name


def test_a_registered_layer_is_selected_with_its_layout(monkeypatch):
    class Projection(nn.Module):  # y = x @ kernel, kernel [in, out]
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.kernel

    model = nn.Sequential(Projection(), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"no matmul weight .* gmp_ext.register_layer"):
        gmp_ext.prune_step(model, 0.5)
    # The registry as it was comes back after the test.
    monkeypatch.setattr(gmp_ext.model.layers, "_REGISTERED", dict(gmp_ext.model.layers._REGISTERED))
    gmp_ext.register_layer(Projection, weight="kernel", reduction_dim=0)
    assert list(gmp_ext.prune_step(model, 0.5, nm=(2, 4))) == ["0.kernel"]
    assert bool(((input_groups(model[0].kernel, 0, 4) != 0).sum(1) == 2).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cls": nn.Linear(2, 2)}, "cls must be a subclass of torch.nn.Module"),
        ({"cls": nn.Linear, "weight": "a.b"}, "weight must be an attribute name"),
        ({"cls": nn.Linear, "weight": []}, "weight must be an attribute name"),
        ({"cls": nn.Linear, "reduction_dim": -1}, "reduction_dim must be a non-negative"),
        ({"cls": nn.Linear, "reduction_dim": True}, "reduction_dim must be a non-negative"),
    ],
)
def test_register_layer_rejects_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gmp_ext.register_layer(**kwargs)
    assert list(gmp_ext.prune_step(nn.Linear(4, 4), 0.5)) == ["weight"]  # nothing registered


def test_nm_on_a_reduction_dimension_not_a_multiple_of_m_names_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))  # 3 input channels
    before = model[0].weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"'0.weight' .* reduction \(input\) dimension 1, of size 3"
    ):
        gmp_ext.prune_step(model, 0.5, nm=(2, 4))
    assert torch.equal(model[0].weight, before)


# -- wrappers: PEFT and enclosing modules ------------------------------------------------------


def lora(model: nn.Module) -> nn.Module:
    peft_lib = pytest.importorskip("peft")
    config = peft_lib.LoraConfig(
        r=4,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    return peft_lib.get_peft_model(model, config)


def test_peft_model_default_selection_is_the_base_weights_under_base_names():
    base_names = set(matmul_weights(tiny_gpt2()))
    wrapped = lora(tiny_gpt2())
    achieved = gmp_ext.prune_step(wrapped, 0.9)
    assert set(achieved) == base_names  # no lora_A / lora_B, no base_layer in the names
    base = wrapped.base_model.model
    for name in base_names:
        weight = gmp_ext.model.parameters.parameter_by_name(base, name)
        assert int((weight == 0).sum()) == round(0.9 * weight.numel()), name
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            assert int((param == 0).sum()) == 0, name


def test_peft_task_head_prunes_the_trained_copy_merge_keeps():
    peft_lib = pytest.importorskip("peft")
    config = peft_lib.LoraConfig(
        r=4, task_type="SEQ_CLS", target_modules=["c_attn"], fan_in_fan_out=True
    )
    wrapped = peft_lib.get_peft_model(tiny_gpt2(), config)
    head = wrapped.base_model.model.score  # a ModulesToSaveWrapper: original + trained copy
    achieved = gmp_ext.prune_step(wrapped, 0.5)
    assert set(achieved) == set(matmul_weights(tiny_gpt2()))
    assert int((head.modules_to_save["default"].weight == 0).sum()) == 32
    assert int((head.original_module.weight == 0).sum()) == 0  # frozen, unused: left alone
    merged = wrapped.merge_and_unload()
    assert gmp_ext.apply_masks(merged) == len(achieved)
    assert set(gmp_ext.masks(merged)) == set(achieved)
    assert int((merged.score.weight == 0).sum()) == 32


def test_masks_of_a_pruned_model_survive_peft_wrapping_training_and_merge():
    model = tiny_gpt2()
    gmp_ext.prune_step(model, 0.9)
    names = set(gmp_ext.masks(model))
    wrapped = lora(model)
    assert set(gmp_ext.masks(wrapped)) == names
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    gmp_ext.attach(wrapped, optimizer)
    ids = torch.randint(3, 64, (4, 8))
    for _ in range(2):
        wrapped(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gmp_ext.apply_masks(wrapped) == len(names)
    merged = wrapped.merge_and_unload()
    assert merged is model
    refilled = gmp_ext.sparsity_report(merged)
    assert refilled.sparsity < 0.9  # the LoRA delta filled the pruned weights in
    assert gmp_ext.apply_masks(merged) == len(names)  # the one call that restores sparsity
    for name, keep in gmp_ext.masks(merged).items():
        weight = merged.get_parameter(name)
        assert torch.equal(weight != 0, keep), name
        assert int((~keep).sum()) == round(0.9 * weight.numel()), name


def test_model_level_calls_find_masks_held_by_a_submodule():
    pruned = convnet()
    gmp_ext.prune_step(pruned, 0.75)
    head = nn.Linear(8, 2)
    outer = nn.Sequential(pruned, head)
    assert set(gmp_ext.masks(outer)) == {f"0.{n}" for n in gmp_ext.masks(pruned)}
    with torch.no_grad():
        for param in pruned.parameters():
            param.add_(1.0)  # refill every pruned weight
    assert gmp_ext.apply_masks(outer) == 3
    report = gmp_ext.sparsity_report(outer)
    assert set(report.as_dict()) == set(gmp_ext.masks(outer))
    assert report.zeros == sum(int((~k).sum()) for k in gmp_ext.masks(outer).values())
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.1, momentum=0.9)
    handle = gmp_ext.attach(outer, optimizer, mask_gradients=True)
    outer(torch.randn(2, 4, 6, 6)).sum().backward()
    assert gmp_ext.zero_pruned_grads(outer) == 3
    optimizer.step()
    assert gmp_ext.zero_pruned_state(outer, optimizer) == 3
    for name, keep in gmp_ext.masks(outer).items():
        assert not bool(outer.get_parameter(name)[~keep].any()), name
    handle.remove()
    with pytest.raises(ValueError, match=r"submodule '0' of this model already holds"):
        gmp_ext.prune_step(outer, 0.5)
    with pytest.raises(ValueError, match=r"this module is '0' of a model"):
        gmp_ext.remove(pruned[0])
    assert gmp_ext.remove(outer) == 3
    assert gmp_ext.masks(pruned) == {} and gmp_ext.masks(outer) == {}


def test_a_compiled_pruned_submodule_is_found_once():
    pruned = convnet()
    gmp_ext.prune_step(pruned, 0.75)
    outer = nn.Sequential(torch.compile(pruned), nn.Linear(8, 2))
    names = {f"0._orig_mod.{n}" for n in gmp_ext.masks(pruned)}
    assert set(gmp_ext.masks(outer)) == names  # the outer model's own parameter names
    assert names <= set(dict(outer.named_parameters()))
    assert gmp_ext.apply_masks(outer) == 3
    assert gmp_ext.remove(outer) == 3


# -- the Hugging Face Trainer: fused AdamW, bf16, accumulation, resume --------------------------


SCHEDULE = GMPSchedule(0.2, 0.9, 0, 2, 0.5)  # updates at epochs 0, 0.5, 1, 1.5, 2


def trainer_run(output_dir, resume=None, save_steps=None):
    from gmp_ext.integrations.transformers import GMPCallback

    callback = GMPCallback(SCHEDULE)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # 2 optimizer steps per epoch
        num_train_epochs=3,
        learning_rate=1e-3,
        optim="adamw_torch_fused",
        bf16=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=TokenPairs(vocab=64, low=3),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_trainer_with_fused_adamw_bf16_and_accumulation_prunes_gpt2_exactly(tmp_path):
    trainer, callback = trainer_run(tmp_path)
    assert callback.gmp.steps_per_epoch == 2
    assert callback.gmp.step_count == trainer.state.global_step == 6
    for name, (weight, _) in matmul_weights(trainer.model).items():
        assert int((weight == 0).sum()) == round(0.9 * weight.numel()), name


def test_trainer_resumes_gpt2_mid_pruning_bit_for_bit(tmp_path):
    reference, _ = trainer_run(tmp_path / "full")
    trainer_run(tmp_path / "run", save_steps=3)  # after the update at epoch 1.5 of 2
    resumed, callback = trainer_run(tmp_path / "run", resume=str(tmp_path / "run/checkpoint-3"))
    assert callback.gmp.step_count == 6
    for name, param in reference.model.named_parameters():
        assert torch.equal(param, resumed.model.get_parameter(name)), name


def test_save_sparse_labels_2_4_only_for_rows_along_the_reduction_dimension(tmp_path):
    pytest.importorskip("compressed_tensors")
    gpt2 = tiny_gpt2()  # Conv1D [in, out]: 2:4 along dim 0, not along the stored rows
    gmp_ext.prune_step(gpt2, 0.5, nm=(2, 4))
    with pytest.raises(ValueError, match=r"sparse-24-bitmask.*transformer.h.0.attn.c_attn"):
        gmp_ext.save_sparse(gpt2, tmp_path / "forced", format="sparse-24-bitmask")
    gmp_ext.save_sparse(gpt2, tmp_path / "auto")
    config = (tmp_path / "auto" / "config.json").read_text()
    assert '"format": "sparse-bitmask"' in config
    llama_model = llama()  # Linear [out, in]: 2:4 along the rows, which the format packs
    gmp_ext.prune_step(llama_model, 0.5, nm=(2, 4))
    gmp_ext.save_sparse(llama_model, tmp_path / "llama")
    assert '"format": "sparse-24-bitmask"' in (tmp_path / "llama" / "config.json").read_text()
