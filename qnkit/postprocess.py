"""3-D post-processing of a predicted kidney mask: sides first, then one kidney per side.

QuickNAT segments slice by slice, so its errors are mostly small blobs on slices above and below
the kidneys and ragged borders between slices; the report's future work proposes 3-D
post-processing for exactly that. Real patients add harder cases: one kidney after a
nephrectomy (a false positive must not become "the other kidney"), a kidney split in two by a
missed slice or a tumor, and a horseshoe kidney that crosses the midline. So the order is:

1. optional binary closing with a small ellipsoidal ball (radius in mm or voxels);
2. sides: the patient's midline is the x of the body's centroid (the largest connected region
   above -300 HU, so a table or a stray object does not pull it), never x = 0, because scanner
   origins are arbitrary (KiTS19 affines put x = 0 at an image corner). A 26-connected component
   goes to the side of its centroid; one with a large share on both sides (a horseshoe) is cut
   at the midline. RAS+ x grows towards the patient's RIGHT (nibabel's RAS+; DICOM's LPS has +x
   left), so a larger x than the midline is the right side;
3. per side, the largest piece is the kidney when it reaches ``min_kidney_ml`` (else that side
   is reported absent, not invented); pieces on the same side within ``merge_mm`` (nearest voxel
   centres, in mm) of the kidney are the same kidney and kept; everything else is dropped.

All arrays are in qnkit's internal (I, P, L) layout; all functions are torch-free.
"""
from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi

__all__ = ["RIGHT", "LEFT", "MIN_KIDNEY_ML", "MERGE_MM", "ball", "bounding_box", "close_mask", "body_midline_x",
           "split_sides", "select_kidneys", "kidney_sides"]

RIGHT, LEFT = 1, 2  # label values of --split-sides masks
BODY_HU = -300.0  # voxels above this are body (soft tissue, bone), below are air/lung
#: Smallest kidney reported: adult kidneys are 100-200 mL, atrophic ones rarely below 30 mL;
#: false-positive blobs of a slice-wise network are mostly a few mL.
MIN_KIDNEY_ML = 10.0
#: Pieces this close (mm, nearest voxel centres) to a kidney are part of it: one missed 5 mm
#: slice leaves a 10 mm gap between the halves of a kidney.
MERGE_MM = 15.0
#: A component with at least this share of its voxels on each side of the midline is cut there.
HORSESHOE_SHARE = 0.25


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


def bounding_box(mask: np.ndarray, pad=(0, 0, 0)) -> tuple[slice, slice, slice]:
    """Index box of the foreground of a non-empty 3-D mask, grown by `pad` voxels per axis and clipped."""
    box = []
    for axis, p in enumerate(pad):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(max(0, int(hit[0]) - p), min(mask.shape[axis], int(hit[-1]) + 1 + p)))
    return tuple(box)


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
    box = bounding_box(mask, pad)
    sub = np.pad(mask[box], [(p, p) for p in pad])
    closed = ndi.binary_closing(sub, structure=se)[tuple(slice(p, -p) for p in pad)]
    out = mask.copy()
    out[box] |= closed
    return out.astype(np.uint8)


def body_midline_x(ct: np.ndarray, affine: np.ndarray, slices: slice | None = None) -> float:
    """RAS+ x (mm) of the body's centroid in `slices` (default: all).

    The body is the largest 26-connected region above -300 HU, sampled every 4th voxel in-plane
    (plenty for a centre), so the table, a calibration phantom or an arm lying apart does not pull
    the midline. Falls back to the volume's centre when nothing is body (an empty or non-CT image).
    """
    sl = slices if slices is not None else slice(None)
    offset = sl.start or 0
    body = np.ascontiguousarray(ct[sl, ::4, ::4] > BODY_HU, dtype=np.uint8)
    if body.any():
        body = cc3d.largest_k(body, k=1, connectivity=26, binary_image=True)
        idx = np.nonzero(body)
        centre = np.array([idx[0].mean() + offset, idx[1].mean() * 4, idx[2].mean() * 4])
    else:
        centre = (np.array(ct.shape, dtype=float) - 1) / 2
    return float((affine @ np.append(centre, 1.0))[0])


def split_sides(mask: np.ndarray, affine: np.ndarray, midline_x: float) -> np.ndarray:
    """uint8 labels of every foreground voxel: RIGHT (1) or LEFT (2); nothing is dropped.

    A 26-connected component goes to the side of its centroid (RAS+ x > `midline_x` is right);
    a component with at least a quarter of its voxels on each side (a horseshoe kidney) is cut at
    the midline, each voxel going to its own side.
    """
    fg = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    out = np.zeros(fg.shape, dtype=np.uint8)
    labels, n = cc3d.connected_components(fg, connectivity=26, return_N=True)
    if n == 0:
        return out
    idx = np.nonzero(labels)
    comp = labels[idx].astype(np.int64)
    x = affine[0, 0] * idx[0] + affine[0, 1] * idx[1] + affine[0, 2] * idx[2] + affine[0, 3]
    right = x > midline_x
    total = np.bincount(comp, minlength=n + 1)
    on_right = np.bincount(comp, weights=right, minlength=n + 1)
    centre_x = np.bincount(comp, weights=x, minlength=n + 1) / np.maximum(total, 1)
    straddles = np.minimum(on_right, total - on_right) >= HORSESHOE_SHARE * total
    by_centroid = np.where(centre_x > midline_x, RIGHT, LEFT).astype(np.uint8)
    out[idx] = np.where(straddles[comp], np.where(right, RIGHT, LEFT), by_centroid[comp])
    return out


