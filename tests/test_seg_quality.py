"""The per-kidney quality verdict in the DICOM SEG (issue 26): a Segment Description for people and algorithm
parameters for code, valid for dciodvfy and read back by `read_seg_quality`; a SEG without quality is as before.

SEGs are built on the real series (tests/dicom_cases.py, every other slice) with box-shaped kidneys and
their real model-free signals; one run of `qnkit segment --quality` with the shipped model checks the wiring.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import dicom_cases as D
from qnkit import quality as Q
from qnkit.dicom.output import Algorithm
from qnkit.dicom.seg import LO_MAX, quality_description, read_seg_quality, write_seg
from qnkit.dicom.series import load_series
from test_dicom import _cli, _dciodvfy_errors

ALGORITHM = Algorithm("qnkit", "0.1.0", "ab" * 32)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(folder, CT, Geometry, source, sides): the referable series with a box per kidney."""
    folder = D.referable_series(tmp_path_factory.mktemp("seg_quality") / "series", decompress=True, every=2)
    ct, geometry, source = load_series(folder)
    sides = np.zeros(ct.shape, np.uint8)
    z = slice(2, ct.shape[0] - 2)
    sides[z, 200:300, 120:200] = 1
    sides[z, 200:300, 320:400] = 2
    return folder, ct, geometry, source, sides


def _quality(ct, sides, geometry) -> dict:
    calibration, source = Q.DEFAULT_CALIBRATION, "default: the bundle records no calibration"
    return Q.kidney_quality(sides, ct, geometry.spacing, None, calibration, source)


def test_seg_with_quality_is_valid_and_reads_back(series, tmp_path):
    import highdicom as hd
    import pydicom

    _, ct, geometry, source, sides = series
    quality = _quality(ct, sides, geometry)
    path = write_seg(sides, geometry, source, tmp_path / "q.dcm", algorithm=ALGORITHM, quality=quality)
    assert _dciodvfy_errors(path) == []
    back = read_seg_quality(path)
    for side in ("right", "left"):
        written, read = quality[side], back[side]
        assert read["verdict"] == written["verdict"] and read["score"] == written["score"]
        assert read["signals"] == written["signals"] and read["samples"] == 0
        assert read["calibration"] == written["calibration"]
        assert read["description"] == quality_description(written)
        assert read["description"].startswith(f"quality {written['verdict']} {written['score']:.2f}")
        assert len(read["flagged"]) == len(written["reasons"])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for segment in ds.SegmentSequence:
        parameters = hd.AlgorithmIdentificationSequence.from_sequence(
            segment.SegmentationAlgorithmIdentificationSequence).parameters  # highdicom's own parser
        assert parameters["model_sha256"] == ALGORITHM.model_sha256 and "quality_verdict" in parameters


def test_an_absent_kidney_has_no_quality_in_its_segment(series, tmp_path):
    _, ct, geometry, source, sides = series
    only_right = np.where(sides == 1, 1, 0).astype(np.uint8)
    quality = _quality(ct, only_right, geometry)
    assert quality["left"] is None
    path = write_seg(only_right, geometry, source, tmp_path / "right.dcm", algorithm=ALGORITHM, quality=quality)
    back = read_seg_quality(path)
    assert back["left"] is None and back["right"]["verdict"] == quality["right"]["verdict"]


def test_seg_without_quality_is_as_before(series, tmp_path):
    import pydicom

    _, _, geometry, source, sides = series
    path = write_seg(sides, geometry, source, tmp_path / "plain.dcm", algorithm=ALGORITHM)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for segment in ds.SegmentSequence:
        assert "SegmentDescription" not in segment
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmParameters == f"model_sha256={ALGORITHM.model_sha256}"
    assert read_seg_quality(path) == {"right": None, "left": None}


def test_description_fits_a_long_string():
    reasons = [f"{Q.REASONS[k]} ({k} 9 > 1)" for k in Q.SIGNALS]
    text = quality_description({"verdict": "check", "score": 12.3456, "reasons": reasons})
    assert len(text) <= LO_MAX and "\\" not in text
    assert text == "quality check 12.35: dropout samples disagree +7 more"
    two = quality_description({"verdict": "check", "score": 1.8, "reasons": reasons[6:8]})
    assert two == "quality check 1.80: irregular shape; touches the volume's edge"
    assert quality_description({"verdict": "ok", "score": 0.41, "reasons": []}) == "quality ok 0.41"
    odd = quality_description({"verdict": "check", "score": 2.0, "reasons": ["a\\b\tc (x 1 > 0)"]})
    assert odd == "quality check 2.00: a/b c"


def test_segment_command_with_quality_writes_it_into_the_seg(series, tmp_path):
    """`qnkit segment --quality --format seg` with the shipped model: the SEG carries the stats' verdicts."""
    folder = series[0]
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    code, stderr = _cli("segment", folder, "--quality", "--format", "seg", "--out", out, "--stats", stats,
                        "--no-progress")
    assert code == 0, stderr
    (seg,) = out.glob("*_seg.dcm")
    assert _dciodvfy_errors(seg) == []
    kidneys = json.loads(stats.read_text())["cases"][0]["kidneys"]
    back = read_seg_quality(seg)
    assert any(kidneys[side]["quality"] is not None for side in ("right", "left"))
    for side in ("right", "left"):
        written = kidneys[side]["quality"]
        if written is None:
            assert back[side] is None
            continue
        assert (back[side]["verdict"], back[side]["score"]) == (written["verdict"], written["score"])
        assert back[side]["signals"] == written["signals"]


def test_uncertainty_map_and_preview_are_written_after_the_batch(series, tmp_path):
    """`--uncertainty 2 --uncertainty-map` writes the voxel-wise disagreement on the input's grid (it was
    silently skipped: the batch dropped each result's geometry before the map was written)."""
    import nibabel as nib

    folder, ct = series[0], series[1]
    umap, preview = tmp_path / "u.nii.gz", tmp_path / "p.png"
    code, stderr = _cli("segment", folder, "--uncertainty", "2", "--uncertainty-map", umap, "--preview", preview,
                        "--out", tmp_path / "out", "--no-progress")
    assert code == 0, stderr
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = nib.load(umap)
    values = np.asarray(image.dataobj)
    assert sorted(values.shape) == sorted(ct.shape) and values.dtype == np.float32
    assert 0.0 <= values.min() and values.max() <= 1.0
