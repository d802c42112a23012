"""The renal sinus, opened at the hilum and labelled background (anatomy version 5).

KiTS19's kidney labels mostly fill the sinus: the fat, pelvis and vessels that lie in the kidney's concave
medial side. The masks qnkit is measured against leave it out: TotalSegmentator's (the validation CT's labels),
expert masks made for dosimetry, whose volume of interest is the parenchyma (the pelvis holds urine, not
kidney tissue), and the seed's figures for kidney volume. A model trained on sinus-filled labels fills the sinus
on real CT, which costs up to 0.07 Dice and over-reports each kidney's volume by 10-25 %.

:func:`carve_sinus` turns the sinus of each kidney into tissue of its own: a tube along the kidney's long axis,
inside the parenchyma, that opens through the medial (and somewhat anterior) surface where the renal vessels
and the pelvis leave, as a real hilum does. The renderer paints it as fat with the pelvis (urine, or excreted
contrast) and vessels in it; the kidney label keeps only the parenchyma around it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .atlas import LABEL

#: Fraction of kidneys drawn with a sinus (small or scarred kidneys have little to see).
SINUS_P = 0.9


def carve_sinus(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, spacing: tuple) -> dict:
    """Carve each kidney's sinus in place (``tissue`` -> ``renal_sinus``, ``labels`` -> 0; tumor left whole).

    Layout as :mod:`.anatomy`'s: slices superior->inferior, rows anterior->posterior, columns patient
    right->left. Returns, per side, the fraction of the kidney's former label that became sinus (0.0: none).
    """
    out = {}
    step = np.asarray(spacing, dtype=np.float64)
    for side, medial_columns in (("right", 1.0), ("left", -1.0)):
        draw = rng.random(6)  # drawn for every side, so one side's shape never shifts the other's draws
        whole_idx = np.argwhere((tissue == LABEL[f"kidney_{side}"]) & (labels > 0))
        if len(whole_idx) * float(np.prod(step)) < 30_000.0 or draw[0] >= SINUS_P:
            out[side] = 0.0
            continue
        lo = np.maximum(whole_idx.min(axis=0) - 2, 0)
        hi = whole_idx.max(axis=0) + 3
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        region_t, region_l = tissue[box], labels[box]
        whole = region_l > 0
        whole &= ndi.binary_dilation(region_t == LABEL[f"kidney_{side}"], iterations=1)  # not the other kidney
        sinus = _sinus_mask(whole, step, medial_columns, draw[1:])
        sinus &= region_l == 1
        sinus &= region_t != LABEL["kidney_cyst"]
        region_t[sinus] = LABEL["renal_sinus"]
        region_l[sinus] = 0
        out[side] = round(float(sinus.sum()) / float(whole.sum()), 4)
    return out


def _sinus_mask(whole: np.ndarray, step: np.ndarray, medial_columns: float, u: np.ndarray) -> np.ndarray:
    """The sinus of one kidney mask (its bounding box), from five uniform draws `u`."""
    idx = np.argwhere(whole)
    pts = idx * step
    centre = pts.mean(axis=0)
    rel = pts - centre
    _, vecs = np.linalg.eigh(np.cov(rel.T))
    long_axis = vecs[:, -1]
    tilt = np.deg2rad(10 + 35 * u[0])  # the hilum faces medially and somewhat forwards
    medial = np.array([0.0, -np.sin(tilt), medial_columns * np.cos(tilt)])
    medial -= medial.dot(long_axis) * long_axis
    medial /= np.linalg.norm(medial)
    across = np.cross(long_axis, medial)
    t, s, w = rel @ long_axis, rel @ medial, rel @ across
    half_length = np.quantile(np.abs(t), 0.97)
    medial_reach = np.quantile(s, 0.99)
    half_width = np.quantile(np.abs(w), 0.97)

    length = half_length * (0.5 + 0.25 * u[1])  # the sinus spans the middle half or more of the kidney
    width = half_width * (0.45 + 0.25 * u[2])
    back = -medial_reach * 0.35 * u[3]  # how far lateral of the centre it reaches
    shell = 4.0 + 4.0 * u[4]  # parenchyma (cortex and medulla) kept around it, mm
    tube = (t / length) ** 2 + (w / width) ** 2 < 1.0
    inside = tube & (s > back)
    opening = ((t / (0.8 * length)) ** 2 + (w / (0.8 * width)) ** 2 < 1.0) & (s > medial_reach - 1.5 * shell)

    depth = ndi.distance_transform_edt(whole, sampling=step)[whole]
    keep = inside & ((depth > shell) | opening)
    mask = np.zeros_like(whole)
    mask[tuple(idx[keep].T)] = True
    return mask
