"""Backend-independent model steps of the one path (:func:`qnkit.segment.segment_ct`), torch-free.

A backend is any `predict_batch(x) -> probabilities` callable on float32 `(N, C, h, w)` arrays that
returns `(N, 1, h, w)`; C is the model's input planes per slice (1 for a 2-D model, see below).
The steps: window the HU and resample each slice in-plane to the model's pixel spacing in mm
(:func:`to_model_input`, :mod:`qnkit.resample`), zero-pad h and w up to a multiple of `pad_multiple`
(zero is the window's lower bound, i.e. air, and training pads its slices the same way), predict in
batches (:func:`predict_volume`, optionally :func:`mirrored`), crop the padding, and bring the
probabilities back to the input's exact grid before thresholding (:func:`to_input_mask`). Which
slices are predicted, and what happens to the mask after, is :mod:`qnkit.segment`'s.

The model's spacing comes from its domain record (checkpoint meta / bundle ``qnkit.json``, see
:func:`model_pixel_spacing`). A model WITHOUT one (trained before the millimetre contract) keeps the
old contract: half the resolution of whatever comes in (compiled 2x2 downsample, 2x upsample).

2.5-D models (:func:`model_context`) see C odd planes per predicted slice: the slice and its
neighbours at fixed physical offsets ``(k - C//2) * context_mm`` along z, so that what a model sees
does not depend on the CT's slice thickness. :func:`context_planes` builds them, the one function
every caller (inference, uncertainty, verification, INT8 calibration, the training dataset) uses:
each plane is interpolated linearly along z between the two nearest slices AFTER the HU window and
in-plane resampling (the training cache holds slices in that form), and offsets beyond the first
or last slice read that slice (edge replicate). A 2-D model (C = 1) goes the way it always went.
"""
from __future__ import annotations

from typing import Callable

import functools
import math

import numpy as np

from qnkit import kernels, resample
from qnkit.errors import QnkitInputError

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


def _domain_record(record) -> dict:
    """The domain record of a domain record itself, a checkpoint's meta or a bundle (anything with a
    ``domain`` attribute or ``metadata`` dict); {} when there is none."""
    domain = getattr(record, "domain", None)
    if domain is None and isinstance(getattr(record, "metadata", None), dict):
        domain = record.metadata.get("domain")
    if domain is None and isinstance(record, dict):
        domain = record.get("domain", record if "pixel_spacing_mm" in record else None)
    return domain or {}


def model_pixel_spacing(record) -> float | None:
    """The model's in-plane pixel spacing (mm) from a domain record, a checkpoint's meta or a bundle
    (anything with a ``domain`` attribute or ``metadata`` dict); None when there is none (old model:
    half resolution of the input)."""
    value = _domain_record(record).get("pixel_spacing_mm")
    return None if value is None else float(value)


def model_context(record) -> tuple[int, float | None]:
    """(input planes per slice C, their spacing along z in mm) of a model, from its domain record (a
    checkpoint's meta, a bundle or the record itself: ``context_planes`` and ``context_mm``); (1, None)
    for a 2-D model, whose record has neither. Where the record also names the network (a checkpoint's
    meta, a bundle), its ``num_channels`` must be C: a record that disagrees is refused, never guessed."""
    domain = _domain_record(record)
    channels = int(domain.get("context_planes", 1))
    context_mm = domain.get("context_mm")
    network = record.get("network") if isinstance(record, dict) else getattr(record, "network", None)
    declared = int(network.get("num_channels", 1)) if isinstance(network, dict) else channels
    if declared != channels:
        raise QnkitInputError(f"the model takes {declared} input plane(s) per slice, but its domain record says "
                              f"{channels} (context_planes); re-export it")
    if channels == 1:
        return 1, None
    check_context(channels, context_mm)
    return channels, float(context_mm)


def check_context(channels, context_mm) -> None:
    """QnkitInputError unless `channels` is a positive odd number of planes and, for more than one,
    `context_mm` a finite distance > 0 mm between them."""
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1 or channels % 2 == 0:
        raise QnkitInputError(f"a model's input planes per slice must be a positive odd number, got {channels!r}")
    if channels > 1 and not (isinstance(context_mm, (int, float, np.floating)) and not isinstance(context_mm, bool)
                             and math.isfinite(context_mm) and context_mm > 0):
        raise QnkitInputError(f"{channels} input planes per slice need a context_mm > 0 (their spacing along z), "
                              f"got {context_mm!r}")


