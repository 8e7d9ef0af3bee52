"""Lightning and Hugging Face Trainer callbacks, run with the real libraries on tiny models."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import nn

from gmp_ext import GMPWarning
from gmp_ext.kernels import ops
from gmp_ext.training.schedule import GMPSchedule

from .utils import TokenPairs, without_regrowth

SCHEDULE = GMPSchedule(0.1, 0.6, 0, 2, 0.5)


def assert_exact(model: nn.Module, names: list[str], sparsity: float) -> None:
    weights = dict(model.named_parameters())
    for name in names:
        p = weights[name]
        assert int((p == 0).sum()) == ops.prune_count(p.numel(), sparsity), name


@pytest.mark.parametrize(
    ("module", "missing"),
    [
        ("gmp_ext.integrations.lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"]),
        ("gmp_ext.integrations.transformers", ["transformers", "transformers.trainer_utils"]),
    ],
)
def test_missing_library_raises_a_clear_import_error(monkeypatch, module, missing):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.import_module("gmp_ext.integrations")  # the package itself needs neither
    with pytest.raises(ImportError, match=f"pip install {missing[0]}"):
        importlib.import_module(module)


# -- Lightning ------------------------------------------------------------------------------

# Lightning's own warnings (no workers, deprecated torch APIs it uses) are not under test; ours
# still fail the test.
lightning_noise = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "error::gmp_ext.training.controller.GMPWarning",
)


def lightning_run(
    tmp_path, max_epochs: int, ckpt_path=None, save_as=None, logger=False, **gmp_kwargs
):
    pl = pytest.importorskip("lightning.pytorch")
    from gmp_ext.integrations.lightning import GMPCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(8, 24)
            self.fc2 = nn.Linear(24, 2)

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 8, generator=g), torch.arange(40) % 2)
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 5 batches
    callback = GMPCallback(SCHEDULE, fine_tune_weight_decay=0.0, **gmp_kwargs)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        accelerator="cpu",
        accumulate_grad_batches=2,  # 3 optimizer steps per epoch: the last one after 1 batch
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Tiny()
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    if save_as is not None:
        trainer.save_checkpoint(save_as)
    return model, trainer, callback


@lightning_noise
def test_lightning_prunes_to_the_schedule(tmp_path):
    model, trainer, callback = lightning_run(tmp_path, max_epochs=3)
    gmp = callback.gmp
    assert gmp.steps_per_epoch == 3 and gmp.step_count == trainer.global_step == 9
    assert gmp.stage == "fine_tuning"
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.0
    assert_exact(model, ["fc1.weight", "fc2.weight"], 0.6)
    assert [r["step"] for r in gmp.history] == [0, 2, 3, 5, 6]  # epochs 0, .5, 1, 1.5, 2


@lightning_noise
def test_lightning_checkpoint_resume_is_bit_identical(tmp_path):
    reference, _, reference_callback = lightning_run(tmp_path, max_epochs=3)
    path = tmp_path / "epoch1.ckpt"
    with pytest.warns(GMPWarning, match="the run takes 3 optimizer steps") as caught:
        lightning_run(tmp_path, max_epochs=1, save_as=path)
    # Told twice: the planned steps at the start, the steps taken at the end.
    assert sum(issubclass(w.category, GMPWarning) for w in caught) == 2
    assert "gmp_ext" in torch.load(path, weights_only=True)
    resumed, _, callback = lightning_run(tmp_path, max_epochs=3, ckpt_path=path)
    assert without_regrowth(callback.gmp.history) == without_regrowth(
        reference_callback.gmp.history
    )
    for name, p in reference.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


@lightning_noise
def test_lightning_logs_telemetry_to_the_trainer_loggers(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import Logger

    from gmp_ext.training.telemetry import scalars

    class Recorder(Logger):
        name = "recorder"
        version = 0

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, dict(metrics)))

    recorder = Recorder()
    _, _, callback = lightning_run(tmp_path, max_epochs=3, logger=recorder)
    history = callback.gmp.history
    assert [r["step"] for r in history] == [0, 2, 3, 5, 6]
    assert recorder.rows == [(r["step"], scalars(r, "gmp", True)) for r in history]
    assert "gmp/fc1.weight/regrowth" in recorder.rows[1][1]
    assert recorder.rows[1][1]["gmp/churn"] == history[1]["churn"] > 0


@lightning_noise
def test_lightning_remove_on_fit_end(tmp_path):
    import gmp_ext

    with pytest.warns(GMPWarning, match=r"stops at sparsity 0.5375, in the pruning stage"):
        model, _, callback = lightning_run(tmp_path, max_epochs=1, remove_on_fit_end=True)
    assert callback.gmp is None and gmp_ext.masks(model) == {}


# -- Hugging Face Trainer -------------------------------------------------------------------


def hf_trainer(output_dir, callbacks, save_steps=None, dataset_size=16, **arguments):
    """A Trainer over a tiny BERT built from a config (no download)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    options = {
        "per_device_train_batch_size": 4,  # 4 batches per epoch of the default dataset
        "gradient_accumulation_steps": 3,  # 2 optimizer steps per epoch (3 + 1 batches)
        "learning_rate": 1e-3,
        **arguments,
    }
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **options,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=TokenPairs(dataset_size), callbacks=callbacks
    )


