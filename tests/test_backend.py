"""Backend table, env override, fallback without the compiled module, diagnostics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gmp_ext
from gmp_ext.app.info import collect
from gmp_ext.kernels import backends, ops
from gmp_ext.kernels.layout import check_native_layout

from .conftest import native_backend
from .utils import weights


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd="/",  # not the source tree, which would shadow the installed package
        timeout=120,
        check=False,
    )


def test_env_override_selects_reference(monkeypatch):
    monkeypatch.setenv("GMP_EXT_BACKEND", "reference")
    assert backends.backend_for(torch.device("cpu")) is backends.REFERENCE
    monkeypatch.setenv("GMP_EXT_BACKEND", "CPU ")
    assert backends.backend_for(torch.device("cpu")).name == "cpu"


def test_env_override_errors(monkeypatch):
    monkeypatch.setenv("GMP_EXT_BACKEND", "tpu")
    with pytest.raises(
        ValueError, match="GMP_EXT_BACKEND must be one of cuda, cpu, reference, got 'tpu'"
    ):
        ops.select(torch.ones(3), 0.5)
    monkeypatch.setenv("GMP_EXT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run tensors on device cpu"):
        ops.select(torch.ones(3), 0.5)


def test_backends_agree_on_a_model(monkeypatch):
    native_backend(torch.device("cpu"))  # skips without the compiled kernels
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7))
    with torch.no_grad():
        model[0].weight[:, ::3] = 0.0  # ties at zero across rows
    results = {}
    for name in ("cpu", "reference"):
        monkeypatch.setenv("GMP_EXT_BACKEND", name)
        for scope in ("layer", "global"):
            clone = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 7))
            clone.load_state_dict(model.state_dict())
            gmp_ext.prune_step(clone, 0.8, scope=scope)
            results[name, scope] = [p.detach().clone() for p in clone.parameters()]
    for scope in ("layer", "global"):
        for a, b in zip(results["cpu", scope], results["reference", scope]):
            assert torch.equal(a, b)


def test_thread_count_does_not_change_results(monkeypatch):
    native_backend(torch.device("cpu"))  # skips without the compiled kernels
    monkeypatch.setenv("GMP_EXT_BACKEND", "cpu")  # the native kernels, or an error
    t = weights((1 << 20) + 3, torch.float32, kind="few_values")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.magnitude_masks([t, t.bfloat16()], 0.6, scope="global")
        torch.set_num_threads(2)
        two = ops.magnitude_masks([t, t.bfloat16()], 0.6, scope="global")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_missing_compiled_module_falls_back_with_one_warning():
    code = """
import sys, warnings
sys.modules["gmp_ext._C"] = None  # makes `from . import _C` raise ImportError
import torch, gmp_ext
from gmp_ext.kernels import backends
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = torch.nn.Linear(10, 10)
    gmp_ext.prune_step(model, 0.5)
    gmp_ext.prune_step(model, 0.7)
assert int((model.weight == 0).sum()) == 70
messages = [str(w.message) for w in caught if "gmp_ext._C" in str(w.message)]
assert len(messages) == 1, messages
assert "pip install ." in messages[0]
try:
    backends.native_backend("cpu")
except RuntimeError as error:
    assert "GMP_EXT_BACKEND=reference" in str(error)
else:
    raise AssertionError("a native backend without _C must raise")
print("ok")
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_compiled_module_loads_before_torch():
    # torch ships its own libgomp; both import orders must share one OpenMP runtime.
    code = """
import glob, importlib.util, os, sys
package = importlib.util.find_spec("gmp_ext").submodule_search_locations[0]
(path,) = glob.glob(os.path.join(package, "_C*.so"))
spec = importlib.util.spec_from_file_location("gmp_ext._C", path)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)  # the extension and its libgomp load before torch
assert "torch" not in sys.modules
import torch
sys.modules["gmp_ext._C"] = C
import gmp_ext
torch.set_num_threads(2)
assert C.cpu_max_threads() == 2
model = torch.nn.Linear(3000, 300)
gmp_ext.prune_step(model, 0.9)
assert int((model.weight == 0).sum()) == 810000
print("ok")
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_diagnostics():
    info = collect()
    assert info["torch"] == torch.__version__
    assert "reference" in info["backends available"]
    assert (info["compiled module"] == "yes") == (backends.native() is not None)
    result = subprocess.run(
        [sys.executable, "-m", "gmp_ext"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert "backends available" in result.stdout and "CUDA kernels compiled" in result.stdout


def test_cuda_module_imports_without_driver():
    module = backends.native()
    if module is None or not module.build_info()["cuda"]:
        pytest.skip("built without CUDA")
    count = module.cuda_device_count()
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
    else:  # no driver (-1) or a driver without devices (0); either way the import worked
        assert count in (-1, 0)
    assert isinstance(module.cuda_driver_status(), str)


def test_compiled_layout_matches_python():
    module = backends.native()
    if module is None:
        pytest.skip("gmp_ext._C is not built")
    info = module.build_info()
    check_native_layout(info)  # the layout this build was made with
    assert info["table_columns"] == 9 and info["selection_columns"] == 4
    stale = {**info, "dtype_codes": {**info["dtype_codes"], "bfloat16": 7}}
    with pytest.raises(RuntimeError, match=r"dtype_codes: built .*'bfloat16': 7.*reinstall"):
        check_native_layout(stale)
