"""A floor for the network: the FLOPs of one forward pass and the machine's measured GEMM peak.

`qnkit bench` reports each backend's slices/s; multiplied by the FLOPs of one slice that is the network's
achieved GFLOP/s, and divided by what a large matrix product reaches on the same cores and threads it says
how far "fast" is from the limit of the hardware for that data type.

- :func:`network_flops`: the FLOPs of one forward pass of an ONNX graph on one slice of a given grid,
  counted from its Conv, Gemm and MatMul nodes (2 x multiply-accumulates; the shapes of
  their outputs are read from one run of the graph on a slice of zeros). Element-wise work (the folded
  batch norms, PReLU, the SE gates' sigmoid and multiply, the unpooling's masks) is not counted: it is
  memory-bound, so GFLOP/s measures the arithmetic the GEMM peak is about. In a QDQ INT8 graph a
  convolution whose weight comes from a DequantizeLinear runs in INT8; the record gives that share.
- :func:`measure_peak`: GFLOP/s of a square matrix product on the same threads the backends use:
  FP32 with ONNX Runtime's MatMul (MLAS, the library of the ONNX Runtime rows) and PyTorch's
  ``torch.mm`` (the eager rows' library), INT8 with ONNX Runtime's MatMulInteger (uint8 x int8 -> int32,
  the u8s8 kernel that QLinearConv runs) and ``torch._int_mm`` where PyTorch has it on the CPU. The
  peak of a data type is the best of its libraries: what the cores reach on the most GEMM-friendly work.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: Side of the square matrices of the peak GEMM (2 x 1024^3 = 2.1 GFLOP per product); a quick bench uses less.
PEAK_SIDE = 1024
#: Operators whose arithmetic is counted, with how their FLOPs are computed (see :func:`_node_flops`).
COUNTED_OPS = ("Conv", "Gemm", "MatMul")
#: GEMM-like operators this count does not handle: a graph that has them is reported with them uncounted.
UNCOUNTED_OPS = ("ConvTranspose", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Einsum")


def _attribute(node, name: str, default):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _output_shapes(model, tensors: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of `tensors` from one ONNX Runtime run of `model` (graph optimisations off) on zeros."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros(input_shape, dtype=np.float32)}
    return {name: tuple(value.shape) for name, value in zip(tensors, session.run(tensors, feed))}


def _weight_dims(graph) -> tuple[dict, dict]:
    """({tensor: dims} of initializers, {DequantizeLinear output: its quantised initializer's dims})."""
    dims = {init.name: tuple(init.dims) for init in graph.initializer}
    dequantised = {node.output[0]: dims[node.input[0]] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in dims}
    return dims, dequantised


def _node_flops(node, output_shape: tuple[int, ...], weight: tuple[int, ...]) -> int:
    """2 x multiply-accumulates of one node, from its output shape and its weight's dims."""
    if node.op_type == "Conv":  # weight (C_out, C_in / group, kh, kw): each output element reads C_in/group x k
        return 2 * int(np.prod(output_shape)) * int(np.prod(weight[1:]))
    # Gemm / MatMul: each output element is a dot product of length K (the weight's reduced dimension)
    trans_b = node.op_type == "Gemm" and _attribute(node, "transB", 0)
    inner = int(weight[-1] if trans_b else weight[-2]) if len(weight) >= 2 else int(weight[0])
    return 2 * int(np.prod(output_shape)) * inner


def network_flops(model_path: str | Path | bytes, input_hw: tuple[int, int], channels: int = 1) -> dict:
    """FLOPs of one forward pass on one (channels, h, w) slice, counted from the graph's GEMM-like nodes.

    Returns {"flops_per_slice", "by_op": {op: flops}, "per_node": {node name: flops}, "nodes",
    "int8_flops_share", "input_hw"};
    ``int8_flops_share`` is the share of those FLOPs in nodes whose weight is dequantised from INT8 (the
    quantised convolutions of a QDQ graph; 0 in an FP32 graph). A node whose weight is not a constant
    (neither an initializer nor dequantised from one), and any node of :data:`UNCOUNTED_OPS`, is left out and
    listed in ``"uncounted"``.
    """
    import onnx

    model = onnx.load_from_string(model_path) if isinstance(model_path, bytes) else onnx.load(str(model_path))
    graph = model.graph
    dims, dequantised = _weight_dims(graph)
    nodes = [node for node in graph.node if node.op_type in COUNTED_OPS]
    shapes = _output_shapes(model, [node.output[0] for node in nodes], (1, channels, *map(int, input_hw)))
    total, int8, by_op, per_node = 0, 0, {}, {}
    uncounted = [node.name or node.op_type for node in graph.node if node.op_type in UNCOUNTED_OPS]
    for node in nodes:
        weight_name = node.input[1]
        weight = dims.get(weight_name) or dequantised.get(weight_name)
        if weight is None:
            uncounted.append(node.name or node.op_type)
            continue
        flops = _node_flops(node, shapes[node.output[0]], weight)
        total += flops
        key = node.name or f"{node.op_type} -> {node.output[0]}"  # unnamed nodes by what they write
        per_node[key] = per_node.get(key, 0) + flops
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
        if weight_name in dequantised:
            int8 += flops
    return {"flops_per_slice": total, "by_op": by_op, "nodes": len(per_node), "per_node": per_node,
            "int8_flops_share": int8 / total if total else 0.0, "input_hw": [int(n) for n in input_hw],
            "uncounted": uncounted,
            "counted": "2 x multiply-accumulates of Conv/Gemm/MatMul; element-wise work not counted"}


def _gemm_graph(side: int, int8: bool) -> bytes:
    """An ONNX graph A (side x side) @ B (a constant side x side): MatMul in FP32, MatMulInteger u8 x s8 in INT8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = rng.integers(-127, 128, size=(side, side), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((side, side), dtype=np.float32)
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [side, side])],
                              [helper.make_tensor_value_info("y", y_type, [side, side])],
                              [numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _rate(fn, flops: float, repeats: int) -> dict:
    """GFLOP/s of `fn` (one product of `flops`) as the median of `repeats` timed calls after one warm-up."""
    from qnkit.benchmarks.timing import measure

    timing = measure(fn, repeats=repeats, warmup=1)
    return {"gflop_per_s": flops / timing.median_s / 1e9, "seconds": timing.as_dict()}


def _onnxruntime_gemm(side: int, int8: bool, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    from qnkit.backends.onnxruntime_backend import session_options

    session = ort.InferenceSession(_gemm_graph(side, int8), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = (rng.integers(0, 256, size=(side, side), dtype=np.uint8) if int8
         else rng.standard_normal((side, side), dtype=np.float32))
    return _rate(lambda: session.run(None, {"a": a}), 2.0 * side ** 3, repeats)


def _torch_gemm(side: int, int8: bool, threads: int, repeats: int) -> dict | None:
    """torch.mm (FP32) or torch._int_mm (INT8) on `threads` threads; None where PyTorch lacks it."""
    try:
        import torch
    except ImportError:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(1)
        if int8:
            if not hasattr(torch, "_int_mm"):
                return None
            a = torch.randint(-127, 128, (side, side), dtype=torch.int8, generator=generator)
            b = torch.randint(-127, 128, (side, side), dtype=torch.int8, generator=generator)
            try:
                torch._int_mm(a, b)
            except RuntimeError:  # no CPU kernel in this build
                return None
            return _rate(lambda: torch._int_mm(a, b), 2.0 * side ** 3, repeats)
        a = torch.randn(side, side, generator=generator)
        b = torch.randn(side, side, generator=generator)
        with torch.inference_mode():
            return _rate(lambda: torch.mm(a, b), 2.0 * side ** 3, repeats)
    finally:
        torch.set_num_threads(before)


def measure_peak(precision: str, *, threads: int | None = None, side: int = PEAK_SIDE, repeats: int = 5) -> dict:
    """The measured GEMM peak of `precision` ("fp32" or "int8") on `threads` threads (default: the backends').

    Returns {"precision", "gflop_per_s" (the best source), "best", "sources": {name: {...}}, "side", "threads"}.
    """
    from qnkit.cpus import default_threads

    if precision not in ("fp32", "int8"):
        raise ValueError(f"no GEMM peak for precision {precision!r} (fp32 or int8)")
    threads = int(threads or default_threads())
    int8 = precision == "int8"
    sources = {("onnxruntime MatMulInteger u8s8" if int8 else "onnxruntime MatMul"):
               _onnxruntime_gemm(side, int8, threads, repeats)}
    torch_rate = _torch_gemm(side, int8, threads, repeats)
    if torch_rate is not None:
        sources["torch._int_mm s8s8" if int8 else "torch.mm"] = torch_rate
    best = max(sources, key=lambda name: sources[name]["gflop_per_s"])
    return {"precision": precision, "gflop_per_s": sources[best]["gflop_per_s"], "best": best, "sources": sources,
            "side": side, "threads": threads}


def achieved(flops_per_slice: float, slices_per_s: float, peak_gflop_per_s: float | None) -> tuple[float, float | None]:
    """(GFLOP/s the network achieves, that as a percentage of the peak, None without a peak)."""
    gflop_per_s = flops_per_slice * slices_per_s / 1e9
    percent = 100.0 * gflop_per_s / peak_gflop_per_s if peak_gflop_per_s else None
    return gflop_per_s, percent


def describe_floor(floor: dict) -> str:
    """One paragraph for the bench's output: FLOPs per slice and each measured peak, with its source."""
    fp32 = floor["flops"]["fp32"]
    h, w = fp32["input_hw"]
    lines = [f"network: {fp32['flops_per_slice'] / 1e9:.2f} GFLOP per {h}x{w} slice ({fp32['counted']})"]
    if "int8" in floor["flops"]:
        lines.append(f"INT8 graph: {floor['flops']['int8']['int8_flops_share']:.0%} of those FLOPs in INT8 "
                     f"convolutions, the rest in float")
    for precision, peak in floor["peak"].items():
        others = ", ".join(f"{name} {source['gflop_per_s']:.1f}" for name, source in peak["sources"].items()
                           if name != peak["best"])
        lines.append(f"{precision.upper()} peak: {peak['gflop_per_s']:.1f} GFLOP/s ({peak['best']}, "
                     f"{peak['side']}x{peak['side']}, {peak['threads']} threads" + (f"; {others}" if others else "") + ")")
    return "\n".join(lines)
