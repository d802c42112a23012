"""Post-processing (closing, largest components, sides) and per-kidney statistics, on small arrays and on
synthetic phantoms whose sides are known."""
from __future__ import annotations

import numpy as np
import pytest

from qnkit import io as qio
from qnkit import postprocess as P
from qnkit.report import kidney_stats
from qnkit.synth import make_case


def test_ball_is_round_in_mm():
    assert P.ball(1).sum() == 7  # 6-neighbourhood + centre
    b = P.ball(3.0, spacing=(5.0, 1.0, 1.0))  # 5 mm slices: no extent across slices
    assert b.shape == (1, 7, 7)
    assert P.ball(2.0, spacing=(1.0, 2.0, 1.0)).shape == (5, 3, 5)


def test_closing_fills_gaps_and_keeps_edges():
    mask = np.zeros((9, 20, 20), np.uint8)
    mask[2:7, 5:15, 5:15] = 1
    mask[4, 8:12, 8:12] = 0  # a hole inside
    mask[:, 0:3, 0:3] = 1  # touches the volume's edge
    out = P.close_mask(mask, 2, spacing=(1, 1, 1))
    assert out[4, 8:12, 8:12].all()
    assert out[:, 0:3, 0:3].all()  # not eroded by the border
    assert (out >= mask).all()
    assert P.close_mask(mask, 0).tolist() == mask.tolist()


def test_keep_largest_two_components():
    mask = np.zeros((10, 30, 30), np.uint8)
    mask[1:9, 2:12, 2:12] = 1  # big
    mask[1:9, 2:10, 18:28] = 1  # second
    mask[5, 25, 5] = 1  # speck
    out = P.keep_largest(mask, 2)
    assert out.dtype == np.uint8
    assert out.sum() == mask.sum() - 1 and out[5, 25, 5] == 0
    assert P.keep_largest(np.zeros((3, 4, 5), np.uint8)).sum() == 0


@pytest.mark.parametrize("kidneys", ["left", "right"])
def test_sides_from_patient_coordinates(kidneys):
    case = make_case(3, size=64, seed=1, kidneys=kidneys)
    geo = qio.Geometry.from_affine(case.affine, case.imaging.shape)
    mask = (case.segmentation > 0).astype(np.uint8)
    mid = P.body_midline_x(case.imaging, geo.internal_affine)
    sides = P.split_sides(mask, geo.internal_affine, mid)
    want = P.LEFT if kidneys == "left" else P.RIGHT
    assert set(np.unique(sides)) == {0, want}


def test_both_kidneys_split_left_and_right():
    case = make_case(2, size=64, seed=0)
    geo = qio.Geometry.from_affine(case.affine, case.imaging.shape)
    sides = P.split_sides(case.segmentation > 0, geo.internal_affine,
                          P.body_midline_x(case.imaging, geo.internal_affine))
    # columns run from the patient's right to left: the right kidney is in the lower columns
    cols = {v: np.nonzero(sides == v)[2].mean() for v in (P.RIGHT, P.LEFT)}
    assert cols[P.RIGHT] < case.imaging.shape[2] / 2 < cols[P.LEFT]


def test_stats_volumes_boxes_and_hu():
    case = make_case(4, size=64, seed=0, kidneys="left")
    geo = qio.Geometry.from_affine(case.affine, case.imaging.shape)
    sides = (case.segmentation > 0).astype(np.uint8) * P.LEFT
    s = kidney_stats(sides, case.imaging, geo)
    n = int((case.segmentation > 0).sum())
    assert s["left"]["voxels"] == n
    assert s["left"]["volume_ml"] == pytest.approx(n * abs(np.linalg.det(case.affine[:3, :3])) / 1000)
    assert s["right"] == {"voxels": 0, "volume_ml": 0.0, "bbox_voxels": None, "bbox_mm": None,
                          "centroid_voxels": None, "centroid_mm": None, "mean_hu": None}
    idx = np.nonzero(case.segmentation)
    assert s["left"]["bbox_voxels"] == {"min": [int(i.min()) for i in idx], "max": [int(i.max()) for i in idx]}
    assert s["left"]["mean_hu"] == pytest.approx(case.imaging[idx].mean(), abs=0.01)
    lo, hi = np.array(s["left"]["bbox_mm"]["min"]), np.array(s["left"]["bbox_mm"]["max"])
    centre = np.array(s["left"]["centroid_mm"])
    assert (lo <= centre).all() and (centre <= hi).all()