def context_positions(index: np.ndarray, num_slices: int, slice_mm: float, channels: int,
                      context_mm: float | None) -> np.ndarray:
    """float64 (len(index), C) fractional slice positions of the context planes of the slices `index`:
    ``index + (k - C//2) * context_mm / slice_mm``, clamped to [0, num_slices - 1] (edge replicate) and
    rounded to 1e-6 slice, so that an offset that is a whole number of slices in exact arithmetic
    (3 mm at 1.5 mm slices) reads that slice and nothing of its neighbour."""
    offsets = (np.arange(channels) - channels // 2) * (float(context_mm or 0.0) / float(slice_mm))
    positions = np.asarray(index, dtype=np.float64)[:, None] + offsets[None, :]
    return np.round(np.clip(positions, 0.0, num_slices - 1), 6)


def context_planes(volume: np.ndarray, index, slice_mm: float, channels: int, context_mm: float | None, *,
                   prepare: Callable[[np.ndarray], np.ndarray] | None = None, reuse: dict | None = None) -> np.ndarray:
    """float32 (len(index), C, h, w): the C context planes of each slice ``volume[index]``.

    `volume` (Z, H, W) holds slices `slice_mm` apart (any real dtype; a memory map is read only where
    needed). Plane k of slice i lies ``(k - C//2) * context_mm`` mm from it along z
    (:func:`context_positions`) and is interpolated linearly between the two slices around it; planes
    beyond the first or last slice are that slice. `prepare` maps the source slices (n, H, W) to what
    is interpolated, float32 (n, h, w): the HU window and in-plane resampling at inference
    (:func:`to_model_input`); each slice needed is prepared once. None: the slices themselves (the
    training cache, already on the model grid). C = 1 returns the (prepared) slices themselves.

    `reuse`, when given, carries prepared slices from one call to the next (slice index -> (h, w) array): the
    slices it holds are not prepared again, and on return it holds this call's. Consecutive batches of a
    slab share their context slices (at 1 mm slices and 3 mm context, 12 of the 28 slices a batch of 16
    needs), so each is prepared once.
    """
    _check_context_volume(volume)
    check_context(channels, context_mm)
    z = volume.shape[0]
    index = np.asarray(index)
    if index.ndim != 1 or index.dtype.kind not in "iu" or not index.size or index.min() < 0 or index.max() >= z:
        raise ValueError(f"index must be a non-empty 1-D integer array of slices in [0, {z}), got {index!r}")
    if not (isinstance(slice_mm, (int, float, np.floating)) and math.isfinite(slice_mm) and slice_mm > 0):
        raise QnkitInputError(f"slice spacing {slice_mm!r} mm: a 2.5-D model needs a finite slice spacing > 0 mm")
    positions = context_positions(index, z, slice_mm, channels, context_mm)
    below = np.floor(positions).astype(np.int64)
    weight = (positions - below).astype(np.float32)  # of the slice above
    above = np.minimum(below + 1, z - 1)
    needed = np.unique(np.concatenate([below.ravel(), above[weight > 0]]))
    if reuse is None:
        slices = _prepared(np.asarray(volume[needed]), prepare)
    else:
        missing = np.array([i for i in needed.tolist() if i not in reuse], dtype=np.int64)
        fresh = dict(zip(missing.tolist(), _prepared(np.asarray(volume[missing]), prepare))) if missing.size else {}
        table = {i: fresh[i] if i in fresh else reuse[i] for i in needed.tolist()}
        slices = np.stack([table[i] for i in needed.tolist()])
        reuse.clear()
        reuse.update(table)
    row = np.searchsorted(needed, below)
    out = np.empty((len(index), channels, *slices.shape[1:]), dtype=np.float32)
    out[...] = slices[row]
    blend = weight > 0
    if blend.any():
        t = weight[blend][:, None, None]
        out[blend] = (np.float32(1) - t) * out[blend] + t * slices[np.searchsorted(needed, above[blend])]
    return out


def _check_context_volume(volume) -> None:
    if not isinstance(volume, np.ndarray):
        raise ValueError(f"volume must be a numpy array (Z, H, W), got {type(volume).__name__}")
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"volume must be a non-empty 3-D array (slices, rows, columns), got shape {volume.shape}")
    if volume.dtype.kind not in "iuf":
        raise ValueError(f"volume has dtype {volume.dtype}; expected an integer or float type")


def _prepared(source: np.ndarray, prepare) -> np.ndarray:
    """`prepare(source)` (or `source` as float32), checked to be float32 (n, h, w) for n source slices."""
    slices = source.astype(np.float32) if prepare is None else prepare(source)
    if not isinstance(slices, np.ndarray) or slices.dtype != np.float32 or slices.ndim != 3 \
            or len(slices) != len(source):
        raise ValueError(f"prepare must return float32 (n, h, w) for {len(source)} slices, got "
                         f"{getattr(slices, 'dtype', type(slices).__name__)} {getattr(slices, 'shape', '')}")
    return slices


