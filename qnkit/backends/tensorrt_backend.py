"""TensorRT backend: the native runtime (TensorRT 10 and 11 APIs) on one CUDA stream.

Engine choice (:func:`select_engine`, pure): the bundle's ``model.engine`` runs only when
``qnkit.json`` says it was built for this TensorRT version and this GPU (name and compute
capability) at the asked precision, with a dynamic height/width profile that covers the slices
to run; otherwise an engine is rebuilt from the bundle's ONNX into the qnkit cache folder
(keyed by the ONNX hash, TensorRT version, GPU, precision and profile) with a message saying why,
or, with ``rebuild=False``, refused with one clear error. A foreign engine never runs.

A rebuilt engine is verified like at export before it is used (:func:`qnkit.verification.verify_engine`:
the same synthetic slices on grids smaller than, equal to and larger than the export size, the
same bars), against the bundle's FP32 ONNX on ONNX Runtime's CPU provider; the figures are kept
beside it in the cache, and a cached engine runs only with a matching hash and passed figures
(:func:`cached_engine_usable`). Slices larger than the engine's profile rebuild it once for a
profile that covers them (verified the same way), instead of failing after ``auto`` chose TensorRT.

Shapes: every slice runs at exactly the size :mod:`qnkit.inference` padded it to, as on every
other backend (see :mod:`qnkit.backends.tensorrt_build`).

Execution: inputs are copied once into a torch CUDA tensor, the output is a torch CUDA tensor,
their ``data_ptr()`` are the engine's tensor addresses (``set_tensor_address``), and
``execute_async_v3`` runs on the backend's stream; no further host copies. torch comes with the
``[gpu]`` extra.
"""
from __future__ import annotations

import json

import numpy as np

from qnkit.backends.base import Backend, check_precision
from qnkit.backends.tensorrt_build import engine_profile, profile_covers, profile_is_dynamic
from qnkit.bundle import ENGINE, FP16_ONNX, FP32_ONNX, Bundle, BundleError, engine_mismatch, sha256_bytes
from qnkit.errors import QnkitInputError


class EngineVerificationError(RuntimeError):
    """An engine built here does not compute what the bundle's FP32 graph computes (it is not used)."""


def select_engine(bundle: Bundle, here: dict, precision: str, *, hw: tuple[int, int] | None = None,
                  rebuild: bool = True) -> tuple[str, str]:
    """("bundle", why) to run the bundle's engine, or ("rebuild", why) to build one here.

    ``here``: {"tensorrt": version, "gpu": name, "compute_capability": "9.0"}; ``hw``: a slice
    height/width that must run (None: the export grid). With ``rebuild=False`` an unusable bundle
    engine raises :class:`BundleError` instead.
    """
    record = bundle.engine
    profile = (record or {}).get("profile")
    need = tuple(hw or bundle.input_size)
    if record is None or not bundle.has(ENGINE):
        why = "the bundle has no TensorRT engine"
    elif record.get("precision") != precision:
        why = f"the bundle's engine is {record.get('precision')}, {precision} was asked for"
    elif not profile or not profile_is_dynamic(profile):
        why = ("the bundle's engine runs one fixed slice grid (padding slices up to it changes QuickNAT's "
               "results)")
    elif not profile_covers(profile, need):
        why = (f"the bundle's engine runs slices from {profile['min'][2]}x{profile['min'][3]} to "
               f"{profile['max'][2]}x{profile['max'][3]}, not {need[0]}x{need[1]}")
    else:
        why = engine_mismatch(record, tensorrt_version=here["tensorrt"], gpu_name=here["gpu"],
                              compute_capability=here["compute_capability"])
        if why is None:
            return "bundle", "engine built for this TensorRT version and GPU"
    if not rebuild:
        raise BundleError(f"{bundle.path / ENGINE}: {why}; not running it (rebuild with `qnkit export --engine` "
                          f"on this machine, or allow the backend to rebuild it)")
    return "rebuild", why


def cached_engine_usable(record: dict | None, engine_sha256: str | None) -> bool:
    """True when an engine rebuilt earlier may run: its bytes match the hash recorded at build time
    and its verification (done before it was cached) passed."""
    if not record or engine_sha256 is None or record.get("sha256") != engine_sha256:
        return False
    return bool((record.get("verification") or {}).get("passed"))


