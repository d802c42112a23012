"""Read one CT series from a folder of DICOM files (any nesting) or a ``.zip`` of one.

The series becomes a volume in qnkit's internal layout with a :class:`qnkit.io.Geometry` whose file
layout is the one SimpleITK and dcm2niix-style converters give: x = DICOM column, y = DICOM row,
z = slices sorted by their position along the slice normal (ascending), with the LPS→RAS affine
built from ImageOrientationPatient, ImagePositionPatient and PixelSpacing. So a NIfTI written for a
DICOM input lies exactly on the grid a converter would give.

Rules (each refusal is one :class:`DicomError` line):
- only CT images count (Modality CT); SR, PR, RTSTRUCT, SEG and other non-image objects are ignored;
- several CT series: ``series_uid`` chooses, else the one with the most slices (said through ``log``);
- one frame of reference, one orientation, one size and pixel spacing;
- slices are sorted by position along the normal, never by file name or InstanceNumber;
- refused: duplicate or missing slices, slice gaps differing by more than ``GAP_TOLERANCE``, gantry
  tilt (positions sheared off the normal), no pixel data, undecodable pixel data;
- RescaleSlope/RescaleIntercept are applied per slice (HU out).
Enhanced (and legacy-converted) multi-frame CT is read frame by frame from its functional groups.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from qnkit.errors import QnkitInputError
from qnkit.io import Geometry

__all__ = ["DicomError", "DicomSeries", "SeriesInfo", "is_dicom_zip", "is_dicom_folder", "scan_series",
           "load_series", "GAP_TOLERANCE"]

#: Largest allowed deviation of a slice gap from the median gap, as a fraction of it.
GAP_TOLERANCE = 0.05
#: Largest allowed in-plane drift of slice positions off the slice normal, as a fraction of a pixel.
SHEAR_TOLERANCE = 0.05
ORIENTATION_TOLERANCE = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NON_IMAGE_MODALITIES = {"SR", "PR", "RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "KO", "REG", "DOC", "FID",
                        "AU", "ECG", "PLAN", "RWV"}


class DicomError(QnkitInputError):
    """A DICOM input that cannot be used as a CT volume (message names the input)."""


@dataclass
class Instance:
    """One DICOM file: where it is (a path, or a member of a zip) and its header (no pixel data)."""

    locator: str
    header: object  # pydicom Dataset
    read: Callable[[], object] = field(repr=False)  # the full dataset, pixels included


@dataclass
class SeriesInfo:
    """One series found in an input: its UID, modality, description and instances."""

    uid: str
    modality: str
    description: str
    instances: list

    @property
    def frames(self) -> int:
        return sum(int(getattr(i.header, "NumberOfFrames", 1) or 1) for i in self.instances)

    def label(self) -> str:
        return f"{self.uid or '(no SeriesInstanceUID)'} ({self.frames} slices, {self.description or 'no description'})"


@dataclass
class DicomSeries:
    """A loaded CT series: its source headers and, for each slice of the sorted stack, its frame.

    ``frames[k] = (instance index, frame index)`` for slice ``k`` of the stack sorted ascending along
    the normal (file layout z = k); frame index is 0 for single-frame instances.
    """

    path: Path
    uid: str
    headers: list
    frames: list
    multiframe: bool
    positions: np.ndarray  # (z, 3) ImagePositionPatient (LPS mm) of each sorted slice
    orientation: np.ndarray  # ImageOrientationPatient (row direction, column direction)
    pixel_spacing: tuple  # PixelSpacing (between rows, between columns), mm

    @property
    def study_uid(self) -> str:
        return str(getattr(self.headers[0], "StudyInstanceUID", "") or "")

    @property
    def frame_of_reference_uid(self) -> str:
        return str(getattr(self.headers[0], "FrameOfReferenceUID", "") or "")

    def stack_to_frames(self, stack: np.ndarray) -> list[np.ndarray]:
        """Per source instance, its frames ``(n_frames, rows, cols)`` from a sorted ``(z, rows, cols)`` stack."""
        out = [np.zeros((int(getattr(h, "NumberOfFrames", 1) or 1), *stack.shape[1:]), dtype=stack.dtype)
               for h in self.headers]
        for k, (inst, frame) in enumerate(self.frames):
            out[inst][frame] = stack[k]
        return out


# --- finding files -----------------------------------------------------------------------------


def is_dicom_zip(path: Path) -> bool:
    """True for a ``.zip`` file (its members are checked when it is read)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".zip" and zipfile.is_zipfile(path)


