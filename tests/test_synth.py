"""qnkit.synth and `qnkit synth`: KiTS19 layout, determinism, kits.json, difficulty, real label geometry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import pdist

from qnkit.errors import QnkitInputError
from qnkit.synth import SLICE_THICKNESSES, make_case, max_slices, write_case, write_dataset

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19-labels"
needs_real = pytest.mark.skipif(
    not any(REAL_LABELS.glob("case_*/segmentation.nii.gz")), reason="shared real KiTS19 labels not available"
)

SIZE = 128
CASES = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth128") / "data"
    folders = write_dataset(out, cases=CASES, size=SIZE, seed=3, progress=False)
    assert [f.name for f in folders] == [f"case_{i:05d}" for i in range(CASES)]
    return out


def _load(folder: Path):
    img = nib.load(str(folder / "imaging.nii.gz"))
    seg = nib.load(str(folder / "segmentation.nii.gz"))
    return img, seg, np.asarray(img.dataobj), np.asarray(seg.dataobj)


def best_threshold_dice(ct: np.ndarray, seg: np.ndarray, step: int = 5) -> float:
    """Best Dice against kidney+tumor of any HU interval [a, b) on a `step` HU grid."""
    edges = np.arange(-1024, 3072 + step, step)
    hist_all, _ = np.histogram(ct, edges)
    hist_fg, _ = np.histogram(ct[seg > 0], edges)
    c_all = np.concatenate([[0], np.cumsum(hist_all)])
    c_fg = np.concatenate([[0], np.cumsum(hist_fg)])
    pred = c_all[None, :] - c_all[:, None]  # voxels with a <= HU < b
    tp = c_fg[None, :] - c_fg[:, None]
    n_fg = int((seg > 0).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(pred > 0, 2.0 * tp / (pred + n_fg), 0.0)
    return float(np.nanmax(dice))


def _midline_col(ct: np.ndarray) -> float:
    """Column of the body's centre of mass (voxels denser than -500 HU)."""
    return float(np.argwhere(ct > -500)[:, 2].mean())


# --------------------------------------------------------------------------- layout


def test_files_have_the_kits19_layout(dataset):
    for i in range(CASES):
        img, seg, ct, lab = _load(dataset / f"case_{i:05d}")
        assert ct.shape == lab.shape and ct.ndim == 3
        assert ct.shape[1:] == (SIZE, SIZE)
        assert 8 <= ct.shape[0] <= max_slices(SIZE)
        assert img.get_data_dtype() == np.int16 and ct.dtype == np.int16
        assert seg.get_data_dtype() == np.uint8 and lab.dtype == np.uint8
        for im in (img, seg):
            assert nib.aff2axcodes(im.affine) == ("I", "P", "L")
            assert int(im.header["sform_code"]) == 2
            assert int(im.header["qform_code"]) == 0
            a = im.affine
            px, dz = -a[0, 2], -a[2, 0]
            assert np.allclose(a, [[0, 0, -px, 0], [0, -px, 0, 0], [-dz, 0, 0, 0], [0, 0, 0, 1]])
            assert 0.6 * 512 / SIZE - 1e-6 <= px <= 0.95 * 512 / SIZE + 1e-6
            assert dz in SLICE_THICKNESSES or dz >= 1.0
            assert np.allclose(im.header.get_zooms(), (dz, px, px))
        np.testing.assert_array_equal(img.affine, seg.affine)
        assert set(np.unique(lab).tolist()) <= {0, 1, 2}
        # air outside, fat, soft tissue and bone inside
        assert ct.min() <= -950 and ct.max() >= 400
        assert ((ct > -150) & (ct < -50)).mean() > 0.02
        # two kidneys, one on each side of the body's midline, each a big 3-D component
        mid = _midline_col(ct)
        comps, n = ndi.label(lab > 0)
        sizes = ndi.sum(lab > 0, comps, range(1, n + 1))
        big = [k + 1 for k in np.argsort(sizes)[::-1][:2]]
        cols = sorted(float(np.argwhere(comps == k)[:, 2].mean()) for k in big)
        assert cols[0] < mid < cols[1]
        assert min(sizes[k - 1] for k in big) > 300
        # every slice is a full slice of an abdomen (body present in each)
        assert ((ct > -500).sum(axis=(1, 2)) > 0.2 * SIZE * SIZE).all()


