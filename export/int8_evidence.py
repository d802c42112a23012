"""Whether the INT8 graph may be the CPU default: evidence on real CTs, not phantoms.

The INT8 graph is checked at export against eager FP32 on synthetic slices (:mod:`.int8`), which
says little about a real scan's textures. Here every CT given (``qnkit export --int8-evidence
CT.nii.gz``; never one the model was trained on) is segmented twice through the runtime's own
pipeline (:func:`qnkit.segment.segment_ct`: millimetre resampling, kidney slab, post-processing),
once with the FP32 graph and once with the INT8 graph, both on ONNX Runtime's CPU provider. The
masks are compared: both kidneys together (what `qnkit segment` writes) and per side (1 right,
2 left), and also the network's raw every-slice masks without post-processing.

The rule (:func:`decide`): INT8 becomes the CPU default only when, on every CT, FP32 finds kidney
(a mask of at least :data:`MIN_KIDNEY_ML`, else the comparison proves nothing) and the INT8 output
mask agrees with FP32's at Dice >= :data:`MIN_DICE`; otherwise FP32 stays the default. The figures
and the choice go into ``qnkit.json`` (``verification.int8_real_ct`` and ``cpu_precision``), which
:func:`qnkit.backends.open_backend` reads for ``precision="auto"`` on the CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: Mask Dice (INT8 vs FP32, both kidneys, on every evidence CT) that INT8 needs to become the CPU default.
MIN_DICE = 0.99
#: An FP32 mask smaller than this (ml) on an evidence CT makes it no evidence: nothing to agree on.
MIN_KIDNEY_ML = 10.0
RULE = (f"INT8 is the CPU default when, on every real evidence CT, its output mask agrees with FP32's at "
        f"Dice >= {MIN_DICE} (both kidneys, same pipeline) and FP32 finds at least {MIN_KIDNEY_ML:g} ml of kidney")


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mask Dice; None when both masks are empty (nothing to agree on)."""
    from qnkit.kernels import mask_dice

    return mask_dice(a, b, empty=None)


def compare_on_ct(path: Path, predictors: dict, *, hu_window, threshold: float, pad_multiple: int,
                  model_spacing: float | None, batch_size: int = 16) -> dict:
    """Figures of one CT: INT8 against FP32 (output masks, per side, raw every-slice masks), and the volumes.

    ``predictors``: {"fp32": predict, "int8": predict}, backends' ``predict`` callables.
    """
    from qnkit import io as qio
    from qnkit.bundle import sha256_file
    from qnkit.segment import SegmentOptions, segment_ct

    ct, geometry = qio.load_image(path)
    ml = geometry.voxel_volume_ml
    out: dict = {}
    for name, predict in predictors.items():
        started = time.perf_counter()
        _, sides, grid = segment_ct(ct, geometry, predict, hu_window=hu_window, threshold=threshold,
                                    pad_multiple=pad_multiple, model_spacing=model_spacing,
                                    options=SegmentOptions(batch_size=batch_size))
        raw, _, _ = segment_ct(ct, geometry, predict, hu_window=hu_window, threshold=threshold,
                               pad_multiple=pad_multiple, model_spacing=model_spacing,
                               options=SegmentOptions(batch_size=batch_size, slab=False, postprocess=False))
        out[name] = {"sides": sides, "raw": raw > 0, "seconds": time.perf_counter() - started}
    fp32, int8 = out["fp32"], out["int8"]
    figures = {
        "data": Path(path).name, "sha256": sha256_file(path), "shape_internal": list(ct.shape),
        "spacing_mm": [round(float(s), 4) for s in geometry.spacing],
        "dice_int8_vs_fp32": {
            "both": _dice(fp32["sides"] > 0, int8["sides"] > 0),
            "right": _dice(fp32["sides"] == 1, int8["sides"] == 1),
            "left": _dice(fp32["sides"] == 2, int8["sides"] == 2),
            "raw_every_slice": _dice(fp32["raw"], int8["raw"]),
        },
        "kidney_ml": {name: {"right": round(float(np.count_nonzero(r["sides"] == 1)) * ml, 2),
                             "left": round(float(np.count_nonzero(r["sides"] == 2)) * ml, 2)} for name, r in out.items()},
        "seconds": {name: round(r["seconds"], 2) for name, r in out.items()},
        "pipeline": "qnkit.segment.segment_ct defaults (kidney slab, post-processing); raw_every_slice: "
                    "every slice, no post-processing",
        "runtime": "onnxruntime CPU",
    }
    return figures


def decide(per_ct: list[dict]) -> dict:
    """The CPU default precision from the figures of :func:`compare_on_ct` (see the module's rule)."""
    if not per_ct:
        return {"default": "fp32", "rule": RULE, "why": "no real CT was given as evidence (--int8-evidence)"}
    reasons = []
    for figures in per_ct:
        dice = figures["dice_int8_vs_fp32"]["both"]
        fp32_ml = sum(figures["kidney_ml"]["fp32"].values())
        if fp32_ml < MIN_KIDNEY_ML:
            reasons.append(f"{figures['data']}: FP32 finds {fp32_ml:.1f} ml of kidney, too little to compare")
        elif dice is None or dice < MIN_DICE:
            reasons.append(f"{figures['data']}: INT8 mask Dice {dice if dice is None else round(dice, 4)} "
                           f"against FP32 < {MIN_DICE}")
    worst = min((f["dice_int8_vs_fp32"]["both"] or 0.0) for f in per_ct)
    if reasons:
        return {"default": "fp32", "rule": RULE, "why": "; ".join(reasons), "worst_dice": worst}
    names = ", ".join(f["data"] for f in per_ct)
    return {"default": "int8", "rule": RULE, "worst_dice": worst,
            "why": f"INT8 mask Dice against FP32 >= {MIN_DICE} on {names} (worst {worst:.4f})"}


def int8_real_ct_evidence(fp32_path: Path, int8_path: Path, cts: list[Path], *, hu_window, threshold: float,
                          pad_multiple: int, model_spacing: float | None, size_divisor: int, log=print) -> tuple[dict, dict]:
    """(``verification.int8_real_ct`` record, ``cpu_precision`` record) for the graphs being exported."""
    from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend

    predictors = {name: OnnxRuntimeBackend(model_path=path, precision=name, size_divisor=size_divisor).predict
                  for name, path in (("fp32", fp32_path), ("int8", int8_path))}
    per_ct = []
    for ct in cts:
        log(f"INT8 evidence: segmenting {Path(ct).name} with the FP32 and the INT8 graph...")
        figures = compare_on_ct(Path(ct), predictors, hu_window=hu_window, threshold=threshold,
                                pad_multiple=pad_multiple, model_spacing=model_spacing)
        d = figures["dice_int8_vs_fp32"]
        log(f"INT8 evidence: {figures['data']}: mask Dice vs FP32 both {d['both']}, right {d['right']}, "
            f"left {d['left']}, raw every slice {d['raw_every_slice']}")
        per_ct.append(figures)
    choice = decide(per_ct)
    log(f"CPU default precision: {choice['default']} ({choice['why']})")
    record = {"reference": "FP32 ONNX graph, same pipeline (onnxruntime CPU)", "bar": {"min_dice": MIN_DICE},
              "cts": per_ct, "passed": choice["default"] == "int8"}
    return record, choice
