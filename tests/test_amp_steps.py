"""Steps a GradScaler skips on inf/NaN gradients are not counted, whether the scaler never calls
optimizer.step() (foreach, for-loop) or calls it with found_inf set (fused optimizers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmp_ext.training.controller import GMP
from gmp_ext.training.schedule import GMPSchedule

from .utils import TokenPairs, batch

SCHEDULE = GMPSchedule(0.2, 0.6, 1, 3)  # steps_per_epoch=2: updates at real steps 2, 4 and 6
SKIPPED = {1, 3, 4, 7}  # loop iterations whose gradients overflow
ITERATIONS = 12  # 8 real steps
# Iterations after which an update has happened, with SKIPPED: real steps 2, 4 and 6 are
# iterations 2, 6 and 9.
UPDATED_AFTER = [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def make(optimizer: str, implementation: str) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    options = {"foreach": False, **IMPLEMENTATIONS[implementation]}
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return model, optimizers[optimizer](model.parameters(), lr=1e-2, weight_decay=0.05, **options)


def scaled_step(model, opt, scaler, iteration: int, unscale_first: bool = False) -> None:
    x, y = batch(iteration)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if iteration in SKIPPED:
        model.fc1.weight.grad[0, 0] = float("inf")
    if unscale_first:  # as before gradient clipping (the Hugging Face Trainer's default)
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale-then-step"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_skipped_steps_are_not_counted(optimizer, implementation, unscale_first):
    model, opt = make(optimizer, implementation)
    assert getattr(opt, "_step_supports_amp_scaling", False) == (implementation == "fused")
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2, fine_tune_weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu")
    updates, decays = [], []
    for iteration in range(ITERATIONS):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaled_step(model, opt, scaler, iteration, unscale_first)
        if iteration in SKIPPED:  # the skipped step and its mask re-apply changed nothing
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        updates.append(len(gmp.history))  # read without asking for the step count
        decays.append(opt.param_groups[0]["weight_decay"])
    assert updates == UPDATED_AFTER
    assert [r["step"] for r in gmp.history] == [2, 4, 6]
    # Fine-tuning starts at real step 6 (iteration 9): weight decay 0 from the next step on.
    assert decays == [0.05] * 9 + [0.0] * 3
    real = ITERATIONS - len(SKIPPED)
    assert gmp.step_count == real and gmp.epoch == real / 2
    assert int(opt.state[model.fc1.weight]["step"]) == real  # the optimizer agrees
    assert int((model.fc1.weight == 0).sum()) == round(0.6 * model.fc1.weight.numel())
    gmp.remove()


def test_fused_flags_are_read_only_when_a_count_matters(monkeypatch):
    reads: list[int] = []  # how many flags each read of the flags covered
    model, opt = make("adam", "fused")
    gmp = GMP(model, opt, GMPSchedule(0.2, 0.6, 4, 6), steps_per_epoch=2)  # updates: 8, 10, 12
    read = type(gmp._unread).read

    def spy(unread) -> int:
        if unread.steps:  # a read of no flags waits for nothing
            reads.append(unread.steps)
        return read(unread)

    monkeypatch.setattr(type(gmp._unread), "read", spy)
    scaler = torch.amp.GradScaler("cpu")
    for iteration in range(6):  # 3 real steps: no update or stage change can be due
        scaled_step(model, opt, scaler, iteration)
    assert reads == []
    state = gmp.state_dict()
    assert reads == [6] and state["step"] == 3
    for iteration in range(6, 12):
        scaled_step(model, opt, scaler, iteration)
    # Iteration 10 could have been real step 8 (epoch 4: an update, pruning starts), so the 4
    # flags before it were read, then its own; it was step 7, and iteration 11 is step 8.
    assert reads == [6, 4]
    assert [r["step"] for r in gmp.history] == [8] and gmp.step_count == 8
    # A resumed run counts from the saved step: flags unread at the load belong to the old run.
    scaled_step(model, opt, scaler, 0)
    gmp.load_state_dict(state)
    assert gmp.step_count == 3
    gmp.remove()


# -- the Hugging Face Trainer with its default fused AdamW ------------------------------------


def hf_train(tmp_path, overflow: set[int], on_cpu: bool, **precision):
    """8 optimizer steps; the loss is inf on the Trainer's steps in ``overflow`` (0-based), so
    their gradients are too."""
    transformers = pytest.importorskip("transformers")
    from gmp_ext.integrations.transformers import GMPCallback

    class Overflowing(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("inf") if self.state.global_step in overflow else loss

    class Updates(transformers.TrainerCallback):
        """The Trainer's steps after which GMP had updated the masks."""

        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            if len(callback.gmp.history) > len(self.steps) + 1:  # + the update at step 0
                self.steps.append(state.global_step)

    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        optim="adamw_torch_fused",
        # accelerate unscales before clipping only with the scaler of its own fp16 mode.
        max_grad_norm=0.0 if on_cpu else 1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=on_cpu,
        disable_tqdm=True,
        seed=0,
        **precision,
    )
    # Updates at steps 0, 1, 2, 3 and 4 (8 steps per epoch); the real steps reach the last.
    callback, updates = GMPCallback(GMPSchedule(0.1, 0.6, 0, 0.5, 0.125)), Updates()
    trainer = Overflowing(
        model=model, args=args, train_dataset=TokenPairs(), callbacks=[callback, updates]
    )
    if on_cpu:
        # accelerate makes no GradScaler on CPU (fp16=True there trains in fp32, unscaled); the
        # one it would make on a GPU, in the place it reads it when wrapping the optimizer.
        assert trainer.accelerator.scaler is None
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    return model, trainer, callback.gmp, updates.steps


def check_trainer_run(model, trainer, gmp, updates: list[int]) -> None:
    """After a run whose 2nd, 4th and 5th optimizer steps overflowed."""
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert trainer.state.global_step == 8  # the Trainer counts the skipped steps too
    assert gmp.step_count == 5
    assert [r["step"] for r in gmp.history] == [0, 1, 2, 3, 4]
    assert updates == [1, 3, 6, 7]  # the Trainer's steps that are real steps 1, 2, 3 and 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    assert int((weight == 0).sum()) == round(0.6 * weight.numel())


def test_trainer_bf16_fused_adamw_counts_real_steps(tmp_path):
    model, trainer, gmp, updates = hf_train(tmp_path, {1, 3, 4}, on_cpu=True, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    check_trainer_run(model, trainer, gmp, updates)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 needs CUDA: on CPU accelerate accepts fp16=True but trains in fp32, unscaled",
)
def test_trainer_fp16_fused_adamw_counts_real_steps(tmp_path):
    model, trainer, gmp, updates = hf_train(tmp_path, {1, 3, 4}, on_cpu=False, fp16=True)
    assert trainer.accelerator.scaler is not None
    check_trainer_run(model, trainer, gmp, updates)
