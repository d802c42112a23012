"""Backend-independent segmentation of one CT volume: the one prediction path everything shares.

`qnkit evaluate` scores with it, and `qnkit segment` (eager torch, ONNX Runtime, TensorRT) runs it,
so the test Dice measured after training is the Dice of the deployed pipeline. It imports no torch:
a backend is any `predict_batch(x) -> probabilities` callable on float32 `(N, 1, h, w)` arrays.

Steps: downsample in-plane by 2 with the HU window (compiled kernel), zero-pad h and w up to a
multiple of `pad_multiple` (zero is the window's lower bound, i.e. air, and training pads its
slices the same way), predict in batches, crop the padding, and map the half-resolution
probabilities back to the original grid with the compiled 2x bilinear upsample + threshold.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qnkit import kernels

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


def predict_volume(image_half: np.ndarray, predict_batch: PredictBatch, *, batch_size: int = 16,
                   pad_multiple: int = 16) -> np.ndarray:
    """Probabilities float32 (Z, h, w) for a downsampled image volume (Z, h, w) in [0, 1]."""
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


def segment_volume(ct: np.ndarray, predict_batch: PredictBatch, *, hu_window: tuple[float, float],
                   batch_size: int = 16, threshold: float = 0.5,
                   pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Kidney mask of a CT volume (Z, H, W) in the internal KiTS layout.

    Returns `(mask, probs)`: mask uint8 (Z, H, W) in {0, 1} on the input grid, and the
    half-resolution probabilities float32 (Z, ceil(H/2), ceil(W/2)).
    """
    lo, hi = hu_window
    image_half = kernels.downsample_image(ct, lo, hi)
    probs = predict_volume(image_half, predict_batch, batch_size=batch_size, pad_multiple=pad_multiple)
    mask = kernels.upsample_threshold(probs, ct.shape[1:], threshold=threshold)
    return mask, probs
