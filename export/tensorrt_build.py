"""Build a TensorRT engine from the bundle's ONNX (TensorRT 10 and 11), shared by export and the backend.

FP16 on TensorRT 10: parse the FP32 ONNX and set ``BuilderFlag.FP16`` (weakly typed network).
TensorRT 11 removed that flag and weakly typed networks: parse the already-FP16 ONNX
(``model.fp16.onnx``, FP32 in/out) into a ``STRONGLY_TYPED`` network, so the graph's own types
decide the precision. One optimisation profile covers batch sizes min/opt/max at the model's
input grid; a timing cache is loaded (when given) and saved back so rebuilds are fast.
This module imports no torch; :func:`gpu_info` imports it lazily.
"""
from __future__ import annotations

import time
from pathlib import Path

from qnkit.errors import QnkitInputError


def tensorrt_or_none():
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def uses_strongly_typed_fp16(trt) -> bool:
    """True where FP16 must come from an FP16 ONNX (TensorRT 11+: no BuilderFlag.FP16)."""
    return trt_major(trt) >= 11 or not hasattr(trt.BuilderFlag, "FP16")


def gpu_info(device_index: int = 0) -> dict | None:
    """{"gpu": name, "compute_capability": "9.0"} of the CUDA device, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}


def unavailable_reason() -> str | None:
    """Why no engine can be built here (missing package or GPU), or None."""
    trt = tensorrt_or_none()
    if trt is None:
        return "the tensorrt Python package is not installed (pip install tensorrt)"
    if gpu_info() is None:
        return "no CUDA GPU is visible to torch"
    return None


def build_engine(onnx_path: str | Path, *, hw: tuple[int, int], precision: str = "fp16",
                 batches: tuple[int, int, int] = (1, 16, 32), timing_cache: str | Path | None = None,
                 workspace_gib: float = 4.0, input_name: str = "image", log=print) -> tuple[bytes, dict]:
    """Serialized engine and its record. ``onnx_path`` is the FP16 ONNX when
    :func:`uses_strongly_typed_fp16` and precision is fp16, else the FP32 ONNX."""
    trt = tensorrt_or_none()
    reason = unavailable_reason()
    if reason:
        raise QnkitInputError(f"cannot build a TensorRT engine: {reason}")
    lo, opt, hi = (int(b) for b in batches)
    if not 1 <= lo <= opt <= hi:
        raise QnkitInputError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = precision == "fp16" and uses_strongly_typed_fp16(trt)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QnkitInputError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16" and not strongly:
        config.set_flag(trt.BuilderFlag.FP16)
    h, w = hw
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, 1, h, w), (opt, 1, h, w), (hi, 1, h, w))
    config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a foreign cache is ignored, not fatal
    log(f"building TensorRT {trt.__version__} engine ({precision}, "
        f"{'strongly typed from the FP16 ONNX' if strongly else 'builder flags'}; batch {lo}/{opt}/{hi}, {h}x{w})...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QnkitInputError(f"TensorRT could not build an engine from {onnx_path} (see the messages above)")
    if timing_cache:
        from qnkit._atomic import write_bytes_atomic

        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    record = {"tensorrt": str(trt.__version__), **gpu_info(), "precision": precision, "strongly_typed": strongly,
              "source": Path(onnx_path).name,
              "profile": {"input": input_name, "min": [lo, 1, h, w], "opt": [opt, 1, h, w], "max": [hi, 1, h, w]},
              "build_seconds": round(time.perf_counter() - started, 2)}
    return bytes(serialized), record
