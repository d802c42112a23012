"""Plain NumPy references for the compiled kernels in qnkit.kernels: slow, obvious, trusted.

The tests check every kernel against these; `qnkit bench` times the kernels against them.
"""
import numpy as np


def _pad_even(a: np.ndarray) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, a.shape[1] % 2), (0, a.shape[2] % 2)), mode="edge")


def _blocks(a: np.ndarray) -> np.ndarray:
    z, h, w = a.shape
    return a.reshape(z, h // 2, 2, w // 2, 2)


def downsample_image(ct, lo, hi):
    scaled = (np.clip(ct.astype(np.float64), lo, hi) - lo) / (hi - lo)
    return _blocks(_pad_even(scaled)).mean(axis=(2, 4)).astype(np.float32)


def downsample_labels(labels):
    fg = _pad_even((labels > 0).astype(np.int32))
    return (_blocks(fg).sum(axis=(2, 4)) >= 2).astype(np.uint8)


def kidney_slice_range(labels, margin=20):
    slices = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    if slices.size == 0:
        return None
    return max(0, int(slices[0]) - margin), min(labels.shape[0], int(slices[-1]) + 1 + margin)


def border_weights(labels, omega0=2.0):
    values, counts = np.unique(labels, return_counts=True)
    lut = np.zeros(256, dtype=np.float32)
    lut[values] = np.median(counts) / counts
    weights = lut[labels]
    grad = np.zeros(labels.shape, dtype=bool)
    for axis in (1, 2):
        if labels.shape[axis] > 1:
            grad |= np.gradient(labels.astype(np.float64), axis=axis) != 0
    return weights + np.float32(omega0) * grad.astype(np.float32)


def dice(pred, target, threshold=0.5, smooth=1.0):
    p = np.asarray(pred) > threshold
    t = np.asarray(target) > 0
    return (2.0 * np.sum(p & t) + smooth) / (p.sum() + t.sum() + smooth)


def upsample_threshold(prob, shape, threshold=0.5):
    """2x bilinear (half-pixel centres, clamped edges), rows then columns, float32, then > threshold."""
    p = prob.astype(np.float32)
    z, h, w = p.shape
    H, W = shape

    def taps(n_out, n_in):
        r = np.arange(n_out)
        near = r // 2
        far = np.where(r % 2 == 0, np.maximum(near - 1, 0), np.minimum(near + 1, n_in - 1))
        return near, far

    near, far = taps(H, h)
    rows = np.float32(0.75) * p[:, near, :] + np.float32(0.25) * p[:, far, :]
    near, far = taps(W, w)
    full = np.float32(0.75) * rows[:, :, near] + np.float32(0.25) * rows[:, :, far]
    return (full > np.float32(threshold)).astype(np.uint8)
