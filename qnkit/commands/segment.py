"""`qnkit segment`: kidney masks for CT volumes with an exported model bundle.

Everything that can be checked before the (slow) work is checked first: inputs exist and are
NIfTI, outputs do not exist (unless --force), output folders are writable, the bundle is intact.
Bad input ends with one line and exit code 2; in batch mode a failing case is reported, the
others go on, and the exit code is non-zero at the end (2 when every failure was bad input,
else 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def command(
    inputs: List[Path] = typer.Argument(..., metavar="INPUT...", show_default=False,
                                        help="NIfTI file(s), KiTS19 case folder(s) (imaging.nii.gz), or a folder of "
                                             "NIfTI files / case folders (batch mode)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder written by `qnkit export`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output file (single input, .nii/.nii.gz) or folder. Default: "
                                            "<input stem>_kidneys.nii.gz beside the input."),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnxruntime | tensorrt."),
    precision: str = typer.Option("auto", "--precision", help="auto | fp32 | fp16 | bf16 | int8 (auto: fp16 on a "
                                                              "GPU, fp32 on the CPU)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Slices per inference batch."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for kernels and the "
                                                                         "backend (default: all cores)."),
    split_sides: bool = typer.Option(False, "--split-sides", help="Write 1 = right, 2 = left kidney (else 1 = kidney)."),
    no_postprocess: bool = typer.Option(False, "--no-postprocess", help="Skip the 3-D post-processing (closing, "
                                                                        "one kidney per side); sides are still labelled."),
    min_kidney_ml: Optional[float] = typer.Option(None, "--min-kidney-ml", min=0.0, show_default=False,
                                                  help="A side whose largest piece is smaller is reported absent "
                                                       "(mL; default 10)."),
    merge_mm: Optional[float] = typer.Option(None, "--merge-mm", min=0.0, show_default=False,
                                             help="Pieces this close (mm) to a side's kidney are part of it "
                                                  "(default 15)."),
    closing: Optional[str] = typer.Option(None, "--closing", metavar="R",
                                          help="Binary closing with a ball of radius R before keeping the "
                                               "largest components: 2mm (a bare number is mm) or 1vox."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write per-kidney statistics and timings (JSON)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a PNG with axial and coronal views "
                                                                   "(batch: one per case, FILE_<case>.png)."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Segment both kidneys: mask on the input's exact grid, optional stats JSON and preview PNG."""
    from rich.console import Console

    from qnkit import segment as S
    from qnkit.errors import QnkitInputError

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if no_postprocess and closing:
        raise QnkitInputError("--closing is part of the post-processing; it cannot be used with --no-postprocess")
    radius, unit = S.parse_closing(closing)
    options = S.SegmentOptions(batch_size=batch_size, postprocess=not no_postprocess, closing=radius,
                               closing_unit=unit, split_sides=split_sides,
                               **{k: v for k, v in (("min_kidney_ml", min_kidney_ml), ("merge_mm", merge_mm))
                                  if v is not None})
    cases, batch = S.resolve_inputs(inputs)

    from qnkit.backends import open_backend
    from qnkit.bundle import load_bundle

    bundle = load_bundle(model, verify=True)
    plan = plan_outputs(cases, batch, out=out, stats=stats, preview=preview, force=force)
    if threads:
        from qnkit import kernels

        kernels.set_num_threads(threads)
    extra = {"threads": threads} if threads else {}
    opened = []

    def engine():
        """The backend, opened once the first image has loaded (bad input fails before any backend log)."""
        if not opened:
            try:
                opened.append(open_backend(bundle, backend, precision=precision, device=device,
                                           batch_size=batch_size, log=lambda msg: err.print(msg, markup=False),
                                           **extra))
            except QnkitInputError as exc:
                raise BackendUnavailable(str(exc)) from None
        return opened[0]

    try:
        results, failures = run_cases(cases, plan, engine, bundle, options, force=force, progress=progress,
                                      console=err)
    finally:
        for e in opened:
            e.close()
    summarize(results, failures, opened[0] if opened else None, plan, bundle,
              console=Console(highlight=False, soft_wrap=True))
    if failures:
        bad_input = all(isinstance(exc, QnkitInputError) for _, exc in failures)
        err.print(f"qnkit: error: {len(failures)} of {len(cases)} case(s) failed", markup=False)
        raise typer.Exit(2 if bad_input else 1)


class BackendUnavailable(Exception):
    """The asked-for backend cannot run here: stops the whole command (exit 2), even in batch mode."""


