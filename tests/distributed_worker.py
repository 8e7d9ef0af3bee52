"""Checks that run in every process of a gloo group spawned by tests/test_distributed.py.

Each rank runs every check in the same order (most of them are collectives) and reports
{check name: None, or the traceback} through a queue. The reference for every sharded result
is the single-process result on the full tensors, which every rank can compute by itself: the
full tensors are made from the same seed on all ranks.
"""

from __future__ import annotations

import datetime
import os
import re
import traceback
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import gmp_ext
from gmp_ext import distributed
from gmp_ext.model.mask_store import get_store
from gmp_ext.training.controller import GMP
from gmp_ext.training.schedule import GMPSchedule

CHECKS: dict[str, Callable[[dict], None]] = {}
SKIPPED = "skipped: "  # a report starting so: the check's needs are not installed


def without_regrowth(history: list[dict]) -> list[dict]:
    """Records without regrowth (tests/utils.py says why a resumed run's may differ); this file
    runs as a script in each worker, outside the tests package."""

    def strip(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "regrowth"}

    return [
        {**strip(r), "layers": {n: strip(row) for n, row in r["layers"].items()}} for r in history
    ]


def check(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(
        {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    )


def same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality (-0.0 != +0.0), naming where they differ."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = (_bits(actual) != _bits(expected)).reshape(-1).nonzero().reshape(-1)
    assert diff.numel() == 0, f"{what}: {diff.numel()} differ, first at {diff[:5].tolist()}"


def shard(full: torch.Tensor, ctx: dict) -> torch.Tensor:
    """This rank's Shard(0) piece of a tensor every rank holds in full."""
    return distribute_tensor(full, ctx["mesh"], [Shard(0)]).to_local()


def weights(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        t = torch.randn(shape, generator=g)
    elif kind == "ties":  # 60% exact zeros (both signs), the rest 3 magnitudes
        t = torch.randint(-3, 4, shape, generator=g).float() * 0.25
        t[torch.rand(shape, generator=g) < 0.6] = 0.0
        t[torch.rand(shape, generator=g) < 0.3] *= -1
    elif kind == "equal":
        t = torch.full(shape, -0.5)
    elif kind == "specials":
        t = torch.randn(shape, generator=g)
        t.view(-1)[::3] = float("inf")
        t.view(-1)[1::4] = -0.0
    else:
        raise ValueError(kind)
    return t.to(dtype)


# (shape, dtype, kind): uneven rows (7 on 2 and 3 ranks), an empty shard on the third rank
# (2 rows), heavy bf16/fp16 ties across shard boundaries, one tensor of several CPU tiles.
SPECS = [
    ((7, 5), torch.float32, "normal"),
    ((7, 16), torch.bfloat16, "ties"),
    ((2, 3), torch.float16, "ties"),
    ((64, 33), torch.float32, "ties"),
    ((5, 4, 3), torch.bfloat16, "equal"),
    ((11,), torch.float32, "specials"),
    ((400, 333), torch.float32, "normal"),
    ((9, 6), torch.float64, "ties"),
]
SPARSITIES = [0.5, 0.3, 1.0, 0.45, 0.5, 0.7, 0.9, 0.25]


class Holder(nn.Module):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", nn.Parameter(t))


def holders(ctx: dict, specs=SPECS, seed: int = 0) -> tuple[Holder, Holder, list[str]]:
    """The same tensors twice: full (single process) and as Shard(0) DTensors."""
    full = [weights(shape, dtype, kind, seed + i) for i, (shape, dtype, kind) in enumerate(specs)]
    plain = Holder([t.clone() for t in full])
    sharded = Holder([distribute_tensor(t.clone(), ctx["mesh"], [Shard(0)]) for t in full])
    return plain, sharded, [f"p{i}" for i in range(len(specs))]


def compare_models(plain: nn.Module, sharded: nn.Module, ctx: dict, what: str) -> None:
    """Sharded masks and weights are this rank's rows of the single-process ones."""
    expected, actual = gmp_ext.masks(plain), gmp_ext.masks(sharded)
    assert list(actual) == list(expected), f"{what}: names {list(actual)} != {list(expected)}"
    for name, keep in actual.items():
        assert isinstance(keep, DTensor), f"{what}: masks()['{name}'] is not a DTensor"
        same(keep.to_local(), shard(expected[name], ctx), f"{what}: mask of {name}")
        same(
            dict(sharded.named_parameters())[name].to_local(),
            shard(dict(plain.named_parameters())[name].detach(), ctx),
            f"{what}: weights of {name}",
        )
    plain_store, sharded_store = get_store(plain), get_store(sharded)
    for name, entry in sharded_store.entries.items():
        expected_threshold = plain_store.entries[name].threshold
        assert entry.threshold == expected_threshold, (
            f"{what}: threshold of {name} {entry.threshold} != {expected_threshold}"
        )


@check
def layer_scope_matches_single_process(ctx: dict) -> None:
    plain, sharded, names = holders(ctx)
    targets = dict(zip(names, SPARSITIES))
    distributed.COMM_STATS.reset()
    got = gmp_ext.prune_step(sharded, targets, params=names)
    calls = distributed.COMM_STATS.calls
    expected = gmp_ext.prune_step(plain, targets, params=names)
    assert got == expected, (got, expected)
    compare_models(plain, sharded, ctx, "layer")
    # fp16/bf16/fp32 in one three-pass selection, float64 in a six-pass one; the sparsities
    # returned are the counts selected (layer scope), so no kept counts are gathered.
    assert calls == 3 + 1 + 6 + 1, calls


@check
def global_scope_matches_single_process(ctx: dict) -> None:
    for specs in (SPECS[:-1], SPECS[1:2] + SPECS[4:5], SPECS):  # mixed, bf16 only, with float64
        for sparsity in (0.0, 0.37, 0.62, 1.0):
            plain, sharded, names = holders(ctx, specs, seed=7)
            got = gmp_ext.prune_step(sharded, sparsity, scope="global", params=names)
            assert got == gmp_ext.prune_step(plain, sparsity, scope="global", params=names)
            compare_models(plain, sharded, ctx, f"global {sparsity} over {len(specs)}")


@check
def repeated_updates_and_sparsity_report(ctx: dict) -> None:
    """A second update over already-pruned weights (zeros tie with the new cut) and the report."""
    plain, sharded, names = holders(ctx, SPECS[:4], seed=3)
    for sparsity in (0.3, 0.6):
        for model in (plain, sharded):
            gmp_ext.prune_step(model, sparsity, params=names)
    compare_models(plain, sharded, ctx, "second update")
    report, expected = str(gmp_ext.sparsity_report(sharded)), str(gmp_ext.sparsity_report(plain))
    assert report == expected, f"{report}\n!=\n{expected}"


@check
def nan_in_one_shard_raises_on_every_rank(ctx: dict) -> None:
    _, sharded, names = holders(ctx, SPECS[:2], seed=5)
    gmp_ext.prune_step(sharded, 0.5, params=names)
    before = [p.to_local().clone() for p in sharded.parameters()]
    masks = {n: m.to_local().clone() for n, m in gmp_ext.masks(sharded).items()}
    if ctx["rank"] == ctx["world"] - 1:
        with torch.no_grad():
            sharded.p1.to_local()[0, 0] = float("nan")
        before[1][0, 0] = float("nan")
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match="parameter 'p1' has 1 NaN value"):
            gmp_ext.prune_step(sharded, 0.9, scope=scope, params=names)
        for p, b in zip(sharded.parameters(), before):
            same(p.to_local(), b, f"{scope}: weights modified")
        for n, m in gmp_ext.masks(sharded).items():
            same(m.to_local(), masks[n], f"{scope}: mask of {n} modified")


@check
def unsupported_layouts_raise(ctx: dict) -> None:
    for placement, message in ((Shard(1), "placed Shard(dim=1)"), (Replicate(), "Replicate")):
        model = Holder([distribute_tensor(torch.randn(4, 6), ctx["mesh"], [placement])])
        with pytest.raises(NotImplementedError, match=re.escape(message)):
            gmp_ext.prune_step(model, 0.5, params=["p0"])
    mixed = Holder([distribute_tensor(torch.randn(4, 6), ctx["mesh"], [Shard(0)]), torch.randn(3)])
    with pytest.raises(NotImplementedError, match=re.escape("'p1'\"] are not sharded")):
        gmp_ext.prune_step(mixed, 0.5, scope="global", params=["p0", "p1"])
    with pytest.raises(NotImplementedError, match="the tensor-level ops take local tensors"):
        gmp_ext.kernels.ops.select_layerwise([mixed.p0], 0.5)
    # Layer scope mixes freely: the plain tensor is selected on each rank by itself.
    gmp_ext.prune_step(mixed, 0.5, params=["p0", "p1"])
    assert int((mixed.p1 == 0).sum()) == 2


@check
def communication_is_independent_of_the_weights(ctx: dict) -> None:
    volumes = []
    for rows in (8, 800):
        specs = [((rows, 50), torch.float32, "normal"), ((rows, 20), torch.bfloat16, "ties")]
        _, sharded, names = holders(ctx, specs)
        for scope in ("layer", "global"):
            distributed.COMM_STATS.reset()
            gmp_ext.prune_step(sharded, 0.5, scope=scope, params=names)
            volumes.append((scope, distributed.COMM_STATS.calls, distributed.COMM_STATS.bytes))
    assert volumes[:2] == volumes[2:], volumes
    # layer: (2048 + 1) + 1024 + 1024 counts and one tie count per tensor (the sparsities
    # returned are the counts selected: no kept counts).
    assert volumes[0] == ("layer", 4, 8 * 2 * (2049 + 2048 + 1)), volumes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 7)
        self.fc2 = nn.Linear(7, 9)
        self.fc3 = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


LAYERS = ["fc1.weight", "fc2.weight", "fc3.weight"]


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)


