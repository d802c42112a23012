"""GPU backends: torch CUDA (FP16 autocast, CUDA graphs), ONNX Runtime GPU, TensorRT engines.

Skipped, not faked, without a CUDA GPU or the package each test needs; the code they run is the
code `qnkit segment` and `qnkit export --engine` run.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnxruntime  # noqa: E402,F401  (segmenting needs it: missing is an error, not a skip)

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from qnkit import kernels  # noqa: E402
from qnkit.backends import open_backend  # noqa: E402
from qnkit.bundle import BundleError, load_bundle, sealed_metadata_text  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def exported(shared_bundle):
    return shared_bundle


@pytest.fixture(scope="module")
def slices(exported):
    from qnkit.verification import synthetic_slices

    b = load_bundle(exported[1])
    return synthetic_slices(b.input_size, b.hu_window, seed=99)[0]


@pytest.fixture(scope="module")
def eager_cpu(exported, slices):
    with open_backend(load_bundle(exported[1]), "torch", device="cpu", log=print) as b:
        return b.predict(slices)


def _dice(probs, ref):
    return kernels.dice(probs, (ref > 0.5).astype(np.uint8))


@pytest.mark.parametrize("precision, graphs", [("fp32", False), ("fp16", False), ("fp16", True), ("bf16", True)])
def test_torch_cuda(exported, slices, eager_cpu, precision, graphs):
    b = open_backend(load_bundle(exported[1]), "torch", device="cuda", precision=precision, cuda_graphs=graphs,
                     batch_size=8, log=print)
    assert b.device == "cuda:0" and b.describe()["cuda_graphs"] == graphs
    assert isinstance(b.describe()["tf32_convolutions"], bool)  # the GPU rows say whether "FP32" was TF32
    y = b.predict(slices)
    np.testing.assert_array_equal(b.predict(slices), y)  # graph replay is repeatable
    assert _dice(y, eager_cpu) >= (0.999 if precision == "fp32" else 0.98)


@pytest.mark.skipif(not any(p in __import__("onnxruntime").get_available_providers()
                            for p in ("CUDAExecutionProvider",)), reason="onnxruntime-gpu not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_gpu(exported, slices, eager_cpu, precision, tmp_path, monkeypatch):
    monkeypatch.setenv("QNKIT_CACHE_DIR", str(tmp_path))
    b = open_backend(load_bundle(exported[1]), "onnxruntime", device="cuda", precision=precision, log=print)
    assert b.device == "cuda:0" and b.describe()["providers"][0] != "CPUExecutionProvider"
    assert _dice(b.predict(slices), eager_cpu) >= (0.999 if precision == "fp32" else 0.99)


needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt not installed")


@pytest.fixture(scope="module")
def engine_bundle(exported, tmp_path_factory):
    from qnkit.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle(exported[0], out, fp16=True, engine=True, batches=(1, 8, 16), input_size=(64, 64), log=print)
    return out


@needs_trt
def test_export_engine_records_target_and_verification(engine_bundle):
    import tensorrt as trt

    meta = json.loads((engine_bundle / "qnkit.json").read_text())
    eng = meta["engine"]
    assert eng["tensorrt"] == trt.__version__ and eng["gpu"] == torch.cuda.get_device_name(0)
    assert eng["profile"]["min"][0] == 1 and eng["profile"]["opt"][0] == 8 and eng["profile"]["max"][0] == 16
    assert {"model.engine", "timing.cache"} <= set(meta["artefacts"])
    assert meta["verification"]["tensorrt"]["dice"] >= 0.99
    assert eng["strongly_typed"] == (int(trt.__version__.split(".")[0]) >= 11)


@needs_trt
def test_tensorrt_backend_runs_the_bundle_engine(engine_bundle, slices, eager_cpu, tmp_path, monkeypatch):
    monkeypatch.setenv("QNKIT_CACHE_DIR", str(tmp_path))
    lines = []
    with open_backend(load_bundle(engine_bundle), "tensorrt", log=lines.append) as b:
        assert (b.name, b.precision, b.device) == ("tensorrt", "fp16", "cuda:0")
        y = b.predict(slices)  # 24 slices through an engine whose profile allows up to 16
    assert not any("rebuild" in line for line in lines)
    assert _dice(y, eager_cpu) >= 0.99
    assert not (tmp_path / "engines").exists()


@needs_trt
def test_foreign_engine_is_rebuilt_or_refused(engine_bundle, slices, eager_cpu, tmp_path, monkeypatch):
    monkeypatch.setenv("QNKIT_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "bundle"
    shutil.copytree(engine_bundle, copy)
    meta = json.loads((copy / "qnkit.json").read_text())
    meta["engine"]["tensorrt"] = "8.6.1"
    (copy / "qnkit.json").write_text(sealed_metadata_text(meta))  # re-sealed: the engine record says 8.6.1
    with pytest.raises(BundleError, match=r"TensorRT 8\.6\.1"):
        open_backend(load_bundle(copy), "tensorrt", rebuild_engine=False, log=print)
    lines = []
    with open_backend(load_bundle(copy), "tensorrt", log=lines.append) as b:
        assert _dice(b.predict(slices), eager_cpu) >= 0.99
    assert any("8.6.1" in line and "rebuilding" in line for line in lines)
    assert len(list((tmp_path / "cache" / "engines").glob("*.engine"))) == 1
    lines.clear()
    open_backend(load_bundle(copy), "tensorrt", log=lines.append).close()  # second time: the cached rebuild
    assert any("rebuilt and verified earlier" in line for line in lines)


@needs_trt
def test_bundle_engine_has_a_dynamic_profile_and_agrees_with_onnxruntime_on_other_sizes(engine_bundle, slices, tmp_path,
                                                                                       monkeypatch):
    """The engine runs slices smaller and larger than the export grid (64x64) at their own size, as ONNX
    Runtime does: masks agree at Dice >= 0.99; slices beyond the profile rebuild it once (verified)."""
    from qnkit.verification import verification_grids

    monkeypatch.setenv("QNKIT_CACHE_DIR", str(tmp_path))
    bundle = load_bundle(engine_bundle)
    profile = bundle.engine["profile"]
    assert profile["min"][2:] == [16, 16] and profile["opt"][2:] == [64, 64] and profile["max"][2:] == [128, 128]
    grids = verification_grids(slices, bundle.size_divisor)
    huge = np.zeros((4, 1, 160, 144), np.float32)
    huge[:, :, :slices.shape[2], :slices.shape[3]] = slices[:4]
    grids["beyond the profile"] = huge
    with open_backend(bundle, "onnxruntime", device="cpu", precision="fp32", log=print) as ort:
        reference = {k: ort.predict(x) for k, x in grids.items()}
    lines = []
    with open_backend(bundle, "tensorrt", log=lines.append) as trt:
        assert trt.fixed_hw is None
        for name, x in grids.items():
            assert _dice(trt.predict(x), reference[name]) >= 0.99, name
    assert any("larger than the engine's profile" in line for line in lines)
    assert any("verified the rebuilt engine" in line for line in lines)


def test_e2e_gpu_rows_on_this_gpu(shared_bundle, tmp_path):
    """`qnkit bench`'s GPU rows end to end on a small phantom: they run, and FP16 keeps eager FP32's mask."""
    from qnkit.benchmarks import e2e

    report = e2e.run(shared_bundle[1], workdir=tmp_path, whole=False, repeats=1, batch_size=4, gpu=True)
    rows = report["gpu"]
    assert rows["gpu_eager"]["backend"]["device"].startswith("cuda")
    graphs = rows["gpu_fp16_cuda_graphs"]
    assert graphs["speedup_vs_gpu_eager"] > 0 and graphs["mask_dice_vs_gpu_eager"] > 0.95
