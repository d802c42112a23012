"""Out-of-domain inputs are said, not hidden: the checks behind `qnkit segment`'s warnings.

A model segments what resembles its training data (the domain recorded in its bundle, see
:attr:`qnkit.bundle.Bundle.domain`). Before inference :func:`input_warnings` looks at the CT and
its header: values that are not CT Hounsfield units, a slice thickness far outside the model's
training range, an orientation nibabel had to guess (qform and sform codes both 0), and a volume too
thin along some axis to hold a kidney (a single slice, say). After inference :func:`mask_warnings`
looks at the final mask: no kidney at all (the CT shows another region, or the model missed them), and
(:func:`edge_warnings`) kidneys touching the first or last slice or the in-plane border, which means
the volume cuts a kidney, so its volume is underestimated.

Each warning is one sentence without the case name; `qnkit segment` prints
``qnkit: warning: <case>: <sentence>`` on stderr, lists them under ``"warnings"`` in the stats
JSON, and with ``--strict`` turns the first into an error (exit code 2, nothing written).
"""
from __future__ import annotations

import numpy as np

__all__ = ["AIR_HU", "THICKNESS_FACTOR", "MIN_EXTENT_MM", "hu_warning", "thickness_warning", "orientation_warning",
           "extent_warning", "input_warnings", "no_kidney_warning", "edge_warnings", "mask_warnings"]

#: A CT field of view shows air (about -1000 HU outside the body, in the lungs and bowel gas), so some
#: voxel lies below this value; CT values span more than MIN_HU_RANGE.
AIR_HU = -500.0
MIN_HU_RANGE = 200.0
#: Slice thickness below min / THICKNESS_FACTOR or above max * THICKNESS_FACTOR of the training range is "far outside".
THICKNESS_FACTOR = 2.0
#: An adult kidney is about 3-4 cm thick, 5-7 cm wide and 10-13 cm long: a volume spanning less than this
#: along any axis cannot hold one.
MIN_EXTENT_MM = 30.0


def hu_warning(ct: np.ndarray) -> str | None:
    """A sentence when the values do not look like CT Hounsfield units, else None."""
    lo, hi = float(np.min(ct)), float(np.max(ct))
    span = f"values {lo:g} to {hi:g}"
    if hi - lo < MIN_HU_RANGE:
        return f"{span}: not CT Hounsfield units (normalised or rescaled data?); the model expects HU"
    if lo >= 0:
        return (f"{span}, none negative: not CT Hounsfield units (unscaled unsigned data without its rescale "
                f"intercept, or an MR?); CT shows air at about -1000 HU")
    if lo > AIR_HU:
        return (f"{span}, none below {AIR_HU:g}: no air in the field of view, so the values are probably not "
                f"CT Hounsfield units")
    return None


def thickness_warning(thickness_mm: float, domain: dict | None) -> str | None:
    """A sentence when the slice thickness is far outside the model's training range (domain
    ``slice_thickness_mm`` [min, max]); None when inside or when the model records no range."""
    rng = (domain or {}).get("slice_thickness_mm")
    if not rng:
        return None
    lo, hi = (float(v) for v in rng)
    if lo / THICKNESS_FACTOR <= thickness_mm <= hi * THICKNESS_FACTOR:
        return None
    return (f"slice thickness {thickness_mm:.3g} mm is far outside the model's training range "
            f"{lo:.3g}-{hi:.3g} mm; the kidneys may be missed or misshapen")


def orientation_warning(geometry) -> str | None:
    """A sentence when the header's qform and sform codes are both 0 (orientation guessed)."""
    if getattr(geometry, "orientation_guessed", False):
        return ("qform and sform codes are both 0: orientation guessed from the voxel sizes, so right and left "
                "(and the slice order) may be wrong")
    return None


def extent_warning(shape, spacing) -> str | None:
    """A sentence when the volume (internal layout: slices, rows, columns) spans less than
    :data:`MIN_EXTENT_MM` along some axis, so that it cannot hold a kidney (a single slice, say)."""
    for axis, (count, size) in enumerate(zip(shape, spacing)):
        extent = int(count) * float(size)
        if extent < MIN_EXTENT_MM:
            what = ("slice", "row", "column")[axis]
            across = ("along the slices", "from front to back", "from side to side")[axis]
            return (f"the volume spans only {extent:.3g} mm {across} ({int(count)} {what}{'s' if count != 1 else ''} "
                    f"of {float(size):.3g} mm); a kidney is 3-4 cm thick and 10-13 cm long, so this volume "
                    f"cannot hold one")
    return None


def input_warnings(ct: np.ndarray, geometry, domain: dict | None) -> list[str]:
    """Warnings known before inference: not HU, slice thickness far outside the domain, orientation guessed,
    a volume too thin to hold a kidney."""
    found = [hu_warning(ct), thickness_warning(float(geometry.spacing[0]), domain), orientation_warning(geometry),
             extent_warning(ct.shape, geometry.spacing)]
    return [w for w in found if w]


def no_kidney_warning(mask: np.ndarray) -> str | None:
    """A sentence when the final mask holds no kidney at all (right and left absent): nothing to measure,
    which a user must not mistake for a result."""
    if np.any(mask):
        return None
    return ("no kidney found (right and left absent): the CT may not show the kidneys (another body region), "
            "or the model missed them")


def mask_warnings(mask: np.ndarray) -> list[str]:
    """Warnings about the final mask (Z, H, W), non-zero = kidney: no kidney at all, or kidneys touching the
    volume's edge (:func:`edge_warnings`)."""
    empty = no_kidney_warning(mask)
    return [empty] if empty else edge_warnings(mask)


def edge_warnings(mask: np.ndarray) -> list[str]:
    """Warnings about the final mask (Z, H, W), non-zero = kidney: kidneys touching the volume's edge."""
    if mask.ndim != 3 or not mask.any():
        return []
    edges = [name for name, face in (("first slice", mask[0]), ("last slice", mask[-1])) if face.any()]
    if mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any():
        edges.append("in-plane border")
    if not edges:
        return []
    return [f"kidney touches the volume's {' and '.join(edges)}: the volume may cut a kidney, so its volume "
            f"is underestimated"]
