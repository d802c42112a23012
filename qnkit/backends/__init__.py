"""Inference backends behind one interface, and :func:`open_backend` to pick one for a bundle.

``backend.predict(x)``: float32 ``(N, C, h, w)`` preprocessed slices (C: the model's input planes per
slice, 1 but for a 2.5-D model) -> float32 probabilities ``(N, 1, h, w)`` (any N; batched internally at
``backend.batch_size``), so ``backend.predict`` is
the ``predict_batch`` of :func:`qnkit.inference.segment_volume`. Importing this package imports
neither torch nor onnxruntime; each backend imports what it needs when opened.

``kind="auto"`` tries, in order: TensorRT (package + GPU; the bundle's engine when it was built
for this TensorRT/GPU, else rebuilt from the ONNX) -> ONNX Runtime on the GPU (TensorRT/CUDA EP)
-> ONNX Runtime on the CPU -> eager torch, and logs which one it chose and why.
"""
from __future__ import annotations

import glob
import importlib.util
import os

from qnkit.backends.base import PRECISIONS, Backend, batch_words
from qnkit.bundle import FP16_ONNX, FP32_ONNX, INT8_ONNX, MC_ONNX, WEIGHTS, Bundle, BundleError
from qnkit.errors import QnkitInputError

__all__ = ["AVAILABLE_KINDS", "PRECISIONS", "Backend", "open_backend", "open_sampler", "sampling_predict",
           "nvidia_gpu_present"]

