"""`qnkit export`: a training run's checkpoint -> a verified model bundle (ONNX, FP16, INT8, TensorRT).

An export takes from under a minute to a few (graphs exported, each checked against the eager model,
INT8 calibrated, an engine built), so on a terminal a spinner shows the step it is on and the time so
far (:func:`export_progress`); each step's message is also kept as a line on stderr.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List

import typer

from qnkit.commands import choices


def _parse_size(text: str | None) -> tuple[int, int] | None:
    from qnkit.errors import QnkitInputError

    if text is None:
        return None
    parts = text.lower().replace("x", " ").split()
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise QnkitInputError(f"--input-size must be H or HxW (e.g. 256x256), not {text!r}")
    return size


def command(
    run_dir: Path = typer.Argument(None, metavar="RUN_DIR", show_default=False,
                                   help="Training run folder (RUN_DIR/checkpoints/{best,last})."),
    out: Path = typer.Option(None, "--out", help="Bundle folder to write."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write model.fp16.onnx (FP16 graph, FP32 I/O), verified."),
    engine: bool = typer.Option(False, "--engine", help="Also build a TensorRT engine (needs tensorrt and a GPU)."),
    int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx (static QDQ, synthetic calibration)."),
    int8_evidence: List[Path] = typer.Option(
        None, "--int8-evidence", metavar="CT.nii.gz", help="A real CT (NIfTI, not training data; repeatable) on which the INT8 graph is "
        "compared with FP32 through `qnkit segment`'s pipeline: INT8 becomes the CPU default when its mask Dice "
        "is >= 0.99 on every such CT, else FP32 (choice and figures in qnkit.json). Implies --int8."),
    quality_calibration: Path = typer.Option(
        None, "--quality-calibration", metavar="FILE.json", help="The quality verdict's limits for this model "
        "(python -m qnkit.benchmarks.quality_calibration fit ... --out FILE.json), sealed into qnkit.json; "
        "without it the bundle records qnkit's default limits, marked as not calibrated for it."),
    checkpoint: choices.Checkpoint = typer.Option("best", "--checkpoint", callback=choices.plain,
                                                  help="Which checkpoint of the run."),
    input_size: str = typer.Option(None, "--input-size", help="Model input grid HxW (default: the run's slices)."),
    min_batch: int = typer.Option(1, "--min-batch", help="TensorRT profile: smallest batch."),
    opt_batch: int = typer.Option(16, "--opt-batch", help="TensorRT profile: batch to optimise for."),
    max_batch: int = typer.Option(32, "--max-batch", help="TensorRT profile: largest batch."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    check: Path = typer.Option(None, "--check", help="Only verify an existing bundle (same as `qnkit verify`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the written qnkit.json."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the current step and the time "
                                                                         "so far on stderr (a terminal only)."),
) -> None:
    """Export RUN_DIR's checkpoint into a model bundle: model.onnx, weights, qnkit.json, and optionally
    model.fp16.onnx, model.int8.onnx and a TensorRT engine, each verified against the eager model."""
    from qnkit.errors import QnkitInputError, require

    if check is not None:
        if run_dir is not None or out is not None:
            raise QnkitInputError("--check takes only the bundle folder (no RUN_DIR or --out)")
        from qnkit.commands.verify import check_bundle

        check_bundle(check, echo=typer.echo)
        return
    if run_dir is None or out is None:
        raise QnkitInputError("usage: qnkit export RUN_DIR --out BUNDLE_DIR [options] (or --check BUNDLE_DIR)")
    if not run_dir.is_dir():
        raise QnkitInputError(f"{run_dir}: no such run folder")
    size = _parse_size(input_size)
    calibration = _read_calibration(quality_calibration) if quality_calibration is not None else None
    require("qnkit export", "torch", "safetensors", "onnx", "onnxscript", "onnx_ir", extra="export")
    require("qnkit export (it checks the graphs with ONNX Runtime)", "onnxruntime")
    from rich.console import Console

    with export_progress(Console(stderr=True, highlight=False, soft_wrap=True), progress,
                         first="loading torch and the checkpoint") as log:
        from qnkit.export.bundle_writer import export_bundle

        meta = export_bundle(run_dir, out, checkpoint=checkpoint, fp16=fp16, engine=engine, int8=int8,
                             batches=(min_batch, opt_batch, max_batch), input_size=size, force=force,
                             int8_evidence=int8_evidence or (), quality_calibration=calibration, log=log)
    if json_out:
        typer.echo(json.dumps(meta, indent=1))
    files = ", ".join(sorted(meta["artefacts"]))
    typer.echo(f"bundle written to {out} ({files}) in {meta['export']['seconds']:.1f} s", err=True)


def _read_calibration(path: Path) -> dict:
    """The calibration JSON of ``quality_calibration fit`` (checked by :func:`qnkit.quality.check_calibration`)."""
    from qnkit.errors import QnkitInputError
    from qnkit.quality import check_calibration

    try:
        record = json.loads(path.read_text())
        check_calibration(record)
    except (OSError, ValueError, QnkitInputError) as exc:
        why = str(exc) if isinstance(exc, QnkitInputError) else f"unreadable ({exc.__class__.__name__})"
        raise QnkitInputError(f"--quality-calibration {path}: {why}") from None
    return record


@contextlib.contextmanager
def export_progress(console, enabled: bool = True, first: str = "exporting"):
    """Yield ``log(message)`` for :func:`qnkit.export.bundle_writer.export_bundle`: each message is printed as
    a line on ``console`` and, on a terminal, becomes the text of a spinner beside the time elapsed, so a
    long step (exporting, calibrating, building an engine) shows that it is running and for how long;
    ``first`` is the spinner's text until the first message (shown only, never printed, so that an error
    stays the only line). Off a terminal (or not ``enabled``) only the lines are printed: no live display,
    no stray empty line."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    live = enabled and console.is_terminal
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                   console=console, transient=True, disable=not live)
    with bar:
        task = bar.add_task(first, total=None)

        def log(message: str) -> None:
            console.print(message, markup=False, highlight=False)
            bar.update(task, description=" ".join(str(message).split())[:60])

        yield log
