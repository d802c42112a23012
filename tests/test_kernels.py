"""Each compiled kernel against its NumPy reference, on random inputs and edge cases.

Values are checked on every compiled build this CPU supports, single- and multi-threaded (the
`every_build` fixture): one test per kernel and build, looping over dtypes, shapes and edge cases
with the case named in each failure message. Input validation lives in the Python wrappers, the
same for every build, so those tests run once.
"""
import numpy as np
import pytest

from qnkit import kernels
from qnkit.benchmarks import reference as ref

RNG = np.random.default_rng(1234)
SHAPES = [(3, 8, 8), (2, 7, 9), (1, 1, 1), (1, 1, 6), (4, 5, 1), (5, 33, 18), (2, 64, 48)]
# The row kernels work in blocks of 16 to 64 columns; these widths put every block edge, tail and
# odd last column in play.
WIDE_SHAPES = [(2, 5, 517), (1, 4, 66), (3, 3, 97), (1, 2, 34), (2, 3, 35), (1, 6, 130)]


def random_ct(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return RNG.uniform(-1500, 2500, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 4000)
    return RNG.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def random_labels(shape, dtype=np.uint8, classes=3, p_fg=0.3):
    labels = RNG.choice(np.arange(classes), size=shape, p=[1 - p_fg] + [p_fg / (classes - 1)] * (classes - 1))
    return labels.astype(dtype)


def blob_labels(shape):
    z, h, w = np.indices(shape)
    c = np.array(shape) / 2
    return (((z - c[0]) / max(1, shape[0] / 3)) ** 2 + ((h - c[1]) / max(1, shape[1] / 4)) ** 2
            + ((w - c[2]) / max(1, shape[2] / 4)) ** 2 < 1).astype(np.uint8) * RNG.integers(1, 3)


def unaligned_out(shape, dtype):
    """A C-contiguous output whose data starts one element past a 64-byte boundary."""
    raw = kernels._empty_aligned((int(np.prod(shape)) + 1,), dtype)
    return raw[1:].reshape(shape)


@pytest.fixture(params=[(build, threads) for build in kernels.available_builds() for threads in (1, 2)],
                ids=lambda p: f"{p[0]}-{p[1]}threads")
def every_build(request):
    """Run the test on one compiled build this CPU supports, single- or multi-threaded."""
    build, threads = request.param
    before = kernels.get_num_threads(), kernels.BUILD
    kernels.use_build(build)
    kernels.set_num_threads(threads)
    yield build
    kernels.set_num_threads(before[0])
    kernels.use_build(before[1])


@pytest.fixture
def store_kinds(monkeypatch):
    """Iterate over cached and streamed (non-temporal) stores: yields a function giving the kinds."""
    def kinds():
        for kind, threshold in (("cached", 1 << 62), ("streamed", 0)):
            monkeypatch.setattr(kernels, "STREAM_BYTES", threshold)
            yield kind
        monkeypatch.undo()
    return kinds


# ---------------------------------------------------------------- values, on every build
def test_downsample_image(every_build, store_kinds):
    for dtype in (np.int16, np.int32, np.uint16, np.float32):
        for shape in SHAPES:
            ct = random_ct(shape, dtype)
            lo, hi = (-200.0, 400.0) if dtype != np.uint16 else (800.0, 1400.0)
            got, want = kernels.downsample_image(ct, lo, hi), ref.downsample_image(ct, lo, hi)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{np.dtype(dtype)} {shape}")
    ct = np.full((2, 4, 4), -5000, dtype=np.int16)
    assert np.all(kernels.downsample_image(ct, -200, 400) == 0)
    ct[:] = 5000
    assert np.all(kernels.downsample_image(ct, -200, 400) == 1)
    base = random_ct((4, 20, 30), np.int16)
    view = base[::2, :, ::-1]
    np.testing.assert_allclose(kernels.downsample_image(view, -100, 300), ref.downsample_image(view, -100, 300), rtol=1e-6)
    swapped = base.astype(base.dtype.newbyteorder(">"))
    np.testing.assert_allclose(kernels.downsample_image(swapped, -100, 300), ref.downsample_image(base, -100, 300), rtol=1e-6)
    for kind in store_kinds():
        for shape in WIDE_SHAPES:
            for window in ((-200.0, 400.0), (-32768.0, 32767.0), (-40000.0, 3.0), (-1000.5, 2000.0)):
                ct = random_ct(shape, np.int16)
                want = ref.downsample_image(ct, *window)
                case = f"{kind} {shape} {window}"
                np.testing.assert_allclose(kernels.downsample_image(ct, *window), want, rtol=1e-6, atol=1e-7, err_msg=case)
                out = unaligned_out(want.shape, np.float32)
                assert kernels.downsample_image(ct[:, :, :], *window, out=out) is out
                np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7, err_msg=case)


