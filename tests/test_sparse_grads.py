"""Sparse COO gradients (``nn.Embedding(sparse=True)``) of pruned weights: masked exactly by
attach(mask_gradients=True), GMP(mask_gradients=True) and zero_pruned_grads; SparseAdam's moments
of pruned weights stay zero; a gradient that cannot be masked exactly is an error."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.kernels import primitives
from gmp_ext.model.mask_store import get_store, maskable
from gmp_ext.training.controller import GMP
from gmp_ext.training.schedule import GMPSchedule

from .utils import assert_same

ROWS, DIM = 20, 12


class Bag(nn.Module):
    """A sparse embedding and a dense head: one sparse and one dense gradient per step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(ROWS, DIM, sparse=True)
        self.fc = nn.Linear(DIM, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)).square().mean()


def batches(steps: int) -> list[torch.Tensor]:
    """Lookups with repeats: each batch looks index 3 up twice (an uncoalesced gradient)."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.cat([torch.tensor([3, 3]), torch.randint(0, ROWS, (10,), generator=g)])
        for _ in range(steps)
    ]


def hand_masked(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference: the embedding gradient's stored rows times their keep flags, the indices
    (duplicates included) as they are."""
    indices = grad._indices()
    values = torch.where(keep[indices[0]], grad._values(), torch.zeros((), dtype=grad.dtype))
    return torch.sparse_coo_tensor(indices, values, grad.shape, check_invariants=True)


def sparse_adam(model: nn.Module) -> torch.optim.SparseAdam:
    return torch.optim.SparseAdam([model.emb.weight], lr=0.05)


