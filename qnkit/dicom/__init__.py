"""DICOM in and out, all on :class:`qnkit.io.Geometry`.

- :mod:`qnkit.dicom.series`: one CT series from a folder (any nesting) or a ``.zip``, single-frame or
  enhanced multi-frame, checked and put in qnkit's internal layout;
- :mod:`qnkit.dicom.seg`: a DICOM SEG (highdicom) of the right and left kidney referencing that series;
- :mod:`qnkit.dicom.rtstruct`: an RTSTRUCT with one ROI per kidney, closed planar contours per slice;
- :mod:`qnkit.dicom.node`: ``qnkit listen``, a C-STORE SCP that segments what a PACS sends it.

pydicom, highdicom and pynetdicom are imported by these modules only, so ``import qnkit`` stays light.
"""


def require(module: str):
    """Import an optional DICOM dependency, or refuse in one line naming the extra that installs it."""
    import importlib

    from qnkit.errors import QnkitInputError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise QnkitInputError(f"DICOM support needs {module.split('.')[0]}: pip install 'qnkit[dicom]'") from None
