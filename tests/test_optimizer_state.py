"""Optimizer state and gradients of pruned weights: zero_pruned_state, zero_pruned_grads,
attach(mask_gradients=True), prune_step(optimizer=...), GMP(mask_optimizer_state=...,
mask_gradients=...).

The invariant: zeroing them never changes the kept weights, bit for bit; with both options
the state of pruned weights is exactly zero after every update and stays so.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.training.controller import GMP, GMPWarning
from gmp_ext.training.schedule import GMPSchedule

from .utils import assert_same, train

LAYERS = ["conv.weight", "fc1.weight", "fc2.weight"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 3)
        self.unused = nn.Linear(5, 5)  # never in the forward pass: its grad stays None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}
STATE_KEYS = {
    "sgd": ["momentum_buffer"],
    "adamw": ["exp_avg", "exp_avg_sq"],
    "adam_amsgrad": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "rmsprop": ["square_avg", "momentum_buffer", "grad_avg"],
    "adagrad": ["sum"],
}
# Updates at epochs 1, 2, 3, 4 = steps 2, 4, 6, 8; steps 9-12 fine-tune.
SCHEDULE = GMPSchedule(0.2, 0.8, 1, 4)
SPE, STEPS = 2, 12
UPDATE_STEPS = [2, 4, 6, 8]


def run(optimizer: str, **options) -> list[dict]:
    """One GMP run; after every step a snapshot of weights, grads, masks and state."""
    torch.manual_seed(0)
    model = Net()
    opt = OPTIMIZERS[optimizer](model.parameters())
    with warnings.catch_warnings():  # Adagrad creates its state at construction
        warnings.simplefilter("ignore", GMPWarning)
        gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=SPE, **options)
    params = dict(model.named_parameters())
    snapshots = []
    for step in range(STEPS):
        train(model, opt, range(step, step + 1))
        snapshots.append(
            {
                "weights": {n: p.detach().clone() for n, p in params.items()},
                "grads": {n: p.grad.clone() for n, p in params.items() if p.grad is not None},
                "masks": gmp_ext.masks(model),
                "state": {
                    n: {k: opt.state[params[n]][k].clone() for k in STATE_KEYS[optimizer]}
                    for n in LAYERS
                },
            }
        )
    assert [r["step"] for r in gmp.history] == UPDATE_STEPS
    assert list(snapshots[-1]["masks"]) == [*LAYERS, "unused.weight"]  # no grad, no state
    return snapshots


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_kept_weights_are_bit_identical_and_pruned_state_is_zero(optimizer):
    base = run(optimizer, mask_optimizer_state=False)
    runs = {
        "state": run(optimizer),  # the default: mask_optimizer_state=True
        "grads": run(optimizer, mask_optimizer_state=False, mask_gradients=True),
        "both": run(optimizer, mask_gradients=True),
    }
    stale = 0
    during: dict[str, torch.Tensor] = {}  # the masks in force during the step
    for step, plain in enumerate(base, start=1):
        for label, snapshots in runs.items():
            snap = snapshots[step - 1]
            for name, weight in plain["weights"].items():
                assert torch.equal(snap["weights"][name], weight), (label, step, name)
            assert snap["masks"].keys() == plain["masks"].keys()
            for name, keep in plain["masks"].items():
                assert torch.equal(snap["masks"][name], keep), (label, step, name)
            for name in LAYERS if plain["masks"] else []:
                keep = plain["masks"][name]
                for key, value in plain["state"][name].items():
                    got = snap["state"][name][key]
                    assert torch.equal(got[keep], value[keep]), (label, step, name, key)
                    pruned = got[~keep]
                    if label == "both" or (label == "state" and step in UPDATE_STEPS):
                        assert_same(pruned, torch.zeros_like(pruned), f"{label} {step} {key}")
            for name in LAYERS if during else []:  # gradients are masked before the step
                keep = during[name]
                grad = snap["grads"][name]
                if label in ("grads", "both"):
                    assert_same(grad[~keep], torch.zeros_like(grad[~keep]), f"{label} {step}")
                    assert_same(grad[keep], plain["grads"][name][keep], f"{label} {step}")
                else:
                    assert_same(grad, plain["grads"][name], f"{label} {step} {name}")
        if step in UPDATE_STEPS:
            stale += sum(
                int(value[~plain["masks"][name]].count_nonzero())
                for name in LAYERS
                for value in plain["state"][name].values()
            )
        during = plain["masks"]
    assert stale > 0, "without the options the pruned state should not be zero"


def test_capped_global_updates_zero_the_state_too():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    caps = {"fc2.weight": 0.3}
    GMP(model, opt, SCHEDULE, steps_per_epoch=SPE, scope="global", max_sparsity=caps)
    train(model, opt, range(4))  # the update at step 4 ends the last step
    params = dict(model.named_parameters())
    for name in LAYERS:
        keep = gmp_ext.masks(model)[name]
        for key in ("exp_avg", "exp_avg_sq"):
            pruned = opt.state[params[name]][key][~keep]
            assert pruned.numel() > 0
            assert_same(pruned, torch.zeros_like(pruned), f"{name} {key}")


def test_zero_pruned_state_counts_and_keeps_everything_else():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    assert gmp_ext.zero_pruned_state(model, opt) == 0  # nothing pruned yet
    gmp_ext.prune_step(model, 0.5, params=["fc1.weight", "unused.weight"])
    assert gmp_ext.zero_pruned_state(model, opt) == 0  # no state yet
    assert len(opt.state) == 0, "zero_pruned_state must not create state entries"
    gmp_ext.attach(model, opt)
    train(model, opt, range(3))
    before = copy.deepcopy(opt.state_dict())
    keep = gmp_ext.masks(model)["fc1.weight"]
    # exp_avg, exp_avg_sq, max_exp_avg_sq of fc1.weight; unused.weight has no grad, no state.
    assert gmp_ext.zero_pruned_state(model, opt) == 3
    after = opt.state_dict()
    index = {id(p): i for i, p in enumerate(model.parameters())}[id(model.fc1.weight)]
    for i, state in before["state"].items():
        for key, value in state.items():
            got = after["state"][i][key]
            if i != index or key == "step":
                assert_same(got, value, f"state {i} {key}")
                continue
            assert value[~keep].count_nonzero() > 0, key
            assert_same(got[keep], value[keep], key)
            assert_same(got[~keep], torch.zeros_like(got[~keep]), key)


def test_prune_step_zeroes_the_state_of_its_new_masks_only():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, range(3))
    gmp_ext.prune_step(model, 0.5, params=["conv.weight"])  # no optimizer: state kept
    conv_before = opt.state[model.conv.weight]["momentum_buffer"].clone()
    fc1_before = opt.state[model.fc1.weight]["momentum_buffer"].clone()
    gmp_ext.prune_step(model, 0.6, params=["fc1.weight"], optimizer=opt)
    assert_same(opt.state[model.conv.weight]["momentum_buffer"], conv_before, "conv")
    keep = gmp_ext.masks(model)["fc1.weight"]
    buf = opt.state[model.fc1.weight]["momentum_buffer"]
    assert_same(buf[keep], fc1_before[keep], "kept")
    assert fc1_before[~keep].count_nonzero() > 0
    assert_same(buf[~keep], torch.zeros_like(buf[~keep]), "pruned")


def test_channels_last_conv_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 3))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gmp_ext.prune_step(model, 0.6)
    gmp_ext.attach(model, opt)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    weight = model[0].weight
    assert not weight.is_contiguous()
    state = opt.state[weight]
    assert not state["exp_avg"].is_contiguous() and weight.grad is not None
    before = {k: v.clone() for k, v in state.items()}
    grad_before = weight.grad.clone()
    strides = state["exp_avg"].stride()
    keep = gmp_ext.masks(model)["0.weight"]
    assert gmp_ext.zero_pruned_state(model, opt) == 4  # exp_avg, exp_avg_sq of both convs
    assert gmp_ext.zero_pruned_grads(model) == 2
    assert state["exp_avg"].stride() == strides
    for key, value in [*((k, state[k]) for k in ("exp_avg", "exp_avg_sq")), ("grad", weight.grad)]:
        old = grad_before if key == "grad" else before[key]
        assert old[~keep].count_nonzero() > 0, key
        assert_same(value[keep], old[keep], key)
        assert_same(value[~keep], torch.zeros_like(value[~keep]), key)
    assert_same(state["step"], before["step"], "step")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_params(dtype):
    def make(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)  # 1e-8 underflows fp16
        GMP(model, opt, GMPSchedule(0.3, 0.7, 1, 3), steps_per_epoch=1, **options)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(6, 12, generator=g).to(dtype)).square().mean().backward()
            opt.step()
        return model, opt

    plain, plain_opt = make(mask_optimizer_state=False)
    model, opt = make(mask_gradients=True)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert_same(p, q, name)
    for name, keep in gmp_ext.masks(model).items():
        param = dict(model.named_parameters())[name]
        twin = dict(plain.named_parameters())[name]
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.state[param][key]
            assert value.dtype == dtype
            assert plain_opt.state[twin][key][~keep].count_nonzero() > 0
            assert_same(value[~keep], torch.zeros_like(value[~keep]), f"{name} {key}")
            assert_same(value[keep], plain_opt.state[twin][key][keep], f"{name} {key}")


class Factored(torch.optim.Optimizer):
    """Adafactor-like: a scalar step, factored row/column statistics, an integer counter, a
    flat copy with the parameter's numel, and one tensor shaped like the parameter."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["row"] = torch.zeros(p.shape[0])
                    state["col"] = torch.zeros(p.shape[-1])
                    state["count"] = torch.zeros_like(p, dtype=torch.int32)
                    state["flat"] = torch.zeros(p.numel())
                    state["transposed"] = torch.zeros(p.shape[::-1]).t()  # not contiguous
                    state["acc"] = torch.zeros_like(p)
                    state["note"] = "not a tensor"
                g = p.grad.reshape(p.shape[0], -1)
                state["step"] += 1
                state["row"].add_(g.square().sum(1))
                state["col"].add_(g.square().sum(0)[: p.shape[-1]])
                state["count"] += 1
                state["flat"].add_(p.grad.reshape(-1))
                state["transposed"].add_(p.grad)
                state["acc"].mul_(0.9).add_(p.grad)
                p.add_(state["acc"], alpha=-group["lr"])