@pytest.mark.parametrize("mask_gradients", [True, False])
def test_sparse_adam_trains_like_hand_masked_reference(mask_gradients):
    torch.manual_seed(0)
    model = Bag()
    reference = copy.deepcopy(model)
    gmp_ext.prune_step(model, 0.8, params=["emb.weight"])
    keep = gmp_ext.masks(model)["emb.weight"]
    with torch.no_grad():
        reference.emb.weight.masked_fill_(~keep, 0)
    opt, ref_opt = sparse_adam(model), sparse_adam(reference)
    gmp_ext.attach(model, opt, mask_gradients=mask_gradients)
    weight, ref_weight = model.emb.weight, reference.emb.weight
    for step, ids in enumerate(batches(5)):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            net(ids).backward()
        raw = ref_weight.grad
        assert not raw.is_coalesced() and raw._indices()[0, :2].tolist() == [3, 3]
        assert raw.to_dense()[~keep].count_nonzero() > 0  # there are pruned entries to mask
        ref_weight.grad = hand_masked(raw, keep)
        grad = weight.grad
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            ref_weight.masked_fill_(~keep, 0)
        state, ref_state = opt.state[weight], ref_opt.state[ref_weight]
        if not mask_gradients:  # the fault: pruned rows' moments pick up their gradients
            assert state["exp_avg"][~keep].count_nonzero() > 0
            continue
        assert weight.grad is grad and grad.layout == torch.sparse_coo  # masked in place
        assert torch.equal(grad._indices(), ref_weight.grad._indices())
        assert not grad.is_coalesced()
        assert_same(grad._values(), ref_weight.grad._values(), f"grad values {step}")
        assert_same(grad.to_dense()[~keep], torch.zeros(int((~keep).sum())), f"grad {step}")
        assert_same(weight, ref_weight, f"weight {step}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(state[key], ref_state[key], f"{key} {step}")
            assert state[key][~keep].count_nonzero() == 0
        assert weight[~keep].count_nonzero() == 0


def test_zero_pruned_grads_masks_uncoalesced_sparse_gradient_in_place():
    torch.manual_seed(0)
    model = Bag()
    gmp_ext.prune_step(model, 0.6)  # fc.weight (default selection) ...
    gmp_ext.prune_step(model, 0.7, params=["emb.weight"])  # ... and the embedding
    keeps = gmp_ext.masks(model)
    model(torch.tensor([5, 3, 5, 5, 0])).backward()
    grad = model.emb.weight.grad
    indices, values = grad._indices().clone(), grad._values().clone()
    dense_fc = model.fc.weight.grad.clone()
    assert not grad.is_coalesced() and indices[0].tolist() == [5, 3, 5, 5, 0]
    assert gmp_ext.zero_pruned_grads(model) == 2  # the sparse one counts
    assert model.emb.weight.grad is grad and torch.equal(grad._indices(), indices)
    assert not grad.is_coalesced()
    raw = torch.sparse_coo_tensor(indices, values, grad.shape, check_invariants=True)
    assert_same(grad._values(), hand_masked(raw, keeps["emb.weight"])._values(), "values")
    expected_fc = torch.where(keeps["fc.weight"], dense_fc, torch.zeros(()))
    assert_same(model.fc.weight.grad, expected_fc, "fc.weight")


@pytest.mark.parametrize("sparse_dim", [1, 2, 3])
def test_any_sparse_dim_and_duplicates_masked_by_flat_index(sparse_dim):
    torch.manual_seed(0)
    param = torch.randn(4, 5, 6)
    keep = torch.rand(4, 5, 6) > 0.5
    dense = torch.randn(4, 5, 6)
    coalesced = dense.to_sparse(sparse_dim)
    # Every stored index twice, values split in halves that sum back to the dense ones.
    halves = coalesced._values() / 2
    indices = torch.cat([coalesced._indices(), coalesced._indices()], 1)
    grad = torch.sparse_coo_tensor(
        indices, torch.cat([halves, halves]), dense.shape, check_invariants=True
    )
    summed = grad.to_dense()
    assert maskable(param, grad) is grad
    # chunk=7 cuts rows
    primitives.apply_sparse_in_place(grad, gmp_ext.kernels.ops.pack_mask(keep), chunk=7)
    assert torch.equal(grad._indices(), indices)
    assert_same(grad.to_dense(), torch.where(keep, summed, 0), f"sparse_dim {sparse_dim}")
    # Each duplicate of a kept element keeps its own value, each of a pruned one is zeroed.
    kept_values = torch.where(keep, dense, 0).to_sparse(sparse_dim)._values().count_nonzero()
    assert grad._values().count_nonzero() == 2 * kept_values


@pytest.mark.parametrize("mask_gradients", [True, False])
def test_gmp_controller_masks_sparse_embedding_gradients(mask_gradients):
    torch.manual_seed(0)
    model = Bag()
    opt = sparse_adam(model)
    GMP(
        model,
        opt,
        GMPSchedule(0.5, 0.8, 0, 2),
        steps_per_epoch=2,
        params=["emb.weight"],
        mask_gradients=mask_gradients,
    )
    weight = model.emb.weight
    leaked = 0
    for ids in batches(6):
        opt.zero_grad()
        model(ids).backward()
        stepped = gmp_ext.masks(model)["emb.weight"]  # an update after the step prunes more
        opt.step()
        if mask_gradients:
            assert weight.grad.to_dense()[~stepped].count_nonzero() == 0
        keep = gmp_ext.masks(model)["emb.weight"]
        assert weight[~keep].count_nonzero() == 0
        state = opt.state[weight]
        leaked += sum(int(state[k][~keep].count_nonzero()) for k in ("exp_avg", "exp_avg_sq"))
    assert gmp_ext.masks(model)["emb.weight"].float().mean() == pytest.approx(0.2, abs=0.01)
    assert (leaked == 0) == mask_gradients


def test_zero_pruned_state_masks_sparse_adam_moments():
    torch.manual_seed(0)
    model = Bag()
    opt = sparse_adam(model)
    for ids in batches(2):
        opt.zero_grad()
        model(ids).backward()
        opt.step()
    gmp_ext.prune_step(model, 0.5, params=["emb.weight"])
    keep = gmp_ext.masks(model)["emb.weight"]
    state = opt.state[model.emb.weight]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    assert gmp_ext.zero_pruned_state(model, opt) == 2  # the moments; the int step is left
    for key, old in before.items():
        assert old[~keep].count_nonzero() > 0
        assert_same(state[key], torch.where(keep, old, 0), key)


def unmaskable_setup() -> tuple[Bag, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Bag()
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.prune_step(model, 0.5, params=["emb.weight"])
    opt = torch.optim.SGD([model.fc.weight], lr=0.1)
    model(torch.tensor([1, 2])).backward()
    return model, opt, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, weights: dict[str, torch.Tensor], grad: torch.Tensor):
    for name, param in model.named_parameters():
        assert_same(param, weights[name], name)
    assert_same(model.fc.weight.grad, grad, "fc.weight grad")


def test_expanded_gradients_are_an_error_and_nothing_is_modified():
    model, opt, weights = unmaskable_setup()
    fc_grad = model.fc.weight.grad.clone()
    values = torch.ones(1, DIM).expand(2, DIM)  # two stored rows sharing one memory row
    model.emb.weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 2]]), values, (ROWS, DIM), check_invariants=True
    )
    message = (
        r"cannot mask the gradient of parameter 'emb.weight' \(torch.float32, shape \[20, 12\]\) "
        r"exactly: it is a tensor of layout torch.sparse_coo, .*nothing was modified"
    )
    with pytest.raises(ValueError, match=message):
        gmp_ext.zero_pruned_grads(model)
    gmp_ext.attach(model, opt, mask_gradients=True)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(model, weights, fc_grad)
    assert_same(model.emb.weight.grad._values(), values, "sparse values")
    model.emb.weight.grad = torch.zeros(DIM).expand(ROWS, DIM)
    with pytest.raises(ValueError, match=r"'emb.weight'.*layout torch.strided.*strides \(0, 1\)"):
        opt.step()
    assert_unchanged(model, weights, fc_grad)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
