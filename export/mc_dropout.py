"""The Monte-Carlo dropout graph ``model.mc.onnx``: QuickNAT with its Dropout2d masks as an input.

Bayesian QuickNAT (Roy et al., NeuroImage 2019) keeps dropout on at test time and draws several
predictions. Random operators in an ONNX graph (RandomUniformLike) draw from each runtime's own
generator, so ONNX Runtime, TensorRT and PyTorch would never draw the same sample for one seed. Here
the masks are a second input, ``dropout_keep`` float32 (N, 8, num_filters): for each slice, each of
the eight dense blocks that end in Dropout2d (4 encoders, then the 4 decoders deepest first) and
each channel, 0 (dropped) or 1/(1-p) (kept), exactly Dropout2d's mask. The runtime draws them with
numpy from a seed (:func:`qnkit.uncertainty.draw_keep`), so every backend computes the same samples;
all ones is the eval-mode network, i.e. ``model.onnx``.

Verified at export like the other graphs: all-ones masks against ``model.onnx`` and drawn masks
against the eager network given the same masks, both on ONNX Runtime CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qnkit.uncertainty import KEEP_INPUT, draw_keep

from .onnx_export import ExportError, export_module, fold_batchnorm

#: Largest |probability difference| accepted between the MC graph and its references (FP32 on the CPU;
#: the plain graph's own bar against eager is 1e-3 at p99).
MC_MAX_ABS_DIFF = 2e-3


class MonteCarloQuickNAT(nn.Module):
    """``(image, dropout_keep) -> probability``: a logits QuickNAT with its dropout masks as an input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, dropout_keep: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x, dropout_keep))


def export_mc(model: nn.Module, path: Path, input_size: tuple[int, int]) -> dict:
    """Write ``model.mc.onnx`` for a (logits, eval) QuickNAT: BN folded as in ``model.onnx``, mask unpooling."""
    folded, _ = fold_batchnorm(model)
    folded.set_unpool("mask")
    cfg = model.config
    example = torch.rand(2, 1, *input_size)
    keep = torch.ones(2, folded.dropout_sites, cfg.num_filters)
    info = export_module(MonteCarloQuickNAT(folded), path, example, extra_inputs={KEEP_INPUT: keep})
    return {**info, "dropout_keep": {"shape": ["batch", folded.dropout_sites, cfg.num_filters],
                                     "drop_probability": cfg.drop_out}}


def verify_mc(model: nn.Module, mc_path: Path, plain_path: Path, x: np.ndarray, *, seed: int = 0) -> dict:
    """Compare ``model.mc.onnx`` on ONNX Runtime with all-ones masks against ``model.onnx``, and with
    masks drawn from ``seed`` against the eager network given the same masks; raises ExportError when
    either differs by more than :data:`MC_MAX_ABS_DIFF`."""
    import onnxruntime as ort

    cfg = model.config
    sites = len(model.encoders) + len(model.decoders)
    plain = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"])
    mc = ort.InferenceSession(str(mc_path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    ones = np.ones((len(x), sites, cfg.num_filters), np.float32)
    off = np.abs(mc.run(None, {"image": x, KEEP_INPUT: ones})[0] - plain.run(None, {"image": x})[0])
    keep = draw_keep(np.random.default_rng(seed), len(x), sites, cfg.num_filters, cfg.drop_out)
    with torch.no_grad():
        eager = torch.sigmoid(model.eval()(torch.from_numpy(x), torch.from_numpy(keep))).numpy()
    on = np.abs(mc.run(None, {"image": x, KEEP_INPUT: keep})[0] - eager)
    record = {"runtime": "onnxruntime CPU", "dropout_off_vs_plain_max_abs_diff": float(off.max()),
              "sampled_vs_eager_max_abs_diff": float(on.max()), "bar_max_abs_diff": MC_MAX_ABS_DIFF}
    record["passed"] = bool(off.max() <= MC_MAX_ABS_DIFF and on.max() <= MC_MAX_ABS_DIFF)
    if not record["passed"]:
        raise ExportError(f"verification failed: {mc_path.name} differs from its references "
                          f"(dropout off vs {plain_path.name}: {off.max():.2e}; sampled vs eager: {on.max():.2e}); "
                          f"no bundle written")
    return record
