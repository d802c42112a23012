"""The one path from a CT to its kidney mask, and the `qnkit segment` pipeline around it.

:func:`segment_ct` takes a CT (internal-layout array + :class:`qnkit.io.Geometry`) and a model (its
``predict_batch`` and :func:`model_arguments`) to the final mask: the kidneys' slab (a coarse pass
first), HU window + in-plane resampling to the model's pixel spacing in mm (qnkit.resample: compiled
kernels or BLAS, in a background thread, one batch ahead of inference; both release the GIL), batched
inference on a backend (test-time mirroring when asked), probabilities back to the input's exact grid,
then threshold -> sides from the body's midline, then one kidney per side
(:func:`qnkit.postprocess.kidney_sides`). `qnkit segment` (:func:`segment_file`: load, domain checks,
stats, write), `qnkit evaluate` (qnkit.train.evaluation), the bench's end-to-end row, the demo and the
recipes' real-CT score all run it, so every figure they give is a figure of the mask a user gets.

Each batch the backend sees is padded to the same multiple as in training
(:func:`qnkit.inference.predict_volume`). Padding matters: QuickNAT's channel SE pools over the whole
(padded) slice, so a prediction depends on the padded size.

Nothing here imports torch; a backend is any ``predict(x (N,C,h,w) float32) -> probabilities (N,1,h,w)``,
C the model's input planes per slice (1, or a 2.5-D model's context planes: :func:`qnkit.inference.model_context`).
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qnkit import inference
from qnkit import io as qio
from qnkit.io import same_file  # noqa: F401  (the one definition; callers use segment.same_file)
from qnkit import postprocess as post
from qnkit import resample
from qnkit.errors import QnkitInputError

__all__ = ["SegmentOptions", "CaseInput", "CaseResult", "predict_probabilities", "predict_kidney_slab",
           "model_arguments", "segment_ct", "segment_file",
           "load_case", "resolve_inputs", "output_path", "check_writable_folder", "parse_closing", "MASK_SUFFIX"]

MASK_SUFFIX = "_kidneys.nii.gz"
STAGES = ("load", "preprocess", "inference", "postprocess", "uncertainty", "write")


@dataclass
class SegmentOptions:
    """What to do after inference (and how the model is fed)."""

    batch_size: int = 16
    postprocess: bool = True
    min_kidney_ml: float = post.MIN_KIDNEY_ML  # a side's largest piece below this is no kidney (absent)
    merge_mm: float = post.MERGE_MM  # pieces this close to a side's kidney are part of it
    closing: float = 0.0  # closing radius; 0 = no closing
    closing_unit: str = "mm"  # mm | voxels
    split_sides: bool = False  # mask values 1 right, 2 left (else 1 kidney)
    strict: bool = False  # an out-of-domain warning (qnkit.domain) is an error: nothing is written
    slab: bool = True  # find the kidneys' slab with a coarse pass first, run every slice only there
    slab_margin_mm: float = 5.0  # kept above and below what the coarse pass found (the slab grows by itself after)
    coarse_step_mm: float = 15.0  # distance between the coarse pass's slices
    slab_min_share: float = 0.2  # coarse runs with less than this share of the largest run's kidney area are ignored
    mirror: bool = False  # test-time mirroring (qnkit.inference.mirrored, applied by segment_ct): twice the work
    z_step_mm: float = 0.0  # inside the slab, predict one slice per this many mm and interpolate the
    #                         probabilities between (0: every slice; an approximation, see predict_kidney_slab)
    quality: bool = False  # per-kidney quality verdict (qnkit.quality): a mirror pass over the kidneys' box
    uncertainty: int = 0  # with quality: Monte-Carlo dropout samples over the kidneys' box (qnkit.uncertainty)
    seed: int = 0  # the Monte-Carlo samples' seed (the same seed draws the same samples on every backend)
    keep_samples: bool = False  # keep the CT, sides and samples in the result (for --uncertainty-map)


@dataclass
class CaseInput:
    """One CT to segment: a display name (used for output names) and its NIfTI file."""

    name: str
    image: Path
    source: Path  # what the user named: the file, or the KiTS case folder


@dataclass
class CaseResult:
    name: str
    input: Path
    output: Path | None
    shape: tuple
    spacing: tuple
    voxel_volume_ml: float
    stats: dict
    timings: dict
    model_grid: dict | None = None  # input and model pixel spacing (mm), model grid (h, w)
    warnings: list = field(default_factory=list)  # out-of-domain warnings (qnkit.domain), one sentence each
    sides: np.ndarray | None = field(default=None, repr=False)  # internal layout, 1 right, 2 left
    ct: np.ndarray | None = field(default=None, repr=False)
    geometry: qio.Geometry | None = field(default=None, repr=False)
    samples: object | None = field(default=None, repr=False)  # qnkit.uncertainty.KidneySamples (with quality)

    @property
    def slices(self) -> int:
        return int(self.shape[0])

    def to_json(self) -> dict:
        total = sum(self.timings.get(k, 0.0) for k in STAGES)
        infer = self.timings.get("inference", 0.0)
        return {
            "name": self.name, "input": str(self.input), "output": str(self.output) if self.output else None,
            "shape_internal": list(self.shape), "spacing_mm": [round(s, 4) for s in self.spacing],
            "voxel_volume_ml": self.voxel_volume_ml, "model_grid": self.model_grid, "warnings": list(self.warnings),
            "kidneys": self.stats,
            "timings_s": {k: round(self.timings.get(k, 0.0), 4) for k in (*STAGES, "wall")},
            "slices": self.slices,
            "slices_per_s": round(self.slices / total, 2) if total > 0 else None,
            "inference_slices_per_s": round(self.slices / infer, 2) if infer > 0 else None,
        }


# --- the model part -------------------------------------------------------------------------


def _add_times(timings: dict | None, times: dict) -> None:
    if timings is not None:
        for k, v in times.items():
            timings[k] = timings.get(k, 0.0) + v


def predict_probabilities(ct: np.ndarray, predict_batch, index: np.ndarray, *, hu_window, spacing_hw,
                          model_spacing: float | None, batch_size: int, pad_multiple: int,
                          progress: Callable[[int], None] | None = None, times: dict,
                          slice_mm: float | None = None, context=(1, None)) -> np.ndarray:
    """Model-grid probabilities float32 (len(index), h, w) of the slices ``ct[index]``.

    A worker thread prepares the next two batches (:func:`qnkit.inference.model_input_slices`: a 2.5-D
    model's `context` planes from the slices `slice_mm` apart around them, each slice prepared once for the
    batches that share it) while the backend runs one;
    `times` gets 'preprocess' and 'inference' seconds added, `progress(n)` the slices finished.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = np.asarray(index, dtype=np.int64)
    grid = inference.model_grid_shape(ct.shape[1:], spacing_hw, model_spacing)
    probs = np.empty((len(index), *grid), dtype=np.float32)
    shared: dict = {}  # context slices one batch prepared that the next needs; one worker thread, in order

    def prepare(start: int) -> np.ndarray:
        t = time.perf_counter()
        image = inference.model_input_slices(ct, index[start:start + batch_size], hu_window=hu_window,
                                             spacing_hw=spacing_hw, model_spacing=model_spacing, slice_mm=slice_mm,
                                             context=context, reuse=shared)
        times["preprocess"] += time.perf_counter() - t
        return image

    starts = list(range(0, len(index), batch_size))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qnkit-preprocess") as pool:
        pending: deque = deque()
        ahead = iter(starts)
        try:
            for start in starts:
                while len(pending) < 2:
                    nxt = next(ahead, None)
                    if nxt is None:
                        break
                    pending.append(pool.submit(prepare, nxt))
                image = pending.popleft().result()
                t = time.perf_counter()
                probs[start:start + len(image)] = inference.predict_volume(
                    image, predict_batch, batch_size=batch_size, pad_multiple=pad_multiple)
                times["inference"] += time.perf_counter() - t
                if progress is not None:
                    progress(start + len(image))
        finally:
            for fut in pending:
                fut.cancel()
    return probs


