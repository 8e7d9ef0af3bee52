"""Streams and CUDA graphs: who owns a cached job's scratch, when a stream waits for a job's
buffers, and what a capture keeps alive.

The cache and ordering logic is checked on the CPU with fakes for the current stream, the
capturing flag and the ready event; the GPU tests (skipped without one) run concurrent streams,
cross-stream steps and graph replays after the cache dropped everything it could.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import pytest
import torch

from gmp_ext.kernels import library, primitives
from gmp_ext.kernels import reference as _reference
from gmp_ext.kernels.backends import Backend, Job
from gmp_ext.kernels.backends import cuda as cuda_backend
from gmp_ext.kernels.backends.base import new_job
from gmp_ext.kernels.engine import PreparedStep
from gmp_ext.kernels.layout import KEY_SPACE_NATIVE, mask_bytes

from .conftest import native_backend
from .utils import assert_same, weights


class FakeBackend(Backend):
    """Prepares jobs with a scratch buffer of their own and counts the preparations."""

    name = "fake"

    def __init__(self) -> None:
        self.prepared = 0

    def prepare(self, tensors, masks=None, scope=None, key_space=KEY_SPACE_NATIVE) -> Job:
        self.prepared += 1
        cpu = torch.device("cpu")
        return new_job(tensors, masks, scope, key_space, cpu, scratch=torch.empty(8))


@pytest.fixture
def cache(monkeypatch):
    """An empty operator job cache with a settable current stream and capturing flag."""
    state = {"stream": 1, "capturing": False}
    monkeypatch.setattr(library, "_JOBS", OrderedDict())
    monkeypatch.setattr(library, "_PINNED", {})
    monkeypatch.setattr(library, "_stream_id", lambda device: state["stream"])
    monkeypatch.setattr(library, "_capturing", lambda device: state["capturing"])
    return state


def _job(backend: Backend, tensors) -> Job:
    return library._job(backend, tensors, None, "layer", KEY_SPACE_NATIVE)


def test_two_streams_never_share_a_cached_jobs_scratch(cache):
    backend, tensors = FakeBackend(), [torch.randn(10)]
    first = _job(backend, tensors)
    assert _job(backend, tensors).scratch is first.scratch  # same stream: the cached job
    cache["stream"] = 2
    other = _job(backend, tensors)
    assert other.scratch is not first.scratch
    assert backend.prepared == 2
    cache["stream"] = 1
    assert _job(backend, tensors).scratch is first.scratch


def test_eviction_and_clear_never_drop_a_captured_job(cache):
    backend, tensors = FakeBackend(), [torch.randn(10)]
    warm = _job(backend, tensors)  # the warm-up before the capture
    cache["capturing"] = True
    captured = _job(backend, tensors)
    cache["capturing"] = False
    assert captured.scratch is warm.scratch and library.pinned_jobs() == 1
    others = [torch.randn(3) for _ in range(library._JOB_CACHE_SIZE + 1)]
    for other in others:  # evicts every job that no capture pinned
        _job(backend, [other])
    library.clear_job_cache()
    assert not library._JOBS and library.pinned_jobs() == 1
    prepared = backend.prepared
    assert _job(backend, tensors).scratch is warm.scratch
    assert backend.prepared == prepared


def test_a_job_first_seen_in_a_capture_is_pinned(cache):
    backend, tensors = FakeBackend(), [torch.randn(10)]
    cache["capturing"] = True
    captured = _job(backend, tensors)
    assert library.pinned_jobs() == 1 and not library._JOBS
    cache["capturing"] = False
    library.clear_job_cache()
    assert _job(backend, tensors).scratch is captured.scratch


class FakeEvent:
    def __init__(self, done: bool) -> None:
        self.done = done
        self.recorded_on: list[int] = []

    def query(self) -> bool:
        return self.done

    def record(self, stream) -> None:
        self.recorded_on.append(stream.cuda_stream)


class FakeStream:
    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle
        self.waited: list[FakeEvent] = []

    def wait_event(self, event) -> None:
        self.waited.append(event)


@pytest.fixture
def recorded(monkeypatch):
    """(tensor, stream handle) pairs that ``Tensor.record_stream`` saw."""
    seen: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: seen.append((t, s.cuda_stream)))
    return seen


def _prepared_on(handle: int, done: bool) -> Job:
    job = new_job([torch.randn(4)], None, "layer", KEY_SPACE_NATIVE, torch.device("cpu"))
    job.ready = FakeEvent(done)  # type: ignore[assignment]
    job.streams.add(handle)
    return job


def test_a_job_used_on_another_stream_makes_it_wait_once(recorded):
    job, same, other = _prepared_on(1, done=False), FakeStream(1), FakeStream(2)
    job.order_on(same, capturing=False)
    assert not same.waited and not recorded
    job.order_on(other, capturing=False)
    assert other.waited == [job.ready]
    assert {id(t) for t, s in recorded if s == 2} == {
        id(job.table),
        id(job.counts),
        id(job.rows),
        id(job.scratch),
        id(job.kept),
    }
    job.order_on(other, capturing=False)  # ordered after the job already
    assert other.waited == [job.ready]


def test_a_capture_refuses_a_job_still_being_written_on_another_stream(recorded):
    job, capture = _prepared_on(1, done=False), FakeStream(2)
    with pytest.raises(RuntimeError, match=r"written on CUDA stream 0x1, .* synchronize"):
        job.order_on(capture, capturing=True)
    assert job.streams == {1} and not capture.waited and not recorded
    job.ready.done = True  # type: ignore[union-attr]
    job.order_on(capture, capturing=True)  # landed: no wait (a capture may not wait on it)
    assert job.streams == {1, 2} and not capture.waited and not recorded


def test_set_counts_orders_its_stream_then_makes_it_the_one_others_wait_for(monkeypatch, recorded):
    job, stream = _prepared_on(1, done=True), FakeStream(3)
    job.streams.add(2)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    job.set_counts([2])
    assert stream.waited == [job.ready]  # after the preparing stream's writes
    assert job.counts.tolist() == [2]
    assert job.ready.recorded_on == [3] and job.streams == {3}  # type: ignore[union-attr]


def test_cuda_prepare_refuses_during_a_capture(monkeypatch):
    class Module:
        @staticmethod
        def build_info():
            return {"cuda_tile_elems": 2048}

    monkeypatch.setattr(cuda_backend, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot prepare a CUDA job while the current stream"):
        cuda_backend.CudaBackend(Module()).prepare([torch.randn(4)])


# --- on a GPU -------------------------------------------------------------------------------

CUDA = torch.device("cuda")
skip_without_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("GMP_EXT_TEST_DEVICE", "cuda") != "cuda",
    reason="needs a CUDA device (and GMP_EXT_TEST_DEVICE unset or cuda)",
)


def _cuda_native():
    return native_backend(CUDA)


@pytest.mark.cuda
@skip_without_cuda
def test_concurrent_streams_and_threads_select_as_the_reference():
    _cuda_native()
    torch.manual_seed(0)
    tensors = [weights(n, torch.float32, CUDA) for n in (70001, 4097, 1 << 18)]
    k = sum(t.numel() for t in tensors) // 3
    want = _reference.select_global(tensors, k, KEY_SPACE_NATIVE)
    counts = torch.tensor([k], device=CUDA)
    errors: list[str] = []

    def worker(stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            for i in range(50):
                rows = library.select_global(tensors, counts, KEY_SPACE_NATIVE)
                if not torch.equal(rows, want):
                    errors.append(f"stream {stream.cuda_stream:#x}, call {i}")

    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(2)] * 2  # two threads on each stream
    threads = [threading.Thread(target=worker, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    assert not errors


@pytest.mark.cuda
@skip_without_cuda
def test_operator_graph_replays_after_eviction_and_clear():
    _cuda_native()
    tensors = [torch.empty(n, device=CUDA) for n in (70001, 2048, 33)]
    masks = [primitives.new_mask(t) for t in tensors]
    counts = torch.tensor([50000], device=CUDA)
    capture = torch.cuda.Stream()
    with torch.cuda.stream(capture):  # warm-up on the capturing stream: the job the graph finds
        library.prune(tensors, counts, masks, True, KEY_SPACE_NATIVE)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        rows = library.prune(tensors, counts, masks, True, KEY_SPACE_NATIVE)
    assert library.pinned_jobs() >= 1
    mask = torch.zeros(16, dtype=torch.uint8, device=CUDA)
    for n in range(library._JOB_CACHE_SIZE + 2):  # every unpinned job evicted, then cleared
        library.apply_masks([torch.randn(n + 1, device=CUDA)], [mask])
    library.clear_job_cache()
    torch.cuda.empty_cache()
    for seed in (1, 2):
        torch.manual_seed(seed)
        values = [weights(t.numel(), torch.float32, CUDA) for t in tensors]
        for t, v in zip(tensors, values):
            t.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(rows, _reference.select_global(values, 50000, KEY_SPACE_NATIVE), "rows")


@pytest.mark.cuda
@skip_without_cuda
def test_a_step_prepared_on_one_stream_runs_on_another():
    _cuda_native()
    torch.manual_seed(0)
    values = [weights(n, torch.float32, CUDA) for n in ((1 << 20) + 7, 4097)]
    tensors = [v.clone() for v in values]
    masks = [primitives.new_mask(t) for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    step = PreparedStep(tensors, masks, "layer")
    with torch.cuda.stream(side):  # right after the prepare, no synchronization between
        step.set_counts([1000, 10], per_tensor=True)
        step.run()
    torch.cuda.synchronize()
    rows = _reference.select_layerwise(values, [1000, 10])
    assert_same(torch.stack(step.rows()), rows, "rows")


@pytest.mark.cuda
@skip_without_cuda
def test_fused_apply_through_a_misaligned_mask_view():
    native = _cuda_native()
    tensor = weights(4096, torch.float32, CUDA)
    base = torch.randint(0, 256, (mask_bytes(4096) + 16,), dtype=torch.uint8, device=CUDA)
    mask = base[1 : 1 + mask_bytes(4096)]  # odd offset: no 8-byte word loads
    want = tensor.clone()
    _reference.apply_masks([want], [mask.clone()])
    native.apply(native.prepare([tensor], [mask]))
    assert_same(tensor, want, "apply")


@pytest.mark.cuda
@skip_without_cuda
def test_preparing_during_a_capture_is_refused():
    _cuda_native()
    tensors = [torch.randn(1000, device=CUDA)]
    masks = [primitives.new_mask(t) for t in tensors]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot prepare a CUDA job"), torch.cuda.graph(graph):
        PreparedStep(tensors, masks)