def test_downsample_labels(every_build):
    for dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.bool_):
        for shape in SHAPES:
            labels = random_labels(shape, classes=2 if dtype == np.bool_ else 3).astype(dtype)
            got = kernels.downsample_labels(labels)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, ref.downsample_labels(labels), err_msg=f"{np.dtype(dtype)} {shape}")
    for shape in WIDE_SHAPES:
        labels = random_labels(shape, classes=3, p_fg=0.5)
        np.testing.assert_array_equal(kernels.downsample_labels(labels), ref.downsample_labels(labels), err_msg=str(shape))
        labels[:] = 200  # any value > 0 is foreground
        assert kernels.downsample_labels(labels).all()
    assert not kernels.downsample_labels(np.zeros((2, 6, 6), np.uint8)).any()
    assert kernels.downsample_labels(np.full((2, 5, 7), 2, np.uint8)).all()
    labels = np.zeros((1, 2, 2), np.uint8)
    labels[0, 0, 0] = 2  # one of four: below half
    assert kernels.downsample_labels(labels)[0, 0, 0] == 0
    labels[0, 1, 1] = 1  # two of four, tumor + kidney: at least half
    assert kernels.downsample_labels(labels)[0, 0, 0] == 1


def test_kidney_slice_range(every_build):
    for z in (1, 2, 9, 50):
        for margin in (0, 1, 3, 20):
            for _ in range(5):
                labels = np.zeros((z, 5, 7), np.uint8)
                hits = RNG.integers(0, z, size=RNG.integers(1, 3))
                labels[hits, RNG.integers(0, 5), RNG.integers(0, 7)] = RNG.integers(1, 3)
                assert kernels.kidney_slice_range(labels, margin) == ref.kidney_slice_range(labels, margin), (z, margin)
    assert kernels.kidney_slice_range(np.zeros((10, 4, 4), np.uint8)) is None
    assert kernels.kidney_slice_range(np.ones((10, 4, 4), np.int16), 2) == (0, 10)
    labels = np.zeros((30, 8, 8), np.int32)
    labels[12, 2, 5] = 1
    labels[17, 0, 0] = 2
    view = labels[:, ::2, ::-1]
    assert kernels.kidney_slice_range(view, 4) == ref.kidney_slice_range(view, 4) == (8, 22)
    assert kernels.kidney_slice_range(np.asfortranarray(labels), 0) == (12, 18)