def test_kidneys_have_cortex_brighter_than_medulla(dataset):
    img, _, ct, lab = _load(dataset / "case_00000")
    kid = lab == 1
    inner = ndi.binary_erosion(kid, iterations=2)
    rim = kid & ~ndi.binary_erosion(kid)
    assert inner.any()
    assert np.median(ct[rim & ~ndi.binary_dilation(lab == 2)]) > np.median(ct[inner]) + 20


def test_tumors_vary_and_touch_a_kidney():
    with_tumor = without = 0
    for i in range(16):
        case = make_case(i, size=64, seed=0)
        tumor = case.segmentation == 2
        if tumor.any():
            with_tumor += 1
            assert case.radiographic_size > 0
            assert (ndi.binary_dilation(tumor, iterations=2) & (case.segmentation == 1)).any()
        else:
            without += 1
            assert case.radiographic_size == 0.0
    assert with_tumor >= 8 and without >= 1


def test_kits_json(dataset):
    entries = json.loads((dataset / "kits.json").read_text())
    assert [e["case_id"] for e in entries] == [f"case_{i:05d}" for i in range(CASES)]
    for e in entries:
        lab = np.asarray(nib.load(str(dataset / e["case_id"] / "segmentation.nii.gz")).dataobj)
        affine = nib.load(str(dataset / e["case_id"] / "segmentation.nii.gz")).affine
        size = e["radiographic_size"]
        assert isinstance(size, float) and 0.0 <= size <= 10.0
        idx = np.argwhere(lab == 2)
        if len(idx) < 2:
            assert size == 0.0
        else:
            pts = idx @ affine[:3, :3].T
            assert size == pytest.approx(pdist(pts).max() / 10.0, abs=0.02)
        assert e["synthetic"] is True and e["size"] == SIZE


def test_no_temporary_files_left(dataset):
    names = sorted(p.name for p in dataset.iterdir())
    assert names == sorted(["kits.json"] + [f"case_{i:05d}" for i in range(CASES)])
    for i in range(CASES):
        assert sorted(p.name for p in (dataset / f"case_{i:05d}").iterdir()) == [
            "imaging.nii.gz", "segmentation.nii.gz"]


# --------------------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_case_count(dataset, tmp_path):
    a = make_case(1, size=SIZE, seed=3)
    b = make_case(1, size=SIZE, seed=3)
    assert a.imaging.tobytes() == b.imaging.tobytes()
    assert a.segmentation.tobytes() == b.segmentation.tobytes()
    np.testing.assert_array_equal(a.affine, b.affine)
    # the same case from a 6-case dataset and from a 2-case dataset
    write_dataset(tmp_path, cases=2, size=SIZE, seed=3, progress=False)
    for folder in (dataset, tmp_path):
        _, _, ct, lab = _load(folder / "case_00001")
        np.testing.assert_array_equal(ct, a.imaging)
        np.testing.assert_array_equal(lab, a.segmentation)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):  # the files themselves are byte-identical
        assert (dataset / "case_00001" / name).read_bytes() == (tmp_path / "case_00001" / name).read_bytes()
    other = make_case(1, size=SIZE, seed=4)
    assert other.imaging.shape != a.imaging.shape or not np.array_equal(other.imaging, a.imaging)
    assert not np.array_equal(make_case(2, size=SIZE, seed=3).imaging[:4], a.imaging[:4])


# --------------------------------------------------------------------------- difficulty


def test_a_fixed_hu_window_does_not_segment_the_kidneys(dataset):
    cts, labs = [], []
    for i in range(CASES):
        _, _, ct, lab = _load(dataset / f"case_{i:05d}")
        assert best_threshold_dice(ct, lab) < 0.8  # even with the best window chosen per case
        cts.append(ct.ravel())
        labs.append(lab.ravel())
    assert best_threshold_dice(np.concatenate(cts), np.concatenate(labs)) < 0.7


def test_full_size_case():
    case = make_case(0, size=512, seed=1)
    z, h, w = case.imaging.shape
    assert (h, w) == (512, 512) and z <= max_slices(512) <= 160
    assert 0.6 <= -case.affine[0, 2] <= 0.95
    assert best_threshold_dice(case.imaging, case.segmentation) < 0.8


