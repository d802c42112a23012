"""`qnkit export`: a training checkpoint -> a verified model bundle (see :mod:`qnkit.bundle`).

Steps: load the checkpoint (hash-checked, safetensors) -> weights.safetensors -> model.onnx
(FP32) -> [model.fp16.onnx] -> [model.int8.onnx] -> verification of each graph against the
eager model on ONNX Runtime CPU -> [TensorRT engine + timing cache, verified on the GPU] ->
qnkit.json with every artefact's SHA-256. Everything is written into a temporary folder beside
the target and renamed into place at the end, so a failure (including a figure below its bar)
leaves no bundle; an existing bundle is replaced only with ``force``.
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from qnkit.bundle import (ENGINE, FORMAT, FP16_ONNX, FP32_ONNX, INT8_ONNX, MC_ONNX, METADATA_NAME, TIMING_CACHE,
                          VERSION, WEIGHTS, sealed_metadata_text, sha256_file)
from qnkit._atomic import discard_temp, swap_in_dir, temp_dir
from qnkit.errors import QnkitInputError

from . import verify
from .onnx_export import INPUT_NAME, OUTPUT_NAME, ExportError


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        if not out.parent.is_dir():
            raise QnkitInputError(f"{out.parent}: no such folder for the bundle")
        return
    if not force:
        raise QnkitInputError(f"{out} exists (use --force to replace the bundle)")
    if not out.is_dir() or not ((out / METADATA_NAME).is_file() or not any(out.iterdir())):
        raise QnkitInputError(f"{out} exists and is not a qnkit bundle; not replacing it, even with --force")


def _input_size(run_dir: Path, meta: dict, divisor: int, log) -> tuple[int, int]:
    """The training slices' grid (from the run's preprocessed cache), padded to the divisor; else 256x256."""
    cache = (meta.get("settings", {}).get("DATA", {}) or {}).get("cache_dir") or "cache"
    root = Path(cache) if os.path.isabs(cache) else run_dir / cache
    multiple = max(divisor, int(meta.get("preprocessing", {}).get("pad_multiple", divisor)))
    recorded = (meta.get("domain") or {}).get("input_size")
    if recorded:  # the training slices' padded grid, recorded by training
        return tuple(-(-int(n) // multiple) * multiple for n in recorded)
    for image in sorted(root.glob("*/*/image.npy"))[:1]:
        h, w = np.load(image, mmap_mode="r").shape[-2:]
        return (-(-h // multiple) * multiple, -(-w // multiple) * multiple)
    log("input size: no preprocessed training slices in the run; assuming 256x256 (512x512 CT); "
        "set --input-size to change it")
    return (256, 256)


def _domain(run_dir: Path, cmeta: dict, checkpoint: str) -> dict | None:
    """The checkpoint's domain record (pixel spacing, slice thickness range, HU window, input size,
    training data) with the run's figures: best validation Dice (and its epoch) and, when
    `qnkit evaluate` scored this checkpoint, the test Dice. None for a checkpoint without one (an old
    model: inference then halves the input's resolution)."""
    import json

    from qnkit.train.evaluation import TEST_DICE_NAME

    domain = cmeta.get("domain")
    if not domain:
        return None
    metrics = cmeta.get("metrics") or {}
    figures = {"best_validation_dice": metrics.get("best_val_dice"), "best_epoch": metrics.get("best_epoch")}
    try:
        test = json.loads((run_dir / TEST_DICE_NAME).read_text())
        if test.get("checkpoint") == checkpoint and test.get("epoch") == cmeta.get("epoch"):
            figures.update(test_dice=test["mean_dice"], test_dice_std=test["std_dice"], test_cases=test["cases"])
            if "postprocess" in test:  # evaluations before post-processed scoring scored the raw mask
                figures.update(test_postprocessed=test["postprocess"], test_dice_network=test["mean_dice_network"],
                               test_mirrored=test.get("mirror", False))
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # not evaluated (or another checkpoint was): no test figure
    return {**domain, "figures": figures}


def _tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import qnkit

    tools = {"qnkit": qnkit.__version__, "python": platform.python_version(), "numpy": np.__version__,
             "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import tensorrt

        tools["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        pass
    return tools


def export_bundle(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best", fp16: bool = False,
                  engine: bool = False, int8: bool = False, batches: tuple[int, int, int] = (1, 16, 32),
                  input_size: tuple[int, int] | None = None, force: bool = False, calibration_slices: int = 24,
                  verify_batch_size: int = 16, int8_evidence: list | tuple = (), int8_phantoms: int | str | Path = 20,
                  mc_dropout: bool = True, quality_calibration: dict | None = None, log=print) -> dict:
    """Write the bundle ``out`` from ``run_dir``'s checkpoint; returns its metadata (qnkit.json).

    ``calibration_slices``: slices per anatomy phantom the INT8 calibration runs on (3 phantoms on the
    model's grid for a trained checkpoint, 1 for an untrained one; :mod:`.int8`), folded into the
    calibrator one batch of 8 at a time. A trained checkpoint's INT8 graph keeps the convolutions that
    hurt the mask most in float (per-layer sensitivity on 3 tuning phantoms, recorded in
    ``export.int8``). ``verify_batch_size``: slices per batch when the graphs are
    checked against the eager model (eager FP32 holds about 0.4 GB per slice of a batch at 256x256).
    ``int8_evidence``: real CT files (NIfTI; never training data) on which the INT8 graph is compared
    with FP32 through the runtime's pipeline (:mod:`.int8_evidence`), together with ``int8_phantoms``
    held-out anatomy phantoms (a number to make, seed 77, or a folder of cases); the result decides the
    CPU default precision recorded in ``qnkit.json`` (``cpu_precision``). Implies ``int8``.
    ``mc_dropout``: also write ``model.mc.onnx`` (Monte-Carlo dropout, :mod:`.mc_dropout`) for a network with
    dropout. ``quality_calibration``: the quality verdict's limits and how they were chosen
    (``python -m qnkit.benchmarks.quality_calibration fit``), recorded as ``qnkit.json`` "quality";
    default: :data:`qnkit.quality.DEFAULT_CALIBRATION`, marked as not calibrated for this model.
    """
    import torch
    from safetensors.torch import save_file

    from qnkit.inference import model_context
    from qnkit.nn.eager import make_predict_batch
    from qnkit.train import checkpoint as ckpt
    from qnkit.train.evaluation import run_threshold

    from .onnx_export import export_fp32

    run_dir, out = Path(run_dir), Path(out).absolute()
    _check_target(out, force)
    if checkpoint not in ("best", "last"):
        raise QnkitInputError(f"--checkpoint must be best or last, not {checkpoint!r}")
    if engine:
        from qnkit.backends.tensorrt_build import tensorrt_or_none, unavailable_reason, uses_strongly_typed_fp16

        reason = unavailable_reason()
        if reason:
            raise QnkitInputError(f"--engine: cannot build a TensorRT engine here: {reason}")
        if not fp16 and uses_strongly_typed_fp16(tensorrt_or_none()):
            log(f"--engine: TensorRT {tensorrt_or_none().__version__} builds FP16 from the FP16 ONNX; adding --fp16")
            fp16 = True
    int8_evidence = [Path(p) for p in int8_evidence or ()]
    for path in int8_evidence:
        from qnkit.io import is_nifti_path

        if not path.is_file() or not is_nifti_path(path):
            raise QnkitInputError(f"--int8-evidence {path}: not a NIfTI file (.nii or .nii.gz)")
    if int8_evidence and not int8:
        log("--int8-evidence: adding --int8 (the evidence is about the INT8 graph)")
        int8 = True
    lo_b, opt_b, hi_b = batches
    if not 1 <= lo_b <= opt_b <= hi_b:
        raise QnkitInputError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {lo_b}/{opt_b}/{hi_b}")
    model, cmeta = ckpt.load_model(run_dir, checkpoint)
    cfg = model.config
    context = model_context(cmeta)  # (planes per slice, their spacing in mm): (1, None) for a 2-D model
    pre = cmeta.get("preprocessing", {})
    hu_window = (float(pre.get("hu_lo", -200.0)), float(pre.get("hu_hi", 400.0)))
    threshold, calibrated = run_threshold(run_dir, cmeta)  # calibrated on the run's validation phantoms, if it was
    hw = tuple(input_size) if input_size else _input_size(run_dir, cmeta, cfg.size_divisor, log)
    if hw[0] % cfg.size_divisor or hw[1] % cfg.size_divisor or min(hw) < cfg.size_divisor:
        raise QnkitInputError(f"input size {hw[0]}x{hw[1]} must be positive multiples of {cfg.size_divisor}")
    trained = bool(cmeta.get("epoch")) and bool(cmeta.get("metrics"))
    started = time.perf_counter()
    tmp = temp_dir(out)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS),
                  metadata={"format": "qnkit-quicknat-weights"})
        log(f"exporting {FP32_ONNX} ({hw[0]}x{hw[1]} grid, dynamic batch/height/width)...")
        exports = {"fp32": export_fp32(model, tmp / FP32_ONNX, hw)}
        x, labels = verify.synthetic_slices(hw, hu_window, context=context)
        torch.manual_seed(0)
        eager = verify.batched(make_predict_batch(model, "cpu"), x, batch_size=verify_batch_size)
        record = {"reference": "eager torch FP32 (CPU) of the checkpoint", "threshold": threshold,
                  **verify.context(eager, labels, threshold, trained)}

        from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend

        def check(kind: str, path: Path, bar_applies: bool = True) -> dict:
            backend = OnnxRuntimeBackend(model_path=path, precision=kind, batch_size=verify_batch_size,
                                         size_divisor=cfg.size_divisor)
            figures = {"runtime": "onnxruntime CPU", **verify.agreement(eager, backend.predict(x), threshold)}
            why = verify.check(kind, figures)
            figures["bar"], figures["passed"] = verify.BARS[kind], why is None
            log(f"verify {path.name}: |diff| max {figures['max_abs_diff']:.2e}, p99 {figures['p99_abs_diff']:.2e}, p99.9 {figures['p999_abs_diff']:.2e}; "
                f"mask Dice {figures['dice']:.5f}")
            if why and bar_applies:
                raise ExportError(f"verification failed: {why}; no bundle written")
            if why:
                log(f"verify {path.name}: {why} (not enforced: the checkpoint is untrained)")
            return figures

        # An untrained network's masks are noise around the threshold: its figures are recorded, not enforced.
        record["fp32"] = check("fp32", tmp / FP32_ONNX, bar_applies=trained)
        # dynamic height/width: a second grid, larger by one divisor step in each direction
        big = np.zeros((4, cfg.num_channels, hw[0] + cfg.size_divisor, hw[1] + 2 * cfg.size_divisor), np.float32)
        big[:, :, :hw[0], :hw[1]] = x[:4]
        ref_big = make_predict_batch(model, "cpu")(big)
        ort_big = OnnxRuntimeBackend(model_path=tmp / FP32_ONNX, size_divisor=cfg.size_divisor).predict(big)
        diff = np.abs(ref_big - ort_big)
        record["fp32"]["other_grid"] = {"shape": list(big.shape[2:]), "max_abs_diff": float(diff.max()),
                                        "p999_abs_diff": float(np.quantile(diff, 0.999)),
                                        "p99_abs_diff": float(np.quantile(diff, 0.99))}
        if trained and record["fp32"]["other_grid"]["p99_abs_diff"] > verify.BARS["fp32"]["p99_abs_diff"]:
            raise ExportError(f"verification failed: {FP32_ONNX} differs from eager on a {big.shape[2]}x"
                              f"{big.shape[3]} grid; no bundle written")
        if mc_dropout and cfg.drop_out > 0:
            from .mc_dropout import export_mc, verify_mc

            log(f"exporting {MC_ONNX} (Monte-Carlo dropout: the Dropout2d masks as an input)...")
            exports["mc"] = export_mc(model, tmp / MC_ONNX, hw)
            record["mc"] = verify_mc(model, tmp / MC_ONNX, tmp / FP32_ONNX, x[:8])
        if fp16:
            from .fp16 import export_fp16

            log(f"exporting {FP16_ONNX}...")
            exports["fp16"] = export_fp16(tmp / FP32_ONNX, tmp / FP16_ONNX)
            record["fp16"] = check("fp16", tmp / FP16_ONNX, bar_applies=trained)
        if int8:
            from .int8 import EQUALISE_ALPHA, ModelGrid, quantize_int8

            grid = ModelGrid(hu_window=hu_window, model_spacing=(cmeta.get("domain") or {}).get("pixel_spacing_mm"),
                             pad_multiple=int(pre.get("pad_multiple", cfg.size_divisor)), context=context)
            log(f"quantising {INT8_ONNX} (static QDQ, calibrated on phantoms on the model's grid"
                + (", per-layer sensitivity search)..." if trained else "; untrained: no search)..."))
            # a quantisation-aware checkpoint learnt the unequalised inputs' 8-bit grid: quantise that grid
            quantisation_aware = bool(((cmeta.get("settings") or {}).get("TRAINING") or {}).get("qat"))
            exports["int8"] = quantize_int8(tmp / FP32_ONNX, tmp / INT8_ONNX, grid, threshold=threshold,
                                            search=trained, calibration_cases=3 if trained else 1,
                                            slices_per_case=calibration_slices, log=log,
                                            equalise_alpha=0.0 if quantisation_aware else EQUALISE_ALPHA)
            exports["int8"]["quantisation_aware_checkpoint"] = quantisation_aware
            record["int8"] = check("int8", tmp / INT8_ONNX, bar_applies=trained and record["eager_foreground_pixels"] > 0)
            from .int8_evidence import decide, int8_phantom_evidence, int8_real_ct_evidence

            if int8_evidence:
                model_args = {"hu_window": hu_window, "threshold": threshold, "pad_multiple": grid.pad_multiple,
                              "model_spacing": grid.model_spacing, "context": context}
                record["int8_real_ct"], _ = int8_real_ct_evidence(
                    tmp / FP32_ONNX, tmp / INT8_ONNX, int8_evidence, **model_args, size_divisor=cfg.size_divisor,
                    log=log)
                record["int8_phantoms"] = int8_phantom_evidence(
                    tmp / FP32_ONNX, tmp / INT8_ONNX, int8_phantoms, **model_args, size_divisor=cfg.size_divisor,
                    log=log)
                cpu_precision = decide(record["int8_real_ct"]["cts"], record["int8_phantoms"],
                                       graph=exports["int8"])
                log(f"CPU default precision: {cpu_precision['default']} ({cpu_precision['why']})")
            else:
                cpu_precision = decide([])
        else:
            cpu_precision = None
        engine_record = None
        if engine:
            engine_record, record["tensorrt"] = _build_engine(tmp, hw, batches, cfg.size_divisor, x,
                                                              make_predict_batch(model, "cpu"),
                                                              threshold, log)
        metadata = {
            "format": FORMAT, "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"architecture": "QuickNAT", "network": cfg.to_dict(), "input_size": list(hw),
                      "dynamic_hw": True, "input": {"name": INPUT_NAME,
                                                    "shape": ["batch", cfg.num_channels, "height", "width"],
                                                    "dtype": "float32", "range": [0.0, 1.0]},
                      "output": {"name": OUTPUT_NAME, "shape": ["batch", 1, "height", "width"],
                                 "dtype": "float32", "meaning": "kidney probability (sigmoid applied)"}},
            "preprocessing": {"hu_window": list(hu_window), "size_divisor": cfg.size_divisor,
                              **({"pixel_spacing_mm": cmeta["domain"]["pixel_spacing_mm"]} if cmeta.get("domain")
                                 else {"downsample": 2}),
                              "pad_multiple": int(pre.get("pad_multiple", cfg.size_divisor)), "pad_value": 0.0,
                              "pad_where": "bottom/right", "layout": "KiTS19 (slices, rows, cols)"},
            "threshold": threshold,
            **({"threshold_calibration": {k: calibrated[k] for k in ("split", "rule", "default_threshold", "table")}}
               if calibrated is not None else {}),
            "domain": _domain(run_dir, cmeta, checkpoint),
            "training": {"run_dir": str(run_dir.absolute()), "checkpoint": checkpoint, "epoch": cmeta.get("epoch"),
                         "metrics": cmeta.get("metrics"), "parameters": cmeta.get("parameters"),
                         "checkpoint_sha256": cmeta.get("files", {}),
                         **({"initialised_from": cmeta["initialised_from"]} if cmeta.get("initialised_from") else {})},
            "export": {**exports, "seconds": round(time.perf_counter() - started, 2)},
            "tools": _tool_versions(),
            "engine": engine_record,
            "verification": record,
        }
        metadata["quality"] = _quality_record(quality_calibration)
        if cpu_precision is not None:  # which graph `precision=auto` runs on the CPU, and why
            metadata["cpu_precision"] = cpu_precision
        metadata["artefacts"] = {p.name: artefact_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / METADATA_NAME).write_text(sealed_metadata_text(metadata), encoding="utf-8")
        swap_in_dir(tmp, out)
    except BaseException:
        discard_temp(tmp)
        raise
    return metadata


