"""Whether the INT8 graph may be the CPU default: evidence on real CTs and held-out phantoms.

The INT8 graph is checked at export against eager FP32 on synthetic slices (:mod:`.int8`), which
says little about a real scan's textures. Here every CT given (``qnkit export --int8-evidence
CT.nii.gz``; never one the model was trained on) and :data:`MIN_PHANTOMS` held-out anatomy phantoms
(seed :data:`PHANTOM_SEED`, other than the training's and the INT8 calibration's and tuning's) are
segmented twice through the runtime's own pipeline (:func:`qnkit.segment.segment_ct`: millimetre
resampling, kidney slab, post-processing), once with the FP32 graph and once with the INT8 graph, both on
ONNX Runtime's CPU provider. The masks are compared: both kidneys together (what `qnkit segment` writes)
and per side (1 right, 2 left), and for the real CTs also the network's raw every-slice masks without
post-processing.

The rule (:func:`decide`): INT8 becomes the CPU default only when, on every real CT, FP32 finds kidney
(a mask of at least :data:`MIN_KIDNEY_ML`, else the comparison proves nothing) and the INT8 output
mask agrees with FP32's at Dice >= :data:`MIN_DICE`, and on at least :data:`MIN_PHANTOMS` phantoms where
FP32 finds kidney every one agrees at Dice >= :data:`MIN_DICE`; otherwise FP32 stays the default. The
figures and the choice go into ``qnkit.json`` (``verification.int8_real_ct``, ``verification.int8_phantoms``
and ``cpu_precision``), which :attr:`qnkit.bundle.Bundle.cpu_precision` reads for ``precision="auto"`` on
the CPU (where it also asks for a CPU with an INT8 dot-product instruction).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: Mask Dice (INT8 vs FP32, both kidneys, on every evidence CT) that INT8 needs to become the CPU default.
MIN_DICE = 0.99
#: An FP32 mask smaller than this (ml) on an evidence CT makes it no evidence: nothing to agree on.
MIN_KIDNEY_ML = 10.0
#: Held-out phantoms (with kidney found by FP32) the INT8 graph must agree on, and the seed they are made with.
MIN_PHANTOMS = 20
PHANTOM_SEED = 77
RULE = (f"INT8 is the CPU default when, on every real evidence CT and on each of at least {MIN_PHANTOMS} held-out "
        f"phantoms, its output mask agrees with FP32's at Dice >= {MIN_DICE} (both kidneys, same pipeline) and FP32 "
        f"finds at least {MIN_KIDNEY_ML:g} ml of kidney")


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mask Dice; None when both masks are empty (nothing to agree on)."""
    from qnkit.kernels import mask_dice

    return mask_dice(a, b, empty=None)


