"""Per-kidney quality signals and the verdict ``ok`` / ``check``: when a mask should not be trusted.

Signals, each a number per kidney where larger means less trustworthy (:func:`kidney_signals`):

- ``mc_disagreement``: 1 - mean pairwise Dice of the Monte-Carlo dropout samples' masks (Bayesian
  QuickNAT's structure-wise agreement, Roy et al. 2019); ``mc_volume_cv``: coefficient of variation
  of their volumes. Dropout alone misses a confidently wrong kidney (issue 26's probe: a kidney that
  swallowed a mass got CV 0.015), hence the other signals.
- ``mirror_disagreement``: 1 - Dice between the mask and the test-time mirror pass's mask.
- ``volume_implausibility``: how far the volume lies outside adult kidneys' 80-300 mL, as a ratio
  (max(80/V, V/300); 1 inside the range).
- ``hu_spread``: inter-quartile range of the CT under the mask (HU): a kidney is one enhancing
  parenchyma (or one unenhanced one); spleen, a mass or bowel taken in widen it.
- ``second_lump``: after eroding the mask by 5 mm, the share of the second-largest lump in the two
  largest: a mass or spleen glued to the kidney by a thin bridge separates.
- ``concavity``: 1 - solidity (volume / convex hull volume).
- ``at_edge``: 1 when the kidney touches the volume's edge (a truncated field of view), else 0.

The verdict compares each signal with its calibrated limit (``score`` = the largest ratio
signal / limit; ``check`` when the score exceeds 1, with the signals that did as the reason); a signal
whose limit is null is reported but not judged (the calibration found it does not rank kidneys). Limits
come from the bundle's ``qnkit.json`` ("quality", written by ``qnkit export``); a bundle without them
uses :data:`DEFAULT_CALIBRATION` and the result says so.
"""
from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi

from qnkit.postprocess import LEFT, RIGHT, ball, bounding_box

__all__ = ["SIGNALS", "DEFAULT_CALIBRATION", "calibration_of", "check_calibration", "kidney_signals", "verdict", "kidney_quality",
           "describe_quality", "spearman"]

ADULT_KIDNEY_ML = (80.0, 300.0)
ERODE_MM = 5.0
SIGNALS = ("mc_disagreement", "mc_volume_cv", "mirror_disagreement", "volume_implausibility", "hu_spread",
           "second_lump", "concavity", "at_edge")
#: Words for a reason line.
REASONS = {"mc_disagreement": "dropout samples disagree", "mc_volume_cv": "dropout samples' volumes vary",
           "mirror_disagreement": "mirror pass disagrees", "volume_implausibility": "volume outside 80-300 mL",
           "hu_spread": "mixed tissue under the mask", "second_lump": "a second lump glued to the kidney",
           "concavity": "irregular shape", "at_edge": "touches the volume's edge"}

#: Limits used when a bundle records none: starting values, not fitted to any model's data (the shipped
#: kidney-synth carries its own, fitted on phantoms: resume/kidney-synth/quality-calibration.json). Fit them for
#: a model with benchmarks/quality_calibration.py and export with the result ("chosen_on" then says on what).
DEFAULT_CALIBRATION = {
    "limits": {"mc_disagreement": 0.08, "mc_volume_cv": 0.08, "mirror_disagreement": 0.15,
               "volume_implausibility": 1.0, "hu_spread": 120.0, "second_lump": 0.25, "concavity": 0.45,
               "at_edge": 0.5},
    "chosen_on": "qnkit default (not calibrated for this bundle)",
}


def calibration_of(bundle) -> tuple[dict, str]:
    """(calibration, source): the bundle's ``qnkit.json`` "quality" record, else :data:`DEFAULT_CALIBRATION`
    with source "default: the bundle records no calibration"."""
    metadata = getattr(bundle, "metadata", None) or {}
    record = metadata.get("quality")
    if isinstance(record, dict) and isinstance(record.get("limits"), dict):
        return record, "bundle"
    return DEFAULT_CALIBRATION, "default: the bundle records no calibration"


def check_calibration(record) -> None:
    """QnkitInputError unless `record` has a "limits" object with, for each of :data:`SIGNALS`, a positive
    number or null (a signal reported but left out of the verdict), and at least one number."""
    from qnkit.errors import QnkitInputError

    limits = record.get("limits") if isinstance(record, dict) else None
    if not isinstance(limits, dict):
        raise QnkitInputError("the quality calibration has no \"limits\" object")
    bad = [k for k in SIGNALS if k not in limits or not (limits[k] is None or (
        isinstance(limits[k], (int, float)) and not isinstance(limits[k], bool) and limits[k] > 0))]
    if bad:
        raise QnkitInputError(f"no positive limit (or null) for {', '.join(bad)}")
    if all(limits[k] is None for k in SIGNALS):
        raise QnkitInputError("every quality limit is null: nothing would ever be judged")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _second_lump(kidney: np.ndarray, spacing) -> float:
    eroded = ndi.binary_erosion(kidney, structure=ball(ERODE_MM, spacing))
    if not eroded.any():
        return 0.0
    counts = np.sort(np.bincount(cc3d.connected_components(eroded.view(np.uint8), connectivity=26).ravel())[1:])
    if len(counts) < 2:
        return 0.0
    return float(counts[-2] / (counts[-1] + counts[-2]))


