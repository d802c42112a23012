"""TensorRT backend: the native runtime (TensorRT 10 and 11 APIs) on one CUDA stream.

Engine choice (:func:`select_engine`): the bundle's ``model.engine`` runs only when ``qnkit.json``
says it was built for this TensorRT version and this GPU (name and compute capability) at the
asked precision; otherwise the engine is rebuilt from the bundle's ONNX into the qnkit cache
folder (keyed by the ONNX hash, TensorRT version, GPU and profile) with a message saying why,
or, with ``rebuild=False``, refused with one clear error. A foreign engine never runs.

Execution: inputs are copied once into a torch CUDA tensor, the output is a torch CUDA tensor,
their ``data_ptr()`` are the engine's tensor addresses (``set_tensor_address``), and
``execute_async_v3`` runs on the backend's stream; no further host copies.
"""
from __future__ import annotations

import json

import numpy as np

from qnkit.backends.base import Backend, check_precision
from qnkit.bundle import ENGINE, FP16_ONNX, FP32_ONNX, Bundle, BundleError, engine_mismatch, sha256_file
from qnkit.errors import QnkitInputError


def select_engine(bundle: Bundle, here: dict, precision: str, *, rebuild: bool = True) -> tuple[str, str]:
    """("bundle", why) to run the bundle's engine, or ("rebuild", why) to build one here.

    ``here``: {"tensorrt": version, "gpu": name, "compute_capability": "9.0"}. With
    ``rebuild=False`` an unusable bundle engine raises :class:`BundleError` instead.
    """
    record = bundle.engine
    if record is None or not bundle.has(ENGINE):
        why = "the bundle has no TensorRT engine"
    elif record.get("precision") != precision:
        why = f"the bundle's engine is {record.get('precision')}, {precision} was asked for"
    else:
        why = engine_mismatch(record, tensorrt_version=here["tensorrt"], gpu_name=here["gpu"],
                              compute_capability=here["compute_capability"])
        if why is None:
            return "bundle", "engine built for this TensorRT version and GPU"
    if not rebuild:
        raise BundleError(f"{bundle.path / ENGINE}: {why}; not running it (rebuild with `qnkit export --engine` "
                          f"on this machine, or allow the backend to rebuild it)")
    return "rebuild", why


def engine_source(bundle: Bundle, precision: str, trt) -> str:
    """The ONNX artefact an engine is built from on this TensorRT (see qnkit.export.tensorrt_build)."""
    from qnkit.export.tensorrt_build import uses_strongly_typed_fp16

    if precision == "fp16" and uses_strongly_typed_fp16(trt):
        if not bundle.has(FP16_ONNX):
            raise BundleError(f"{bundle.path}: TensorRT {trt.__version__} builds FP16 engines from model.fp16.onnx, "
                              f"which this bundle lacks (re-export with --fp16, or use --precision fp32)")
        return FP16_ONNX
    return FP32_ONNX


