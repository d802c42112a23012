"""Only the kidneys' slab is predicted: same mask as every slice, and a slab that grows by itself."""
from __future__ import annotations

import numpy as np
import pytest

from qnkit import io as qio
from qnkit.segment import SegmentOptions, predict_kidney_slab, segment_ct

HU = (-200.0, 400.0)


def threshold_model(x: np.ndarray) -> np.ndarray:
    """A stand-in network with a known answer: 'kidney' wherever the windowed image is above 0.6 (HU > 160)."""
    return (x > 0.6).astype(np.float32)


def _ct(z=60, hw=64):
    ct = np.full((z, hw, hw), -1000, dtype=np.int16)
    ct[:, 8:56, 8:56] = 40  # body
    return ct


def _run(ct, options, slice_mm=2.5):
    model = dict(hu_window=HU, spacing_hw=(1.0, 1.0), model_spacing=None, batch_size=8, threshold=0.5,
                 pad_multiple=16, timings={})
    return predict_kidney_slab(ct, threshold_model, slice_mm=slice_mm, options=options, **model)


def test_slab_mask_equals_every_slice():
    ct = _ct()
    ct[30:41, 20:40, 20:40] = 300
    mask, slab = _run(ct, SegmentOptions())
    full, every = _run(ct, SegmentOptions(slab=False))
    assert np.array_equal(mask, full) and mask[30:41].all(axis=0)[20:40, 20:40].all()
    assert slab["found"] and 0 < slab["start"] <= 30 and 41 <= slab["stop"] < 60
    assert slab["slices_run"] < every["slices_run"] == 60


def test_no_slice_is_predicted_twice():
    """The slab reuses the coarse pass's slices, and a grown slab only predicts its new slices: the
    network sees as many slices as the record says ran, each once."""
    ct = _ct()
    ct[20:41, 20:40, 20:40] = 300
    ct[2:20, 30:32, 30:32] = 300  # makes the slab grow
    for z in range(ct.shape[0]):
        ct[z, 8:10, 8:10] = z  # names each slice in its windowed image (model grid: 2x coarser)
    seen = []

    def counting_model(x):
        seen.extend(int(round(v)) for v in np.asarray(x)[:, 0, 4, 4] * 600 - 200)
        return threshold_model(x)

    model = dict(hu_window=HU, spacing_hw=(1.0, 1.0), model_spacing=None, batch_size=8, threshold=0.5,
                 pad_multiple=16, timings={})
    mask, slab = predict_kidney_slab(ct, counting_model, slice_mm=2.5, options=SegmentOptions(), **model)
    assert len(seen) == len(set(seen)) == slab["slices_run"] < ct.shape[0]
    assert slab["start"] <= 2 and np.array_equal(mask, _run(ct, SegmentOptions(slab=False))[0])


def test_slab_grows_while_the_mask_touches_its_end():
    ct = _ct()
    ct[20:41, 20:40, 20:40] = 300  # the part the coarse pass sees
    ct[2:20, 30:32, 30:32] = 300  # a thin part (4 mm^2) it does not, reaching past the first margin
    mask, slab = _run(ct, SegmentOptions())
    full, _ = _run(ct, SegmentOptions(slab=False))
    assert np.array_equal(mask, full)
    assert slab["start"] <= 2


def test_nothing_found_runs_every_slice():
    mask, slab = _run(_ct(), SegmentOptions())
    assert not mask.any() and slab["start"] == 0 and slab["stop"] == 60 and slab["found"] is False


@pytest.mark.slow
def test_slab_agrees_with_every_slice_on_phantoms(trained_run, synth_dataset):
    """The trained tiny model on the held-out phantoms: the slab mask agrees with every slice (Dice >= 0.99)."""
    import json

    from qnkit.inference import model_pixel_spacing
    from qnkit.nn.eager import make_predict_batch
    from qnkit.train import checkpoint as ckpt

    test = json.loads((trained_run / "evaluation_data.json").read_text())["test"]
    model, meta = ckpt.load_model(trained_run, "best")
    predict, spacing = make_predict_batch(model, "cpu"), model_pixel_spacing(meta)
    for case in test:
        ct, geometry = qio.load_image(synth_dataset / case / "imaging.nii.gz")
        masks = [segment_ct(ct, geometry, predict, hu_window=HU, model_spacing=spacing,
                            options=SegmentOptions(slab=slab))[0] > 0 for slab in (True, False)]
        inter = np.logical_and(*masks).sum()
        total = masks[0].sum() + masks[1].sum()
        assert total == 0 or 2 * inter / total >= 0.99, case


