"""2.5-D input: the context planes of a slice (qnkit.inference.context_planes), the model's context record
(model_context), and the network input built from them (model_input_slices, predict_volume) — against plain
NumPy references, on tiny random volumes."""
from __future__ import annotations

import numpy as np
import pytest

from qnkit import inference
from qnkit.errors import QnkitInputError


def _reference(volume: np.ndarray, index, slice_mm: float, channels: int, context_mm: float) -> np.ndarray:
    """np.interp along z, pixel by pixel: plane k at index + (k - C//2) * context_mm / slice_mm, clamped."""
    z = np.arange(volume.shape[0])
    columns = volume.reshape(len(z), -1).astype(np.float64)
    out = np.empty((len(index), channels, volume.shape[1] * volume.shape[2]))
    for n, i in enumerate(index):
        for k in range(channels):
            where = i + (k - channels // 2) * context_mm / slice_mm
            out[n, k] = [np.interp(where, z, column) for column in columns.T]
    return out.reshape(len(index), channels, *volume.shape[1:])


@pytest.mark.parametrize("shape,slice_mm,channels,context_mm", [
    ((7, 5, 3), 1.5, 3, 3.0),  # offsets of whole slices
    ((9, 4, 6), 0.7, 5, 3.0),  # not a divisor: every plane interpolated
    ((5, 3, 3), 2.5, 3, 1.0),  # less than one slice
    ((4, 2, 5), 5.0, 7, 3.0),  # far past both ends: clamped
    ((1, 3, 2), 1.0, 3, 2.0),  # one slice
])
def test_planes_match_linear_interpolation_along_z(shape, slice_mm, channels, context_mm):
    rng = np.random.default_rng(sum(shape))
    volume = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    index = np.array(sorted({0, shape[0] - 1, shape[0] // 2}))
    planes = inference.context_planes(volume, index, slice_mm, channels, context_mm)
    assert planes.dtype == np.float32 and planes.shape == (len(index), channels, *shape[1:])
    np.testing.assert_allclose(planes, _reference(volume, index, slice_mm, channels, context_mm), rtol=0, atol=1e-3)
    assert np.array_equal(planes[:, channels // 2], volume[index])  # the centre plane is the slice itself


def test_whole_slice_offsets_read_the_slices_exactly():
    volume = np.random.default_rng(1).random((8, 3, 4), dtype=np.float32)
    planes = inference.context_planes(volume, np.array([0, 4, 7]), 0.1, 3, 0.3)  # 0.3 / 0.1 is not 3.0 in floats
    assert np.array_equal(planes[1], volume[[1, 4, 7]])
    assert np.array_equal(planes[0], volume[[0, 0, 3]]) and np.array_equal(planes[2], volume[[4, 7, 7]])


def test_one_plane_is_the_slice_itself_and_views_read_alike():
    volume = np.random.default_rng(2).normal(size=(6, 10, 8)).astype(np.float32)
    index = np.array([5, 0, 2])
    assert np.array_equal(inference.context_planes(volume, index, 1.0, 1, None)[:, 0], volume[index])
    view = volume[:, ::2, ::-1]  # not contiguous
    assert np.array_equal(inference.context_planes(view, index, 0.8, 3, 1.0),
                          inference.context_planes(np.ascontiguousarray(view), index, 0.8, 3, 1.0))


def test_prepare_runs_once_per_source_slice_and_commutes_with_the_interpolation():
    ct = np.random.default_rng(3).integers(-400, 600, size=(6, 20, 14)).astype(np.int16)
    grid = dict(hu_window=(-200.0, 400.0), spacing_hw=(0.9, 0.7), model_spacing=1.6)
    seen = []

    def prepare(part):
        seen.append(len(part))
        return inference.to_model_input(part, **grid)

    planes = inference.context_planes(ct, np.array([1, 2, 3]), 1.25, 3, 2.0, prepare=prepare)
    assert seen == [6]  # slices 0..5 (1 - 1.6 ... 3 + 1.6), each prepared once
    whole = inference.to_model_input(ct, **grid)
    np.testing.assert_allclose(planes, inference.context_planes(whole, np.array([1, 2, 3]), 1.25, 3, 2.0), atol=1e-6)


def test_reuse_prepares_each_slice_once_across_consecutive_batches():
    ct = np.random.default_rng(4).integers(-400, 600, size=(12, 20, 14)).astype(np.int16)
    grid = dict(hu_window=(-200.0, 400.0), spacing_hw=(0.9, 0.7), model_spacing=1.6)
    prepared = []

    def prepare(part):
        prepared.append(np.asarray(part)[:, 0, 0].tolist())  # which source slices, by their first voxel
        return inference.to_model_input(part, **grid)

    shared: dict = {}
    batches = [np.arange(1, 5), np.arange(5, 9), np.arange(9, 12)]
    for batch in batches:
        got = inference.context_planes(ct, batch, 1.0, 5, 1.5, prepare=prepare, reuse=shared)
        np.testing.assert_array_equal(got, inference.context_planes(ct, batch, 1.0, 5, 1.5, prepare=lambda part:
                                                                    inference.to_model_input(part, **grid)))
        assert sorted(shared) == sorted(set(np.clip(np.r_[batch[0] - 3:batch[-1] + 4], 0, 11).tolist()))
    firsts = [v for call in prepared for v in call]
    assert len(firsts) == 12 and sorted(firsts) == sorted(ct[:, 0, 0].tolist())  # every slice once, no more


@pytest.mark.parametrize("volume,index,channels,context_mm,slice_mm,error", [
    (np.zeros((4, 3, 3), np.complex64), [0], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3, 3), bool), [0], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3), np.float32), [0], 3, 1.0, 1.0, ValueError),
    ([[[0.0]]], [0], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3, 3), np.float32), [4], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3, 3), np.float32), [0.5], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3, 3), np.float32), [], 3, 1.0, 1.0, ValueError),
    (np.zeros((4, 3, 3), np.float32), [0], 2, 1.0, 1.0, QnkitInputError),
    (np.zeros((4, 3, 3), np.float32), [0], 3, None, 1.0, QnkitInputError),
    (np.zeros((4, 3, 3), np.float32), [0], 3, 1.0, 0.0, QnkitInputError),
    (np.zeros((4, 3, 3), np.float32), [0], 3, 1.0, float("nan"), QnkitInputError),
])
def test_bad_arguments_are_refused_with_a_clear_error(volume, index, channels, context_mm, slice_mm, error):
    with pytest.raises(error, match="volume|index|planes|context_mm|slice spacing"):
        inference.context_planes(volume, np.asarray(index), slice_mm, channels, context_mm)