def hf_train(output_dir, epochs: int = 3, resume=None, save_steps=None, extra_callbacks=()):
    pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback

    callback = GMPCallback(SCHEDULE, fine_tune_weight_decay=0.0)
    trainer = hf_trainer(
        output_dir,
        [callback, *extra_callbacks],
        save_steps,
        num_train_epochs=epochs,
        weight_decay=0.01,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model, trainer, callback


def linear_weights(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_transformers_prunes_to_the_schedule(tmp_path):
    model, trainer, callback = hf_train(tmp_path)
    gmp = callback.gmp
    assert gmp.steps_per_epoch == 2 and gmp.step_count == trainer.state.global_step == 6
    assert gmp.stage == "fine_tuning"
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups)
    names = linear_weights(model)
    assert len(names) == 14 and list(gmp.history[-1]["layers"]) == names
    assert_exact(model, names, 0.6)


def test_transformers_logs_telemetry_through_trainer_log(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gmp_ext.training.telemetry import scalars

    class Spy(transformers.TrainerCallback):  # a callback after GMPCallback, as a logger is
        def __init__(self) -> None:
            self.logs: list[tuple[int, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs)))

    spy = Spy()
    _, trainer, callback = hf_train(tmp_path, extra_callbacks=[spy])  # logging_strategy="no"
    history = callback.gmp.history
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4]
    # One Trainer.log per step with an update; step 1's also carries step 0's first update,
    # whose values step 1's replace.
    logged = [(step, logs) for step, logs in spy.logs if "gmp/target" in logs]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    for (_, logs), record in zip(logged, history[1:]):
        assert scalars(record, "gmp", True).items() <= logs.items()
        assert "loss" in logs  # the Trainer's own line, not a separate one
    entries = [e for e in trainer.state.log_history if "gmp/target" in e]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    assert entries[-1]["gmp/churn"] == history[-1]["churn"]


def test_transformers_checkpoint_resume(tmp_path):
    reference, _, reference_callback = hf_train(tmp_path / "full")
    hf_train(tmp_path / "run", save_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "gmp_ext.pt").is_file()
    resumed, trainer, callback = hf_train(tmp_path / "run", resume=str(checkpoint))
    assert without_regrowth(callback.gmp.history) == without_regrowth(
        reference_callback.gmp.history
    )
    assert callback.gmp.step_count == trainer.state.global_step == 6
    for name, p in reference.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


# -- Hugging Face Trainer: the pretrained-transformer preset ------------------------------------