def test_state_of_another_shape_or_dtype_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    opt = Factored(model.parameters())
    gmp_ext.prune_step(model, 0.5, params=["0.weight"])
    gmp_ext.attach(model, opt)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
    state = opt.state[model[0].weight]
    # an expanded view (stride 0) of the parameter's shape: no element of its own to zero
    state["expanded"] = torch.ones(5, 1).expand(5, 6)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    keep = gmp_ext.masks(model)["0.weight"]
    assert not state["transposed"].is_contiguous()
    assert gmp_ext.zero_pruned_state(model, opt) == 2  # "transposed" and "acc"
    for key, value in before.items():
        if key in ("transposed", "acc"):
            assert value[~keep].count_nonzero() > 0
            assert_same(state[key][keep], value[keep], key)
            assert_same(state[key][~keep], torch.zeros_like(value[~keep]), key)
        elif isinstance(value, torch.Tensor):
            assert_same(state[key], value, key)
        else:
            assert state[key] == value


def test_a_pruned_scalar_parameter_keeps_its_step():
    holder = nn.Module()
    holder.w = nn.Parameter(torch.tensor(0.1))
    holder.v = nn.Parameter(torch.tensor([0.3, -0.2]))
    opt = torch.optim.Adam(holder.parameters(), lr=0.1)
    gmp_ext.prune_step(holder, 1.0, params=["w", "v"])
    gmp_ext.attach(holder, opt, mask_gradients=True)
    for _ in range(3):
        opt.zero_grad()
        (holder.w * 3 + holder.v.sum()).backward()
        opt.step()
    assert gmp_ext.zero_pruned_state(holder, opt) == 4
    assert float(opt.state[holder.w]["step"]) == 3.0  # same shape as w, never masked
    assert holder.w.item() == 0.0 and not holder.v.any()
    assert not opt.state[holder.w]["exp_avg"] and not opt.state[holder.w]["exp_avg_sq"]


