"""FP16 ONNX: a strongly-typed FP16 graph with FP32 input and output.

Made from the FP32 graph export has just written and verified, not by a second trace: ONNX
Runtime's float16 converter casts every weight and activation to FP16 and adds a ``Cast`` to FP16
after the input and a ``Cast`` back to FP32 before the final sigmoid (kept in FP32, as the logits
of a half-precision network are). The result carries its precision in the graph's own types:
the form TensorRT 11 needs (strongly typed networks, no FP16 builder flag) and TensorRT 10 and
ONNX Runtime accept. A conversion takes well under a second; a second ``torch.onnx.export`` of
a half-precision copy took 25-35 s on 2 CPU cores and gave the same graph up to rounding.
"""
from __future__ import annotations

import time
from pathlib import Path

from .onnx_export import ExportError

CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"


def export_fp16(fp32_path: Path, path: Path) -> dict:
    """``model.fp16.onnx`` from the FP32 ``model.onnx`` at ``fp32_path`` (image -> probability)."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass
    from onnxruntime.transformers.float16 import convert_float_to_float16

    started = time.perf_counter()
    fp32 = onnx.load(str(fp32_path))
    output = fp32.graph.output[0].name
    final = [node.name for node in fp32.graph.node if output in node.output]
    # The SE blocks' sigmoids stay FP16 (no cast pairs inside the network); only the output's is FP32.
    converted = convert_float_to_float16(fp32, keep_io_types=True, op_block_list=[], node_block_list=final)
    _sigmoid_straight_to_output(converted.graph)
    model = ir.from_proto(converted)
    TopologicalSortPass()(model)  # the converter appends its input casts last; checkers and parsers want order
    graph = ir.to_proto(model)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    f32 = onnx.TensorProto.FLOAT
    stray = [t.name for t in graph.graph.initializer if t.data_type == f32]
    io_types = [v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]]
    if stray or io_types != [f32, f32]:
        raise ExportError(f"{path.name}: expected FP16 weights and FP32 I/O, got FP32 weights {stray[:3]} "
                          f"and I/O types {io_types}")
    casts = sum(node.op_type == "Cast" for node in graph.graph.node)
    return {"converter": CONVERTER, "from": fp32_path.name, "seconds": round(time.perf_counter() - started, 2),
            "nodes": len(graph.graph.node), "casts": casts, "weights": "float16", "io": "float32"}


def _sigmoid_straight_to_output(graph) -> None:
    """The converter casts a kept-FP32 node's output to FP16 and, for an FP32 graph output, back again:
    ``Sigmoid -> Cast(FP16) -> Cast(FP32) -> probability``. Drop both casts so the FP32 probability is
    the output itself, not rounded to FP16 on its way out."""
    output = graph.output[0].name
    producer = {name: node for node in graph.node for name in node.output}
    to_fp32 = producer.get(output)
    to_fp16 = producer.get(to_fp32.input[0]) if to_fp32 is not None and to_fp32.op_type == "Cast" else None
    sigmoid = producer.get(to_fp16.input[0]) if to_fp16 is not None and to_fp16.op_type == "Cast" else None
    if sigmoid is None or sigmoid.op_type != "Sigmoid":
        raise ExportError(f"FP16 conversion: expected Sigmoid -> Cast -> Cast before {output!r}")
    dropped = {sigmoid.output[0], to_fp16.output[0]}
    sigmoid.output[0] = output
    graph.node.remove(to_fp16)
    graph.node.remove(to_fp32)
    for info in [v for v in graph.value_info if v.name in dropped]:
        graph.value_info.remove(info)
