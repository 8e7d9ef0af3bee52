"""Threshold selection: gmp_ext against pure PyTorch, per layer and global.

    python benchmarks/bench_select.py [--models resnet50 bert_base llama_7b]
        [--dtype float32 bfloat16] [--device cpu|cuda] [--repeats 5] [--no-memory]

Providers, at 90% sparsity (k = round(0.9 * n), the count torch.nn.utils.prune uses):

* gmp_ext: ``ops.select_layerwise`` / ``primitives.select_rows_global`` (thresholds),
  ``ops.magnitude_masks`` (thresholds + packed masks, validated, NaN counts read back), and
  ``prepared``: select + mask build of a backend job made once (the launches
  ``gmp_ext.PrunePlan.step`` runs before its apply: no allocation, nothing read back);
* per layer: loops of ``torch.kthvalue``, ``torch.topk(sorted=False)``, ``torch.sort`` and
  ``torch.quantile`` over |w| (each keeps only the threshold), and
  ``torch.nn.utils.prune.l1_unstructured`` on fresh modules;
* global: the same four on ``torch.cat`` of all weights, and
  ``torch.nn.utils.prune.global_unstructured`` on fresh modules;
* 2:4 (per layer, at 35% sparsity, the middle of a gradual ramp to 50%): the prepared N:M job
  of ``PrunePlan(nm=(2, 4))`` (candidate lists, their selection, mask build) and, in pure
  PyTorch, a loop of a per-group sort of |w| and ``torch.kthvalue`` over the two smallest of
  each group (the threshold only).

Timing: one probe call first; a probe slower than ``--slow-ms`` is the result (``repeats: 1``),
anything faster is warmed up and repeated ``--repeats`` times (p20/p50/p80). CUDA: events per
call, L2 flushed before each. Memory: the peak the call adds on top of the weights, from the
probe on CUDA (``max_memory_allocated``), from a fresh subprocess on CPU (peak resident set).
A method whose memory estimate (``est_extra_mb``) does not fit in the free memory, or whose time
predicted from a smaller model of the same run exceeds ``--max-call-s``, is recorded as
``status: "skipped: ..."``; PyTorch's own refusals (quantile's 2^24-element limit, dtypes) and
out-of-memory errors are recorded as ``"refused: ..."`` and ``"OOM"``.

Rates: ``bytes_floor`` is the compulsory traffic of the task (one read of the weights for a
threshold, plus a second read and the mask bits for masks), the same for every provider of a
task; ``gbps = bytes_floor / p50``, ``pct_of_copy`` relates it to the copy bandwidth measured at
the start of the run and ``floor_ratio = p50 / (bytes_floor / copy bandwidth)``.

Rows go to benchmarks/results/select_<device>_<dtype>.json ($GMP_EXT_BENCH_OUT overrides the
folder), rewritten after every method so an interrupted run keeps what it measured.

Under load (``--under-load N [--load-kind busy|omp|copy]``, CPU): only the per-layer rows of
gmp_ext (thresholds; + masks; the prepared job), the ``kthvalue`` loop and the ``topk`` loop,
timed while N competing processes (``load.py``; stopped after ``--load-seconds`` at the latest,
and when the rows are done) keep the cores busy, so all of them see the same load; then the
eager ``gmp_ext.prune_step``, per layer and global, at torch's thread count and at one thread,
in ``--rounds`` (3) rounds of interleaved call pairs (``x_one_thread``: its p50 over the
one-thread p50 of the same round).
Rows go to select_under_load_<device>_<dtype>.json with ``speedup_vs_topk``.

Interleaved (``--interleaved N``, CPU): the eager ``gmp_ext.prune_step``, the prepared prune
step (``PrunePlan.step``) and one read (``torch._foreach_norm``), per layer and global, timed in
N rounds of one call each, in an order that rotates from round to round; each round gives the
eager step's time over the prepared step's and over the read's, so that a ratio compares calls
a few milliseconds apart on a machine whose speed drifts. Rows (one per model, scope and
provider, with the p20/p50/p80 of the ratios) go to select_interleaved_<device>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from load import KINDS, competing_load
from shapes import MODELS
from torch import nn
from torch.nn.utils import prune
from utils import (
    add_common_arguments,
    available_bytes,
    copy_reference,
    free_memory,
    measure,
    peak_rss_mb,
    print_table,
    quantiles,
    rates,
    reset_peak_rss_mb,
    time_cpu,
    weights_for,
    write_rows,
)

import gmp_ext
from gmp_ext.kernels import ops, primitives
from gmp_ext.kernels.engine import UNSTRUCTURED, PreparedStep
from gmp_ext.kernels.layout import key_space_for
from gmp_ext.pruning.strategies import NMPattern

SPARSITY = 0.9
# One read of the weights, the unit of ``read_passes`` (p50 over this row's p50, same run).
READ_ONCE = "torch._foreach_norm (one read)"
EAGER = "gmp_ext.prune_step (eager: selection, checks, store)"
NM_SPARSITY = 0.35  # of a 2:4 ramp, which ends at 0.5
MEMORY_HEADROOM = 0.92  # of the free memory a method may be expected to take
QUANTILE_LIMIT = 1 << 24  # torch.quantile's input limit (it raises above it)


def _k(numel: int) -> int:
    return max(ops.prune_count(numel, SPARSITY), 1)


def _nm_k(numel: int) -> int:
    return max(ops.prune_count(numel, NM_SPARSITY), 1)


def _two_four_ready(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """The weights whose flattened rows are whole groups of 4 (a stem conv with 3 input channels
    is not): the kernels' groups are 4 consecutive elements."""
    return [w for w in ws if w.dim() >= 2 and math.prod(w.shape[1:]) % 4 == 0]


