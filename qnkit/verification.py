"""Verification of exported graphs and TensorRT engines against a reference, on synthetic kidney slices.

`qnkit export` checks every graph against the eager model; the TensorRT backend checks an engine it
rebuilt at run time (for another GPU, TensorRT version or input size) against the bundle's FP32
ONNX on ONNX Runtime's CPU provider, with the same slices, grids and bars, before it runs it. So
this lives in the runtime (torch-free), and export imports it from here.

Slices come from :func:`qnkit.synth.make_case` phantoms (two kidneys, tumors, KiTS-like HU)
preprocessed exactly as at inference (``kernels.downsample_image`` with the bundle's HU window, a
2.5-D model's context planes by :func:`qnkit.inference.model_input_slices`, zero-padded
bottom/right to the model grid), taken around the kidneys so that the masks being
compared are not empty. Figures: max/mean absolute difference of probabilities and the Dice
agreement of the thresholded masks (eager mask as reference, pixels pooled over all slices).
The bars (FP32: Dice >= 0.999 and the 99th percentile of |diff| <= 1e-3; FP16: Dice >= 0.99)
are enforced; INT8 is informational unless its Dice falls below 0.5. The maximum and the 99.9th
percentile of |diff| are recorded, not enforced: max pooling makes QuickNAT discontinuous, so a
last-bit rounding difference can flip which of two near-equal values wins a window and move a
value in the unpooling, and the following 5x5 convolutions spread it over a patch. The wider the
network, the more windows and the more flips: a trained 64-filter model exported to ONNX Runtime
had 15 of 98,304 probabilities off by more than 1e-2 (max 5.3e-2, 99.9th percentile 2.3e-3,
99th 1.6e-5, no mask pixel changed), where a wrong graph moves most pixels. With an untrained
network the figures say little, and the record says so.
"""
from __future__ import annotations

import numpy as np

from qnkit import kernels

BARS = {"fp32": {"min_dice": 0.999, "p99_abs_diff": 1e-3}, "fp16": {"min_dice": 0.99}, "int8": {"min_dice": 0.5}}


def _fit(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Crop or zero-pad (Z, ..., H, W) at the bottom/right to (Z, ..., h, w)."""
    h, w = hw
    out = np.zeros((*x.shape[:-2], h, w), dtype=x.dtype)
    hh, ww = min(h, x.shape[-2]), min(w, x.shape[-1])
    out[..., :hh, :ww] = x[..., :hh, :ww]
    return out


def synthetic_slices(input_size: tuple[int, int], hu_window: tuple[float, float], *, cases: int = 2,
                     seed: int = 20240, per_case: int = 12, context=(1, None)) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N,C,h,w) in [0,1], labels uint8 (N,1,h,w)) around the kidneys of ``cases`` phantoms;
    C = 1, or a 2.5-D model's context planes (`context`: :func:`qnkit.inference.model_context`)."""
    from qnkit.inference import model_input_slices
    from qnkit.synth import make_case

    size = 2 * max(input_size)
    images, labels = [], []
    for index in range(cases):
        case = make_case(index, size=size, seed=seed)
        span = kernels.kidney_slice_range(case.segmentation, margin=2) or (0, len(case.segmentation))
        picks = np.unique(np.linspace(span[0], span[1] - 1, per_case).round().astype(int))
        image = model_input_slices(case.imaging, picks, hu_window=hu_window, spacing_hw=None, model_spacing=None,
                                   slice_mm=float(np.linalg.norm(case.affine[:3, 0])), context=context)
        images.append(_fit(image if image.ndim == 4 else image[:, None], input_size))
        # informational only: nearest 2x subsampling of the labels (kidney + tumor)
        labels.append(_fit((case.segmentation[picks, ::2, ::2] > 0).astype(np.uint8), input_size))
    return np.concatenate(images), np.concatenate(labels)[:, None]


def agreement(reference: np.ndarray, other: np.ndarray, threshold: float) -> dict:
    """Probability differences and mask Dice agreement of ``other`` against ``reference``."""
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    ref_mask = (reference > threshold).astype(np.uint8)
    return {"max_abs_diff": float(diff.max()), "p999_abs_diff": float(np.quantile(diff, 0.999)),
            "p99_abs_diff": float(np.quantile(diff, 0.99)),
            "mean_abs_diff": float(diff.mean()),
            "dice": float(kernels.dice(np.ascontiguousarray(other, dtype=np.float32), ref_mask, threshold=threshold)),
            "pixels_differing": int(((other > threshold) != ref_mask.astype(bool)).sum()),
            "foreground_pixels": int(ref_mask.sum())}


def check(kind: str, figures: dict) -> str | None:
    """Why ``figures`` miss the bar for ``kind`` (fp32 | fp16 | int8), or None."""
    bar = BARS[kind]
    if figures["dice"] < bar["min_dice"]:
        return f"{kind} mask Dice agreement with the reference {figures['dice']:.5f} < {bar['min_dice']}"
    if "p99_abs_diff" in bar and figures["p99_abs_diff"] > bar["p99_abs_diff"]:
        return (f"{kind} |probability difference| vs the reference: 99th percentile {figures['p99_abs_diff']:.2e} "
                f"> {bar['p99_abs_diff']}")
    return None


def batched(predict, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
    return np.concatenate([predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def context(eager: np.ndarray, labels: np.ndarray, threshold: float, trained: bool) -> dict:
    """How meaningful the agreement figures are: eager mask size and its Dice with the phantom labels."""
    fg = int((eager > threshold).sum())
    note = []
    if not trained:
        note.append("weights are untrained (random initialisation): agreement figures say little")
    if fg == 0 or fg == eager.size:
        note.append("the eager mask is " + ("empty" if fg == 0 else "full") + ": Dice agreement is trivial")
    return {"slices": int(len(eager)), "eager_foreground_pixels": fg,
            "eager_dice_vs_labels": float(kernels.dice(np.ascontiguousarray(eager), labels, threshold=threshold)),
            "trained": trained, "note": "; ".join(note) or "trained weights; masks are non-trivial"}


def verification_grids(x: np.ndarray, divisor: int) -> dict[str, np.ndarray]:
    """The slices ``x`` (N, C, h, w) on three grids: as given, one divisor step smaller each way
    (cropped) and larger (zero-padded by one step in h and two in w), so that an engine is seen
    to compute the same on inputs smaller and larger than the export size."""
    n, c, h, w = x.shape
    d = int(divisor)
    grids = {"export": x}
    if h > d and w > d:
        grids["smaller"] = np.ascontiguousarray(x[:, :, :h - d, :w - d])
    larger = np.zeros((n, c, h + d, w + 2 * d), dtype=x.dtype)
    larger[:, :, :h, :w] = x
    grids["larger"] = larger
    return grids


def verify_engine(predict, reference, x: np.ndarray, *, precision: str, threshold: float,
                  divisor: int) -> tuple[dict, str | None]:
    """(figures per grid, why it fails or None): ``predict`` against ``reference`` (both callables on
    (N, C, h, w) float32 slices) on :func:`verification_grids`, each held to ``BARS[precision]``."""
    figures, why = {}, None
    for name, grid in verification_grids(x, divisor).items():
        figures[name] = {"shape": list(grid.shape[2:]),
                         **agreement(batched(reference, grid), batched(predict, grid), threshold)}
        failed = check(precision, figures[name])
        figures[name]["passed"] = failed is None
        if failed and why is None:
            why = f"{failed} on the {grid.shape[2]}x{grid.shape[3]} grid"
    figures["bar"], figures["passed"] = BARS[precision], why is None
    return figures, why