def engine_source(bundle: Bundle, precision: str, trt) -> str:
    """The ONNX artefact an engine is built from on this TensorRT (see qnkit.backends.tensorrt_build)."""
    from qnkit.backends.tensorrt_build import uses_strongly_typed_fp16

    if precision == "fp16" and uses_strongly_typed_fp16(trt):
        if not bundle.has(FP16_ONNX):
            raise BundleError(f"{bundle.path}: TensorRT {trt.__version__} builds FP16 engines from model.fp16.onnx, "
                              f"which this bundle lacks (re-export with --fp16, or use --precision fp32)")
        return FP16_ONNX
    return FP32_ONNX


def verify_rebuilt_engine(bundle: Bundle, engine_bytes: bytes, record: dict, precision: str, log=print) -> dict:
    """Figures of a freshly built engine against the bundle's FP32 ONNX (ONNX Runtime CPU), as at export;
    raises :class:`EngineVerificationError` when they miss the bar."""
    from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend
    from qnkit.inference import model_context
    from qnkit.verification import synthetic_slices, verify_engine

    x, _ = synthetic_slices(bundle.input_size, bundle.hu_window, context=model_context(bundle))
    reference = OnnxRuntimeBackend(bundle, precision="fp32", device="cpu")
    engine = TensorRTBackend(engine_bytes, precision=precision, size_divisor=bundle.size_divisor, record=record)
    try:
        figures, why = verify_engine(engine.predict, reference.predict, x, precision=precision,
                                     threshold=bundle.threshold, divisor=bundle.size_divisor)
    finally:
        engine.close()
        reference.close()
    worst = min(f["dice"] for k, f in figures.items() if isinstance(f, dict) and "dice" in f)
    log(f"tensorrt: verified the rebuilt engine against {FP32_ONNX} (ONNX Runtime CPU): lowest mask Dice "
        f"{worst:.5f} over {', '.join(k for k in figures if k not in ('bar', 'passed'))} grids")
    if why:
        raise EngineVerificationError(f"the TensorRT engine rebuilt here fails verification: {why}; not using it")
    return {"reference": f"{FP32_ONNX} on ONNX Runtime CPU", **figures}


