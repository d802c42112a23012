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


# --------------------------------------------------------------------------- anatomy version 2: organ moves


def _toy_body():
    """A 40^3 body of fat with a spleen block, a kidney block below-beside it and a bone bar between."""
    tissue = np.full((40, 40, 40), LABEL["body"], dtype=np.uint8)
    tissue[5:15, 5:15, 25:35] = LABEL["spleen"]
    tissue[22:34, 10:20, 22:30] = LABEL["kidney_left"]
    tissue[:, 30:34, :] = LABEL["bone"]
    return tissue


def test_move_organ_pushes_it_towards_the_kidney_and_never_into_bone():
    from qnkit.synth.anatomy import _move_organ

    tissue = _toy_body()
    before = tissue.copy()
    spleen = np.argwhere(before == LABEL["spleen"]).mean(axis=0)
    goal = np.argwhere(before == LABEL["kidney_left"]).mean(axis=0)
    move = _move_organ(np.random.default_rng(0), tissue, "spleen", goal, (1.0, 1.0, 1.0), (8.0, 8.0), (1.0, 1.0))
    after = np.argwhere(tissue == LABEL["spleen"]).mean(axis=0)
    assert np.linalg.norm(after - goal) < np.linalg.norm(spleen - goal) - 4  # about 8 mm nearer (plus jitter)
    assert np.array_equal(tissue == LABEL["bone"], before == LABEL["bone"])  # bone never yields
    vacated = (before == LABEL["spleen"]) & (tissue != LABEL["spleen"])
    assert vacated.any() and np.all(tissue[vacated] == LABEL["body"])  # where it was is fat now
    assert set(move) == {"shift_mm", "scale"} and len(move["shift_mm"]) == 3


def test_move_organ_scales_its_volume_and_grows_into_the_atlas_kidney():
    from qnkit.synth.anatomy import _move_organ

    tissue = _toy_body()
    goal = np.argwhere(tissue == LABEL["kidney_left"]).mean(axis=0)
    move = _move_organ(np.random.default_rng(1), tissue, "spleen", goal, (1.0, 1.0, 1.0), (6.0, 6.0), (1.4, 1.4))
    grown = (tissue == LABEL["spleen"]).sum()
    assert abs(grown / 1000 - np.prod(move["scale"])) < 0.35 * np.prod(move["scale"])  # 10^3 voxels x the scales
    # the atlas kidney is replaced by a real one afterwards, so an organ may lie where it was
    assert ((_toy_body() == LABEL["kidney_left"]) & (tissue == LABEL["spleen"])).any()


def test_move_organ_without_the_organ_or_the_kidney_is_a_no_op():
    from qnkit.synth.anatomy import _move_organ

    tissue = _toy_body()
    assert _move_organ(np.random.default_rng(0), tissue, "liver", np.zeros(3), (1, 1, 1), (5, 5), (1, 1)) == {}
    assert _move_organ(np.random.default_rng(0), tissue, "spleen", None, (1, 1, 1), (5, 5), (1, 1)) == {}
    assert np.array_equal(tissue, _toy_body())


def test_version_1_is_the_first_recipe_and_version_2_moves_organs(monkeypatch):
    """Version 1 (the shipped model's data) never moves an organ, so it draws the same numbers as before
    version 2 existed; version 2 records each move; the case names its version."""
    import qnkit.synth.anatomy as anatomy

    v2 = make_anatomy_case(1, seed=4, version=2, **COARSE)
    moves = v2.kits_entry()["qnkit_synth"]["organ_moves"]
    assert v2.kits_entry()["qnkit_synth"]["recipe_version"] == 2 and set(moves) == {"spleen", "liver"}

    def no_moves(*args, **kwargs):
        raise AssertionError("version 1 moved an organ")

    monkeypatch.setattr(anatomy, "_move_organ", no_moves)
    v1 = make_anatomy_case(1, seed=4, version=1, **COARSE)
    assert v1.kits_entry()["qnkit_synth"]["recipe_version"] == 1 and "organ_moves" not in v1.kits_entry()["qnkit_synth"]
    assert v1.imaging.shape == v2.imaging.shape  # same grid draws; the bodies differ
    with pytest.raises(Exception, match="anatomy version"):
        make_anatomy_case(1, seed=4, version=8, **COARSE)