@pytest.mark.parametrize("model_spacing", [None, 2.5])
def test_mask_skips_only_slices_that_cannot_hold_kidney(model_spacing):
    """mask_to_input_grid (resampling only slices with a probability above the threshold) equals
    to_input_mask on every slice, near-threshold slices included."""
    from qnkit import inference
    from qnkit.segment import mask_to_input_grid

    rng = np.random.default_rng(3)
    shape_hw, spacing = (70, 66), (0.9, 0.9)
    grid = inference.model_grid_shape(shape_hw, spacing, model_spacing)
    probs = (rng.random((12, *grid)) * 0.4).astype(np.float32)
    probs[3, 5:9, 5:9] = 0.9
    probs[4] = 0.5  # exactly the threshold: not kidney
    probs[7, 2, 2] = np.nextafter(np.float32(0.5), np.float32(1))  # one pixel just above it
    probs[11] = 1.0
    expected = inference.to_input_mask(probs, shape_hw, threshold=0.5, model_spacing=model_spacing)
    out = np.full((12, *shape_hw), 7, dtype=np.uint8)
    got = mask_to_input_grid(probs, shape_hw, threshold=0.5, model_spacing=model_spacing, out=out)
    assert got is out and np.array_equal(got, expected) and expected[3].any() and expected[11].all()


def _whole_volume_postprocessing(mask, ct, geometry, options):
    """The post-processing's steps on the whole volume, plainly (the reference for the box version)."""
    from qnkit import postprocess as post

    mask = mask > 0
    if options.closing:
        spacing = geometry.spacing if options.closing_unit == "mm" else (1.0, 1.0, 1.0)
        mask = post.close_mask(mask, options.closing, spacing) > 0
    kidney_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    body = slice(int(kidney_slices[0]), int(kidney_slices[-1]) + 1) if kidney_slices.size else None
    affine = geometry.internal_affine
    sides = post.split_sides(mask, affine, post.body_midline_x(ct, affine, body))
    sides = post.select_kidneys(sides, geometry.spacing, geometry.voxel_volume_ml,
                                min_kidney_ml=options.min_kidney_ml, merge_mm=options.merge_mm)
    return (sides if options.split_sides else (sides > 0).astype(np.uint8)), sides


@pytest.mark.parametrize("split, closing", [(False, 0.0), (True, 0.0), (False, 3.0)])
def test_postprocessing_on_the_kidney_box_equals_the_whole_volume(split, closing):
    """kidney_sides (on the mask's box grown by the closing's reach, affine moved) gives the whole volume's
    answer, in place (the mask becomes the output) or not (the mask is left as it was)."""
    from qnkit import postprocess as post
    from qnkit.synth.anatomy import output_affine  # KiTS-style: internal layout = file layout

    z = 50
    ct = _ct(z)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[20:30, 20:30, 14:22] = 1  # one kidney on each side of the body's midline
    mask[22:31, 22:32, 40:48] = 1
    mask[45, 25, 45] = 1  # a stray voxel far from the kidneys, dropped by the post-processing
    mask[26, 20:30, 28] = 1  # a gap closing can fill

    geometry = qio.Geometry.from_affine(output_affine((2.5, 0.8, 0.8), np.array([10.0, 20.0, 30.0])), ct.shape)
    options = SegmentOptions(split_sides=split, closing=closing, min_kidney_ml=0.5)  # small phantom kidneys
    expected_out, expected_sides = _whole_volume_postprocessing(mask, ct, geometry, options)
    before = mask.copy()
    kept, kept_sides = post.kidney_sides(mask, ct, geometry, options)
    assert np.array_equal(mask, before) and kept is not mask
    out, sides = post.kidney_sides(mask, ct, geometry, options, in_place=True)
    assert out is mask and np.array_equal(out, expected_out) and np.array_equal(sides, expected_sides)
    assert np.array_equal(kept, expected_out) and np.array_equal(kept_sides, expected_sides)
    assert set(np.unique(sides)) == {0, 1, 2} and not out[45].any()
    with pytest.raises(ValueError, match="uint8"):
        post.kidney_sides(mask > 0, ct, geometry, options, in_place=True)


