"""Segment many CT cases: the one loop that `qnkit segment`, `qnkit listen` and a cluster runner share.

:func:`resolve_cases` turns what a user names (NIfTI files, KiTS19 case folders, DICOM folders, zips of
DICOM, folders of these) into cases; :func:`plan_outputs` decides and checks every output path per
case and format (NIfTI mask, DICOM SEG, RTSTRUCT, preview PNG); :func:`segment_many` loads, segments
and writes each case, all of its outputs or none, and returns per-case results and failures.

Resumable runs (``qnkit segment --resume``, always with ``--ray``): each case also gets a record,
``<name>_kidneys.json`` beside its mask, written last. It holds the case's stats (as in ``--stats``),
the SHA-256 of the input and of every output, the bundle's ``manifest_sha256`` and the options.
:func:`resume_plan` skips a case whose record and outputs verify against all of these, redoes one
whose record is stale, and refuses outputs that no record vouches for (unless ``force``).

A Python user::

    from qnkit.batch import resolve_cases, plan_outputs, segment_many
    from qnkit.bundle import load_bundle
    from qnkit.segment import SegmentOptions
    cases, batch = resolve_cases([Path("ct_folder")])
    outputs = plan_outputs(cases, batch, formats=("nifti", "seg"))
    done = segment_many(cases, load_bundle("bundle"), SegmentOptions(), outputs=outputs)
    done.results, done.failures
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from qnkit import segment as S
from qnkit.errors import QnkitInputError

__all__ = ["FORMATS", "CaseOutputs", "BatchResult", "BackendUnavailable", "parse_formats", "is_dicom_case",
           "resolve_cases", "plan_outputs", "load_case", "segment_many", "input_sha256", "record_path",
           "read_record", "check_record", "resume_plan", "progress_bar", "RECORD_FORMAT"]

FORMATS = ("nifti", "seg", "rtstruct")
SEG_SUFFIX = "_kidneys_seg.dcm"
RTSTRUCT_SUFFIX = "_kidneys_rtstruct.dcm"
RECORD_FORMAT = "qnkit-case-record"
RECORD_VERSION = 1


class BackendUnavailable(Exception):
    """The asked-for backend cannot run here: stops the whole batch (exit 2), not just one case."""


@dataclass
class CaseOutputs:
    """Where one case's outputs go (None: not written)."""

    nifti: Path | None = None
    seg: Path | None = None
    rtstruct: Path | None = None
    preview: Path | None = None
    record: Path | None = None  # the case's record (resumable runs); not one of paths(), written last

    def paths(self) -> list[Path]:
        return [p for p in (self.nifti, self.seg, self.rtstruct, self.preview) if p is not None]


@dataclass
class BatchResult:
    """Per-case results (:class:`qnkit.segment.CaseResult`) and failures ``(case, exception)``."""

    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # case name -> CaseOutputs actually written
    # (case name, path, why) of optional outputs (previews) that failed; those cases' masks were kept
    missing: list = field(default_factory=list)


def parse_formats(text: str | None, cases) -> dict[str, tuple[str, ...]]:
    """``--format nifti,seg,rtstruct`` per case; default nifti for NIfTI inputs, seg for DICOM inputs."""
    out = {}
    asked = None
    if text is not None and text.strip():
        asked = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
        bad = [f for f in asked if f not in FORMATS]
        if bad or not asked:
            raise QnkitInputError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    for case in cases:
        formats = asked or (("seg",) if is_dicom_case(case) else ("nifti",))
        if not is_dicom_case(case) and set(formats) - {"nifti"}:
            raise QnkitInputError(f"{case.image}: --format {','.join(formats)} needs a DICOM input (SEG and "
                                  f"RTSTRUCT reference the source series); this input is NIfTI")
        out[case.name] = formats
    return out


def is_dicom_case(case) -> bool:
    """True when a case's input is a DICOM folder or a zip of DICOM files (else it is a NIfTI file)."""
    image = Path(case.image)
    return image.is_dir() or image.suffix.lower() == ".zip"


