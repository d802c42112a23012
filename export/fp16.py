"""FP16 ONNX: a strongly-typed FP16 graph with FP32 input and output.

Exported from a ``.half()`` copy of the BN-folded network wrapped in casts (``Cast`` to FP16 at
the input, logits cast back to FP32 before the sigmoid), so every weight and activation in
between is FP16 by the graph's own types. That is the form TensorRT 11 needs (strongly typed
networks, no FP16 builder flag) and TensorRT 10 and ONNX Runtime accept.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .onnx_export import export_module, fold_batchnorm


class HalfWithFloatIO(nn.Module):
    """float32 image -> FP16 network -> float32 probability (sigmoid in FP32)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x.half()).float())


def export_fp16(model: nn.Module, path: Path, input_size: tuple[int, int]) -> dict:
    """``model.fp16.onnx`` of a (logits) QuickNAT; BN folded in float64 before the cast to FP16."""
    import onnx

    folded, _ = fold_batchnorm(model)
    folded.set_unpool("mask")
    info = export_module(HalfWithFloatIO(folded), path, torch.rand(2, 1, *input_size))
    graph = onnx.load(str(path))
    f32 = onnx.TensorProto.FLOAT
    stray = [t.name for t in graph.graph.initializer if t.data_type == f32]
    io_types = [v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]]
    if stray or io_types != [f32, f32]:
        raise RuntimeError(f"{path.name}: expected FP16 weights and FP32 I/O, got FP32 weights {stray[:3]} "
                           f"and I/O types {io_types}")
    return {**info, "weights": "float16", "io": "float32"}