def fsdp_model(ctx: dict) -> tuple[Net, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, mesh=ctx["mesh"])
    fully_shard(model, mesh=ctx["mesh"])
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for step in steps:
        x, y = batch(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


SCHEDULE = GMPSchedule(0.2, 0.8, 0.5, 3.0, 0.5)


def _recorder(model: nn.Module, into: dict[str, torch.Tensor]):
    """An optimizer step hook that gathers the full weights the step produced."""

    def record(_opt, _args, _kwargs) -> None:
        into.update({n: p.full_tensor() for n, p in model.named_parameters()})

    return record


@check
def fsdp2_gmp_masks_equal_single_process_at_every_update(ctx: dict) -> None:
    """GMP on an FSDP2 model against GMP on a plain replica that is handed, at every step, the
    weights the sharded optimizer step produced (its own optimizer has lr 0 and no gradients,
    so its step only runs its GMP hook): the masks and weights after every step must agree."""
    for scope in ("layer", "global"):
        model, opt = fsdp_model(ctx)
        reference = Net()
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.0)
        stepped: dict[str, torch.Tensor] = {}

        opt.register_step_post_hook(_recorder(model, stepped))  # runs before GMP's hook
        gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2, scope=scope)
        reference_gmp = GMP(reference, reference_opt, SCHEDULE, steps_per_epoch=2, scope=scope)
        for step in range(8):
            train(model, opt, range(step, step + 1), ctx["rank"])
            with torch.no_grad():
                for name, p in reference.named_parameters():
                    p.copy_(stepped[name])
            reference_opt.step()
            compare_models(reference, model, ctx, f"{scope} step {step + 1}")
        assert gmp.last_update == reference_gmp.last_update
        assert len(gmp.history) == 6, gmp.history
        gmp.remove()


