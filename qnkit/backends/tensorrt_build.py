"""Build TensorRT engines from a bundle's ONNX (TensorRT 10 and 11): what export and the runtime share.

Both `qnkit export --engine` and the TensorRT backend (which rebuilds an engine for another GPU,
TensorRT version or input size) build through :func:`build_engine`, so this lives in the runtime
(the runtime never imports ``qnkit.export``). It imports no torch; :func:`gpu_info` does, lazily.

Precision. FP16 on TensorRT 10: parse the FP32 ONNX and set ``BuilderFlag.FP16`` (weakly typed).
TensorRT 11 removed that flag and weakly typed networks: parse the already-FP16 ONNX
(``model.fp16.onnx``, FP32 in/out) into a ``STRONGLY_TYPED`` network, so the graph's own types
decide the precision. TF32 is switched off so that FP32 layers compute what the CPU computes.

Shapes. One optimisation profile (``IOptimizationProfile.set_shape(name, min, opt, max)``) with
a dynamic batch AND a dynamic height/width (:func:`engine_profile`): the engine then runs every
slice at exactly the size :mod:`qnkit.inference` pads it to (a multiple of the size divisor),
the same input ONNX Runtime and `qnkit evaluate` see. Padding up to one export grid instead
would change the results, because QuickNAT's channel squeeze-excitation averages over the whole
(padded) slice. At run time ``IExecutionContext.set_input_shape`` picks the shape per call.
"""
from __future__ import annotations

import time
from pathlib import Path

from qnkit.errors import QnkitInputError
from qnkit.inference import padded_size

__all__ = ["tensorrt_or_none", "trt_major", "uses_strongly_typed_fp16", "gpu_info", "unavailable_reason",
           "engine_profile", "profile_covers", "profile_is_dynamic", "build_engine"]

#: The largest slice grid of a fresh profile, as a multiple of the export grid (a 512x512 CT at 2x
#: downsampling is 256x256; twice that covers a 1024x1024 CT or a field of view twice as wide).
MAX_GRID_FACTOR = 2
#: A profile grown for a larger input is rounded up to this many size-divisor steps, so that
#: slightly different large inputs share one rebuilt engine.
GROW_STEPS = 4


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
        return "no CUDA GPU is visible to torch (pip install 'qnkit[gpu]' and a CUDA build of torch)"
    return None


def engine_profile(input_size: tuple[int, int], divisor: int, batches: tuple[int, int, int], *,
                   cover: tuple[int, int] | None = None, input_name: str = "image", channels: int = 1) -> dict:
    """The optimisation profile {"input", "min", "opt", "max"} (NCHW lists) of an engine.

    Channels: the network's input planes per slice (``num_channels``), fixed in every shape.

    Batch: ``batches`` = (min, opt, max). Height/width: from one divisor step (the smallest grid
    the network accepts) through the export grid ``input_size`` (opt: what TensorRT tunes for)
    to ``MAX_GRID_FACTOR`` times it, or further when ``cover`` (an (h, w) that must run) is
    larger, rounded up to ``GROW_STEPS`` divisor steps.
    """
    lo, opt, hi = (int(b) for b in batches)
    if not 1 <= lo <= opt <= hi:
        raise QnkitInputError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    h, w = (int(n) for n in input_size)
    d = int(divisor)
    if d < 1 or h < d or w < d or h % d or w % d:
        raise QnkitInputError(f"input size {h}x{w} must be positive multiples of {d}")
    top = [MAX_GRID_FACTOR * h, MAX_GRID_FACTOR * w]
    if cover is not None:
        top = [max(t, padded_size(c, GROW_STEPS * d)) for t, c in zip(top, cover)]
    c = int(channels)
    return {"input": input_name, "min": [lo, c, d, d], "opt": [opt, c, h, w], "max": [hi, c, *top]}


def profile_covers(profile: dict, hw: tuple[int, int]) -> bool:
    """True when slices of height/width ``hw`` run on an engine with this profile."""
    return all(a <= n <= b for a, n, b in zip(profile["min"][2:], hw, profile["max"][2:]))


def profile_is_dynamic(profile: dict) -> bool:
    """True for a profile whose height/width range is not one fixed grid (engines of older exports)."""
    return list(profile["min"][2:]) != list(profile["max"][2:])


def build_engine(onnx: bytes | str | Path, *, profile: dict, precision: str = "fp16",
                 timing_cache: str | Path | None = None, workspace_gib: float = 4.0, source: str | None = None,
                 log=print) -> tuple[bytes, dict]:
    """Serialized engine and its record (TensorRT version, GPU, precision, profile).

    ``onnx``: the model's bytes (as verified by :meth:`qnkit.bundle.Bundle.read`; qnkit's graphs
    keep no external data) or its path; the FP16 ONNX when :func:`uses_strongly_typed_fp16` and
    precision is fp16, else the FP32 ONNX. ``source`` names it in messages and the record.
    """
    source = source or (Path(onnx).name if not isinstance(onnx, (bytes, bytearray)) else "ONNX bytes")
    trt = tensorrt_or_none()
    reason = unavailable_reason()
    if reason:
        raise QnkitInputError(f"cannot build a TensorRT engine: {reason}")
    if precision not in ("fp32", "fp16"):
        raise QnkitInputError(f"TensorRT engines are fp32 or fp16, not {precision!r}")
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = precision == "fp16" and uses_strongly_typed_fp16(trt)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(bytes(onnx)) if isinstance(onnx, (bytes, bytearray)) else parser.parse_from_file(str(onnx))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QnkitInputError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16" and not strongly:
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    shapes.set_shape(profile["input"], tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(shapes)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a foreign cache is ignored, not fatal
    log(f"building TensorRT {trt.__version__} engine ({precision}, "
        f"{'strongly typed from the FP16 ONNX' if strongly else 'builder flags'}; shapes "
        f"{profile['min']} .. {profile['opt']} .. {profile['max']})...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QnkitInputError(f"TensorRT could not build an engine from {source} (see the messages above)")
    if timing_cache:
        from qnkit._atomic import write_bytes_atomic

        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    record = {"tensorrt": str(trt.__version__), **gpu_info(), "precision": precision, "strongly_typed": strongly,
              "source": source, "profile": {k: profile[k] for k in ("input", "min", "opt", "max")},
              "build_seconds": round(time.perf_counter() - started, 2)}
    return bytes(serialized), record