def test_unsupported_sparse_layout_names_the_parameter_and_layout():
    model, _, weights = unmaskable_setup()
    fc_grad = model.fc.weight.grad.clone()
    csr = torch.ones(ROWS, DIM).to_sparse_csr()
    # autograd never stores a CSR gradient for a dense parameter; a candidate can be one.
    assert maskable(model.emb.weight, csr) is None
    store = get_store(model)
    tensors = {"fc.weight": model.fc.weight.grad, "emb.weight": csr}
    assert list(store.entries) == ["fc.weight", "emb.weight"]

    def tensors_of(entry):
        return [tensors[n] for n, e in store.entries.items() if e is entry]

    message = r"cannot mask the gradient of parameter 'emb.weight' .* layout torch.sparse_csr"
    with pytest.raises(ValueError, match=message):
        store.apply_to(tensors_of, required="gradient")
    assert_unchanged(model, weights, fc_grad)  # fc.weight's gradient came first: untouched
    assert_same(csr.to_dense(), torch.ones(ROWS, DIM), "csr")
    # Optimizer state (nothing required): a tensor not tied to the weight is left alone.
    assert store.apply_to(tensors_of) == 1
    assert_same(csr.to_dense(), torch.ones(ROWS, DIM), "csr")


DTENSOR_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore
import gmp_ext

dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
holder = nn.Module()
mesh = init_device_mesh("cpu", (1,))
holder.w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
gmp_ext.prune_step(holder, 0.5, params=["w"])
opt = torch.optim.SGD([holder.w], lr=0.1)
gmp_ext.attach(holder, opt, mask_gradients=True)
holder.w.grad = grad = torch.randn(6, 4).to_sparse()
before, values = holder.w.detach().full_tensor(), grad._values().clone()
for call in (lambda: gmp_ext.zero_pruned_grads(holder), opt.step):
    try:
        call()
    except ValueError as error:
        print(error)
assert torch.equal(holder.w.detach().full_tensor(), before)
assert torch.equal(grad._values(), values)
dist.destroy_process_group()
"""


def test_sparse_gradient_of_dtensor_parameter_is_refused():
    # A process of its own: the process group and DTensor import stay out of the test process.
    run = subprocess.run(
        [sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    expected = (
        "cannot mask the gradient of DTensor parameter 'w' (torch.float32, shape [6, 4]) "
        "exactly: it is a tensor of layout torch.sparse_coo"
    )
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(expected) for line in lines), run.stdout