def test_attach_with_mask_gradients_and_a_param_without_grad():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(model, opt, range(2))
    train(twin, twin_opt, range(2))
    names = [*LAYERS, "unused.weight"]
    gmp_ext.prune_step(model, 0.7, params=names, optimizer=opt)
    gmp_ext.prune_step(twin, 0.7, params=names)
    handle = gmp_ext.attach(model, opt, mask_gradients=True)
    twin_handle = gmp_ext.attach(twin, twin_opt)
    train(model, opt, range(2, 6))
    train(twin, twin_opt, range(2, 6))
    assert model.unused.weight.grad is None and "unused.weight" in gmp_ext.masks(model)
    assert gmp_ext.zero_pruned_grads(model) == 3
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert_same(p, twin_params[name], name)
    for name, keep in gmp_ext.masks(model).items():
        if name == "unused.weight":
            continue
        param, other = dict(model.named_parameters())[name], twin_params[name]
        buf, twin_buf = (
            opt.state[param]["momentum_buffer"],
            twin_opt.state[other]["momentum_buffer"],
        )
        assert twin_buf[~keep].count_nonzero() > 0
        assert_same(buf[~keep], torch.zeros_like(buf[~keep]), name)
        assert_same(buf[keep], twin_buf[keep], name)
        assert_same(param.grad[~keep], torch.zeros_like(param.grad[~keep]), name)
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    handle.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    twin_handle.remove()  # without mask_gradients: one hook, still a handle with remove()
    assert not twin_opt._optimizer_step_post_hooks and not twin_opt._optimizer_step_pre_hooks


