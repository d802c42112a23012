"""Synthetic CT cases in the KiTS19 layout: one module per concern.

Two generators write the same layout (``case_XXXXX/imaging.nii.gz`` int16 HU,
``segmentation.nii.gz`` 0/1/2, ``kits.json``):

* ``anatomy`` (:mod:`.anatomy` → :mod:`.appearance` → :mod:`.render` → :mod:`.writer`): a real
  whole-body organ layout (TotalSegmentator subject s0011, CC BY 4.0), deformed per case, with real
  KiTS19 kidney and tumor shapes placed in it, rendered with per-tissue HU drawn around published
  ranges for four contrast phases, blur, noise and field-of-view effects. This is what the shipped
  model is trained on.
* ``classic`` (:mod:`.classic`): the analytic phantom (ellipsoids and tubes); quick at small sizes,
  used by tests and the demo.
"""
from __future__ import annotations

from .case import make_anatomy_case
from .classic import SLICE_THICKNESSES, SynthCase, make_case, max_slices, resample_labels, tumor_diameter_cm
from .writer import GENERATORS, write_case, write_dataset

__all__ = ["GENERATORS", "SLICE_THICKNESSES", "SynthCase", "make_anatomy_case", "make_case", "max_slices", "resample_labels", "tumor_diameter_cm",
           "write_case", "write_dataset"]
