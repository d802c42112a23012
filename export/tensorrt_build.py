"""Engine building lives in the runtime (:mod:`qnkit.backends.tensorrt_build`), which the TensorRT backend
uses to rebuild engines; export builds through the same code with the same dynamic-shape profile."""
from __future__ import annotations

from qnkit.backends.tensorrt_build import (build_engine as build_engine_with_profile, engine_profile,  # noqa: F401
                                           gpu_info, tensorrt_or_none, trt_major, unavailable_reason,
                                           uses_strongly_typed_fp16)


def build_engine(onnx_path, *, hw: tuple[int, int], precision: str = "fp16", batches=(1, 16, 32),
                 timing_cache=None, divisor: int = 16, log=print) -> tuple[bytes, dict]:
    """An engine whose profile runs batches ``batches`` and every slice grid from one ``divisor`` step to
    twice the export grid ``hw`` (see :func:`qnkit.backends.tensorrt_build.engine_profile`)."""
    return build_engine_with_profile(onnx_path, profile=engine_profile(hw, divisor, batches), precision=precision,
                                     timing_cache=timing_cache, log=log)