# --------------------------------------------------------------------------- single kidney


@pytest.mark.parametrize("side", ["left", "right"])
def test_single_kidney_is_on_the_patients_side(side, tmp_path):
    for i in range(3):
        case = make_case(i, size=64, seed=0, kidneys=side)
        folder = write_case(case, tmp_path / side)
        img, seg, ct, lab = _load(folder)
        assert (lab > 0).any()
        # world (RAS+) x of the kidney centroid relative to the body's: in RAS+ the patient's
        # left is -x (nibabel axcodes 'L' for the column axis of a KiTS19 affine).
        kid = np.argwhere(lab > 0).mean(axis=0)
        body = np.argwhere(ct > -500).mean(axis=0)
        dx = (nib.affines.apply_affine(seg.affine, kid) - nib.affines.apply_affine(seg.affine, body))[0]
        assert (dx < -20) if side == "left" else (dx > 20)
        # nothing on the other side of the spine
        cols = np.argwhere(lab > 0)[:, 2]
        mid = _midline_col(ct)
        assert (cols > mid).all() if side == "left" else (cols < mid).all()
        assert case.meta["kidneys"] == side


# --------------------------------------------------------------------------- real label geometry


def _majority(real: np.ndarray, size: int) -> np.ndarray:
    z, h, w = real.shape
    f = h // size
    blocks = real.reshape(z, size, f, size, f).transpose(0, 1, 3, 2, 4).reshape(z, size, size, f * f)
    counts = np.stack([(blocks == v).sum(-1) for v in (2, 1, 0)], axis=-1)  # ties -> higher label
    return np.array([2, 1, 0], dtype=np.uint8)[counts.argmax(-1)]


@needs_real
def test_labels_from_real_kits19(tmp_path):
    sources = sorted(REAL_LABELS.glob("case_*/segmentation.nii.gz"))
    out = tmp_path / "out"
    write_dataset(out, cases=2, size=SIZE, seed=0, labels_from=REAL_LABELS, progress=False)
    kits = {e["case_id"]: e["radiographic_size"] for e in json.loads((REAL_LABELS / "kits.json").read_text())}
    entries = json.loads((out / "kits.json").read_text())
    for i, entry in enumerate(entries):
        real_img = nib.load(str(sources[i]))
        real = np.asarray(real_img.dataobj)
        img, seg, ct, lab = _load(out / f"case_{i:05d}")
        assert lab.shape == (real.shape[0], SIZE, SIZE) and ct.shape == lab.shape
        np.testing.assert_array_equal(lab, _majority(real, SIZE))
        assert nib.aff2axcodes(seg.affine) == ("I", "P", "L")
        zooms = real_img.header.get_zooms()
        f = real.shape[1] / SIZE
        assert np.allclose(seg.header.get_zooms(), (zooms[0], zooms[1] * f, zooms[2] * f), rtol=1e-5)
        assert int(seg.header["sform_code"]) == 2
        assert entry["source_case"] == sources[i].parent.name
        assert entry["radiographic_size"] == kits[sources[i].parent.name]
        # anatomy around the real kidneys: body everywhere, kidneys inside it, still not a threshold task
        assert (ct[lab > 0] > -300).mean() > 0.95
        assert best_threshold_dice(ct, lab) < 0.8


@needs_real
def test_labels_from_cycles_and_computes_size_without_kits_json(tmp_path):
    sources = sorted(REAL_LABELS.glob("case_*/segmentation.nii.gz"))
    n = len(sources)
    again = make_case(n, size=64, seed=0, labels_from=REAL_LABELS)
    first = make_case(0, size=64, seed=0, labels_from=REAL_LABELS)
    np.testing.assert_array_equal(again.segmentation, first.segmentation)
    assert again.meta["source_case"] == first.meta["source_case"] == sources[0].parent.name
    # without kits.json the size comes from the mask
    src = tmp_path / "labels"
    (src / sources[0].parent.name).mkdir(parents=True)
    shutil.copy(sources[0], src / sources[0].parent.name / "segmentation.nii.gz")
    case = make_case(0, size=64, seed=0, labels_from=src)
    idx = np.argwhere(case.segmentation == 2)
    assert case.radiographic_size == pytest.approx(pdist(idx @ case.affine[:3, :3].T).max() / 10.0, abs=0.02)
    # single-kidney phantoms from real labels keep one side only
    left = make_case(0, size=64, seed=0, labels_from=src, kidneys="left")
    cols = np.argwhere(left.segmentation > 0)[:, 2]
    assert cols.size and (cols > 32).all()


