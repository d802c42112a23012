"""The preview PNG with the Monte-Carlo disagreement under the outlines and each kidney's verdict under the
title (issue 26), and the batch passing both from a result segmented with --quality --uncertainty N."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from qnkit import batch as B
from qnkit.preview import figure_title, quality_line, render_preview
from qnkit.uncertainty import KidneySamples

SPACING = (3.0, 1.0, 1.0)
QUALITY = {"right": {"verdict": "ok", "score": 0.4149}, "left": {"verdict": "check", "score": 1.8}}


@pytest.fixture(scope="module")
def case():
    """(CT, sides): soft tissue in air, a box per kidney; the views cut slice 14 and row 40."""
    ct = np.full((30, 80, 90), -1000, np.int16)
    ct[:, 10:70, 10:80] = 40
    sides = np.zeros(ct.shape, np.uint8)
    sides[10:19, 31:50, 15:35] = 1
    sides[10:19, 31:50, 55:75] = 2
    return ct, sides


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_overlay_draws_only_where_the_samples_disagree(case):
    ct, sides = case
    plain = _pixels(render_preview(ct, sides, SPACING))
    zeros = np.zeros(ct.shape, np.float32)
    agreeing = _pixels(render_preview(ct, sides, SPACING, uncertainty=zeros))
    assert plain.shape == agreeing.shape and not np.array_equal(plain, agreeing)  # the colour bar

    off_view = zeros.copy()
    off_view[2:5, 2:8, :] = 0.9  # neither slice 14 nor row 40: not in either view
    assert np.array_equal(_pixels(render_preview(ct, sides, SPACING, uncertainty=off_view)), agreeing)

    on_view = zeros.copy()
    on_view[12:17, 35:45, 20:30] = 0.8  # inside the right kidney, cut by both views
    changed = np.any(_pixels(render_preview(ct, sides, SPACING, uncertainty=on_view)) != agreeing, axis=-1)
    rows, cols = np.nonzero(changed)
    assert 0 < changed.sum() < 0.05 * changed.size
    assert rows.max() - rows.min() < changed.shape[0] // 2  # one patch per view, side by side


def test_overlay_must_be_on_the_sides_grid(case):
    ct, sides = case
    with pytest.raises(ValueError, match="not on the sides' grid"):
        render_preview(ct, sides, SPACING, uncertainty=np.zeros((2, 2, 2), np.float32))


def test_title_names_each_kidneys_verdict(case):
    assert quality_line(QUALITY) == "right ok 0.41 / left CHECK 1.80"
    assert quality_line({"right": None, "left": QUALITY["left"]}) == "left CHECK 1.80"
    assert quality_line(None) == "" and quality_line({"right": None, "left": None}) == ""
    assert figure_title("case: right 150 mL", QUALITY) == "case: right 150 mL\nright ok 0.41 / left CHECK 1.80"
    assert figure_title("case", None) == "case" and figure_title("", QUALITY) == quality_line(QUALITY)
    ct, sides = case
    assert _pixels(render_preview(ct, sides, SPACING, title="case", quality=QUALITY)).shape[-1] == 3


def _result(ct, sides, samples, quality=QUALITY):
    stats = {side: {"present": True, "quality": quality[side] if quality else None} for side in ("right", "left")}
    return SimpleNamespace(ct=ct, sides=sides, spacing=SPACING, samples=samples, stats=stats)


def test_batch_passes_the_full_volume_disagreement_and_the_verdicts(case, monkeypatch, tmp_path):
    import qnkit.preview
    import qnkit.report

    ct, sides = case
    box = (slice(8, 21), slice(28, 53), slice(12, 78))
    shape = tuple(s.stop - s.start for s in box)
    drawn = np.zeros((3, *shape), np.uint8)
    drawn[:2, 3:6, 4:9, 5:20] = 1
    samples = KidneySamples(box=box, samples=drawn, mirror=np.zeros(shape, np.uint8), seed=0)
    seen = {}
    monkeypatch.setattr(qnkit.preview, "render_preview", lambda *a, **kw: seen.update(kw) or b"png")
    monkeypatch.setattr(qnkit.report, "describe_sides", lambda stats: "sides")
    B._write_preview(_result(ct, sides, samples), tmp_path / "p.png", SimpleNamespace(hu_window=(-200, 400)), "c")
    volume = seen["uncertainty"]
    assert volume.shape == sides.shape and volume.dtype == np.float32
    assert np.array_equal(volume[box], samples.voxel_uncertainty()) and volume.sum() == volume[box].sum() > 0
    assert seen["quality"] == QUALITY

    mirror_only = KidneySamples(box=box, samples=None, mirror=np.zeros(shape, np.uint8), seed=0)
    B._write_preview(_result(ct, sides, mirror_only, quality=None), tmp_path / "q.png",
                     SimpleNamespace(hu_window=(-200, 400)), "c")
    assert seen["uncertainty"] is None and seen["quality"] is None
