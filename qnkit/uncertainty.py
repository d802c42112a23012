"""Monte-Carlo dropout and mirror samples of the kidneys, for the per-kidney quality verdict.

Bayesian QuickNAT (Roy et al., NeuroImage 2019) keeps dropout on at test time and reads a structure's
reliability from how much the samples disagree. Here the Dropout2d masks are drawn with numpy from a
seed (:func:`draw_keep`) and given to the network (``QuickNAT.forward``'s ``keep``; the bundle's
``model.mc.onnx`` takes them as its input ``dropout_keep``), so ONNX Runtime, TensorRT and PyTorch draw
the same samples for one seed. Only the kidneys' box is sampled (the slices and in-plane extent of
the found kidneys, grown by a margin), the N samples of a slice in one batch. A test-time mirror
pass (the eval network on the left-right mirror image) is drawn over the same box: its disagreement
with the mask catches errors dropout does not.

Torch-free: the sampler is any ``predict(x, keep)`` (:meth:`qnkit.backends.base.Backend.predict`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qnkit import inference
from qnkit.postprocess import bounding_box

__all__ = ["KEEP_INPUT", "draw_keep", "KidneySamples", "sample_kidneys"]

KEEP_INPUT = "dropout_keep"  # the Monte-Carlo graph's second input (export/mc_dropout.py)
#: Around the found kidneys, this much (mm) is sampled too: a sample may reach further than the mask.
BOX_MARGIN_MM = 15.0
#: Slices per network call group (times the number of samples): bounds the probabilities held at once.
SLICES_PER_GROUP = 8


def draw_keep(rng: np.random.Generator, n: int, sites: int, filters: int, p: float) -> np.ndarray:
    """float32 (n, sites, filters) Dropout2d masks: 0 with probability `p`, else 1/(1-p)."""
    if p <= 0:
        return np.ones((n, sites, filters), np.float32)
    return ((rng.random((n, sites, filters)) >= p) / (1.0 - p)).astype(np.float32)


@dataclass
class KidneySamples:
    """Masks over the kidneys' box (`box`: three slices of the input's internal grid)."""

    box: tuple
    samples: np.ndarray | None  # uint8 (N, z, y, x): each Monte-Carlo sample's mask (None: no samples)
    mirror: np.ndarray  # uint8 (z, y, x): the mirror pass's mask
    seed: int

    @property
    def count(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    def voxel_uncertainty(self) -> np.ndarray:
        """float32 (z, y, x) in [0, 1]: 4 q (1 - q) for q the share of samples (mirror pass included) that
        call a voxel kidney: 0 where they all agree, 1 where they split half and half."""
        votes = self.mirror.astype(np.float32)
        if self.samples is not None:
            votes = votes + self.samples.sum(axis=0, dtype=np.float32)
        q = votes / np.float32(self.count + 1)
        return np.float32(4.0) * q * (np.float32(1.0) - q)

    def uncertainty_on_grid(self, shape: tuple) -> np.ndarray:
        """:meth:`voxel_uncertainty` on the whole input grid of `shape` (0 outside the kidneys' box)."""
        volume = np.zeros(shape, np.float32)
        volume[self.box] = self.voxel_uncertainty()
        return volume


def sample_kidneys(ct: np.ndarray, sides: np.ndarray, spacing, sample_batch, *, samples: int, seed: int,
                   dropout: dict | None, hu_window, model_spacing: float | None, threshold: float,
                   pad_multiple: int, mirror_batch=None, context=(1, None)) -> KidneySamples | None:
    """Draw `samples` Monte-Carlo dropout masks and one mirror mask over the box of the kidneys in `sides`.

    `sample_batch(x, keep)`: probabilities (N, 1, h, w) of slices x (N, C, h, w) with Dropout2d masks `keep`
    (C: a 2.5-D model's `context` planes, :func:`qnkit.inference.model_input_slices`);
    `dropout`: {"sites", "filters", "p"} of the network (None or samples 0: the mirror pass only,
    which runs on `mirror_batch(x)`, or on `sample_batch` with all-ones masks). Returns None when
    no kidney was found. Masks are the thresholded probabilities on the input's grid (no post-processing).
    """
    if not sides.any():
        return None
    pad = [int(np.ceil(BOX_MARGIN_MM / float(s))) for s in spacing]
    box = bounding_box(sides > 0, pad=pad)
    z0, z1 = box[0].start, box[0].stop
    H, W = ct.shape[1:]
    use_samples = samples > 0 and dropout is not None
    n = samples if use_samples else 0
    rng = np.random.default_rng(seed)
    region = (slice(None), box[1], box[2])
    out = np.zeros((n, z1 - z0, box[1].stop - box[1].start, box[2].stop - box[2].start), np.uint8) if n else None
    mirror = np.zeros((z1 - z0, *out.shape[2:]) if n else (z1 - z0, box[1].stop - box[1].start,
                                                                box[2].stop - box[2].start), np.uint8)
    to_mask = dict(threshold=threshold, model_spacing=model_spacing)
    for start in range(z0, z1, SLICES_PER_GROUP):
        stop = min(z1, start + SLICES_PER_GROUP)
        image = inference.model_input_slices(ct, np.arange(start, stop), hu_window=hu_window, spacing_hw=spacing[1:],
                                             model_spacing=model_spacing, slice_mm=spacing[0], context=context)
        h, w = image.shape[-2:]
        x = inference.network_batch(image, pad_multiple)
        flipped = np.ascontiguousarray(x[..., ::-1])
        if mirror_batch is not None:
            back = np.asarray(mirror_batch(flipped), np.float32)
        else:
            ones = np.ones((len(x), dropout["sites"], dropout["filters"]), np.float32)
            back = np.asarray(sample_batch(flipped, ones), np.float32)
        probs = np.ascontiguousarray(back[..., ::-1][:, 0, :h, :w])
        mirror[start - z0:stop - z0] = inference.to_input_mask(probs, (H, W), **to_mask)[region]
        if n:
            many = np.repeat(x, n, axis=0)  # slice-major: the n samples of a slice are neighbours in the batch
            keep = draw_keep(rng, len(many), dropout["sites"], dropout["filters"], dropout["p"])
            drawn = np.asarray(sample_batch(many, keep), np.float32)[:, 0, :h, :w].reshape(len(x), n, h, w)
            for k in range(n):
                out[k, start - z0:stop - z0] = inference.to_input_mask(
                    np.ascontiguousarray(drawn[:, k]), (H, W), **to_mask)[region]
    return KidneySamples(box=box, samples=out, mirror=mirror, seed=seed)
