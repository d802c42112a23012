"""The shipped model on the one real CT in shared/ (validation only): kidney Dice against floors written
here, volumes, and the same answer whatever the input's pixel size. The model was trained on anatomy
phantoms only. shared/ sits beside the checkout (CI has it at ../shared); only its absence skips."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qnkit.models import find_model, shipped_models

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real-ct"
CT, SEG = REAL / "example_ct_sm.nii.gz", REAL / "example_seg.nii.gz"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent (CI has it)")
RIGHT, LEFT = 2, 3  # TotalSegmentator labels of the real CT

# Fixed floors, a little under what the shipped default, kidney-synth-7, measures on this CT through its default
# INT8 path (both 0.821, right 0.806, left 0.839; kidney-synth, the default before it, 0.773): a model or pipeline
# change that loses kidney fails here. Raise them with a better model; never take them from the registry the model
# itself ships with.
FLOOR_BOTH, FLOOR_RIGHT, FLOOR_LEFT = 0.80, 0.78, 0.81


def _stats_path(mask: Path) -> Path:
    return mask.with_name(mask.name.split(".")[0] + "_stats.json")


def _segment(run_qnkit, ct: Path, out: Path) -> np.ndarray:
    """`qnkit segment --split-sides` with the default model; the mask (1 right, 2 left) on the CT's grid."""
    proc = run_qnkit("segment", ct, "--out", out, "--split-sides", "--no-progress", "--stats", _stats_path(out))
    assert proc.returncode == 0, proc.stderr
    return np.asarray(nib.load(str(out)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _resample_inplane(path: Path, pixel_mm: float, out: Path) -> Path:
    """The CT resampled in-plane to `pixel_mm` over the same field of view (linear, HU kept as int16)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    factor = np.array([zooms[0] / pixel_mm, zooms[1] / pixel_mm, 1.0])
    shape = np.round(np.array(data.shape) * factor).astype(int)
    res = ndi.zoom(data, shape / np.array(data.shape), order=1, grid_mode=True, mode="nearest")
    affine = img.affine.copy()
    affine[:3, :2] = img.affine[:3, :2] * (np.array(data.shape[:2]) / shape[:2])
    # keep the field of view: the first voxel's corner stays where it was
    affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, :2] @ (0.5 * (np.array(data.shape[:2]) / shape[:2]) - 0.5)
    nib.save(nib.Nifti1Image(np.rint(res).astype(np.int16), affine), str(out))
    return out


def _to_grid(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """A fine in-plane mask brought to a coarser grid over the same field of view (area fraction >= 0.5)."""
    frac = ndi.zoom((mask > 0).astype(np.float32), np.array(shape) / np.array(mask.shape), order=1, grid_mode=True,
                    mode="nearest")
    return frac >= 0.5


def test_a_default_model_is_shipped():
    models = shipped_models()
    assert models, "qnkit ships at least one model"
    model = find_model()
    domain = json.loads((model.path / "qnkit.json").read_text())["domain"]
    assert domain["training_data"]["source"] == "synthetic"
    assert domain["pixel_spacing_mm"] > 0 and model.entry["not_for"]


@needs_shared
def test_shipped_model_finds_real_kidneys(run_qnkit, tmp_path):
    """The default model (no --model) on the real CT, scored on its own grid against its labels."""
    sides = _segment(run_qnkit, CT, tmp_path / "mask.nii.gz")
    labels = np.asarray(nib.load(str(SEG)).dataobj)
    assert sides.shape == labels.shape
    both = _dice(sides > 0, np.isin(labels, (RIGHT, LEFT)))
    right, left = _dice(sides == 1, labels == RIGHT), _dice(sides == 2, labels == LEFT)
    assert both >= FLOOR_BOTH and right >= FLOOR_RIGHT and left >= FLOOR_LEFT, (both, right, left)
    stats = json.loads(_stats_path(tmp_path / "mask.nii.gz").read_text())
    assert stats["model"] == str(find_model().path)
    (case,) = stats["cases"]
    ml = float(np.prod(nib.load(str(CT)).header.get_zooms()[:3])) / 1000.0  # 3 mm voxels: 0.027 mL
    for name, code in (("right", 1), ("left", 2)):  # each side's volume is its voxels in this CT's mL
        assert case["kidneys"][name]["volume_ml"] == pytest.approx((sides == code).sum() * ml)


@needs_shared
def test_same_kidneys_at_any_pixel_size(run_qnkit, tmp_path):
    """The real CT at 3 mm, and resampled in-plane to 1.5 mm and 0.7 mm: masks agree on one grid."""
    base = _segment(run_qnkit, CT, tmp_path / "m3.nii.gz") > 0
    assert base.sum() > 1000
    for pixel in (1.5, 0.7):
        ct = _resample_inplane(CT, pixel, tmp_path / f"ct_{pixel}.nii.gz")
        fine = _segment(run_qnkit, ct, tmp_path / f"m_{pixel}.nii.gz")
        coarse = _to_grid(fine, base.shape)
        dice = 2 * np.logical_and(coarse, base).sum() / (coarse.sum() + base.sum())
        assert dice >= 0.95, (pixel, dice)
