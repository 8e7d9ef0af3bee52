"""Sparse checkpoints (compressed-tensors formats) and 2:4 semi-structured conversion."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import gmp_ext
from gmp_ext.deploy import sparse as deploy

from .utils import DTYPE_IDS, DTYPES, assert_same

compressed_tensors = pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")


# -- helpers -----------------------------------------------------------------------------------


def prune_24(weight: torch.Tensor) -> None:
    """Zero the 2 smallest |w| of every group of 4 along each row (ties: lowest index)."""
    with torch.no_grad():
        groups = weight.reshape(weight.shape[0], -1, 4)
        order = groups.abs().float().argsort(dim=-1, stable=True)
        groups.scatter_(-1, order[..., :2], 0.0)


class Net(nn.Module):
    """Linear layers of odd and even sizes, a conv, a norm with buffers, empty tensors."""

    def __init__(self, dtype: torch.dtype = torch.float32, width: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width, dtype=dtype)
        self.fc2 = nn.Linear(2 * width, 24, dtype=dtype)
        self.odd = nn.Linear(5, 3, dtype=dtype)
        self.one = nn.Linear(1, 1, dtype=dtype)
        self.empty = nn.Parameter(torch.empty(3, 0, dtype=dtype))
        self.register_buffer("empty_buffer", torch.empty(0, dtype=dtype))
        self.conv = nn.Conv2d(3, 8, 3, dtype=dtype)
        self.norm = nn.BatchNorm1d(24, dtype=dtype)
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.num_batches_tracked.fill_(7)


def state_bits_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
        assert_same(sb[name], sa[name], name)


def stored_bytes(directory, names: list[str]) -> int:
    """Bytes the file's data holds for the given tensors, read from the safetensors header."""
    with open(directory / deploy.WEIGHTS_FILE, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for key, entry in header.items():
        prefix, _, part = key.rpartition(".")
        if prefix in names and part in deploy.PARTS["sparse-bitmask"]:
            start, end = entry["data_offsets"]
            total += end - start
    return total


def has_sparse_decompression() -> bool:
    try:
        __import__("compressed_tensors.compressors.sparse_compressors")
    except ImportError:
        return False
    return True


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_round_trip_is_bit_identical(tmp_path, dtype, kind):
    model = Net(dtype)
    if kind == "2:4":
        prune_24(model.fc1.weight)
        prune_24(model.fc2.weight)
    else:
        gmp_ext.prune_step(model, 0.9, params=["fc1.weight", "fc2.weight", "conv.weight"])
    report = gmp_ext.save_sparse(model, tmp_path)

    fmt = "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask"
    assert report["fc1.weight"].format == fmt and report["fc2.weight"].format == fmt
    # Conv kernels, biases, buffers, layers with too few zeros: dense.
    for name in ["conv.weight", "odd.weight", "one.weight", "empty", "norm.running_mean"]:
        assert report[name].format == "dense", name
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == fmt
    assert config["sparsity_config"]["targets"] == ["fc1", "fc2"]

    loaded = Net(dtype)
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)


def test_round_trip_on_a_second_call_overwrites(tmp_path):
    model = Net()
    gmp_ext.prune_step(model, 0.5, params=["fc1.weight"])
    gmp_ext.save_sparse(model, tmp_path)
    gmp_ext.prune_step(model, 0.95, params=["fc1.weight"])
    gmp_ext.save_sparse(model, tmp_path)
    loaded = Net()
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)


