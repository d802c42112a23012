"""DICOM in (qnkit.dicom.series), DICOM SEG and RTSTRUCT out, through qnkit.batch and `qnkit segment`.

Cases are built from the one real CT series in shared/data (see tests/dicom_cases.py). Where a test
needs a non-empty segmentation it uses a stand-in predictor with a known answer (soft-tissue HU
threshold, `dicom_cases.hu_predictor`): the real pipeline, post-processing and writers run on it. One
real run of `qnkit segment` uses the session's small trained model (conftest `trained_run`).
Geometry is checked against SimpleITK's reading of the series, SEG and RTSTRUCT with dicom3tools'
`dciodvfy`, highdicom (SEG read back) and rt-utils (RTSTRUCT contours rasterised back).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dicom_cases as D
from qnkit import batch as B
from qnkit import io as qio
from qnkit.dicom.series import DicomError, load_series
from qnkit.errors import QnkitInputError

import pydicom  # noqa: F401
import highdicom  # noqa: F401
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """The referable real series (uncompressed; as shipped, JPEG 2000) and its variants (all the same CT)."""
    root = tmp_path_factory.mktemp("dicom_cases")
    ref = D.referable_series(root / "series", decompress=True)
    return {"folder": ref, "jpeg2000": D.referable_series(root / "jpeg2000"), "zip": D.zipped(ref, root / "archive.zip"),
            "shuffled": D.shuffled(ref, root / "shuffled"), "multiframe": D.multiframe(ref, root / "multiframe"),
            "rle": D.transcoded(ref, root / "rle", "rle"), "two-series": D.with_second_series(ref, root / "two-series"),
            "root": root}


def _sitk_grid(folder: Path, tmp: Path):
    """(CT, Geometry) of the series as SimpleITK reads it, through a NIfTI that SimpleITK writes."""
    import SimpleITK as sitk
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    path = tmp / "sitk.nii.gz"
    sitk.WriteImage(reader.Execute(), str(path))
    return qio.load_image(path)


@pytest.fixture(scope="module")
def sitk_geometry(cases, tmp_path_factory):
    return _sitk_grid(cases["folder"], tmp_path_factory.mktemp("sitk"))[1]


def _segment(case_path: Path, bundle_path: Path, out: Path, formats: str, series: str | None = None):
    """The library path `qnkit segment` takes, with the stand-in predictor."""
    from qnkit.bundle import load_bundle
    from qnkit.segment import SegmentOptions

    bundle = load_bundle(bundle_path)
    cases, batch = B.resolve_cases([case_path])
    plan = B.plan_outputs(cases, batch, out=out, formats=formats)
    done = B.segment_many(cases, bundle, SegmentOptions(), outputs=plan, series=series, stop_on_error=True,
                          predict=D.hu_predictor(30, 200, bundle.hu_window))
    return done, plan[cases[0].name]


def test_series_reads_on_simpleitk_grid(cases, tmp_path):
    """The series as shipped (JPEG 2000) against SimpleITK's reading of it."""
    ct, geometry, source = load_series(cases["jpeg2000"])
    ref_ct, ref_geometry = _sitk_grid(cases["jpeg2000"], tmp_path)
    qio.check_same_grid(geometry, ref_geometry, atol=1e-4)
    assert np.array_equal(ct.astype(np.int32), ref_ct.astype(np.int32))  # HU after RescaleSlope/Intercept
    assert ct.shape == (20, 512, 512) and ct.min() == -1024
    assert not source.multiframe and len(source.headers) == 20


@pytest.fixture(scope="module")
def reference_mask(cases, exported_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom_ref")
    done, outputs = _segment(cases["folder"], exported_bundle, out, "nifti,seg,rtstruct")
    img = nib.load(outputs.nifti)
    assert 0 < np.count_nonzero(np.asanyarray(img.dataobj)) and done.failures == []
    return img, outputs


@pytest.mark.parametrize("variant", ["zip", "shuffled", "multiframe"])
def test_variants_give_the_same_mask_on_the_simpleitk_grid(cases, exported_bundle, reference_mask, sitk_geometry,
                                                           variant, tmp_path):
    ref_img, _ = reference_mask
    done, outputs = _segment(cases[variant], exported_bundle, tmp_path, "nifti,seg")
    img = nib.load(outputs.nifti)
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref_img.dataobj))
    assert np.allclose(img.affine, ref_img.affine, atol=1e-4)
    qio.check_same_grid(qio.load_labels(outputs.nifti)[1], sitk_geometry, atol=1e-4)
    assert _dciodvfy_errors(outputs.seg) == []  # for multi-frame: one SEG frame per source frame
    assert np.array_equal(_seg_on_nifti_grid(outputs.seg, img) > 0, np.asanyarray(img.dataobj) > 0)