def model_grid_shape(shape_hw, spacing_hw, model_spacing: float | None) -> tuple[int, int]:
    """In-plane (h, w) of the model grid for an (H, W) slice; ceil(H/2), ceil(W/2) for an old model."""
    if model_spacing is None:
        return (int(shape_hw[0]) + 1) // 2, (int(shape_hw[1]) + 1) // 2
    return resample.model_grid_shape(shape_hw, spacing_hw, model_spacing)


def to_model_input(ct_chunk: np.ndarray, *, hu_window, spacing_hw, model_spacing: float | None) -> np.ndarray:
    """CT slices (Z, H, W) -> float32 (Z, h, w) in [0, 1] on the model grid (HU window, in-plane resampling);
    planes (Z, C, H, W) -> (Z, C, h, w), each plane alike."""
    if ct_chunk.ndim == 4:
        z, c = ct_chunk.shape[:2]
        flat = to_model_input(ct_chunk.reshape(z * c, *ct_chunk.shape[2:]), hu_window=hu_window,
                              spacing_hw=spacing_hw, model_spacing=model_spacing)
        return flat.reshape(z, c, *flat.shape[1:])
    if model_spacing is None:
        return kernels.downsample_image(ct_chunk, *hu_window)
    return resample.to_model_grid(ct_chunk, spacing_hw, model_spacing, hu_window)


def model_input_slices(ct: np.ndarray, index, *, hu_window, spacing_hw, model_spacing: float | None,
                       slice_mm: float | None = None, context=(1, None), reuse: dict | None = None) -> np.ndarray:
    """The network's input for the slices ``ct[index]`` on the model grid: float32 (N, h, w) for a 2-D
    model, (N, C, h, w) for a 2.5-D one (`context` = :func:`model_context`; `slice_mm` the CT's slice
    spacing), whose planes :func:`context_planes` builds from the prepared slices around them.

    A 2-D model's slices that form one run are read as a view of `ct`, not copied out first. `reuse`: a 2.5-D
    model's prepared slices carried between calls (:func:`context_planes`)."""
    channels, context_mm = context
    prepare = functools.partial(to_model_input, hu_window=hu_window, spacing_hw=spacing_hw,
                                model_spacing=model_spacing)
    index = np.asarray(index, dtype=np.int64)
    if channels > 1:
        return context_planes(ct, index, slice_mm, channels, context_mm, prepare=prepare, reuse=reuse)
    run = len(index) > 0 and index[-1] - index[0] + 1 == len(index) and bool((np.diff(index) == 1).all())
    return prepare(ct[index[0]:index[-1] + 1] if run else ct[index])


def to_input_mask(probs: np.ndarray, shape_hw, *, threshold: float, model_spacing: float | None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Model-grid probabilities (Z, h, w) -> uint8 mask (Z, H, W) on the input's grid, interpolated then
    thresholded (into `out`, C-contiguous uint8 (Z, H, W), when given)."""
    if model_spacing is None:
        return kernels.upsample_threshold(probs, shape_hw, threshold=threshold, out=out)
    return resample.from_model_grid(probs, shape_hw, threshold=threshold, out=out)


def network_batch(image: np.ndarray, pad_multiple: int) -> np.ndarray:
    """Contiguous float32 (N, C, h', w') network input of model-grid slices (N, h, w) (C = 1) or planes
    (N, C, h, w), zero-padded bottom/right to multiples of `pad_multiple`."""
    if image.ndim not in (3, 4):
        raise ValueError(f"model-grid input must be (N, h, w) or (N, C, h, w), got shape {image.shape}")
    padded = pad_slices(image, pad_multiple)
    return np.ascontiguousarray(padded[:, None] if image.ndim == 3 else padded, dtype=np.float32)


def predict_volume(image_half: np.ndarray, predict_batch: PredictBatch, *, batch_size: int = 16,
                   pad_multiple: int = 16) -> np.ndarray:
    """Probabilities float32 (Z, h, w) for an image volume on the model grid in [0, 1]: slices (Z, h, w),
    or the context planes (Z, C, h, w) of a 2.5-D model."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    z = image_half.shape[0]
    h, w = image_half.shape[-2:]
    probs = np.empty((z, h, w), dtype=np.float32)
    for start in range(0, z, batch_size):
        x = network_batch(image_half[start:start + batch_size], pad_multiple)
        y = np.asarray(predict_batch(x))
        if y.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"backend returned shape {y.shape} for input {x.shape}")
        probs[start:start + len(x)] = y[:, 0, :h, :w]
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
