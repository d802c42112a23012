"""qnkit.resample against NumPy/torch references: area means, bilinear, the 2:1 kernel path, edge cases."""
import numpy as np
import pytest

from qnkit import kernels
from qnkit import resample as R

HU = (-200.0, 400.0)


def _area_reference(x: np.ndarray, shape_hw) -> np.ndarray:
    """Exact area mean: repeat every pixel h (w) times, then average blocks of H (W)."""
    _, H, W = x.shape
    h, w = shape_hw
    fine = np.repeat(np.repeat(x.astype(np.float64), h, axis=1), w, axis=2)
    return fine.reshape(x.shape[0], h, H, w, W).mean(axis=(2, 4))


def _bilinear_reference(x: np.ndarray, shape_hw) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))[:, None]
    return F.interpolate(t, size=tuple(shape_hw), mode="bilinear", align_corners=False)[:, 0].numpy()


def _window(x):
    return (np.clip(x.astype(np.float64), *HU) - HU[0]) / (HU[1] - HU[0])


@pytest.mark.parametrize("shape, factor", [((1, 1), 1.0), ((7, 9), 1.0), ((64, 48), 2.0), ((65, 47), 2.0),
                                           ((30, 21), 3.0), ((40, 33), 1.5), ((10, 13), 0.7), ((9, 14), 0.35),
                                           ((1, 1), 0.35), ((1, 1), 3.0)])
def test_to_model_grid_matches_references(shape, factor):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(3, *shape)).astype(np.int16)
    spacing = (0.8, 0.8)
    h, w = R.model_grid_shape(shape, spacing, 0.8 * factor)
    got = R.to_model_grid(ct, spacing, 0.8 * factor, HU)
    assert got.dtype == np.float32 and got.shape == (3, h, w)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6
    win = _window(ct)
    # Each axis independently: coarser axes by exact area means, finer ones by torch's bilinear.
    expected = win
    if h <= shape[0] and w <= shape[1]:
        expected = _area_reference(win, (h, w))
    elif h >= shape[0] and w >= shape[1]:
        expected = _bilinear_reference(win, (h, w))
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_model_grid_shape_rounds_field_of_view():
    assert R.model_grid_shape((512, 512), (0.78, 0.78), 1.56) == (256, 256)
    assert R.model_grid_shape((5, 3), (1.0, 1.0), 2.0) == (3, 2)  # halves round up
    assert R.model_grid_shape((2, 2), (0.1, 0.1), 10.0) == (1, 1)
    assert R.model_grid_shape((100, 50), (0.6, 1.2), 1.5) == (40, 40)
    for bad in [((0, 3), (1, 1), 1), ((3, 3), (0, 1), 1), ((3, 3), (1, 1), float("nan")), ((3,), (1, 1), 1)]:
        with pytest.raises(ValueError):
            R.model_grid_shape(*bad)


def test_axis_matrices_are_row_normalised_and_cached():
    for n_in, n_out in [(10, 7), (7, 10), (1, 5), (5, 1), (512, 205), (3, 3)]:
        m = R.axis_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in) and m.dtype == np.float32 and not m.flags.writeable
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
        assert (m >= 0).all()
    assert R.axis_matrix(10, 7) is R.axis_matrix(10, 7)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint16, np.float32, np.float64, np.uint8, np.int8])
def test_factor_two_kernel_agrees_with_matrix_path(dtype):
    rng = np.random.default_rng(1)
    ct = rng.integers(0, 120, size=(4, 32, 18)).astype(dtype)
    kernel = R.to_model_grid(ct, (0.7, 0.7), 1.4, (0, 100))
    matrix = np.empty_like(kernel)
    R._apply(((np.clip(ct.astype(np.float64), 0, 100)) / 100).astype(np.float32), kernel.shape[1:], matrix)
    np.testing.assert_allclose(kernel, matrix, atol=1e-6)
    np.testing.assert_allclose(kernel, _area_reference(np.clip(ct.astype(np.float64), 0, 100) / 100, (16, 9)),
                               atol=1e-6)


def test_factor_two_upsample_kernel_agrees_with_matrix_path():
    rng = np.random.default_rng(2)
    prob = rng.random((3, 16, 9), dtype=np.float32)
    via_kernel = R.from_model_grid(prob, (32, 18), threshold=0.5)
    smooth = R.probabilities_to_grid(prob, (32, 18))
    np.testing.assert_allclose(smooth, _bilinear_reference(prob, (32, 18)), atol=1e-6)
    # Equal except where the interpolated value sits on the threshold within rounding.
    decided = np.abs(smooth - 0.5) > 1e-5
    assert np.array_equal(via_kernel[decided], (smooth > 0.5)[decided])
    assert decided.mean() > 0.99


@pytest.mark.parametrize("shape, small", [((10, 13), (7, 9)), ((64, 64), (43, 43)), ((5, 5), (1, 1)),
                                          ((1, 1), (3, 2)), ((20, 20), (20, 20)), ((9, 30), (27, 10))])
def test_from_model_grid_interpolates_then_thresholds(shape, small):
    rng = np.random.default_rng(3)
    prob = rng.random((2, *small), dtype=np.float32)
    smooth = R.probabilities_to_grid(prob, shape)
    mask = R.from_model_grid(prob, shape, threshold=0.4)
    assert mask.dtype == np.uint8 and mask.shape == (2, *shape)
    assert np.array_equal(mask, (smooth > 0.4).astype(np.uint8))
    if small[0] <= shape[0] and small[1] <= shape[1]:
        np.testing.assert_allclose(smooth, _bilinear_reference(prob, shape), atol=1e-6)