def _has_dicm(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_folder(path: Path, limit: int = 10000) -> bool:
    """True when a DICOM Part-10 file lies anywhere under ``path`` (first ``limit`` files looked at)."""
    for n, file in enumerate(f for f in sorted(Path(path).rglob("*")) if f.is_file()):
        if n >= limit:
            break
        try:
            with open(file, "rb") as fh:
                if _has_dicm(fh.read(132)):
                    return True
        except OSError:
            continue
    return False


def _sources(path: Path):
    """(locator, opener) for every candidate file of a folder (recursive, sorted) or a zip."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                yield str(file.relative_to(path)), (lambda f=file: open(f, "rb"))
    elif is_dicom_zip(path):
        try:
            archive = zipfile.ZipFile(path)
            names = [i.filename for i in archive.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise DicomError(f"{path}: unreadable zip file ({exc})") from None
        for name in sorted(names):
            yield name, (lambda n=name: io.BytesIO(archive.read(n)))
    else:
        raise DicomError(f"{path}: not a folder or a .zip of DICOM files")


def _uid(ds, name: str, meta_name: str | None = None) -> str:
    """A UID attribute, falling back to the file meta's copy (Part 10 says they are equal) when empty."""
    value = str(getattr(ds, name, "") or "").strip()
    if not value and meta_name is not None:
        meta = getattr(ds, "file_meta", None)
        value = str(getattr(meta, meta_name, "") or "").strip() if meta is not None else ""
    return value


def scan_series(path: Path) -> list[SeriesInfo]:
    """Every image series in ``path`` (headers only); non-image objects and non-DICOM files are skipped."""
    from qnkit.dicom import require

    pydicom = require("pydicom")
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    groups: dict[str, SeriesInfo] = {}
    for locator, opener in _sources(path):
        try:
            with opener() as fh:
                header = pydicom.dcmread(fh, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile):
            continue  # not DICOM (README, DICOMDIR fragments, thumbnails...)
        modality = str(getattr(header, "Modality", "") or "").upper()
        if modality in NON_IMAGE_MODALITIES or "Rows" not in header:
            continue
        for name, meta_name in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(getattr(header, name, "") or "").strip():
                setattr(header, name, _uid(header, name, meta_name))

        def read(o=opener):
            with o() as fh:
                return pydicom.dcmread(fh)

        uid = _uid(header, "SeriesInstanceUID")
        info = groups.setdefault(uid, SeriesInfo(uid, modality, str(getattr(header, "SeriesDescription", "") or ""),
                                                 []))
        info.instances.append(Instance(locator, header, read))
    return list(groups.values())


def _choose(path: Path, found: list[SeriesInfo], series_uid: str | None, log) -> SeriesInfo:
    """The CT series to read: the asked one, or the one with the most slices (said through ``log``)."""
    cts = [s for s in found if s.modality == "CT"]
    if series_uid is not None:
        match = [s for s in found if s.uid == series_uid]
        if not match:
            have = "; ".join(s.label() for s in found) or "none"
            raise DicomError(f"{path}: no series {series_uid} (series here: {have})")
        if match[0].modality != "CT":
            raise DicomError(f"{path}: series {series_uid} is {match[0].modality or 'of no modality'}, not CT")
        return match[0]
    if not cts:
        if not found:
            raise DicomError(f"{path}: no DICOM image files found")
        kinds = ", ".join(sorted({s.modality or "no modality" for s in found}))
        raise DicomError(f"{path}: no CT series (found {kinds} images only)")
    if len(cts) > 1:
        cts.sort(key=lambda s: (-s.frames, s.uid))
        if log is not None:
            log(f"{path}: {len(cts)} CT series: " + "; ".join(s.label() for s in cts)
                + f". Using {cts[0].uid or '(no SeriesInstanceUID)'} (most slices); choose with --series UID")
    return cts[0]


# --- geometry ----------------------------------------------------------------------------------


@dataclass
class _Frame:
    instance: int
    frame: int
    orientation: np.ndarray  # 6 direction cosines
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    spacing: tuple  # PixelSpacing (row spacing, column spacing)
    size: tuple  # (Rows, Columns)
    slope: float
    intercept: float


def _item(ds, sequence: str):
    seq = getattr(ds, sequence, None)
    return seq[0] if seq else None


def _functional(ds, index: int, sequence: str):
    """An enhanced image's functional group item for frame ``index``: per-frame first, then shared."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    for group in ((per_frame[index] if per_frame and index < len(per_frame) else None),
                  (shared[0] if shared else None)):
        item = _item(group, sequence) if group is not None else None
        if item is not None:
            return item
    return None


def _floats(value, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DicomError(f"{where}: missing or invalid {what}")
    return out


def _frames_of(index: int, inst: Instance, where: str) -> list[_Frame]:
    """The frames of one instance with their geometry and rescale (single- or multi-frame)."""
    ds = inst.header
    size = (int(ds.Rows), int(ds.Columns))
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        frames = []
        for f in range(count):
            orient = _functional(ds, f, "PlaneOrientationSequence")
            pos = _functional(ds, f, "PlanePositionSequence")
            meas = _functional(ds, f, "PixelMeasuresSequence")
            value = _functional(ds, f, "PixelValueTransformationSequence")
            if orient is None or pos is None or meas is None:
                raise DicomError(f"{where}: frame {f + 1} has no plane orientation, position or pixel measures")
            frames.append(_Frame(
                index, f, _floats(orient.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
                _floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", where),
                tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing", where)), size,
                float(getattr(value, "RescaleSlope", 1) or 1) if value is not None else 1.0,
                float(getattr(value, "RescaleIntercept", 0) or 0) if value is not None else 0.0))
        return frames
    if count != 1:
        raise DicomError(f"{where}: {count} frames without functional groups (not an enhanced CT)")
    return [_Frame(index, 0, _floats(getattr(ds, "ImageOrientationPatient", None), 6, "ImageOrientationPatient", where),
                   _floats(getattr(ds, "ImagePositionPatient", None), 3, "ImagePositionPatient", where),
                   tuple(_floats(getattr(ds, "PixelSpacing", None), 2, "PixelSpacing", where)), size,
                   float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0))]


def _size(f: _Frame) -> str:
    return f"{f.size[0]}x{f.size[1]} at {f.spacing[0]:g}x{f.spacing[1]:g} mm"


def _check_and_sort(path: Path, frames: list[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Sort frames along the normal after checking one grid; returns (sorted frames, LPS affine)."""
    if len(frames) < 2:
        raise DicomError(f"{path}: the CT series has {len(frames)} slice(s); a volume needs at least 2")
    first = frames[0]
    for f in frames[1:]:
        if np.abs(f.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise DicomError(f"{path}: mixed orientations in one series ({first.orientation.round(4).tolist()} "
                             f"and {f.orientation.round(4).tolist()})")
        if f.size != first.size or not np.allclose(f.spacing, first.spacing, rtol=0, atol=1e-4):
            raise DicomError(f"{path}: mixed sizes in one series ({_size(first)} and {_size(f)})")
    row, col = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{path}: ImageOrientationPatient {first.orientation.tolist()} is not two unit, "
                         f"orthogonal directions")
    normal = np.cross(row, col)
    where = np.array([f.position @ normal for f in frames])
    order = np.argsort(where, kind="stable")
    frames = [frames[i] for i in order]
    where = where[order]
    gaps = np.diff(where)
    if (gaps < 1e-3).any():
        k = int(np.argmax(gaps < 1e-3))
        raise DicomError(f"{path}: duplicate slices at {where[k]:.2f} mm along the slice normal")
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > GAP_TOLERANCE * step
    if off.any():
        k = int(np.argmax(off))
        ratio = gaps[k] / step
        if abs(ratio - round(ratio)) <= GAP_TOLERANCE and round(ratio) >= 2:
            missing = int(sum(round(g / step) - 1 for g in gaps if round(g / step) >= 2))
            raise DicomError(f"{path}: {missing} missing slice(s): gap of {gaps[k]:.2f} mm at {where[k]:.2f} mm "
                             f"where the series steps {step:.2f} mm")
        raise DicomError(f"{path}: uneven slice spacing: gap of {gaps[k]:.2f} mm at {where[k]:.2f} mm where the "
                         f"series steps {step:.2f} mm (tolerance {GAP_TOLERANCE:.0%})")
    positions = np.array([f.position for f in frames])
    rel = positions - positions[0]
    inplane = rel - np.outer(rel @ normal, normal)
    drift = np.linalg.norm(inplane, axis=1)
    if drift.max() > SHEAR_TOLERANCE * min(first.spacing):
        tilt = np.degrees(np.arctan2(drift[-1], where[-1] - where[0]))
        raise DicomError(f"{path}: gantry tilt or sheared geometry (slice positions drift {drift.max():.2f} mm "
                         f"off the slice normal, about {tilt:.1f} degrees); resample it to an orthogonal grid first")
    row_mm, col_mm = first.spacing
    affine = np.eye(4)
    affine[:3, 0] = row * col_mm  # x: along a row, one column per step
    affine[:3, 1] = col * row_mm  # y: down the columns, one row per step
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(frames) - 1)
    affine[:3, 3] = positions[0]
    return frames, affine