def test_border_weights(every_build, store_kinds):
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        for shape in SHAPES:
            labels = random_labels(shape).astype(dtype)
            got = kernels.border_weights(labels, omega0=2.0)
            assert got.dtype == np.float32 and got.shape == labels.shape
            np.testing.assert_allclose(got, ref.border_weights(labels, 2.0), rtol=1e-6, err_msg=f"{np.dtype(dtype)} {shape}")
    for shape in ((3, 16, 16), (2, 15, 21), (6, 40, 33)):
        for omega0 in (0.0, 2.0, 5.5):
            labels = blob_labels(shape)
            np.testing.assert_allclose(kernels.border_weights(labels, omega0), ref.border_weights(labels, omega0),
                                       rtol=1e-6, err_msg=f"blobs {shape} {omega0}")
    for shape in SHAPES:  # the binary fast path
        labels = random_labels(shape, classes=2)
        np.testing.assert_allclose(kernels.border_weights(labels, 2.0), ref.border_weights(labels, 2.0), rtol=1e-6,
                                   err_msg=f"binary {shape}")
    for value in (0, 1):
        np.testing.assert_array_equal(kernels.border_weights(np.full((2, 5, 5), value, np.uint8)), 1.0)
    view = random_labels((4, 12, 10)).transpose(0, 2, 1)
    np.testing.assert_allclose(kernels.border_weights(view), ref.border_weights(view), rtol=1e-6)
    for kind in store_kinds():
        for shape in WIDE_SHAPES:
            for omega0 in (2.0, -1.5, 0.0):
                labels = blob_labels(shape).clip(0, 1) | random_labels(shape, classes=2, p_fg=0.05)
                want = ref.border_weights(labels, omega0)
                case = f"{kind} {shape} {omega0}"
                np.testing.assert_allclose(kernels.border_weights(labels, omega0), want, rtol=1e-6, err_msg=case)
                out = unaligned_out(shape, np.float32)
                kernels.border_weights(labels, omega0, out=out)
                np.testing.assert_allclose(out, want, rtol=1e-6, err_msg=case)


def test_label_counts_mixed_blocks(every_build):
    """Counting goes block by block (8192 voxels): empty, binary, few-valued and many-valued blocks."""
    labels = np.zeros((1, 8, 8192), np.uint8)
    labels[0, 1, ::3] = 1
    labels[0, 2, ::5] = 2
    labels[0, 2, ::7] = 4
    labels[0, 3] = RNG.integers(0, 256, 8192)
    labels[0, 4, -1] = 255
    counts = kernels._label_counts(np.ascontiguousarray(labels[:, :, 5:]))
    np.testing.assert_array_equal(counts, np.bincount(labels[:, :, 5:].ravel(), minlength=256))
    np.testing.assert_allclose(kernels.border_weights(labels[:, :5]), ref.border_weights(labels[:, :5]), rtol=1e-6)
    lut = kernels.class_weights(np.array([[[0, 0, 0, 1]]], np.uint8))
    assert lut[0] == pytest.approx(2.0 / 3.0) and lut[1] == pytest.approx(2.0) and lut[2] == 0


def test_dice(every_build):
    shape = (3, 17, 9)
    for pred_dtype in (np.float32, np.float64, np.uint8, np.int16, np.int32, np.int64, np.bool_):
        for target_dtype in (np.uint8, np.int16, np.int32, np.int64, np.bool_):
            if np.dtype(pred_dtype).kind == "f":
                pred = RNG.random(shape).astype(pred_dtype)
            else:
                pred = RNG.integers(0, 2, shape).astype(pred_dtype)
            target = RNG.integers(0, 3 if target_dtype != np.bool_ else 2, shape).astype(target_dtype)
            for threshold, smooth in ((0.5, 1.0), (0.2, 0.0), (0.9, 1e-5)):
                assert kernels.dice(pred, target, threshold, smooth) == pytest.approx(
                    ref.dice(pred, target, threshold, smooth), rel=1e-12), (pred_dtype, target_dtype, threshold)
    pred = RNG.integers(0, 256, 300_001).astype(np.uint8)
    target = RNG.integers(0, 2, 300_001).astype(np.uint8)
    for threshold in (-0.5, 0.0, 0.5, 1.0, 1.5, 127.9, 254.5, 255.0, float("inf"), float("nan")):
        assert kernels.dice(pred, target, threshold) == pytest.approx(ref.dice(pred, target, threshold),
                                                                     rel=1e-12), threshold
    prob = RNG.random(1_000_003).astype(np.float32)
    prob[::1000] = np.nan
    target = (RNG.random(1_000_003) > 0.5).astype(np.uint8)
    assert kernels.dice(prob, target) == pytest.approx(ref.dice(prob, target), rel=1e-12)
    assert kernels.dice(prob[1:], target[1:]) == pytest.approx(ref.dice(prob[1:], target[1:]), rel=1e-12)
    empty, full = np.zeros((2, 3, 3), np.uint8), np.ones((2, 3, 3), np.uint8)
    assert kernels.dice(empty, empty) == 1.0 and kernels.dice(full, full) == 1.0
    assert kernels.dice(full, empty) == pytest.approx(1 / 19)
    assert kernels.dice(full, full, smooth=0.0) == 1.0
    assert kernels.dice(np.ones(1, np.float32), np.ones(1, np.uint8)) == 1.0  # any ndim
    pred = RNG.random((4, 6, 8)).astype(np.float32)
    target = RNG.integers(0, 2, (4, 6, 8)).astype(np.uint8)
    assert kernels.dice(pred[:, ::2, ::-1], target[:, ::2, ::-1]) == pytest.approx(
        ref.dice(pred[:, ::2, ::-1], target[:, ::2, ::-1]))


