"""Post-processing (closing, sides, one kidney per side) and per-kidney statistics, on small arrays, on
synthetic phantoms whose sides are known, and on hand-built patients whose every voxel is known: one kidney
with a false positive on the other side, a kidney split in two by a missed slice, a horseshoe kidney."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qnkit import io as qio
from qnkit import postprocess as P
from qnkit.report import describe_sides, kidney_stats
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
    assert s["left"]["present"] and s["left"]["voxels"] == n
    assert s["left"]["volume_ml"] == pytest.approx(n * abs(np.linalg.det(case.affine[:3, :3])) / 1000)
    assert s["right"] == {"present": False, "voxels": 0, "volume_ml": 0.0, "bbox_voxels": None, "bbox_mm": None,
                          "centroid_voxels": None, "centroid_mm": None, "mean_hu": None}
    idx = np.nonzero(case.segmentation)
    assert s["left"]["bbox_voxels"] == {"min": [int(i.min()) for i in idx], "max": [int(i.max()) for i in idx]}
    assert s["left"]["mean_hu"] == pytest.approx(case.imaging[idx].mean(), abs=0.01)
    lo, hi = np.array(s["left"]["bbox_mm"]["min"]), np.array(s["left"]["bbox_mm"]["max"])
    centre = np.array(s["left"]["centroid_mm"])
    assert (lo <= centre).all() and (centre <= hi).all()


# --- hand-built patients ----------------------------------------------------------------------------------
# 40 slices of 5 mm, 128 x 160 pixels of 2 mm, KiTS-like affine (x = 0 at the image's first column, x grows
# towards the patient's right = lower columns). The body is an ellipse centred on column 84, not on the image
# centre (79.5), and not at x = 0. Kidneys are ellipsoids either side of it.

SPACING = (5.0, 2.0, 2.0)
SHAPE = (40, 128, 160)
BODY_COL, BODY_ROW = 84, 60
AFFINE = np.array([[0, 0, -SPACING[2], 0], [0, -SPACING[1], 0, 0], [-SPACING[0], 0, 0, 0], [0, 0, 0, 1]], float)
GEOMETRY = qio.Geometry.from_affine(AFFINE, SHAPE)
ML = GEOMETRY.voxel_volume_ml


def _ellipsoid(centre_vox, semi_mm) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return (((z - centre_vox[0]) * SPACING[0] / semi_mm[0]) ** 2 + ((y - centre_vox[1]) * SPACING[1] / semi_mm[1]) ** 2
            + ((x - centre_vox[2]) * SPACING[2] / semi_mm[2]) ** 2) <= 1.0


def _ct() -> np.ndarray:
    """Air, and a soft-tissue body (40 HU) 280 mm wide and 200 mm deep, over every slice."""
    ct = np.full(SHAPE, -1000, np.int16)
    y, x = np.ogrid[0:SHAPE[1], 0:SHAPE[2]]
    ct[:, ((y - BODY_ROW) / 50.0) ** 2 + ((x - BODY_COL) / 70.0) ** 2 <= 1.0] = 40
    return ct


def _kidney(side: int, semi_mm=(55.0, 22.0, 28.0), z: int = 20) -> np.ndarray:
    """A kidney whose centre is 65 mm from the midline on `side` (RIGHT: lower columns)."""
    col = BODY_COL + (-1 if side == P.RIGHT else 1) * 65.0 / SPACING[2]
    return _ellipsoid((z, BODY_ROW + 15, col), semi_mm)


def _options(**kw):
    """The defaults of `qnkit segment` (SegmentOptions), with `kw` changed."""
    from qnkit.segment import SegmentOptions

    return SegmentOptions(**kw)


def _run(mask: np.ndarray, ct=None, **kw):
    out, sides = P.kidney_sides(mask.astype(np.uint8), _ct() if ct is None else ct, GEOMETRY, _options(**kw))
    return out, sides, kidney_stats(sides, _ct() if ct is None else ct, GEOMETRY)


def test_midline_is_the_body_centre_not_the_image_or_x0():
    ct = _ct()
    want = float(AFFINE[0, 2] * BODY_COL)
    assert P.body_midline_x(ct, GEOMETRY.internal_affine) == pytest.approx(want, abs=0.5)
    # an arm (or a table, a calibration rod) lying apart from the body does not pull the midline
    ct[:, 40:90, 2:12] = 60
    assert P.body_midline_x(ct, GEOMETRY.internal_affine) == pytest.approx(want, abs=0.5)


def test_one_kidney_and_a_false_positive_on_the_other_side():
    """After a right nephrectomy the network still fires on a blob on the right: right is absent, not the blob."""
    left = _kidney(P.LEFT)
    blob = _ellipsoid((14, BODY_ROW + 10, BODY_COL - 40), (9.0, 9.0, 9.0))  # ~3 mL where the right kidney was
    far = _ellipsoid((36, BODY_ROW - 30, BODY_COL + 20), (8.0, 8.0, 8.0))  # ~2 mL on the left, far from the kidney
    assert 1.0 < blob.sum() * ML < P.MIN_KIDNEY_ML and not (left & (blob | far)).any()
    out, sides, stats = _run(left | blob | far)
    assert np.array_equal(sides == P.LEFT, left) and not (sides == P.RIGHT).any()
    assert np.array_equal(out, left.astype(np.uint8))
    assert stats["right"]["present"] is False and stats["right"]["volume_ml"] == 0.0
    assert stats["left"]["present"] is True
    assert stats["left"]["volume_ml"] == pytest.approx(left.sum() * ML)
    assert describe_sides(stats) == f"right absent, left {left.sum() * ML:.1f} mL"
    # without post-processing nothing is dropped, but every voxel still gets its side
    _, raw, _ = _run(left | blob | far, postprocess=False)
    assert np.array_equal(raw == P.RIGHT, blob) and np.array_equal(raw == P.LEFT, left | far)


def test_kidney_split_in_two_by_a_missed_slice():
    """A missed slice cuts the right kidney in two halves, each larger than the (atrophic) left kidney."""
    right = _kidney(P.RIGHT)
    right[21] = False  # one 5 mm slice missed: a 10 mm gap between the halves' voxel centres
    left = _kidney(P.LEFT, semi_mm=(30.0, 16.0, 18.0))
    halves = [right[:21].sum() * ML, right[22:].sum() * ML]
    assert min(halves) > left.sum() * ML > P.MIN_KIDNEY_ML
    out, sides, stats = _run(right | left, split_sides=True)
    assert np.array_equal(sides == P.RIGHT, right) and np.array_equal(sides == P.LEFT, left)
    assert np.array_equal(out, sides)
    assert stats["right"]["volume_ml"] == pytest.approx(sum(halves))
    assert stats["left"]["volume_ml"] == pytest.approx(left.sum() * ML) and stats["left"]["present"]
    # a piece beyond merge_mm is not the same kidney: with a 5 mm reach the smaller (lower) half is dropped
    _, sides, _ = _run(right | left, merge_mm=5.0)
    assert halves[0] > halves[1]
    assert np.array_equal(sides == P.RIGHT, right & (np.arange(SHAPE[0]) < 21)[:, None, None])


def test_horseshoe_kidney_is_cut_at_the_midline():
    """Two kidneys fused at their lower poles by an isthmus across the midline: one component, two sides."""
    right, left = _kidney(P.RIGHT), _kidney(P.LEFT)
    isthmus = np.zeros(SHAPE, bool)
    isthmus[28:32, BODY_ROW + 8:BODY_ROW + 20, BODY_COL - 35:BODY_COL + 35] = True
    kidneys = right | left | isthmus
    assert P.split_sides(kidneys, GEOMETRY.internal_affine, 0.0).max() > 0  # (one 26-connected component:)
    import cc3d

    assert cc3d.connected_components(kidneys.astype(np.uint8), connectivity=26).max() == 1
    cols = np.arange(SHAPE[2])[None, None, :]
    want_right, want_left = kidneys & (cols < BODY_COL), kidneys & (cols >= BODY_COL)
    _, sides, stats = _run(kidneys)
    assert np.array_equal(sides == P.RIGHT, want_right) and np.array_equal(sides == P.LEFT, want_left)
    assert stats["right"]["volume_ml"] == pytest.approx(want_right.sum() * ML)
    assert stats["left"]["volume_ml"] == pytest.approx(want_left.sum() * ML)
    # a kidney merely touching the midline is not cut: it goes whole to its centroid's side
    nudged = _kidney(P.RIGHT, semi_mm=(55.0, 22.0, 66.0))  # reaches 1 mm past the midline
    assert (nudged & (cols >= BODY_COL)).any()
    _, sides, _ = _run(nudged)
    assert np.array_equal(sides == P.RIGHT, nudged)


def test_closing_then_sides():
    """--closing fills a hole before the pieces are judged; a closed mask never loses a voxel."""
    right, left = _kidney(P.RIGHT), _kidney(P.LEFT)
    holed = right.copy()
    hole = (slice(19, 22), slice(BODY_ROW + 14, BODY_ROW + 16), slice(BODY_COL - 40, BODY_COL - 25))
    holed[hole] = False  # a 4 mm gap inside the kidney
    out, _, _ = _run(holed | left, closing=4.0)
    assert (out >= (holed | left)).all() and out[hole].all()
    assert not _run(holed | left)[0][hole].any()
    with pytest.raises(ValueError, match="mm or voxels"):
        P.kidney_sides(right, _ct(), GEOMETRY, _options(closing=1.0, closing_unit="inch"))


def test_empty_mask_has_no_kidneys():
    out, sides, stats = _run(np.zeros(SHAPE, bool))
    assert not out.any() and not sides.any()
    assert not stats["right"]["present"] and not stats["left"]["present"]
    assert describe_sides(stats) == "right absent, left absent"


def _kidney_stats_reference(sides, ct, geometry) -> dict:
    """Plain whole-volume statistics: count, index box and centroid from np.nonzero, mean HU under the mask."""
    from qnkit.report import SIDES, _apply, _internal_to_file

    to_file, to_ras = _internal_to_file(geometry), geometry.internal_affine
    out = {}
    for name, value in SIDES.items():
        idx = np.nonzero(sides == value)
        if not idx[0].size:
            out[name] = {"voxels": 0, "box": None}
            continue
        lo, hi = np.array([i.min() for i in idx]), np.array([i.max() for i in idx])
        corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)], float)
        centre = np.array([i.mean() for i in idx])[None]
        out[name] = {"voxels": idx[0].size, "box": _apply(to_file, corners), "box_mm": _apply(to_ras, corners),
                     "centroid": _apply(to_file, centre)[0], "centroid_mm": _apply(to_ras, centre)[0],
                     "hu": ct[idx].astype(np.float64).mean()}
    return out


@pytest.mark.parametrize("present", [("right", "left"), ("left",), ()])
@pytest.mark.parametrize("layout", ["contiguous", "fortran"])
def test_stats_match_the_whole_volume_reference(present, layout):
    rng = np.random.default_rng(len(present))
    sides = np.zeros(SHAPE, np.uint8)
    for name in present:
        side = P.RIGHT if name == "right" else P.LEFT
        sides[_kidney(side, z=int(rng.integers(8, 30)))] = side
        sides[rng.random(SHAPE) < 2e-4] = side  # stray voxels anywhere, the volume's corners included
    sides[0, 0, 0] = P.LEFT if "left" in present else 0
    ct = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
    if layout == "fortran":
        sides, ct = np.asfortranarray(sides), np.asfortranarray(ct)
    stats, want = kidney_stats(sides, ct, GEOMETRY), _kidney_stats_reference(sides, ct, GEOMETRY)
    for name in ("right", "left"):
        got, ref = stats[name], want[name]
        assert got["voxels"] == ref["voxels"] and got["present"] is (name in present)
        assert got["volume_ml"] == pytest.approx(ref["voxels"] * ML)
        if ref["box"] is None:
            assert got["bbox_voxels"] is None and got["mean_hu"] is None
            continue
        assert got["bbox_voxels"] == {"min": np.rint(ref["box"].min(0)).astype(int).tolist(),
                                      "max": np.rint(ref["box"].max(0)).astype(int).tolist()}
        assert got["bbox_mm"]["min"] == pytest.approx(ref["box_mm"].min(0), abs=0.006)
        assert got["bbox_mm"]["max"] == pytest.approx(ref["box_mm"].max(0), abs=0.006)
        assert got["centroid_voxels"] == pytest.approx(ref["centroid"], abs=0.006)
        assert got["centroid_mm"] == pytest.approx(ref["centroid_mm"], abs=0.006)
        assert got["mean_hu"] == pytest.approx(ref["hu"], abs=0.006)


def _select_kidneys_reference(sides, spacing, voxel_ml, min_kidney_ml, merge_mm):
    """Whole-volume rounds: each side's largest piece, then every piece within merge_mm (exact EDT) of what is kept."""
    from scipy import ndimage as ndi

    out = np.zeros_like(sides)
    for side in (P.RIGHT, P.LEFT):
        pieces, n = ndi.label(sides == side, structure=np.ones((3, 3, 3)))
        if not n:
            continue
        counts = np.bincount(pieces.ravel())[1:]
        if counts.max() * voxel_ml < min_kidney_ml:
            continue
        kept = pieces == 1 + int(np.argmax(counts))
        while True:
            near = ndi.distance_transform_edt(~kept, sampling=spacing) <= merge_mm + 1e-6
            grown = np.isin(pieces, np.unique(pieces[near & (pieces > 0)]))
            if (grown == kept).all():
                break
            kept = grown
        out[kept] = side
    return out


@pytest.mark.parametrize("seed", range(12))
def test_select_kidneys_matches_the_whole_volume_reference(seed):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(9, 36, 3))  # odd and even sizes
    blobs = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.52 + 0.02 * rng.random()
    sides = np.zeros(shape, np.uint8)
    half = shape[2] // 2
    sides[..., :half][blobs[..., :half]] = P.RIGHT
    sides[..., half:][blobs[..., half:]] = P.LEFT
    spacing = tuple(float(s) for s in rng.uniform(0.5, 4.0, 3))
    merge_mm, min_ml = float(rng.uniform(1.0, 12.0)), float(rng.choice([0.0, 0.05]))
    got = P.select_kidneys(sides if seed % 2 else np.asfortranarray(sides), spacing, 0.001,
                           min_kidney_ml=min_ml, merge_mm=merge_mm)
    np.testing.assert_array_equal(got, _select_kidneys_reference(sides, spacing, 0.001, min_ml, merge_mm))