def hf_preset_train(output_dir, resume=None, save_steps=None, **arguments):
    """``GMPCallback.pretrained_transformer(0.8)`` in a Trainer; also the learning rate each
    optimizer step ran at, read by a hook on the optimizer."""
    transformers = pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback

    class Rates(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.rates: list[float] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer.optimizer.register_step_pre_hook(  # under accelerate's wrapper
                lambda opt, *_: self.rates.append(opt.param_groups[0]["lr"])
            )

    callback = GMPCallback.pretrained_transformer(0.8)
    spy = Rates()
    trainer = hf_trainer(output_dir, [callback, spy], save_steps, **arguments)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, spy.rates


@pytest.mark.parametrize(
    ("arguments", "steps_per_epoch", "total_steps"),
    [
        # 10 optimizer steps per epoch, stopped at 37 steps (update points 2.3125 steps apart)
        ({"max_steps": 37, "dataset_size": 40, "gradient_accumulation_steps": 1}, 10, 37),
        # 9 epochs of 2 optimizer steps (4 batches, accumulation 3); constant schedule replaced
        ({"num_train_epochs": 9, "lr_scheduler_type": "constant"}, 2, 18),
    ],
)
def test_transformers_pretrained_transformer_preset(
    tmp_path, arguments, steps_per_epoch, total_steps
):
    """One call: the preset built for the Trainer's run, every step at the preset's rate, the
    peak right after every cut and nowhere else."""
    from gmp_ext.training.lr_schedule import pruning_steps

    trainer, callback, rates = hf_preset_train(tmp_path, **arguments)
    recipe, gmp = callback.recipe, callback.gmp
    assert (recipe.steps_per_epoch, recipe.total_steps) == (steps_per_epoch, total_steps)
    assert gmp.steps_per_epoch == steps_per_epoch and gmp.schedule is recipe.schedule
    assert gmp.step_count == trainer.state.global_step == len(rates) == total_steps
    cuts = [record["step"] for record in gmp.history]
    assert cuts == pruning_steps(recipe.schedule, steps_per_epoch) and len(cuts) == 5
    assert rates == [1e-3 * recipe.lr_lambda(s) for s in range(total_steps)]
    assert [s for s in range(total_steps) if rates[s] == 1e-3] == cuts
    assert trainer.lr_scheduler.get_last_lr() == [0.0, 0.0]  # decayed to 0 at the end
    assert_exact(trainer.model, linear_weights(trainer.model), 0.8)


def test_transformers_pretrained_transformer_resume(tmp_path):
    """The factor's state is saved with the Trainer's scheduler and loaded back with
    weights_only=True; the resumed run continues at the same rates and cuts."""
    reference, reference_callback, reference_rates = hf_preset_train(
        tmp_path / "full", num_train_epochs=9
    )
    hf_preset_train(tmp_path / "run", save_steps=7, num_train_epochs=9)
    checkpoint = tmp_path / "run" / "checkpoint-7"
    resumed, callback, rates = hf_preset_train(
        tmp_path / "run", resume=str(checkpoint), num_train_epochs=9
    )
    assert rates == reference_rates[7:]
    assert without_regrowth(callback.gmp.history) == without_regrowth(
        reference_callback.gmp.history
    )
    for name, p in reference.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type must be 'linear' .*got 'cosine'"),
        ({"warmup_steps": 2}, "warmup_steps must be 0, got 2"),
    ],
)
def test_transformers_pretrained_transformer_refuses_another_schedule(tmp_path, arguments, match):
    with pytest.raises(ValueError, match=match):
        hf_preset_train(tmp_path, num_train_epochs=9, **arguments)


def test_transformers_pretrained_transformer_checks_arguments_at_once():
    pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback

    with pytest.raises(ValueError, match="sparsity must be in"):
        GMPCallback.pretrained_transformer(1.0)
    with pytest.raises(ValueError, match="first_step must be in"):
        GMPCallback.pretrained_transformer(0.9, first_step=0.0)


def test_transformers_callback_refuses_a_preset_of_another_steps_per_epoch(tmp_path):
    """A preset built for 100 steps per epoch in a Trainer doing 2: an error naming both."""
    pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback
    from gmp_ext.training.lr_schedule import pretrained_transformer

    recipe = pretrained_transformer(0.8, 1, 100)
    trainer = hf_trainer(tmp_path, [GMPCallback(recipe.schedule)], num_train_epochs=9)
    with pytest.raises(ValueError, match=r"must be the schedule's own, 100 .*got 2"):
        trainer.train()


def test_transformers_pretrained_transformer_needs_the_trainers_lambda_lr(tmp_path):
    """A scheduler the preset cannot take over (not a LambdaLR, or not at the preset's rate,
    e.g. one passed as Trainer(optimizers=...)) is an error before anything is pruned."""
    transformers = pytest.importorskip("transformers")
    import gmp_ext
    from gmp_ext.integrations.transformers import GMPCallback

    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback = GMPCallback.pretrained_transformer(0.8, steps_per_epoch=4)
    for scheduler, match in [
        (torch.optim.lr_scheduler.StepLR(optimizer, 5), "the Trainer's scheduler is a StepLR"),
        (
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 0.5),
            r"learning rates for optimizer step 1 are \[0.0005\], the preset's \[0.001\]",
        ),
    ]:
        state = transformers.TrainerState(max_steps=32)
        with pytest.raises(ValueError, match=match):
            callback.on_train_begin(
                args,
                state,
                transformers.TrainerControl(),
                model=model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
            )
        assert callback.gmp is None and gmp_ext.masks(model) == {}