def _nifti_header(affine: np.ndarray, shape: tuple) -> nib.Nifti1Header:
    """A NIfTI header as converters write it: qform and sform both 'scanner', millimetres."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_qform(affine, code="scanner")
    header.set_sform(affine, code="scanner")
    header.set_xyzt_units("mm", "sec")
    return header


# --- loading -----------------------------------------------------------------------------------


def _pixels(path: Path, inst: Instance) -> np.ndarray:
    """Decoded stored pixel values of one instance, ``(frames, rows, cols)``."""
    where = f"{path}: {inst.locator}"
    try:
        ds = inst.read()
    except Exception as exc:  # noqa: BLE001 - any reader failure is a damaged file
        raise DicomError(f"{where}: unreadable DICOM file ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError(f"{where}: no pixel data")
    try:
        data = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise DicomError(f"{where}: cannot decode pixel data ({name}: {' '.join(str(exc).split())})") from None
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.shape != (count, int(ds.Rows), int(ds.Columns)):
        raise DicomError(f"{where}: pixel data of shape {data.shape} does not match {count} frame(s) of "
                         f"{ds.Rows}x{ds.Columns}")
    return data


def _hu(stack: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Apply per-slice rescale; integer HU (int16, else int32) when slopes and intercepts are whole."""
    whole = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if whole:
        out = stack.astype(np.int64) * slopes.astype(np.int64)[:, None, None] + intercepts.astype(np.int64)[:, None, None]
        lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
        dtype = np.int16 if -32768 <= lo and hi <= 32767 else np.int32
        return out.astype(dtype)
    return (stack.astype(np.float32) * slopes.astype(np.float32)[:, None, None]
            + intercepts.astype(np.float32)[:, None, None])