AVAILABLE_KINDS = ("auto", "torch", "onnxruntime", "tensorrt")
_ONNX_FOR = {"fp32": FP32_ONNX, "fp16": FP16_ONNX, "int8": INT8_ONNX}
# ONNX Runtime is not a core dependency: exactly one of its two packages comes from an extra (pyproject.toml).
INSTALL_ONNXRUNTIME = "pip install 'qnkit[cpu]', or 'qnkit[gpu]' on a CUDA server"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def nvidia_gpu_present() -> bool:
    """Cheap check for an NVIDIA driver/device, so that CPU machines never import torch to find out."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    # A container lent one GPU of several sees only that card's node (/dev/nvidia5, say).
    return os.path.exists("/proc/driver/nvidia/gpus") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _torch_cuda() -> bool:
    if not (_installed("torch") and nvidia_gpu_present()):
        return False
    import torch

    return torch.cuda.is_available()


def _resolve_device(device: str, kind: str) -> str:
    if device == "auto":
        return "cuda:0" if _torch_cuda() or (kind == "onnxruntime" and nvidia_gpu_present()) else "cpu"
    if device == "cuda":
        return "cuda:0"
    if device != "cpu" and not device.startswith("cuda:"):
        raise QnkitInputError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def _resolve_precision(precision: str, device: str, bundle: Bundle, kind: str) -> str:
    if precision == "auto":
        if device == "cpu":  # INT8 only where the bundle's real-CT evidence chose it (bundle.cpu_precision)
            return bundle.cpu_precision if kind == "onnxruntime" else "fp32"
        return "fp16" if kind != "onnxruntime" or bundle.has(FP16_ONNX) else "fp32"
    if precision not in PRECISIONS:
        raise QnkitInputError(f"precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def _open(bundle: Bundle, kind: str, precision: str, device: str, batch_size: int, log, options: dict) -> Backend:
    if kind == "tensorrt":
        if not _installed("tensorrt"):
            raise QnkitInputError("the tensorrt backend needs the tensorrt Python package (pip install tensorrt)")
        if not _torch_cuda():
            raise QnkitInputError("the tensorrt backend needs an NVIDIA GPU visible to torch")
        if device == "cpu":
            raise QnkitInputError("the tensorrt backend runs on a GPU only (device cpu was asked for)")
        from qnkit.backends.tensorrt_backend import open_tensorrt

        return open_tensorrt(bundle, precision=precision, batch_size=batch_size, device=device, log=log,
                             rebuild=options.get("rebuild_engine", True), batches=options.get("engine_batches"))
    if kind == "onnxruntime":
        if not _installed("onnxruntime"):
            raise QnkitInputError(f"the onnxruntime backend needs the onnxruntime package ({INSTALL_ONNXRUNTIME})")
        if precision not in _ONNX_FOR:
            raise QnkitInputError(f"the onnxruntime backend supports fp32, fp16 and int8, not {precision}")
        if not bundle.has(_ONNX_FOR[precision]):
            raise QnkitInputError(f"{bundle.path}: no {_ONNX_FOR[precision]} for {precision} "
                                  f"(re-export with --{precision} or choose another precision)")
        from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, precision=precision, device=device, batch_size=batch_size,
                                  threads=options.get("threads"), tensorrt_ep=options.get("tensorrt_ep", True),
                                  one_call_all_threads=options.get("one_call_all_threads", False))
    if kind == "torch":
        if not _installed("torch") or not _installed("safetensors"):
            raise QnkitInputError("the torch backend needs torch and safetensors (pip install torch safetensors)")
        if not bundle.has(WEIGHTS):
            raise QnkitInputError(f"{bundle.path}: no {WEIGHTS} for the torch backend")
        from qnkit.backends.torch_backend import TorchBackend

        return TorchBackend(bundle, precision=precision, device=device, batch_size=batch_size,
                            cuda_graphs=options.get("cuda_graphs", False), threads=options.get("threads"))
    raise QnkitInputError(f"unknown backend {kind!r} (choose from {', '.join(AVAILABLE_KINDS)})")


def _opened(backend) -> str:
    """``onnxruntime (fp32, cpu, batch 4, not 16: ...)``: an opened backend as the log says it, its batch as it
    runs (:attr:`Backend.slices_per_call`; an object without it runs its ``batch_size``)."""
    batch = batch_words(backend.batch_size, getattr(backend, "slices_per_call", backend.batch_size), backend.name,
                        getattr(backend, "concurrent_runs", 1))
    return f"{backend.name} ({backend.precision}, {backend.device}, {batch})"


def _auto_candidates(bundle: Bundle, device: str) -> list[tuple[str, str, str]]:
    """(kind, device, why) in order of preference, with the reason each was (not) considered."""
    gpu = device != "cpu" and _torch_cuda()
    cands = []
    if gpu and _installed("tensorrt"):
        cands.append(("tensorrt", "cuda:0" if device == "auto" else device, "TensorRT and a GPU are present"))
    if device != "cpu" and nvidia_gpu_present() and _installed("onnxruntime"):
        from qnkit.backends.onnxruntime_backend import gpu_providers

        if gpu_providers():
            cands.append(("onnxruntime", "cuda:0" if device == "auto" else device,
                          "onnxruntime-gpu and a GPU are present"))
    if _installed("onnxruntime") and bundle.has(FP32_ONNX):
        cands.append(("onnxruntime", "cpu", "no usable GPU runtime" if not cands else "GPU backends failed"))
    if _installed("torch") and bundle.has(WEIGHTS):
        cands.append(("torch", "cuda:0" if gpu else "cpu", "onnxruntime is unavailable"))
    return cands


def open_backend(bundle: Bundle, kind: str = "auto", *, precision: str = "auto", device: str = "auto",
                 batch_size: int = 16, log=print, **options) -> Backend:
    """Open an inference backend for ``bundle``.

    ``kind``: auto | torch | onnxruntime | tensorrt; ``precision``: auto | fp32 | fp16 | bf16 | int8
    (auto: fp16 on a GPU; on the CPU the bundle's :attr:`~qnkit.bundle.Bundle.cpu_precision`, i.e. INT8
    with ONNX Runtime when ``qnkit export --int8-evidence`` found it agrees with FP32 on real CT, else
    fp32); ``device``: auto | cpu | cuda | cuda:N. Options:
    ``threads`` (CPU threads), ``cuda_graphs`` (torch), ``tensorrt_ep`` (onnxruntime),
    ``one_call_all_threads`` (onnxruntime on the CPU: one call at a time on all threads, not calls side by side),
    ``rebuild_engine`` (tensorrt: False refuses a foreign engine instead of rebuilding it),
    ``engine_batches`` (tensorrt: (min, opt, max) profile of a rebuilt engine).
    An explicitly asked kind that cannot run raises QnkitInputError naming what is missing.
    """
    if kind not in AVAILABLE_KINDS:
        raise QnkitInputError(f"unknown backend {kind!r} (choose from {', '.join(AVAILABLE_KINDS)})")
    if int(batch_size) < 1:
        raise QnkitInputError(f"batch size must be >= 1, got {batch_size}")
    if kind != "auto":
        dev = _resolve_device(device, kind)
        prec = _resolve_precision(precision, dev, bundle, kind)
        backend = _open(bundle, kind, prec, dev, int(batch_size), log, options)
        log(f"backend: {_opened(backend)}")
        return backend
    failures = []
    for cand_kind, dev, why in _auto_candidates(bundle, device):
        prec = _resolve_precision(precision, dev, bundle, cand_kind)
        try:
            backend = _open(bundle, cand_kind, prec, dev, int(batch_size), log, options)
        except BundleError:
            raise  # a tampered or foreign artefact is an error, never a reason to quietly fall back
        except (QnkitInputError, ImportError, RuntimeError, OSError) as exc:
            failures.append(f"{cand_kind} on {dev}: {exc}")
            log(f"backend: {cand_kind} on {dev} unavailable ({exc}); trying the next one")
            continue
        if backend.precision == "int8" and precision == "auto":
            why += f"; INT8 by the bundle's evidence: {bundle.cpu_precision_why}"
        log(f"backend: {_opened(backend)} - {why}")
        return backend
    detail = "; ".join(failures) or INSTALL_ONNXRUNTIME
    raise QnkitInputError(f"no inference backend can run {bundle.path}: {detail}")


def open_sampler(bundle: Bundle, backend: Backend, *, log=print) -> Backend:
    """A backend that draws Monte-Carlo dropout samples (``predict(x, keep)``) for ``bundle``, on ``backend``'s device.

    The torch backend samples itself (weights + masks). Otherwise the bundle's ``model.mc.onnx`` on ONNX
    Runtime (CPU, or CUDA / TensorRT execution providers on a GPU: how the TensorRT backend samples);
    a bundle exported before that graph existed samples on eager torch from its weights. QnkitInputError
    when neither can run here.
    """
    if backend.name == "torch":
        return backend
    device = backend.device
    if bundle.has(MC_ONNX) and _installed("onnxruntime"):
        from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend, gpu_providers

        dev = device if device != "cpu" and gpu_providers() else "cpu"
        sampler = OnnxRuntimeBackend(bundle, precision="fp32", device=dev, batch_size=backend.batch_size,
                                     graph=MC_ONNX)
        log(f"uncertainty: Monte-Carlo samples on {_opened(sampler)} with {MC_ONNX}")
        return sampler
    if _installed("torch") and _installed("safetensors") and bundle.has(WEIGHTS):
        from qnkit.backends.torch_backend import TorchBackend

        dev = device if device != "cpu" and _torch_cuda() else "cpu"
        sampler = TorchBackend(bundle, device=dev, batch_size=backend.batch_size)
        log(f"uncertainty: Monte-Carlo samples on {_opened(sampler)} (the bundle has no {MC_ONNX}: add it with "
            f"`python -m qnkit.export.mc_dropout BUNDLE` to sample on {backend.name})")
        return sampler
    raise QnkitInputError(f"{bundle.path}: cannot draw Monte-Carlo samples here: no {MC_ONNX} in the bundle "
                          f"(re-export it) and no torch for its weights")


def sampling_predict(network, sampler):
    """`predict(x, keep=None)` as :func:`qnkit.segment.segment_ct` calls it: ``network()`` predicts plain slices,
    ``sampler()`` (:func:`open_sampler`'s backend) the Monte-Carlo samples (``keep``: the Dropout2d masks). Both
    are called at each use, so that a caller may open them lazily."""

    def predict(x, keep=None):
        return network().predict(x) if keep is None else sampler().predict(x, keep)

    return predict