@pytest.mark.parametrize("variant", ["jpeg2000", "rle", "two-series"])
def test_transfer_syntaxes_and_other_objects_read_the_same_ct(cases, variant):
    """The mask is a function of the CT and its grid (tested above), so the same CT on the same grid
    gives the same mask: JPEG 2000 as shipped, RLE, and the series beside a second one and an SR."""
    ct, geometry, _ = load_series(cases["folder"])
    other, other_geometry, _ = load_series(cases[variant])
    assert np.array_equal(ct, other) and ct.dtype == other.dtype
    qio.check_same_grid(geometry, other_geometry, atol=1e-6)


def test_several_series_choose_the_largest_or_the_asked_one(cases):
    said = []
    ct, _, source = load_series(cases["two-series"], log=said.append)
    assert ct.shape[0] == 20 and source.uid == D.SERIES_UID
    assert len(said) == 1 and "2 CT series" in said[0] and "--series" in said[0]
    ct, _, source = load_series(cases["two-series"], "1.2.826.0.1.3680043.8.498.1005")
    assert ct.shape[0] == 8
    with pytest.raises(DicomError, match="no series 9.9"):
        load_series(cases["two-series"], "9.9")


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def _seg_on_nifti_grid(seg_path: Path, nifti: nib.Nifti1Image) -> np.ndarray:
    """The SEG (all segments) put on the NIfTI's voxel grid through both files' affines (no qnkit code)."""
    import highdicom as hd

    volume = hd.seg.segread(seg_path).get_volume(combine_segments=True)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    to_nifti = np.linalg.inv(nifti.affine) @ lps_to_ras @ volume.affine
    index = np.indices(volume.array.shape).reshape(3, -1)
    target = to_nifti[:3, :3] @ index + to_nifti[:3, 3:4]
    assert np.allclose(target, np.round(target), atol=1e-3), "SEG frames are not on the NIfTI grid"
    target = np.round(target).astype(int)
    out = np.zeros(nifti.shape, dtype=np.uint8)
    out[tuple(target)] = volume.array.reshape(-1) > 0
    return out


