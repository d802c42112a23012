"""ONNX Runtime backend: the bundle's ONNX graph on the CPU, CUDA or TensorRT execution provider.

Precision picks the graph: fp32 -> ``model.onnx``, fp16 -> ``model.fp16.onnx`` (FP32 in/out),
int8 -> ``model.int8.onnx`` (QDQ). Sessions use graph optimisation level ALL. On the CPU each call
runs one slice on one thread, as many calls side by side as qnkit may use CPUs (see CPU_RUN_SLICES
for why); on a GPU (onnxruntime-gpu) the providers are TensorRT EP (engine and timing
caches under the qnkit cache folder) -> CUDA EP -> CPU, and inputs/outputs go through IO binding
so that the input is copied to the device once and the output straight back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qnkit.backends.base import Backend, check_precision
from qnkit.cpus import default_threads
from qnkit.bundle import FP16_ONNX, FP32_ONNX, INT8_ONNX, Bundle
from qnkit.uncertainty import KEEP_INPUT
from qnkit.errors import QnkitInputError

GRAPHS = {"fp32": FP32_ONNX, "fp16": FP16_ONNX, "int8": INT8_ONNX}


def cache_dir() -> Path:
    """Where engines built on this machine are kept (QNKIT_CACHE_DIR, else ~/.cache/qnkit)."""
    root = os.environ.get("QNKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qnkit")
    return Path(root)


def gpu_providers() -> list[str]:
    """The GPU execution providers this onnxruntime offers (empty for the CPU-only wheel)."""
    import onnxruntime as ort

    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    return so


def graph_channels(input_shape) -> int:
    """Input planes per slice of a graph whose input is (batch, C, height, width): its C when fixed,
    else 1 (qnkit's exports always fix it; a graph with a dynamic C takes what it is given)."""
    c = input_shape[1] if len(input_shape) == 4 else None
    return int(c) if isinstance(c, int) and c > 0 else 1


# On the CPU a session runs this many slices per call, in single-threaded calls side by side (one per
# CPU qnkit may use) rather than one call at a time on all threads: QuickNAT is hundreds of small,
# memory-bound operators, and threads that meet at the end of each one wait more than they work.
# kidney-synth-7 on 2 cores (AMD EPYC Zen 4), 144x144, ms per slice: INT8 14.7 as 2 concurrent calls
# of 1 slice (2 of 2 slices 15.1, of 4 16.9) against 23.4 as one 2-thread call of 4; FP32 18.4
# against 27.0. More slices per call also spill out of the caches, and the memory arena keeps the
# peak of the largest call (full-size QuickNAT, INT8: 19 GB at 32 slices per call).
CPU_RUN_SLICES = 1

# Slices per call of a session whose calls run one at a time on all threads (``one_call_all_threads``:
# the way before calls side by side, kept for the bench to measure against).
CPU_SHARED_RUN_SLICES = 4


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle | None = None, *, precision: str = "fp32", device: str = "cpu",
                 batch_size: int = 16, threads: int | None = None, tensorrt_ep: bool = True,
                 model_path: str | Path | None = None, size_divisor: int = 16, graph: str | None = None,
                 one_call_all_threads: bool = False):
        import onnxruntime as ort

        self.precision = check_precision(precision, tuple(GRAPHS), "onnxruntime")
        self.batch_size = int(batch_size)
        if model_path is None:
            self.model_name = graph or GRAPHS[precision]  # graph: another of the bundle's (model.mc.onnx)
            model = bundle.read(self.model_name)  # the verified bytes are what the session parses
            self.size_divisor = bundle.size_divisor
            self.fixed_hw = None if bundle.dynamic_hw else bundle.input_size
        else:
            self.model_name, model = Path(model_path).name, str(model_path)
            self.size_divisor = size_divisor
        self._device_id = 0
        if device == "cpu":
            providers: list = ["CPUExecutionProvider"]
        else:
            self._device_id = int(device.split(":")[1]) if ":" in device else 0
            available = gpu_providers()
            if "CUDAExecutionProvider" not in available:
                raise QnkitInputError(f"device {device} asked for, but this onnxruntime has no CUDA execution "
                                      f"provider (pip uninstall onnxruntime, then pip install 'qnkit[gpu]')")
            providers = []
            if tensorrt_ep and "TensorrtExecutionProvider" in available:
                cache = cache_dir() / "ort-trt"
                cache.mkdir(parents=True, exist_ok=True)
                providers.append(("TensorrtExecutionProvider", {
                    "device_id": self._device_id, "trt_fp16_enable": precision == "fp16",
                    "trt_int8_enable": False, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache)}))
            providers += [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
        threads = threads or default_threads()
        side_by_side = device == "cpu" and not one_call_all_threads
        self.session = ort.InferenceSession(model, sess_options=session_options(1 if side_by_side else threads),
                                            providers=providers)
        self.providers = self.session.get_providers()
        on_gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self.device = f"cuda:{self._device_id}" if on_gpu else "cpu"
        if not on_gpu:
            self.max_run_slices = CPU_RUN_SLICES if side_by_side else CPU_SHARED_RUN_SLICES
            # Session.run is thread-safe; with one intra-op thread each call runs on its caller's thread
            self.concurrent_runs = int(threads) if side_by_side else 1
        self._input = self.session.get_inputs()[0].name
        self.channels = graph_channels(self.session.get_inputs()[0].shape)
        self._keep = next((i.name for i in self.session.get_inputs()[1:] if i.name == KEEP_INPUT), None)
        self._output = self.session.get_outputs()[0].name
        self._ort = ort
        self._threads = self.session.get_session_options().intra_op_num_threads

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            return self.session.run([self._output], {self._input: x})[0]
        binding = self.session.io_binding()
        value = self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", self._device_id)
        binding.bind_ortvalue_input(self._input, value)
        binding.bind_output(self._output, "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run_sampled(self, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Monte-Carlo dropout on the Monte-Carlo graph (:data:`qnkit.bundle.MC_ONNX`): masks as its second input."""
        if self._keep is None:
            return super()._run_sampled(x, keep)
        if self.device == "cpu":
            return self.session.run([self._output], {self._input: x, self._keep: keep})[0]
        binding = self.session.io_binding()
        for name, array in ((self._input, x), (self._keep, keep)):
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id))
        binding.bind_output(self._output, "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _details(self) -> dict:
        return {"onnxruntime": self._ort.__version__, "model": self.model_name, "providers": self.providers,
                "intra_op_threads": self._threads, "max_run_slices": self.max_run_slices}

    def close(self) -> None:
        super().close()
        self.session = None
