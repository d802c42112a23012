"""What leaves the kidney at its hilum: renal vein, renal artery, pelvis and ureter (anatomy version 6), and the
pelvis inside the sinus (version 7).

Real CTs show, at every kidney's medial side, tubes of soft tissue or water that start where the parenchyma
opens: the renal vein running to the inferior vena cava (the left one in front of the aorta), the renal
artery behind it from the aorta, and the renal pelvis, often bulging outside the kidney, narrowing into the
ureter that runs down along the psoas. None of it is kidney in the masks qnkit is measured against, and
unenhanced the vein and pelvis lie within a few tens of HU of the parenchyma. The atlas has none of them
(TotalSegmentator's masks stop at the aorta and the vena cava), so a network trained on earlier versions
never saw such a tube beside a kidney and takes it in: the hilum's structures are drawn here as tissue of
their own, labelled background.

Layout as :mod:`.anatomy`'s: slices superior->inferior, rows anterior->posterior, columns patient right->left.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .atlas import LABEL

#: How often each structure is drawn for a kidney (a ureter is hidden by bowel or collapsed in some scans).
VEIN_P, ARTERY_P, URETER_P, EXTRARENAL_PELVIS_P = 0.95, 0.85, 0.85, 0.45


def add_hilar_structures(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, spacing: tuple) -> dict:
    """Draw each kidney's renal vein, renal artery, pelvis and ureter into `tissue`, in place.

    `labels` is read only: every voxel painted has KiTS label 0 and stays 0. Returns, per side, the
    volume (mL) of each structure drawn.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    out = {}
    for side, medial in (("right", 1.0), ("left", -1.0)):
        draw = rng.random(8)  # drawn for every side, so one side's anatomy never shifts the other's draws
        kidney = (tissue == LABEL[f"kidney_{side}"]) & (labels > 0)
        if kidney.sum() * float(np.prod(sp)) < 20_000.0:
            out[side] = {}
            continue
        hilum = _hilum_point(tissue, _largest_part(kidney), sp, medial)
        record = {}
        level = (hilum[0] - 12.0 / sp[0], hilum[0] + 12.0 / sp[0])
        ivc = _nearest_in_slab(tissue == LABEL["vein"], hilum, sp, level)
        aorta = _nearest_in_slab(tissue == LABEL["artery"], hilum, sp, level)
        if ivc is not None and draw[0] < VEIN_P:
            radius = (3.5 if side == "right" else 4.0) + 2.5 * draw[1]
            via = None
            if side == "left" and aorta is not None:  # in front of the aorta, between it and the gut
                via = aorta + np.array([0.0, -(12.0 + radius) / sp[1], 0.0])
            path = _curve(hilum, ivc, via, sp)
            record["vein_ml"] = _paint_tube(tissue, labels, path, radius, sp, LABEL["vein"])
        if aorta is not None and draw[2] < ARTERY_P:
            start = hilum + np.array([0.0, 6.0 / sp[1], 0.0])  # behind the vein
            record["artery_ml"] = _paint_tube(tissue, labels, _curve(start, aorta, None, sp), 2.0 + 1.5 * draw[3], sp,
                                              LABEL["artery"])
        if draw[4] < URETER_P:
            record["ureter_ml"] = _draw_ureter(tissue, labels, hilum, sp, medial, draw[5], draw[6] < EXTRARENAL_PELVIS_P,
                                               draw[7])
        out[side] = {k: v for k, v in record.items() if v > 0}
    return out


#: How often a kidney's pelvis fills part of its sinus with urine (anatomy version 7), and the share of the sinus it
#: takes (the part nearest the hilum): from a slim pelvis among the sinus fat to a full, prominent one.
PELVIS_P, PELVIS_SHARE = 0.85, (0.2, 0.9)


