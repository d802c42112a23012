"""Per-kidney statistics of a segmentation, for `qnkit segment --stats` and the demo.

For each side (right, left): whether a kidney was found (``present``; post-processing reports a
kidney it did not find as absent, with volume 0, rather than inventing one), voxel count, volume in mL (voxel count x voxel volume from the
header's affine), bounding box and centroid both in the input file's voxel indices and in
patient coordinates (RAS+ mm, through the file's affine), and mean HU of the CT under the mask.
Voxel indices are those of the input file's axes (what a viewer shows), not qnkit's internal
layout, so the numbers can be checked against the file directly.
"""
from __future__ import annotations

import numpy as np

from qnkit.io import Geometry
from qnkit.postprocess import LEFT, RIGHT, bounding_box

__all__ = ["SIDES", "kidney_stats", "side_volumes_ml", "describe_sides"]

SIDES = {"right": RIGHT, "left": LEFT}


def _internal_to_file(geometry: Geometry) -> np.ndarray:
    """4x4 matrix mapping internal voxel indices to the file's voxel indices (permutation + flips)."""
    return np.linalg.inv(geometry.affine) @ geometry.internal_affine


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def _box(m: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[list, list]:
    """Axis-aligned box (min, max) of the 8 transformed corners of the index box [lo, hi]."""
    corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)], dtype=float)
    pts = _apply(m, corners)
    return pts.min(axis=0).tolist(), pts.max(axis=0).tolist()


def _round(values, digits: int = 3) -> list:
    return [round(float(v), digits) for v in values]


def kidney_stats(sides: np.ndarray, ct: np.ndarray, geometry: Geometry) -> dict:
    """{'right': {...}, 'left': {...}} for an internal-layout label volume (1 right, 2 left).

    A side with no voxels is absent: present False, voxels 0, volume 0.0, None for box, centroid and HU.
    Everything is measured inside the kidneys' bounding box (a whole CT is ~50x its volume).
    """
    to_file = _internal_to_file(geometry)
    to_ras = geometry.internal_affine
    ml = geometry.voxel_volume_ml
    sides = np.asarray(sides)
    box = bounding_box(sides) if sides.any() else (slice(0, 0),) * 3
    origin = np.array([b.start for b in box])
    sides, ct = sides[box], ct[box]
    out = {}
    for name, value in SIDES.items():
        sel = sides == value
        count = int(np.count_nonzero(sel))
        entry = {"present": count > 0, "voxels": count, "volume_ml": count * ml}
        if count:
            axes = [np.nonzero(sel.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
            lo = origin + np.array([ax[0] for ax in axes])
            hi = origin + np.array([ax[-1] for ax in axes])
            vlo, vhi = _box(to_file, lo, hi)
            mlo, mhi = _box(to_ras, lo, hi)
            idx = np.nonzero(sel)
            centre = origin + np.array([i.mean() for i in idx])
            entry.update(
                bbox_voxels={"min": [int(round(v)) for v in vlo], "max": [int(round(v)) for v in vhi]},
                bbox_mm={"min": _round(mlo, 2), "max": _round(mhi, 2)},
                centroid_voxels=_round(_apply(to_file, centre[None])[0], 2),
                centroid_mm=_round(_apply(to_ras, centre[None])[0], 2),
                mean_hu=round(float(ct[idx].astype(np.float64).mean()), 2),
            )
        else:
            entry.update(bbox_voxels=None, bbox_mm=None, centroid_voxels=None, centroid_mm=None, mean_hu=None)
        out[name] = entry
    return out


def side_volumes_ml(stats: dict) -> tuple[float, float]:
    """(right mL, left mL) from :func:`kidney_stats` output."""
    return stats["right"]["volume_ml"], stats["left"]["volume_ml"]


def describe_sides(stats: dict) -> str:
    """'right 152.3 mL, left absent' from :func:`kidney_stats` output (for console lines and titles)."""
    return ", ".join(f"{name} {stats[name]['volume_ml']:.1f} mL" if stats[name]["present"] else f"{name} absent"
                     for name in SIDES)