def plan_outputs(cases, batch: bool, *, out, stats, preview, force: bool) -> dict:
    """Output paths per case (+ stats/preview), checked: not an input, not existing, folders writable."""
    from qnkit import io as qio
    from qnkit import segment as S
    from qnkit.errors import QnkitInputError

    if out is not None and (out.is_dir() or not qio.is_nifti_path(out)):
        if out.exists() and not out.is_dir():
            raise QnkitInputError(f"--out {out} exists and is not a folder or a NIfTI file name")
        S.check_writable_folder(out, create=True)
    masks = {c.name: S.output_path(c, out, batch) for c in cases}
    previews = {}
    if preview is not None:
        if preview.suffix.lower() != ".png":
            raise QnkitInputError(f"--preview {preview}: expected a .png file name")
        for c in cases:
            previews[c.name] = preview if not batch else preview.with_name(f"{preview.stem}_{c.name}.png")
    if stats is not None and stats.suffix.lower() != ".json":
        raise QnkitInputError(f"--stats {stats}: expected a .json file name")
    inputs = [c.image for c in cases]
    every = list(masks.values()) + list(previews.values()) + ([stats] if stats is not None else [])
    for path in every:
        if any(S.same_file(path, i) for i in inputs):
            raise QnkitInputError(f"{path}: refusing to write over an input file")
        if path.is_dir():
            raise QnkitInputError(f"{path} is a folder, not a file name")
        if path.exists() and not force:
            raise QnkitInputError(f"{path} exists; pass --force to replace it")
    if len(set(map(str, every))) != len(every):
        raise QnkitInputError("two outputs would have the same file name; choose other --out/--stats/--preview")
    for folder in sorted({p.parent for p in every}, key=str):
        S.check_writable_folder(folder)
    return {"masks": masks, "previews": previews, "stats": stats}


def run_cases(cases, plan, engine, bundle, options, *, force: bool, progress: bool, console):
    """Segment every case; returns (results, [(case, exception)]). A single case's error propagates
    as is from the caller; in batch mode each failure is logged and the rest go on."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qnkit import segment as S
    from qnkit.errors import QnkitInputError
    from qnkit.preview import render_preview
    from qnkit.report import describe_sides

    results, failures = [], []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=True)
    with bar:
        cases_task = bar.add_task("cases", total=len(cases), visible=len(cases) > 1)
        slices_task = bar.add_task("slices", total=None)
        for case in cases:
            bar.update(slices_task, description=f"{case.name} slices", completed=0, total=None)
            target = plan["masks"][case.name]
            existed = target.exists()
            try:
                loaded = S.load_case(case)
                result = S.segment_file(
                    case, target, engine().predict, bundle=bundle, options=options, overwrite=force,
                    keep_arrays=case.name in plan["previews"], loaded=loaded,
                    progress=lambda n, total: bar.update(slices_task, completed=n, total=total))
                if case.name in plan["previews"]:
                    try:
                        png = render_preview(result.ct, result.sides, result.spacing, window=bundle.hu_window,
                                             title=f"{case.name}: {describe_sides(result.stats)}")
                        from qnkit._atomic import write_bytes_atomic

                        write_bytes_atomic(plan["previews"][case.name], png)
                    except BaseException:
                        if not existed:
                            target.unlink(missing_ok=True)  # all of a case's outputs, or none
                        raise
                result.ct = result.sides = result.geometry = None
                results.append(result)
            except BackendUnavailable as exc:
                raise QnkitInputError(str(exc)) from None
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - batch mode reports and goes on
                if len(cases) == 1:
                    raise
                failures.append((case, exc))
                why = str(exc) if isinstance(exc, QnkitInputError) else f"{type(exc).__name__}: {exc}"
                console.print(f"qnkit: {case.name} failed: {' '.join(why.split())}", markup=False)
            bar.advance(cases_task)
    return results, failures


def summarize(results, failures, engine, plan, bundle, *, console) -> None:
    """Print one line per case (stdout) and write the stats JSON when asked."""
    import json

    from qnkit import __version__ as version
    from qnkit._atomic import write_text_atomic
    from qnkit.report import describe_sides

    desc = engine.describe() if engine is not None else {"name": "none", "precision": "-", "device": "-",
                                                          "batch_size": 0}
    for r in results:
        j = r.to_json()
        console.print(f"{r.name}: {describe_sides(r.stats)}; {r.slices} slices in {j['timings_s']['wall']:.2f} s "
                      f"({j['slices_per_s']} slices/s) -> {r.output}", markup=False)
    console.print(f"backend {desc['name']} ({desc['precision']}, {desc['device']}, batch {desc['batch_size']}); "
                  f"{len(results)} case(s) segmented" + (f", {len(failures)} failed" if failures else ""),
                  markup=False)
    if plan["stats"] is not None:
        doc = {"qnkit": version, "model": str(bundle.path), "backend": desc,
               "threshold": bundle.threshold, "hu_window": list(bundle.hu_window),
               "cases": [r.to_json() for r in results] + [
                   {"name": c.name, "input": str(c.image), "error": " ".join(str(e).split())} for c, e in failures]}
        write_text_atomic(plan["stats"], json.dumps(doc, indent=1, default=str) + "\n")
