"""gmp_ext.export / load_masks: a dense checkpoint any loader reads, its masks in a sidecar; and
save_sparse keeping an existing transformers config.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext import GMPSchedule
from gmp_ext.deploy import exporter

from .test_integrations import lightning_run
from .utils import TokenPairs, assert_same, tiny_bert, tiny_gpt2

pytest.importorskip("safetensors")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]

# peft's get_peft_model reads a deprecated transformers property.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


class Tied(nn.Module):
    """A plain module with a tied head, a norm with buffers and an unpruned bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 24)
        self.norm = nn.BatchNorm1d(24)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight


def vllm_refuses(config: object) -> bool:
    """vLLM's rule: a quantization_config (compressed-tensors' sparsity among them), or a
    sparsity_config with targets anywhere in the config."""

    def walk(node: object) -> bool:
        if isinstance(node, dict):
            sparsity = node.get("sparsity_config")
            if isinstance(sparsity, dict) and sparsity.get("targets"):
                return True
            return any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)

    return isinstance(config, dict) and ("quantization_config" in config or walk(config))


def states_identical(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert_same(actual[name], tensor, name)


# -- transformers models -----------------------------------------------------------------------

# Loads each directory as a fresh process would and saves what it got, masks included.
RELOAD = """
import sys, torch, gmp_ext
from transformers import AutoModelForSequenceClassification
for directory in sys.argv[1:]:
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    gmp_ext.load_masks(model, directory)
    torch.save(
        {"state": model.state_dict(), "masks": gmp_ext.masks(model),
         "ok": gmp_ext.check_masks(model).ok},
        directory + "/reloaded.pt",
    )
"""


def test_transformers_models_reload_bit_exact_in_a_fresh_process(tmp_path):
    models = {"gpt2": tiny_gpt2(), "bert": tiny_bert(), "gpt2_sharded": tiny_gpt2()}
    for name, model in models.items():
        gmp_ext.prune_step(model, 0.9)
        shard = {"max_shard_size": "20KB"} if name == "gpt2_sharded" else {}
        written = gmp_ext.export(model, tmp_path / name, **shard)
        assert written == list(gmp_ext.masks(model))
        plain = tmp_path / f"{name}_plain"
        model.save_pretrained(plain)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config == json.loads((plain / "config.json").read_text())  # the model's own
        assert config["model_type"] == model.config.model_type
        assert not vllm_refuses(config), config
    shards = sorted(p.name for p in (tmp_path / "gpt2_sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "gpt2_sharded/model.safetensors.index.json").is_file()

    done = subprocess.run(
        [sys.executable, "-P", "-c", RELOAD, *(str(tmp_path / n) for n in models)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, model in models.items():
        reloaded = torch.load(tmp_path / name / "reloaded.pt", weights_only=True)
        states_identical(model.state_dict(), reloaded["state"])  # every zero, bit for bit
        masks = gmp_ext.masks(model)
        assert sorted(reloaded["masks"]) == sorted(masks)
        for param, keep in masks.items():
            assert torch.equal(reloaded["masks"][param], keep), param
        assert reloaded["ok"], name


def test_sidecar_records_the_masks_and_the_gmp_run(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = GMPSchedule(0.0, 0.5, 0, 2, 1)
    gmp = gmp_ext.GMP(model, optimizer, schedule, steps_per_epoch=2, nm=(2, 4))
    for _ in range(3):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    gmp_ext.export(model, tmp_path)
    info = json.loads((tmp_path / "gmp_masks.json").read_text())
    assert info["format"] == 1 and info["gmp_ext_version"] == gmp_ext.__version__
    assert info["weights"] == "safetensors"
    assert sorted(info["masks"]) == ["0.weight", "2.weight"]
    first = info["masks"]["0.weight"]
    assert first["shape"] == [32, 16] and first["dtype"] == "float32"
    assert first["pattern"] == [2, 4] and first["target"] == gmp.layer_targets()["0.weight"]
    assert first["kept"] == int(gmp_ext.masks(model)["0.weight"].sum())
    run = info["controller"]
    assert run["step"] == 3 and run["epoch"] == 1.5 and run["stage"] == "pruning"
    assert run["config"]["nm"] == [2, 4] and run["config"]["steps_per_epoch"] == 2
    packed = safetensors_torch.load_file(str(tmp_path / "gmp_masks.safetensors"))
    assert packed["0.weight"].dtype == torch.uint8 and packed["0.weight"].numel() == 32 * 16 // 8
    keep = gmp_ext.kernels.ops.unpack_mask(packed["0.weight"], (32, 16))
    assert torch.equal(keep, gmp_ext.masks(model)["0.weight"])

    gmp.remove()
    gmp_ext.prune_step(model, 0.5)  # no controller: no run, no known pattern
    gmp_ext.export(model, tmp_path)
    info = json.loads((tmp_path / "gmp_masks.json").read_text())
    assert info["controller"] is None and info["masks"]["0.weight"]["pattern"] is None


# -- plain modules and resuming ----------------------------------------------------------------


def test_plain_module_round_trip_with_a_tied_weight(tmp_path):
    model = Tied()
    gmp_ext.prune_step(model, 0.9, params=["fc.weight", "head.weight"])
    wrapped = torch.nn.DataParallel(model)  # wrappers are seen through
    assert gmp_ext.export(wrapped, tmp_path) == ["fc.weight", "head.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gmp_masks.json",
        "gmp_masks.safetensors",
        "model.safetensors",
    ]
    fresh = Tied()
    with torch.no_grad():
        fresh.fc.weight.add_(1.0)
    safetensors_torch.load_model(fresh, str(tmp_path / "model.safetensors"))
    states_identical(model.state_dict(), fresh.state_dict())
    assert fresh.head.weight is fresh.embed.weight
    assert gmp_ext.load_masks(fresh, tmp_path) == ["fc.weight", "head.weight"]
    expected = gmp_ext.masks(model)
    assert sorted(gmp_ext.masks(fresh)) == sorted(expected)
    for name, keep in gmp_ext.masks(fresh).items():
        assert torch.equal(keep, expected[name]), name
    assert gmp_ext.check_masks(fresh).ok


def test_masks_follow_the_device(tmp_path, device):
    """Exported from a model on ``device``, attached to one on ``device``, checked there."""
    model = nn.Sequential(nn.Linear(16, 40), nn.Linear(40, 8)).to(device)
    gmp_ext.prune_step(model, 0.7)
    gmp_ext.export(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(16, 40), nn.Linear(40, 8))
    safetensors_torch.load_model(fresh, str(tmp_path / "model.safetensors"))
    fresh.to(device)
    gmp_ext.load_masks(fresh, tmp_path)
    states_identical(model.state_dict(), fresh.state_dict())
    for name, keep in gmp_ext.masks(fresh).items():
        assert keep.device.type == device.type and torch.equal(keep, gmp_ext.masks(model)[name])
    assert gmp_ext.check_masks(fresh).ok
    with torch.no_grad():
        fresh[0].weight.add_(1.0)
    assert gmp_ext.check_masks(fresh).as_dict() == {"0.weight": 448, "1.weight": 0}


def test_load_masks_resumes_training_with_the_same_masks(tmp_path):
    model = Tied()
    gmp_ext.prune_step(model, 0.8, params=["fc.weight"])
    gmp_ext.export(model, tmp_path)
    resumed = Tied()
    safetensors_torch.load_model(resumed, str(tmp_path / "model.safetensors"))
    gmp_ext.load_masks(resumed, tmp_path)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    gmp_ext.attach(resumed, optimizer)
    before = resumed.fc.weight.detach().clone()
    keep = gmp_ext.masks(model)["fc.weight"]
    for _ in range(3):
        resumed.norm(resumed.fc(resumed.embed(torch.randint(0, 40, (8,))))).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = resumed.fc.weight.detach()
    assert torch.equal(gmp_ext.masks(resumed)["fc.weight"], keep)
    assert not bool(weight[~keep].any())  # the pruned weights stayed zero
    assert bool((weight[keep] != before[keep]).all())  # the kept ones trained
    assert gmp_ext.check_masks(resumed).ok


def test_load_masks_into_a_lora_wrapped_copy(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    gmp_ext.prune_step(model, 0.9)
    gmp_ext.export(model, tmp_path)
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(tiny_gpt2(), config)
    assert gmp_ext.load_masks(wrapped, tmp_path) == list(gmp_ext.masks(model))
    assert sorted(gmp_ext.masks(wrapped)) == sorted(gmp_ext.masks(model))
    report = gmp_ext.check_masks(wrapped)  # the copy holds dense weights: all of them refill
    assert report.refilled == report.pruned > 0
    with pytest.raises(ValueError, match=r"PEFT adapter layers .*merge_and_unload"):
        gmp_ext.export(wrapped, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# -- errors ------------------------------------------------------------------------------------


def test_load_masks_errors_name_the_problem_and_attach_nothing(tmp_path):
    model = Tied()
    gmp_ext.prune_step(model, 0.9, params=["fc.weight", "head.weight"])
    gmp_ext.export(model, tmp_path)

    with pytest.raises(FileNotFoundError, match=r"no gmp_masks.json in .*nothing"):
        gmp_ext.load_masks(Tied(), tmp_path / "nothing")
    other = Tied()
    other.fc = nn.Linear(16, 12)
    with pytest.raises(ValueError, match=r"'fc.weight': mask of shape \[24, 16\], parameter \[12,"):
        gmp_ext.load_masks(other, tmp_path)
    assert gmp_ext.masks(other) == {}
    fewer = Tied()
    del fewer.fc
    with pytest.raises(ValueError, match=r"no parameter named \['fc.weight'\]"):
        gmp_ext.load_masks(fewer, tmp_path)
    assert gmp_ext.masks(fewer) == {}
    with pytest.raises(ValueError, match=r"already holds masks .*gmp_ext.remove\(model\)"):
        gmp_ext.load_masks(model, tmp_path)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gmp_ext.load_masks(model.state_dict(), tmp_path)

    info = json.loads((tmp_path / "gmp_masks.json").read_text())
    (tmp_path / "gmp_masks.json").write_text(json.dumps({**info, "format": 99}))
    with pytest.raises(ValueError, match=r"not a gmp_ext mask sidecar of format 1 \(format: 99\)"):
        gmp_ext.load_masks(Tied(), tmp_path)
    del info["masks"]["fc.weight"]
    (tmp_path / "gmp_masks.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"lists the masks \[.head.weight.\] but"):
        gmp_ext.load_masks(Tied(), tmp_path)
    (tmp_path / "gmp_masks.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no gmp_masks.safetensors"):
        gmp_ext.load_masks(Tied(), tmp_path)


def test_export_errors_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds no masks for this model"):
        gmp_ext.export(Tied(), out)
    model = Tied()
    gmp_ext.prune_step(model, 0.9, params=["fc.weight"])
    with pytest.raises(ValueError, match=r"max_shard_size='1GB': a module without save_pretrained"):
        gmp_ext.export(model, out, max_shard_size="1GB")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gmp_ext.export(model.state_dict(), out)
    assert not out.exists()


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    model = Tied()
    gmp_ext.prune_step(model, 0.9, params=["fc.weight"])
    gmp_ext.export(model, tmp_path / "done")
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ImportError, match=r"pip install 'gmp_ext\[deploy\]'"):
        gmp_ext.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=r"pip install 'gmp_ext\[deploy\]'"):
        gmp_ext.load_masks(Tied(), tmp_path / "done")
    assert gmp_ext.check_masks(model).ok  # needs no optional package


# -- save_sparse beside save_pretrained --------------------------------------------------------


def test_save_sparse_leaves_a_save_pretrained_directory_loadable(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = tiny_gpt2()
    gmp_ext.prune_step(model, 0.9)
    model.save_pretrained(tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    with pytest.raises(ValueError, match=r"transformers config \(model_type 'gpt2'\).*export"):
        gmp_ext.save_sparse(model, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    transformers = pytest.importorskip("transformers")
    loaded = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf")
    states_identical(model.state_dict(), loaded.state_dict())
    for _ in range(2):  # its own directory: a second save replaces what the first wrote
        gmp_ext.save_sparse(model, tmp_path / "archive")
        config = json.loads((tmp_path / "archive" / "config.json").read_text())
        assert list(config) == ["quantization_config"]
    loaded = tiny_gpt2()
    gmp_ext.load_sparse(loaded, tmp_path / "archive")
    states_identical(model.state_dict(), loaded.state_dict())


def test_save_sparse_refuses_a_config_it_would_damage(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = nn.Sequential(nn.Linear(16, 24))
    gmp_ext.prune_step(model, 0.9)
    cases = {
        "other": ({"hidden": 3}, r"save_sparse did not write it \(keys \['hidden'\]\)"),
        "quantized": (
            {"quantization_config": {"quant_method": "awq", "bits": 4}},
            r"save_sparse did not write it \(keys \['quantization_config'\]\)",
        ),
        "list": ([1, 2], "not a JSON object"),
    }
    for name, (content, match) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            gmp_ext.save_sparse(model, folder)
        assert json.loads((folder / "config.json").read_text()) == content
        assert not (folder / "model.safetensors").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="exists and is not JSON"):
        gmp_ext.save_sparse(model, tmp_path / "broken")


# -- the callbacks' export_to ------------------------------------------------------------------


def pruned_by_load(model: nn.Module, directory: Path, sparsity: float) -> None:
    """The masks in ``directory`` attach to ``model``, prune ``sparsity`` of each weight, and
    its weights hold their zeros."""
    gmp_ext.load_masks(model, directory)
    for name, keep in gmp_ext.masks(model).items():
        assert int((~keep).sum()) == round(sparsity * keep.numel()), name
    assert gmp_ext.check_masks(model).ok


def test_hf_callback_exports_at_the_end_of_training(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback

    callback = GMPCallback(
        GMPSchedule(0.2, 0.9, 0, 1, 0.5), export_to=tmp_path / "export", remove_on_train_end=True
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=TokenPairs(vocab=64, low=3),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.gmp is None and gmp_ext.masks(trainer.model) == {}  # exported, then removed
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    states_identical(trainer.model.state_dict(), loaded.state_dict())
    pruned_by_load(loaded, tmp_path / "export", 0.9)
    assert json.loads((tmp_path / "export/gmp_masks.json").read_text())["controller"]["step"] == 4


@pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)
def test_lightning_callback_exports_at_the_end_of_fit(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _, callback = lightning_run(
        tmp_path, max_epochs=2, export_to=tmp_path / "out", remove_on_fit_end=True
    )
    assert callback.gmp is None and gmp_ext.masks(model) == {}
    fresh = type(model)()
    safetensors_torch.load_model(fresh, str(tmp_path / "out" / "model.safetensors"))
    states_identical(model.state_dict(), fresh.state_dict())
    pruned_by_load(fresh, tmp_path / "out", 0.6)  # the schedule's final sparsity


# -- the recipe --------------------------------------------------------------------------------


def test_deploy_recipe_example_runs(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-P", str(ROOT / "examples" / "deploy_recipe.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"},
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "after the LoRA merge: " in done.stdout and "re-applied: " in done.stdout
    assert "refilled weights: 0" in done.stdout and "logits identical: True" in done.stdout
    assert (tmp_path / "gmp_masks.json").is_file() and (tmp_path / "config.json").is_file()
    assert elapsed < 30, elapsed
    assert exporter.MASKS_FILE in {p.name for p in tmp_path.iterdir()}
