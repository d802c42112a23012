"""DICOM SEG output (highdicom): one BINARY segment per kidney on the source series' frames.

The SEG references the source series and frame of reference, copies the patient and study modules
(highdicom does), gets new Series/SOP Instance UIDs, and names qnkit, its version and the model
bundle's SHA-256 in each segment's algorithm identification. Frames are those of the source images
(single-frame: one per instance; multi-frame: the same frame order), so it overlays exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qnkit.dicom.output import KIDNEYS, Algorithm, check_referable, save_dataset
from qnkit.dicom.series import DicomSeries, internal_to_stack
from qnkit.io import Geometry

__all__ = ["build_seg", "write_seg", "SEG_SERIES_NUMBER"]

SEG_SERIES_NUMBER = 901


def _segment_descriptions(algorithm: Algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
        source="qnkit QuickNAT kidney model", parameters={"model_sha256": algorithm.model_sha256})
    category = codes.cid7150.AnatomicalStructure
    return [hd.seg.SegmentDescription(
        segment_number=n, segment_label=kidney.name, segmented_property_category=category,
        segmented_property_type=hd.sr.CodedConcept(kidney.snomed, "SCT", kidney.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=ident)
        for n, kidney in enumerate(KIDNEYS, start=1)]


def build_seg(sides: np.ndarray, geometry: Geometry, source: DicomSeries, algorithm: Algorithm):
    """The SEG dataset for an internal-layout sides volume (values of :data:`KIDNEYS`)."""
    from qnkit.dicom import require

    hd = require("highdicom")

    check_referable(source)
    stack = internal_to_stack(sides, geometry)
    if source.multiframe and len(source.headers) != 1:
        from qnkit.dicom.series import DicomError

        raise DicomError(f"{source.path}: a SEG of a series of {len(source.headers)} multi-frame images is not "
                         f"supported; write RTSTRUCT or NIfTI")
    per_instance = source.stack_to_frames(stack)
    frames = np.concatenate(per_instance, axis=0)  # single-frame: one frame per instance, in header order
    binary = np.stack([frames == kidney.value for kidney in KIDNEYS], axis=-1)
    first = source.headers[0]
    return hd.seg.Segmentation(
        source_images=source.headers, pixel_array=binary,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(algorithm),
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="qnkit", manufacturer_model_name="qnkit QuickNAT kidneys", software_versions=algorithm.version,
        device_serial_number="0", content_label="KIDNEYS", content_description="Kidneys (qnkit)",
        content_creator_name="qnkit^", series_description=f"Kidneys (qnkit) of {getattr(first, 'SeriesDescription', '')}"[:64],
        omit_empty_frames=True)


def write_seg(sides: np.ndarray, geometry: Geometry, source: DicomSeries, path: str | Path, *,
              algorithm: Algorithm, overwrite: bool = False) -> Path:
    """Build and write the SEG atomically at ``path`` (never over an input); returns ``path``."""
    return save_dataset(build_seg(sides, geometry, source, algorithm), Path(path), overwrite=overwrite,
                        inputs=(source.path,))
