"""QuickNAT -> ONNX: batch-norm folding, the torch.onnx (dynamo) export, and graph checks.

Batch norm: QuickNAT's BN comes *before* PReLU -> Conv, and each BN's input is a concatenation
that other layers also read raw, so a BN cannot be folded into the conv that produced its input.
Each eval-mode BN becomes a precomputed per-channel ``y = s*x + t`` (s = gamma/sqrt(var+eps),
t = beta - mean*s, computed in float64): one Mul + one Add, which ONNX Runtime and TensorRT fuse
into a scale layer; no BatchNormalization (with running statistics) is left in the graph.
Where every s > 0 the scale could also move through the block's PReLU (one shared slope, so
positively homogeneous) into the following conv: ``conv(PReLU(s*x + t)) = conv_s(PReLU(x + t/s))``.
``fold_batchnorm(into_conv=True)`` does that, but it is not the default: it is exact in algebra,
yet the changed rounding flips near-tied maxima in the max-pooling windows, which moves values
in the unpooling (a trained tiny model: max |probability diff| 3.6e-3 vs 1.6e-6 for scale+shift).

Export: ``torch.onnx.export(dynamo=True)``, opset 18, weights inline, input ``image``
(batch, C, height, width; C = the network's ``num_channels``, fixed) -> output ``probability``
(batch, 1, height, width; sigmoid applied); batch, height and width
are dynamic (height and width multiples of 16), verified at export time. The mask form of
max-unpooling keeps the graph free of MaxUnpool/ScatterND.

Activation: QuickNAT's PReLU has one slope per dense block, so each PRelu node becomes the same
function as ``LeakyRelu(alpha=slope)``, which ONNX Runtime runs as a vectorised activation
instead of a broadcasting binary op (full-size model, batch 4, INT8: 221 ms -> 33 ms per run).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qnkit.errors import QnkitInputError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "probability"
FORBIDDEN_OPS = ("ScatterND", "ScatterElements", "MaxUnpool", "BatchNormalization")
MAX_SIDE = 4096  # largest height/width the dynamic-shape export promises


class ExportError(QnkitInputError):
    """Export or verification failed; no bundle is written."""


class ChannelAffine(nn.Module):
    """Per-channel ``x * scale + shift`` (``scale`` None -> shift only): a folded eval-mode BatchNorm2d."""

    def __init__(self, scale: torch.Tensor | None, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", None if scale is None else scale.float().reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.float().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.scale is None else x * self.scale) + self.shift


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def fold_batchnorm(model: nn.Module, *, into_conv: bool = False, min_scale: float = 1e-3,
                   max_shift: float = 1e4) -> tuple[nn.Module, dict]:
    """A copy of QuickNAT (eval) with every BatchNorm2d folded; returns (model, counts).

    counts: {"into_conv": n, "scale_shift": m}. With ``into_conv`` a BN goes into its conv when
    all its scales exceed ``min_scale`` and the rescaled shifts stay below ``max_shift`` (FP16-safe).
    """
    from qnkit.nn.quicknat import DenseBlock

    model = copy.deepcopy(model).eval()
    counts = Counter()
    with torch.no_grad():
        for block in model.modules():
            if not isinstance(block, DenseBlock):
                continue
            for i in (1, 2, 3):
                bn, conv = getattr(block, f"batchnorm{i}"), getattr(block, f"conv{i}")
                if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
                    raise ExportError(f"cannot fold {type(bn).__name__} without running statistics")
                s, t = _bn_scale_shift(bn)
                if into_conv and bool((s > min_scale).all()) and float((t / s).abs().max()) < max_shift:
                    conv.weight.copy_((conv.weight.double() * s.reshape(1, -1, 1, 1)).to(conv.weight.dtype))
                    setattr(block, f"batchnorm{i}", ChannelAffine(None, t / s))
                    counts["into_conv"] += 1
                else:
                    setattr(block, f"batchnorm{i}", ChannelAffine(s, t))
                    counts["scale_shift"] += 1
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise ExportError(f"batch norms left after folding: {', '.join(leftover)}")
    return model, dict(counts)


def export_module(module: nn.Module, path: Path, example: torch.Tensor, *, opset: int = OPSET,
                  extra_inputs: dict | None = None) -> dict:
    """Export ``module`` (image -> probability) with dynamic batch/height/width; check the graph.

    ``extra_inputs``: {name: example} of further inputs after the image (forward's parameters of the
    same names), each with the image's dynamic batch as its first dimension (the Monte-Carlo graph's
    dropout masks, :mod:`.mc_dropout`).
    """
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    h16 = torch.export.Dim("h16", min=1, max=MAX_SIDE // 16)
    w16 = torch.export.Dim("w16", min=1, max=MAX_SIDE // 16)
    extra_inputs = dict(extra_inputs or {})
    started = time.perf_counter()
    with torch.no_grad(), _quiet():
        torch.onnx.export(module.eval(), (example, *extra_inputs.values()), str(path), dynamo=True,
                          opset_version=opset, external_data=False, input_names=[INPUT_NAME, *extra_inputs],
                          output_names=[OUTPUT_NAME], verbose=False,
                          dynamic_shapes={"x": {0: batch, 2: 16 * h16, 3: 16 * w16},
                                          **{name: {0: batch} for name in extra_inputs}})
    seconds = time.perf_counter() - started
    graph = onnx.load(str(path))
    _rename_dims(graph)
    _scalar_prelu_to_leaky_relu(graph)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    ops = op_types(graph)
    bad = sorted(set(ops) & set(FORBIDDEN_OPS))
    if bad:
        raise ExportError(f"{path.name} contains {', '.join(bad)} nodes (expected mask unpooling and folded BN)")
    return {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "opset": opset,
            "seconds": round(seconds, 2), "nodes": sum(ops.values()), "op_types": dict(sorted(ops.items()))}


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and log lines (they are not ours to show)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _scalar_prelu_to_leaky_relu(model) -> int:
    """Replace each PRelu whose slope is one constant value by LeakyRelu with that alpha (the same
    function); returns how many were replaced. Unused slope initializers are dropped."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in model.graph.node
                 if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "PRelu":
            continue
        slope_name = node.input[1]
        slope = (numpy_helper.to_array(initializers[slope_name]) if slope_name in initializers
                 else constants.get(slope_name))
        if slope is None or slope.size != 1:
            continue
        node.CopyFrom(helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name,
                                       alpha=float(slope.reshape(-1)[0])))
        replaced += 1
    used = {name for node in model.graph.node for name in node.input}
    for init in [init for init in model.graph.initializer if init.name not in used]:
        model.graph.initializer.remove(init)
    return replaced