def _concavity(kidney: np.ndarray, spacing) -> float:
    from scipy.spatial import ConvexHull, QhullError

    surface = kidney & ~ndi.binary_erosion(kidney)
    points = np.argwhere(surface).astype(np.float64) * np.asarray(spacing, np.float64)
    if len(points) < 8:
        return 0.0
    offsets = np.array([[a, b, c] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5)]) * np.asarray(spacing)
    try:
        hull = ConvexHull((points[:, None, :] + offsets[None]).reshape(-1, 3))
    except QhullError:
        return 0.0
    volume = float(kidney.sum()) * float(np.prod(spacing))
    return float(max(0.0, 1.0 - volume / hull.volume))


def kidney_signals(sides: np.ndarray, ct: np.ndarray, spacing, samples=None) -> dict:
    """{"right": {...}, "left": {...}}: the signals of each found kidney (None for an absent side).

    `sides` internal layout (1 right, 2 left), `spacing` (z, y, x) mm, `samples` a
    :class:`qnkit.uncertainty.KidneySamples` (None: the model-free signals only).
    """
    out = {}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for name, value, other in (("right", RIGHT, LEFT), ("left", LEFT, RIGHT)):
        if not (sides == value).any():
            out[name] = None
            continue
        box = bounding_box(sides == value)
        kidney = sides[box] == value
        hu = ct[box][kidney].astype(np.float32)
        q25, q75 = np.percentile(hu, [25, 75])
        volume = float(kidney.sum()) * voxel_ml
        edge = any(b.start == 0 or b.stop == n for b, n in zip(box, sides.shape))
        signals = {"volume_implausibility": max(ADULT_KIDNEY_ML[0] / volume, volume / ADULT_KIDNEY_ML[1], 1.0),
                   "hu_spread": float(q75 - q25), "second_lump": _second_lump(kidney, spacing),
                   "concavity": _concavity(kidney, spacing), "at_edge": 1.0 if edge else 0.0}
        if samples is not None:
            signals.update(_sampled(sides, value, other, spacing, samples))
        out[name] = {k: round(float(v), 4) for k, v in signals.items()}
    return out


def _sampled(sides: np.ndarray, value: int, other: int, spacing, samples) -> dict:
    """The sample-based signals of one kidney: its box in the samples' box, grown by the sampling margin."""
    from qnkit.uncertainty import BOX_MARGIN_MM

    local = sides[samples.box]
    pad = [int(np.ceil(BOX_MARGIN_MM / float(s))) for s in spacing]
    region = bounding_box(local == value, pad=pad)
    kidney = local[region] == value
    allowed = local[region] != other  # the other kidney is not this one's disagreement
    mirror = samples.mirror[region].astype(bool) & allowed
    signals = {"mirror_disagreement": 1.0 - _dice(kidney, mirror)}
    if samples.count >= 2:
        drawn = [samples.samples[k][region].astype(bool) & allowed for k in range(samples.count)]
        pairs = [_dice(drawn[i], drawn[j]) for i in range(len(drawn)) for j in range(i + 1, len(drawn))]
        volumes = np.array([d.sum() for d in drawn], np.float64)
        signals["mc_disagreement"] = 1.0 - float(np.mean(pairs))
        signals["mc_volume_cv"] = float(volumes.std() / volumes.mean()) if volumes.mean() > 0 else 1.0
    return signals


def verdict(signals: dict, calibration: dict) -> dict:
    """{"verdict": "ok"|"check", "score": largest signal/limit ratio, "reasons": [...]} for one kidney."""
    limits = calibration["limits"]
    ratios = {k: signals[k] / limits[k] for k in SIGNALS if k in signals and limits.get(k)}
    score = max(ratios.values(), default=0.0)
    reasons = [f"{REASONS[k]} ({k} {signals[k]:g} > {limits[k]:g})" for k, r in
               sorted(ratios.items(), key=lambda kv: -kv[1]) if r > 1.0]
    return {"verdict": "check" if reasons else "ok", "score": round(float(score), 4), "reasons": reasons}


def kidney_quality(sides: np.ndarray, ct: np.ndarray, spacing, samples, calibration: dict, source: str) -> dict:
    """Per side: {"verdict", "score", "reasons", "signals", "calibration"} (None for an absent side)."""
    out = {}
    for name, signals in kidney_signals(sides, ct, spacing, samples).items():
        if signals is None:
            out[name] = None
            continue
        out[name] = {**verdict(signals, calibration), "signals": signals,
                     "samples": 0 if samples is None else samples.count, "calibration": source}
    return out


def describe_quality(quality: dict | None) -> str:
    """'right ok (0.41), left CHECK (1.8: volume outside 80-300 mL)' for console lines."""
    if not quality:
        return ""
    parts = []
    for name in ("right", "left"):
        q = quality.get(name)
        if q is None:
            continue
        if q["verdict"] == "ok":
            parts.append(f"{name} ok ({q['score']:.2f})")
        else:
            why = "; ".join(r.split(" (")[0] for r in q["reasons"])
            parts.append(f"{name} CHECK ({q['score']:.2f}: {why})")
    return ", ".join(parts)


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get their mean rank); nan for fewer than 3 pairs or a constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)
