"""The quality verdict (:mod:`qnkit.quality`) against known truth: each kidney's verdict beside its true Dice,
how well the score ranks the kidneys (Spearman), and the scatter plot of the two.

Used by ``qnkit evaluate --quality`` on a run's test cases and by ``benchmarks/quality_calibration.py`` on
the phantoms that choose and check the limits. A good score ranks negatively: the larger the score, the
less a kidney is to be trusted, the lower its Dice should be.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["BAD_DICE", "GOOD_DICE", "labelled_sides", "judged_kidneys", "quality_summary", "describe_summary",
           "render_quality_plot"]

#: The verdict should send a kidney with a Dice below BAD_DICE to check and leave one of at least GOOD_DICE ok
#: (issue 26: on real CT, every kidney below 0.75 gets check, none at 0.90 or above).
BAD_DICE, GOOD_DICE = 0.75, 0.90


def labelled_sides(labels: np.ndarray, ct: np.ndarray, geometry) -> np.ndarray:
    """uint8 sides (1 right, 2 left) of the labels' kidney (tumour included), split at the body's midline as a
    predicted mask is; every labelled voxel is kept (no post-processing of the truth)."""
    from qnkit import postprocess as post
    from qnkit.segment import SegmentOptions

    _, sides = post.kidney_sides((labels > 0).astype(np.uint8), ct, geometry, SegmentOptions(postprocess=False))
    return sides


def judged_kidneys(sides: np.ndarray, truth: np.ndarray, verdicts: dict, voxel_ml: float) -> dict:
    """{"right": kidney, "left": kidney}: each {dice, predicted_ml, true_ml, verdict, score, reasons, signals,
    samples} (verdict None: a labelled kidney that was not found); None where neither the labels nor the
    mask have that side. `verdicts`: :func:`qnkit.quality.kidney_quality`'s."""
    from qnkit.kernels import mask_dice
    from qnkit.postprocess import LEFT, RIGHT

    out = {}
    for side, value in (("right", RIGHT), ("left", LEFT)):
        found, labelled = verdicts.get(side), truth == value
        if found is None and not labelled.any():
            out[side] = None
            continue
        found = found or {}
        out[side] = {"dice": round(float(mask_dice(sides == value, labelled)), 4),
                     "predicted_ml": round(float(np.count_nonzero(sides == value)) * voxel_ml, 3),
                     "true_ml": round(float(np.count_nonzero(labelled)) * voxel_ml, 3),
                     **{k: found.get(k) for k in ("verdict", "score", "reasons", "signals", "samples")}}
    return out


def _rank(values, dice) -> float | None:
    """Spearman of `values` with `dice`; None where it is undefined (fewer than 3 kidneys, a constant)."""
    from qnkit.quality import spearman

    rho = spearman(values, dice)
    return None if math.isnan(rho) else round(rho, 4)


def quality_summary(kidneys: list[dict]) -> dict:
    """Over the kidneys that have a verdict: the Spearman rank correlation of the score and of each signal with
    the true Dice (None for fewer than 3 kidneys or a constant), how many were flagged check, how many with
    Dice < BAD_DICE were flagged and how many with Dice >= GOOD_DICE were not. Labelled kidneys that were
    not found are counted apart (``not_found``)."""
    from qnkit.quality import SIGNALS

    judged = [k for k in kidneys if k.get("verdict") is not None]
    dice = [k["dice"] for k in judged]
    spearman = {"score": _rank([k["score"] for k in judged], dice)}
    for name in SIGNALS:
        pairs = [(k["signals"][name], k["dice"]) for k in judged if name in k["signals"]]
        spearman[name] = _rank([v for v, _ in pairs], [d for _, d in pairs])
    bad = [k for k in judged if k["dice"] < BAD_DICE]
    good = [k for k in judged if k["dice"] >= GOOD_DICE]
    return {"kidneys": len(judged), "not_found": len(kidneys) - len(judged), "spearman": spearman,
            "flagged": sum(k["verdict"] == "check" for k in judged),
            "bad_dice": BAD_DICE, "bad": len(bad), "bad_flagged": sum(k["verdict"] == "check" for k in bad),
            "good_dice": GOOD_DICE, "good": len(good), "good_not_flagged": sum(k["verdict"] == "ok" for k in good)}


def describe_summary(summary: dict) -> str:
    """The console line of :func:`quality_summary`."""
    rho = summary["spearman"]["score"]
    return (f"quality: Spearman(score, Dice) {'n/a' if rho is None else f'{rho:+.3f}'} over {summary['kidneys']} "
            f"kidneys ({summary['flagged']} flagged check); Dice < {summary['bad_dice']:g}: {summary['bad_flagged']}/"
            f"{summary['bad']} flagged; Dice >= {summary['good_dice']:g}: {summary['good_not_flagged']}/"
            f"{summary['good']} not flagged" + (f"; {summary['not_found']} labelled kidney(s) not found"
                                                if summary["not_found"] else ""))


def render_quality_plot(kidneys: list[dict], summary: dict, *, title: str = "") -> bytes:
    """PNG bytes: each judged kidney's quality score (x) against its true Dice (y), ok and check in their colours,
    the verdict's threshold (score 1) as a vertical line, the Spearman in the title. matplotlib's object API on
    the Agg canvas, as :mod:`qnkit.preview`: no pyplot, no global backend."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for verdict, colour in (("ok", "#2a9d3a"), ("check", "#e07b00")):
        chosen = [k for k in kidneys if k.get("verdict") == verdict]
        ax.scatter([k["score"] for k in chosen], [k["dice"] for k in chosen], s=28, color=colour,
                   label=f"{verdict} ({len(chosen)})")
    ax.axvline(1.0, color="#555", linestyle="--", linewidth=1, label="verdict threshold (score 1)")
    ax.axhspan(0, BAD_DICE, color="#e07b00", alpha=0.06, linewidth=0, label=f"Dice < {BAD_DICE:g}")
    ax.set_xlabel("quality score (largest signal / its limit)")
    ax.set_ylabel("true Dice")
    ax.set_xlim(left=0)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    rho = summary["spearman"]["score"]
    heading = f"Spearman(score, Dice) {'n/a' if rho is None else f'{rho:+.3f}'}, {summary['kidneys']} kidneys"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
