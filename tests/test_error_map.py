"""benchmarks.error_map: a kidney's errors split into a rim and whole regions, checked on masks drawn by hand."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qnkit.benchmarks.error_map import kidney_errors

SPACING = (2.0, 2.0, 2.0)


def _scene():
    truth = np.zeros((30, 30, 30), dtype=bool)
    truth[10:20, 10:20, 8:16] = True
    ct = np.full(truth.shape, -90.0)
    ct[truth] = 30.0
    blob = np.zeros_like(truth)
    blob[14:18, 12:16, 22:26] = True  # 6 voxels (12 mm) toward the patient's left of the kidney's edge
    ct[blob] = -5.0
    return truth, ct, blob


def test_a_rim_and_a_region_are_told_apart():
    truth, ct, blob = _scene()
    rim = ndi.binary_dilation(truth) & ~truth
    organs = np.zeros_like(truth)
    organs[14:16] = blob[14:16]  # the labels give half the region to another organ
    result = kidney_errors(truth | rim | blob, truth, ct, organs, SPACING)
    assert result["voxels_true"] == truth.sum() and result["voxels"] == (truth | rim | blob).sum()
    assert result["fp_by_mm_outside"] == {"0-3.1": rim.sum(), "3.1-6.1": 0, "6.1-9.1": 0, ">9.1": blob.sum()}
    assert result["fn_by_mm_inside"] == {"0-3.1": 0, "3.1-6.1": 0, "6.1-9.1": 0, ">9.1": 0}
    (region,) = result["fp_regions"]  # the rim lies within 4.3 mm: not a region
    assert region["voxels"] == blob.sum() and region["median_hu"] == -5.0
    assert region["other_organ_share"] == pytest.approx(0.5)
    expected = (np.argwhere(blob).mean(axis=0) - np.argwhere(truth).mean(axis=0)) * SPACING
    assert region["mm_inferior_posterior_left"] == pytest.approx(expected.tolist(), abs=0.05)
    assert region["mm_inferior_posterior_left"][2] > 0  # toward the patient's left
    assert result["dice"] == pytest.approx(2 * truth.sum() / ((truth | rim | blob).sum() + truth.sum()), abs=1e-4)


def test_missed_kidney_and_empty_masks():
    truth, ct, _ = _scene()
    none = np.zeros_like(truth)
    missed = kidney_errors(none, truth, ct, none, SPACING)
    assert missed["dice"] == 0.0 and missed["fp_regions"] == []
    assert sum(missed["fn_by_mm_inside"].values()) == truth.sum() and missed["fn_by_mm_inside"][">9.1"] == 0
    empty = kidney_errors(none, none, ct, none, SPACING)
    assert empty["voxels"] == empty["voxels_true"] == 0 and empty["dice"] == 0.0
    small = np.zeros_like(truth)
    small[2:4, 2:4, 2:4] = True  # 8 voxels far away: an error, but below the region size reported
    assert kidney_errors(truth | small, truth, ct, none, SPACING)["fp_regions"] == []


def test_shapes_must_match():
    truth, ct, _ = _scene()
    with pytest.raises(ValueError, match="shapes differ"):
        kidney_errors(truth[:-1], truth, ct, truth, SPACING)
