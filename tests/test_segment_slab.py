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
    mask, probs, slab = _run(ct, SegmentOptions())
    full, _, every = _run(ct, SegmentOptions(slab=False))
    assert np.array_equal(mask, full) and mask[30:41].all(axis=0)[20:40, 20:40].all()
    assert slab["found"] and 0 < slab["start"] <= 30 and 41 <= slab["stop"] < 60
    assert slab["slices_run"] < every["slices_run"] == 60


def test_slab_grows_while_the_mask_touches_its_end():
    ct = _ct()
    ct[20:41, 20:40, 20:40] = 300  # the part the coarse pass sees
    ct[2:20, 30:32, 30:32] = 300  # a thin part (4 mm^2) it does not, reaching past the first margin
    mask, _, slab = _run(ct, SegmentOptions())
    full, _, _ = _run(ct, SegmentOptions(slab=False))
    assert np.array_equal(mask, full)
    assert slab["start"] <= 2


def test_nothing_found_runs_every_slice():
    mask, _, slab = _run(_ct(), SegmentOptions())
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
