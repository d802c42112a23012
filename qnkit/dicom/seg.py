"""DICOM SEG output (highdicom): one BINARY segment per kidney on the source series' frames.

The SEG references the source series and frame of reference, copies the patient and study modules
(highdicom does), gets new Series/SOP Instance UIDs, and names qnkit, its version and the model
bundle's SHA-256 in each segment's algorithm identification. Frames are those of the source images
(single-frame: one per instance; multi-frame: the same frame order), so it overlays exactly.

With a per-kidney quality verdict (:func:`qnkit.quality.kidney_quality`), each kidney's segment carries it
twice: for people, a Segment Description such as "quality check 1.80: volume outside 80-300 mL" (what a
viewer shows beside the segment's label); for code, its algorithm parameters next to ``model_sha256``
(``quality_verdict``, ``quality_score``, ``quality_flagged``, ``quality_samples``, ``quality_calibration``
and each signal as ``name=value``), which :func:`read_seg_quality` reads back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qnkit.dicom.output import KIDNEYS, Algorithm, check_referable, save_dataset
from qnkit.dicom.series import DicomSeries, internal_to_stack
from qnkit.io import Geometry
from qnkit.postprocess import LEFT, RIGHT

__all__ = ["build_seg", "write_seg", "read_seg_quality", "quality_description", "SEG_SERIES_NUMBER"]

SEG_SERIES_NUMBER = 901
SIDES = {RIGHT: "right", LEFT: "left"}
LO_MAX = 64  # characters of a Long String (Segment Description)
#: Algorithm parameters of the verdict itself; every other one but model_sha256 is a signal.
QUALITY_KEYS = ("quality_verdict", "quality_score", "quality_flagged", "quality_samples", "quality_calibration")


def quality_description(quality: dict) -> str:
    """One kidney's verdict as a Segment Description (LO: at most 64 characters, no backslash), e.g.
    "quality check 1.80: volume outside 80-300 mL"; reasons that do not fit are counted ("+2 more")."""
    text = f"quality {quality['verdict']} {float(quality['score']):.2f}"
    reasons = [r.split(" (")[0] for r in quality.get("reasons") or []]
    for k, reason in enumerate(reasons):
        joined = f"{text}{': ' if k == 0 else '; '}{reason}"
        after = len(reasons) - k - 1
        if len(joined) + (len(f" +{after} more") if after else 0) > LO_MAX:
            return _lo(f"{text} +{len(reasons) - k} more")
        text = joined
    return _lo(text)


def _lo(text: str) -> str:
    """`text` made a valid LO value: printable ASCII, no backslash (LO's value separator), 64 characters."""
    clean = "".join(c if " " <= c <= "~" else " " for c in text.replace("\\", "/"))
    return clean if len(clean) <= LO_MAX else clean[: LO_MAX - 3].rstrip() + "..."


def _parameter(value) -> str:
    """A value for highdicom's "name=value,name=value" algorithm parameters: no ',' or '='."""
    return str(value).replace(",", ";").replace("=", ":")


def _quality_parameters(quality: dict) -> dict:
    from qnkit.quality import SIGNALS

    flagged = [k for r in quality.get("reasons") or [] for k in SIGNALS if f"({k} " in r]
    signals = quality.get("signals") or {}
    return {"quality_verdict": quality["verdict"], "quality_score": repr(float(quality["score"])),
            "quality_flagged": ";".join(flagged), "quality_samples": int(quality.get("samples") or 0),
            "quality_calibration": _parameter(quality.get("calibration", "")),
            **{_parameter(k): repr(float(v)) for k, v in signals.items()}}


def _segment_descriptions(algorithm: Algorithm, quality: dict | None = None):
    """One segment per kidney; with `quality` ({"right": verdict or None, "left": ...}) each kidney that has
    a verdict gets its Segment Description and quality parameters."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def identification(extra: dict):
        return hd.AlgorithmIdentificationSequence(
            name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
            source="qnkit QuickNAT kidney model", parameters={"model_sha256": algorithm.model_sha256, **extra})

    plain = identification({})
    category = codes.cid7150.AnatomicalStructure
    out = []
    for n, kidney in enumerate(KIDNEYS, start=1):
        verdict = (quality or {}).get(SIDES[kidney.value])
        segment = hd.seg.SegmentDescription(
            segment_number=n, segment_label=kidney.name, segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(kidney.snomed, "SCT", kidney.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=plain if verdict is None else identification(_quality_parameters(verdict)))
        if verdict is not None:
            segment.SegmentDescription = quality_description(verdict)
        out.append(segment)
    return out


def build_seg(sides: np.ndarray, geometry: Geometry, source: DicomSeries, algorithm: Algorithm,
              quality: dict | None = None):
    """The SEG dataset for an internal-layout sides volume (values of :data:`KIDNEYS`); `quality`: the
    per-side verdicts ({"right": ..., "left": ...}, as in a result's stats) to carry in the segments."""
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
        segment_descriptions=_segment_descriptions(algorithm, quality),
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="qnkit", manufacturer_model_name="qnkit QuickNAT kidneys", software_versions=algorithm.version,
        device_serial_number="0", content_label="KIDNEYS", content_description="Kidneys (qnkit)",
        content_creator_name="qnkit^", series_description=f"Kidneys (qnkit) of {getattr(first, 'SeriesDescription', '')}"[:64],
        omit_empty_frames=True)


def write_seg(sides: np.ndarray, geometry: Geometry, source: DicomSeries, path: str | Path, *,
              algorithm: Algorithm, overwrite: bool = False, quality: dict | None = None) -> Path:
    """Build and write the SEG atomically at ``path`` (never over an input); returns ``path``."""
    return save_dataset(build_seg(sides, geometry, source, algorithm, quality), Path(path), overwrite=overwrite,
                        inputs=(source.path,))


def read_seg_quality(path: str | Path) -> dict:
    """The quality a qnkit SEG carries: {"right": ..., "left": ...}, each None (no verdict written) or
    {"verdict", "score", "flagged" (signal names over their limits), "samples", "calibration", "signals",
    "description"}. Segments are matched to kidneys by their SNOMED CT code or label (:data:`KIDNEYS`)."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    by_code = {k.snomed: SIDES[k.value] for k in KIDNEYS}
    by_label = {k.name.lower(): SIDES[k.value] for k in KIDNEYS}
    out: dict = {side: None for side in SIDES.values()}
    for segment in getattr(ds, "SegmentSequence", []):
        codes = [c.CodeValue for c in getattr(segment, "SegmentedPropertyTypeCodeSequence", [])]
        side = next((by_code[c] for c in codes if c in by_code), None) or by_label.get(
            str(getattr(segment, "SegmentLabel", "")).strip().lower())
        algorithms = getattr(segment, "SegmentationAlgorithmIdentificationSequence", [])
        text = str(getattr(algorithms[0], "AlgorithmParameters", "")) if algorithms else ""
        parameters = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
        if side is None or "quality_verdict" not in parameters:
            continue
        out[side] = {
            "verdict": parameters["quality_verdict"], "score": float(parameters["quality_score"]),
            "flagged": [k for k in parameters.get("quality_flagged", "").split(";") if k],
            "samples": int(parameters.get("quality_samples", 0)),
            "calibration": parameters.get("quality_calibration", ""),
            "signals": {k: float(v) for k, v in parameters.items()
                        if k not in QUALITY_KEYS and k != "model_sha256" and _is_number(v)},
            "description": str(getattr(segment, "SegmentDescription", ""))}
    return out



def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
