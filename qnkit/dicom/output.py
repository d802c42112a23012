"""What the DICOM writers (SEG, RTSTRUCT) share: the kidney codes, the model's identity, the checks
that a source series can be referenced, and atomic writing that never replaces an input."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qnkit import __version__
from qnkit.dicom.series import DicomError, DicomSeries
from qnkit.postprocess import LEFT, RIGHT

__all__ = ["Kidney", "KIDNEYS", "Algorithm", "algorithm_of", "check_referable", "save_dataset"]


@dataclass(frozen=True)
class Kidney:
    """One output segment / ROI: its label value in the sides volume and its SNOMED CT code."""

    value: int
    name: str
    snomed: str
    meaning: str
    color: tuple  # RGB 0..255, for RTSTRUCT ROI display


KIDNEYS = (Kidney(RIGHT, "Right kidney", "9846003", "Right kidney", (0, 151, 206)),
           Kidney(LEFT, "Left kidney", "18639004", "Left kidney", (216, 101, 79)))


@dataclass(frozen=True)
class Algorithm:
    """Who made the segmentation: qnkit, its version and the model bundle's hash."""

    name: str
    version: str
    model_sha256: str


def algorithm_of(bundle) -> Algorithm:
    """The Algorithm record of a loaded bundle (hash of its ``qnkit.json``, which lists every artefact's hash)."""
    from qnkit.bundle import METADATA_NAME, sha256_file

    meta = Path(bundle.path) / METADATA_NAME
    digest = sha256_file(meta) if meta.is_file() else hashlib.sha256(repr(bundle.metadata).encode()).hexdigest()
    return Algorithm("qnkit", __version__, digest)


def check_referable(source: DicomSeries) -> None:
    """Refuse a source series whose UIDs a derived object must reference but that are missing."""
    first = source.headers[0]
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(getattr(first, name, "") or "").strip():
            raise DicomError(f"{source.path}: the source series has no {name}, so a DICOM SEG or RTSTRUCT cannot "
                             f"reference it (anonymised too far?); write NIfTI with --format nifti")


def save_dataset(ds, path: Path, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write a dataset as a DICOM Part-10 file atomically; never over an existing file (unless
    ``overwrite``) nor over an input."""
    from qnkit._atomic import atomic_path
    from qnkit.segment import same_file

    path = Path(path)
    if any(same_file(path, i) for i in inputs):
        raise DicomError(f"{path}: refusing to write over an input file")
    if path.exists() and not overwrite:
        raise DicomError(f"{path} exists; pass --force to replace it")
    with atomic_path(path, overwrite=overwrite) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