def _two_four_threshold(w: torch.Tensor) -> torch.Tensor:
    candidates = w.abs().reshape(-1, 4).sort(dim=1).values[:, :2].reshape(-1)
    return torch.kthvalue(candidates, _nm_k(w.numel())).values


@dataclass(frozen=True)
class Sizes:
    n: int  # elements in all
    e: int  # bytes per element
    n_max: int  # elements of the largest tensor
    count: int  # tensors
    k: int  # global prune count
    cpu: bool  # PyTorch's CPU kernels copy more than its CUDA ones (measured on ResNet-50)

    @classmethod
    def of(cls, ws: list[torch.Tensor]) -> Sizes:
        n = sum(w.numel() for w in ws)
        cpu = ws[0].device.type == "cpu"
        return cls(n, ws[0].element_size(), max(w.numel() for w in ws), len(ws), _k(n), cpu)


@dataclass(frozen=True)
class Method:
    """``fn(weights)``, or ``fn(setup(weights))`` with the set-up outside the timed region."""

    fn: Callable
    extra: Callable[[Sizes], float]  # estimated peak extra bytes
    setup: Callable | None = None
    masks: bool = False  # also builds masks: the floor adds a read and the mask bits
    native: bool = False


class _Holder(nn.Module):
    """A module owning one weight, as torch.nn.utils.prune expects (storage shared)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


gmp_ext.register_layer(_Holder)  # the default selection of gmp_ext.prune_step takes its weight


def _holders(ws: list[torch.Tensor]) -> nn.ModuleList:
    return nn.ModuleList(_Holder(w) for w in ws)


def _l1_loop(modules: nn.ModuleList) -> nn.ModuleList:
    for module in modules:
        prune.l1_unstructured(module, "weight", amount=SPARSITY)
    return modules


def _global_unstructured(modules: nn.ModuleList) -> nn.ModuleList:
    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=SPARSITY
    )
    return modules


def _cat_abs(ws: list[torch.Tensor]) -> torch.Tensor:
    """|w| of all weights in one vector: one copy (the views are concatenated, then abs_)."""
    return torch.cat([w.reshape(-1) for w in ws]).abs_()


class _Prepared:
    """Select + build of the engine's prepared step, made at the first call (and again if the
    weights move): the launches of ``PrunePlan.step`` without the apply."""

    def __init__(self, scope: str, pattern: tuple[int, int] | None = None) -> None:
        self.scope = scope
        self.pattern = pattern
        self.step: PreparedStep | None = None

    def __call__(self, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.pattern is not None:
            ws = _two_four_ready(ws)
        if self.step is None or self.step.tensors != ws:
            masks = [primitives.new_mask(w) for w in ws]
            key_space = key_space_for({w.dtype for w in ws}) if self.scope == "global" else 0
            pattern = UNSTRUCTURED if self.pattern is None else NMPattern(*self.pattern)
            self.step = PreparedStep(ws, masks, self.scope, key_space, pattern)
            count = _k if self.pattern is None else _nm_k
            if self.scope == "global":
                self.step.set_counts([count(sum(w.numel() for w in ws))], per_tensor=False)
            else:
                self.step.set_counts([count(w.numel()) for w in ws], per_tensor=True)
        self.step.run(apply=False)
        return self.step.rows()


class _PruneStep:
    """The whole prune step of ``PrunePlan.step`` (select + build + zeroing, ``PreparedStep.run``)
    on fresh copies of the weights: the set-up (untimed) copies them back, so every timed call
    starts from unpruned weights, not from the zeros of the call before."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.step: PreparedStep | None = None
        self.source: list[torch.Tensor] = []

    def setup(self, ws: list[torch.Tensor]) -> PreparedStep:
        if self.step is None or self.source is not ws:
            work = [w.clone() for w in ws]
            masks = [primitives.new_mask(w) for w in work]
            key_space = key_space_for({w.dtype for w in ws}) if self.scope == "global" else 0
            self.step = PreparedStep(work, masks, self.scope, key_space)
            if self.scope == "global":
                self.step.set_counts([_k(sum(w.numel() for w in ws))], per_tensor=False)
            else:
                self.step.set_counts([_k(w.numel()) for w in ws], per_tensor=True)
            self.source = ws
        torch._foreach_copy_(self.step.tensors, ws)
        return self.step

    @staticmethod
    def run(step: PreparedStep) -> list[torch.Tensor]:
        step.run()
        return step.rows()