def compare_on_ct(path: Path, predictors: dict, *, hu_window, threshold: float, pad_multiple: int,
                  model_spacing: float | None, batch_size: int = 16, raw: bool = True, context=(1, None)) -> dict:
    """Figures of one CT: INT8 against FP32 (output masks, per side, and with `raw` the every-slice masks), and
    the volumes.

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
                                    pad_multiple=pad_multiple, model_spacing=model_spacing, context=context,
                                    options=SegmentOptions(batch_size=batch_size))
        out[name] = {"sides": sides, "seconds": time.perf_counter() - started}
        if raw:
            every, _, _ = segment_ct(ct, geometry, predict, hu_window=hu_window, threshold=threshold,
                                     pad_multiple=pad_multiple, model_spacing=model_spacing, context=context,
                                     options=SegmentOptions(batch_size=batch_size, slab=False, postprocess=False))
            out[name]["raw"] = every > 0
    fp32, int8 = out["fp32"], out["int8"]
    dice = {"both": _dice(fp32["sides"] > 0, int8["sides"] > 0),
            "right": _dice(fp32["sides"] == 1, int8["sides"] == 1),
            "left": _dice(fp32["sides"] == 2, int8["sides"] == 2)}
    if raw:
        dice["raw_every_slice"] = _dice(fp32["raw"], int8["raw"])
    figures = {
        "data": Path(path).name, "sha256": sha256_file(path), "shape_internal": list(ct.shape),
        "spacing_mm": [round(float(s), 4) for s in geometry.spacing],
        "dice_int8_vs_fp32": dice,
        "kidney_ml": {name: {"right": round(float(np.count_nonzero(r["sides"] == 1)) * ml, 2),
                             "left": round(float(np.count_nonzero(r["sides"] == 2)) * ml, 2)} for name, r in out.items()},
        "seconds": {name: round(r["seconds"], 2) for name, r in out.items()},
        "pipeline": "qnkit.segment.segment_ct defaults (kidney slab, post-processing)"
                    + ("; raw_every_slice: every slice, no post-processing" if raw else ""),
        "runtime": "onnxruntime CPU",
    }
    return figures


def _failures(per_ct: list[dict], label: str) -> tuple[list[str], list[dict]]:
    """(why each CT fails the rule, the CTs that count as evidence: FP32 found kidney there)."""
    reasons, counted = [], []
    for figures in per_ct:
        dice = figures["dice_int8_vs_fp32"]["both"]
        fp32_ml = sum(figures["kidney_ml"]["fp32"].values())
        if fp32_ml < MIN_KIDNEY_ML:
            if label == "real CT":
                reasons.append(f"{figures['data']}: FP32 finds {fp32_ml:.1f} ml of kidney, too little to compare")
            continue
        counted.append(figures)
        if dice is None or dice < MIN_DICE:
            reasons.append(f"{label} {figures['data']}: INT8 mask Dice {dice if dice is None else round(dice, 4)} "
                           f"against FP32 < {MIN_DICE}")
    return reasons, counted


def decide(per_ct: list[dict], phantoms: dict | None = None, graph: dict | None = None) -> dict:
    """The CPU default precision from the figures of :func:`compare_on_ct` on the real CTs and the record of
    :func:`int8_phantom_evidence` (see the module's rule); `graph` (the INT8 graph's export record) adds
    which convolutions the graph keeps in float, so that the choice says what was measured."""
    if not per_ct:
        return {"default": "fp32", "rule": RULE, "why": "no real CT was given as evidence (--int8-evidence)"}
    reasons, _ = _failures(per_ct, "real CT")
    worst = min((f["dice_int8_vs_fp32"]["both"] or 0.0) for f in per_ct)
    summary = {}
    if phantoms is None:
        reasons.append("no held-out phantoms were compared")
    else:
        phantom_reasons, counted = _failures(phantoms["cases"], "phantom")
        if len(phantom_reasons) > 3:
            phantom_reasons = phantom_reasons[:3] + [f"and {len(phantom_reasons) - 3} more phantoms"]
        reasons += phantom_reasons
        if len(counted) < MIN_PHANTOMS:
            reasons.append(f"{len(counted)} phantoms with kidney compared, the rule needs {MIN_PHANTOMS}")
        summary = {"phantoms": {k: phantoms.get(k) for k in ("cases_counted", "mean_dice", "min_dice", "worst")}}
    if graph and graph.get("kept_float") is not None:
        summary["kept_float"] = len(graph["kept_float"])
        summary["int8_flops_share"] = graph.get("int8_flops_share")
    if reasons:
        return {"default": "fp32", "rule": RULE, "why": "; ".join(reasons), "worst_dice": worst, **summary}
    names = ", ".join(f["data"] for f in per_ct)
    phantom_text = (f" and on {phantoms['cases_counted']} held-out phantoms (mean {phantoms['mean_dice']:.4f}, worst "
                    f"{phantoms['min_dice']:.4f}, {phantoms['worst']})")
    return {"default": "int8", "rule": RULE, "worst_dice": worst, **summary,
            "why": f"INT8 mask Dice against FP32 >= {MIN_DICE} on {names} (worst {worst:.4f}){phantom_text}"}


def _predictors(fp32_path: Path, int8_path: Path, size_divisor: int) -> dict:
    from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend

    return {name: OnnxRuntimeBackend(model_path=path, precision=name, size_divisor=size_divisor).predict
            for name, path in (("fp32", fp32_path), ("int8", int8_path))}


def int8_real_ct_evidence(fp32_path: Path, int8_path: Path, cts: list[Path], *, hu_window, threshold: float,
                          pad_multiple: int, model_spacing: float | None, size_divisor: int, log=print,
                          context=(1, None)) -> tuple[dict, dict]:
    """(``verification.int8_real_ct`` record, the choice on these CTs alone) for the graphs being exported;
    the bundle's ``cpu_precision`` is :func:`decide` on this record and :func:`int8_phantom_evidence`'s."""
    predictors = _predictors(fp32_path, int8_path, size_divisor)
    per_ct = []
    for ct in cts:
        log(f"INT8 evidence: segmenting {Path(ct).name} with the FP32 and the INT8 graph...")
        figures = compare_on_ct(Path(ct), predictors, hu_window=hu_window, threshold=threshold,
                                pad_multiple=pad_multiple, model_spacing=model_spacing, context=context)
        d = figures["dice_int8_vs_fp32"]
        log(f"INT8 evidence: {figures['data']}: mask Dice vs FP32 both {d['both']}, right {d['right']}, "
            f"left {d['left']}, raw every slice {d['raw_every_slice']}")
        per_ct.append(figures)
    reasons, _ = _failures(per_ct, "real CT")
    record = {"reference": "FP32 ONNX graph, same pipeline (onnxruntime CPU)", "bar": {"min_dice": MIN_DICE},
              "cts": per_ct, "passed": not reasons}
    return record, {"passed": not reasons, "why": "; ".join(reasons)}


def _phantom_files(phantoms: int | str | Path, folder: Path, log) -> tuple[list[Path], dict]:
    """The phantoms' image files and how they were made: a folder of cases (case_*/imaging.nii.gz), or that
    many anatomy phantoms of :data:`PHANTOM_SEED` written into `folder` (atlas kidneys; NIfTI as any CT)."""
    if isinstance(phantoms, (str, Path)):
        files = sorted(Path(phantoms).glob("case_*/imaging.nii.gz"))
        return files, {"source": str(Path(phantoms).absolute()), "cases": len(files)}
    from qnkit.synth.case import make_anatomy_case
    from qnkit.synth.writer import write_case

    files = []
    for index in range(int(phantoms)):
        log(f"INT8 evidence: making held-out phantom {index + 1}/{phantoms} (seed {PHANTOM_SEED})...")
        files.append(write_case(make_anatomy_case(index, seed=PHANTOM_SEED), folder) / "imaging.nii.gz")
    return files, {"source": "qnkit.synth anatomy (atlas kidneys)", "seed": PHANTOM_SEED, "cases": len(files)}


def int8_phantom_evidence(fp32_path: Path, int8_path: Path, phantoms: int | str | Path, *, hu_window,
                          threshold: float, pad_multiple: int, model_spacing: float | None, size_divisor: int,
                          log=print, context=(1, None)) -> dict:
    """``verification.int8_phantoms``: INT8 against FP32 on held-out phantoms through the runtime's pipeline
    (output masks, per side; no every-slice pass), with the mean, the worst and whether each agrees."""
    import tempfile

    predictors = _predictors(fp32_path, int8_path, size_divisor)
    with tempfile.TemporaryDirectory(prefix="qnkit-int8-phantoms-") as tmp:
        files, made = _phantom_files(phantoms, Path(tmp), log)
        cases = []
        for path in files:
            figures = compare_on_ct(path, predictors, hu_window=hu_window, threshold=threshold,
                                    pad_multiple=pad_multiple, model_spacing=model_spacing, raw=False,
                                    context=context)
            figures["data"] = path.parent.name
            cases.append(figures)
            log(f"INT8 evidence: phantom {figures['data']}: mask Dice vs FP32 {figures['dice_int8_vs_fp32']['both']}")
    reasons, counted = _failures(cases, "phantom")
    scores = {f["data"]: f["dice_int8_vs_fp32"]["both"] for f in counted}
    worst = min(scores, key=scores.get) if scores else None
    record = {"reference": "FP32 ONNX graph, same pipeline (onnxruntime CPU)", "bar": {"min_dice": MIN_DICE},
              "made": made, "cases": cases, "cases_counted": len(counted),
              "mean_dice": round(float(np.mean(list(scores.values()))), 5) if scores else None,
              "min_dice": round(float(scores[worst]), 5) if worst else None, "worst": worst,
              "passed": not reasons and len(counted) >= MIN_PHANTOMS}
    if scores:
        log(f"INT8 evidence: {len(counted)} phantoms: mask Dice vs FP32 mean {record['mean_dice']:.4f}, "
            f"worst {record['min_dice']:.4f} ({worst})")
    return record
