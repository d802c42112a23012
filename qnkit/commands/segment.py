"""`qnkit segment`: kidney masks for CT volumes with an exported model bundle.

Everything that can be checked before the (slow) work is checked first: inputs exist and are
NIfTI or DICOM, outputs do not exist (unless --force), output folders are writable, the bundle is
intact. The loop over cases is the library's (:func:`qnkit.batch.segment_many`).
Bad input ends with one line and exit code 2; in batch mode a failing case is reported, the
others go on, and the exit code is non-zero at the end (2 when every failure was bad input,
else 1).

``--ray [ADDRESS]`` runs the same loop on Ray workers (:mod:`qnkit.cluster`); such a run, and a local
run with ``--resume``, writes a record beside each mask and skips, on a rerun, the cases whose
outputs still verify against it (:func:`qnkit.batch.resume_plan`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from qnkit.commands import choices


def command(
    inputs: List[Path] = typer.Argument(..., metavar="INPUT", show_default=False,
                                        help="NIfTI file(s), KiTS19 case folder(s) (imaging.nii.gz), DICOM folder(s) "
                                             "(any nesting) or .zip(s) of one, or a folder of NIfTI files / case "
                                             "folders / zips (batch mode)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model bundle folder written by `qnkit export`, "
                                        "or the name of a shipped model (`qnkit models`); default: the shipped model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output file (single input, .nii/.nii.gz) or folder. Default: "
                                            "<input stem>_kidneys.nii.gz beside the input (SEG: _kidneys_seg.dcm, "
                                            "RTSTRUCT: _kidneys_rtstruct.dcm)."),
    formats: Optional[str] = typer.Option(None, "--format", metavar="LIST",
                                          help="Outputs, any of nifti,seg,rtstruct (comma-separated). Default: nifti, "
                                               "or seg for a DICOM input. SEG and RTSTRUCT need a DICOM input."),
    series: Optional[str] = typer.Option(None, "--series", metavar="UID",
                                         help="SeriesInstanceUID to read when a DICOM input holds several CT series "
                                              "(default: the one with the most slices)."),
    backend: choices.Backend = typer.Option("auto", "--backend", callback=choices.plain,
                                            help="Inference backend (auto: the fastest that runs here)."),
    precision: choices.Precision = typer.Option("auto", "--precision", callback=choices.plain,
                                                help="auto: fp16 on a GPU; on the CPU the bundle's choice "
                                                     "(fp32 unless its INT8 evidence passed)."),
    device: str = typer.Option("auto", "--device", metavar="auto|cpu|cuda[:N]", callback=choices.device,
                               help="Where the network runs."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Slices per inference batch (ONNX Runtime "
                                                                   "on the CPU runs fewer per call; the output "
                                                                   "says what ran)."),
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
    strict: bool = typer.Option(False, "--strict", help="Out-of-domain warnings (not HU, slice thickness far outside "
                                                        "the model's range, orientation guessed, a volume too thin "
                                                        "to hold a kidney, no kidney found, kidney at the volume's "
                                                        "edge) are errors: exit code 2, that case not written; and "
                                                        "a kidney whose quality verdict is check ends with exit "
                                                        "code 2 (its outputs are written)."),
    all_slices: bool = typer.Option(False, "--all-slices", help="Predict every slice (default: find the kidneys' "
                                                                "slab with a coarse pass, then predict only there)."),
    z_step: float = typer.Option(0.0, "--z-step", metavar="MM", min=0.0,
                                 help="Inside the kidneys' slab, predict one slice per MM millimetres and interpolate "
                                      "between (about 2x faster on 1 mm slices at 2; mask Dice about 0.987 against "
                                      "every slice). 0: every slice."),
    mirror: bool = typer.Option(False, "--mirror", help="Test-time mirroring: average each slice's prediction with "
                                "that of its left-right mirror image (twice the network work; nnU-Net's default)."),
    quality: bool = typer.Option(False, "--quality/--no-quality", help="Per-kidney quality verdict (ok / check, "
                                 "with the reason): plausibility of the mask and a test-time mirror pass over the "
                                 "kidneys (about one more pass of the network over them). Off by default until "
                                 "its limits are calibrated for the shipped model."),
    uncertainty: int = typer.Option(0, "--uncertainty", metavar="N", min=0, max=64,
                                    help="Also draw N Monte-Carlo dropout samples over the kidneys (Bayesian "
                                         "QuickNAT's agreement and volume CV in the verdict; about N more passes "
                                         "over the kidneys). 0: none."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the Monte-Carlo samples (the same samples on every "
                                                      "backend)."),
    uncertainty_map: Optional[Path] = typer.Option(None, "--uncertainty-map", metavar="FILE.nii.gz",
                                                   help="Write the voxel-wise disagreement of the mirror pass and "
                                                        "the samples (0 agree .. 1 split) on the input's grid "
                                                        "(single input)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    resume: bool = typer.Option(False, "--resume", help="Write a record (<name>_kidneys.json: stats, hashes of the "
                                                        "input, outputs and model) beside each mask, and skip cases "
                                                        "whose outputs exist and verify against theirs; --force "
                                                        "redoes them. Always on with --ray."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="Segment on Ray workers (pip install \"qnkit[cluster]\"): no ADDRESS or "
                                           "'auto' starts a local Ray instance; an ADDRESS (host:6379, "
                                           "ray://host:10001) joins a running cluster. Inputs and outputs must be "
                                           "on storage every node sees. Resumable (see --resume)."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", min=1, show_default=False,
                                              help="Ray workers (actors), each loading the model once (default: "
                                                   "one per GPU, else cluster CPUs / --ray-cpus-per-worker)."),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus-per-worker", min=0.0, help="CPUs each Ray worker reserves "
                                                                              "(and its threads)."),
    ray_gpus: Optional[float] = typer.Option(None, "--ray-gpus-per-worker", min=0.0, show_default=False,
                                             help="GPUs each Ray worker reserves (fractions share a GPU; "
                                                  "default: 1 when the cluster has GPUs, else 0)."),
    retries: int = typer.Option(2, "--retries", min=0, help="With --ray: times a case is handed to another worker "
                                                            "after its worker died (killed, out of memory)."),
) -> None:
    """Segment both kidneys: mask on the input's exact grid, optional stats JSON and preview PNG."""
    from rich.console import Console

    from qnkit import batch as B
    from qnkit import segment as S
    from qnkit.errors import QnkitInputError, require

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if preview is not None:  # optional features: their packages first, never after the slow part
        require("--preview", "matplotlib", extra="plot")
    if ray is not None:
        require("--ray", "ray", extra="cluster")
    if no_postprocess and closing:
        raise QnkitInputError("--closing is part of the post-processing; it cannot be used with --no-postprocess")
    radius, unit = S.parse_closing(closing)
    options = S.SegmentOptions(batch_size=batch_size, postprocess=not no_postprocess, closing=radius,
                               closing_unit=unit, split_sides=split_sides, strict=strict, slab=not all_slices,
                               z_step_mm=z_step, mirror=mirror, quality=quality or uncertainty > 0 or
                               uncertainty_map is not None, uncertainty=uncertainty, seed=seed,
                               keep_samples=uncertainty_map is not None,
                               **{k: v for k, v in (("min_kidney_ml", min_kidney_ml), ("merge_mm", merge_mm))
                                  if v is not None})
    cases, batch = B.resolve_cases(inputs)
    if uncertainty_map is not None:
        from qnkit import io as qio

        if batch:
            raise QnkitInputError("--uncertainty-map takes one input")
        if not qio.is_nifti_path(uncertainty_map):
            raise QnkitInputError(f"--uncertainty-map {uncertainty_map}: expected a .nii or .nii.gz file name")
        if uncertainty_map.exists() and not force:
            raise QnkitInputError(f"{uncertainty_map} exists; pass --force to replace it")

    from qnkit.backends import open_backend, open_sampler, sampling_predict
    from qnkit.bundle import load_bundle

    from qnkit.models import resolve_model

    bundle = load_bundle(resolve_model(model), verify=True)
    check_backend_choice(backend, precision, device, bundle=bundle, local=ray is None)
    resumable = resume or ray is not None
    plan = B.plan_outputs(cases, batch, out=out, formats=formats, stats=stats, preview=preview,
                          force=force or resumable, records=resumable)
    check_dicom_support(cases, plan)
    current: list = []
    if resumable:
        if stats is not None and stats.exists() and not force and not _is_stats_document(stats):
            raise QnkitInputError(f"{stats} exists and is not a qnkit stats file; pass --force to replace it")
        todo, current = B.resume_plan(cases, plan, bundle, options, series=series, force=force)
        out_console = Console(highlight=False, soft_wrap=True)
        if not todo:
            out_console.print(f"nothing new to segment: {len(current)} case{'s' if len(current) != 1 else ''} "
                              f"up to date", markup=False)
            summarize(B.BatchResult(), None, stats, bundle, console=out_console, current=current, quiet=True)
            return
        if current:
            err.print(f"qnkit: {len(current)} case(s) up to date, skipped; {len(todo)} to segment", markup=False)
        cases = todo
    if ray is not None:
        _segment_on_ray(cases, bundle, options, plan=plan, address=ray, workers=ray_workers, cpus=ray_cpus,
                        gpus=ray_gpus, retries=retries, backend=backend, precision=precision, device=device,
                        batch_size=batch_size, threads=threads, series=series, stats=stats, current=current,
                        progress=progress, err=err)
        return
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
                raise B.BackendUnavailable(str(exc)) from None
        return opened[0]

    def sampler():
        """The backend that draws Monte-Carlo samples (the engine itself when it can; qnkit.backends.open_sampler)."""
        if len(opened) < 2:
            opened.append(open_sampler(bundle, engine(), log=lambda msg: err.print(msg, markup=False)))
        return opened[1]

    try:
        done = B.segment_many(cases, bundle, options, outputs=plan, predict=sampling_predict(engine, sampler),
                              series=series, overwrite=force or resumable, stop_on_error=len(cases) == 1 and not
                              current, progress=progress, console=err)
    finally:
        for e in {id(e): e for e in opened}.values():
            e.close()
    if uncertainty_map is not None and done.results:
        write_uncertainty_map(done.results[0], uncertainty_map, overwrite=force)
    summarize(done, opened[0] if opened else None, stats, bundle, console=Console(highlight=False, soft_wrap=True),
              current=current)
    _exit_on_failures(done, len(cases), err)
    if strict and _flagged(done.results):
        err.print(f"qnkit: error: --strict: quality check needed for {', '.join(_flagged(done.results))}",
                  markup=False)
        raise typer.Exit(2)