def _read_once(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    return torch._foreach_norm(ws)


def _names(ws: list[torch.Tensor]) -> list[str]:
    return [f"w{i}" for i in range(len(ws))]


class _EagerPruneStep:
    """``gmp_ext.prune_step(model, SPARSITY)`` (the default selection, validation, the store)
    on a model holding fresh copies of the weights, copied back in the untimed set-up."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.model: nn.ModuleList | None = None
        self.source: list[torch.Tensor] = []

    def setup(self, ws: list[torch.Tensor]) -> nn.ModuleList:
        if self.model is None or self.source is not ws:
            self.model = _holders([w.clone() for w in ws])
            self.source = ws
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.model.parameters()], ws)
        return self.model

    def run(self, model: nn.ModuleList) -> dict[str, float]:
        return gmp_ext.prune_step(model, SPARSITY, scope=self.scope)


def _prune_step_methods(scope: str) -> dict[str, Method]:
    step = _PruneStep(scope)
    eager = _EagerPruneStep(scope)
    return {
        "gmp_ext prune step (select + build + zero)": Method(
            step.run,
            lambda s: s.n * s.e + s.n / 8 + 2**20,
            setup=step.setup,
            masks=True,
            native=True,
        ),
        EAGER: Method(
            eager.run,
            lambda s: s.n * s.e + s.n / 8 + 2**20,
            setup=eager.setup,
            masks=True,
            native=True,
        ),
        READ_ONCE: Method(_read_once, lambda s: 0, native=True),
    }


def _methods(scope: str) -> dict[str, Method]:
    if scope == "layer":
        return {
            "gmp_ext": Method(
                lambda ws: ops.select_layerwise(ws, SPARSITY),
                lambda s: s.n / 8 + s.count * 2**16,
                native=True,
            ),
            "gmp_ext + masks": Method(
                lambda ws: ops.magnitude_masks(ws, SPARSITY),
                lambda s: s.n / 4 + s.count * 2**16,
                masks=True,
                native=True,
            ),
            "gmp_ext prepared (+ masks)": Method(
                _Prepared("layer"),
                lambda s: s.n / 4 + s.count * 2**16,
                masks=True,
                native=True,
            ),
            **_prune_step_methods("layer"),
            "torch.kthvalue loop": Method(
                lambda ws: [torch.kthvalue(w.abs().reshape(-1), _k(w.numel())).values for w in ws],
                lambda s: 4 * s.n_max * s.e,
            ),
            "torch.topk(sorted=False) loop": Method(
                lambda ws: [
                    torch.topk(
                        w.abs().reshape(-1), _k(w.numel()), largest=False, sorted=False
                    ).values.max()
                    for w in ws
                ],
                lambda s: 2 * s.n_max * (2 * s.e + 8),
            ),
            "torch.sort loop": Method(
                lambda ws: [torch.sort(w.abs().reshape(-1)).values[_k(w.numel()) - 1] for w in ws],
                lambda s: s.n_max * (2 * s.e + 4 * (s.e + 8)),
            ),
            "torch.quantile loop": Method(
                lambda ws: [torch.quantile(w.abs().reshape(-1), SPARSITY) for w in ws],
                lambda s: s.n_max * (3 * s.e + 8),
            ),
            "torch.nn.utils.prune.l1_unstructured loop": Method(
                _l1_loop,
                lambda s: 2 * s.n * s.e + s.n_max * (4 * s.e + SPARSITY * (s.e + 8)),
                setup=_holders,
                masks=True,
            ),
            "gmp_ext prepared 2:4 (+ masks)": Method(
                _Prepared("layer", (2, 4)),
                lambda s: s.n / 4 + s.n * s.e / 2 + s.count * 2**16,
                masks=True,
                native=True,
            ),
            "torch 2:4 group sort + kthvalue loop": Method(
                lambda ws: [_two_four_threshold(w) for w in _two_four_ready(ws)],
                lambda s: s.n_max * (3 * s.e + 8),
            ),
        }
    return {
        "gmp_ext": Method(
            lambda ws: primitives.select_rows_global(
                ws, _names(ws), _k(sum(w.numel() for w in ws))
            ),
            lambda s: s.n / 8 + 2**20,
            native=True,
        ),
        "gmp_ext + masks": Method(
            lambda ws: ops.magnitude_masks(ws, SPARSITY, scope="global"),
            lambda s: s.n / 4 + 2**20,
            masks=True,
            native=True,
        ),
        "gmp_ext prepared (+ masks)": Method(
            _Prepared("global"),
            lambda s: s.n / 4 + 2**20,
            masks=True,
            native=True,
        ),
        **_prune_step_methods("global"),
        "torch.cat + kthvalue": Method(
            lambda ws: torch.kthvalue(_cat_abs(ws), _k(sum(w.numel() for w in ws))).values,
            lambda s: (4 if s.cpu else 2) * s.n * s.e,
        ),
        "torch.cat + topk(sorted=False)": Method(
            lambda ws: torch.topk(
                _cat_abs(ws), _k(sum(w.numel() for w in ws)), largest=False, sorted=False
            ).values.max(),
            lambda s: s.n * s.e + (2.5 * s.n if s.cpu else 1.1 * s.k) * (s.e + 8),
        ),
        "torch.cat + sort": Method(
            lambda ws: torch.sort(_cat_abs(ws)).values[_k(sum(w.numel() for w in ws)) - 1],
            lambda s: s.n * s.e + 2 * s.n * (s.e + 8),
        ),
        "torch.cat + quantile": Method(
            lambda ws: torch.quantile(_cat_abs(ws), SPARSITY),
            # Above 2^24 elements quantile refuses right after the concatenation.
            lambda s: s.n * s.e + (s.n * (2 * s.e + 8) if s.n <= QUANTILE_LIMIT else 0),
        ),
        "torch.nn.utils.prune.global_unstructured": Method(
            _global_unstructured,
            lambda s: 10 * s.n * s.e + s.k * (s.e + 8),
            setup=_holders,
            masks=True,
        ),
    }


def _bound(method: Method, weights: list[torch.Tensor]):
    """(fn, setup) for utils.measure."""
    if method.setup is None:
        return (lambda: method.fn(weights)), None
    return method.fn, (lambda: method.setup(weights))


def _extra_memory_mb(model: str, dtype: str, device: str, scope: str, method: str):
    """Peak memory the method adds on top of the weights, in a fresh process (CPU)."""
    args = [sys.executable, __file__, "--measure", method, "--models", model, "--dtype", dtype]
    args += ["--device", device, "--scope", scope]
    # A fixed mmap threshold stops glibc from keeping freed temporaries of the set-up in its
    # heap, where the method could reuse them without raising the peak resident set.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_mb"]


def _measure(args) -> None:
    weights = weights_for(MODELS[args.models[0]](), getattr(torch, args.dtype[0]), args.device)
    fn, setup = _bound(_methods(args.scope)[args.measure], weights)
    state = (setup(),) if setup is not None else ()
    extra = None
    try:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*state)
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base = reset_peak_rss_mb()
            fn(*state)
            extra = peak_rss_mb() - base
        extra = max(extra, 0.0)
    except (RuntimeError, MemoryError):
        pass  # the timing row already says why
    print(json.dumps({"extra_mb": extra}))


class Runner:
    """Runs every method of every model for one dtype and keeps the rows on disk."""

    def __init__(self, args, dtype: str, copy: dict) -> None:
        self.args = args
        self.dtype = dtype
        self.device = torch.device(args.device)
        self.copy = copy
        self.rows: list[dict] = [{**copy, "dtype": dtype}]
        self.throughput: dict[tuple[str, str], tuple[float, str]] = {}  # elements per ms
        self.name = f"select_{self.device.type}_{dtype}"

    def save(self):
        return write_rows(self.name, self.rows)

    def _skip_reason(self, key, method: Method, sizes: Sizes) -> str | None:
        need = method.extra(sizes)
        free = available_bytes(self.device)
        if need > MEMORY_HEADROOM * free:
            return f"skipped: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
        if key in self.throughput:
            rate, source = self.throughput[key]
            predicted_s = sizes.n / rate / 1e3
            if predicted_s > self.args.max_call_s:
                return (
                    f"skipped: predicted ~{predicted_s:.0f} s per call from {source} "
                    f"(--max-call-s {self.args.max_call_s:g})"
                )
        return None

    def run_model(self, model: str) -> None:
        start = time.perf_counter()
        weights = weights_for(MODELS[model](), getattr(torch, self.dtype), self.device)
        sizes = Sizes.of(weights)
        weight_mb = sizes.n * sizes.e / 2**20
        copy = self.copy["gbps"]
        for scope in self.args.scopes:
            scope_rows = []
            for provider, method in _methods(scope).items():
                if self.args.providers and not any(p in provider for p in self.args.providers):
                    continue
                key = (scope, provider)
                row = {
                    "kernel": f"select_{scope}",
                    "provider": provider,
                    "model": model,
                    "dtype": self.dtype,
                    "device": str(self.device),
                    "numel": sizes.n,
                    "tensors": sizes.count,
                    "weights_mb": round(weight_mb, 1),
                    "est_extra_mb": round(method.extra(sizes) / 2**20, 1),
                }
                reason = self._skip_reason(key, method, sizes)
                if reason is not None:
                    row["status"] = reason
                else:
                    fn, setup = _bound(method, weights)
                    row.update(
                        measure(
                            self.device,
                            fn,
                            repeats=self.args.repeats,
                            setup=setup,
                            slow_ms=self.args.slow_ms,
                            failure="error" if method.native else "refused",
                            confirm_slow=method.native,
                        )
                    )
                if row["status"] == "ok":
                    floor = sizes.n * sizes.e * (2 if method.masks else 1)
                    floor += sizes.n / 8 if method.masks else 0
                    row["bytes_floor"] = int(floor)
                    row.update(rates(row["p50_ms"], floor, floor, copy))
                    row["copy_gbps"] = copy
                    self.throughput[key] = (sizes.n / row["p50_ms"], model)
                    if self.device.type == "cpu" and not self.args.no_memory:
                        row["extra_mb"] = _extra_memory_mb(
                            model, self.dtype, self.args.device, scope, provider
                        )
                scope_rows.append(row)
                self.rows.append(row)
                self.save()
                timing = (
                    f"{row['p50_ms']:10.3f} ms  x{row['repeats']}"
                    if row["status"] == "ok"
                    else row["status"]
                )
                print(f"  {model} {self.dtype} {scope:6} {provider:42} {timing}", flush=True)
            baseline = next(
                (
                    r["p50_ms"]
                    for r in scope_rows
                    if "kthvalue" in r["provider"] and r["status"] == "ok"
                ),
                None,
            )
            read_once = next(
                (
                    r["p50_ms"]
                    for r in scope_rows
                    if r["provider"] == READ_ONCE and r["status"] == "ok"
                ),
                None,
            )
            for row in scope_rows:
                if baseline and row["status"] == "ok":
                    row["speedup_vs_kthvalue"] = baseline / row["p50_ms"]
                if read_once and row["status"] == "ok":
                    row["read_passes"] = row["p50_ms"] / read_once
            self.save()
        del weights
        free_memory(self.device)
        print(f"  {model} {self.dtype}: {time.perf_counter() - start:.0f} s", flush=True)


UNDER_LOAD = (
    "gmp_ext",
    "gmp_ext + masks",
    "gmp_ext prepared (+ masks)",
    "gmp_ext prune step (select + build + zero)",
    "torch.kthvalue loop",
    "torch.topk(sorted=False) loop",
)


def _at_threads(fn: Callable, threads: int) -> Callable:
    def run(*args: object) -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)

    return run


def _eager_threads_rows(
    weights: list[torch.Tensor], repeats: int, base: dict, rounds: int
) -> list[dict]:
    """The eager prune step per layer and global at torch's thread count and at one thread:
    ``rounds`` rounds of ``3 * repeats`` call pairs, the two calls of a pair back to back in
    alternating order, so that both thread counts see the same load (whose level drifts within
    a round too)."""
    rows = []
    default = torch.get_num_threads()
    for scope in ("layer", "global"):
        method = _prune_step_methods(scope)[EAGER]
        fn, setup = _bound(method, weights)
        for threads in (default, 1):
            time_cpu(_at_threads(fn, threads), 1, 1, setup)  # warm-up
        for round_ in range(rounds):
            samples: dict[int, list[float]] = {default: [], 1: []}
            for pair in range(3 * repeats):
                order = (default, 1) if pair % 2 == 0 else (1, default)
                for threads in order:
                    call = _at_threads(fn, threads)
                    samples[threads].append(time_cpu(call, 1, 0, setup)["p50_ms"])
            p50 = {t: statistics.median(samples[t]) for t in samples}
            for threads in (default, 1):
                row = {"kernel": f"prune_step_{scope}", "provider": f"{EAGER}, {threads} threads"}
                row.update({**base, "threads": threads, "round": round_})
                row.update(quantiles(samples[threads]))
                row["x_one_thread"] = p50[threads] / p50[1]
                rows.append(row)
            print(
                f"  {base['model']} under load ({base['load']}) prune_step {scope} round "
                f"{round_}: {default} threads {p50[default]:.1f} ms, 1 thread {p50[1]:.1f} ms",
                flush=True,
            )
    return rows


def run_interleaved(args, dtype: str) -> Path:
    """``--interleaved``: per-round ratios of the eager prune step to the prepared step and to
    one read (see the module docstring)."""
    rows: list[dict] = []
    providers = (EAGER, "gmp_ext prune step (select + build + zero)", READ_ONCE)
    for model in args.models:
        weights = weights_for(MODELS[model](), getattr(torch, dtype), torch.device("cpu"))
        for scope in args.scopes:
            methods = _prune_step_methods(scope)
            calls = [_bound(methods[p], weights) for p in providers]
            for fn, setup in calls:
                time_cpu(fn, 1, 1, setup)  # warm-up
            times: list[list[float]] = [[] for _ in providers]
            for round_ in range(args.interleaved):
                for j in range(len(calls)):
                    i = (round_ + j) % len(calls)
                    fn, setup = calls[i]
                    times[i].append(time_cpu(fn, 1, 0, setup)["p50_ms"])
            eager = times[0]
            base = {"model": model, "dtype": dtype, "scope": scope, "rounds": args.interleaved}
            for provider, samples in zip(providers, times):
                row = {"kernel": f"prune_step_{scope}", "provider": provider, **base}
                row.update(quantiles(samples))
                ratios = quantiles([e / s for e, s in zip(eager, samples)])
                for q in ("p20", "p50", "p80"):
                    row[f"eager_over_this_{q}"] = ratios[f"{q}_ms"]
                rows.append(row)
            over_plan = [e / s for e, s in zip(eager, times[1])]
            over_read = [e / s for e, s in zip(eager, times[2])]
            plan_p50, read_p50 = statistics.median(over_plan), statistics.median(over_read)
            print(
                f"  {model} {dtype} {scope}: eager / prepared p50 {plan_p50:.2f} "
                f"(<= 1.3 in {sum(r <= 1.3 for r in over_plan)} of {len(over_plan)} rounds), "
                f"eager / one read p50 {read_p50:.2f} "
                f"(<= 2.5 in {sum(r <= 2.5 for r in over_read)})",
                flush=True,
            )
        del weights
    name = f"select_interleaved_cpu_{dtype}"
    print_table(rows, ["kernel", "provider", "model", "p50_ms", "eager_over_this_p50"])
    return write_rows(name, rows)


def run_under_load(args, dtype: str) -> Path:
    """The per-layer rows of UNDER_LOAD, every model, with competing processes running."""
    device = torch.device(args.device)
    load = f"{args.under_load} x {args.load_kind}"
    rows: list[dict] = []
    name = f"select_under_load_{device.type}_{dtype}"
    methods = _methods("layer")
    for model in args.models:
        weights = weights_for(MODELS[model](), getattr(torch, dtype), device)
        with competing_load(args.load_kind, args.under_load, args.load_seconds):
            model_rows = []
            base = {"model": model, "dtype": dtype, "device": str(device), "load": load}
            for provider in UNDER_LOAD:
                fn, setup = _bound(methods[provider], weights)
                row = {"kernel": "select_layer", "provider": provider, **base}
                row.update(measure(device, fn, repeats=args.repeats, setup=setup, slow_ms=1e9))
                print(
                    f"  {model} {dtype} under load ({load}) {provider:32} "
                    f"{row.get('p50_ms', float('nan')):10.3f} ms",
                    flush=True,
                )
                model_rows.append(row)
            threads_rows = _eager_threads_rows(weights, args.repeats, base, args.rounds)
        topk = model_rows[-1].get("p50_ms")
        for row in model_rows:
            if topk and "p50_ms" in row:
                row["speedup_vs_topk"] = topk / row["p50_ms"]
        rows += model_rows + threads_rows
        write_rows(name, rows)
        del weights
    print_table(rows, ["provider", "model", "dtype", "load", "p50_ms", "speedup_vs_topk"])
    return write_rows(name, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--scopes", nargs="+", default=["layer", "global"])
    parser.add_argument("--providers", nargs="*", help="substrings of the providers to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--slow-ms",
        type=float,
        default=1000.0,
        help="probe time above which a method is timed once",
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=120.0,
        help="skip a method whose call is predicted (from a smaller model) to take longer",
    )
    parser.add_argument("--copy-gib", type=float, help="copy reference buffer (GiB)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--under-load",
        type=int,
        default=0,
        metavar="N",
        help="only the per-layer gmp_ext, kthvalue and topk rows, with N competing processes",
    )
    parser.add_argument("--load-kind", choices=KINDS, default="busy")
    parser.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="N",
        help="only the eager, prepared and one-read prune-step rows, in N interleaved rounds",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of call pairs of the eager rows under load"
    )
    parser.add_argument(
        "--load-seconds", type=float, default=600.0, help="the load stops after this at the latest"
    )
    parser.add_argument("--scope", choices=["layer", "global"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _measure(args)
        return
    if args.under_load:
        for dtype in args.dtype:
            print(f"rows: {run_under_load(args, dtype)}")
        return
    if args.interleaved:
        for dtype in args.dtype:
            print(f"rows: {run_interleaved(args, dtype)}")
        return

    device = torch.device(args.device)
    copy = copy_reference(device, args.copy_gib)
    paths = []
    for dtype in args.dtype:
        runner = Runner(args, dtype, copy)
        for model in args.models:
            runner.run_model(model)
        paths.append(runner.save())
        print_table(
            runner.rows[1:],
            [
                "kernel",
                "provider",
                "model",
                "dtype",
                "p50_ms",
                "repeats",
                "speedup_vs_kthvalue",
                "read_passes",
                "pct_of_copy",
                "extra_mb",
                "status",
            ],
        )
    for path in paths:
        print(f"rows: {path}")


if __name__ == "__main__":
    main()
