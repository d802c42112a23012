"""DICOM test cases built with pydicom from the one real CT series in shared/data (20 slices, JPEG 2000).

The shared series is anonymised down to empty Study/Series/SOP Instance UIDs; :func:`referable_series`
fills them in (SOP UIDs from the file meta, Study/Series UIDs made once, a test patient), as a PACS does
on import, because a SEG or RTSTRUCT must reference them. Every other case is built from that copy:
renamed and nested files, a zip, other transfer syntaxes, an enhanced multi-frame copy, a second
series, and the broken series that must be refused. Also: a stand-in predictor with a known answer.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np

REAL_SERIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct" / "example_ct_dicom"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"


def real_series_path() -> Path:
    """The shared real series (CI has shared/ beside the clone; a session has it at /work/shared)."""
    for candidate in (REAL_SERIES, Path("/work/shared/data/real-ct/example_ct_dicom")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared/data/real-ct/example_ct_dicom not found")


def _read_all(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(f) for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "DICOMDIR"]


def referable_series(out: Path, *, decompress: bool = False, every: int = 1) -> Path:
    """The real series with its UIDs filled in and a test patient (file names as in the source).

    ``decompress``: store it uncompressed (JPEG 2000 decoding costs ~0.2 s a slice, so most tests read
    an uncompressed copy); ``every``: keep every n-th slice (an even coarser series)."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(real_series_path().iterdir())[::every]:
        ds = pydicom.dcmread(f)
        if decompress:
            _uncompressed(ds)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
        ds.PatientName, ds.PatientID, ds.StudyID, ds.SeriesNumber = "Test^Kidney", "QNKIT-TEST", "1", 3
        ds.AccessionNumber = "A1"
        ds.save_as(out / f"{f.name}.dcm")
    return out


def _uncompressed(ds) -> None:
    """Decode the pixel data in place (nothing to do when it is stored uncompressed)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()


def anonymised(src: Path, out: Path) -> Path:
    """A copy without Study/Series UIDs (as the shared series comes): no SEG or RTSTRUCT can reference it."""
    datasets = _read_all(src)
    for ds in datasets:
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
    return write_all(datasets, out)


def write_all(datasets, out: Path, names=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        name = names[k] if names else f"IM{k:04d}.dcm"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / name, enforce_file_format=True)
    return out


def shuffled(src: Path, out: Path, seed: int = 0) -> Path:
    """Random file names (no extension) in nested folders, InstanceNumber scrambled: order must come
    from the geometry."""
    rng = np.random.default_rng(seed)
    datasets = _read_all(src)
    numbers = rng.permutation(len(datasets))
    names = []
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = int(numbers[k]) + 1
        names.append(f"{'abc'[k % 3]}/{rng.integers(1 << 30):x}/{rng.integers(1 << 40):x}")
    return write_all(datasets, out, names)


def zipped(src: Path, out_zip: Path) -> Path:
    with zipfile.ZipFile(out_zip, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                z.write(f, f"DICOM/{f.relative_to(src)}")
    return out_zip


def transcoded(src: Path, out: Path, syntax: str) -> Path:
    """A copy in another transfer syntax: 'explicit' (uncompressed) or 'rle' (RLE Lossless)."""
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    datasets = _read_all(src)
    for ds in datasets:
        _uncompressed(ds)
        if syntax == "rle":
            ds.compress(RLELossless)
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return write_all(datasets, out)


def multiframe(src: Path, out: Path) -> Path:
    """One legacy-converted enhanced CT (multi-frame, functional groups) of the whole series."""
    import highdicom as hd

    datasets = _read_all(src)
    for ds in datasets:
        _uncompressed(ds)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid="1.2.826.0.1.3680043.8.498.1003", series_number=4,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1004", instance_number=1)
    return write_all([enhanced], out)


def with_second_series(src: Path, out: Path, keep: int = 8) -> Path:
    """The series plus a shorter second CT series (new UIDs) and a non-image object (SR) in one folder."""
    from pydicom.uid import generate_uid

    shutil.copytree(src, out)
    second = _read_all(src)[:keep]
    uid = "1.2.826.0.1.3680043.8.498.1005"
    for ds in second:
        ds.SeriesInstanceUID, ds.SeriesNumber = uid, 5
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    write_all(second, out / "second")
    sr = _read_all(src)[0]
    del sr.PixelData
    sr.Modality, sr.SOPClassUID = "SR", "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_all([sr], out / "reports")
    return out


def broken(src: Path, out: Path, kind: str) -> Path:
    """A copy of the series with one defect that the reader must refuse."""
    from pydicom.uid import generate_uid

    datasets = _read_all(src)
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    mid = len(datasets) // 2
    if kind == "missing":
        del datasets[mid]
    elif kind == "duplicate":
        dup = _read_all(src)[0]
        dup.ImagePositionPatient = datasets[mid].ImagePositionPatient
        dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(dup)
    elif kind == "uneven":
        pos = list(datasets[mid].ImagePositionPatient)
        datasets[mid].ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.6]
    elif kind == "tilt":  # 15 degrees of gantry tilt: positions slide along y slice by slice
        z0 = float(datasets[0].ImagePositionPatient[2])
        for ds in datasets:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + (z - z0) * np.tan(np.radians(15)), z]
            ds.GantryDetectorTilt = 15
    elif kind == "orientation":
        c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
        datasets[mid].ImageOrientationPatient = [c, s, 0, -s, c, 0]
    elif kind == "size":
        ds = datasets[mid]
        _uncompressed(ds)
        ds.PixelData = ds.pixel_array[:256, :256].copy().tobytes()
        ds.Rows = ds.Columns = 256
    elif kind == "no-pixels":
        del datasets[mid].PixelData
    elif kind == "corrupt":  # pixel data cut to half its length
        ds = datasets[mid]
        _uncompressed(ds)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    elif kind == "frames":
        for ds in datasets[mid:]:
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1006"
    elif kind == "not-ct":
        for ds in datasets:
            ds.Modality = "MR"
    else:
        raise ValueError(kind)
    return write_all(datasets, out)


def hu_predictor(lo_hu: float, hi_hu: float, window: tuple[float, float]):
    """A stand-in model with a known answer: probability 1 where the (downsampled) CT lies between
    ``lo_hu`` and ``hi_hu``, else 0. Abdominal soft tissue (liver, spleen, vessels) gives a non-empty mask."""
    w_lo, w_hi = window

    def predict(x: np.ndarray) -> np.ndarray:
        hu = x * (w_hi - w_lo) + w_lo
        return ((hu > lo_hu) & (hu < hi_hu)).astype(np.float32)

    return predict