def test_version_2_puts_the_spleen_against_the_left_kidney_more_often():
    """Over a few bodies, more of the left kidney's surface touches the spleen than in the one atlas layout."""
    from scipy import ndimage as ndi

    from qnkit.synth.anatomy import make_anatomy

    def touching(version):
        shares = []
        for index in range(5):
            rng = np.random.default_rng([11, index])
            body = make_anatomy(rng, pixel_mm=4.0, thickness_mm=4.0, labels_from=None, max_size=128, version=version)
            left = body.tissue == LABEL["kidney_left"]
            surface = left & ~ndi.binary_erosion(left)
            near_spleen = ndi.binary_dilation(body.tissue == LABEL["spleen"])
            shares.append((surface & near_spleen).sum() / max(int(surface.sum()), 1))
        return float(np.mean(shares))

    assert touching(2) > 1.5 * touching(1)


def test_cli_anatomy_version_is_checked(tmp_path, capsys):
    from qnkit.cli import main

    for args, word in ((["--generator", "anatomy", "--anatomy-version", "8"], "anatomy version"),
                       (["--anatomy-version", "1"], "anatomy generator"),
                       (["--phases", "1,1,1,1"], "anatomy generator"),
                       (["--generator", "anatomy", "--phases", "1,1,1"], "phase weights"),
                       (["--generator", "anatomy", "--phases", "1,-1,1,1"], "phase weights"),
                       (["--generator", "anatomy", "--phases", "0,0,0,0"], "phase weights"),
                       (["--generator", "anatomy", "--phases", "a,b,c,d"], "--phases")):
        with pytest.raises(SystemExit) as exc:
            main(["synth", str(tmp_path / "out"), "--cases", "1", "--size", "64", "--no-progress", *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exc.value.code == 2 and len(err) == 1 and word in err[0], err


def test_mass_lies_against_the_kidney_is_background_and_spares_kidney_and_bone():
    from scipy import ndimage as ndi

    from qnkit.synth.anatomy import add_mass

    for seed in range(4):
        tissue = np.full((70, 90, 90), LABEL["body"], dtype=np.uint8)
        tissue[30:50, 40:70, 20:30] = LABEL["bone"]
        labels = np.zeros(tissue.shape, dtype=np.uint8)
        labels[25:45, 40:60, 50:62] = 1
        labels[30:34, 45:50, 55:60] = 2
        tissue[labels > 0] = LABEL["kidney_left"]
        before_t, before_l = tissue.copy(), labels.copy()
        record = add_mass(np.random.default_rng(seed), tissue, labels, (2.0, 2.0, 2.0), "left", volume_ml=(300, 300))
        mass = tissue == LABEL["mass"]
        assert np.array_equal(labels, before_l), "the mass is background: KiTS labels never change"
        assert not (mass & (before_l > 0)).any() and not (mass & (before_t == LABEL["bone"])).any()
        assert (ndi.binary_dilation(mass) & (labels > 0)).any(), "pressed against the kidney"
        painted_ml = mass.sum() * 8 / 1000
        assert record["volume_ml"] == pytest.approx(painted_ml, abs=0.1) and 100 < painted_ml <= 330, record
        assert record["side"] == "left" and record["where"] in ("superior", "anterior", "lateral", "inferior")


def test_version_3_adds_masses_to_some_cases_and_keeps_version_2_bodies_otherwise():
    """Version 3 draws its mass after every draw of version 2, so a case without a mass is version 2's."""
    with_mass = without = 0
    for index in range(8):
        v3 = make_anatomy_case(index, seed=2, version=3, **COARSE)
        mass = v3.kits_entry()["qnkit_synth"].get("mass")
        if mass:
            with_mass += 1
        else:
            without += 1
            v2 = make_anatomy_case(index, seed=2, version=2, **COARSE)
            assert np.array_equal(v2.imaging, v3.imaging) and np.array_equal(v2.segmentation, v3.segmentation)
    assert with_mass and without


def test_version_4_draws_lookalikes_at_the_kidneys_hu_and_keeps_version_3_otherwise():
    """Version 4 moves the spleen, liver or mass onto the kidney's parenchyma HU in some cases; the bodies
    are version 3's, and a case that draws no look-alike is version 3's to the byte."""
    from qnkit.synth.appearance import draw_look, draw_lookalikes

    plain = draw_look(np.random.default_rng(0))
    seen = set()
    for seed in range(12):
        look = draw_lookalikes(np.random.default_rng(seed), plain)
        parenchyma = 0.5 * (plain.hu["cortex"] + plain.hu["medulla"])
        for organ in ("spleen", "liver"):
            if organ in look.lookalikes:
                assert abs(look.hu[organ] - parenchyma) < 40
            else:
                assert look.hu[organ] == plain.hu[organ]
        assert (look.mass_hu is not None) == ("mass" in look.lookalikes)
        assert look.hu["cortex"] == plain.hu["cortex"]
        seen.update(look.lookalikes)
    assert seen == {"spleen", "liver", "mass"}

    same = differs = 0
    for index in range(6):
        v4 = make_anatomy_case(index, seed=2, version=4, **COARSE)
        v3 = make_anatomy_case(index, seed=2, version=3, **COARSE)
        record = v4.kits_entry()["qnkit_synth"]
        assert np.array_equal(v3.segmentation, v4.segmentation), "the same bodies"
        if record["lookalikes"]:
            differs += 1
            assert not np.array_equal(v3.imaging, v4.imaging)
            spleen_like = "spleen" in record["lookalikes"]
            assert set(record["lookalikes"]) <= {"spleen", "liver", "mass"}
            assert "mass" not in record["lookalikes"] or record.get("mass")
            del spleen_like
        else:
            same += 1
            assert np.array_equal(v3.imaging, v4.imaging)
    assert same and differs


def _ellipsoid_kidney(shape=(60, 60, 60), centre=(30, 30, 30), radii_mm=(55, 30, 22), spacing=(2.0, 2.0, 2.0)):
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return (zz / radii_mm[0]) ** 2 + (xx / radii_mm[1]) ** 2 + (yy / radii_mm[2]) ** 2 < 1.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_sinus_is_carved_inside_the_kidney_and_opens_medially(side):
    """The sinus comes out of the kidney label only (tumor and the lateral parenchyma kept), becomes tissue of
    its own, and reaches the kidney's outside on the medial side alone (columns run patient right -> left)."""
    from scipy import ndimage as ndi

    from qnkit.synth.sinus import carve_sinus

    spacing = (2.0, 2.0, 2.0)
    kidney = _ellipsoid_kidney(spacing=spacing)
    seen = 0
    for seed in range(8):
        labels = kidney.astype(np.uint8)
        labels[40:46, 25:35, 25:35][kidney[40:46, 25:35, 25:35]] = 2  # a small tumor: never carved
        tissue = np.where(kidney, LABEL[f"kidney_{side}"], LABEL["body"]).astype(np.uint8)
        before = labels.copy()
        record = carve_sinus(np.random.default_rng(seed), tissue, labels, spacing)
        sinus = tissue == LABEL["renal_sinus"]
        if record[side] == 0.0:
            assert not sinus.any()
            continue
        seen += 1
        assert record == {side: record[side], "right" if side == "left" else "left": 0.0}
        assert 0.03 < record[side] < 0.35 and record[side] == pytest.approx(sinus.sum() / kidney.sum(), abs=1e-4)
        assert (before[sinus] == 1).all() and (labels[sinus] == 0).all()
        assert np.array_equal(labels[~sinus], before[~sinus]) and (labels == 2).sum() == (before == 2).sum()
        mouth = sinus & ndi.binary_dilation(~kidney)  # sinus voxels that touch the outside of the kidney
        assert mouth.any(), "the sinus opens at the hilum"
        medial = np.argwhere(mouth)[:, 2] - 30
        assert ((medial > 0) if side == "right" else (medial < 0)).all(), "only on the medial side"
    assert seen >= 5


def test_sinus_leaves_small_kidneys_and_cysts_alone():
    from qnkit.synth.sinus import carve_sinus

    small = _ellipsoid_kidney(radii_mm=(20, 14, 12))  # ~14 mL
    tissue = np.where(small, LABEL["kidney_left"], LABEL["body"]).astype(np.uint8)
    labels = small.astype(np.uint8)
    assert carve_sinus(np.random.default_rng(0), tissue, labels, (2.0, 2.0, 2.0)) == {"right": 0.0, "left": 0.0}
    assert np.array_equal(labels, small)

    kidney = _ellipsoid_kidney()
    for seed in range(4):
        tissue = np.where(kidney, LABEL["kidney_right"], LABEL["body"]).astype(np.uint8)
        tissue[25:35, 25:35, 30:36] = np.where(kidney[25:35, 25:35, 30:36], LABEL["kidney_cyst"], LABEL["body"])
        labels = kidney.astype(np.uint8)
        carve_sinus(np.random.default_rng(seed), tissue, labels, (2.0, 2.0, 2.0))
        assert (labels[tissue == LABEL["kidney_cyst"]] == 1).all()


def test_version_5_labels_the_sinus_background_and_keeps_version_4_elsewhere():
    """Version 5 is version 4's bodies with each kidney's sinus taken out of its label; the image differs
    only around the kidneys, and the sinus is darker than the parenchyma (fat), except for excreted contrast."""
    from scipy import ndimage as ndi

    carved = 0
    for index in range(4):
        v5 = make_anatomy_case(index, seed=3, version=5, pixel_range=(2.5, 2.5), max_size=160)
        v4 = make_anatomy_case(index, seed=3, version=4, pixel_range=(2.5, 2.5), max_size=160)
        record = v5.kits_entry()["qnkit_synth"]
        gone = (v4.segmentation == 1) & (v5.segmentation == 0)
        assert np.array_equal(v5.segmentation[~gone], v4.segmentation[~gone])
        assert gone.any() == any(f > 0 for f in record["sinus"].values())
        far = ~ndi.binary_dilation(v4.segmentation > 0, iterations=8)
        assert np.array_equal(v5.imaging[far], v4.imaging[far])
        if gone.sum() > 200 and record["phase"] != "excretory":
            carved += 1
            parenchyma = v5.segmentation == 1
            assert np.median(v5.imaging[gone]) < np.median(v5.imaging[parenchyma]) - 20
    assert carved


def _hilum_body(side: str, spacing=(2.0, 2.0, 2.0)):
    """An ellipsoid kidney in fat, with a vena cava and an aorta running head to foot on its medial side."""
    kidney = _ellipsoid_kidney(shape=(90, 60, 100), centre=(35, 30, 30 if side == "right" else 70), spacing=spacing)
    tissue = np.where(kidney, LABEL[f"kidney_{side}"], LABEL["body"]).astype(np.uint8)
    tissue[:, 25:31, 48:54] = LABEL["vein"]  # the vena cava (patient right of the aorta)
    tissue[:, 30:35, 58:63] = LABEL["artery"]
    tissue[:, 50:, :] = LABEL["muscle"]  # the back: never painted over
    return tissue, kidney.astype(np.uint8)


@pytest.mark.parametrize("side", ["right", "left"])
def test_hilar_structures_leave_the_kidney_medially_and_stay_background(side):
    """Vein, artery and ureter are drawn in the fat only, keep every KiTS label, start at the kidney's medial
    side, reach the great vessels (the vein the vena cava, across the aorta's front on the left), and the
    ureter runs down to (about) the bottom of the volume."""
    from scipy import ndimage as ndi

    from qnkit.synth.hilum import add_hilar_structures
    from qnkit.synth.sinus import carve_sinus

    spacing = (2.0, 2.0, 2.0)
    drawn = 0
    for seed in range(6):
        tissue, labels = _hilum_body(side, spacing)
        carve_sinus(np.random.default_rng(seed), tissue, labels, spacing)
        before_t, before_l = tissue.copy(), labels.copy()
        record = add_hilar_structures(np.random.default_rng(seed), tissue, labels, spacing)
        assert np.array_equal(labels, before_l)
        changed = tissue != before_t
        assert (before_t[changed] == LABEL["body"]).all()
        assert set(np.unique(tissue[changed]).tolist()) <= {LABEL["vein"], LABEL["artery"], LABEL["collecting_system"]}
        other = "left" if side == "right" else "right"
        assert record[other] == {}
        kidney = ndi.binary_dilation((before_t == LABEL[f"kidney_{side}"]) | (before_t == LABEL["renal_sinus"]),
                                     iterations=2)
        centre_col = np.argwhere(labels > 0)[:, 2].mean()
        for name, target in (("vein", "vein"), ("artery", "artery")):
            new = changed & (tissue == LABEL[name])
            if f"{name}_ml" not in record[side]:
                assert not new.any()
                continue
            drawn += 1
            assert record[side][f"{name}_ml"] == pytest.approx(new.sum() * 8 / 1000, abs=0.01)
            assert (new & kidney).any(), f"the {name} starts at the kidney"
            assert (ndi.binary_dilation(new, iterations=2) & (before_t == LABEL[target])).any(), f"{name} reaches"
            cols = np.argwhere(new)[:, 2]
            assert ((cols > centre_col).mean() if side == "right" else (cols < centre_col).mean()) > 0.9
        if side == "left" and "vein_ml" in record[side]:  # it crosses in front of the aorta
            vein = changed & (tissue == LABEL["vein"])
            across = vein[:, :, 58:63]
            assert across.any() and np.argwhere(across)[:, 1].max() < 30
        ureter = changed & (tissue == LABEL["collecting_system"])
        assert ureter.any() == ("ureter_ml" in record[side])
        if ureter.any():
            assert np.argwhere(ureter)[:, 0].max() >= tissue.shape[0] - 4  # where it passes in front of the vessels
            assert np.argwhere(ureter)[:, 0].min() < np.argwhere(labels > 0)[:, 0].max()
    assert drawn >= 6


def test_hilar_structures_skip_small_or_absent_kidneys():
    from qnkit.synth.hilum import add_hilar_structures

    small = _ellipsoid_kidney(radii_mm=(20, 14, 12))  # ~14 mL
    tissue = np.where(small, LABEL["kidney_left"], LABEL["body"]).astype(np.uint8)
    before = tissue.copy()
    assert add_hilar_structures(np.random.default_rng(0), tissue, small.astype(np.uint8), (2.0, 2.0, 2.0)) == \
        {"right": {}, "left": {}}
    assert np.array_equal(tissue, before)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pelvis_fills_the_sinus_nearest_the_hilum(side):
    """Version 7's pelvis is sinus turned into renal pelvis, the share recorded, nearest the hilum first;
    labels and everything outside the sinus stay as they were."""
    from qnkit.synth.hilum import PELVIS_SHARE, _hilum_point, fill_pelvis
    from qnkit.synth.sinus import carve_sinus

    spacing = (2.0, 2.0, 2.0)
    filled = 0
    for seed in range(6):
        tissue, labels = _hilum_body(side, spacing)
        carve_sinus(np.random.default_rng(seed), tissue, labels, spacing)
        if not (tissue == LABEL["renal_sinus"]).any():
            continue
        before_t, before_l = tissue.copy(), labels.copy()
        kidney = (tissue == LABEL[f"kidney_{side}"]) & (labels > 0)
        hilum = _hilum_point(tissue, kidney, np.asarray(spacing), 1.0 if side == "right" else -1.0)
        record = fill_pelvis(np.random.default_rng(seed), tissue, labels, spacing)
        assert np.array_equal(labels, before_l)
        changed = tissue != before_t
        assert (before_t[changed] == LABEL["renal_sinus"]).all()
        assert (tissue[changed] == LABEL["renal_pelvis"]).all()
        sinus = before_t == LABEL["renal_sinus"]
        assert record[side] == pytest.approx(changed.sum() / sinus.sum(), abs=1e-3)
        if record[side] == 0.0:
            continue
        filled += 1
        assert PELVIS_SHARE[0] - 0.05 <= record[side] <= PELVIS_SHARE[1] + 0.05
        distance = lambda m: np.sqrt((((np.argwhere(m) - hilum) * spacing) ** 2).sum(axis=1))  # noqa: E731
        if (sinus & ~changed).any():
            assert distance(changed).max() <= distance(sinus & ~changed).min() + 1e-6
    assert filled >= 3


def test_versions_6_and_7_draw_the_hilum_and_keep_version_5_elsewhere():
    """Version 6 is version 5's bodies and labels to the voxel, with hilar structures added (recorded per side):
    the image changes only from the kidneys' top downwards, and not at all above them."""
    drawn = 0
    for index in range(2):
        v6 = make_anatomy_case(index, seed=3, version=6, **COARSE)
        v5 = make_anatomy_case(index, seed=3, version=5, **COARSE)
        record = v6.kits_entry()["qnkit_synth"]
        assert record["recipe_version"] == 6 and set(record["hilum"]) == {"right", "left"}
        assert np.array_equal(v6.segmentation, v5.segmentation)
        top = int(np.argwhere(v5.segmentation > 0)[:, 0].min())
        assert np.array_equal(v6.imaging[: max(0, top - 8)], v5.imaging[: max(0, top - 8)])
        drawn += sum(len(r) for r in record["hilum"].values())
        if any(record["hilum"].values()):
            assert not np.array_equal(v6.imaging, v5.imaging)
        v7 = make_anatomy_case(index, seed=3, version=7, **COARSE)
        pelvis = v7.kits_entry()["qnkit_synth"]["pelvis"]
        assert np.array_equal(v7.segmentation, v5.segmentation) and set(pelvis) == {"right", "left"}
        assert v7.kits_entry()["qnkit_synth"]["hilum"] == record["hilum"]
        assert np.array_equal(v7.imaging[: max(0, top - 8)], v5.imaging[: max(0, top - 8)])
        for case in (v5, v6, v7):  # hard negatives from version 5 on: background inside and beside the kidneys
            assert case.hard_negatives.dtype == np.uint8 and case.hard_negatives.shape == case.segmentation.shape
            assert case.hard_negatives.any() and not (case.segmentation[case.hard_negatives > 0]).any()
        assert (v6.hard_negatives >= v5.hard_negatives).all()  # version 6 adds the hilum's tubes to the sinus
    assert drawn


def test_hard_negatives_are_the_sinus_and_the_hilum_beside_the_kidney():
    """The mask is the carved sinus with its pelvis and the hilar tubes within NEAR_VOXELS of kidney or sinus, all
    background: the tubes' far reaches, the great vessels and other tissue are not in it."""
    from scipy import ndimage as ndi

    from qnkit.synth.hilum import NEAR_VOXELS, add_hilar_structures, fill_pelvis, hard_negative_mask, sinus_and_hilum
    from qnkit.synth.sinus import carve_sinus

    tissue, labels = _hilum_body("left")
    rng = np.random.default_rng(1)
    carve_sinus(rng, tissue, labels, (2.0, 2.0, 2.0))
    add_hilar_structures(rng, tissue, labels, (2.0, 2.0, 2.0))
    fill_pelvis(rng, tissue, labels, (2.0, 2.0, 2.0))
    sinus_ref = np.isin(tissue, [LABEL["renal_sinus"], LABEL["renal_pelvis"]])
    near = ndi.binary_dilation((labels > 0) | sinus_ref, iterations=NEAR_VOXELS)  # over the whole volume
    hilum_ref = near & np.isin(tissue, [LABEL["vein"], LABEL["artery"], LABEL["collecting_system"]])
    sinus, hilum = sinus_and_hilum(tissue, labels)
    assert sinus.any() and hilum.any()
    np.testing.assert_array_equal(sinus, sinus_ref & (labels == 0))
    np.testing.assert_array_equal(hilum, hilum_ref & (labels == 0))
    mask = hard_negative_mask(tissue, labels)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (sinus | hilum).astype(np.uint8))
    tubes = np.isin(tissue, [LABEL["vein"], LABEL["artery"], LABEL["collecting_system"]])
    assert (tubes & ~near).any() and not mask[tubes & ~near].any()  # the great vessels, the ureter further down
    assert not hard_negative_mask(np.full((4, 5, 6), LABEL["body"], np.uint8), np.zeros((4, 5, 6), np.uint8)).any()


def test_writer_writes_hard_negatives_and_drops_a_stale_one(tmp_path):
    from qnkit.synth.classic import HARD_NEGATIVES_NAME, SynthCase
    from qnkit.synth.writer import write_case

    labels = np.zeros((4, 32, 32), np.uint8)
    labels[1:3, 8:20, 8:20] = 1
    hard = np.zeros_like(labels)
    hard[1:3, 12:15, 12:15] = 1
    case = SynthCase("case_00000", np.zeros(labels.shape, np.int16), labels, np.eye(4), 0.0, hard_negatives=hard)
    folder = write_case(case, tmp_path)
    np.testing.assert_array_equal(np.asarray(nib.load(str(folder / HARD_NEGATIVES_NAME)).dataobj), hard)
    write_case(SynthCase("case_00000", case.imaging, labels, np.eye(4), 0.0), tmp_path)
    assert not (folder / HARD_NEGATIVES_NAME).exists()


# --------------------------------------------------------------------------- contrast phase mix


def test_phase_probabilities_are_scaled_and_checked():
    from qnkit.synth.appearance import PHASE_P, phase_probabilities

    assert phase_probabilities([2, 0, 1, 1]) == (0.5, 0.0, 0.25, 0.25)
    assert phase_probabilities(PHASE_P) == pytest.approx(PHASE_P)
    for bad in ([1, 1, 1], [1, -1, 1, 1], [0, 0, 0, 0], [float("nan"), 1, 1, 1]):
        with pytest.raises(ValueError, match="phase weights"):
            phase_probabilities(bad)


def test_phase_weights_choose_the_phase_and_keep_the_bodies():
    from qnkit.synth.appearance import PHASES

    default = make_anatomy_case(1, seed=4, **COARSE)
    by_phase = {}
    for i, phase in enumerate(PHASES):
        weights = [0.0] * len(PHASES)
        weights[i] = 1.0
        case = by_phase[phase] = make_anatomy_case(1, seed=4, phase_weights=weights, **COARSE)
        record = case.kits_entry()["qnkit_synth"]
        assert record["phase"] == phase and record["phase_probabilities"][phase] == 1.0
        assert np.array_equal(case.segmentation, default.segmentation)  # same body, another look
    assert default.kits_entry()["qnkit_synth"]["phase_probabilities"]["unenhanced"] == 0.15
    kidney = default.segmentation > 0
    assert kidney.any()
    # an unenhanced kidney is soft tissue, an excretory one is enhanced
    assert np.median(by_phase["unenhanced"].imaging[kidney]) < np.median(by_phase["excretory"].imaging[kidney])