def fill_pelvis(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, spacing: tuple) -> dict:
    """Turn the part of each kidney's carved sinus nearest its hilum into the renal pelvis (``renal_pelvis``,
    painted as urine), in place; return, per side, the share of the sinus it took (0.0: none).

    Anatomy version 5 paints a sinus mostly as fat, with urine in random patches; a real sinus holds the pelvis
    at its mouth, water-dense unenhanced (within a few tens of HU of the parenchyma) and bright in the excretory
    phase, and at 3 mm its fat is partial-volumed with it. A network that met only fat there takes such a sinus
    into the kidney. `labels` is read only (the sinus is background already).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    out = {}
    sinus_all = tissue == LABEL["renal_sinus"]
    for side, medial in (("right", 1.0), ("left", -1.0)):
        draw = rng.random(2)
        kidney = _largest_part((tissue == LABEL[f"kidney_{side}"]) & (labels > 0))
        if not kidney.any() or not sinus_all.any() or draw[0] >= PELVIS_P:
            out[side] = 0.0
            continue
        idx = np.argwhere(kidney)
        lo, hi = np.maximum(idx.min(axis=0) - 3, 0), idx.max(axis=0) + 4
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        parts, _ = ndi.label(sinus_all[box])
        touching = np.unique(parts[ndi.binary_dilation(kidney[box], iterations=2) & (parts > 0)])
        sinus = np.isin(parts, touching[touching > 0])  # this kidney's sinus, not the other's should boxes overlap
        if sinus.sum() < 10:
            out[side] = 0.0
            continue
        hilum = _hilum_point(tissue, kidney, sp, medial) - lo
        where = np.argwhere(sinus)
        distance = np.sqrt((((where - hilum) * sp) ** 2).sum(axis=1))
        share = PELVIS_SHARE[0] + (PELVIS_SHARE[1] - PELVIS_SHARE[0]) * draw[1]
        pelvis = where[distance <= np.quantile(distance, share)]
        tissue[box][tuple(pelvis.T)] = LABEL["renal_pelvis"]
        out[side] = round(len(pelvis) / len(where), 3)
    return out


def _hilum_point(tissue: np.ndarray, kidney: np.ndarray, sp: np.ndarray, medial: float) -> np.ndarray:
    """Where the vessels and pelvis leave the kidney (voxel coordinates, float): the middle of the carved sinus's
    mouth, or without a sinus the kidney's most medial voxel near its mid-height, a little in front."""
    idx = np.argwhere(kidney)
    lo, hi = np.maximum(idx.min(axis=0) - 3, 0), idx.max(axis=0) + 4
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    own = ndi.binary_dilation(kidney[box], iterations=2)  # not the other kidney's sinus, should boxes overlap
    mouth = (tissue[box] == LABEL["renal_sinus"]) & own & ndi.binary_dilation(tissue[box] == LABEL["body"])
    if mouth.sum() >= 3:
        return np.argwhere(mouth).mean(axis=0) + lo
    centre = idx.mean(axis=0)
    mid = idx[np.abs(idx[:, 0] - centre[0]) * sp[0] <= 10.0]
    score = medial * mid[:, 2] * sp[2] - 0.3 * mid[:, 1] * sp[1]
    return mid[int(np.argmax(score))].astype(np.float64)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of `mask` (a kidney's label can touch the other's where two placed kidneys meet)."""
    parts, n = ndi.label(mask)
    if n <= 1:
        return mask
    return parts == int(np.argmax(np.bincount(parts.ravel())[1:])) + 1


def _nearest_in_slab(mask: np.ndarray, point: np.ndarray, sp: np.ndarray, level: tuple) -> np.ndarray | None:
    """The voxel of `mask` nearest `point` among the slices within `level`, or None."""
    z0, z1 = max(0, int(np.floor(level[0]))), min(mask.shape[0], int(np.ceil(level[1])) + 1)
    idx = np.argwhere(mask[z0:z1])
    if len(idx) == 0:
        return None
    idx[:, 0] += z0
    d = (((idx - point) * sp) ** 2).sum(axis=1)
    return idx[int(np.argmin(d))].astype(np.float64)


def _curve(start: np.ndarray, end: np.ndarray, via: np.ndarray | None, sp: np.ndarray) -> np.ndarray:
    """Points (voxel coordinates) about every half voxel along a quadratic Bezier from `start` to `end` that
    passes through `via` halfway (a straight line without it)."""
    control = (start + end) / 2 if via is None else 2 * via - (start + end) / 2
    length = (np.linalg.norm((control - start) * sp) + np.linalg.norm((end - control) * sp))
    t = np.linspace(0.0, 1.0, max(2, int(np.ceil(2 * length / sp.min()))))[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def _paint_tube(tissue: np.ndarray, labels: np.ndarray, path: np.ndarray, radius: float, sp: np.ndarray,
                value: int) -> float:
    """Paint voxels within `radius` mm of `path` with `value` where the tissue is unlabelled fat (``body``; inside
    the sinus the renderer draws its own vessels and pelvis) and the KiTS label is 0; return the volume painted (mL)."""
    reach = np.ceil(radius / sp).astype(int) + 1
    lo = np.maximum(np.floor(path.min(axis=0)).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(path.max(axis=0)).astype(int) + reach + 1, tissue.shape)
    if np.any(hi <= lo):
        return 0.0
    centre = np.zeros(tuple(hi - lo), dtype=bool)
    pts = np.rint(path).astype(int) - lo
    pts = pts[np.all((pts >= 0) & (pts < centre.shape), axis=1)]
    if len(pts) == 0:
        return 0.0
    centre[tuple(pts.T)] = True
    near = ndi.distance_transform_edt(~centre, sampling=sp) <= radius
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    region = tissue[box]
    painted = near & (region == LABEL["body"]) & (labels[box] == 0)
    region[painted] = value
    return round(float(painted.sum()) * float(np.prod(sp)) / 1000.0, 2)


def _draw_ureter(tissue: np.ndarray, labels: np.ndarray, hilum: np.ndarray, sp: np.ndarray, medial: float, u: float,
                 pelvis: bool, v: float) -> float:
    """The pelvis (outside the kidney when `pelvis`) and the ureter running down and in towards the psoas, to the
    bottom of the volume; return the volume painted (mL)."""
    value = LABEL["collecting_system"]
    total = 0.0
    down = np.array([1.0 / sp[0], 0.0, 0.0])
    start = hilum + np.array([4.0 / sp[0], 0.0, 0.0])  # the pelvis leaves the hilum's lower half
    if pelvis:
        bulge = start + np.array([0.0, -2.0 / sp[1], medial * (5.0 + 6.0 * v) / sp[2]])
        total += _paint_tube(tissue, labels, bulge[None], 6.0 + 6.0 * u, sp, value)
        start = bulge
    bend = start + 40.0 * down + np.array([0.0, (4.0 + 8.0 * v) / sp[1], medial * (8.0 + 10.0 * u) / sp[2]])
    end = bend.copy()
    end[0] = tissue.shape[0] - 1
    end[2] += medial * 0.15 * (end[0] - bend[0]) * sp[0] / sp[2]
    radius = 1.8 + 1.7 * u
    total += _paint_tube(tissue, labels, _curve(start, bend, None, sp), radius, sp, value)
    if end[0] > bend[0]:
        total += _paint_tube(tissue, labels, _curve(bend, end, None, sp), radius, sp, value)
    return round(total, 2)


#: Hilar tubes count as the hilum's where they lie within this many voxels of a kidney or its sinus (further on,
#: the vein, artery and ureter are the great vessels' and the pelvis's business, not the kidney border's).
NEAR_VOXELS = 4
_SINUS = (LABEL["renal_sinus"], LABEL["renal_pelvis"])
_HILAR = (LABEL["vein"], LABEL["artery"], LABEL["collecting_system"])


def sinus_and_hilum(tissue: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sinus, hilum) bool masks of a phantom: the carved renal sinus with its pelvis (version 5 on), and the vein,
    artery, pelvis and ureter within :data:`NEAR_VOXELS` of a kidney or its sinus (version 6 on). Both are
    KiTS label 0: what a model must learn to leave out where the kidney ends on its medial side."""
    sinus = np.isin(tissue, _SINUS)
    hilum = np.zeros(tissue.shape, dtype=bool)
    reach = (labels > 0) | sinus
    if reach.any():
        found = ndi.find_objects(reach.view(np.uint8))[0]
        box = tuple(slice(max(0, s.start - NEAR_VOXELS), s.stop + NEAR_VOXELS) for s in found)
        near = ndi.binary_dilation(reach[box], iterations=NEAR_VOXELS)
        hilum[box] = near & np.isin(tissue[box], _HILAR)
    return sinus & (labels == 0), hilum & (labels == 0)


def hard_negative_mask(tissue: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 mask (1 = hard negative) of a phantom's sinus and hilum (:func:`sinus_and_hilum`): background voxels
    enclosed by or touching a kidney, which training may weigh as much as the kidney itself."""
    sinus, hilum = sinus_and_hilum(tissue, labels)
    return (sinus | hilum).view(np.uint8)