def test_mask_dice_is_exact_dice_of_two_masks():
    """No smoothing, foreground > 0 in both (label values 2 count), any layout; `empty` for two empty masks."""
    a = RNG.integers(0, 3, (5, 17, 9)).astype(np.uint8)
    b = RNG.random((5, 17, 9)) > 0.6
    for x, y in ((a, b), (a[:, ::2], b[:, ::2]), (b, b.astype(np.int16))):
        fx, fy = x > 0, y > 0
        assert kernels.mask_dice(x, y) == pytest.approx(2 * (fx & fy).sum() / (fx.sum() + fy.sum()), rel=1e-12)
    none = np.zeros((2, 3), bool)
    assert kernels.mask_dice(none, none) == 1.0 and kernels.mask_dice(none, none, empty=None) is None
    assert kernels.mask_dice(none, ~none) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.mask_dice(a, b[:1])


def test_upsample_threshold(every_build, store_kinds):
    for full_shape in ((8, 8), (7, 9), (1, 1), (2, 1), (33, 18), (64, 48)):
        for threshold in (0.5, 0.3):
            h, w = (full_shape[0] + 1) // 2, (full_shape[1] + 1) // 2
            prob = RNG.random((3, h, w)).astype(np.float32)
            got = kernels.upsample_threshold(prob, full_shape, threshold)
            assert got.dtype == np.uint8 and got.shape == (3, *full_shape)
            np.testing.assert_array_equal(got, ref.upsample_threshold(prob, full_shape, threshold),
                                          err_msg=f"{full_shape} {threshold}")
    mask = (RNG.random((2, 16, 16)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(kernels.upsample_threshold(mask, (25, 30)), ref.upsample_threshold(mask, (25, 30)))
    assert kernels.upsample_threshold(np.ones((1, 4, 4), np.float32), (8, 8)).all()
    assert not kernels.upsample_threshold(np.zeros((1, 4, 4), np.float32), (8, 8)).any()
    labels = blob_labels((3, 64, 64)).astype(np.uint8)
    back = kernels.upsample_threshold(kernels.downsample_labels(labels), labels.shape[1:])
    assert kernels.dice(back, labels) > 0.95
    for kind in store_kinds():
        for full_shape in ((4, 1034), (3, 517), (5, 66), (2, 63), (3, 32), (2, 97)):
            for dtype in (np.float32, np.uint8):
                h, w = (full_shape[0] + 1) // 2, (full_shape[1] + 1) // 2
                if dtype == np.uint8:
                    prob = (RNG.random((2, h, w)) > 0.5).astype(np.uint8)
                else:
                    prob = RNG.random((2, h, w)).astype(np.float32)
                    prob[:, :, w // 3] = 0.5  # exactly at the threshold
                case = f"{kind} {full_shape} {np.dtype(dtype)}"
                want = ref.upsample_threshold(prob, full_shape)
                np.testing.assert_array_equal(kernels.upsample_threshold(prob, full_shape), want, err_msg=case)
                out = unaligned_out((2, *full_shape), np.uint8)
                kernels.upsample_threshold(prob, full_shape, out=out)
                np.testing.assert_array_equal(out, want, err_msg=case)
                cropped = (full_shape[0] - 1, full_shape[1] - 3)  # crop of a padded grid
                np.testing.assert_array_equal(kernels.upsample_threshold(prob, cropped, 0.3),
                                              ref.upsample_threshold(prob, cropped, 0.3), err_msg=case)


def _layouts(base):
    """Views of `base` with every kind of stride the transposing copy meets: C, Fortran, flipped, sliced with
    steps, axes permuted."""
    yield "C", base
    yield "fortran", np.asfortranarray(base)
    yield "flipped", base[::-1, :, ::-1]
    yield "stepped", np.asfortranarray(base)[::2, 1:, ::-1]
    yield "permuted", np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0)


def test_copy_transposed(every_build):
    # Several tiles (32 rows by 512 bytes) with ragged tails along both of their axes, tails shorter than a
    # 16-byte register block, a single plane, a single line.
    for shape in ((70, 5, 600), (37, 3, 1030), (3, 65, 130), (2, 129, 7), (5, 64, 64), (1, 1, 70), (70, 1, 3),
                  (4, 5, 1), (2, 3, 2)):
        for dtype in (np.uint8, np.bool_, np.int16, np.float32, np.int64, np.float64):
            base = (RNG.random(shape) * 1000 - 500).astype(dtype)
            for kind, array in _layouts(base):
                for order in ("C", "F"):
                    out = np.empty(array.shape, dtype, order=order)
                    got = kernels.copy_transposed(out, array)
                    assert got is out
                    want = np.empty_like(out)
                    want[...] = array  # NumPy's own copy is the reference
                    np.testing.assert_array_equal(out, want, err_msg=f"{shape} {np.dtype(dtype)} {kind} -> {order}")
    mask = RNG.random((3, 70, 66)) > 0.5
    out = np.empty(mask.shape, np.uint8, order="F")
    np.testing.assert_array_equal(kernels.copy_transposed(out, mask), mask.astype(np.uint8))
    for fill in (0, 1):  # all-zero and all-one masks
        ones = np.full((2, 67, 65), fill, np.uint8)
        np.testing.assert_array_equal(kernels.copy_transposed(np.empty(ones.shape, np.uint8, order="F"), ones), ones)
    target = np.zeros((9, 70, 68), np.int16)  # into a reoriented, strided view of a larger volume
    source = RNG.integers(-1000, 1000, size=(68, 70, 4)).astype(np.int16)
    view = target.transpose(2, 1, 0)[:, ::-1, 2:6]
    kernels.copy_transposed(view, source)
    np.testing.assert_array_equal(target.transpose(2, 1, 0)[:, ::-1, 2:6], source)
    assert not target[:2].any() and not target[6:].any()
    empty = np.zeros((0, 3, 4), np.float32)
    assert kernels.copy_transposed(np.empty((0, 3, 4), np.float32, order="F"), empty).shape == (0, 3, 4)


@pytest.mark.parametrize("out, array, error, match", [
    ([[[0]]], np.zeros((1, 1, 1), np.uint8), TypeError, "out must be a numpy array"),
    (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3), np.uint8), ValueError, "array must be 3-D"),
    (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), ValueError, "shape"),
    (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.int16), TypeError, "does not cast"),
    (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 4), np.int8), TypeError, "does not cast"),
    (np.zeros((2, 3, 4), np.complex128), np.zeros((2, 3, 4), np.complex128), TypeError, "bool, integer and float"),
    (np.zeros((2, 3, 4), object), np.zeros((2, 3, 4), object), TypeError, "bool, integer and float"),
])
def test_copy_transposed_refuses_bad_input(out, array, error, match):
    with pytest.raises(error, match=match):
        kernels.copy_transposed(out, array)