def test_segmenting_holds_no_volume_sized_float_or_label_copies():
    """Memory is bounded relative to the input: the traced peak of segment_ct (slab, resampling to a
    2.5 mm grid, post-processing) stays under 3x the int16 CT's bytes. A float64 copy of the volume
    alone is 4x, and labelling the whole volume's components (32-bit) 2x on top of the mask and sides:
    the earlier code peaked at 3.55x here; this one at 2.1x."""
    import tracemalloc

    from qnkit.synth.anatomy import output_affine

    z, hw = 160, 256
    ct = np.full((z, hw, hw), -1000, np.int16)
    ct[:, 30:226, 30:226] = 40  # body
    ct[70:100, 100:140, 60:100] = 300  # two kidneys on a fifth of the slices
    ct[75:105, 100:140, 160:200] = 300
    geometry = qio.Geometry.from_affine(output_affine((1.0, 0.8, 0.8), np.zeros(3)), ct.shape)
    tracemalloc.start()
    try:
        out, sides, _ = segment_ct(ct, geometry, threshold_model, hu_window=HU, model_spacing=2.5,
                                   options=SegmentOptions(min_kidney_ml=1.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == sides.dtype == np.uint8 and set(np.unique(sides)) == {0, 1, 2}
    assert peak < 3.0 * ct.nbytes, f"traced peak {peak / ct.nbytes:.2f}x the input's bytes"


def test_an_isolated_false_positive_does_not_stretch_the_slab():
    """A small blob on the first slices (a network's false positive far from the kidneys) is left out of
    the slab; post-processing drops it from the every-slice run too, so the masks agree."""
    ct = _ct()
    ct[30:42, 20:40, 10:30] = 300  # a kidney on each side
    ct[30:42, 20:40, 36:56] = 300
    ct[0:3, 12:22, 12:24] = 300  # 1.2 cm^2 on the model grid: found by the coarse pass at slice 0
    from qnkit.synth.anatomy import output_affine  # KiTS-style: internal layout = file layout

    geometry = qio.Geometry.from_affine(output_affine((2.5, 1.0, 1.0), np.zeros(3)), ct.shape)
    model = dict(hu_window=HU, model_spacing=None, options=None)
    masks, slabs = [], []
    for slab in (True, False):
        options = SegmentOptions(slab=slab, min_kidney_ml=1.0)
        out, _, grid = segment_ct(ct, geometry, threshold_model, **{**model, "options": options})
        masks.append(out)
        slabs.append(grid["slab"])
    assert np.array_equal(masks[0], masks[1]) and masks[0][30:42].any() and not masks[1][0:3].any()
    assert slabs[0]["start"] > 3 and slabs[0]["slices_run"] < 60
    assert [run["kept"] for run in slabs[0]["runs"]] == [False, True]


def _ellipsoid_ct(z=140, hw=64):
    """Two smooth kidney-like ellipsoids (HU 300) in a body, for interpolation between slices."""
    ct = _ct(z, hw)
    zz, yy, xx = np.ogrid[:z, :hw, :hw]
    for cx in (22, 42):
        inside = ((zz - 70) / 25.0) ** 2 + ((yy - 32) / 10.0) ** 2 + ((xx - cx) / 6.0) ** 2 <= 1
        ct[inside] = 300
    return ct


def test_z_step_predicts_a_lattice_of_slab_slices_and_interpolates_between():
    """z_step_mm 2 on 1 mm slices: about half the slab's slices are predicted, the ends always; the
    mask stays close to every slice's (the threshold stand-in is a step, the hardest case)."""
    ct = _ellipsoid_ct()
    every, every_slab = _run(ct, SegmentOptions(), slice_mm=1.0)
    calls = []

    def counting(x):
        calls.append(len(x))
        return threshold_model(x)

    model = dict(hu_window=HU, spacing_hw=(1.0, 1.0), model_spacing=None, batch_size=8, threshold=0.5,
                 pad_multiple=16, timings={})
    mask, slab = predict_kidney_slab(ct, counting, slice_mm=1.0, options=SegmentOptions(z_step_mm=2.0), **model)
    assert slab["z_stride"] == 2 and (slab["start"], slab["stop"]) == (every_slab["start"], every_slab["stop"])
    in_slab = slab["stop"] - slab["start"]
    assert sum(calls) == slab["slices_run"] and every_slab["z_stride"] == 1
    coarse = len(np.unique(np.r_[np.arange(0, ct.shape[0], slab["coarse_step"]), ct.shape[0] - 1]))
    assert slab["slices_run"] <= coarse + (in_slab + 1) // 2 + 2 < every_slab["slices_run"]
    a, b = mask > 0, every > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95
    assert not mask[:slab["start"]].any() and not mask[slab["stop"]:].any()


def test_interpolated_slices_are_linear_between_predicted_ones():
    from qnkit.segment import _interpolate_slices

    sampled = np.array([10, 12, 14, 15])
    probs = np.stack([np.full((2, 3), v, np.float32) for v in (0.0, 1.0, 0.5, 0.25)])
    out = _interpolate_slices(sampled, probs, 10, 16)
    assert np.allclose(out[:, 0, 0], [0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert np.array_equal(_interpolate_slices(np.arange(3), probs[:3], 0, 3), probs[:3])  # every slice sampled