# --------------------------------------------------------------------------- errors


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(QnkitInputError, match="size"):
        make_case(0, size=33)
    with pytest.raises(QnkitInputError, match="size"):
        make_case(0, size=16)
    with pytest.raises(QnkitInputError, match="kidneys"):
        make_case(0, size=64, kidneys="middle")
    with pytest.raises(QnkitInputError, match="cases"):
        write_dataset(tmp_path / "o", cases=0, size=64)
    with pytest.raises(QnkitInputError, match="seed"):
        write_dataset(tmp_path / "o", cases=1, size=64, seed=-1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(QnkitInputError, match="not a folder"):
        write_dataset(afile, cases=1, size=64, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QnkitInputError, match="segmentation"):
        write_dataset(tmp_path / "o", cases=1, size=64, labels_from=tmp_path / "empty", progress=False)
    with pytest.raises(QnkitInputError, match="does not exist"):
        make_case(0, size=64, labels_from=tmp_path / "missing")
    bad = tmp_path / "bad" / "case_00000"
    bad.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full((2, 4, 4), 7, np.uint8), np.eye(4)), str(bad / "segmentation.nii.gz"))
    with pytest.raises(QnkitInputError, match="labels"):
        make_case(0, size=64, labels_from=tmp_path / "bad")
    # a kits.json that qnkit synth did not write is never overwritten
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "kits.json").write_text(json.dumps([{"case_id": "case_00000", "radiographic_size": 3.0}]))
    with pytest.raises(QnkitInputError, match="refusing"):
        write_dataset(foreign, cases=1, size=64, progress=False)
    assert not (foreign / "case_00000").exists()
    # nor are case files that it did not write (its own are regenerated)
    other = tmp_path / "other"
    (other / "case_00001").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 4, 4), np.uint8), np.eye(4)), str(other / "case_00001" / "segmentation.nii.gz"))
    before = (other / "case_00001" / "segmentation.nii.gz").read_bytes()
    write_dataset(other, cases=1, size=64, progress=False)
    write_dataset(other, cases=1, size=64, progress=False)
    with pytest.raises(QnkitInputError, match="refusing"):
        write_dataset(other, cases=2, size=64, progress=False)
    assert (other / "case_00001" / "segmentation.nii.gz").read_bytes() == before
    assert not (other / "case_00001" / "imaging.nii.gz").exists()


# --------------------------------------------------------------------------- CLI


def _one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli(tmp_path, run_qnkit):
    out = tmp_path / "cli"
    proc = run_qnkit("synth", out, "--cases", "2", "--size", "64", "--seed", "7", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert [e["case_id"] for e in json.loads((out / "kits.json").read_text())] == ["case_00000", "case_00001"]
    _, _, ct, _ = _load(out / "case_00001")
    np.testing.assert_array_equal(ct, make_case(1, size=64, seed=7).imaging)

    proc = run_qnkit("synth", tmp_path / "x", "--cases", "1", "--size", "63")
    assert proc.returncode == 2
    assert "size" in _one_line(proc) and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--size", "16"], "size"),
        (["--cases", "0"], "cases"),
        (["--seed", "-3"], "seed"),
        (["--kidneys", "middle"], "kidneys"),
        (["--labels-from", "{tmp}/nope"], "labels-from"),
        (["--labels-from", "{tmp}"], "segmentation"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, words, tmp_path, capsys):
    from qnkit.cli import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "out"), "--no-progress", *args])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_output_that_is_a_file(tmp_path, capsys):
    from qnkit.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(afile), "--cases", "1", "--size", "64"])
    assert exc.value.code == 2
    assert "not a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_cli_help():
    from typer.testing import CliRunner

    from qnkit.cli import app

    result = CliRunner().invoke(app, ["synth", "--help"])
    assert result.exit_code == 0
    for option in ("--cases", "--size", "--seed", "--labels-from"):
        assert option in result.output