def test_round_trip_of_a_smooth_image_is_close():
    yy, xx = np.mgrid[0:90, 0:120] / 30.0
    img = (np.sin(yy) * np.cos(xx) * 0.5 + 0.5).astype(np.float32)[None]
    small = R.to_model_grid(img, (0.6, 0.6), 1.0, (0.0, 1.0))
    back = R.probabilities_to_grid(small, (90, 120))
    assert np.abs(back - img)[:, 3:-3, 3:-3].max() < 0.02


def test_non_contiguous_inputs_and_out_buffers():
    rng = np.random.default_rng(4)
    ct = rng.integers(-500, 500, size=(3, 40, 60)).astype(np.int16)
    view = ct[:, ::2, ::3]  # non-contiguous (3, 20, 20)
    expected = R.to_model_grid(np.ascontiguousarray(view), (1.0, 1.0), 1.5, HU)
    out = np.empty_like(expected)
    assert R.to_model_grid(view, (1.0, 1.0), 1.5, HU, out=out) is out
    np.testing.assert_array_equal(out, expected)
    prob = rng.random((3, 20, 20), dtype=np.float32)
    np.testing.assert_array_equal(R.from_model_grid(prob.transpose(0, 2, 1), (31, 31)),
                                  R.from_model_grid(np.ascontiguousarray(prob.transpose(0, 2, 1)), (31, 31)))


def test_coverage_is_the_kidney_fraction():
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, :3, :] = True  # top half
    cov = R.coverage_to_model_grid(mask, (1.0, 1.0), 3.0)  # 2x2 output, each covering 3x3 input
    np.testing.assert_allclose(cov[0], [[1, 1], [0, 0]])
    labels = np.zeros((2, 8, 8), dtype=np.uint8)
    labels[:, 2:6, 1:5] = 2  # tumor counts as kidney
    cov = R.coverage_to_model_grid(labels, (0.5, 0.5), 1.0)
    np.testing.assert_array_equal(cov, kernels.downsample_image((labels > 0).astype(np.uint16), 0, 1))
    np.testing.assert_array_equal(cov >= 0.5, kernels.downsample_labels(labels).astype(bool))
    cov = R.coverage_to_model_grid(labels, (0.5, 0.5), 0.7)  # 8 px -> 6 px: area weights keep the volume
    assert cov.shape == (2, 6, 6)
    assert cov.sum() * (8 / 6) ** 2 == pytest.approx((labels > 0).sum(), rel=1e-5)


def test_bad_inputs_are_refused_clearly():
    ct = np.zeros((2, 8, 8), np.int16)
    with pytest.raises(ValueError, match="3-D"):
        R.to_model_grid(ct[0], (1, 1), 2, HU)
    with pytest.raises(ValueError, match="empty"):
        R.to_model_grid(ct[:0], (1, 1), 2, HU)
    with pytest.raises(TypeError, match="dtype"):
        R.to_model_grid(ct.astype(np.complex64), (1, 1), 2, HU)
    with pytest.raises(TypeError):
        R.to_model_grid(ct.tolist(), (1, 1), 2, HU)
    with pytest.raises(ValueError, match="HU window"):
        R.to_model_grid(ct, (1, 1), 2, (400, -200))
    with pytest.raises(ValueError, match="out"):
        R.to_model_grid(ct, (1, 1), 2, HU, out=np.empty((2, 5, 4), np.float32))
    with pytest.raises(TypeError, match="float32"):
        R.from_model_grid(np.zeros((2, 4, 4), np.float64), (8, 8))
    with pytest.raises(ValueError, match="shape_hw"):
        R.from_model_grid(np.zeros((2, 4, 4), np.float32), (8,))
    with pytest.raises(TypeError, match="mask"):
        R.coverage_to_model_grid(np.zeros((1, 4, 4), np.float32), (1, 1), 2)


@pytest.mark.parametrize("small, shape", [((20, 17), (55, 61)), ((30, 30), (17, 23)), ((12, 40), (12, 90)),
                                          ((25, 9), (60, 9)), ((8, 8), (8, 8)), ((19, 21), (40, 13))])
@pytest.mark.parametrize("where", ["blob", "corner", "edge", "none", "all", "tied"])
def test_from_model_grid_on_the_foreground_box_equals_the_whole_slice(small, shape, where):
    """from_model_grid resamples only the box that can exceed the threshold: the same mask, bit for bit,
    as thresholding the whole slices' probabilities, foreground at the edges and corners, none, everywhere,
    or exactly at the threshold; up- and down-sampling and kept axes alike."""
    rng = np.random.default_rng(sum(small) * 1000 + sum(shape) * 10 + len(where))
    prob = (rng.random((3, *small)) * 0.45).astype(np.float32)
    h, w = small
    if where == "blob":
        prob[1, h // 3:h // 2 + 1, w // 4:w // 2] = rng.random((h // 2 + 1 - h // 3, w // 2 - w // 4)) + 0.3
    elif where == "corner":
        prob[2, -1, -1], prob[0, 0, 0] = 0.9, 0.7
    elif where == "edge":
        prob[:, :, 0] = 0.8
    elif where == "all":
        prob += 0.5
    elif where == "tied":
        prob[1, 2:5, 3:6] = 0.5  # exactly the threshold: interpolation must not lift it above
        prob[1, 4, 4] = np.nextafter(np.float32(0.5), np.float32(1))
    for threshold in (0.5, -0.1, 1.0):
        got = R.from_model_grid(prob, shape, threshold=threshold, out=np.full((3, *shape), 9, np.uint8))
        expected = R.probabilities_to_grid(prob, shape) > np.float32(threshold)
        np.testing.assert_array_equal(got, expected.view(np.uint8))
    if where in ("blob", "edge", "all"):
        assert R.from_model_grid(prob, shape, threshold=0.5).any()
