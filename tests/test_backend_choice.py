"""`open_backend(kind="auto")`: the choice and the fallbacks, with the availability of each runtime and
of a GPU simulated, so that the result does not depend on the machine the tests run on (GPU servers
included). Opening is replaced by a recorder: what is tested is which backend is tried, on which
device and precision, in which order, and what is said about it."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import qnkit.backends as backends
from qnkit.bundle import FP16_ONNX, FP32_ONNX, WEIGHTS, Bundle, BundleError
from qnkit.errors import QnkitInputError


class _Opened:
    def __init__(self, kind, precision, device, batch_size):
        self.name, self.precision, self.device, self.batch_size = kind, precision, device, batch_size


@pytest.fixture
def machine(monkeypatch):
    """Simulate a machine: `machine(installed={...}, gpu=bool, ort_gpu=bool, failing={kind: exc})`.

    Returns the list of (kind, device, precision) open attempts, in order."""
    attempts = []

    def configure(installed=("onnxruntime", "torch", "safetensors"), gpu=False, ort_gpu=False, failing=None):
        failing = failing or {}
        monkeypatch.setattr(backends, "_installed", lambda module: module in installed)
        monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: gpu)
        monkeypatch.setattr(backends, "_torch_cuda", lambda: gpu and "torch" in installed)
        from qnkit.backends import onnxruntime_backend

        monkeypatch.setattr(onnxruntime_backend, "gpu_providers",
                            lambda: ["CUDAExecutionProvider"] if gpu and ort_gpu else [])

        def fake_open(bundle, kind, precision, device, batch_size, log, options):
            attempts.append((kind, device, precision))
            if kind in failing:
                raise failing[kind]
            return _Opened(kind, precision, device, batch_size)

        monkeypatch.setattr(backends, "_open", fake_open)
        return attempts

    return configure


def _bundle(*artefacts) -> Bundle:
    return Bundle(Path("/nowhere/bundle"), {"artefacts": {name: {"sha256": "0" * 64} for name in artefacts}})


FULL = _bundle(FP32_ONNX, FP16_ONNX, WEIGHTS)


def _open(bundle=FULL, **kwargs):
    lines = []
    backend = backends.open_backend(bundle, "auto", log=lines.append, **kwargs)
    return backend, lines


def test_gpu_with_tensorrt_picks_tensorrt_fp16(machine):
    attempts = machine(installed=("tensorrt", "onnxruntime", "torch", "safetensors"), gpu=True, ort_gpu=True)
    backend, lines = _open()
    assert attempts == [("tensorrt", "cuda:0", "fp16")]
    assert "TensorRT and a GPU are present" in lines[-1]


def test_gpu_without_tensorrt_picks_onnxruntime_on_the_gpu(machine):
    attempts = machine(gpu=True, ort_gpu=True)
    _open()
    assert attempts == [("onnxruntime", "cuda:0", "fp16")]


def test_gpu_onnxruntime_without_fp16_graph_runs_fp32(machine):
    attempts = machine(gpu=True, ort_gpu=True)
    _open(_bundle(FP32_ONNX, WEIGHTS))
    assert attempts == [("onnxruntime", "cuda:0", "fp32")]


def test_a_failing_gpu_backend_falls_back_in_order_and_says_why(machine):
    attempts = machine(installed=("tensorrt", "onnxruntime", "torch", "safetensors"), gpu=True, ort_gpu=True,
                       failing={"tensorrt": RuntimeError("out of GPU memory")})
    backend, lines = _open()
    assert attempts == [("tensorrt", "cuda:0", "fp16"), ("onnxruntime", "cuda:0", "fp16")]
    assert backend.name == "onnxruntime" and backend.device == "cuda:0"
    assert any("tensorrt on cuda:0 unavailable (out of GPU memory)" in line for line in lines)


def test_gpu_with_only_torch_runs_torch_on_the_gpu(machine):
    attempts = machine(installed=("torch", "safetensors"), gpu=True)
    _open()
    assert attempts == [("torch", "cuda:0", "fp16")]


def test_no_gpu_picks_onnxruntime_on_the_cpu(machine):
    attempts = machine(installed=("tensorrt", "onnxruntime", "torch", "safetensors"), gpu=False)
    backend, lines = _open()
    assert attempts == [("onnxruntime", "cpu", "fp32")]
    assert "no usable GPU runtime" in lines[-1]


def test_device_cpu_skips_the_gpu_backends(machine):
    attempts = machine(installed=("tensorrt", "onnxruntime", "torch", "safetensors"), gpu=True, ort_gpu=True)
    _open(device="cpu")
    assert attempts == [("onnxruntime", "cpu", "fp32")]


def test_no_onnxruntime_falls_back_to_torch_on_the_cpu(machine):
    attempts = machine(installed=("torch", "safetensors"), gpu=False)
    _open()
    assert attempts == [("torch", "cpu", "fp32")]
    attempts.clear()
    machine(gpu=False, failing={"onnxruntime": ImportError("broken onnxruntime")})
    backend, _ = _open()
    assert attempts == [("onnxruntime", "cpu", "fp32"), ("torch", "cpu", "fp32")] and backend.name == "torch"


def test_a_tampered_artefact_is_an_error_never_a_fallback(machine):
    attempts = machine(installed=("tensorrt", "onnxruntime", "torch", "safetensors"), gpu=True, ort_gpu=True,
                       failing={"tensorrt": BundleError("model.engine: SHA-256 does not match")})
    with pytest.raises(BundleError, match="SHA-256"):
        _open()
    assert attempts == [("tensorrt", "cuda:0", "fp16")]


def test_nothing_that_can_run_is_one_clear_error(machine):
    machine(installed=(), gpu=False)
    with pytest.raises(QnkitInputError, match="no inference backend can run"):
        _open()


def test_explicit_kinds_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(backends, "_installed", lambda module: module != "tensorrt")
    with pytest.raises(QnkitInputError, match="tensorrt Python package"):
        backends.open_backend(FULL, "tensorrt", log=lambda m: None)
    monkeypatch.setattr(backends, "_installed", lambda module: True)
    monkeypatch.setattr(backends, "_torch_cuda", lambda: False)
    with pytest.raises(QnkitInputError, match="needs an NVIDIA GPU"):
        backends.open_backend(FULL, "tensorrt", log=lambda m: None)
    monkeypatch.setattr(backends, "_installed", lambda module: module != "onnxruntime")
    with pytest.raises(QnkitInputError, match="needs the onnxruntime package"):
        backends.open_backend(FULL, "onnxruntime", log=lambda m: None)


@pytest.mark.parametrize("visible, present", [("", False), ("-1", False), ("0", True), (None, True)])
def test_cuda_visible_devices_hides_the_gpu(monkeypatch, visible, present):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(backends.os.path, "exists", lambda path: False)
    monkeypatch.setattr(backends.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert backends.nvidia_gpu_present() is present


@pytest.mark.parametrize("nodes, present", [(["/dev/nvidiactl", "/dev/nvidia5"], True), (["/dev/nvidiactl"], False)])
def test_a_gpu_is_seen_whichever_card_of_the_host_it_is(monkeypatch, nodes, present):
    """A container lent one card of several sees only that card's node; /dev/nvidiactl alone is no GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(backends.os.path, "exists", lambda path: False)
    monkeypatch.setattr(backends.glob, "glob", lambda pattern: fnmatch.filter(nodes, pattern))
    assert backends.nvidia_gpu_present() is present
