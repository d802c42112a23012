"""`qnkit bench`: kernels, backends and the whole pipeline, measured side by side in one run.

Every figure is a median of repeated timings after warm-up, and every speed is also a ratio to a
baseline measured in the same run (NumPy and a memory copy for kernels, nibabel with the standard
library's gzip for .nii.gz I/O, eager FP32 for backends). The mode (``--quick``, default, ``--full``)
sets sizes and batch sizes: see :mod:`qnkit.benchmarks.plan`.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import typer

from qnkit.errors import QnkitInputError

SECTIONS = ("kernels", "io", "backends", "e2e", "train")
#: What a plain `qnkit bench` runs; the training rows (minutes of training steps) only with --only train.
DEFAULT_SECTIONS = ("kernels", "io", "backends", "e2e")
#: Monte-Carlo samples of the e2e uncertainty row in a --quick run (a smoke run; the other modes draw 8).
QUICK_UNCERTAINTY_SAMPLES = 2


def _system_info() -> dict:
    import importlib.metadata as md

    import numpy as np

    import qnkit
    from qnkit import kernels

    from qnkit.cpus import cpu_model

    cpu = cpu_model()
    versions = {}
    for package in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "nibabel"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    info = {"qnkit": qnkit.__version__, "python": platform.python_version(), "numpy": np.__version__,
            **versions, "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "kernel_build": kernels.BUILD, "kernel_threads": kernels.get_num_threads(), "gpu": None}
    if _gpu_present():
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _gpu_present() -> bool:
    from qnkit.backends import nvidia_gpu_present

    return nvidia_gpu_present()


def peak_rss_gb() -> float:
    """Largest resident memory of this process or of any child it waited for (the backend workers), in GB."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib * 1024 / 1e9


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise QnkitInputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise QnkitInputError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def command(
    model: Path = typer.Option(None, "--model", help="Bundle to benchmark (default: a random-weight full-size QuickNAT)."),
    baseline_model: str = typer.Option(None, "--baseline-model", metavar="NAME|BUNDLE",
                                       help="e2e: also time this model's default path on the same CT in the same "
                                            "run (e.g. the default model a new one replaces)."),
    json_out: Path = typer.Option(None, "--json", help="Write every figure to this JSON file."),
    plot_out: Path = typer.Option(None, "--plot", help="Write throughput curves and the stage breakdown to this PNG."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: small volume, tiny network, few repeats (for tests)."),
    full: bool = typer.Option(False, "--full", help="Complete sweep: batch sizes 1-32, 100-slice kernel volume, more "
                                                    "repeats (over 25 minutes and 12 GB on 2 cores)."),
    only: str = typer.Option(",".join(DEFAULT_SECTIONS), "--only",
                             help="Sections to run: kernels,io,backends,e2e,train (train: the recipe's training "
                                  "loop, whole slices against windows)."),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Batch sizes for the backend rows "
                                                                "(default 1,4; 1,4,16,32 with --full)."),
    repeats: int = typer.Option(0, "--repeats", help="Timed repeats per figure (default: set by the mode)."),
    workdir: Path = typer.Option(None, "--workdir", help="Where to put the random-weight bundle and keep the e2e "
                                                         "CTs between runs (default: a temporary folder, and the CTs "
                                                         "in qnkit's cache folder)."),
    memory_slices: int = typer.Option(None, "--memory-slices", help="e2e: also segment a CT this many slices long "
                                                                    "(512x512) in its own process for its peak memory; "
                                                                    "0 = off (default: 1000, off with --quick)."),
    profile: bool = typer.Option(False, "--profile", help="e2e: profile each path's last run with pyinstrument "
                                                          "(pip install pyinstrument); the text files go to the work "
                                                          "folder, named in the JSON."),
) -> None:
    """Benchmark kernels against NumPy, .nii.gz I/O against nibabel, backends against eager PyTorch, and
    `qnkit segment` end to end: its default path against eager PyTorch FP32 on every slice, on a whole
    512x512 CT at 0.7 mm (generated once, then cached), with a 1,000-slice CT for peak memory, and what
    --quality --uncertainty 8 costs on top of the default path (one run). The default
    run takes under 10 minutes and 4 GB on 2 cores; --full runs the complete sweep."""
    import tempfile

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from qnkit._atomic import write_text_atomic
    from qnkit.benchmarks.plan import PLANS

    sections = [s.strip() for s in only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise QnkitInputError(f"--only takes a comma-separated subset of {','.join(SECTIONS)}, got {only!r}")
    for out in (json_out, plot_out):
        if out is not None and not out.absolute().parent.is_dir():
            raise QnkitInputError(f"folder does not exist: {out.absolute().parent}")
    if model is not None and not model.exists():
        raise QnkitInputError(f"bundle not found: {model}")
    if baseline_model is not None:
        from qnkit.models import resolve_model

        if not resolve_model(baseline_model).is_dir():
            raise QnkitInputError(f"--baseline-model {baseline_model}: no such model or bundle")
    if repeats < 0:
        raise QnkitInputError(f"--repeats must be >= 0, got {repeats}")
    if quick and full:
        raise QnkitInputError("--quick and --full exclude each other")
    if profile:
        import importlib.util

        if importlib.util.find_spec("pyinstrument") is None:
            raise QnkitInputError("--profile needs pyinstrument (pip install pyinstrument)")
    plan = PLANS["quick" if quick else "full" if full else "default"]
    batches = _parse_batches(batch_sizes) if batch_sizes is not None else plan.batch_sizes
    workdir_given = workdir is not None
    if memory_slices is not None and memory_slices != 0 and memory_slices < 2:
        raise QnkitInputError(f"--memory-slices must be 0 (off) or at least 2, got {memory_slices}")
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qnkit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # Tables are wide; when piped (no terminal width to honour) keep every column readable.
    console, out_console = Console(stderr=True), Console(width=None if sys.stdout.isatty() else 160)
    report: dict = {"system": _system_info(), "mode": plan.mode}
    started, section_s = time.perf_counter(), {}

    @contextlib.contextmanager
    def timed(name: str):
        begin = time.perf_counter()
        yield
        section_s[name] = time.perf_counter() - begin

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def say(what: str) -> None:
            progress.update(task, description=what)

        if "kernels" in sections:
            from qnkit.benchmarks import kernels as kernel_bench

            with timed("kernels"):
                report["kernels"] = kernel_bench.run(plan.kernel_shape, repeats=repeats or plan.kernel_repeats,
                                                     numpy_repeats=plan.numpy_repeats, progress=say)
        if "io" in sections:
            from qnkit.benchmarks import nifti_io

            with timed("io"):
                report["io"] = nifti_io.run(plan.io_shape, repeats=repeats or plan.io_repeats, workdir=workdir,
                                            progress=say)
        if "backends" in sections:
            from qnkit.benchmarks import backends as backend_bench

            say("preparing the bundle")
            gpu = _gpu_present() and report["system"]["gpu"] is not None
            with timed("bundle"):
                # The FP16 graph is the GPU's; on a CPU-only machine only --full times it.
                bundle, trained = backend_bench.open_or_make_bundle(model, workdir, quick=quick,
                                                                    fp16=gpu or plan.mode == "full",
                                                                    log=lambda *a: None)
            report["bundle"] = {"path": str(bundle.path), "trained": trained,
                                "input_size": list(bundle.input_size), "network": bundle.network}
            import importlib.util

            with timed("backends"):
                floor: dict = {}  # the network's FLOPs per slice and the measured GEMM peaks
                report["backends"] = backend_bench.run(
                    bundle, batch_sizes=batches, repeats=repeats or plan.backend_repeats, trained=trained,
                    gpu=gpu, tensorrt=gpu and importlib.util.find_spec("tensorrt") is not None, progress=say,
                    floor=floor)
                report["network_floor"] = floor
        if "e2e" in sections:
            from qnkit.benchmarks import e2e

            with timed("e2e"):
                # The shipped model (or --model) on the whole CT, cached in --workdir or qnkit's cache folder.
                report["e2e"] = e2e.run(model, workdir=workdir if workdir_given else None,
                                        cache=None, whole=plan.e2e_whole_ct, repeats=repeats or plan.e2e_repeats,
                                        batch_size=plan.e2e_batch,
                                        memory_slices=plan.e2e_memory_slices if memory_slices is None else memory_slices,
                                        quick_size=plan.e2e_size, quick_slices=plan.e2e_slices, profile=profile,
                                        uncertainty_samples=QUICK_UNCERTAINTY_SAMPLES if quick
                                        else e2e.UNCERTAINTY_SAMPLES, baseline=baseline_model, progress=say)

        if "train" in sections:
            from qnkit.benchmarks import train_step

            with timed("train"):
                report["train"] = train_step.run(slices=16 if quick else 64, repeats=1 if quick else 5,
                                                 cases=1 if quick else 2, num_filters=4 if quick else 16,
                                                 whole_side=64 if quick else train_step.RECIPE_SLICE_SIDE,
                                                 variants=(("whole", 0, False, False), ("window", 32, False, False)) if quick
                                                 else train_step.VARIANTS,
                                                 workdir=workdir, progress=say)

    from qnkit.benchmarks.targets import evaluate

    report["targets"] = evaluate(report)
    # How long this run took and its peak memory, to check the mode's budget (10 minutes, 4 GB by default).
    report["run"] = {"wall_s": time.perf_counter() - started, "sections_s": section_s, "peak_rss_gb": peak_rss_gb()}
    _print(out_console, report)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report, indent=2, default=str))
    if plot_out is not None:
        from qnkit.benchmarks.plot import plot

        plot(report, plot_out)


