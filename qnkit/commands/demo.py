"""`qnkit demo`: the whole toolkit on a fresh machine with no data, in a few minutes on a CPU.

synthetic KiTS19-layout cases (qnkit.synth) -> a small QuickNAT trained briefly (qnkit.train) ->
bundle (qnkit.export: ONNX, plus the FP16 graph where a GPU can use it) -> every held-out case of the run's test
split segmented by the deployment pipeline (qnkit.segment, auto backend) -> each one's Dice against its labels and
their mean, kidney volumes, backend and speed, and the demo's time per stage on this machine. Everything lives in
--workdir: data/, run/, bundle/, output/ and demo.json, which records the parameters each stage was made with, so
a rerun reuses what still matches (a second run only segments again) and redoes the rest; --fresh starts over.
demo.json's "last" holds every figure the demo prints (times, machine, Dice per case and mean, volumes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import typer

STAMP = "demo.json"
PARTS = ("data", "run", "bundle", "output")


def command(
    workdir: Path = typer.Option(Path("qnkit-demo"), "--workdir", help="Folder for the demo's data, run, bundle "
                                                                       "and outputs."),
    cases: int = typer.Option(12, "--cases", min=4, help="Synthetic cases (20% test, then 20% validation)."),
    epochs: int = typer.Option(25, "--epochs", min=1, help="Training epochs."),
    size: int = typer.Option(128, "--size", min=32, help="In-plane size of the synthetic CT (pixels)."),
    num_filters: int = typer.Option(8, "--num-filters", min=2, help="QuickNAT filters per layer (64 in the report)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of data, split and training."),
    backend: str = typer.Option("auto", "--backend", help="Backend for the segmentation: auto | torch | "
                                                          "onnxruntime | tensorrt."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: remove the demo's earlier data, run and bundle."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress output on stderr."),
) -> None:
    """Synthetic data -> train a small QuickNAT -> export -> segment the held-out cases -> Dice, volumes, speed."""
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not progress)
    started = time.perf_counter()
    params = {"cases": cases, "size": size, "seed": seed, "epochs": epochs, "num_filters": num_filters}
    stamp = _prepare(workdir, fresh)
    keys = {"data": ("cases", "size", "seed"), "run": ("cases", "size", "seed", "epochs", "num_filters")}
    fresh_data = stamp.get("data") != {k: params[k] for k in keys["data"]} or not (workdir / "data").is_dir()
    fresh_run = fresh_data or stamp.get("run") != {k: params[k] for k in keys["run"]} \
        or not (workdir / "run" / "checkpoints" / "best").is_dir()
    fresh_bundle = fresh_run or not stamp.get("bundle") or not (workdir / "bundle" / "qnkit.json").is_file()
    times = {}

    if fresh_data:
        from qnkit.synth import write_dataset

        _clear(workdir, ("data", "run", "bundle"), stamp)
        t = time.perf_counter()
        err.print(f"[1/4] synthesising {cases} CT cases ({size}x{size}) in {workdir / 'data'}")
        write_dataset(workdir / "data", cases=cases, size=size, seed=seed, progress=progress)
        times["synth"] = time.perf_counter() - t
        stamp["data"] = {k: params[k] for k in keys["data"]}
        _save(workdir, stamp)
    else:
        err.print(f"[1/4] reusing the synthetic cases in {workdir / 'data'}")
    if fresh_run:
        _clear(workdir, ("run", "bundle"), stamp)
        t = time.perf_counter()
        err.print(f"[2/4] training QuickNAT ({num_filters} filters, {epochs} epochs) in {workdir / 'run'}")
        summary = _train(workdir, params, progress, err)
        times["train"] = time.perf_counter() - t
        stamp["run"] = {k: params[k] for k in keys["run"]}
        stamp["training"] = {"best_dice": summary.get("best_dice"), "best_epoch": summary.get("best_epoch"),
                             "epochs_run": summary.get("epoch"), "seconds": round(times["train"], 1)}
        _save(workdir, stamp)
    else:
        err.print(f"[2/4] reusing the trained run in {workdir / 'run'}")
    if fresh_bundle:
        from qnkit.export.bundle_writer import export_bundle

        _clear(workdir, ("bundle",), stamp)
        t = time.perf_counter()
        from qnkit.backends import nvidia_gpu_present

        fp16 = nvidia_gpu_present()  # the FP16 graph is the GPU's (TensorRT, CUDA); a CPU runs FP32
        err.print(f"[3/4] exporting the model bundle ({'ONNX + FP16 ONNX' if fp16 else 'ONNX; no GPU, so no FP16 graph'})"
                  f" to {workdir / 'bundle'}")
        export_bundle(workdir / "run", workdir / "bundle", fp16=fp16, force=True,
                      log=lambda m: err.print(f"      {m}", markup=False))
        times["export"] = time.perf_counter() - t
        stamp["bundle"] = True
        _save(workdir, stamp)
    else:
        err.print(f"[3/4] reusing the bundle in {workdir / 'bundle'}")

    t = time.perf_counter()
    seg = _segment(workdir, backend, err)
    times["segment"] = time.perf_counter() - t
    total = time.perf_counter() - started
    desc, cases = seg["backend"], seg["cases"]
    slices = sum(c["slices"] for c in cases)
    run_s = sum(c["pipeline_s"] for c in cases)
    infer_s = sum(c["inference_s"] for c in cases)
    reused = [k for k, fresh in (("data", fresh_data), ("run", fresh_run), ("bundle", fresh_bundle)) if not fresh]
    # demo.json's "last" holds every figure printed below, and the lines print them from it, rounded alike
    last = stamp["last"] = {
        "seconds": round(total, 1), "stages_s": {k: round(v, 1) for k, v in times.items()}, "reused": reused,
        "machine": _machine(), "parameters": params,
        "backend": desc["name"], "backend_detail": desc,
        "mean_dice": round(sum(c["dice"] for c in cases) / len(cases), 5), "cases": cases,
        "slices_per_s": round(slices / run_s, 2) if run_s > 0 else None,
        "inference_slices_per_s": round(slices / infer_s, 2) if infer_s > 0 else None,
    }
    _save(workdir, stamp)
    for c in cases:
        v, tv = c["volumes_ml"], c["true_volumes_ml"]
        out.print(f"held-out case {c['case']} ({c['slices']} slices, {c['size'][0]}x{c['size'][1]}): "
                  f"Dice {c['dice']:.4f} against its labels", markup=False)
        out.print(f"  kidney volumes: right {v['right']:.1f} mL (true {tv['right']:.1f}), "
                  f"left {v['left']:.1f} mL (true {tv['left']:.1f})", markup=False)
    out.print(f"test Dice: mean {last['mean_dice']:.4f} over {len(cases)} held-out "
              f"case{'s' if len(cases) > 1 else ''}", markup=False)
    out.print(f"backend: {desc['name']} ({desc['precision']}, {desc['device']}); {last['slices_per_s']} slices/s "
              f"end to end, {last['inference_slices_per_s']} slices/s inference", markup=False)
    out.print(f"outputs: {workdir / 'output'}/ (CASE_kidneys.nii.gz, CASE_stats.json, CASE_preview.png per case)",
              markup=False)
    machine = last["machine"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in last["stages_s"].items())
    out.print(f"demo time: {last['seconds']:.0f} s ({stages}{'; reused ' + ', '.join(reused) if reused else ''}) "
              f"on {machine['cpu']}, {machine['cpus']} CPU{'s' if machine['cpus'] > 1 else ''}"
              f"{', ' + machine['gpu'] if machine['gpu'] else ''}", markup=False)
    out.print(f"figures: {workdir / STAMP}", markup=False)


def _machine() -> dict:
    """The machine the demo's times were measured on: CPU model, the CPUs qnkit may use, GPU."""
    import os
    import platform

    import qnkit
    from qnkit import kernels
    from qnkit.backends import nvidia_gpu_present
    from qnkit.cpus import available_cpus

    from qnkit.cpus import cpu_model

    cpu = cpu_model()
    gpu = None
    if nvidia_gpu_present():
        try:
            import torch

            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a broken CUDA setup: the machine record stays without a GPU name
            gpu = None
    try:  # how busy the machine was while the demo ran (other processes share its CPUs and slow it)
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cpus": available_cpus(), "cores_total": os.cpu_count(), "kernel_build": kernels.BUILD,
            "platform": platform.platform(), "python": platform.python_version(), "qnkit": qnkit.__version__,
            "gpu": gpu, "load_average_1_5_15min": load}