def load_series(path: str | Path, series_uid: str | None = None, *,
                log: Callable[[str], None] | None = None) -> tuple[np.ndarray, Geometry, DicomSeries]:
    """Read the CT series of a folder or zip: (CT in the internal layout, its Geometry, its source).

    ``Geometry.source`` is the folder or zip (so no output is ever written over it).
    """
    from qnkit import io as qio

    path = Path(path)
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder")
    chosen = _choose(path, scan_series(path), series_uid, log)
    instances = chosen.instances
    fors = sorted({_uid(i.header, "FrameOfReferenceUID") for i in instances})
    if len(fors) > 1:
        raise DicomError(f"{path}: series {chosen.uid} has {len(fors)} frames of reference ({', '.join(fors)})")
    frames = [f for k, inst in enumerate(instances) for f in _frames_of(k, inst, f"{path}: {inst.locator}")]
    sops = [i.header.SOPInstanceUID for i in instances]
    if len(set(sops)) != len(sops):
        raise DicomError(f"{path}: duplicate slices (the same SOPInstanceUID in {len(sops) - len(set(sops)) + 1} files)")
    frames, affine_lps = _check_and_sort(path, frames)
    decoded = {}
    rows, cols = frames[0].size
    stack = np.empty((len(frames), rows, cols), dtype=np.int64)
    for k, f in enumerate(frames):
        if f.instance not in decoded:
            decoded.clear()  # single-frame: one instance at a time; multi-frame: frames come in runs
            decoded[f.instance] = _pixels(path, instances[f.instance])
        stack[k] = decoded[f.instance][f.frame]
    decoded.clear()
    ct = _hu(stack, np.array([f.slope for f in frames]), np.array([f.intercept for f in frames]))
    del stack
    affine = LPS_TO_RAS @ affine_lps
    shape = (cols, rows, len(frames))  # file layout: x = column, y = row, z = sorted slice
    geometry = Geometry.from_affine(affine, shape, _nifti_header(affine, shape), source=path.resolve())
    internal = qio.to_internal(ct.transpose(2, 1, 0), geometry)
    source = DicomSeries(path=path, uid=chosen.uid, headers=[i.header for i in instances],
                         frames=[(f.instance, f.frame) for f in frames],
                         multiframe=any(int(getattr(i.header, "NumberOfFrames", 1) or 1) > 1 for i in instances),
                         positions=np.array([f.position for f in frames]), orientation=frames[0].orientation,
                         pixel_spacing=frames[0].spacing)
    return internal, geometry, source


def internal_to_stack(array_internal: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An internal-layout array as the sorted DICOM stack ``(z, rows, cols)`` of :func:`load_series`."""
    from qnkit import io as qio

    return np.ascontiguousarray(qio.to_file_layout(array_internal, geometry).transpose(2, 1, 0))