def _rename_dims(graph) -> None:
    """Readable dynamic dimension names ("16*h16" -> "height") on the graph's inputs and outputs."""
    names = {"16*h16": "height", "16*w16": "width"}
    for vi in [*graph.graph.input, *graph.graph.output, *graph.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def op_types(graph) -> Counter:
    """Operator counts of an ONNX model (path or ModelProto), subgraphs and functions included."""
    import onnx

    if not isinstance(graph, onnx.ModelProto):
        graph = onnx.load(str(graph), load_external_data=False)
    counts: Counter = Counter()

    def walk(g):
        for node in g.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(graph.graph)
    for fn in graph.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    return counts


def export_fp32(model: nn.Module, path: Path, input_size: tuple[int, int]) -> dict:
    """FP32 ``model.onnx`` of a (logits) QuickNAT: BN folded, mask unpooling, sigmoid output."""
    from qnkit.nn.quicknat import WithSigmoid

    folded, counts = fold_batchnorm(model)
    folded.set_unpool("mask")
    example = torch.rand(2, model.config.num_channels, *input_size)
    info = export_module(WithSigmoid(folded), path, example)
    return {**info, "batchnorm": {"folded_into_conv": counts.get("into_conv", 0),
                                  "scale_shift": counts.get("scale_shift", 0)}}