def test_seg_valid_and_equal_to_the_nifti_mask(reference_mask):
    import highdicom as hd

    img, outputs = reference_mask
    assert _dciodvfy_errors(outputs.seg) == []
    seg = hd.seg.segread(outputs.seg)
    assert seg.SegmentationType == "BINARY" and seg.SeriesInstanceUID != D.SERIES_UID
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == ["9846003", "18639004"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "qnkit" and len(algorithm.AlgorithmParameters.split("=")[-1]) >= 64
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == D.SERIES_UID
    assert seg.StudyInstanceUID == D.STUDY_UID and seg.PatientID == "QNKIT-TEST"
    mask = np.asanyarray(img.dataobj) > 0
    assert np.array_equal(_seg_on_nifti_grid(outputs.seg, img) > 0, mask)


def test_rtstruct_valid_and_rasterises_back(cases, reference_mask):
    import rt_utils
    from qnkit import kernels

    img, outputs = reference_mask
    assert _dciodvfy_errors(outputs.rtstruct) == []
    rt = rt_utils.RTStructBuilder.create_from(str(cases["folder"]), str(outputs.rtstruct))
    assert sorted(rt.get_roi_names()) == ["Left kidney", "Right kidney"]
    # rt-utils: [row, column, slice ascending along the normal]; the NIfTI of a DICOM series: [column, row, slice]
    drawn = sum(rt.get_roi_mask_by_name(n).astype(np.uint8) for n in rt.get_roi_names()).transpose(1, 0, 2)
    mask = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
    assert mask.sum() > 1000
    assert kernels.dice(drawn > 0, mask) >= 0.98


def test_contours_trace_pixel_centres():
    from qnkit.dicom.rtstruct import trace_contours

    square = np.zeros((6, 6), bool)
    square[1:4, 2:5] = True
    (contour,) = trace_contours(square)
    assert sorted(map(tuple, contour)) == sorted({(1, 2), (1, 3), (1, 4), (2, 4), (3, 4), (3, 3), (3, 2), (2, 2)})
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    outer, hole = trace_contours(ring)
    assert len(outer) == 16 and sorted(map(tuple, hole)) == sorted(
        (r, c) for r in (2, 3, 4) for c in (2, 3, 4) if (r, c) != (3, 3))


def test_outputs_never_go_into_a_dicom_input(cases):
    found, batch = B.resolve_cases([cases["folder"]])
    assert [c.name for c in found] == ["series"] and not batch
    plan = B.plan_outputs(found, batch, formats="nifti,seg,rtstruct")
    assert {p.parent for p in plan["series"].paths()} == {cases["folder"].parent}
    before = _files(cases["folder"])
    with pytest.raises(QnkitInputError, match="into a DICOM input folder"):
        B.plan_outputs(found, batch, out=cases["folder"] / "sub", formats="seg")
    assert _files(cases["folder"]) == before


# --- the command line -------------------------------------------------------------------------


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


BAD_SERIES = [("missing", "missing slice"), ("duplicate", "duplicate slices"), ("uneven", "uneven slice spacing"),
              ("tilt", "gantry tilt"), ("orientation", "mixed orientations"), ("size", "mixed sizes"),
              ("no-pixels", "no pixel data"), ("corrupt", "cannot decode pixel data"), ("not-ct", "no CT series"),
              ("frames", "2 frames of reference")]


def _cli(*args) -> tuple[int, str]:
    """`qnkit ARGS` through the CLI's own entry point in this process: (exit code, stderr)."""
    import contextlib
    import io

    from qnkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def _one_error_line(stderr: str, needle: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("backend:")]
    assert len(lines) == 1 and lines[0].startswith("qnkit: error: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind,needle", BAD_SERIES)
def test_bad_series_refused_with_one_line(exported_bundle, cases, tmp_path, kind, needle):
    folder = D.broken(cases["folder"], tmp_path / kind, kind)
    before = _files(tmp_path)
    code, stderr = _cli("segment", folder, "--model", exported_bundle, "--format", "nifti,seg,rtstruct",
                        "--no-progress")
    assert code == 2
    _one_error_line(stderr, needle)
    assert _files(tmp_path) == before


def test_bad_series_in_a_real_process(run_qnkit, exported_bundle, cases, tmp_path):
    folder = D.broken(cases["folder"], tmp_path / "tilt", "tilt")
    before = _files(tmp_path)
    proc = run_qnkit("segment", folder, "--model", exported_bundle, "--no-progress")
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "gantry tilt")
    assert _files(tmp_path) == before


def test_seg_needs_a_dicom_input_and_referable_uids(exported_bundle, cases, tmp_path):
    raw = D.anonymised(cases["folder"], tmp_path / "raw")  # as the shared series comes: no Study/Series UIDs
    code, stderr = _cli("segment", raw, "--model", exported_bundle, "--no-progress")
    assert code == 2
    _one_error_line(stderr, "has no StudyInstanceUID")
    assert "--format nifti" in stderr and not list(tmp_path.glob("raw_kidneys*"))
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), nifti)
    code, stderr = _cli("segment", nifti, "--model", exported_bundle, "--format", "seg")
    assert code == 2
    _one_error_line(stderr, "needs a DICOM input")


def test_segment_command_with_the_trained_model(run_qnkit, exported_bundle, cases, sitk_geometry):
    """One real run: the small trained model on the real series, all three formats, beside the input."""
    proc = run_qnkit("segment", cases["folder"], "--model", exported_bundle, "--format", "nifti,seg,rtstruct",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = cases["folder"].parent
    written = {p.name for p in out.iterdir() if p.name.startswith("series_kidneys")}
    assert written == {f"series_kidneys{suffix}" for suffix in (".nii.gz", "_seg.dcm", "_rtstruct.dcm")}
    try:
        nifti = nib.load(out / "series_kidneys.nii.gz")
        qio.check_same_grid(qio.load_labels(out / "series_kidneys.nii.gz")[1], sitk_geometry, atol=1e-4)
        assert np.array_equal(_seg_on_nifti_grid(out / "series_kidneys_seg.dcm", nifti) > 0,
                              np.asanyarray(nifti.dataobj) > 0)
        assert _dciodvfy_errors(out / "series_kidneys_seg.dcm") == []
        assert _dciodvfy_errors(out / "series_kidneys_rtstruct.dcm") == []
    finally:
        for name in written:  # the module's cases stay as they were for the other tests
            (out / name).unlink()