@check
def fsdp2_resume_is_bit_identical(ctx: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(ctx["tmp"], "resume")
    model, opt = fsdp_model(ctx)
    gmp = GMP(model, opt, SCHEDULE, steps_per_epoch=2, scope="global")
    train(model, opt, range(3), ctx["rank"])
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    torch.save(gmp.state_dict(), f"{path}-gmp-rank{ctx['rank']}.pt")
    train(model, opt, range(3, 7), ctx["rank"])

    model2, opt2 = fsdp_model(ctx)
    gmp2 = GMP(model2, opt2, SCHEDULE, steps_per_epoch=2, scope="global")
    model_state, optim_state = get_state_dict(model2, opt2)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=model_state, optim_state_dict=optim_state)
    gmp2.load_state_dict(torch.load(f"{path}-gmp-rank{ctx['rank']}.pt", weights_only=True))
    train(model2, opt2, range(3, 7), ctx["rank"])

    assert without_regrowth(gmp2.history) == without_regrowth(gmp.history)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        same(p2.to_local(), p.to_local(), f"resumed weights of {name}")
    masks, masks2 = gmp_ext.masks(model), gmp_ext.masks(model2)
    for name in LAYERS:
        same(masks2[name].to_local(), masks[name].to_local(), f"resumed mask of {name}")
    # A sharded mask does not load into another sharding.
    state = gmp.state_dict()
    state["masks"]["fc1.weight"]["mask"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mask of parameter 'fc1.weight' must be the uint8 DTen"):
        gmp2.load_state_dict(state)


@check
def hf_callback_saves_sharded_state_on_every_rank_and_resumes_bit_identically(ctx: dict) -> None:
    """The Hugging Face callback on an FSDP2 model: every rank writes its own masks into the
    checkpoint folder, and a run resumed from it matches the uninterrupted run bit for bit (the
    Trainer's own steps are played here by the callback's hooks and a DCP checkpoint)."""
    pytest.importorskip("transformers")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from gmp_ext.integrations.transformers import GMPCallback

    args = SimpleNamespace(
        output_dir=os.path.join(ctx["tmp"], "hf"),
        resume_from_checkpoint=None,
        gradient_accumulation_steps=1,
    )
    folder = os.path.join(args.output_dir, "checkpoint-3")

    def run(first_step: int) -> tuple[nn.Module, GMPCallback]:
        model, opt = fsdp_model(ctx)
        state = SimpleNamespace(
            global_step=first_step, max_steps=8, is_world_process_zero=ctx["rank"] == 0
        )
        if first_step:
            model_state, optim_state = get_state_dict(model, opt)
            dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
            set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
        callback = GMPCallback(SCHEDULE, steps_per_epoch=2, scope="global")
        callback.on_train_begin(args, state, None, model=model, optimizer=opt)
        for step in range(first_step, 8):
            train(model, opt, range(step, step + 1), ctx["rank"])
            state.global_step = step + 1
            if state.global_step == 3 and not first_step:
                model_state, optim_state = get_state_dict(model, opt)
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
                callback.on_save(args, state, None)
        return model, callback

    model, callback = run(0)
    dist.barrier()
    for rank in range(ctx["world"]):
        assert os.path.isfile(os.path.join(folder, f"gmp_ext-rank{rank}.pt")), rank
    resumed, resumed_callback = run(3)
    assert without_regrowth(resumed_callback.gmp.history) == without_regrowth(callback.gmp.history)
    for (name, p), p2 in zip(model.named_parameters(), resumed.parameters()):
        same(p2.to_local(), p.to_local(), f"resumed weights of {name}")
    masks, masks2 = gmp_ext.masks(model), gmp_ext.masks(resumed)
    for name in LAYERS:
        same(masks2[name].to_local(), masks[name].to_local(), f"resumed mask of {name}")
    callback.gmp.remove()
    resumed_callback.gmp.remove()


@check
def ddp_masks_identical_and_names_unprefixed(ctx: dict) -> None:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    os.environ[distributed.DEBUG_ENV] = "1"
    try:
        gmp = GMP(
            model,
            opt,
            SCHEDULE,
            steps_per_epoch=2,
            params=["module.fc1.weight", "fc2.weight", "module.fc3.weight"],
            exclude=["module\\.fc3\\..*"],
        )
        train(model, opt, range(7), ctx["rank"])
    finally:
        del os.environ[distributed.DEBUG_ENV]
    assert len(gmp.history) == 6
    assert list(gmp_ext.masks(model)) == ["fc1.weight", "fc2.weight"]
    assert gmp_ext.masks(model.module).keys() == gmp_ext.masks(model).keys()
    got = gmp_ext.prune_step(model, {"module.fc1.weight": 0.5, "fc2.weight": 0.25})
    assert got == {"fc1.weight": 1 - 42 / 84, "fc2.weight": 1 - 47 / 63}, got  # kept / numel
    distributed.verify_masks_across_ranks(model)
    # A rank whose mask differs is named, on every rank.
    if ctx["rank"] == ctx["world"] - 1:
        get_store(model).entries["fc2.weight"].mask[0] ^= 1
    last = ctx["world"] - 1
    message = f"'fc2.weight' differs across ranks: rank 0 and rank(s) [{last}] hold different"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        distributed.verify_masks_across_ranks(model)
    if ctx["rank"] == last:
        del get_store(model).entries["fc2.weight"]
    with pytest.raises(RuntimeError, match=f"ranks 0 and {last} mask different parameters"):
        distributed.verify_masks_across_ranks(model)


@check
def optimizer_state_of_pruned_weights_is_zeroed_per_shard(ctx: dict) -> None:
    """FSDP2 + AdamW: with mask_gradients the sharded moments of pruned weights are zero in
    every local shard, the kept entries and all weights equal a run without the options; DDP:
    the wrapper's model takes zero_pruned_state under its own names."""
    runs = []
    for options in ({"mask_optimizer_state": False}, {"mask_gradients": True}):
        model, _ = fsdp_model(ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        GMP(model, opt, SCHEDULE, steps_per_epoch=2, **options)
        train(model, opt, range(7), ctx["rank"])
        runs.append((model, opt))
    (plain, plain_opt), (model, opt) = runs
    plain_params = dict(plain.named_parameters())
    stale = 0
    for name, p in model.named_parameters():
        same(p.to_local(), plain_params[name].to_local(), f"weights of {name}")
        if name not in LAYERS:
            continue
        keep = gmp_ext.masks(model)[name].to_local()
        for key in ("exp_avg", "exp_avg_sq"):
            state, plain_state = opt.state[p][key], plain_opt.state[plain_params[name]][key]
            assert isinstance(state, DTensor), f"{name} {key} is not a DTensor"
            local, expected = state.to_local(), plain_state.to_local()
            same(local[keep], expected[keep], f"kept {key} of {name}")
            same(local[~keep], torch.zeros_like(local[~keep]), f"pruned {key} of {name}")
            stale += int(expected[~keep].count_nonzero())
    assert stale > 0, "without the options the pruned moments should not be zero"
    assert gmp_ext.zero_pruned_state(plain, plain_opt) == 2 * len(LAYERS)
    for name in LAYERS:
        keep = gmp_ext.masks(plain)[name].to_local()
        local = plain_opt.state[plain_params[name]]["exp_avg"].to_local()
        same(local[~keep], torch.zeros_like(local[~keep]), f"zero_pruned_state {name}")

    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gmp_ext.prune_step(ddp, 0.5, params=["module.fc1.weight", "fc2.weight"])
    gmp_ext.attach(ddp, opt)
    train(ddp, opt, range(2), ctx["rank"])
    assert gmp_ext.zero_pruned_state(ddp, opt) == 2
    for name, param in (
        ("fc1.weight", ddp.module.fc1.weight),
        ("fc2.weight", ddp.module.fc2.weight),
    ):
        keep = gmp_ext.masks(ddp)[name]
        buf = opt.state[param]["momentum_buffer"]
        same(buf[~keep], torch.zeros_like(buf[~keep]), f"DDP momentum of {name}")


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


def main(rank: int, world: int, port: int, queue, tmp: str, only: list[str]) -> None:
    """Runs the checks named in ``only``. A rank that fails leaves the others waiting in a
    collective until COLLECTIVE_TIMEOUT, so after each check the ranks compare notes through a
    file store (no collective) and stop at the first failure instead of piling up timeouts."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    notes = dist.FileStore(os.path.join(tmp, "notes"), world)
    ctx = {"rank": rank, "world": world, "tmp": tmp, "mesh": init_device_mesh("cpu", (world,))}
    results: dict[str, str | None] = {}
    stopped = ""
    for name in only:
        if stopped:
            results[name] = f"not run: {stopped}"
            continue
        try:
            CHECKS[name](ctx)
            results[name] = None
        except pytest.skip.Exception as skip:
            results[name] = SKIPPED + skip.msg
        except BaseException:  # reported per check (DCP raises BaseException subclasses)
            results[name] = traceback.format_exc()
        failed_here = results[name] is not None and not results[name].startswith(SKIPPED)
        notes.set(f"{name}/{rank}", "failed" if failed_here else "ok")
        keys = [f"{name}/{r}" for r in range(world)]
        notes.wait(keys, 2 * COLLECTIVE_TIMEOUT)
        failed = [r for r, key in enumerate(keys) if notes.get(key) == b"failed"]
        if failed:
            stopped = f"{name} failed on rank(s) {failed}"
    queue.put((rank, results))
    dist.destroy_process_group()