def load_or_build_engine(bundle: Bundle, precision: str, *, batches: tuple[int, int, int],
                         hw: tuple[int, int] | None = None, rebuild: bool = True, log=print) -> tuple[bytes, dict]:
    """Engine bytes and record: the bundle's when it fits this machine and ``hw``, else a verified
    cached or fresh rebuild."""
    from qnkit._atomic import write_bytes_atomic, write_text_atomic
    from qnkit.backends.onnxruntime_backend import cache_dir
    from qnkit.backends.tensorrt_build import build_engine, gpu_info, tensorrt_or_none

    trt = tensorrt_or_none()
    here = {"tensorrt": str(trt.__version__), **gpu_info()}
    choice, why = select_engine(bundle, here, precision, hw=hw, rebuild=rebuild)
    if choice == "bundle":
        return bundle.read(ENGINE), dict(bundle.engine)  # the verified bytes are what is deserialized
    profile = engine_profile(bundle.input_size, bundle.size_divisor, batches, cover=hw,
                             input_name=bundle.metadata["model"].get("input", {}).get("name", "image"),
                             channels=bundle.input_planes)
    source = engine_source(bundle, precision, trt)
    onnx_bytes = bundle.read(source)  # verified as read; the build parses these bytes
    key = (f"{sha256_bytes(onnx_bytes)[:16]}-trt{here['tensorrt']}-sm{here['compute_capability']}-{precision}"
           f"-b{'-'.join(str(profile[k][0]) for k in ('min', 'opt', 'max'))}"
           f"-{'x'.join(map(str, profile['opt'][2:]))}-max{'x'.join(map(str, profile['max'][2:]))}")
    folder = cache_dir() / "engines"
    path, meta_path = folder / f"{key}.engine", folder / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        record = json.loads(meta_path.read_text())
        data = path.read_bytes()
        if cached_engine_usable(record, sha256_bytes(data)):
            log(f"tensorrt: {why}; using the engine rebuilt and verified earlier ({path})")
            return data, record
    log(f"tensorrt: {why}; rebuilding the engine from {source} (once; cached in {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    data, record = build_engine(onnx_bytes, source=source, profile=profile, precision=precision,
                                timing_cache=folder / f"timing-trt{here['tensorrt']}-sm{here['compute_capability']}.cache",
                                log=log)
    record["verification"] = verify_rebuilt_engine(bundle, data, record, precision, log=log)
    write_bytes_atomic(path, data)
    write_text_atomic(meta_path, json.dumps({**record, "sha256": sha256_bytes(data)}, indent=1))
    return data, record


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_bytes: bytes, *, precision: str = "fp16", batch_size: int = 16, device: str = "cuda:0",
                 size_divisor: int = 16, record: dict | None = None, grow=None):
        """``grow(hw)`` -> (engine bytes, record) of an engine whose profile covers slices of ``hw``
        (None: such slices are refused with a clear error)."""
        import tensorrt as trt
        import torch

        self.precision = check_precision(precision, ("fp32", "fp16"), "tensorrt")
        self.size_divisor = size_divisor
        self._torch, self._trt = torch, trt
        self._dev = torch.device(device)
        self.device = f"cuda:{self._dev.index or 0}"
        torch.cuda.set_device(self._dev)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self._stream = torch.cuda.Stream(self._dev)
        self._grow = grow
        self._load(engine_bytes, record or {}, batch_size)

    def _load(self, engine_bytes: bytes, record: dict, batch_size: int) -> None:
        trt = self._trt
        self.record = record
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
        lo, opt, hi = (list(s) for s in self.engine.get_tensor_profile_shape(self._in, 0))
        self.profile = {"input": self._in, "min": lo, "opt": opt, "max": hi}  # what the engine itself says
        self.channels = int(lo[1])  # input planes per slice (fixed in every profile shape)
        self.batch_size = max(lo[0], min(int(batch_size), hi[0]))
        self.fixed_batch = lo[0] > 1
        self.fixed_hw = None  # never padded up to a grid: every slice runs at the size it was given

    def predict(self, batch: np.ndarray) -> np.ndarray:
        hw = tuple(int(n) for n in np.shape(batch)[-2:])
        if len(hw) == 2 and not profile_covers(self.profile, hw):
            if self._grow is None:
                raise QnkitInputError(f"slices of {hw[0]}x{hw[1]} are outside the TensorRT engine's profile "
                                      f"{self.profile['min'][2:]}..{self.profile['max'][2:]}")
            data, record = self._grow(hw)
            self._load(data, record, self.batch_size)
        return super().predict(batch)

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            xin = torch.from_numpy(x).to(self._dev, non_blocking=False)
            out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32, device=self._dev)
            self.context.set_input_shape(self._in, tuple(x.shape))
            self.context.set_tensor_address(self._in, xin.data_ptr())
            self.context.set_tensor_address(self._out, out.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.cpu()  # synchronises the stream
        return result.numpy()

    def _details(self) -> dict:
        return {"tensorrt": str(self._trt.__version__), "gpu": self._torch.cuda.get_device_name(self._dev),
                "engine": {k: self.record.get(k) for k in ("precision", "strongly_typed", "source")},
                "profile": self.profile}

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


def open_tensorrt(bundle: Bundle, *, precision: str = "fp16", batch_size: int = 16, device: str = "cuda:0",
                  batches: tuple[int, int, int] | None = None, rebuild: bool = True, log=print) -> TensorRTBackend:
    """The TensorRT backend for a bundle (see :func:`select_engine` for which engine runs)."""
    from qnkit.backends.tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise QnkitInputError(f"the tensorrt backend is unavailable: {reason}")
    check_precision(precision, ("fp32", "fp16"), "tensorrt")
    if batches is None:
        prof = (bundle.engine or {}).get("profile", {})
        batches = (prof["min"][0], prof["opt"][0], prof["max"][0]) if prof else (1, batch_size, max(32, batch_size))
    batches = tuple(batches)
    data, record = load_or_build_engine(bundle, precision, batches=batches, rebuild=rebuild, log=log)

    def grow(hw):
        log(f"tensorrt: slices of {hw[0]}x{hw[1]} are larger than the engine's profile")
        return load_or_build_engine(bundle, precision, batches=batches, hw=hw, rebuild=rebuild, log=log)

    return TensorRTBackend(data, precision=precision, batch_size=batch_size, device=device,
                           size_divisor=bundle.size_divisor, record=record, grow=grow)