def test_specials_nan_kept_negative_zero_loads_as_positive_zero(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        w = model[0].weight
        w.zero_()
        w[0, 0], w[1, 3], w[2, 5] = float("nan"), float("inf"), -1e-40
        w[3, :4] = -0.0
        w[4, 4:7] = 2.5  # three non-zeros in a group of 4: not 2:4
    report = gmp_ext.save_sparse(model, tmp_path)
    assert report["0.weight"].format == "sparse-bitmask"
    loaded = nn.Sequential(nn.Linear(16, 8))
    gmp_ext.load_sparse(loaded, tmp_path)
    expected = w.detach().clone()
    expected[expected == 0] = 0.0  # the documented change: -0.0 -> +0.0
    assert_same(loaded[0].weight.detach(), expected, "weight")
    assert_same(loaded[0].bias.detach(), model[0].bias.detach(), "bias")


def test_24_groups_with_fewer_than_two_nonzeros(tmp_path):
    """Groups with 0 or 1 non-zero (and -0.0 in them) keep their lowest zeros as values."""
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        w = model[0].weight
        w.copy_(torch.tensor([[0.0, -0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]] * 4))
        w[1, 4:] = torch.tensor([-0.0, 3.0, -0.0, 0.0])
    report = gmp_ext.save_sparse(model, tmp_path)
    assert report["0.weight"].format == "sparse-24-bitmask"
    with __import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("0.compressed").shape == (4, 4)
        keep_bits = f.get_tensor("0.bitmask")
    # Row 0: positions 0, 1 (lowest zeros) and 4, 7 kept: bits 0b10010011.
    assert keep_bits[0].tolist() == [0b10010011]
    loaded = nn.Sequential(nn.Linear(8, 4, bias=False))
    gmp_ext.load_sparse(loaded, tmp_path)
    expected = w.detach().clone()
    expected[expected == 0] = 0.0
    assert_same(loaded[0].weight.detach(), expected)


def test_non_contiguous_weights(tmp_path):
    model = nn.Sequential(nn.Linear(32, 48))
    model[0].weight = nn.Parameter(torch.randn(32, 48).t())  # a transposed view
    assert not model[0].weight.is_contiguous()
    gmp_ext.prune_step(model, 0.9)
    assert gmp_ext.save_sparse(model, tmp_path)["0.weight"].format == "sparse-bitmask"
    loaded = nn.Sequential(nn.Linear(32, 48))
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_stored_once(tmp_path):
    model = Tied()
    gmp_ext.prune_step(model, 0.9, params=["head.weight"])
    report = gmp_ext.save_sparse(model, tmp_path, params=["head.weight"])
    assert report["embed.weight"].format == "sparse-bitmask"
    assert report["head.weight"] == deploy.StoredTensor("tied", 40 * 16 * 4, 0, "embed.weight")
    loaded = Tied()
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)
    assert loaded.head.weight is loaded.embed.weight


def test_wrapped_model_saves_the_inner_names(tmp_path):
    model = Net()
    gmp_ext.prune_step(model, 0.9, params=["fc1.weight"])
    gmp_ext.save_sparse(nn.DataParallel(model), tmp_path)
    loaded = Net()
    gmp_ext.load_sparse(nn.DataParallel(loaded), tmp_path)
    state_bits_equal(model, loaded)


def test_model_on_a_device_loads_in_place(tmp_path, device):
    model = Net().to(device)
    gmp_ext.prune_step(model, 0.9, params=["fc1.weight"])
    gmp_ext.save_sparse(model, tmp_path)
    loaded = Net().to(device)
    before = loaded.fc1.weight
    gmp_ext.load_sparse(loaded, tmp_path)
    assert loaded.fc1.weight is before and before.device.type == device.type
    state_bits_equal(model, loaded)


# -- the format as compressed-tensors reads it -------------------------------------------------