def _near(group: np.ndarray, pieces: np.ndarray, label: int, box: tuple, spacing, merge_mm: float) -> bool:
    """Whether piece `label` of `pieces` (index box `box`) has a voxel within `merge_mm` (voxel centres, mm)
    of the `group` mask. Only the piece's box grown by `merge_mm` can hold such a voxel of the group."""
    pad = (int(np.ceil(merge_mm / float(s))) for s in spacing)
    grown = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, group.shape))
    if not group[grown].any():
        return False
    distance = ndi.distance_transform_edt(~group[grown], sampling=spacing)
    return bool((distance[pieces[grown] == label] <= merge_mm + 1e-6).any())


def select_kidneys(sides: np.ndarray, spacing, voxel_ml: float, *, min_kidney_ml: float = MIN_KIDNEY_ML,
                   merge_mm: float = MERGE_MM) -> np.ndarray:
    """Per side, the kidney and the pieces of it: a cleaned copy of `sides` (1 right, 2 left).

    The largest 26-connected piece of a side is its kidney if it has at least `min_kidney_ml`,
    else the side is left empty (absent). Pieces of the same side within `merge_mm` of the
    kidney (repeatedly, so a chain of fragments counts) join it; all other pieces are dropped.
    """
    sides = np.asarray(sides, dtype=np.uint8)
    out = np.zeros_like(sides)
    if not sides.any():
        return out
    box = bounding_box(sides)  # every piece lies inside: work on the kidneys' box, not the CT
    sides, whole, out = np.ascontiguousarray(sides[box]), out, out[box]
    pieces, n = cc3d.connected_components(sides, connectivity=26, return_N=True)  # never across sides
    statistics = cc3d.statistics(pieces)
    counts, boxes = statistics["voxel_counts"], statistics["bounding_boxes"]
    piece_side = np.zeros(n + 1, dtype=np.uint8)
    piece_side[pieces.ravel()] = sides.ravel()
    for side in (RIGHT, LEFT):
        candidates = [p for p in range(1, n + 1) if piece_side[p] == side]
        if not candidates:
            continue
        main = max(candidates, key=lambda p: counts[p])
        if counts[main] * voxel_ml < min_kidney_ml:
            continue
        kept, rest = {main}, set(candidates) - {main}
        while rest:
            group = np.isin(pieces, list(kept))
            joined = {p for p in rest if _near(group, pieces, p, boxes[p], spacing, merge_mm)}
            if not joined:
                break
            kept |= joined
            rest -= joined
        out[np.isin(pieces, list(kept))] = side
    return whole


def kidney_sides(mask: np.ndarray, ct: np.ndarray, geometry, options, *,
                 in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The post-processing of `qnkit segment` (and so of everything that scores it): (output mask, sides).

    `geometry` is a :class:`qnkit.io.Geometry`; `options` has the fields of
    :class:`qnkit.segment.SegmentOptions` (postprocess, closing, closing_unit, min_kidney_ml,
    merge_mm, split_sides). `sides` (uint8, the CT's grid) has 1 right / 2 left; the output mask is
    `sides` with split_sides, else 1 kidney. Without postprocess the mask is kept as predicted and
    only labelled with sides.

    Labelling connected components costs a 32-bit label and more per voxel: over 4 GB for a
    512 x 512 x 1000 CT if done on the whole volume. Everything here happens where the mask is
    (closing reaches its ball's radius further), so the steps (closing, sides from the body's
    midline, one kidney per side) run on the mask's box grown by that reach, with the affine moved
    to the box; only the midline is taken from the whole CT. The result equals the same steps on the
    whole volume (tested). With `in_place` the output is written into `mask` (uint8, the caller's
    array: no second volume) and `mask` is returned; otherwise `mask` is left as it was.
    """
    if options.closing_unit not in ("mm", "voxels"):
        raise ValueError(f"closing unit must be mm or voxels, got {options.closing_unit!r}")
    if in_place and (not isinstance(mask, np.ndarray) or mask.dtype != np.uint8):
        raise ValueError("in_place post-processing needs a uint8 mask")
    out = mask if in_place else np.zeros(np.shape(mask), dtype=np.uint8)
    sides = np.zeros(out.shape, dtype=np.uint8)
    closing = float(options.closing) if options.postprocess and options.closing and options.closing > 0 else 0.0
    unit = geometry.spacing if options.closing_unit == "mm" else (1.0, 1.0, 1.0)
    if not np.any(mask):
        return out, sides
    reach = [int(np.ceil(closing / float(u))) + 1 for u in unit]
    box = bounding_box(np.asarray(mask), reach)
    part = np.asarray(mask[box]) > 0
    if closing:
        part = close_mask(part, closing, unit) > 0
    kidney_slices = np.flatnonzero(part.any(axis=(1, 2))) + box[0].start
    body = slice(int(kidney_slices[0]), int(kidney_slices[-1]) + 1)
    affine = np.array(geometry.internal_affine, dtype=np.float64)
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64)
    part_sides = split_sides(part, moved, body_midline_x(ct, affine, body))
    if options.postprocess:
        part_sides = select_kidneys(part_sides, geometry.spacing, geometry.voxel_volume_ml,
                                    min_kidney_ml=options.min_kidney_ml, merge_mm=options.merge_mm)
    sides[box] = part_sides
    out[box] = part_sides if options.split_sides else (part_sides > 0)  # outside the box: background already
    return out, sides