def test_copy_transposed_refuses_read_only_and_overlapping_out():
    array = np.zeros((2, 3, 4), np.float32)
    read_only = np.zeros((2, 3, 4), np.float32, order="F")
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernels.copy_transposed(read_only, array)
    square = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        kernels.copy_transposed(square.transpose(2, 1, 0), square)


def test_upsample_threshold_matches_torch_bilinear():
    import torch
    prob = RNG.random((2, 12, 10)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(prob)[:, None], scale_factor=2, mode="bilinear",
                                         align_corners=False)[:, 0].numpy()
    want = up > 0.5
    got = kernels.upsample_threshold(prob, (24, 20))
    # Same interpolation; only values within rounding of the threshold may differ.
    differ = got != want
    assert np.all(np.abs(up[differ] - 0.5) < 1e-6)


# ---------------------------------------------------------------- input validation, once
@pytest.mark.parametrize("bad, error", [
    (np.zeros((2, 4, 4), np.float64), TypeError),
    (np.zeros((2, 4, 4), np.int8), TypeError),
    (np.zeros((4, 4), np.int16), ValueError),
    (np.zeros((1, 2, 4, 4), np.int16), ValueError),
    (np.zeros((0, 4, 4), np.int16), ValueError),
    ([[[1, 2]]], TypeError),
])
def test_downsample_image_refuses_bad_input(bad, error):
    with pytest.raises(error):
        kernels.downsample_image(bad, -200, 400)


