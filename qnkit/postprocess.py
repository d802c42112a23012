"""3-D post-processing of a predicted kidney mask, and left/right labelling of its components.

QuickNAT segments slice by slice, so its errors are mostly small blobs on slices above and below
the kidneys and ragged borders between slices; the report's future work proposes 3-D
post-processing for exactly that. Here: an optional binary closing with a small ellipsoidal
ball (radius in voxels or mm, so anisotropic CT gets a round ball in patient space), then keep
the two largest 26-connected components (cc3d). Sides come from patient coordinates: a
component's centroid goes through the voxel->RAS+ affine and is compared with the body's
mid-sagittal plane. RAS+ x grows towards the patient's RIGHT (nibabel's RAS+: +x = Right,
+y = Anterior, +z = Superior; it is DICOM's LPS where +x is left), so a component with a larger
x than the plane is the right kidney. The plane is the body's centre, not x = 0, because scanner
origins are arbitrary (KiTS19 affines put x = 0 at an image corner).

All arrays are in qnkit's internal (I, P, L) layout; all functions are torch-free.
"""
from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi

__all__ = ["RIGHT", "LEFT", "ball", "close_mask", "keep_largest", "body_midline_x", "split_sides",
           "postprocess"]

RIGHT, LEFT = 1, 2  # label values of --split-sides masks
BODY_HU = -300.0  # voxels above this are body (soft tissue, bone), below are air/lung


def ball(radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ellipsoid structuring element of `radius` (in the units of `spacing`) per axis.

    With `spacing` = (1, 1, 1) the radius is in voxels; with the voxel size in mm it is in mm.
    An axis whose voxels are larger than the radius gets no extent (e.g. 5 mm slices, 3 mm ball).
    """
    semi = [float(radius) / float(s) for s in spacing]
    half = [int(np.floor(a + 1e-6)) for a in semi]
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in half)]
    dist = sum((g / a) ** 2 if a > 0 else np.zeros_like(g, dtype=float) for g, a in zip(grids, semi))
    return np.asarray(dist <= 1.0 + 1e-9)


def close_mask(mask: np.ndarray, radius: float, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Binary closing with `ball(radius, spacing)`; uint8 mask of the same shape.

    Works on the mask's bounding box padded by the ball's size (fast on a whole CT), and pads with
    background so that the erosion does not eat objects touching the volume's edge.
    """
    mask = np.asarray(mask) > 0
    se = ball(radius, spacing)
    if radius <= 0 or se.size == 1 or not mask.any():
        return mask.astype(np.uint8)
    pad = [n // 2 + 1 for n in se.shape]
    idx = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], \
        np.nonzero(mask.any(axis=(0, 1)))[0]
    lo = [max(0, int(i[0]) - p) for i, p in zip(idx, pad)]
    hi = [min(n, int(i[-1]) + 1 + p) for i, n, p in zip(idx, mask.shape, pad)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.pad(mask[box], [(p, p) for p in pad])
    closed = ndi.binary_closing(sub, structure=se)[tuple(slice(p, -p) for p in pad)]
    out = mask.copy()
    out[box] |= closed
    return out.astype(np.uint8)


def keep_largest(mask: np.ndarray, k: int = 2) -> np.ndarray:
    """The `k` largest 26-connected components of `mask` as a uint8 {0, 1} mask."""
    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    if not mask.any():
        return mask
    return (cc3d.largest_k(mask, k=int(k), connectivity=26, binary_image=True) > 0).astype(np.uint8)


def body_midline_x(ct: np.ndarray, affine: np.ndarray, slices: slice | None = None) -> float:
    """RAS+ x (mm) of the body's centroid (voxels above -300 HU) in `slices` (default: all).

    Sampled every 4th voxel in-plane, which is plenty for a centre. Falls back to the volume's
    centre when nothing is body (e.g. an empty or non-CT image).
    """
    sl = slices if slices is not None else slice(None)
    offset = sl.start or 0
    sub = ct[sl, ::4, ::4]
    body = np.nonzero(sub > BODY_HU)
    if body[0].size:
        centre = np.array([body[0].mean() + offset, body[1].mean() * 4, body[2].mean() * 4])
    else:
        centre = (np.array(ct.shape, dtype=float) - 1) / 2
    return float((affine @ np.append(centre, 1.0))[0])


def split_sides(mask: np.ndarray, affine: np.ndarray, midline_x: float) -> np.ndarray:
    """uint8 labels: each connected component of `mask` becomes RIGHT (1) or LEFT (2).

    A component whose centroid lies at RAS+ x > `midline_x` is on the patient's right.
    """
    labels = cc3d.connected_components(np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8),
                                       connectivity=26)
    n = int(labels.max())
    out = np.zeros(labels.shape, dtype=np.uint8)
    if n == 0:
        return out
    stats = cc3d.statistics(labels)
    lut = np.zeros(n + 1, dtype=np.uint8)
    for i in range(1, n + 1):
        if stats["voxel_counts"][i] == 0:
            continue
        x = (affine @ np.append(stats["centroids"][i], 1.0))[0]
        lut[i] = RIGHT if x > midline_x else LEFT
    return lut[labels]


def postprocess(mask: np.ndarray, *, spacing, keep: int = 2, closing: float = 0.0,
                closing_unit: str = "mm") -> np.ndarray:
    """Closing (when `closing` > 0, radius in `closing_unit` 'mm' or 'voxels') then keep `keep` largest."""
    if closing_unit not in ("mm", "voxels"):
        raise ValueError(f"closing unit must be mm or voxels, got {closing_unit!r}")
    if closing and closing > 0:
        mask = close_mask(mask, closing, spacing if closing_unit == "mm" else (1.0, 1.0, 1.0))
    return keep_largest(mask, keep) if keep else np.asarray(mask > 0, dtype=np.uint8)