def test_model_context_reads_the_domain_record_and_checks_the_network():
    assert inference.model_context({"domain": {"pixel_spacing_mm": 2.5}, "network": {"num_channels": 1}}) == (1, None)
    assert inference.model_context({}) == (1, None)  # an old model: no domain at all
    record = {"domain": {"pixel_spacing_mm": 2.5, "context_planes": 3, "context_mm": 3}, "network": {"num_channels": 3}}
    assert inference.model_context(record) == (3, 3.0)
    assert inference.model_context(record["domain"]) == (3, 3.0)
    with pytest.raises(QnkitInputError, match="3 input plane"):
        inference.model_context({"domain": {"pixel_spacing_mm": 2.5}, "network": {"num_channels": 3}})
    with pytest.raises(QnkitInputError, match="context_mm"):
        inference.model_context({"domain": {"context_planes": 3}, "network": {"num_channels": 3}})


def test_model_input_and_prediction_of_context_planes():
    """model_input_slices gives a 2-D model its slices and a 2.5-D one its planes; predict_volume feeds either
    and insists on one probability plane back."""
    ct = np.random.default_rng(4).integers(-400, 600, size=(5, 24, 20)).astype(np.int16)
    grid = dict(hu_window=(-200.0, 400.0), spacing_hw=(0.8, 0.8), model_spacing=None)
    flat = inference.model_input_slices(ct, [0, 1, 2, 3, 4], **grid)
    assert np.array_equal(flat, inference.to_model_input(ct, **grid))
    planes = inference.model_input_slices(ct, [0, 3], **grid, slice_mm=2.0, context=(3, 2.0))
    assert np.array_equal(planes, inference.to_model_input(ct[[[0, 0, 1], [2, 3, 4]]], **grid))  # 4-D: plane by plane
    shapes = []

    def centre(x):
        shapes.append(x.shape)
        return x[:, 1:2]

    probs = inference.predict_volume(planes, centre, batch_size=1, pad_multiple=16)
    assert shapes == [(1, 3, 16, 16)] * 2 and np.array_equal(probs, planes[:, 1])
    with pytest.raises(ValueError, match="backend returned shape"):
        inference.predict_volume(planes, lambda x: x, pad_multiple=16)