def _quality_record(calibration: dict | None) -> dict:
    """qnkit.json's "quality": a fitted calibration, or qnkit's default limits marked as not fitted to this model."""
    from qnkit.quality import DEFAULT_CALIBRATION, check_calibration

    if calibration is None:
        return {**DEFAULT_CALIBRATION, "calibrated_for_this_model": False}
    check_calibration(calibration)
    return {**calibration, "calibrated_for_this_model": True}


def artefact_record(path: Path) -> dict:
    """qnkit.json's record of one bundle file: its SHA-256 and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def reseal(bundle_dir: str | Path, metadata: dict) -> Path:
    """Write `metadata` as the bundle's ``qnkit.json``, sealed with its manifest hash, and load the bundle back as
    a reader checks it (for records added after export: the quality limits, a graph exported later)."""
    from qnkit._atomic import write_text_atomic
    from qnkit.bundle import load_bundle

    path = Path(bundle_dir) / METADATA_NAME
    write_text_atomic(path, sealed_metadata_text(metadata))
    load_bundle(bundle_dir)
    return path


def reseal_quality(bundle_dir: str | Path, calibration: dict) -> Path:
    """Put a fitted quality calibration (``quality_calibration fit``) into an exported bundle's ``qnkit.json`` and
    seal it again (its manifest hash): the limits are measured with the bundle itself, so they come after its
    export. The bundle is verified first (every artefact's hash), and only the "quality" record changes."""
    from qnkit.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    return reseal(bundle_dir, {**bundle.metadata, "quality": _quality_record(calibration)})


def _build_engine(tmp: Path, hw, batches, divisor: int, x, reference, threshold: float, log) -> tuple[dict, dict]:
    """Build, save and verify the TensorRT engine (FP16) in the bundle folder being written.

    The engine has a dynamic height/width profile around the export grid ``hw`` and is verified
    against ``reference`` (the eager model) on grids smaller than, equal to and larger than ``hw``,
    exactly as the TensorRT backend verifies an engine it rebuilds (:func:`qnkit.verification.verify_engine`).
    """
    from qnkit.backends.tensorrt_backend import TensorRTBackend
    from qnkit.backends.tensorrt_build import build_engine, engine_profile, tensorrt_or_none, uses_strongly_typed_fp16

    source = FP16_ONNX if uses_strongly_typed_fp16(tensorrt_or_none()) else FP32_ONNX
    profile = engine_profile(hw, divisor, batches, input_name=INPUT_NAME, channels=x.shape[1])
    data, rec = build_engine(tmp / source, profile=profile,
                             precision="fp16", timing_cache=tmp / TIMING_CACHE, log=log)
    (tmp / ENGINE).write_bytes(data)
    backend = TensorRTBackend(data, precision="fp16", batch_size=batches[1], size_divisor=divisor, record=rec)
    try:
        grids, why = verify.verify_engine(backend.predict, reference, x, precision="fp16", threshold=threshold,
                                          divisor=divisor)
    finally:
        backend.close()
    figures = {"runtime": f"TensorRT {rec['tensorrt']} on {rec['gpu']}", **grids["export"], "grids": grids,
               "bar": grids["bar"], "passed": grids["passed"]}
    log(f"verify {ENGINE}: max |diff| {figures['max_abs_diff']:.2e}, mask Dice " +
        ", ".join(f"{grids[g]['dice']:.5f} ({'x'.join(map(str, grids[g]['shape']))})"
                  for g in ("smaller", "export", "larger") if g in grids))
    if why:
        raise ExportError(f"verification failed: TensorRT engine: {why}; no bundle written")
    return {"file": ENGINE, "timing_cache": TIMING_CACHE, **rec}, figures