def load_or_build_engine(bundle: Bundle, precision: str, *, batches: tuple[int, int, int], rebuild: bool = True,
                         log=print) -> tuple[bytes, dict]:
    """Engine bytes and record: the bundle's when it fits this machine, else a cached or fresh rebuild."""
    from qnkit._atomic import write_bytes_atomic, write_text_atomic
    from qnkit.backends.onnxruntime_backend import cache_dir
    from qnkit.export.tensorrt_build import build_engine, gpu_info, tensorrt_or_none

    trt = tensorrt_or_none()
    here = {"tensorrt": str(trt.__version__), **gpu_info()}
    choice, why = select_engine(bundle, here, precision, rebuild=rebuild)
    if choice == "bundle":
        return bundle.artefact(ENGINE).read_bytes(), dict(bundle.engine)
    source = engine_source(bundle, precision, trt)
    onnx_path = bundle.artefact(source)
    key = (f"{sha256_file(onnx_path)[:16]}-trt{here['tensorrt']}-sm{here['compute_capability']}-{precision}"
           f"-b{'-'.join(map(str, batches))}-{'x'.join(map(str, bundle.input_size))}")
    folder = cache_dir() / "engines"
    path, meta_path = folder / f"{key}.engine", folder / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        record = json.loads(meta_path.read_text())
        if record.get("sha256") == sha256_file(path):
            log(f"tensorrt: {why}; using the engine rebuilt earlier ({path})")
            return path.read_bytes(), record
    log(f"tensorrt: {why}; rebuilding the engine from {source} (once; cached in {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    data, record = build_engine(onnx_path, hw=bundle.input_size, precision=precision, batches=batches,
                                timing_cache=folder / f"timing-trt{here['tensorrt']}-sm{here['compute_capability']}.cache",
                                log=log)
    write_bytes_atomic(path, data)
    write_text_atomic(meta_path, json.dumps({**record, "sha256": sha256_file(path)}, indent=1))
    return data, record


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_bytes: bytes, *, precision: str = "fp16", batch_size: int = 16, device: str = "cuda:0",
                 size_divisor: int = 16, record: dict | None = None):
        import tensorrt as trt
        import torch

        self.precision = check_precision(precision, ("fp32", "fp16"), "tensorrt")
        self.size_divisor = size_divisor
        self.record = record or {}
        self._torch, self._trt = torch, trt
        self._dev = torch.device(device)
        self.device = f"cuda:{self._dev.index or 0}"
        torch.cuda.set_device(self._dev)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BundleError("TensorRT could not deserialize the engine (built for another version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"expected an engine with one input and one output, got {inputs} -> {outputs}")
        self._in, self._out = inputs[0], outputs[0]
        for n in names:
            if self.engine.get_tensor_dtype(n) != trt.float32:
                raise BundleError(f"engine tensor {n} is {self.engine.get_tensor_dtype(n)}, expected float32")
        lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self._in, 0))
        self.batch_size = max(lo[0], min(int(batch_size), hi[0]))
        self.fixed_batch = lo[0] > 1
        self.fixed_hw = (hi[2], hi[3]) if (lo[2], lo[3]) == (hi[2], hi[3]) else None
        self._stream = torch.cuda.Stream(self._dev)

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            xin = torch.from_numpy(x).to(self._dev, non_blocking=False)
            out = torch.empty(x.shape, dtype=torch.float32, device=self._dev)
            self.context.set_input_shape(self._in, tuple(x.shape))
            self.context.set_tensor_address(self._in, xin.data_ptr())
            self.context.set_tensor_address(self._out, out.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.cpu()  # synchronises the stream
        return result.numpy()

    def _details(self) -> dict:
        return {"tensorrt": str(self._trt.__version__), "gpu": self._torch.cuda.get_device_name(self._dev),
                "engine": {k: self.record.get(k) for k in ("precision", "strongly_typed", "source", "profile")}}

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


def open_tensorrt(bundle: Bundle, *, precision: str = "fp16", batch_size: int = 16, device: str = "cuda:0",
                  batches: tuple[int, int, int] | None = None, rebuild: bool = True, log=print) -> TensorRTBackend:
    """The TensorRT backend for a bundle (see :func:`select_engine` for which engine runs)."""
    from qnkit.export.tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise QnkitInputError(f"the tensorrt backend is unavailable: {reason}")
    check_precision(precision, ("fp32", "fp16"), "tensorrt")
    if batches is None:
        rec = bundle.engine or {}
        prof = rec.get("profile", {})
        batches = (prof["min"][0], prof["opt"][0], prof["max"][0]) if prof else (1, batch_size, max(32, batch_size))
    data, record = load_or_build_engine(bundle, precision, batches=tuple(batches), rebuild=rebuild, log=log)
    return TensorRTBackend(data, precision=precision, batch_size=batch_size, device=device,
                           size_divisor=bundle.size_divisor, record=record)