def _plane_mean(x):
    """A '2.5-D model' whose probability is the mean of a slice's planes: what it says depends on the neighbours."""
    return x.mean(axis=1, keepdims=True)


def _network():
    import torch

    from qnkit.nn.eager import make_predict_batch
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    torch.manual_seed(0)
    return make_predict_batch(QuickNAT(QuickNATConfig(num_filters=4, num_channels=3)))


@pytest.mark.parametrize("model_spacing,slab,model", [(None, False, "network"), (1.3, False, "network"),
                                                      (None, True, "plane mean")])
def test_a_25d_model_is_fed_the_planes_inference_builds(model_spacing, slab, model):
    """segment's prediction of a 3-plane model (batches prepared one ahead, the kidneys' slab or every slice)
    equals the plain steps: the context planes of every slice from the whole CT, predicted, brought back;
    inside the slab, planes reach the slices outside it."""
    from qnkit import segment as S

    predict = _network() if model == "network" else _plane_mean
    ct = np.random.default_rng(5).integers(-1000, 1000, size=(16, 40, 36)).astype(np.int16)
    if model == "plane mean":  # bright only in slices 7..8: the slab is a few slices around them
        ct[:] = -1000
        ct[7:9, 10:30, 10:30] = 400
    grid = dict(hu_window=(-200, 400), spacing_hw=(0.8, 0.8), model_spacing=model_spacing)
    planes = inference.context_planes(ct, np.arange(len(ct)), 2.0, 3, 3.0,
                                      prepare=lambda part: inference.to_model_input(part, **grid))
    probs = inference.predict_volume(planes, predict, batch_size=4, pad_multiple=16)
    expected = inference.to_input_mask(probs, ct.shape[1:], threshold=0.3, model_spacing=model_spacing)
    options = S.SegmentOptions(slab=slab, coarse_step_mm=2.0, slab_margin_mm=0.0)
    mask, record = S.predict_kidney_slab(ct, predict, slice_mm=2.0, options=options, batch_size=2, threshold=0.3,
                                         pad_multiple=16, context=(3, 3.0), **grid)
    lo, hi = record["start"], record["stop"]
    assert np.array_equal(mask, expected) and expected.any()
    assert (lo, hi) == ((0, 16) if not slab else (5, 11))


def test_monte_carlo_samples_of_a_25d_model_see_its_planes():
    """The quality pass (mirror and dropout samples over the kidneys' box) feeds a 2.5-D model its planes too."""
    from qnkit.uncertainty import sample_kidneys

    ct = np.full((12, 32, 32), -1000, np.int16)
    ct[5:7, 8:24, 8:24] = 400
    sides = np.zeros(ct.shape, np.uint8)
    sides[5:7, 8:24, 8:24] = 1
    grid = dict(hu_window=(-200.0, 400.0), model_spacing=None)
    drawn = sample_kidneys(ct, sides, (2.0, 0.8, 0.8), lambda x, keep: _plane_mean(x), samples=2, seed=0,
                           dropout={"sites": 8, "filters": 4, "p": 0.2}, threshold=0.3, pad_multiple=16,
                           context=(3, 3.0), **grid)
    planes = inference.context_planes(ct, np.arange(12), 2.0, 3, 3.0,
                                      prepare=lambda part: inference.to_model_input(part, spacing_hw=None, **grid))
    expected = inference.to_input_mask(planes.mean(axis=1), ct.shape[1:], threshold=0.3, model_spacing=None)
    assert np.array_equal(drawn.mirror, expected[drawn.box]) and drawn.mirror.any()
    assert all(np.array_equal(sample, drawn.mirror) for sample in drawn.samples)
