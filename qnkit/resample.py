"""The model's grid in millimetres: in-plane resampling between a CT's grid and the model's.

A model works at one in-plane pixel spacing (its domain, in mm). A CT slice of H x W pixels at
(row, col) spacing (sr, sc) covers the same field of view as the model grid of
``model_grid_shape`` = (round(H*sr/m), round(W*sc/m)) pixels; pixel edges map to pixel edges
(half-pixel centres, scipy's ``grid_mode``), so resampling depends only on the two shapes.

Per axis the resampling is a row-normalised float32 matrix, applied as ``Ry @ X @ Rx.T`` (sparse: the
matrices are banded):
- coarser target (downsampling): area (box) weights, each output pixel the exact mean of the input
  area it covers, which anti-aliases;
- finer target (upsampling): bilinear with half-pixel centres and edge clamping (as torch's
  ``interpolate(mode="bilinear", align_corners=False)``);
- same size: identity (skipped).
When both axes go exactly 2:1 the compiled kernels do it (``kernels.downsample_image``: the 2x2 area
mean; ``kernels.upsample_threshold``: the same bilinear rule), with results equal to the matrices'.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from qnkit import kernels

__all__ = ["model_grid_shape", "axis_matrix", "to_model_grid", "probabilities_to_grid", "from_model_grid",
           "coverage_to_model_grid"]


def _shape_hw(shape_hw, name: str = "shape_hw") -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape_hw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (rows, columns), got {shape_hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def _spacing_hw(spacing_hw) -> tuple[float, float]:
    try:
        sr, sc = (float(s) for s in spacing_hw)
    except (TypeError, ValueError):
        raise ValueError(f"spacing_hw must be (row mm, column mm), got {spacing_hw!r}") from None
    if not (math.isfinite(sr) and math.isfinite(sc) and sr > 0 and sc > 0):
        raise ValueError(f"pixel spacing must be finite and > 0 mm, got {(sr, sc)}")
    return sr, sc


def _model_spacing(model_spacing) -> float:
    m = float(model_spacing)
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"model pixel spacing must be finite and > 0 mm, got {model_spacing!r}")
    return m


def model_grid_shape(shape_hw, spacing_hw, model_spacing) -> tuple[int, int]:
    """(h, w) of the model grid covering an (H, W) slice at `spacing_hw` mm: round(H*sr/m), round(W*sc/m),
    each at least 1 (halves round up, so an exact 2:1 grid of an odd size is ceil(H/2))."""
    H, W = _shape_hw(shape_hw)
    sr, sc = _spacing_hw(spacing_hw)
    m = _model_spacing(model_spacing)
    return max(1, math.floor(H * sr / m + 0.5)), max(1, math.floor(W * sc / m + 0.5))


@functools.lru_cache(maxsize=64)
def axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Read-only float32 (n_out, n_in) matrix resampling one axis of n_in pixels to n_out (rows sum to 1).

    Area weights when n_out < n_in, bilinear (half-pixel centres, clamped) when n_out > n_in,
    identity when equal.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out  # input pixels per output pixel
    if n_out < n_in:
        # Output pixel i covers input [i*scale, (i+1)*scale); weight = overlap with input pixel j.
        for i in range(n_out):
            a, b = i * scale, (i + 1) * scale
            for j in range(int(math.floor(a)), min(n_in, int(math.ceil(b)))):
                mat[i, j] = min(b, j + 1) - max(a, j)
    elif n_out > n_in:
        x = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0.0, n_in - 1)
        left = np.floor(x).astype(np.int64)
        right = np.minimum(left + 1, n_in - 1)
        t = x - left
        rows = np.arange(n_out)
        np.add.at(mat, (rows, left), 1.0 - t)
        np.add.at(mat, (rows, right), t)
    else:
        np.fill_diagonal(mat, 1.0)
    mat /= mat.sum(axis=1, keepdims=True)
    out = mat.astype(np.float32)
    out.flags.writeable = False
    return out


def _volume(array, name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D (slices, rows, columns), got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array


def _checked_out(out, shape, dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != tuple(shape):
        raise ValueError(f"out must be a {np.dtype(dtype).name} array of shape {tuple(shape)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writable")
    return out


def _is_half(big: tuple[int, int], small: tuple[int, int]) -> bool:
    """Both axes exactly 2:1 (the compiled kernels' case)."""
    return big[0] == 2 * small[0] and big[1] == 2 * small[1]


@functools.lru_cache(maxsize=64)
def _sparse_axis(n_in: int, n_out: int):
    """:func:`axis_matrix` as a CSR matrix (a few non-zeros per row)."""
    from scipy import sparse

    return sparse.csr_matrix(axis_matrix(n_in, n_out))


def _apply(x: np.ndarray, shape_hw: tuple[int, int], out: np.ndarray, box=None) -> np.ndarray:
    """out[z] = Ry @ x[z] @ Rx.T for float32 x (Z, H, W), the cheaper order first.

    The matrices are banded (2 to ceil(factor) + 1 weights per row), so they are applied as sparse
    products, one slice at a time: single-threaded, so they do not fight the inference backend for
    cores (dense BLAS spawned threads that did), and a slice's result does not depend on which other
    slices share the call (chunking is free). `box` ((r0, r1), (c0, c1)) computes only those output
    rows and columns (`out` is then (Z, r1 - r0, c1 - c0)), each value exactly as the whole slice's.
    """
    z, H, W = x.shape
    h, w = shape_hw
    ry, rx = _sparse_axis(H, h), _sparse_axis(W, w)
    rows_first = ry.nnz * W + rx.nnz * h <= rx.nnz * H + ry.nnz * w  # of the whole slice: the same rounding
    if box is not None:
        (r0, r1), (c0, c1) = box
        ry, rx = ry[r0:r1], rx[c0:c1]
        x = x[:, r0:r1] if H == h else x  # an axis kept as it is: its box is a plain crop
        x = x[:, :, c0:c1] if W == w else x
    if (H, W) == (h, w):
        out[...] = x
        return out
    for k in range(z):
        if H == h:
            out[k] = (rx @ x[k].T).T
        elif W == w:
            out[k] = ry @ x[k]
        elif rows_first:
            out[k] = (rx @ (ry @ x[k]).T).T
        else:
            out[k] = ry @ (rx @ x[k].T).T
    return out


def _window(ct: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 copy of `ct` clipped to [lo, hi] and scaled lo->0, hi->1."""
    x = ct.astype(np.float32)
    np.clip(x, np.float32(lo), np.float32(hi), out=x)
    x -= np.float32(lo)
    x *= np.float32(1.0 / (hi - lo))
    return x


def to_model_grid(ct_chunk: np.ndarray, spacing_hw, model_spacing, hu_window, out: np.ndarray | None = None
                  ) -> np.ndarray:
    """CT slices (Z, H, W) of any integer, float or bool dtype -> float32 (Z, h, w) in [0, 1] on the model grid.

    HU are clipped to `hu_window` = (lo, hi) and scaled lo->0, hi->1, then resampled in-plane to
    :func:`model_grid_shape` (area mean when coarser, bilinear when finer). Written into `out` when given.
    """
    lo, hi = (float(v) for v in hu_window)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"HU window must satisfy lo < hi, got lo={lo}, hi={hi}")
    ct = _volume(ct_chunk, "ct_chunk")
    if ct.dtype == np.bool_:
        ct = ct.view(np.uint8)
    if ct.dtype.kind not in "iuf":
        raise TypeError(f"ct_chunk has dtype {ct.dtype}; expected an integer or float type")
    z, H, W = ct.shape
    grid = model_grid_shape((H, W), spacing_hw, model_spacing)
    out = _checked_out(out, (z, *grid), np.float32)
    if _is_half((H, W), grid):
        if ct.dtype.newbyteorder("=") not in [np.dtype(d) for d in kernels.IMAGE_DTYPES]:
            ct = ct.astype(np.int16 if ct.dtype.kind in "iu" and ct.dtype.itemsize == 1 else np.float32)
        return kernels.downsample_image(ct, lo, hi, out=out)
    return _apply(_window(ct, lo, hi), grid, out)


def coverage_to_model_grid(mask: np.ndarray, spacing_hw, model_spacing, out: np.ndarray | None = None) -> np.ndarray:
    """Foreground fraction per model pixel, float32 (Z, h, w) in [0, 1], of a mask (Z, H, W) (foreground > 0).

    The same resampling as the image's, applied to the 0/1 mask: training labels are
    `coverage >= 0.5` and the soft targets the coverage itself.
    """
    mask = _volume(mask, "mask")
    if mask.dtype.kind not in "biu":
        raise TypeError(f"mask has dtype {mask.dtype}; expected bool or an integer type")
    return to_model_grid((mask > 0).view(np.uint8), spacing_hw, model_spacing, (0.0, 1.0), out=out)


def _probabilities(prob: np.ndarray) -> np.ndarray:
    prob = _volume(prob, "prob")
    if prob.dtype != np.float32:
        raise TypeError(f"prob has dtype {prob.dtype}; expected float32")
    return prob


def probabilities_to_grid(prob: np.ndarray, shape_hw, out: np.ndarray | None = None) -> np.ndarray:
    """Model-grid probabilities float32 (Z, h, w) -> float32 (Z, H, W) on the input's grid (bilinear
    when finer, area mean when coarser)."""
    prob = _probabilities(prob)
    H, W = _shape_hw(shape_hw)
    out = _checked_out(out, (prob.shape[0], H, W), np.float32)
    return _apply(prob, (H, W), out)


def from_model_grid(prob: np.ndarray, shape_hw, threshold: float = 0.5, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Mask uint8 (Z, H, W) in {0, 1} on the input's grid: the probabilities brought back by
    :func:`probabilities_to_grid`, THEN thresholded (foreground where > threshold)."""
    prob = _probabilities(prob)
    H, W = _shape_hw(shape_hw)
    z, h, w = prob.shape
    out = _checked_out(out, (z, H, W), np.uint8)
    if _is_half((H, W), (h, w)):
        return kernels.upsample_threshold(prob, (H, W), threshold=threshold, out=out)
    box = _foreground_box(prob, (H, W), threshold)
    out[...] = 0
    if box is None:
        return out
    (r0, r1), (c0, c1) = box
    step = max(1, (1 << 22) // ((r1 - r0) * (c1 - c0)))  # a few MiB of float32 at a time
    for start in range(0, z, step):
        chunk = prob[start:start + step]
        values = _apply(chunk, (H, W), np.empty((len(chunk), r1 - r0, c1 - c0), np.float32), box)
        np.greater(values, np.float32(threshold), out=out[start:start + step, r0:r1, c0:c1].view(np.bool_))
    return out


def may_exceed(values: np.ndarray, threshold: float) -> np.ndarray:
    """Where model-grid `values` may give a probability above `threshold` once resampled: a weighted mean
    with non-negative weights summing to one stays within its inputs, up to rounding (a relative margin
    of 1e-6 covers it)."""
    t = float(threshold)
    return values > np.float32(t - abs(t) * 1e-6)


def _foreground_box(prob: np.ndarray, shape_hw, threshold: float):
    """((r0, r1), (c0, c1)): the input-grid rows and columns that can exceed `threshold` after
    :func:`probabilities_to_grid`, None where none can: those that read a model pixel that
    :func:`may_exceed` it. On a CT the kidneys' box, a small part of each slice."""
    hot = may_exceed(prob, threshold)
    rows, cols = np.flatnonzero(hot.any(axis=(0, 2))), np.flatnonzero(hot.any(axis=(0, 1)))
    if rows.size == 0:
        return None
    (H, W), (h, w) = shape_hw, prob.shape[1:]
    return (_reading(_sparse_axis(h, H), rows[0], rows[-1] + 1),
            _reading(_sparse_axis(w, W), cols[0], cols[-1] + 1))


def _reading(matrix, lo: int, hi: int) -> tuple[int, int]:
    """The first and one past the last output index whose row of `matrix` (CSR, output x input) has a
    weight on inputs lo..hi-1."""
    reads = np.flatnonzero(matrix[:, lo:hi].getnnz(axis=1))
    return int(reads[0]), int(reads[-1]) + 1