def resolve_cases(inputs: Iterable[Path]) -> tuple[list, bool]:
    """Expand inputs into cases; returns (cases, batch_mode).

    As :func:`qnkit.segment.resolve_inputs`, plus DICOM: a ``.zip`` is one case; a folder without NIfTI
    images or KiTS19 case folders is a batch of the ``.zip`` files in it, or else (DICOM files at any
    depth) one DICOM case named after the folder.
    """
    from qnkit.dicom.series import is_dicom_folder

    inputs = [Path(p) for p in inputs]
    cases: list = []
    batch = len(inputs) > 1
    for path in inputs:
        if path.is_file() and path.suffix.lower() == ".zip":
            cases.append(S.CaseInput(path.stem, path, path))
            continue
        try:
            found, many = S.resolve_inputs([path])
        except QnkitInputError:
            if not path.is_dir():
                raise
            zips = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".zip")
            if zips:
                batch = True
                cases.extend(S.CaseInput(z.stem, z, z) for z in zips)
            elif is_dicom_folder(path):
                cases.append(S.CaseInput(path.resolve().name, path, path))
            else:
                raise QnkitInputError(f"{path}: no NIfTI images, KiTS19 case folders, DICOM files or .zip files "
                                      f"in this folder") from None
            continue
        cases.extend(found)
        batch = batch or many
    clash = [c.image for c in cases if sum(o.name == c.name for o in cases) > 1]
    if clash:
        raise QnkitInputError(f"two inputs have the same name ({clash[0]} and {clash[1]}); their outputs would "
                              f"collide")
    return cases, batch


def _case_outputs(case, formats, out: Path | None, batch: bool) -> CaseOutputs:
    """Output paths of one case: NIfTI as :func:`qnkit.segment.output_path` (a DICOM input's go beside
    its folder or zip, never into it); SEG and RTSTRUCT beside the NIfTI name."""
    from qnkit import io as qio

    if is_dicom_case(case) and out is None:
        nifti = case.source.parent / (case.name + S.MASK_SUFFIX)
    else:
        nifti = S.output_path(case, out, batch)
    base = nifti.parent / (nifti.name[: -len(".nii.gz")] if nifti.name.endswith(".nii.gz") else nifti.stem)
    if qio.is_nifti_path(nifti) and str(base).endswith(S.MASK_SUFFIX[: -len(".nii.gz")]):
        stem = str(base)[: -len(S.MASK_SUFFIX[: -len(".nii.gz")])]
        seg, rt = Path(stem + SEG_SUFFIX), Path(stem + RTSTRUCT_SUFFIX)
    else:  # --out NAME.nii.gz for a single input
        seg, rt = Path(f"{base}_seg.dcm"), Path(f"{base}_rtstruct.dcm")
    return CaseOutputs(nifti=nifti if "nifti" in formats else None, seg=seg if "seg" in formats else None,
                       rtstruct=rt if "rtstruct" in formats else None)


def record_path(nifti: Path) -> Path:
    """A case's record beside its (planned) NIfTI mask: ``X_kidneys.nii.gz`` -> ``X_kidneys.json``."""
    name = nifti.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return nifti.with_name(name[: -len(suffix)] + ".json")
    return nifti.with_suffix(".json")