@pytest.mark.parametrize("lo, hi", [(400, -200), (0, 0), (float("nan"), 1)])
def test_downsample_image_refuses_bad_window(lo, hi):
    with pytest.raises(ValueError, match="lo < hi"):
        kernels.downsample_image(np.zeros((1, 2, 2), np.int16), lo, hi)


def test_downsample_labels_refuses_float():
    with pytest.raises(TypeError, match="dtype float32"):
        kernels.downsample_labels(np.zeros((1, 2, 2), np.float32))


def test_kidney_slice_range_refuses_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        kernels.kidney_slice_range(np.zeros((1, 1, 1), np.uint8), -1)


def test_border_weights_refuses_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        kernels.border_weights(np.full((1, 2, 2), 300, np.int16))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        kernels.border_weights(np.full((1, 2, 2), -1, np.int32))
    with pytest.raises(TypeError):
        kernels.border_weights(np.zeros((1, 2, 2), np.float32))


def test_dice_refuses_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.dice(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError, match="target"):
        kernels.dice(np.zeros(3, np.uint8), np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="pred"):
        kernels.dice(np.zeros(3, np.complex64), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="undefined"):
        kernels.dice(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 3), np.uint8), smooth=0.0)


def test_upsample_threshold_refuses_bad_input():
    prob = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.upsample_threshold(prob, (9, 8))
    with pytest.raises(ValueError, match="shape must be"):
        kernels.upsample_threshold(prob, (8,))
    with pytest.raises(TypeError):
        kernels.upsample_threshold(prob.astype(np.float64), (8, 8))


def test_set_num_threads_validates():
    with pytest.raises(ValueError):
        kernels.set_num_threads(0)


def test_use_build_refuses_unknown_build():
    with pytest.raises(ValueError, match="not available"):
        kernels.use_build("avx512-nonexistent")


def test_out_argument_is_checked():
    ct = random_ct((2, 8, 8), np.int16)
    with pytest.raises(ValueError, match="float32 of shape"):
        kernels.downsample_image(ct, -200, 400, out=np.empty((2, 4, 4), np.float64))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\)"):
        kernels.downsample_image(ct, -200, 400, out=np.empty((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.downsample_image(ct, -200, 400, out=np.empty((2, 4, 8), np.float32)[:, :, ::2])
    read_only = np.empty((2, 4, 4), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernels.downsample_image(ct, -200, 400, out=read_only)
    with pytest.raises(TypeError, match="out must be a numpy array"):
        kernels.downsample_labels(ct.astype(np.uint8), out=[[0]])
    base = np.zeros(64, np.uint8)
    labels, out = base[:16].reshape(1, 4, 4), base.view(np.float32).reshape(1, 4, 4)
    with pytest.raises(ValueError, match="overlap"):
        kernels.border_weights(labels, out=out)
    prob = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        kernels.upsample_threshold(prob, (8, 8), out=prob.view(np.uint8).reshape(1, 8, 8))