# compressed-tensors 0.14 calls its own deprecated helper inside ModelCompressor.decompress.
@pytest.mark.filterwarnings("ignore:has_offloaded_params is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_compressed_tensors_decompresses_identical_weights(tmp_path, dtype, kind):
    """The real client: compressed-tensors' ModelCompressor from the config.json, its sparsity
    compressor's decompression of the directory (what ModelCompressor.decompress and the
    Hugging Face quantizer run), then ModelCompressor.decompress into a fresh model."""
    if not has_sparse_decompression():
        pytest.skip(
            f"compressed-tensors {compressed_tensors.__version__} has no sparse decompression "
            "(removed in 0.15); install compressed-tensors<0.15 to run this client test"
        )
    from compressed_tensors.compressors import ModelCompressor

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128, dtype=dtype), nn.Linear(128, 32, dtype=dtype))

    model = make()
    if kind == "2:4":
        prune_24(model[0].weight)
        prune_24(model[1].weight)
    else:
        gmp_ext.prune_step(model, 0.9)
    gmp_ext.save_sparse(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    assert compressor.sparsity_config.format == (
        "sparse-24-bitmask" if kind == "2:4" else "sparse-bitmask"
    )
    decompressed = dict(compressor.sparsity_compressor.decompress(str(tmp_path)))
    state = model.state_dict()
    assert sorted(decompressed) == sorted(state)
    for name, tensor in state.items():
        assert_same(decompressed[name], tensor, name)

    fresh = make()
    compressor.decompress(str(tmp_path), fresh)
    state_bits_equal(model, fresh)


# A `pip install --no-deps --target DIR 'compressed-tensors<0.15'` beside the installed one:
# the last releases that decompress sparse checkpoints (0.15 removed it) require transformers<5,
# so they cannot be the installed version next to the integrations extra. .ci/run sets it.
LEGACY_CLIENT = "GMP_EXT_LEGACY_COMPRESSED_TENSORS"


def test_legacy_compressed_tensors_release_reads_the_files():
    """The real-client test above, run in a subprocess with the legacy compressed-tensors
    release first on the path, so CI runs it whatever compressed-tensors is installed."""
    legacy = os.environ.get(LEGACY_CLIENT)
    if not legacy:
        pytest.skip(
            f"set {LEGACY_CLIENT} to a `pip install --no-deps --target DIR "
            "'compressed-tensors==0.14.0.1'` directory to read the files with a release that "
            "decompresses them (.ci/run does)"
        )
    if has_sparse_decompression():
        pytest.skip("the installed compressed-tensors decompresses: the test above ran it")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([legacy, os.environ.get("PYTHONPATH", "")])}
    env.pop(LEGACY_CLIENT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "test_compressed_tensors_decompresses_identical_weights",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=os.path.dirname(__file__),
    )
    assert done.returncode == 0 and "6 passed" in done.stdout, (
        done.stdout[-3000:] + done.stderr[-2000:]
    )


