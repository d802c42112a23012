"""End-to-end row of `qnkit bench`: `qnkit segment`'s pipeline on one synthetic CT, stage by stage.

Preprocessing runs in a worker thread ahead of inference, so its time overlaps inference; the share
of time outside inference is therefore taken from the wall clock: (wall - inference) / wall.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from qnkit.bundle import Bundle


def synthetic_ct(workdir: Path, *, size: int = 512, slices: int = 100, seed: int = 7) -> Path:
    """A synthetic case cut (or tiled) to exactly `slices` slices around its kidneys, as imaging.nii.gz."""
    import nibabel as nib

    from qnkit.synth import make_case

    case = make_case(0, size=size, seed=seed)
    z = case.imaging.shape[0]
    kidney = np.flatnonzero(case.segmentation.any(axis=(1, 2)))
    centre = int(kidney.mean()) if kidney.size else z // 2
    index = np.clip(np.arange(slices) + centre - slices // 2, 0, z - 1)
    path = workdir / "bench_case" / "imaging.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(case.imaging[index]), case.affine)
    image.set_sform(case.affine, code=2)
    nib.save(image, str(path))
    return path


def run(bundle: Bundle, backend, *, size: int = 512, slices: int = 100, repeats: int = 3,
        batch_size: int = 16, workdir: Path | None = None) -> dict:
    """Median stage timings of segmenting a size x size x slices case with `backend` (after one warm-up)."""
    from qnkit.segment import CaseInput, SegmentOptions, segment_file

    workdir = Path(workdir or tempfile.mkdtemp(prefix="qnkit-bench-e2e-"))
    image = synthetic_ct(workdir, size=size, slices=slices)
    case = CaseInput(name="bench", image=image, source=image)
    options = SegmentOptions(batch_size=batch_size)
    runs = []
    for attempt in range(repeats + 1):
        out = workdir / f"mask_{attempt}.nii.gz"
        result = segment_file(case, out, backend.predict, bundle=bundle, options=options, overwrite=True)
        out.unlink(missing_ok=True)
        if attempt:  # the first run warms caches and the backend up
            runs.append(result.timings)
    stages = ("load", "preprocess", "inference", "postprocess", "write", "wall")
    median = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in stages}
    outside = (median["wall"] - median["inference"]) / median["wall"] if median["wall"] > 0 else None
    return {"shape": [slices, size, size], "backend": backend.describe(), "repeats": repeats,
            "stages_s": median, "share_outside_inference": outside,
            "slices_per_s": slices / median["wall"] if median["wall"] > 0 else None,
            "note": "preprocess runs in a worker thread overlapping inference; its time is not on the critical path"}
