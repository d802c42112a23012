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
from .verify import BARS, agreement, check

#: Largest |probability difference| accepted between the MC graph with all-ones masks and ``model.onnx``
#: (the same arithmetic: in practice 0).
MC_MAX_ABS_DIFF = 2e-3
#: Drawn masks against the eager network are held to the plain FP32 graph's bar (qnkit.verification.BARS["fp32"]:
#: 99th percentile of the |difference|, mask Dice), not to a maximum: max-unpooling puts each value where its
#: encoder's maximum was, so where two encoder values nearly tie, the different summation orders of ONNX
#: Runtime's and PyTorch's kernels move a few isolated pixels (the shipped kidney-synth: 9e-3 at most, with p99
#: far below 1e-3).


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
    example = torch.rand(2, cfg.num_channels, *input_size)
    keep = torch.ones(2, folded.dropout_sites, cfg.num_filters)
    info = export_module(MonteCarloQuickNAT(folded), path, example, extra_inputs={KEEP_INPUT: keep})
    return {**info, "dropout_keep": {"shape": ["batch", folded.dropout_sites, cfg.num_filters],
                                     "drop_probability": cfg.drop_out}}


def verify_mc(model: nn.Module, mc_path: Path, plain_path: Path, x: np.ndarray, *, seed: int = 0) -> dict:
    """Compare ``model.mc.onnx`` on ONNX Runtime with all-ones masks against ``model.onnx``, and with
    masks drawn from ``seed`` against the eager network given the same masks; raises ExportError when the
    first differs by more than :data:`MC_MAX_ABS_DIFF` or the second misses the plain FP32 graph's bar."""
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
    figures = agreement(eager, mc.run(None, {"image": x, KEEP_INPUT: keep})[0], threshold=0.5)
    why = check("fp32", figures)
    record = {"runtime": "onnxruntime CPU", "dropout_off_vs_plain_max_abs_diff": float(off.max()),
              "sampled_vs_eager_max_abs_diff": figures["max_abs_diff"],
              "sampled_vs_eager_p99_abs_diff": figures["p99_abs_diff"], "sampled_vs_eager_dice": figures["dice"],
              "bar": {"dropout_off_max_abs_diff": MC_MAX_ABS_DIFF, **BARS["fp32"]}}
    record["passed"] = bool(off.max() <= MC_MAX_ABS_DIFF and why is None)
    if not record["passed"]:
        raise ExportError(f"verification failed: {mc_path.name} differs from its references "
                          f"(dropout off vs {plain_path.name}: max {off.max():.2e}; sampled vs eager: "
                          f"{why or 'within the bar'}); no bundle written")
    return record


def add_mc_graph(bundle_dir: str | Path, *, slices: int = 8, seed: int = 0) -> dict:
    """Add ``model.mc.onnx`` to an exported bundle that lacks it (one exported before the graph existed) and
    seal the bundle again: the graph is made from the bundle's own verified weights and checked like
    ``qnkit export`` checks it (:func:`verify_mc`, on `slices` of export's synthetic CT slices on its input grid); only the new
    artefact, its export and verification records and the manifest change. Returns the verification record."""
    from qnkit.backends.torch_backend import bundle_network
    from qnkit.bundle import FP32_ONNX, MC_ONNX, load_bundle
    from qnkit.inference import model_context
    from qnkit.verification import synthetic_slices

    from .bundle_writer import artefact_record, reseal

    bundle = load_bundle(bundle_dir)  # every artefact's hash checked first
    folder = Path(bundle_dir)
    if bundle.has(MC_ONNX):
        raise ExportError(f"{folder}: the bundle already has {MC_ONNX}")
    drop_out = bundle.network.get("drop_out", 0)
    if drop_out <= 0:
        raise ExportError(f"{folder}: the network has no dropout (drop_out {drop_out}): nothing to sample")
    model = bundle_network(bundle)
    hw = bundle.input_size
    # what export verifies on: CT-like slices, not white noise
    x, _ = synthetic_slices(hw, bundle.hu_window, context=model_context(bundle))
    x = x[np.linspace(0, len(x) - 1, min(slices, len(x))).round().astype(int)]
    path = folder / MC_ONNX
    try:
        info = export_mc(model, path, hw)
        record = verify_mc(model, path, folder / FP32_ONNX, x, seed=seed)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    metadata = dict(bundle.metadata)
    metadata["export"] = {**metadata.get("export", {}), "mc": {**info, "added_after_export": True}}
    metadata["verification"] = {**metadata.get("verification", {}), "mc": record}
    metadata["artefacts"] = {**metadata["artefacts"], MC_ONNX: artefact_record(path)}
    reseal(folder, metadata)
    return record


def main(argv=None) -> int:
    """``python -m qnkit.export.mc_dropout BUNDLE``: :func:`add_mc_graph`."""
    import argparse
    import sys

    from qnkit.bundle import BundleError

    parser = argparse.ArgumentParser(description="Add model.mc.onnx (Monte-Carlo dropout) to an exported bundle.")
    parser.add_argument("bundle", type=Path)
    args = parser.parse_args(argv)
    try:
        record = add_mc_graph(args.bundle)
    except (ExportError, BundleError, FileNotFoundError) as exc:
        print(f"qnkit: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"{args.bundle}: model.mc.onnx added (dropout off vs model.onnx {record['dropout_off_vs_plain_max_abs_diff']:.1e}, "
          f"sampled vs eager p99 {record['sampled_vs_eager_p99_abs_diff']:.1e}, mask Dice {record['sampled_vs_eager_dice']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