def _prepare(workdir: Path, fresh: bool) -> dict:
    """Create workdir or read its stamp; refuse a folder that holds demo-like parts it did not make."""
    from qnkit.errors import QnkitInputError

    if workdir.exists() and not workdir.is_dir():
        raise QnkitInputError(f"--workdir {workdir} exists and is not a folder")
    stamp_path = workdir / STAMP
    stamp: dict = {}
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        if not isinstance(stamp, dict) or stamp.get("format") != "qnkit-demo":
            raise QnkitInputError(f"{stamp_path} is not a qnkit demo record; choose another --workdir")
    elif workdir.is_dir() and any((workdir / p).exists() for p in PARTS):
        raise QnkitInputError(f"{workdir} holds {', '.join(p for p in PARTS if (workdir / p).exists())} not made by "
                              f"qnkit demo (no {STAMP}); choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QnkitInputError(f"cannot create --workdir {workdir}: {exc.strerror or exc}") from None
    from qnkit.segment import check_writable_folder

    check_writable_folder(workdir)
    stamp["format"] = "qnkit-demo"
    if fresh:
        _clear(workdir, PARTS, stamp)
        stamp = {"format": "qnkit-demo"}
    _save(workdir, stamp)
    return stamp


def _clear(workdir: Path, parts, stamp: dict) -> None:
    from qnkit._atomic import remove_path

    for part in parts:
        remove_path(workdir / part)
        stamp.pop(part, None)


def _save(workdir: Path, stamp: dict) -> None:
    from qnkit._atomic import write_text_atomic

    write_text_atomic(workdir / STAMP, json.dumps(stamp, indent=1) + "\n")


def _train(workdir: Path, p: dict, progress: bool, console) -> dict:
    from qnkit.train.runner import train
    from qnkit.train.settings import load_settings

    settings = load_settings(None, {
        ("COMMON", "seed"): p["seed"], ("COMMON", "device"): "auto", ("COMMON", "num_workers"): 0,
        ("COMMON", "progress"): progress, ("NETWORK", "num_filters"): p["num_filters"],
        # small batches and a higher learning rate: many more optimiser steps per CPU second than the
        # report's batch 16 / lr 1e-3, which a demo of a few minutes needs to converge
        ("TRAINING", "epochs"): p["epochs"], ("TRAINING", "micro_batch"): 8, ("TRAINING", "effective_batch"): 8,
        ("TRAINING", "lr"): 3e-3, ("TRAINING", "min_steps_per_epoch"): 0,
        # train on the slices near the kidneys only (fewer, denser slices per epoch); the post-processing's
        # two largest components remove the odd false positive far from them
        ("DATA", "slice_margin"): 4,
        ("TRAINING", "early_stop_patience"): p["epochs"], ("TRAINING", "log_images"): 0,
    })
    return train(workdir / "data", workdir / "run", settings, force=True, console=console if progress else None)


def _segment(workdir: Path, backend: str, console) -> dict:
    """Segment every test case of the run's split with the deployment pipeline; Dice and volumes per case."""
    import numpy as np

    from qnkit import io as qio
    from qnkit import kernels
    from qnkit import segment as S
    from qnkit.backends import open_backend
    from qnkit.bundle import load_bundle
    from qnkit.postprocess import LEFT, RIGHT, body_midline_x, split_sides
    from qnkit.preview import write_preview
    from qnkit._atomic import write_text_atomic

    split = json.loads((workdir / "run" / "evaluation_data.json").read_text())
    case_ids = list(split["test"])
    console.print(f"[4/4] segmenting the {len(case_ids)} held-out case{'s' if len(case_ids) > 1 else ''} "
                  f"{', '.join(case_ids)}")
    bundle = load_bundle(workdir / "bundle", verify=True)
    out_dir = workdir / "output"
    out_dir.mkdir(exist_ok=True)
    cases = []
    with open_backend(bundle, backend, log=lambda m: console.print(f"      {m}", markup=False)) as engine:
        desc = engine.describe()
        for case_id in case_ids:
            folder = workdir / "data" / case_id
            case = S.CaseInput(case_id, folder / "imaging.nii.gz", folder)
            result = S.segment_file(case, out_dir / f"{case_id}{S.MASK_SUFFIX}", engine.predict, bundle=bundle,
                                    options=S.SegmentOptions(split_sides=True), overwrite=True, keep_arrays=True)
            labels, geometry = qio.load_labels(folder / "segmentation.nii.gz")
            qio.check_same_grid(result.geometry, geometry)
            target = (labels > 0).astype(np.uint8)
            dice = float(kernels.dice(result.sides > 0, target))
            true_sides = split_sides(target, geometry.internal_affine,
                                     body_midline_x(result.ct, geometry.internal_affine))
            ml = geometry.voxel_volume_ml
            true_ml = {"right": float(np.count_nonzero(true_sides == RIGHT)) * ml,
                       "left": float(np.count_nonzero(true_sides == LEFT)) * ml}
            j = result.to_json()
            stats_path, preview_path = out_dir / f"{case_id}_stats.json", out_dir / f"{case_id}_preview.png"
            write_text_atomic(stats_path, json.dumps({"backend": desc, "dice": dice, "true_volumes_ml": true_ml,
                                                      "cases": [j]}, indent=1, default=str) + "\n")
            write_preview(preview_path, result.ct, result.sides, result.spacing, window=bundle.hu_window,
                          title=f"{case_id}: Dice {dice:.3f}")
            cases.append({
                "case": case_id, "slices": int(result.slices), "size": [int(result.shape[1]), int(result.shape[2])],
                "dice": round(dice, 5),
                "volumes_ml": {k: round(float(result.stats[k]["volume_ml"]), 2) for k in ("right", "left")},
                "true_volumes_ml": {k: round(v, 2) for k, v in true_ml.items()},
                "pipeline_s": round(sum(j["timings_s"][k] for k in S.STAGES), 4),
                "inference_s": j["timings_s"].get("inference", 0.0),
                "mask": str(result.output), "stats": str(stats_path), "preview": str(preview_path)})
    return {"cases": cases, "backend": desc}