def _print(console, report: dict) -> None:
    from rich.table import Table

    system = report["system"]
    console.print(f"[bold]qnkit bench[/bold] ({report['mode']} run)  cpu: {system['cpu']} ({system['cores']} cores), "
                  f"gpu: {system['gpu'] or 'none'}, kernels: {system['kernel_build']} build, "
                  f"{system['kernel_threads']} threads")
    rows = report.get("kernels")
    if rows:
        shape = rows[0]["shape"]
        table = Table(title=f"Kernels on a {shape[2]}x{shape[1]}x{shape[0]} volume (median)")
        for column in ("kernel", "threads", "ms", "NumPy ms", "x NumPy", "floor ms", "x floor", "GB/s"):
            table.add_column(column, justify="left" if column == "kernel" else "right", no_wrap=True)
        for row in rows:
            table.add_row(row["kernel"], str(row["threads"]), f"{row['kernel_s']['median_s'] * 1e3:.2f}",
                          f"{row['numpy_s']['median_s'] * 1e3:.1f}", f"{row['speedup_vs_numpy']:.1f}",
                          f"{row['floor_s']['median_s'] * 1e3:.2f}", f"{row['ratio_to_floor']:.2f}",
                          f"{row['gb_per_s']:.1f}")
        console.print(table)
    rows = report.get("io")
    if rows:
        shape = rows[0]["shape"]
        table = Table(title=f".nii.gz I/O of a {shape[2]}x{shape[1]}x{shape[0]} volume, qnkit.io ({rows[0]['codec']}) "
                            f"vs nibabel + stdlib gzip (median)")
        for column in ("volume", "operation", "qnkit s", "nibabel s", "x nibabel", "qnkit MB/s", "file MB"):
            table.add_column(column, justify="left" if column in ("volume", "operation") else "right", no_wrap=True)
        for row in rows:
            table.add_row(row["volume"], row["operation"], f"{row['qnkit_s']['median_s']:.2f}",
                          f"{row['nibabel_s']['median_s']:.2f}", f"{row['speedup_vs_nibabel']:.1f}",
                          f"{row['qnkit_mb_per_s']:.0f}", f"{row['file_mb']['qnkit']:.1f}")
        console.print(table)
    rows = report.get("backends")
    if rows:
        bundle = report["bundle"]
        note = "" if bundle["trained"] else " (untrained weights: agreement not meaningful)"
        table = Table(title=f"Backends, QuickNAT {bundle['network'].get('num_filters')} filters, "
                            f"{bundle['input_size'][0]}x{bundle['input_size'][1]} input{note}")
        for column in ("backend", "batch", "slices/s", "spread", "x eager FP32", "Dice vs eager", "GFLOP/s",
                       "% of peak"):
            table.add_column(column, justify="left" if column == "backend" else "right", no_wrap=True)
        for row in rows:
            if "error" in row:
                table.add_row(row["backend"], "-", "-", "-", "-", f"[red]{row['error'][:60]}[/red]", "-", "-")
                continue
            speedup, percent = row["speedup_vs_eager_fp32"], row.get("percent_of_peak")
            table.add_row(row["backend"], str(row["batch"]), f"{row['slices_per_s']:.2f}",
                          f"{row['seconds']['spread']:.0%}", f"{speedup:.2f}" if speedup else "-",
                          f"{row['dice_agreement_vs_eager']:.4f}", f"{row['gflop_per_s']:.1f}",
                          f"{percent:.0f}" if percent is not None else "-")
        console.print(table)
        floor = report.get("network_floor")
        if floor:
            from qnkit.benchmarks.peak import describe_floor

            console.print(describe_floor(floor))
    e2e = report.get("e2e")
    if e2e:
        case, d, e = e2e["case"], e2e["default"], e2e["eager"]
        spacing = case["spacing_mm"]
        table = Table(title=f"qnkit segment end to end on a {'x'.join(map(str, case['shape'][::-1]))} CT "
                            f"({spacing[1]:g} mm pixels, {spacing[0]:g} mm slices), model {e2e['model']['name']}, "
                            f"batch {e2e['batch_size']}, median of {e2e['repeats']}")
        for column in ("stage", "default s", "eager FP32 s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        from qnkit.segment import STAGES

        for stage in (*STAGES, "wall"):
            table.add_row(stage, f"{d['stages_s'][stage]:.2f}", f"{e['stages_s'][stage]:.2f}")
        table.add_row("backend", f"{d['backend']['name']} {d['backend']['precision']}",
                      f"{e['backend']['name']} {e['backend']['precision']}")
        table.add_row("slices run", str((d.get("slab") or {}).get("slices_run", "-")),
                      str((e.get("slab") or {}).get("slices_run", "-")))
        table.add_row("opening the backend s", f"{d['open_s']:.2f}", f"{e['open_s']:.2f}")
        table.add_row("peak RSS GB", f"{d['peak_rss_gb']:.2f}", f"{e['peak_rss_gb']:.2f}")
        table.add_row("Dice vs true labels", f"{d['dice_vs_truth']:.4f}", f"{e['dice_vs_truth']:.4f}")
        b = e2e.get("baseline")
        if b:
            table.add_row(f"wall of baseline {b['model']} s", f"{b['wall_s']:.2f} (this model "
                          f"{e2e['seconds_vs_baseline']:.2f}x)", "-")
        u = e2e.get("uncertainty")
        if u:
            table.add_row(f"wall with --quality --uncertainty {u['samples_asked']} s",
                          f"{u['wall_s']:.2f} ({u['cost_vs_plain']:.2f}x)", "-")
        console.print(table)
        line = (f"end to end: {e2e['speedup_vs_eager']:.1f}x eager FP32 ({e2e['seconds']:.1f} s against "
                f"{e2e['eager_seconds']:.1f} s), mask Dice vs eager {e2e['mask_dice_vs_eager']:.4f}")
        memory = e2e.get("memory")
        if memory:
            line += (f"; {'x'.join(map(str, memory['shape'][::-1]))} CT: peak RSS {memory['peak_rss_gb']:.2f} GB, "
                     f"{memory['wall_s']:.1f} s")
        console.print(line)
        if e2e.get("gpu"):
            table = Table(title="end to end on the GPU, each against eager FP32 on every slice on that GPU")
            for column in ("path", "wall s", "speed-up", "mask Dice vs GPU eager", "slices run"):
                table.add_column(column, justify="left" if column == "path" else "right")
            for name, row in e2e["gpu"].items():
                if "skipped" in row:
                    table.add_row(name, "-", "-", "-", row["skipped"])
                    continue
                table.add_row(name, f"{row['wall_s']:.2f}", f"{row['speedup_vs_gpu_eager']:.1f}x",
                              f"{row['mask_dice_vs_gpu_eager']:.4f}", str((row.get("slab") or {}).get("slices_run", "-")))
            console.print(table)
    train = report.get("train")
    if train:
        table = Table(title=f"Training loop (loader, augmentation, forward, backward, Adam), QuickNAT "
                            f"{train['num_filters']} filters, {train['threads']} threads, median of {train['repeats']} "
                            f"x {train['slices_per_timing']} slices")
        for column in ("variant", "input", "step", "slices/s", "s/slice", "best s/slice", "GFLOP/slice", "GFLOP/s",
                       "x whole", "best x whole"):
            table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
        for row in train["rows"]:
            table.add_row(row["variant"], "x".join(map(str, row["slice_shape"])), row.get("step", "FP32"),
                          f"{row['slices_per_s']:.2f}",
                          f"{row['seconds_per_slice']:.3f}", f"{row['best_seconds_per_slice']:.3f}",
                          f"{row['gflop_per_slice']:.2f}", f"{row['gflop_per_s']:.1f}",
                          f"{row['speedup_per_slice']:.2f}", f"{row['best_speedup_per_slice']:.2f}")
        console.print(table)
    run = report.get("run")
    if run:
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run["sections_s"].items())
        console.print(f"{report['mode']} run: {run['wall_s']:.0f} s wall ({parts}), peak memory "
                      f"{run['peak_rss_gb']:.2f} GB")
    targets = report.get("targets")
    if targets:
        table = Table(title="Performance targets")
        for column in ("target", "measured", "met"):
            table.add_column(column)
        marks = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "cannot tell"}
        for row in targets:
            table.add_row(row["target"], row["measured"], marks[row["met"]])
        console.print(table)