def _flagged(results) -> list[str]:
    """'case right' for each kidney whose quality verdict is check."""
    return [f"{r.name} {side}" for r in results for side in ("right", "left")
            if (r.stats.get(side, {}).get("quality") or {}).get("verdict") == "check"]


def write_uncertainty_map(result, path: Path, *, overwrite: bool) -> None:
    """The voxel-wise disagreement (:meth:`qnkit.uncertainty.KidneySamples.voxel_uncertainty`) as float32 NIfTI
    on the input's grid (0 outside the kidneys' box)."""
    from qnkit import io as qio

    if result.samples is None or result.geometry is None:
        return
    qio.save_volume(result.samples.uncertainty_on_grid(result.shape), result.geometry, path, overwrite=overwrite)


#: Precisions each backend runs (as its own check_precision calls say); "auto" picks one of them.
BACKEND_PRECISIONS = {"onnxruntime": ("fp32", "fp16", "int8"), "tensorrt": ("fp32", "fp16"),
                      "torch": ("fp32", "fp16", "bf16")}


def check_backend_choice(backend: str, precision: str, device: str, bundle=None, *, local: bool = True) -> None:
    """Refuse, before any CT loads, a --backend/--precision/--device choice that cannot run.

    What can be known without opening a backend: a precision the backend does not run, TensorRT on the
    CPU, the backend's package not installed, a CUDA device asked for where no NVIDIA GPU is visible
    (else `auto` would quietly run on the CPU), the bundle lacking the graph or weights asked for.
    ``local`` False (a Ray run): packages and GPUs are the workers', so only the choice itself is checked.
    Opening the backend (after the first CT loads) still checks everything else.
    """
    from qnkit.bundle import FP16_ONNX, FP32_ONNX, INT8_ONNX, WEIGHTS
    from qnkit.errors import QnkitInputError, require

    runs = BACKEND_PRECISIONS.get(backend)
    if runs and precision != "auto" and precision not in runs:
        raise QnkitInputError(f"--backend {backend} runs {', '.join(runs)}, not --precision {precision}")
    if backend == "tensorrt" and device == "cpu":
        raise QnkitInputError("--backend tensorrt runs on a GPU only, not --device cpu")
    if local:
        if backend == "torch":
            require("--backend torch", "torch", "safetensors")
        if backend == "tensorrt":
            require("--backend tensorrt", "tensorrt", "torch", extra="gpu")
        if device.startswith("cuda"):
            from qnkit.backends import nvidia_gpu_present

            if not nvidia_gpu_present():
                raise QnkitInputError(f"--device {device}: no NVIDIA GPU is visible here (use --device cpu or auto)")
    if bundle is not None:
        graph = {"fp32": FP32_ONNX, "fp16": FP16_ONNX, "int8": INT8_ONNX}.get(precision)
        if backend == "onnxruntime" and graph and not bundle.has(graph):
            raise QnkitInputError(f"{bundle.path}: no {graph} for --precision {precision} (re-export with "
                                  f"--{precision}, or choose another precision)")
        if backend == "torch" and not bundle.has(WEIGHTS):
            raise QnkitInputError(f"{bundle.path}: no {WEIGHTS} for --backend torch")


