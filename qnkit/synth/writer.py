"""Writing synthetic cases to disk in the KiTS19 layout, from either generator, in parallel if asked."""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from qnkit.errors import QnkitInputError

from .classic import (DESCRIP, HARD_NEGATIVES_NAME, IMAGING_NAME, KITS_JSON, SEGMENTATION_NAME, SynthCase,
                      _check_int, _check_kidneys, _check_size, _source_cases, make_case)

GENERATORS = ("classic", "anatomy")
def _nifti(data: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(affine, code=0)
    hdr.set_xyzt_units(0, 0)
    hdr["descrip"] = DESCRIP
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.header.set_sform(affine, code=2)
    img.header.set_qform(affine, code=0)
    return img


def write_case(case: SynthCase, out_dir: Path) -> Path:
    """Write ``out_dir/case_id/{imaging,segmentation}.nii.gz`` and, for a case that has them,
    ``hard_negatives.nii.gz`` (each atomically); return the case folder."""
    import nibabel as nib

    from qnkit._atomic import atomic_path

    folder = Path(out_dir) / case.case_id
    if folder.exists() and not folder.is_dir():
        raise QnkitInputError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [(IMAGING_NAME, case.imaging), (SEGMENTATION_NAME, case.segmentation)]
    if case.hard_negatives is not None:
        arrays.append((HARD_NEGATIVES_NAME, case.hard_negatives))
    else:
        (folder / HARD_NEGATIVES_NAME).unlink(missing_ok=True)  # an earlier version's, not this case's
    for name, data in arrays:
        with atomic_path(folder / name) as tmp:
            nib.save(_nifti(data, case.affine), str(tmp))
    return folder


def _written_by_synth(path: Path) -> bool:
    import nibabel as nib

    try:
        return bytes(nib.load(str(path)).header["descrip"].item()).startswith(DESCRIP)
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return False


def _check_out_dir(out_dir: Path, labels_from, indices) -> Path:
    """Refuse an output that is a file, the --labels-from folder, or that holds data not written here."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QnkitInputError(f"output {out_dir} exists and is not a folder")
    if not out_dir.exists():
        return out_dir
    if labels_from is not None and Path(labels_from).exists() and os.path.samefile(out_dir, labels_from):
        raise QnkitInputError(f"output folder {out_dir} is the --labels-from folder; refusing to overwrite it")
    kits = out_dir / KITS_JSON
    if kits.exists():
        try:
            data = json.loads(kits.read_text(encoding="utf-8"))
            ours = isinstance(data, list) and all(isinstance(e, dict) and e.get("synthetic") is True for e in data)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise QnkitInputError(f"{kits} exists and was not written by qnkit synth; refusing to overwrite it")
    for i in indices:
        folder = out_dir / f"case_{i:05d}"
        if folder.exists() and not folder.is_dir():
            raise QnkitInputError(f"{folder} exists and is not a folder")
        for name in (IMAGING_NAME, SEGMENTATION_NAME, HARD_NEGATIVES_NAME):
            path = folder / name
            if path.exists() and not _written_by_synth(path):
                raise QnkitInputError(
                    f"{path} exists and was not written by qnkit synth; refusing to overwrite it (choose another OUT_DIR)"
                )
    return out_dir


def _make(i: int, *, generator: str, size: int, seed: int, labels_from, kidneys: str, pixel_range,
          anatomy_version: int, phase_weights) -> SynthCase:
    if generator == "anatomy":
        from .case import make_anatomy_case

        return make_anatomy_case(i, seed=seed, labels_from=labels_from, pixel_range=pixel_range, max_size=size,
                                 version=anatomy_version, phase_weights=phase_weights)
    return make_case(i, size=size, seed=seed, labels_from=labels_from, kidneys=kidneys)


def _make_and_write(i: int, out_dir: Path, **kwargs) -> tuple[Path, dict]:
    case = _make(i, **kwargs)
    return write_case(case, out_dir), case.kits_entry()


def write_dataset(
    out_dir,
    *,
    cases: int,
    size: int = 512,
    seed: int = 0,
    labels_from=None,
    progress: bool = True,
    kidneys: str = "both",
    generator: str = "classic",
    pixel_range: tuple[float, float] | None = None,
    workers: int = 1,
    anatomy_version: int | None = None,
    phase_weights=None,
    only: list[int] | None = None,
) -> list[Path]:
    """Write `cases` synthetic cases and ``kits.json`` into `out_dir`; return the case folders.

    ``generator="anatomy"`` draws each case's pixel size from `pixel_range` (mm) and caps its
    in-plane size at `size`, with anatomy recipe `anatomy_version` (default: the newest) and contrast
    phases drawn by `phase_weights` (default :data:`.appearance.PHASE_P`);
    ``classic`` makes `size` x `size` slices. Cases are seeded by
    ``(seed, index)`` only, so `workers` processes give the same bytes as one, and `only` (indices below
    `cases`) writes just those cases of the set, byte for byte: a held-out subset without the rest.
    """
    from qnkit._atomic import write_text_atomic

    from .case import DEFAULT_PIXEL_RANGE, check_anatomy_options

    cases = _check_int("cases", cases, 1)
    size = _check_size(size)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1)
    kidneys = _check_kidneys(kidneys)
    if generator not in GENERATORS:
        raise QnkitInputError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
    if generator == "anatomy" and kidneys != "both":
        raise QnkitInputError("--kidneys is for the classic generator (the anatomy generator draws one-kidney "
                              "patients itself)")
    pixel_range = tuple(pixel_range) if pixel_range is not None else DEFAULT_PIXEL_RANGE
    if generator != "anatomy" and (anatomy_version is not None or phase_weights is not None):
        raise QnkitInputError("--anatomy-version and --phases are for the anatomy generator")
    anatomy_version, phase_p = check_anatomy_options(anatomy_version, phase_weights)
    if len(pixel_range) != 2 or not (0.3 <= pixel_range[0] <= pixel_range[1] <= 10):
        raise QnkitInputError(f"pixel range must be two sizes in mm, 0.3 <= lo <= hi <= 10, got {pixel_range}")
    indices = list(range(cases)) if only is None else sorted({int(i) for i in only})
    if not indices or indices[0] < 0 or indices[-1] >= cases:
        raise QnkitInputError(f"case indices must lie in [0, {cases}), got {only}")
    if labels_from is not None:
        _source_cases(labels_from)
    out_dir = _check_out_dir(Path(out_dir), labels_from, indices)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QnkitInputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None

    job = partial(_make_and_write, out_dir=out_dir, generator=generator, size=size, seed=seed,
                  labels_from=labels_from, kidneys=kidneys, pixel_range=pixel_range, anatomy_version=anatomy_version,
                  phase_weights=phase_p)
    results: dict[int, tuple[Path, dict]] = {}
    bar = task = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True), transient=False)
        bar.start()
        task = bar.add_task("synth", total=len(indices))
    try:
        if workers == 1:
            for i in indices:
                results[i] = job(i)
                if bar is not None:
                    bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(indices), os.cpu_count() or 1)) as pool:
                for i, result in zip(indices, pool.map(job, indices)):
                    results[i] = result
                    if bar is not None:
                        bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    entries = [results[i][1] for i in indices]
    write_text_atomic(out_dir / KITS_JSON, json.dumps(entries, indent=2) + "\n")
    return [results[i][0] for i in indices]
