"""qnkit.inference: the torch-free model steps of the one path (qnkit.segment.segment_ct)."""
import subprocess
import sys

import numpy as np
import pytest

from qnkit import kernels
from qnkit.inference import mirrored, pad_slices, padded_size, predict_volume, to_input_mask, to_model_input


def test_pad_slices_pads_bottom_right_with_zeros():
    x = np.ones((2, 5, 17), np.float32)
    y = pad_slices(x, 16)
    assert y.shape == (2, 16, 32)
    assert y[:, :5, :17].min() == 1 and y[:, 5:].max() == 0 and y[:, :, 17:].max() == 0
    assert pad_slices(np.ones((1, 16, 32)), 16).shape == (1, 16, 32)
    assert padded_size(256, 16) == 256 and padded_size(33, 16) == 48


def _steps(ct, predict_batch, batch_size):
    """The model steps in a row for an old model (half resolution): (mask on the input's grid, probabilities)."""
    probs = predict_volume(to_model_input(ct, hu_window=(-200, 400), spacing_hw=(1.0, 1.0), model_spacing=None),
                           predict_batch, batch_size=batch_size)
    return to_input_mask(probs, ct.shape[1:], threshold=0.5, model_spacing=None), probs


@pytest.mark.parametrize("shape", [(5, 64, 64), (3, 50, 70), (4, 33, 31)])
def test_model_steps_with_a_threshold_backend(shape):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    seen = []

    def predict_batch(x):  # "kidney" wherever the windowed image is bright
        assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 1
        assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0
        seen.append(len(x))
        return (x > 0.5).astype(np.float32)

    mask, probs = _steps(ct, predict_batch, batch_size=2)
    half = kernels.downsample_image(ct, -200, 400)
    assert probs.shape == half.shape and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, (half > 0.5).astype(np.float32))
    assert mask.shape == shape and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, kernels.upsample_threshold(probs, shape[1:], 0.5))
    assert sum(seen) == shape[0] and max(seen) <= 2


def test_mirrored_averages_the_prediction_of_the_mirror_image():
    rng = np.random.default_rng(1)
    x = rng.random((3, 1, 32, 48), dtype=np.float32)
    weights = np.linspace(0, 1, 48, dtype=np.float32)  # a "network" that is not left-right symmetric
    calls = []

    def predict_batch(batch):
        calls.append(batch.flags.c_contiguous)
        return batch * weights

    y = mirrored(predict_batch)(x)
    np.testing.assert_allclose(y, 0.5 * (x * weights + x * weights[::-1]), rtol=1e-6)
    assert y.dtype == np.float32 and y.flags.c_contiguous and calls == [True, True]
    symmetric = mirrored(lambda b: (b > 0.5).astype(np.float32))  # a symmetric one: unchanged
    np.testing.assert_array_equal(symmetric(x), (x > 0.5).astype(np.float32))


@pytest.mark.parametrize("shape", [(4, 33, 31), (2, 50, 70)])
def test_mirrored_keeps_every_pixel_in_place_through_the_padding(shape):
    """predict_volume pads bottom/right; the mirror image has its padding on the left and must come back."""
    rng = np.random.default_rng(2)
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    threshold = lambda b: (b > 0.5).astype(np.float32)  # noqa: E731  symmetric: mirroring changes nothing
    plain, _ = _steps(ct, threshold, batch_size=3)
    mirror, _ = _steps(ct, mirrored(threshold), batch_size=3)
    np.testing.assert_array_equal(mirror, plain)


def test_predict_volume_checks_backend_shape():
    with pytest.raises(ValueError, match="shape"):
        predict_volume(np.zeros((2, 16, 16), np.float32), lambda x: x[:, :, :8])


def test_inference_imports_no_torch():
    code = "import sys, qnkit.inference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