def check_dicom_support(cases, plan: dict) -> None:
    """A DICOM input needs pydicom and a SEG or RTSTRUCT output highdicom (the [dicom] extra): checked
    before the first case loads, so a batch does not fail case by case after the NIfTI ones are done."""
    from qnkit.batch import is_dicom_case
    from qnkit.errors import require

    dicom = [c for c in cases if is_dicom_case(c)]
    if dicom:
        require(f"DICOM input ({dicom[0].image})", "pydicom", extra="dicom")
    if any(plan[c.name].seg is not None or plan[c.name].rtstruct is not None for c in cases):
        require("DICOM SEG/RTSTRUCT output", "highdicom", extra="dicom")


def ray_address_argv(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS: a bare ``--ray`` (last, before another option, or before
    something that is not an address) becomes ``--ray=auto``. An address is ``auto``, ``local``, a URL
    (``ray://host:10001``) or ``host:port``, and not an existing path."""
    import re

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if arg == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            address = nxt is not None and not nxt.startswith("-") and not Path(nxt).exists() and (
                nxt in ("auto", "local") or "://" in nxt or re.fullmatch(r"[\w.\-\[\]:]+:\d+", nxt) is not None)
            if not address:
                out.append("--ray=auto")
                i += 1
                continue
        out.append(arg)
        i += 1
    return out


def _exit_on_failures(done, count: int, err) -> None:
    """Exit non-zero when a case failed (2 when every failure was bad input, else 1), or when an optional
    output (a preview) could not be written although its case's masks were (1)."""
    from qnkit.errors import QnkitInputError

    if done.failures:
        bad_input = all(isinstance(exc, QnkitInputError) for _, exc in done.failures)
        err.print(f"qnkit: error: {len(done.failures)} of {count} case(s) failed", markup=False)
        raise typer.Exit(2 if bad_input else 1)
    if done.missing:
        err.print(f"qnkit: error: {len(done.missing)} preview(s) not written (the masks were): "
                  f"{', '.join(str(path) for _, path, _ in done.missing)}", markup=False)
        raise typer.Exit(1)


def _is_stats_document(path: Path) -> bool:
    """True for a stats JSON that `qnkit segment --stats` wrote (a resumable rerun replaces it)."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "qnkit" in doc and isinstance(doc.get("cases"), list)


def _segment_on_ray(cases, bundle, options, *, plan, address, workers, cpus, gpus, retries, backend, precision,
                    device, batch_size, threads, series, stats, current, progress, err) -> None:
    from rich.console import Console

    from qnkit import cluster as C

    opts = C.ClusterOptions(address=None if address in ("", "auto") else address, workers=workers,
                            cpus_per_worker=cpus, gpus_per_worker=gpus, retries=retries, backend=backend,
                            precision=precision, device=device, batch_size=batch_size, threads=threads)
    run = C.segment_on_ray(cases, bundle, options, outputs=plan, cluster=opts, series=series, overwrite=True,
                           progress=progress, console=err)
    backends = []
    for w in run.workers:
        b = w["backend"]
        label = f"{b['name']} ({b['precision']}, {b['device']}, {_batch_words(b)})"
        if label not in backends:
            backends.append(label)
    hosts = len({w["host"] for w in run.workers})
    where = (f"{len(run.workers)} Ray worker(s) on {hosts} node(s)" +
             (f", {run.retried} case(s) retried after a worker died" if run.retried else ""))
    desc = {"name": " + ".join(backends) or "none", "precision": "-", "device": "-", "batch_size": batch_size,
            "ray": {"workers": run.workers, "retried": run.retried}}
    summarize(run.done, None, stats, bundle, console=Console(highlight=False, soft_wrap=True), current=current,
              backend_line=f"backend {' + '.join(backends) or 'none'} on {where}", backend_desc=desc)
    _exit_on_failures(run.done, len(cases), err)


def summarize(done, engine, stats, bundle, *, console, current=(), quiet: bool = False, backend_line=None,
              backend_desc=None) -> None:
    """Print one line per case (stdout) and write the stats JSON (to ``stats``) when asked.

    ``current``: records of cases a resumable run found up to date (counted, and in the stats JSON).
    """
    import json

    from qnkit import __version__ as version
    from qnkit._atomic import write_text_atomic
    from qnkit.quality import describe_quality
    from qnkit.report import describe_sides

    results, failures = done.results, done.failures
    desc = backend_desc or (engine.describe() if engine is not None else {
        "name": "none", "precision": "-", "device": "-", "batch_size": 0})
    if quiet:
        results = []
    for r in results:
        j = r.to_json()
        target = done.outputs[r.name]
        paths = target.paths() + ([target.record] if target.record is not None else [])
        written = ", ".join(map(str, paths)) or "nothing written"
        verdicts = describe_quality({side: r.stats[side].get("quality") for side in ("right", "left")})
        console.print(f"{r.name}: {describe_sides(r.stats)}{f' [quality: {verdicts}]' if verdicts else ''}; {r.slices} slices in {j['timings_s']['wall']:.2f} s "
                      f"({j['slices_per_s']} slices/s) -> {written}", markup=False)
    if stats is not None:
        doc = {"qnkit": version, "model": str(bundle.path), "backend": desc,
               "threshold": bundle.threshold, "hu_window": list(bundle.hu_window),
               "cases": [doc["case"] for doc in current] + [r.to_json() for r in results] + [
                   {"name": c.name, "input": str(c.image), "error": " ".join(str(e).split())} for c, e in failures]}
        write_text_atomic(stats, json.dumps(doc, indent=1, default=str) + "\n")
    wrote_stats = f"; stats -> {stats}" if stats is not None else ""
    line = backend_line or f"backend {desc['name']} ({desc['precision']}, {desc['device']}, {_batch_words(desc)})"
    if not quiet:
        console.print(f"{line}; {len(results)} case(s) segmented" + (f", {len(failures)} failed" if failures else "")
                      + (f", {len(current)} up to date" if current else "") + wrote_stats, markup=False)
    elif wrote_stats:
        console.print(f"stats -> {stats}", markup=False)


def _batch_words(desc: dict) -> str:
    """The batch a backend ran (:func:`qnkit.backends.base.batch_words`) from its ``describe()``."""
    from qnkit.backends.base import batch_words

    asked = desc.get("batch_size")
    return batch_words(asked, desc.get("slices_per_call") or asked, desc.get("name"), desc.get("concurrent_runs") or 1)
