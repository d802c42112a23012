"""RTSTRUCT output: one ROI per kidney, closed planar contours per slice in patient coordinates.

Contours run through the centres of the boundary pixels (Moore-neighbour tracing, 8-connected), as
OpenCV's ``findContours`` gives them, so a reader that fills the polygons (rt-utils, most planning
systems) gets the mask back up to the pixels a polygon edge cuts. A hole in a slice becomes a second
contour around it on the same plane (through the kidney pixels that ring the hole): planning systems
and rt-utils combine contours of one plane by XOR (even-odd filling). Each contour references its
source image (and frame, for multi-frame CT) and lies at that slice's ImagePositionPatient.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from qnkit.dicom.output import KIDNEYS, Algorithm, check_referable, save_dataset
from qnkit.dicom.series import DicomSeries, internal_to_stack
from qnkit.io import Geometry

__all__ = ["trace_contours", "build_rtstruct", "write_rtstruct", "RTSTRUCT_SERIES_NUMBER"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT references a study
RTSTRUCT_SERIES_NUMBER = 902
# Clockwise in image coordinates (rows down), starting west.
_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


def _trace(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """Outer boundary of the 8-connected component of ``mask`` that holds ``start`` (its first pixel
    in raster order), clockwise, as (row, col) pixel centres (Moore tracing, Jacob's stop)."""
    h, w = mask.shape
    r, c = start
    points = [start]
    back = 0  # the west neighbour of the first pixel is background (raster order)
    first_move = None
    while True:
        for i in range(1, 9):
            k = (back + i) % 8
            nr, nc = r + _NEIGHBOURS[k][0], c + _NEIGHBOURS[k][1]
            if 0 <= nr < h and 0 <= nc < w and mask[nr, nc]:
                break
        else:
            return np.array(points)  # a single pixel
        pr, pc = r + _NEIGHBOURS[(k - 1) % 8][0], c + _NEIGHBOURS[(k - 1) % 8][1]
        if (r, c) == start and first_move == (nr, nc):
            return np.array(points[:-1])
        if first_move is None:
            first_move = (nr, nc)
        back = _NEIGHBOURS.index((pr - nr, pc - nc))
        r, c = nr, nc
        points.append((r, c))


def _first_pixel(mask: np.ndarray) -> tuple[int, int]:
    flat = int(np.flatnonzero(mask)[0])
    return divmod(flat, mask.shape[1])


def trace_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2-D mask: per 8-connected component its outer boundary, then one contour
    per hole (4-connected background enclosed by it). Each is an (N, 2) array of (row, col)."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    labels, count = ndi.label(mask, structure=eight)
    out = []
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        r0, c0 = box[0].start, box[1].start
        sub = np.pad(labels[box] == index, 1)
        out.append(_trace(sub, _first_pixel(sub)) + (r0 - 1, c0 - 1))
        holes, n_holes = ndi.label(ndi.binary_fill_holes(sub) & ~sub)
        for h in range(1, n_holes + 1):
            hole = holes == h
            ring = ndi.binary_dilation(hole, structure=eight) & sub
            region = hole | ring
            out.append(_trace(region, _first_pixel(region)) + (r0 - 1, c0 - 1))
    return out


def _dataset_base(source: DicomSeries):
    """A new RTSTRUCT dataset with the patient and study modules copied from the source series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    first = source.headers[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = getattr(first, "SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
                    "PatientAge", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # type 2: present, maybe empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = "Kidneys (qnkit)"
    ds.OperatorsName = ""
    ds.Manufacturer = "qnkit"
    ds.ManufacturerModelName = "qnkit QuickNAT kidneys"
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = source.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "KIDNEYS"
    ds.StructureSetName = "qnkit kidneys"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    return ds


def _image_ref(source: DicomSeries, k: int):
    """The Contour Image item (SOP class, SOP instance and, for multi-frame, frame) of sorted slice ``k``."""
    from pydicom.dataset import Dataset

    inst, frame = source.frames[k]
    header = source.headers[inst]
    ref = Dataset()
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if source.multiframe:
        ref.ReferencedFrameNumber = frame + 1
    return ref


def build_rtstruct(sides: np.ndarray, geometry: Geometry, source: DicomSeries, algorithm: Algorithm):
    """The RTSTRUCT dataset for an internal-layout sides volume (values of :data:`KIDNEYS`)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    check_referable(source)
    stack = internal_to_stack(sides, geometry)
    ds = _dataset_base(source)
    row_dir, col_dir = source.orientation[:3], source.orientation[3:]
    row_mm, col_mm = source.pixel_spacing

    series = Dataset()
    series.SeriesInstanceUID = source.uid
    series.ContourImageSequence = Sequence([_image_ref(source, k) for k in range(len(source.frames))])
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_CLASS
    study.ReferencedSOPInstanceUID = source.study_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = source.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    rois, contours, observations = [], [], []
    for number, kidney in enumerate(KIDNEYS, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = source.frame_of_reference_uid
        roi.ROIName = kidney.name
        roi.ROIDescription = f"{algorithm.name} {algorithm.version}, model sha256 {algorithm.model_sha256}"
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm.name} {algorithm.version} model {algorithm.model_sha256[:16]}"
        rois.append(roi)
        items = []
        for k in range(stack.shape[0]):
            plane = stack[k] == kidney.value
            if not plane.any():
                continue
            for pts in trace_contours(plane):
                xyz = (source.positions[k] + np.outer(pts[:, 1] * col_mm, row_dir)
                       + np.outer(pts[:, 0] * row_mm, col_dir))
                item = Dataset()
                item.ContourImageSequence = Sequence([_image_ref(source, k)])
                item.ContourGeometricType = "CLOSED_PLANAR" if len(pts) > 1 else "POINT"
                item.NumberOfContourPoints = len(pts)
                item.ContourNumber = len(items) + 1
                item.ContourData = [f"{v:.4f}".rstrip("0").rstrip(".") for v in xyz.ravel()]
                items.append(item)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = list(kidney.color)
        if items:
            contour.ContourSequence = Sequence(items)
        contours.append(contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = kidney.snomed, "SCT", kidney.meaning
        obs.RTROIIdentificationCodeSequence = Sequence([code])
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def write_rtstruct(sides: np.ndarray, geometry: Geometry, source: DicomSeries, path: str | Path, *,
                   algorithm: Algorithm, overwrite: bool = False) -> Path:
    """Build and write the RTSTRUCT atomically at ``path`` (never over an input); returns ``path``."""
    return save_dataset(build_rtstruct(sides, geometry, source, algorithm), Path(path), overwrite=overwrite,
                        inputs=(source.path,))
