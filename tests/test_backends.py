"""Backends on the CPU: ONNX Runtime (FP32/FP16/INT8) against eager torch, batching, selection."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import torch  # noqa: F401
import onnxruntime  # noqa: E402,F401  (segmenting needs it: missing is an error, not a skip)

from qnkit import kernels  # noqa: E402
from qnkit.backends import AVAILABLE_KINDS, open_backend  # noqa: E402
from qnkit.backends.base import Backend  # noqa: E402
from qnkit.bundle import load_bundle  # noqa: E402
from qnkit.cpus import default_threads  # noqa: E402
from qnkit.errors import QnkitInputError  # noqa: E402


@pytest.fixture(scope="module")
def bundle(shared_bundle):
    return load_bundle(shared_bundle[1])


@pytest.fixture(scope="module")
def cases():
    from qnkit.synth import make_case

    return [make_case(i, size=128, seed=11) for i in range(2)]


# Mask agreement with eager FP32 on the two synthetic cases (per-case Dice) for the shared 8-filter
# bundle: measured INT8 0.944 / 0.969 (the graph quantises only the inner spatial convolutions, UINT8
# activations, percentile calibration) and bf16 0.981 / 0.988 (8 bits of mantissa in every layer).
INT8_MASK_DICE = 0.90
BF16_MASK_DICE = 0.95


def _quiet(_msg):
    pass


def _masks(backend, cases, bundle):
    """The network's masks of `cases` (every slice, no post-processing, half the input's resolution)."""
    from qnkit.io import Geometry
    from qnkit.segment import SegmentOptions, segment_ct

    options = SegmentOptions(batch_size=backend.batch_size, slab=False, postprocess=False)
    return [segment_ct(c.imaging, Geometry.from_affine(c.affine, c.imaging.shape), backend.predict,
                       hu_window=bundle.hu_window, threshold=bundle.threshold, options=options)[0] for c in cases]


@pytest.fixture(scope="module")
def eager_masks(bundle, cases):
    with open_backend(bundle, "torch", device="cpu", log=_quiet) as eager:
        return _masks(eager, cases, bundle)


@pytest.mark.parametrize("precision, bar", [("fp32", 0.999), ("fp16", 0.99)])
def test_onnxruntime_agrees_with_eager_on_synthetic_cases(bundle, cases, eager_masks, precision, bar):
    with open_backend(bundle, "onnxruntime", precision=precision, device="cpu", batch_size=16, log=_quiet) as ort:
        assert (ort.name, ort.precision, ort.device) == ("onnxruntime", precision, "cpu")
        masks = _masks(ort, cases, bundle)
    assert sum(int(m.sum()) for m in eager_masks) > 500, "the fitted model should find kidneys"
    for ours, ref in zip(masks, eager_masks):
        assert kernels.dice(ours, ref) >= bar


@pytest.mark.parametrize("kind, precision, bar", [("onnxruntime", "int8", INT8_MASK_DICE),
                                                 ("torch", "bf16", BF16_MASK_DICE)])
def test_reduced_precision_masks_agree_with_eager(bundle, cases, eager_masks, kind, precision, bar):
    """INT8 (QDQ on ONNX Runtime) and bf16 (torch autocast) masks against eager FP32 masks, per case."""
    with open_backend(bundle, kind, precision=precision, device="cpu", log=_quiet) as b:
        assert (b.name, b.precision) == (kind, precision)
        masks = _masks(b, cases, bundle)
    assert sum(int(m.sum()) for m in eager_masks) > 500, "the fitted model should find kidneys"
    for ours, ref in zip(masks, eager_masks):
        assert ours.shape == ref.shape
        assert kernels.dice(ours, ref) >= bar


def test_predict_any_batch_and_grid(bundle):
    rng = np.random.default_rng(0)
    x = rng.random((37, 1, 64, 64), dtype=np.float32)
    with open_backend(bundle, "onnxruntime", device="cpu", batch_size=16, log=_quiet) as ort, \
            open_backend(bundle, "torch", device="cpu", batch_size=5, log=_quiet) as eager:
        y = ort.predict(x)
        assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
        np.testing.assert_allclose(y, eager.predict(x), atol=1e-4)
        wide = rng.random((3, 1, 48, 96), dtype=np.float32)  # dynamic height/width
        np.testing.assert_allclose(ort.predict(wide), eager.predict(wide), atol=1e-4)
        with pytest.raises(ValueError, match="divisible by 16"):
            ort.predict(x[:, :, :40])
        with pytest.raises(ValueError, match=r"\(N, 1, h, w\)"):
            ort.predict(x[:, 0])
        d = ort.describe()
        assert d["name"] == "onnxruntime" and d["providers"] == ["CPUExecutionProvider"]
        assert d["batch_size"] == 16 and d["max_run_slices"] == 1  # CPU sessions run one slice per call,
        assert d["intra_op_threads"] == 1 and d["concurrent_runs"] == default_threads()  # calls side by side
    with open_backend(bundle, "onnxruntime", device="cpu", batch_size=16, log=_quiet, one_call_all_threads=True) as ort:
        d = ort.describe()  # the way before, which the bench measures beside it: the same answer
        assert (d["intra_op_threads"], d["concurrent_runs"], d["max_run_slices"]) == (default_threads(), 1, 4)
        np.testing.assert_allclose(ort.predict(x), y, atol=1e-5)


def test_auto_without_a_gpu_opens_onnxruntime_on_the_cpu(bundle, monkeypatch):
    """The real open behind `auto` on a machine without a GPU (simulated, so GPU machines test it too);
    the choice itself on every kind of machine is in test_backend_choice."""
    import qnkit.backends as backends

    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(backends, "_torch_cuda", lambda: False)
    lines = []
    with open_backend(bundle, log=lines.append) as b:
        assert (b.name, b.precision, b.device) == ("onnxruntime", "fp32", "cpu")
        assert b.describe()["providers"] == ["CPUExecutionProvider"]
    assert any("onnxruntime" in line and "no usable GPU" in line for line in lines)


def test_explicit_unavailable_kinds_are_clear_errors(bundle):
    with pytest.raises(QnkitInputError, match="unknown backend"):
        open_backend(bundle, "openvino", log=_quiet)
    with pytest.raises(QnkitInputError, match="precision"):
        open_backend(bundle, "torch", precision="fp8", log=_quiet)
    with pytest.raises(QnkitInputError, match="onnxruntime backend supports"):
        open_backend(bundle, "onnxruntime", precision="bf16", device="cpu", log=_quiet)
    assert AVAILABLE_KINDS == ("auto", "torch", "onnxruntime", "tensorrt")


class _Echo(Backend):
    """Returns its input; records the chunk shapes it was given."""

    name, size_divisor = "echo", 16

    def __init__(self, batch_size, fixed_hw=None, fixed_batch=False):
        self.batch_size, self.fixed_hw, self.fixed_batch, self.seen = batch_size, fixed_hw, fixed_batch, []

    def _run(self, x):
        self.seen.append(x.shape)
        return x.copy()


def test_base_batching_pads_and_crops():
    x = np.random.default_rng(2).random((10, 1, 32, 48), dtype=np.float32)
    b = _Echo(4)
    np.testing.assert_array_equal(b.predict(x), x)
    assert b.seen == [(4, 1, 32, 48), (4, 1, 32, 48), (2, 1, 32, 48)]
    b = _Echo(4, fixed_hw=(64, 64), fixed_batch=True)
    np.testing.assert_array_equal(b.predict(x), x)
    assert b.seen == [(4, 1, 64, 64)] * 3
    with pytest.raises(QnkitInputError, match="do not fit"):
        b.predict(np.zeros((1, 1, 80, 64), np.float32))


class _Centre(_Echo):
    """A 2.5-D backend: takes 3 planes per slice, returns the centre plane (one probability plane)."""

    channels = 3

    def _run(self, x):
        self.seen.append(x.shape)
        return x[:, 1:2].copy()


def test_base_batching_of_context_planes_returns_one_plane():
    x = np.random.default_rng(4).random((5, 3, 32, 48), dtype=np.float32)
    b = _Centre(2, fixed_hw=(64, 64), fixed_batch=True)
    np.testing.assert_array_equal(b.predict(x), x[:, 1:2])
    assert b.seen == [(2, 3, 64, 64)] * 3
    with pytest.raises(ValueError, match=r"expects slices \(N, 3, h, w\)"):
        b.predict(x[:, :1])


def test_max_run_slices_splits_large_batches():
    x = np.random.default_rng(3).random((10, 1, 32, 48), dtype=np.float32)
    b = _Echo(16)
    b.max_run_slices = 3
    np.testing.assert_array_equal(b.predict(x), x)
    assert b.seen == [(3, 1, 32, 48)] * 3 + [(1, 1, 32, 48)]
    b = _Echo(2)
    b.max_run_slices = 3
    b.predict(x)
    assert b.seen == [(2, 1, 32, 48)] * 5


def test_concurrent_runs_give_each_chunk_its_own_call_and_the_same_answer():
    """concurrent_runs > 1: the chunks run on several threads at once (a barrier that only releases with
    two calls inside proves they overlap), and each lands where it belongs, sampled runs too."""
    import threading

    class _Overlapping(_Echo):
        def __init__(self):
            super().__init__(16)
            self.max_run_slices, self.concurrent_runs = 1, 2
            self.both_inside = threading.Barrier(2, timeout=120)  # a deadlock guard, not a speed limit
            self.threads = set()

        def _run(self, x):
            self.both_inside.wait()
            self.threads.add(threading.get_ident())
            return super()._run(x)

        def _run_sampled(self, x, keep):
            return x * keep[:, :1, :1, None]

    x = np.random.default_rng(5).random((6, 1, 32, 48), dtype=np.float32)
    with _Overlapping() as b:
        np.testing.assert_array_equal(b.predict(x), x)
        assert len(b.threads) == 2 and b.seen == [(1, 1, 32, 48)] * 6
        keep = np.arange(6, dtype=np.float32).reshape(6, 1, 1)
        np.testing.assert_array_equal(b.predict(x, keep), x * keep[:, :, :, None])
        assert b.describe()["concurrent_runs"] == 2
    assert b._pool is None  # closed with the backend


def test_backends_package_imports_no_torch_or_onnxruntime():
    code = ("import sys, qnkit.backends, qnkit.bundle; "
            "bad = {'torch', 'onnxruntime', 'tensorrt'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