def test_config_and_names_as_compressed_tensors_parses_them(tmp_path):
    """With any compressed-tensors version: its config registry accepts the sparsity config
    and its safetensors reader groups the compressed parts per layer."""
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import get_nested_weight_mappings

    model = Net()
    gmp_ext.prune_step(model, 0.9, params=["fc1.weight", "fc2.weight"])
    gmp_ext.save_sparse(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    sparsity = dict(config["sparsity_config"])
    parsed = SparsityCompressionConfig.load_from_registry(sparsity.pop("format"), **sparsity)
    assert parsed.format == "sparse-bitmask" and parsed.targets == ["fc1", "fc2"]
    assert 0.0 < parsed.global_sparsity < 0.9
    parts = deploy.PARTS["sparse-bitmask"]
    nested = get_nested_weight_mappings(str(tmp_path), parts)
    assert sorted(nested) == ["fc1", "fc2"]
    assert all(sorted(nested[layer]) == sorted(parts) for layer in nested)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_size_at_90_percent(tmp_path, dtype):
    model = nn.Sequential(nn.Linear(512, 384, dtype=dtype), nn.Linear(384, 512, dtype=dtype))
    gmp_ext.prune_step(model, 0.9)
    report = gmp_ext.save_sparse(model, tmp_path)
    dense = sum(m.weight.numel() * m.weight.element_size() for m in model)
    on_disk = stored_bytes(tmp_path, ["0", "1"])  # the parts of 0.weight and 1.weight
    assert on_disk == report["0.weight"].stored_bytes + report["1.weight"].stored_bytes
    assert on_disk <= 0.2 * dense, on_disk / dense


# -- errors ------------------------------------------------------------------------------------


def test_missing_extra_names_it(tmp_path, monkeypatch):
    model = Net()
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(ImportError, match=r"pip install 'gmp_ext\[deploy\]'"):
        gmp_ext.save_sparse(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=r"gmp_ext\[deploy\]"):
        gmp_ext.load_sparse(model, tmp_path)


def test_mismatched_model_names_parameter_and_shapes_and_changes_nothing(tmp_path):
    model = Net()
    gmp_ext.prune_step(model, 0.9, params=["fc1.weight"])
    gmp_ext.save_sparse(model, tmp_path)
    other = Net(width=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'fc1.weight': checkpoint \[128, 64\] torch.float32, "):
        gmp_ext.load_sparse(other, tmp_path)
    with pytest.raises(ValueError, match=r"model \[64, 32\] torch.float32"):
        gmp_ext.load_sparse(other, tmp_path)
    for name, tensor in other.state_dict().items():
        assert_same(tensor, before[name], name)

    with pytest.raises(ValueError, match=r"'fc1.weight'.*model \[128, 64\] torch.bfloat16"):
        gmp_ext.load_sparse(Net(torch.bfloat16), tmp_path)
    extended = Net()
    extended.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['extra.weight', "):
        gmp_ext.load_sparse(extended, tmp_path)
    reduced = Net()
    del reduced.odd
    with pytest.raises(ValueError, match=r"not in the model: \['odd.bias', 'odd.weight'\]"):
        gmp_ext.load_sparse(reduced, tmp_path)


def test_bad_arguments(tmp_path):
    model = Net()
    gmp_ext.prune_step(model, 0.9, params=["fc1.weight"])
    with pytest.raises(ValueError, match=r"format must be one of .* got 'zip'"):
        gmp_ext.save_sparse(model, tmp_path, format="zip")
    with pytest.raises(ValueError, match=r"sparse-24-bitmask.*not: \['fc1.weight'\]"):
        gmp_ext.save_sparse(model, tmp_path, format="sparse-24-bitmask")
    with pytest.raises(ValueError, match=r"parameter 'fc1.bias': .*'<module>.weight'"):
        gmp_ext.save_sparse(model, tmp_path, params=["fc1.bias"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gmp_ext.save_sparse(model.state_dict(), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        gmp_ext.load_sparse(model, tmp_path / "nothing")
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}')
    with pytest.raises(ValueError, match="no compressed-tensors sparse checkpoint"):
        gmp_ext.load_sparse(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()  # the failed saves wrote nothing


def test_forced_bitmask_format_for_24_weights(tmp_path):
    model = Net()
    prune_24(model.fc1.weight)
    report = gmp_ext.save_sparse(model, tmp_path, format="sparse-bitmask")
    assert report["fc1.weight"].format == "sparse-bitmask"
    loaded = Net()
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)


# -- N:M layout --------------------------------------------------------------------------------


def test_is_nm_sparse():
    w = torch.randn(6, 16)
    assert not gmp_ext.is_nm_sparse(w)
    prune_24(w)
    assert gmp_ext.is_nm_sparse(w) and gmp_ext.is_nm_sparse(w, 2, 4)
    assert not gmp_ext.is_nm_sparse(w, 1, 4)
    assert gmp_ext.is_nm_sparse(w, 4, 8)  # each group of 8 holds two groups of 4
    w[0, 1] = -0.0  # still a zero
    assert gmp_ext.is_nm_sparse(w)
    nan = w.clone()
    nan[1, (nan[1, :4] == 0).nonzero()[0]] = float("nan")  # a third non-zero in the group
    assert not gmp_ext.is_nm_sparse(nan)
    assert gmp_ext.is_nm_sparse(torch.zeros(3, 8), 0, 4)
    assert gmp_ext.is_nm_sparse(torch.randn(3, 8), 4, 4)
    assert not gmp_ext.is_nm_sparse(torch.zeros(3, 6))  # rows of 6: no whole groups of 4
    assert not gmp_ext.is_nm_sparse(torch.zeros(0, 8))
    assert not gmp_ext.is_nm_sparse(torch.tensor(0.0))
    assert gmp_ext.is_nm_sparse(torch.zeros(1, 4))


def test_is_nm_sparse_groups_along_the_reduction_dimension():
    # A Conv weight [out, in, kh, kw]: groups of 4 input channels at each kernel position.
    conv = torch.zeros(4, 4, 2, 2)
    conv[:, 0, :, :] = 1.0  # all four taps of channel 0: one non-zero per group
    assert gmp_ext.is_nm_sparse(conv, 1, 4)
    conv[:, 1, 0, 0] = 1.0  # a second at tap (0, 0)
    assert gmp_ext.is_nm_sparse(conv, 2, 4) and not gmp_ext.is_nm_sparse(conv, 1, 4)
    conv[:, 2, 0, 0] = 1.0  # a third
    assert not gmp_ext.is_nm_sparse(conv)
    rows = torch.zeros(8, 4)
    rows[:, :2] = 1.0
    assert gmp_ext.is_nm_sparse(rows) and not gmp_ext.is_nm_sparse(rows.t())
    assert gmp_ext.is_nm_sparse(rows.t(), reduction_dim=0)  # a Conv1D weight [in, out]
    assert not gmp_ext.is_nm_sparse(rows, reduction_dim=0)
    assert gmp_ext.is_nm_sparse(rows.t().contiguous().t())  # non-contiguous, same values
    assert gmp_ext.is_nm_sparse(rows.to(torch.bfloat16))


def test_is_nm_sparse_bad_arguments():
    with pytest.raises(ValueError, match=r"reduction_dim .* shape \(4, 4\), got 2"):
        gmp_ext.is_nm_sparse(torch.zeros(4, 4), reduction_dim=2)
    with pytest.raises(ValueError, match=r"n=5, m=4"):
        gmp_ext.is_nm_sparse(torch.zeros(4, 4), 5, 4)
    with pytest.raises(ValueError, match=r"m=0"):
        gmp_ext.is_nm_sparse(torch.zeros(4, 4), 0, 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gmp_ext.is_nm_sparse([[0.0] * 4])


# -- semi-structured ---------------------------------------------------------------------------


def sparse_mlp(dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"):
    model = nn.Sequential(
        nn.Linear(128, 64, dtype=dtype, device=device),
        nn.ReLU(),
        nn.Linear(64, 32, dtype=dtype, device=device),
        nn.Linear(32, 10, dtype=dtype, device=device),  # dense: left as it is
    )
    prune_24(model[0].weight)
    prune_24(model[2].weight)
    return model


needs_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability 8.0+",
)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0),
    reason="the error path of a machine without an sm_80+ GPU",
)
def test_semi_structured_without_a_capable_gpu_is_a_clear_error():
    model = sparse_mlp()
    weights = list(model.parameters())
    with pytest.raises(RuntimeError, match=r"sm_80\+.*'0.weight' is on cpu"):
        gmp_ext.to_semi_structured(model)
    assert all(a is b for a, b in zip(weights, model.parameters()))  # nothing replaced


def test_semi_structured_cpu_weights_on_a_gpu_machine():
    if not torch.cuda.is_available():
        pytest.skip("the message for CPU weights on a machine without CUDA is tested above")
    with pytest.raises(RuntimeError, match=r"sm_80\+.*'0.weight' is on cpu"):
        gmp_ext.to_semi_structured(sparse_mlp())


def test_semi_structured_checks_layers_before_the_device():
    model = sparse_mlp(torch.float32)
    with pytest.raises(ValueError, match=r"'0.weight' \(torch.float32, shape \[64, 128\]\)"):
        gmp_ext.to_semi_structured(model)
    model = sparse_mlp()
    prune_24(model[3].weight)  # [10, 32]: not a multiple of (32, 64)
    with pytest.raises(ValueError, match=r"'3.weight' \(torch.float16, shape \[10, 32\]\).*"):
        gmp_ext.to_semi_structured(model)
    with pytest.raises(ValueError, match="no nn.Linear weight of the model is 2:4 sparse"):
        gmp_ext.to_semi_structured(nn.Sequential(nn.Linear(64, 32)))
    with pytest.raises(ValueError, match="no nn.Linear weight"):
        gmp_ext.to_semi_structured(sparse_mlp(), exclude=["0.weight", "2.weight"])
    with pytest.raises(ValueError, match=r"exclude entries \['fc.weight'\]"):
        gmp_ext.to_semi_structured(sparse_mlp(), exclude=["fc.weight"])
    with pytest.raises(ValueError, match="backend must be"):
        gmp_ext.to_semi_structured(sparse_mlp(), backend="cublas")
    masked = sparse_mlp()
    gmp_ext.prune_step(masked, 0.5, params=["0.weight"])
    assert gmp_ext.is_nm_sparse(masked[0].weight)
    with pytest.raises(ValueError, match=r"masks for \['0.weight'\].*gmp_ext.remove"):
        gmp_ext.to_semi_structured(masked)


def test_semi_structured_tied_weight_is_an_error():
    model = sparse_mlp()
    model.append(nn.Linear(128, 64, dtype=torch.float16))
    model[4].weight = model[0].weight
    with pytest.raises(ValueError, match=r"'0.weight' is tied"):
        gmp_ext.to_semi_structured(model)
    reused = sparse_mlp()
    reused.append(reused[0])  # the same module twice: not a tie, the error is the device's
    with pytest.raises(RuntimeError, match="sm_80"):
        gmp_ext.to_semi_structured(reused)


@pytest.mark.cuda
@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_semi_structured_conversion_on_gpu(dtype):
    torch.manual_seed(0)
    model = sparse_mlp(dtype, "cuda")
    dense = [m.weight.detach().clone() for m in (model[0], model[2])]
    x = torch.randn(64, 128, dtype=dtype, device="cuda")
    with torch.no_grad():
        expected = model(x)
        reference = copy.deepcopy(model).double()(x.double())
    converted = gmp_ext.to_semi_structured(model)
    assert converted == ["0.weight", "2.weight"]
    for module, weight in zip((model[0], model[2]), dense):
        assert isinstance(module.weight, torch.sparse.SparseSemiStructuredTensor)
        assert not module.weight.requires_grad
        assert torch.equal(module.weight.to_dense(), weight)
    assert not isinstance(model[3].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        out = model(x)
    # The sparse kernels round differently from the dense GEMM: compare both with fp64.
    err_sparse = (out.double() - reference).abs().max().item()
    err_dense = (expected.double() - reference).abs().max().item()
    assert err_sparse <= 2 * err_dense + 1e-3 * reference.abs().max().item()


def test_nm_pruning_saves_in_the_two_four_format(tmp_path):
    """The 2:4 path end to end: gmp_ext's own N:M pruning, then the 2:4 checkpoint format."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    gmp_ext.prune_step(model, 0.5, nm=(2, 4))
    assert all(gmp_ext.is_nm_sparse(model[i].weight, 2, 4) for i in (0, 2))
    report = gmp_ext.save_sparse(model, tmp_path)
    assert {report[n].format for n in ("0.weight", "2.weight")} == {"sparse-24-bitmask"}
    loaded = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    gmp_ext.load_sparse(loaded, tmp_path)
    state_bits_equal(model, loaded)
