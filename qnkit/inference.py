"""Backend-independent model steps of the one path (:func:`qnkit.segment.segment_ct`), torch-free.

A backend is any `predict_batch(x) -> probabilities` callable on float32 `(N, 1, h, w)` arrays.
The steps: window the HU and resample each slice in-plane to the model's pixel spacing in mm
(:func:`to_model_input`, :mod:`qnkit.resample`), zero-pad h and w up to a multiple of `pad_multiple`
(zero is the window's lower bound, i.e. air, and training pads its slices the same way), predict in
batches (:func:`predict_volume`, optionally :func:`mirrored`), crop the padding, and bring the
probabilities back to the input's exact grid before thresholding (:func:`to_input_mask`). Which
slices are predicted, and what happens to the mask after, is :mod:`qnkit.segment`'s.

The model's spacing comes from its domain record (checkpoint meta / bundle ``qnkit.json``, see
:func:`model_pixel_spacing`). A model WITHOUT one (trained before the millimetre contract) keeps the
old contract: half the resolution of whatever comes in (compiled 2x2 downsample, 2x upsample).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qnkit import kernels, resample

PredictBatch = Callable[[np.ndarray], np.ndarray]


def padded_size(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-int(n) // int(multiple)) * int(multiple)


def pad_slices(x: np.ndarray, multiple: int = 16, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes at the bottom/right with `value` up to a multiple of `multiple`.

    Padding at the end (not centred) keeps pixel (r, c) at (r, c), so cropping is `[..., :h, :w]`.
    Returns `x` itself when nothing needs padding.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, multiple) - h, padded_size(w, multiple) - w
    if ph == 0 and pw == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="constant", constant_values=value)


def model_pixel_spacing(record) -> float | None:
    """The model's in-plane pixel spacing (mm) from a domain record, a checkpoint's meta or a bundle
    (anything with a ``domain`` attribute or ``metadata`` dict); None when there is none (old model:
    half resolution of the input)."""
    domain = getattr(record, "domain", None)
    if domain is None and isinstance(getattr(record, "metadata", None), dict):
        domain = record.metadata.get("domain")
    if domain is None and isinstance(record, dict):
        domain = record.get("domain", record if "pixel_spacing_mm" in record else None)
    value = (domain or {}).get("pixel_spacing_mm")
    return None if value is None else float(value)


def model_grid_shape(shape_hw, spacing_hw, model_spacing: float | None) -> tuple[int, int]:
    """In-plane (h, w) of the model grid for an (H, W) slice; ceil(H/2), ceil(W/2) for an old model."""
    if model_spacing is None:
        return (int(shape_hw[0]) + 1) // 2, (int(shape_hw[1]) + 1) // 2
    return resample.model_grid_shape(shape_hw, spacing_hw, model_spacing)


def to_model_input(ct_chunk: np.ndarray, *, hu_window, spacing_hw, model_spacing: float | None) -> np.ndarray:
    """CT slices (Z, H, W) -> float32 (Z, h, w) in [0, 1] on the model grid (HU window, in-plane resampling)."""
    if model_spacing is None:
        return kernels.downsample_image(ct_chunk, *hu_window)
    return resample.to_model_grid(ct_chunk, spacing_hw, model_spacing, hu_window)


def to_input_mask(probs: np.ndarray, shape_hw, *, threshold: float, model_spacing: float | None) -> np.ndarray:
    """Model-grid probabilities (Z, h, w) -> uint8 mask (Z, H, W) on the input's grid, interpolated then thresholded."""
    if model_spacing is None:
        return kernels.upsample_threshold(probs, shape_hw, threshold=threshold)
    return resample.from_model_grid(probs, shape_hw, threshold=threshold)


def predict_volume(image_half: np.ndarray, predict_batch: PredictBatch, *, batch_size: int = 16,
                   pad_multiple: int = 16) -> np.ndarray:
    """Probabilities float32 (Z, h, w) for an image volume on the model grid (Z, h, w) in [0, 1]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    z, h, w = image_half.shape
    probs = np.empty((z, h, w), dtype=np.float32)
    for start in range(0, z, batch_size):
        chunk = image_half[start:start + batch_size]
        x = np.ascontiguousarray(pad_slices(chunk, pad_multiple)[:, None], dtype=np.float32)
        y = np.asarray(predict_batch(x))
        if y.shape != x.shape:
            raise ValueError(f"backend returned shape {y.shape} for input {x.shape}")
        probs[start:start + len(chunk)] = y[:, 0, :h, :w]
    return probs


def mirrored(predict_batch: PredictBatch) -> PredictBatch:
    """Test-time mirroring: the mean of the probabilities of the slices and of their left-right mirror
    images (mirrored back). nnU-Net's default at inference; twice the network work for a smoother, less
    biased border. Padding is mirrored with the slice and back, so every pixel keeps its place."""
    def predict(x: np.ndarray) -> np.ndarray:
        y = np.asarray(predict_batch(x), dtype=np.float32)
        back = np.asarray(predict_batch(np.ascontiguousarray(x[..., ::-1])), dtype=np.float32)[..., ::-1]
        return 0.5 * (y + back)  # float32, a new contiguous array

    return predict