def plan_outputs(cases, batch: bool, *, out: Path | None = None, formats: str | None = None,
                 stats: Path | None = None, preview: Path | None = None, force: bool = False,
                 records: bool = False) -> dict:
    """Outputs per case name (:class:`CaseOutputs`), checked before any work: not an input, not
    existing (unless ``force``), not a folder, no two alike, folders writable. ``stats`` is only checked.
    ``records``: plan each case's record too (resumable runs; pass ``force=True`` and let
    :func:`resume_plan` decide about existing outputs)."""
    from qnkit import io as qio

    if out is not None and any(_inside(out, c.image) for c in cases):
        raise QnkitInputError(f"--out {out}: refusing to write into a DICOM input folder; choose another place")
    if out is not None and (out.is_dir() or not qio.is_nifti_path(out)):
        if out.exists() and not out.is_dir():
            raise QnkitInputError(f"--out {out} exists and is not a folder or a NIfTI file name")
        S.check_writable_folder(out, create=True)
    per_case = parse_formats(formats, cases)
    plan = {c.name: _case_outputs(c, per_case[c.name], out, batch) for c in cases}
    if records:
        for c in cases:
            plan[c.name].record = record_path(_case_outputs(c, ("nifti",), out, batch).nifti)
    if preview is not None:
        if preview.suffix.lower() != ".png":
            raise QnkitInputError(f"--preview {preview}: expected a .png file name")
        for c in cases:
            plan[c.name].preview = preview if not batch else preview.with_name(f"{preview.stem}_{c.name}.png")
    if stats is not None and stats.suffix.lower() != ".json":
        raise QnkitInputError(f"--stats {stats}: expected a .json file name")
    inputs = [c.image for c in cases]
    every = [p for o in plan.values() for p in o.paths()] + ([stats] if stats is not None else [])
    every += [o.record for o in plan.values() if o.record is not None]
    for path in every:
        if any(S.same_file(path, i) for i in inputs):
            raise QnkitInputError(f"{path}: refusing to write over an input file")
        if any(_inside(path, i) for i in inputs):
            raise QnkitInputError(f"{path}: refusing to write into a DICOM input folder; choose --out elsewhere")
        if path.is_dir():
            raise QnkitInputError(f"{path} is a folder, not a file name")
        if path.exists() and not force:
            raise QnkitInputError(f"{path} exists; pass --force to replace it")
    if len(set(map(str, every))) != len(every):
        raise QnkitInputError("two outputs would have the same file name; choose other --out/--stats/--preview")
    for folder in sorted({p.parent for p in every}, key=str):
        S.check_writable_folder(folder)
    return plan


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` lies inside the input folder ``folder`` (a DICOM input is never written into)."""
    try:
        return Path(folder).is_dir() and Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def load_case(case, *, series: str | None = None, log: Callable[[str], None] | None = None):
    """(CT internal layout, Geometry, seconds, DICOM source or None) for a NIfTI or DICOM case."""
    if not is_dicom_case(case):
        return (*S.load_case(case), None)
    from qnkit.dicom.series import load_series

    t = time.perf_counter()
    ct, geometry, source = load_series(case.image, series, log=log)
    return ct, geometry, time.perf_counter() - t, source


def _write_dicom(result, source, outputs: CaseOutputs, bundle, overwrite: bool) -> None:
    from qnkit.dicom.output import algorithm_of

    algorithm = algorithm_of(bundle)
    if outputs.seg is not None:
        from qnkit.dicom.seg import write_seg

        write_seg(result.sides, result.geometry, source, outputs.seg, algorithm=algorithm, overwrite=overwrite,
                  quality=_quality_of(result))
    if outputs.rtstruct is not None:
        from qnkit.dicom.rtstruct import write_rtstruct

        write_rtstruct(result.sides, result.geometry, source, outputs.rtstruct, algorithm=algorithm,
                       overwrite=overwrite)


def _quality_of(result) -> dict | None:
    """{"right": verdict or None, "left": ...} of a result segmented with quality on; None without."""
    quality = {side: (result.stats.get(side) or {}).get("quality") for side in ("right", "left")}
    return quality if any(q is not None for q in quality.values()) else None


def _write_preview(result, path: Path, bundle, name: str) -> None:
    from qnkit._atomic import write_bytes_atomic
    from qnkit.preview import render_preview
    from qnkit.report import describe_sides

    samples = result.samples if result.samples is not None and result.samples.count else None  # the mirror pass alone: 0 everywhere
    png = render_preview(result.ct, result.sides, result.spacing, window=bundle.hu_window,
                         title=f"{name}: {describe_sides(result.stats)}", quality=_quality_of(result),
                         uncertainty=None if samples is None else samples.uncertainty_on_grid(result.sides.shape))
    write_bytes_atomic(path, png)


def _preview_or_warning(result, target: CaseOutputs, bundle, name: str, done: BatchResult, say) -> CaseOutputs:
    """Write a case's preview PNG. A preview is optional: when it fails, the case's masks (what the
    inference was for) are kept, the failure is said in one warning line and recorded in ``done.missing``
    (the command's exit code then says so). Returns the case's outputs as written."""
    import dataclasses

    try:
        _write_preview(result, target.preview, bundle, name)
        return target
    except Exception as exc:  # noqa: BLE001 - any failure of an optional output leaves the masks alone
        why = " ".join((str(exc) if isinstance(exc, QnkitInputError) else f"{type(exc).__name__}: {exc}").split())
        say(f"qnkit: warning: {name}: preview {target.preview} not written ({why}); the mask is kept")
        done.missing.append((name, target.preview, why))
        return dataclasses.replace(target, preview=None)


def input_sha256(path: Path) -> str:
    """SHA-256 of an input: a file's bytes, or a folder's files (relative names and bytes, sorted)."""
    import hashlib

    from qnkit.bundle import sha256_file

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def _options_json(options, series) -> dict:
    import dataclasses
    import json

    return json.loads(json.dumps({**dataclasses.asdict(options), "series": series}))


def _write_record(target: CaseOutputs, result, case, bundle, options, series, input_digest: str,
                  extra: dict | None) -> None:
    import json

    from qnkit import __version__ as version
    from qnkit._atomic import write_text_atomic
    from qnkit.bundle import MANIFEST_KEY, sha256_file

    doc = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "qnkit": version,
           "input": {"path": str(case.image), "sha256": input_digest},
           "model": {"path": str(bundle.path), "manifest_sha256": bundle.metadata.get(MANIFEST_KEY)},
           "options": _options_json(options, series),
           "outputs": {str(Path(p).absolute()): sha256_file(p) for p in target.paths()},
           **(extra or {}), "case": result.to_json()}
    write_text_atomic(target.record, json.dumps(doc, indent=1, default=str) + "\n")


def read_record(path: Path) -> dict | None:
    """A case record (``<name>_kidneys.json``), or None when it is missing or not one."""
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT else None


def check_record(case, target: CaseOutputs, manifest: str, options, series=None) -> str | None:
    """Why ``case`` must be segmented again (None: its outputs exist and verify against its record:
    same input bytes, same bundle manifest, same options, every output present with its recorded hash)."""
    from qnkit.bundle import sha256_file

    doc = read_record(target.record) if target.record is not None else None
    if doc is None:
        return "no record"
    if doc.get("version") != RECORD_VERSION:
        return "record of another version"
    if (doc.get("model") or {}).get("manifest_sha256") != manifest:
        return "the model changed"
    if doc.get("options") != _options_json(options, series):
        return "the options changed"
    recorded = doc.get("outputs") or {}
    if set(recorded) != {str(Path(p).absolute()) for p in target.paths()}:
        return "other outputs were asked for"
    for path, digest in recorded.items():
        try:
            if sha256_file(path) != digest:
                return f"{path} changed since it was written"
        except OSError:
            return f"{path} is missing"
    try:
        if input_sha256(case.image) != (doc.get("input") or {}).get("sha256"):
            return "the input changed"
    except OSError as exc:
        return f"the input is unreadable ({exc.strerror or exc})"
    return None


def resume_plan(cases, plan: dict, bundle, options, *, series=None, force: bool = False,
                threads: int = 4) -> tuple[list, list]:
    """(cases to segment, records of cases up to date) for a resumable run over ``plan`` (with records).

    A case is up to date when :func:`check_record` finds nothing to redo; ``force`` redoes every case.
    An existing output without a record of the case, or whose record does not name it with its hash,
    was not written by a resumable run: refused (QnkitInputError) unless ``force``. Hashes are taken
    on ``threads`` threads (hashlib releases the GIL; inputs are often on network storage).
    """
    from concurrent.futures import ThreadPoolExecutor

    from qnkit.bundle import MANIFEST_KEY

    if force:
        return list(cases), []
    manifest = bundle.metadata.get(MANIFEST_KEY)

    def classify(case):
        target = plan[case.name]
        existing = [p for p in target.paths() if p.exists()]
        doc = read_record(target.record) if target.record is not None else None
        if doc is None:
            if existing:
                raise QnkitInputError(f"{existing[0]} exists and no record {target.record} vouches for it "
                                      f"(not written by a resumable run); pass --force to replace it")
            if target.record is not None and target.record.exists():
                raise QnkitInputError(f"{target.record} exists and is not a qnkit case record; pass --force "
                                      f"to replace it")
            return case, "new", None
        ours = doc.get("outputs") or {}
        for p in existing:
            if str(Path(p).absolute()) not in ours:
                raise QnkitInputError(f"{p} exists and its case's record {target.record} does not name it; "
                                      f"pass --force to replace it")
        why = check_record(case, target, manifest, options, series)
        return case, why, doc

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        checked = list(pool.map(classify, cases))
    todo = [case for case, why, _ in checked if why is not None]
    current = [doc for _, why, doc in checked if why is None]
    return todo, current


def progress_bar(console, progress: bool):
    """The batch progress bar (cases, then the current case's slices), the same for local and Ray runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not progress or console is None or not console.is_terminal,
                    transient=True)  # in a file (not a terminal) a bar would leave an empty line before the rest


def _open_default(bundle, backend: str):
    from qnkit.backends import open_backend

    try:
        return open_backend(bundle, backend)
    except QnkitInputError as exc:
        raise BackendUnavailable(str(exc)) from None


def segment_many(cases, bundle, options=None, *, outputs: dict | None = None, predict=None, backend: str = "auto",
                 series: str | None = None, overwrite: bool = False, stop_on_error: bool = False,
                 progress: bool = False, console=None, log: Callable[[str], None] | None = None,
                 record_extra: dict | None = None) -> BatchResult:
    """Segment every case and write its outputs (all of them, or none); returns a :class:`BatchResult`.

    ``outputs``: case name -> :class:`CaseOutputs` (default: nothing written, results only).
    ``predict``: a backend's ``predict(x)``; default: ``backend`` of the bundle, opened at the first
    case that loads and closed at the end. A :class:`BackendUnavailable` from it stops the batch (as a
    QnkitInputError). ``series``: the SeriesInstanceUID to read from DICOM inputs with several series.
    A failing case is logged (``log``, or ``console``) and the rest go on, unless ``stop_on_error``,
    when its exception propagates. A case whose :class:`CaseOutputs` has a ``record`` gets it written
    after its outputs (the input's hash taken before it is read; ``record_extra`` merged in).
    """
    options = options or S.SegmentOptions()
    outputs = outputs or {}
    say = log or ((lambda m: console.print(m, markup=False)) if console is not None else (lambda m: None))
    opened: list = []

    def backend_predict(x, keep=None):
        """The network on slices x; with Dropout2d masks `keep`, a Monte-Carlo sample (qnkit.uncertainty)."""
        if predict is not None:
            return predict(x) if keep is None else predict(x, keep)
        if not opened:
            opened.append(_open_default(bundle, backend))
        if keep is None:
            return opened[0].predict(x)
        if len(opened) < 2:
            from qnkit.backends import open_sampler

            opened.append(open_sampler(bundle, opened[0], log=say))
        return opened[1].predict(x, keep)

    done = BatchResult()
    bar = progress_bar(console, progress)
    try:
        with bar:
            cases_task = bar.add_task("cases", total=len(cases), visible=len(cases) > 1)
            slices_task = bar.add_task("slices", total=None)
            for case in cases:
                bar.update(slices_task, description=f"{case.name} slices", completed=0, total=None)
                target = outputs.get(case.name) or CaseOutputs()
                existed = {p for p in target.paths() if p.exists()}
                try:
                    digest = input_sha256(case.image) if target.record is not None else None
                    ct, geometry, seconds, source = load_case(case, series=series, log=say)
                    if source is not None and (target.seg or target.rtstruct):
                        from qnkit.dicom.output import check_referable

                        check_referable(source)  # before the slow part
                    keep = source is not None or target.preview is not None or options.keep_samples
                    try:
                        result = S.segment_file(
                            case, target.nifti, backend_predict, bundle=bundle, options=options, overwrite=overwrite,
                            keep_arrays=keep, loaded=(ct, geometry, seconds),
                            progress=lambda n, total: bar.update(slices_task, completed=n, total=total))
                        del ct
                        if source is not None:
                            _write_dicom(result, source, target, bundle, overwrite)
                        if target.preview is not None:
                            target = _preview_or_warning(result, target, bundle, case.name, done, say)
                        if target.record is not None:
                            _write_record(target, result, case, bundle, options, series, digest, record_extra)
                    except BaseException:
                        for p in target.paths():  # all of a case's outputs, or none
                            if p not in existed:
                                p.unlink(missing_ok=True)
                        raise
                    result.ct = result.sides = None
                    if not options.keep_samples:  # --uncertainty-map needs both after the batch
                        result.geometry = result.samples = None
                    done.results.append(result)
                    done.outputs[case.name] = target
                except BackendUnavailable as exc:
                    raise QnkitInputError(str(exc)) from None
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - batch mode reports and goes on
                    if stop_on_error:
                        raise
                    done.failures.append((case, exc))
                    why = str(exc) if isinstance(exc, QnkitInputError) else f"{type(exc).__name__}: {exc}"
                    say(f"qnkit: {case.name} failed: {' '.join(why.split())}")
                bar.advance(cases_task)
    finally:
        for engine in {id(e): e for e in opened}.values():
            engine.close()
    return done
