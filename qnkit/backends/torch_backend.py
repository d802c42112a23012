"""Eager PyTorch backend: the bundle's ``weights.safetensors`` in QuickNAT, on CPU or CUDA.

FP32, or FP16/BF16 through autocast (weights stay FP32, as in training with AMP). On CUDA,
``cuda_graphs=True`` captures one CUDA graph per input shape at a fixed batch size (the last
chunk is zero-padded) and replays it, which removes the per-layer launch overhead of small
batches. Uses native max-unpooling (same outputs as the export's mask form, and faster eagerly).
"""
from __future__ import annotations

import contextlib

import numpy as np

from qnkit.backends.base import Backend, check_precision
from qnkit.cpus import default_threads
from qnkit.bundle import WEIGHTS, Bundle
from qnkit.errors import QnkitInputError


def bundle_network(bundle: Bundle):
    """The bundle's QuickNAT (eval mode, CPU) with its ``weights.safetensors``: the verified bytes are what is loaded."""
    from safetensors.torch import load as load_safetensors

    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    model = QuickNAT(QuickNATConfig.from_dict(bundle.network), unpool="indices")
    model.load_state_dict(load_safetensors(bundle.read(WEIGHTS)))
    return model.eval()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, *, precision: str = "fp32", device: str = "cpu", batch_size: int = 16,
                 cuda_graphs: bool = False, threads: int | None = None):
        import torch

        self.precision = check_precision(precision, ("fp32", "fp16", "bf16"), "torch")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise QnkitInputError(f"device {device} asked for, but torch sees no CUDA GPU")
        self._dev = torch.device(device)
        self.device = str(self._dev) if self._dev.type == "cpu" else f"cuda:{self._dev.index or 0}"
        self.batch_size = int(batch_size)
        self.size_divisor = bundle.size_divisor
        self.channels = bundle.input_planes
        if self._dev.type == "cpu":
            torch.set_num_threads(threads or default_threads())
        self.model = bundle_network(bundle).to(self._dev)
        self._torch = torch
        self.cuda_graphs = bool(cuda_graphs) and self._dev.type == "cuda"
        self.fixed_batch = self.cuda_graphs
        self._graphs: dict[tuple, tuple] = {}

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = self._torch.float16 if self.precision == "fp16" else self._torch.bfloat16
        return self._torch.autocast(self._dev.type, dtype=dtype)

    def _forward(self, x):
        with self._autocast():
            return self._torch.sigmoid(self.model(x).float())

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            if not self.cuda_graphs:
                return self._forward(xt.to(self._dev)).cpu().numpy()
            graph, static_in, static_out = self._graph_for(tuple(x.shape))
            static_in.copy_(xt)
            graph.replay()
            return static_out.cpu().numpy()

    def _run_sampled(self, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Monte-Carlo dropout: the eval network with Dropout2d's masks given (QuickNAT.forward's ``keep``)."""
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            logits = self.model(torch.from_numpy(x).to(self._dev), torch.from_numpy(keep).to(self._dev))
            return torch.sigmoid(logits.float()).cpu().numpy()

    def _graph_for(self, shape: tuple):
        """Capture (once per shape) a CUDA graph of the forward pass on static buffers."""
        if shape not in self._graphs:
            torch = self._torch
            static_in = torch.zeros(shape, device=self._dev)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (cuDNN autotuning, allocator) outside the capture
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _details(self) -> dict:
        torch = self._torch
        d = {"torch": torch.__version__, "cuda_graphs": self.cuda_graphs}
        if self._dev.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self._dev)
            # PyTorch runs "FP32" convolutions as TF32 on Ampere and later unless told otherwise: say which.
            d["tf32_convolutions"] = bool(torch.backends.cudnn.allow_tf32)
        else:
            d["threads"] = torch.get_num_threads()
        return d

    def close(self) -> None:
        self._graphs.clear()
        self.model = None