def test_remove_and_the_context_manager_drop_both_hooks():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.attach(model, opt, mask_gradients=True)
    gmp_ext.remove(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    gmp_ext.prune_step(model, 0.5)
    with gmp_ext.attach(model, opt, mask_gradients=True) as handle:
        assert len(handle.handles) == 2
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    gmp = GMP(model, opt, GMPSchedule(0.5, 0.7, 0, 2), steps_per_epoch=1, mask_gradients=True)
    assert len(opt._optimizer_step_pre_hooks) == 1
    gmp.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_bad_input_names_the_problem_and_modifies_nothing():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        gmp_ext.zero_pruned_state(model, "sgd")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        gmp_ext.zero_pruned_state({}, opt)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        gmp_ext.zero_pruned_grads([])
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got gen"):
        gmp_ext.prune_step(model, 0.5, optimizer=model.parameters())
    with pytest.raises(TypeError, match="mask_gradients must be True or False, got 1"):
        gmp_ext.attach(model, opt, mask_gradients=1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        gmp_ext.attach(model, {})
    schedule = GMPSchedule(0.2, 0.5, 0, 2)  # prunes at construction
    with pytest.raises(TypeError, match="mask_optimizer_state must be True or False, got 'yes'"):
        GMP(model, opt, schedule, steps_per_epoch=1, mask_optimizer_state="yes")
    with pytest.raises(TypeError, match="mask_gradients must be True or False, got None"):
        GMP(model, opt, schedule, steps_per_epoch=1, mask_gradients=None)
    assert gmp_ext.masks(model) == {}
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for name, p in model.named_parameters():
        assert_same(p, weights[name], name)


def checkpoint(gmp: GMP, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "gmp": gmp.state_dict()}, buffer
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_zeroes_the_loaded_state_and_accepts_other_options():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=SPE)
    train(model, opt, range(5))  # the update at step 4, then a step that refills the state
    saved = checkpoint(gmp, model, opt)
    assert saved["gmp"]["config"]["mask_optimizer_state"] is True
    assert saved["gmp"]["config"]["mask_gradients"] is False
    train(model, opt, range(5, 9))
    masks = gmp_ext.masks(model)
    old = copy.deepcopy(saved["gmp"])  # as saved before the options existed
    del old["config"]["mask_optimizer_state"], old["config"]["mask_gradients"]
    for state, options in [(saved["gmp"], {"mask_gradients": True}), (old, {})]:
        torch.manual_seed(1)
        resumed = Net()
        resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
        resumed_gmp = GMP(resumed, resumed_opt, SCHEDULE, steps_per_epoch=SPE, **options)
        resumed.load_state_dict(saved["model"])
        # The optimizer adopts the loaded tensors: a copy for each run, one to compare with.
        resumed_opt.load_state_dict(copy.deepcopy(saved["opt"]))
        resumed_gmp.load_state_dict(state)
        index = [n for n, _ in resumed.named_parameters()].index("fc1.weight")
        loaded = saved["opt"]["state"][index]["momentum_buffer"]
        keep = gmp_ext.masks(resumed)["fc1.weight"]
        buf = resumed_opt.state[resumed.fc1.weight]["momentum_buffer"]
        assert loaded[~keep].count_nonzero() > 0
        assert_same(buf[~keep], torch.zeros_like(buf[~keep]), "pruned")
        assert_same(buf[keep], loaded[keep], "kept")
        train(resumed, resumed_opt, range(5, 9))
        for (name, p), q in zip(resumed.named_parameters(), model.parameters()):
            assert_same(p, q, name)
        assert all(torch.equal(m, masks[n]) for n, m in gmp_ext.masks(resumed).items())
