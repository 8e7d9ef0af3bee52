"""Model-level API: prune_step, masks, attach, remove, sparsity_report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.model.mask_store import get_store

from .utils import assert_same


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.convt = nn.ConvTranspose1d(4, 4, 3)
        self.fc1 = nn.Linear(8 * 6 * 6, 37)
        self.fc2 = nn.Linear(37, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


PRUNABLE = ["conv.weight", "convt.weight", "fc1.weight", "fc2.weight"]


def _zeros(model: nn.Module) -> dict[str, int]:
    return {n: int((p == 0).sum()) for n, p in model.named_parameters()}


def test_default_selection_and_exact_counts(device):
    model = Net().to(device)
    summary = gmp_ext.prune_step(model, 0.9)
    assert list(summary) == PRUNABLE
    params = dict(model.named_parameters())
    for name in PRUNABLE:
        numel = params[name].numel()
        assert int((params[name] == 0).sum()) == round(0.9 * numel)
        assert summary[name] == pytest.approx(round(0.9 * numel) / numel)
    for name in ("embed.weight", "norm.weight", "fc1.bias", "conv.bias"):
        assert int((params[name] == 0).sum()) == 0, name
    masks = gmp_ext.masks(model)
    assert set(masks) == set(PRUNABLE)
    for name, keep in masks.items():
        assert keep.shape == params[name].shape and keep.dtype == torch.bool
        assert torch.equal(keep, params[name] != 0)


def test_state_dict_keys_unchanged_and_loadable_into_plain_model(device):
    model = Net().to(device)
    keys = list(model.state_dict())
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert list(model.state_dict()) == keys
    plain = Net().to(device)
    plain.load_state_dict(model.state_dict())
    assert_same(plain.fc1.weight, model.fc1.weight)


def test_sparsity_grows_and_pruned_stay_pruned(device):
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.3)
    first = {n: m.clone() for n, m in gmp_ext.masks(model).items()}
    gmp_ext.prune_step(model, 0.8)
    for name, keep in gmp_ext.masks(model).items():
        assert not (keep & ~first[name]).any(), "a pruned weight came back"


def test_global_scope_one_threshold(device):
    model = Net().to(device)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in PRUNABLE}
    gmp_ext.prune_step(model, 0.75, scope="global")
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in PRUNABLE)
    assert zeros == round(0.75 * total)
    kept = torch.cat(
        [w.abs().reshape(-1)[gmp_ext.masks(model)[n].reshape(-1)] for n, w in weights.items()]
    )
    pruned = torch.cat(
        [w.abs().reshape(-1)[~gmp_ext.masks(model)[n].reshape(-1)] for n, w in weights.items()]
    )
    assert pruned.max() <= kept.min()


def test_per_parameter_dict_and_params_forms(device):
    model = Net().to(device)
    gmp_ext.prune_step(model, {"fc1.weight": 0.5, "conv.weight": 0.25})
    assert set(gmp_ext.masks(model)) == {"fc1.weight", "conv.weight"}
    assert int((model.conv.weight == 0).sum()) == round(0.25 * model.conv.weight.numel())

    model = Net().to(device)
    gmp_ext.prune_step(model, 0.5, params=[(model.fc2, "weight"), (model.embed, "weight")])
    assert set(gmp_ext.masks(model)) == {"fc2.weight", "embed.weight"}

    model = Net().to(device)
    gmp_ext.prune_step(model, 0.5, params=lambda name, p: name.endswith("bias") and p.numel() > 10)
    assert set(gmp_ext.masks(model)) == {"fc1.bias"}

    model = Net().to(device)
    gmp_ext.prune_step(model, 0.5, exclude=[r"fc\d\.weight"])
    assert set(gmp_ext.masks(model)) == {"conv.weight", "convt.weight"}


def test_global_prune_step_returns_each_masks_sparsity(device):
    """The split of one global count over the tensors, as each new mask has it: counted in the
    build (CPU) or over the masks, a channels-last conv (a staged copy) among them, a second
    step writing over the same masks."""
    model = nn.ModuleDict({"conv": nn.Conv2d(4, 16, 3), "fc": nn.Linear(33, 7)}).to(device)
    model["conv"].to(memory_format=torch.channels_last)
    total = sum(m.weight.numel() for m in model.values())
    for target in (0.3, 0.7, 0.7):
        summary = gmp_ext.prune_step(model, target, scope="global")
        entries = get_store(model).entries
        assert summary == {name: entry.sparsity() for name, entry in entries.items()}
        pruned = sum(round(s * entries[n].param.numel()) for n, s in summary.items())
        assert pruned == round(target * total)


def test_tied_parameters_counted_once(device):
    model = nn.Sequential(nn.Linear(20, 20, bias=False), nn.Linear(20, 20, bias=False)).to(device)
    model[1].weight = model[0].weight
    summary = gmp_ext.prune_step(model, 0.5, scope="global")
    assert list(summary) == ["0.weight"]
    assert int((model[0].weight == 0).sum()) == 200


def test_channels_last_conv(device):
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Conv2d(16, 8, 3)).to(device)
    model = model.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    gmp_ext.prune_step(model, 0.6)
    gmp_ext.prune_step(reference, 0.6)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert_same(a.contiguous(), b)
    assert not model[0].weight.is_contiguous()


def test_channels_last_apply_reuses_its_staging_buffers(device):
    """Re-masking a channels_last weight after each step goes through a contiguous copy cached
    with the apply job: equal to masking in plain PyTorch, with no new buffer per step."""
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Linear(3, 5)).to(device)
    model[0].to(memory_format=torch.channels_last)
    gmp_ext.prune_step(model, 0.6)
    keep = gmp_ext.masks(model)
    store = get_store(model)
    staging = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        params = dict(model.named_parameters())
        want = {n: torch.where(k, params[n].detach(), 0) for n, k in keep.items()}
        gmp_ext.apply_masks(model)
        for name in keep:
            assert_same(params[name], want[name], name)
        (step,) = store._apply_steps.values()
        staging.append([work.data_ptr() for group in step.groups for _, work in group.staged])
    assert len(staging[0]) == 1 and staging[0] == staging[1] == staging[2]
    assert not model[0].weight.is_contiguous()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_attach_keeps_pruned_zero_and_kept_bit_identical(device, make_optimizer):
    """The hook equals stepping an unpruned copy and masking it in plain PyTorch; a copy that
    is never re-masked drifts, so the hook is what keeps the weights pruned."""
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.7)
    masks = gmp_ext.masks(model)
    twin, drifting = copy.deepcopy(model), copy.deepcopy(model)
    opts = [make_optimizer(m.parameters()) for m in (model, twin, drifting)]
    handle = gmp_ext.attach(model, opts[0])
    x = torch.randn(4, 3, 8, 8, device=device)
    for _ in range(3):
        for m, o in zip((model, twin, drifting), opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        with torch.no_grad():
            for name, p in twin.named_parameters():
                if name in masks:
                    p.masked_fill_(~masks[name], 0)
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    drift = dict(drifting.named_parameters())
    for name, p in params.items():
        assert_same(p, twin_params[name], name)
        if name in masks:
            assert not p[~masks[name]].any(), f"{name}: a pruned weight moved"
            if drift[name].grad is not None:  # convt is not in the forward pass
                assert drift[name][~masks[name]].any(), f"{name}: without the hook it regrows"
    handle.remove()


def test_apply_before_prune_is_noop_and_remove_detaches(device):
    model = Net().to(device)
    before = {n: p.clone() for n, p in model.named_parameters()}
    gmp_ext.apply_masks(model)
    assert gmp_ext.masks(model) == {}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.attach(model, opt)
    gmp_ext.remove(model)
    assert gmp_ext.masks(model) == {}
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    opt.step()
    assert int((model.fc1.weight == 0).sum()) < round(0.5 * model.fc1.weight.numel())
    assert not torch.equal(before["fc1.weight"], model.fc1.weight)


def test_sparsity_report(device):
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.9)
    report = gmp_ext.sparsity_report(model)
    assert [r.name for r in report.rows] == PRUNABLE
    assert report.zeros == sum(round(0.9 * r.numel) for r in report.rows)
    text = str(report)
    assert "fc1.weight" in text and "total" in text and "0.9000" in text
    assert report.as_dict()["fc2.weight"] == pytest.approx(333 / 370)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.5}, ValueError, r"sparsity must be a finite number in \[0, 1\], got 1.5"),
        ({"sparsity": float("nan")}, ValueError, "got nan"),
        ({"sparsity": "0.9"}, ValueError, "got '0.9'"),
        ({"sparsity": 0.5, "scope": "block"}, ValueError, "scope"),
        (
            {"sparsity": 0.5, "params": ["nope.weight"]},
            ValueError,
            "'nope.weight' matches no parameter",
        ),
        ({"sparsity": {"fc1.weight": 0.5, "missing": 0.2}}, ValueError, "missing"),
        ({"sparsity": {"fc1.weight": 0.5}, "scope": "global"}, ValueError, "scope='layer'"),
        ({"sparsity": {"fc1.weight": 2.0}}, ValueError, "fc1.weight"),
        ({"sparsity": 0.5, "exclude": [".*"]}, ValueError, "no prunable parameter"),
        ({"sparsity": 0.5, "params": 3}, TypeError, "params must be"),
    ],
)
def test_bad_input_leaves_model_untouched(device, kwargs, error, match):
    model = Net().to(device)
    before = {n: p.clone() for n, p in model.named_parameters()}
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(error, match=match):
        gmp_ext.prune_step(model, sparsity, **kwargs)
    for name, p in model.named_parameters():
        assert_same(p, before[name], name)
    assert gmp_ext.masks(model) == {}


def test_nan_weight_names_parameter_and_modifies_nothing(device):
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.2)
    with torch.no_grad():
        model.fc2.weight[3, 4] = float("nan")
    before = {n: p.clone() for n, p in model.named_parameters()}
    old_masks = gmp_ext.masks(model)
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match="parameter 'fc2.weight' has 1 NaN"):
            gmp_ext.prune_step(model, 0.6, scope=scope)
    for name, p in model.named_parameters():
        assert_same(p, before[name], name)
    for name, keep in gmp_ext.masks(model).items():
        assert torch.equal(keep, old_masks[name])


def test_non_float_and_meta_parameters(device):
    model = nn.Linear(4, 4).to(device)
    model.register_parameter(
        "codes", nn.Parameter(torch.ones(4, dtype=torch.int32), requires_grad=False)
    )
    with pytest.raises(TypeError, match="parameter 'codes' has dtype torch.int32"):
        gmp_ext.prune_step(model, 0.5, params=["codes"])
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="parameter 'weight' is on the meta device"):
        gmp_ext.prune_step(meta, 0.5)


def test_pattern_matching_nothing_is_an_error(device):
    model = Net().to(device)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"exclude entries \['classifier.weight'\] match no"):
        gmp_ext.prune_step(model, 0.5, exclude=["classifier.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_k_edges_zero_and_one(device):
    model = Net().to(device)
    assert all(v == 0.0 for v in gmp_ext.prune_step(model, 0.0).values())
    assert all(v == 1.0 for v in gmp_ext.prune_step(model, 1.0).values())
    assert all(int((p != 0).sum()) == 0 for n, p in model.named_parameters() if n in PRUNABLE)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_repeated_prune_step_writes_over_the_old_masks(device, scope):
    """A second prune step allocates no masks (the old storage is overwritten) and gives what a
    first prune step on the same weights gives."""
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.3, scope=scope)
    store = get_store(model)
    addresses = {name: entry.mask.data_ptr() for name, entry in store.entries.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fresh = copy.deepcopy(model)
    assert gmp_ext.prune_step(model, 0.7, scope=scope) == gmp_ext.prune_step(
        fresh, 0.7, scope=scope
    )
    assert {n: e.mask.data_ptr() for n, e in store.entries.items()} == addresses
    fresh_masks = gmp_ext.masks(fresh)
    for name, keep in gmp_ext.masks(model).items():
        assert torch.equal(keep, fresh_masks[name]), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert_same(p, q)