def mask_to_input_grid(probs: np.ndarray, shape_hw, *, threshold: float, model_spacing: float | None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """:func:`qnkit.inference.to_input_mask` that resamples only the slices with some kidney.

    Bringing probabilities back to the input's grid is an interpolation whose weights are
    non-negative and sum to one, so no value can exceed a slice's largest probability: a slice
    whose probabilities all stay below the threshold (:func:`qnkit.resample.may_exceed`) is all
    background without resampling it. On a whole CT that is most slices. Written into `out`
    (uint8 (Z, H, W)) when given; the result equals to_input_mask's.
    """
    z = probs.shape[0]
    H, W = (int(n) for n in shape_hw)
    if out is None:
        out = np.zeros((z, H, W), dtype=np.uint8)
    else:
        if out.shape != (z, H, W) or out.dtype != np.uint8:
            raise ValueError(f"mask_out must be uint8 of shape {(z, H, W)}, got {out.dtype} {out.shape}")
        out[...] = 0
    if z == 0:
        return out
    hot = resample.may_exceed(probs.reshape(z, -1).max(axis=1), threshold)
    edges = np.flatnonzero(np.diff(np.r_[0, hot.view(np.int8), 0]))
    for start, stop in zip(edges[::2], edges[1::2]):
        inference.to_input_mask(probs[start:stop], (H, W), threshold=threshold, model_spacing=model_spacing,
                                out=out[start:stop])
    return out


def predict_kidney_slab(ct: np.ndarray, predict_batch, *, slice_mm: float, options: "SegmentOptions",
                        progress: Callable[[int], None] | None = None, **model) -> tuple[np.ndarray, dict]:
    """Kidney mask of a CT, predicting only the kidneys' slab: what matters, not every slice.

    A coarse pass runs the same network on one slice every ``options.coarse_step_mm``; slices where
    it finds kidney (at least 1 cm² above threshold), in runs that hold at least
    ``options.slab_min_share`` of the largest run's area (:func:`_kidney_runs`: isolated false
    positives do not stretch the slab), span the slab, widened by the step and
    ``options.slab_margin_mm`` on each side. Every slice of the slab is then predicted (the coarse
    pass's own slices are reused, not run again); while the
    probabilities reach an end of the slab that is not the volume's end, the slab grows by the
    margin there and only the new slices are predicted (a slice's prediction does not depend on which
    other slices are predicted). Slices outside the slab are background. Nothing found by the coarse
    pass, or a volume too short for a coarse pass to save work, runs every slice.

    ``options.z_step_mm`` > 0 predicts one slab slice per that many mm only (and the slab's ends)
    and interpolates the probabilities of the slices between linearly: about half the work on 1 mm
    slices at 2 mm, at a cost in agreement with every slice (mask Dice 0.987 on the bench's whole
    CT), so it is not the default. `model` holds the model arguments (hu_window, spacing_hw,
    model_spacing, batch_size, threshold, pad_multiple, context) and `timings` (a dict that gets
    'preprocess', 'inference' and 'upsample' seconds added). Returns (mask uint8 (Z, H, W), slab record).
    A 2.5-D model's context planes reach past the slab into the rest of the CT, as they would
    predicting every slice, so that the slab gives each slice the prediction a whole-CT pass gives it.

    Memory: the mask is one uint8 volume, written in place; probabilities exist for the slab on the
    model grid only (a 2.5 mm model's grid holds a 16th of a 0.7 mm CT's pixels), and the CT is never
    copied whole.
    """
    z, H, W = ct.shape
    context_slice_mm = slice_mm  # the true spacing: context planes lie at millimetres, checked there
    slice_mm = float(slice_mm) if slice_mm and slice_mm > 0 else 1.0
    step = max(1, int(options.coarse_step_mm // slice_mm))
    margin = int(np.ceil((options.slab_margin_mm + step * slice_mm) / slice_mm))
    threshold = model.get("threshold", 0.5)
    model_spacing = model.get("model_spacing")
    timings = model.pop("timings", None)
    times = {"preprocess": 0.0, "inference": 0.0, "upsample": 0.0}
    grid = inference.model_grid_shape((H, W), model.get("spacing_hw") or (1.0, 1.0), model_spacing)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    done = [0]

    def tick(n: int) -> None:
        if progress is not None:
            progress(min(z, done[0] + n))

    def probabilities(index: np.ndarray) -> np.ndarray:
        out = predict_probabilities(ct, predict_batch, index, progress=tick, times=times, slice_mm=context_slice_mm,
                                    context=model.get("context", (1, None)), **{
            k: model[k] for k in ("hu_window", "spacing_hw", "model_spacing", "batch_size", "pad_multiple")})
        done[0] += len(index)
        return out

    def finished(probs: np.ndarray, lo: int, hi: int, record: dict) -> tuple[np.ndarray, dict]:
        """Slices lo..hi-1's probabilities to the mask on the input's grid (the rest stays background)."""
        t = time.perf_counter()
        mask_to_input_grid(probs, (H, W), threshold=threshold, model_spacing=model_spacing, out=mask[lo:hi])
        times["upsample"] += time.perf_counter() - t
        _add_times(timings, times)
        return mask, {**record, "start": lo, "stop": hi, "slices_run": int(done[0]), "grid": list(grid)}

    def every_slice(record: dict) -> tuple[np.ndarray, dict]:
        return finished(probabilities(np.arange(z)), 0, z, record)

    record = {"coarse_step": step, "margin": margin}
    if not options.slab or z < 4 * step + 2 * margin:
        return every_slice(record)
    coarse = np.unique(np.r_[np.arange(0, z, step), z - 1])
    coarse_probs = probabilities(coarse)
    sr, sc = model.get("spacing_hw") or (1.0, 1.0)
    pixel_mm2 = (model_spacing * model_spacing) if model_spacing else (4.0 * sr * sc)
    area = (coarse_probs > threshold).sum(axis=(1, 2)) * pixel_mm2
    found, runs = _kidney_runs(coarse, area, options.slab_min_share)
    record["runs"] = runs
    if found.size == 0:
        return every_slice({**record, "found": False})
    lo, hi = max(0, int(found.min()) - margin), min(z, int(found.max()) + margin + 1)
    stride = max(1, int(options.z_step_mm / slice_mm + 1e-6)) if options.z_step_mm > 0 else 1
    # slice -> its model-grid probabilities; the coarse pass's slices are not predicted twice
    known: dict[int, np.ndarray] = dict(zip(coarse.tolist(), coarse_probs))
    while True:
        # On a fixed lattice of slices, so that a grown slab reuses what was predicted.
        sampled = np.unique(np.r_[np.arange(lo + (-lo) % stride, hi, stride), lo, hi - 1])
        todo = np.array([i for i in sampled if int(i) not in known], dtype=np.int64)
        if todo.size:
            known.update(zip(todo.tolist(), probabilities(todo)))
        probs = _interpolate_slices(sampled, np.stack([known[int(i)] for i in sampled]), lo, hi)
        grow_lo = lo > 0 and bool((probs[0] > threshold).any())
        grow_hi = hi < z and bool((probs[-1] > threshold).any())
        if not (grow_lo or grow_hi):
            break
        lo, hi = (max(0, lo - margin) if grow_lo else lo), (min(z, hi + margin) if grow_hi else hi)
    return finished(probs, lo, hi, {**record, "found": True, "z_stride": stride})


def _interpolate_slices(sampled: np.ndarray, probs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Probabilities float32 (hi - lo, h, w) of slices lo..hi-1 from those of the `sampled` slices
    (sorted, lo and hi - 1 among them): linear in the slice index between neighbours."""
    if len(sampled) == hi - lo:
        return probs
    out = np.empty((hi - lo, *probs.shape[1:]), dtype=np.float32)
    for k in range(len(sampled) - 1):
        a, b = int(sampled[k]), int(sampled[k + 1])
        t = ((np.arange(a, b) - a) / (b - a)).astype(np.float32)[:, None, None]
        out[a - lo:b - lo] = probs[k] * (np.float32(1) - t) + probs[k + 1] * t
    out[-1] = probs[-1]
    return out


def _kidney_runs(coarse: np.ndarray, area_mm2: np.ndarray, min_share: float) -> tuple[np.ndarray, list]:
    """(coarse slices the slab must span, the runs found) from the coarse pass's kidney area per slice.

    Coarse slices with at least 1 cm² of kidney form runs (a run bridges one empty coarse slice).
    The kidneys are one long run of large areas; a network's false positives elsewhere (bowel, the
    volume's first and last slices) are short runs of small ones, and post-processing would drop
    them anyway (one kidney per side: the largest piece and what lies within merge_mm of it). So
    only runs holding at least ``min_share`` of the largest run's summed area span the slab.
    """
    hit = np.flatnonzero(area_mm2 >= 100.0)
    if hit.size == 0:
        return coarse[hit], []
    groups = np.split(hit, np.flatnonzero(np.diff(hit) > 2) + 1)
    sums = [float(area_mm2[g].sum()) for g in groups]
    keep = [g for g, total in zip(groups, sums) if total >= min_share * max(sums)]
    runs = [{"slices": [int(coarse[g[0]]), int(coarse[g[-1]])], "area_cm2": round(total / 100.0, 1),
             "kept": total >= min_share * max(sums)} for g, total in zip(groups, sums)]
    return coarse[np.concatenate(keep)], runs


def model_arguments(model) -> dict:
    """:func:`segment_ct`'s keywords that describe a model: hu_window, threshold, pad_multiple, model_spacing,
    dropout and context ((planes per slice, their spacing in mm): :func:`qnkit.inference.model_context`).

    `model` is a bundle (:class:`qnkit.bundle.Bundle`: what `qnkit segment` runs) or a checkpoint's
    meta dict (qnkit.train.checkpoint: what `qnkit evaluate` runs); both record the training's
    preprocessing, so a checkpoint and the bundle exported from it are fed alike. ``pad_multiple``
    is the padding of training and evaluation; a bundle without one pads to its size divisor.
    """
    if isinstance(model, dict):
        pre = model["preprocessing"]
        return {"hu_window": (float(pre["hu_lo"]), float(pre["hu_hi"])), "threshold": float(pre.get("threshold", 0.5)),
                "pad_multiple": int(pre.get("pad_multiple", 16)), "model_spacing": inference.model_pixel_spacing(model),
                "dropout": _dropout_sites(model.get("network") or model.get("config")),
                "context": inference.model_context(model)}
    pre = model.metadata.get("preprocessing", {})
    return {"hu_window": model.hu_window, "threshold": model.threshold,
            "pad_multiple": int(pre.get("pad_multiple", model.size_divisor)),
            "model_spacing": inference.model_pixel_spacing(model),
            "dropout": _dropout_sites(getattr(model, "network", None)), "context": inference.model_context(model)}


def _dropout_sites(network: dict | None) -> dict | None:
    """{"sites", "filters", "p"} of a QuickNAT config's Dropout2d layers (4 encoder + 4 decoder blocks);
    None without a config or without dropout (then no Monte-Carlo samples can be drawn)."""
    if not isinstance(network, dict) or not float(network.get("drop_out", 0.0)) > 0:
        return None
    return {"sites": 8, "filters": int(network["num_filters"]), "p": float(network["drop_out"])}


def segment_ct(ct: np.ndarray, geometry: qio.Geometry, predict_batch, *, hu_window, threshold: float = 0.5,
               pad_multiple: int = 16, model_spacing: float | None = None,
               options: SegmentOptions | None = None, progress=None, timings: dict | None = None,
               network_mask: Callable[[np.ndarray], None] | None = None, dropout: dict | None = None,
               samples_out: list | None = None, context=(1, None)) -> tuple[np.ndarray, np.ndarray, dict]:
    """The one path from a CT to its kidney mask. Returns (mask, sides, model_grid).

    `ct` is in the internal layout with its `geometry`; the model is `predict_batch` and the keywords
    of :func:`model_arguments`. `mask` is the output volume (uint8: 1 kidney, or 1 right / 2 left
    with split_sides), `sides` always has 1 right / 2 left, `model_grid` says how the model saw the
    slices: {"input_pixel_spacing_mm": [row, col], "model_pixel_spacing_mm": m, "grid": [h, w],
    "slab": ...}. Each slice is resampled in-plane to the model's `model_spacing` (mm) and the
    probabilities brought back to the input's exact grid before thresholding; `model_spacing` None
    (a model without a domain record) feeds half the input's resolution, as before the millimetre
    contract. A 2.5-D model (`context` = (C, mm), :func:`qnkit.inference.model_context`) gets each
    slice's C context planes, the CT's slices lying ``geometry.spacing[0]`` mm apart. Only the kidneys'
    slab is predicted (:func:`predict_kidney_slab`; ``options.slab`` False predicts every slice);
    ``options.mirror`` averages each slice's prediction with its mirror image's
    (:func:`qnkit.inference.mirrored`). Post-processing is :func:`qnkit.postprocess.kidney_sides`, on
    the mask in place.

    `network_mask`, when given, is called with the network's mask (uint8 {0, 1}, the input's grid)
    before post-processing changes it: the raw mask `qnkit evaluate` scores beside the output.

    ``options.quality``: after post-processing, a mirror pass and ``options.uncertainty`` Monte-Carlo
    dropout samples (``predict_batch(x, keep)``, masks from ``options.seed``; `dropout` is
    :func:`model_arguments`' record of the network's Dropout2d) are drawn over the kidneys' box only
    (:func:`qnkit.uncertainty.sample_kidneys`); the :class:`~qnkit.uncertainty.KidneySamples` (or None:
    no kidney) is appended to `samples_out`, its seconds to timings["uncertainty"].
    """
    options = options or SegmentOptions()
    timings = timings if timings is not None else {}
    spacing_hw = geometry.spacing[1:]
    predict = inference.mirrored(predict_batch) if options.mirror else predict_batch
    mask, slab = predict_kidney_slab(
        ct, predict, slice_mm=geometry.spacing[0], options=options, progress=progress, hu_window=hu_window,
        spacing_hw=spacing_hw, model_spacing=model_spacing, batch_size=options.batch_size, threshold=threshold,
        pad_multiple=pad_multiple, timings=timings, context=context)
    model_grid = {"input_pixel_spacing_mm": [round(s, 4) for s in spacing_hw],
                  "model_pixel_spacing_mm": None if model_spacing is None else round(model_spacing, 4),
                  "grid": slab.pop("grid"), "slab": slab}
    if context[0] > 1:
        model_grid["context"] = {"planes": int(context[0]), "mm": float(context[1])}
    if network_mask is not None:
        network_mask(mask)
    t = time.perf_counter()
    out, sides = post.kidney_sides(mask, ct, geometry, options, in_place=True)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t + timings.pop("upsample", 0.0)
    if options.quality:
        from qnkit.uncertainty import sample_kidneys

        t = time.perf_counter()
        drawn = sample_kidneys(ct, sides, geometry.spacing, predict_batch, samples=options.uncertainty,
                               seed=options.seed, dropout=dropout, hu_window=hu_window, model_spacing=model_spacing,
                               threshold=threshold, pad_multiple=pad_multiple, mirror_batch=predict_batch,
                               context=context)
        timings["uncertainty"] = timings.get("uncertainty", 0.0) + time.perf_counter() - t
        if samples_out is not None:
            samples_out.append(drawn)
    return out, sides, model_grid


# --- files ----------------------------------------------------------------------------------


def load_case(case: CaseInput) -> tuple[np.ndarray, qio.Geometry, float]:
    """(CT in the internal layout, its Geometry, seconds taken); bad files raise QnkitInputError."""
    t = time.perf_counter()
    ct, geometry = qio.load_image(case.image)
    return ct, geometry, time.perf_counter() - t


def segment_file(case: CaseInput, out_path: Path | None, predict_batch, *, bundle, options: SegmentOptions,
                 overwrite: bool = False, progress=None, keep_arrays: bool = False, loaded=None) -> CaseResult:
    """Load (unless `loaded` is :func:`load_case`'s result), segment and (when `out_path` is given)
    write one case; returns its CaseResult. Callers open the backend after :func:`load_case`, so
    a bad file fails before any backend is opened.

    Out-of-domain warnings (:mod:`qnkit.domain`) go to stderr as ``qnkit: warning: <case>: ...`` and
    into the result; with ``options.strict`` they raise QnkitInputError instead, before inference for
    what the input shows and before anything is written for kidneys touching the volume's edge.
    """
    from qnkit import domain as checks
    from qnkit.report import kidney_stats

    wall = time.perf_counter()
    ct, geometry, load_s = loaded if loaded is not None else load_case(case)
    warnings = _report_warnings(case.name, checks.input_warnings(ct, geometry, getattr(bundle, "domain", None)),
                                options.strict)
    timings: dict = {"load": load_s}
    if progress is not None:
        progress(0, ct.shape[0])
    drawn: list = []
    mask, sides, model_grid = segment_ct(
        ct, geometry, predict_batch, **model_arguments(bundle), options=options,
        progress=(lambda n: progress(n, ct.shape[0])) if progress is not None else None, timings=timings,
        samples_out=drawn)
    warnings += _report_warnings(case.name, checks.mask_warnings(mask), options.strict)
    stats = kidney_stats(sides, ct, geometry)
    samples = drawn[0] if drawn else None
    if options.quality:
        from qnkit import quality as Q

        calibration, source = Q.calibration_of(bundle)
        for side, verdict in Q.kidney_quality(sides, ct, geometry.spacing, samples, calibration, source).items():
            stats[side]["quality"] = verdict
    t = time.perf_counter()
    if out_path is not None:
        qio.save_mask(mask, geometry, out_path, overwrite=overwrite)
    timings["write"] = time.perf_counter() - t
    timings["wall"] = time.perf_counter() - wall + (load_s if loaded is not None else 0.0)
    return CaseResult(name=case.name, input=case.image, output=out_path, shape=tuple(ct.shape),
                      spacing=geometry.spacing, voxel_volume_ml=geometry.voxel_volume_ml, stats=stats,
                      timings=timings, model_grid=model_grid, warnings=warnings,
                      sides=sides if keep_arrays else None, ct=ct if keep_arrays else None,
                      geometry=geometry if keep_arrays else None, samples=samples if keep_arrays else None)


def _report_warnings(name: str, warnings: list[str], strict: bool) -> list[str]:
    """Print each warning as one stderr line; with `strict`, raise them as one QnkitInputError line instead."""
    if warnings and strict:
        raise QnkitInputError(f"{name}: {'; '.join(warnings)} (--strict: nothing written)")
    for text in warnings:
        print(f"qnkit: warning: {name}: {text}", file=sys.stderr, flush=True)
    return list(warnings)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _kits_image(folder: Path) -> Path | None:
    for name in ("imaging.nii.gz", "imaging.nii"):
        if (folder / name).is_file():
            return folder / name
    return None


def _is_our_output(path: Path) -> bool:
    return _stem(path).endswith(MASK_SUFFIX[: -len(".nii.gz")])


def resolve_inputs(inputs: list[Path]) -> tuple[list[CaseInput], bool]:
    """Expand the command line's inputs into cases; returns (cases, batch_mode).

    A NIfTI file is one case; a KiTS19 case folder (with imaging.nii[.gz]) is one case named after
    the folder; any other folder is batch mode over its NIfTI files (not recursing, skipping
    earlier `*_kidneys` outputs) and its KiTS19 case folders. Batch mode also means several inputs.
    """
    cases: list[CaseInput] = []
    batch = len(inputs) > 1
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise QnkitInputError(f"{path}: no such file or folder")
        if path.is_file():
            if not qio.is_nifti_path(path):
                raise QnkitInputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
            cases.append(CaseInput(_stem(path), path, path))
        elif _kits_image(path) is not None:
            cases.append(CaseInput(path.resolve().name, _kits_image(path), path))
        elif path.is_dir():
            batch = True
            found = []
            for child in sorted(path.iterdir()):
                if child.is_file() and qio.is_nifti_path(child) and not _is_our_output(child):
                    found.append(CaseInput(_stem(child), child, child))
                elif child.is_dir() and _kits_image(child) is not None:
                    found.append(CaseInput(child.name, _kits_image(child), child))
            if not found:
                raise QnkitInputError(f"{path}: no NIfTI images (.nii, .nii.gz) or KiTS19 case folders in this folder")
            cases.extend(found)
        else:
            raise QnkitInputError(f"{path}: not a file or folder")
    names = {}
    for case in cases:
        if case.name in names:
            raise QnkitInputError(f"two inputs have the same name {case.name!r} ({names[case.name]} and "
                                  f"{case.image}); their outputs would collide")
        names[case.name] = case.image
    return cases, batch


def output_path(case: CaseInput, out: Path | None, batch: bool) -> Path:
    """Where a case's mask goes: beside the input (inside a KiTS case folder), in `out` if it is a
    folder, or exactly `out` for a single input with a NIfTI file name."""
    name = case.name + MASK_SUFFIX
    if out is None:
        folder = case.source if case.source.is_dir() else case.image.parent
        return folder / name
    if qio.is_nifti_path(out) and not out.is_dir():
        if batch:
            raise QnkitInputError(f"--out {out}: with several inputs --out must be a folder")
        return out
    return out / name


def check_writable_folder(folder: Path, create: bool = False) -> None:
    """Raise QnkitInputError unless a file can be created in `folder` (probed, so root and ACLs count)."""
    folder = Path(folder)
    if create and not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise QnkitInputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise QnkitInputError(f"output folder {folder} does not exist or is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".qnkit-probe-"):
            pass
    except OSError as exc:
        raise QnkitInputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None


def parse_closing(text: str | None) -> tuple[float, str]:
    """'2', '2mm', '1.5 mm', '1vox', '1voxel(s)' -> (radius, unit); a bare number is mm."""
    if text is None or str(text).strip() in ("", "0"):
        return 0.0, "mm"
    s = str(text).strip().lower().replace(" ", "")
    unit = "mm"
    for suffix, u in (("voxels", "voxels"), ("voxel", "voxels"), ("vox", "voxels"), ("vx", "voxels"), ("mm", "mm")):
        if s.endswith(suffix):
            s, unit = s[: -len(suffix)], u
            break
    try:
        radius = float(s)
    except ValueError:
        raise QnkitInputError(f"--closing {text!r}: expected a radius like 2mm or 1vox") from None
    if not (0 <= radius <= 50) or not np.isfinite(radius):
        raise QnkitInputError(f"--closing {text!r}: radius must be between 0 and 50")
    return radius, unit
