"""Where a model's kidney errors lie on a labelled CT: a rim, or whole regions, and what those regions are.

A mask a few voxels too wide and a mask that takes in a vein are different problems with the same Dice. For each
kidney this reports the false-positive voxels by their distance outside the labels and the false negatives by
their depth inside, then every false-positive region beyond the first few millimetres: its size, where it lies
from the kidney's centre (mm: inferior, posterior, toward the patient's left, qnkit's internal axes), its median
HU and how much of it the labels give to another organ. The prediction is ``qnkit segment``'s
(:func:`qnkit.segment.segment_ct`, the bundle's default backend and threshold).

    python -m qnkit.benchmarks.error_map --model BUNDLE --ct CT.nii.gz --labels SEG.nii.gz \\
        --right-label 2 --left-label 3 --name NAME --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from qnkit.kernels import mask_dice

#: Distance bins (mm) of the rim report; a region is reported when it lies beyond :data:`REGION_MM`.
BINS_MM = (0.0, 3.1, 6.1, 9.1, np.inf)
REGION_MM = 4.3
MIN_REGION_VOXELS = 20


def _binned(mask: np.ndarray, distance: np.ndarray) -> dict:
    out = {}
    for lo, hi in zip(BINS_MM[:-1], BINS_MM[1:]):
        name = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}"
        out[name] = int((mask & (distance > lo) & (distance <= hi)).sum())
    return out


def kidney_errors(predicted: np.ndarray, truth: np.ndarray, ct: np.ndarray, other_organs: np.ndarray,
                  spacing: tuple) -> dict:
    """Error map of one kidney: boolean `predicted` and `truth` masks, the CT (HU) and a mask of the voxels the
    labels give to other organs, all of one shape; `spacing` in mm per axis."""
    if predicted.shape != truth.shape or ct.shape != truth.shape or other_organs.shape != truth.shape:
        raise ValueError(f"shapes differ: {predicted.shape}, {truth.shape}, {ct.shape}, {other_organs.shape}")
    false_pos, false_neg = predicted & ~truth, truth & ~predicted
    outside = ndi.distance_transform_edt(~truth, sampling=spacing)
    inside = ndi.distance_transform_edt(truth, sampling=spacing)
    centre = np.argwhere(truth).mean(axis=0) if truth.any() else np.array(truth.shape) / 2
    parts, n = ndi.label(false_pos & (outside > REGION_MM))
    regions = []
    for i, box in enumerate(ndi.find_objects(parts), start=1):
        part = parts[box] == i
        if part.sum() < MIN_REGION_VOXELS:
            continue
        where = (np.argwhere(part) + [s.start for s in box]).mean(axis=0)
        regions.append({"voxels": int(part.sum()),
                        "mm_inferior_posterior_left": [round(float(v), 1) for v in (where - centre) * spacing],
                        "median_hu": float(np.median(ct[box][part])),
                        "other_organ_share": round(float(other_organs[box][part].mean()), 3)})
    return {"voxels": int(predicted.sum()), "voxels_true": int(truth.sum()),
            "dice": round(mask_dice(predicted, truth, empty=0.0), 4),
            "fp_by_mm_outside": _binned(false_pos, outside), "fn_by_mm_inside": _binned(false_neg, inside),
            "fp_regions": sorted(regions, key=lambda r: -r["voxels"])}


@contextmanager
def segmenter(model: str):
    """``qnkit segment``'s prediction for CTs in memory, with `model` (a bundle folder or a shipped model's name)
    on its default backend: yields (segment(ct, geometry) -> sides uint8 (1 right, 2 left), the model arguments)."""
    from qnkit.backends import open_backend
    from qnkit.bundle import load_bundle
    from qnkit.models import resolve_model
    from qnkit.segment import SegmentOptions, model_arguments, segment_ct

    bundle = load_bundle(resolve_model(model))
    arguments = model_arguments(bundle)
    with open_backend(bundle, log=lambda *a: None) as backend:
        yield (lambda ct, geometry: segment_ct(ct, geometry, backend.predict, **arguments,
                                               options=SegmentOptions())[1]), arguments


def error_map(model: str, ct_path: Path, labels_path: Path, right_label: int, left_label: int,
              probe_hu: tuple = ()) -> dict:
    """Segment `ct_path` with `model` as ``qnkit segment`` does and map each kidney's errors against the labels.

    `probe_hu`: for each value, the false-positive regions' voxels (beyond :data:`REGION_MM`, no organ label)
    are set to it and the CT segmented again: the share of them still taken says whether the network takes such
    a region for its content (it lets go when the content changes) or for its shape and place (it does not)."""
    from qnkit import io as qio

    ct, geometry = qio.load_image(str(ct_path))
    labels, _ = qio.load_labels(str(labels_path))
    spacing = geometry.spacing
    kidneys = np.isin(labels, (right_label, left_label))
    with segmenter(model) as (segment, arguments):
        sides = segment(ct, geometry)
        out = {"threshold": arguments.get("threshold"), "spacing_mm": list(spacing)}
        for side, value, code in (("right", right_label, 1), ("left", left_label, 2)):
            out[side] = kidney_errors(sides == code, labels == value, ct, (labels > 0) & ~kidneys, spacing)
        if probe_hu:
            region = (sides > 0) & (labels == 0)
            region &= ndi.distance_transform_edt(~kidneys, sampling=spacing) > REGION_MM
            out["probe"] = {"voxels": int(region.sum()), "still_taken": {}}
            for value in probe_hu:
                changed = ct.copy()
                changed[region] = value
                taken = float((segment(changed, geometry)[region] > 0).mean()) if region.any() else 0.0
                out["probe"]["still_taken"][f"{value:g}"] = round(taken, 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bundle folder or a shipped model's name")
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--right-label", type=int, default=2)
    parser.add_argument("--left-label", type=int, default=3)
    parser.add_argument("--probe-hu", default="", metavar="V1,V2,...",
                        help="also set the false-positive regions to each of these HU and segment again")
    parser.add_argument("--name", help="the key of this result in --json (default: --model)")
    parser.add_argument("--json", type=Path, help="add the result to this file (other keys kept)")
    args = parser.parse_args(argv)
    try:
        probe = tuple(float(v) for v in args.probe_hu.split(",") if v.strip())
        result = error_map(args.model, args.ct, args.labels, args.right_label, args.left_label, probe)
    except (ValueError, OSError) as exc:  # QnkitInputError and NiftiError among them: one line, exit 2
        print(f"error_map: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    if args.json:
        doc = json.loads(args.json.read_text()) if args.json.is_file() else {}
        doc[args.name or args.model] = result
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
