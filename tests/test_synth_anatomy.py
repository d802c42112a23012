"""The anatomy generator: KiTS19 layout, determinism, real kidney geometry, plausible HU, tissue atlas."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qnkit.synth import make_anatomy_case, write_dataset
from qnkit.synth.atlas import LABEL, TISSUES, load_atlas, tissue_of

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19-labels"
needs_real = pytest.mark.skipif(not any(REAL_LABELS.glob("case_*/segmentation.nii.gz")),
                                reason="shared real KiTS19 labels not available")
COARSE = dict(pixel_range=(4.0, 4.0), max_size=128)  # ~100 px slices: a case in about a second


def test_atlas_holds_the_trunk():
    atlas, affine = load_atlas()
    present = set(np.unique(atlas).tolist())
    for name in ("body", "kidney_right", "kidney_left", "liver", "spleen", "bone", "muscle", "small_bowel", "artery"):
        assert LABEL[name] in present, name
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # RAS: the right kidney lies at larger x than the left one, the liver on the right.
    x = lambda name: np.argwhere(atlas == LABEL[name])[:, 0].mean() * affine[0, 0] + affine[0, 3]  # noqa: E731
    assert x("kidney_right") > x("kidney_left") and x("liver") > x("spleen")
    assert tissue_of("kidney_cyst_left") == "kidney_cyst" and tissue_of("vertebrae_L1") == "bone"
    assert tissue_of("brain") is None and len(TISSUES) == len(set(TISSUES))


def test_case_layout_and_determinism():
    a = make_anatomy_case(2, seed=5, **COARSE)
    b = make_anatomy_case(2, seed=5, **COARSE)
    c = make_anatomy_case(3, seed=5, **COARSE)
    assert a.imaging.dtype == np.int16 and a.segmentation.dtype == np.uint8
    assert a.imaging.shape == a.segmentation.shape and a.imaging.shape[1] == a.imaging.shape[2]
    assert np.array_equal(a.imaging, b.imaging) and np.array_equal(a.segmentation, b.segmentation)
    assert a.imaging.shape != c.imaging.shape or not np.array_equal(a.imaging, c.imaging)
    assert set(np.unique(a.segmentation).tolist()) <= {0, 1, 2}
    assert nib.aff2axcodes(a.affine) == ("I", "P", "L")
    record = a.kits_entry()["qnkit_synth"]
    assert record["generator"] == "anatomy" and record["seed"] == 5 and record["index"] == 2
    assert record["phase"] in ("unenhanced", "corticomedullary", "nephrographic", "excretory")


def test_kidneys_look_like_kidneys():
    found = 0
    for index in range(4):
        case = make_anatomy_case(index, seed=11, **COARSE)
        kidney, ct = case.segmentation > 0, case.imaging
        if not kidney.any():
            continue
        found += 1
        assert -60 < float(np.median(ct[kidney])) < 450  # soft tissue, enhanced or not
        assert float(np.median(ct[:, :3, :])) < -500  # air (or the scanner's padding) in front of the body
        z = np.nonzero(kidney.any(axis=(1, 2)))[0]
        assert z[0] > 0 and z[-1] < ct.shape[0] - 1  # the slab holds whole kidneys
    assert found >= 3


@needs_real
def test_real_kidney_shapes_on_both_sides(tmp_path):
    out = tmp_path / "data"
    write_dataset(out, cases=2, seed=1, generator="anatomy", labels_from=REAL_LABELS, pixel_range=(3.0, 3.0),
                  size=160, progress=False, workers=2)
    entries = json.loads((out / "kits.json").read_text())
    assert [e["case_id"] for e in entries] == ["case_00000", "case_00001"]
    for entry in entries:
        assert entry["qnkit_synth"]["source_case"].startswith("case_")
        seg = np.asarray(nib.load(str(out / entry["case_id"] / "segmentation.nii.gz")).dataobj)
        cols = np.argwhere(seg > 0)[:, 2]
        absent = entry["qnkit_synth"]["absent_kidney"]
        if absent is None:  # both sides of the midline hold kidney (columns run patient right -> left)
            assert cols.min() < seg.shape[2] * 0.45 and cols.max() > seg.shape[2] * 0.55
    # one worker gives the same bytes as two
    again = tmp_path / "again"
    write_dataset(again, cases=2, seed=1, generator="anatomy", labels_from=REAL_LABELS, pixel_range=(3.0, 3.0),
                  size=160, progress=False, workers=1)
    for name in ("case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(str(out / name)).dataobj), np.asarray(nib.load(str(again / name)).dataobj))


def test_capped_depth_in_slabs_equals_the_whole_transform_up_to_the_cap():
    """_depth_mm(cap_mm=...) runs the distance transform slab by slab (bounded memory on whole-body bone
    and bowel); up to the cap it is exactly the one-piece transform, so rim and wall thresholds agree."""
    from scipy import ndimage as ndi

    from qnkit.synth.render import _depth_mm

    rng = np.random.default_rng(0)
    mask = ndi.gaussian_filter(rng.standard_normal((90, 200, 200)), 3) > 0.02  # two slabs of 52 slices
    for spacing in [(1.0, 0.7, 0.7), (2.5, 1.0, 1.0)]:
        whole = _depth_mm(mask, spacing)
        assert np.array_equal(_depth_mm(mask, spacing, cap_mm=5.0), np.minimum(whole, np.float32(5.0)))
        assert whole.max() > 5.0  # the cap matters here
    assert not _depth_mm(np.zeros((4, 5, 6), bool), (1.0, 1.0, 1.0), cap_mm=5.0).any()


def test_white_noise_drawn_in_slabs_is_the_one_draw():
    from qnkit.synth.render import _white_noise

    for shape in [(120, 300, 301), (3, 2000, 2100)]:  # slabs of 46 slices and of one slice
        got = _white_noise(np.random.default_rng(7), shape)
        assert got.dtype == np.float32 and np.array_equal(got, np.random.default_rng(7).standard_normal(shape).astype(np.float32))
