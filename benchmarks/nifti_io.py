"""I/O rows of `qnkit bench`: writing and reading a whole CT (int16) and its mask (uint8) as .nii.gz.

qnkit.io (ISA-L gzip when installed, threaded compression, tiled Fortran/C copies) against what
nibabel does alone with the standard library's gzip: ``nib.save`` of the C-order array, and
``nib.load`` plus the copy into C order that every caller needs. Both readers read the same file
(nibabel's), both writers write the same array, timed in alternation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from qnkit import gzip_codec
from qnkit.benchmarks.timing import measure_interleaved

# KiTS19 layout: (slices, rows, cols) with 0.78 mm pixels and 1 mm slices.
AFFINE = np.array([[0.0, 0.0, -0.78, 0.0], [0.0, -0.78, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def bench_volumes(shape: tuple[int, int, int], seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic CT (int16 HU, the analytic phantom's slices repeated to ``shape[0]``) and its kidney mask."""
    from qnkit.synth import make_case

    case = make_case(0, size=shape[1], seed=seed)
    index = np.arange(shape[0]) % case.imaging.shape[0]
    ct = np.ascontiguousarray(case.imaging[index][:, :, : shape[2]])
    mask = np.ascontiguousarray(case.segmentation[index][:, :, : shape[2]] > 0).view(np.uint8)
    return ct, mask


def run(shape=(300, 512, 512), *, repeats: int = 3, workdir: Path,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (volume, write/read): qnkit.io seconds, nibabel + stdlib gzip seconds, their ratio."""
    import nibabel as nib

    from qnkit import io

    ct, mask = bench_volumes(tuple(shape))
    geometry = io.Geometry.from_affine(AFFINE, ct.shape)
    rows = []
    for label, data, save, load in (("CT int16", ct, io.save_volume, io.load_image),
                                    ("mask uint8", mask, io.save_mask, io.load_labels)):
        ours, theirs = Path(workdir) / "qnkit_io.nii.gz", Path(workdir) / "nibabel.nii.gz"
        if progress:
            progress(f"I/O: write {label} {'x'.join(map(str, shape[::-1]))}")
        write = measure_interleaved([lambda: save(data, geometry, ours, overwrite=True),
                                     lambda: nib.save(nib.Nifti1Image(data, AFFINE), theirs)],
                                    repeats=repeats, warmup=1)
        if progress:
            progress(f"I/O: read {label}")
        read = measure_interleaved([lambda: load(theirs),
                                    lambda: np.ascontiguousarray(np.asanyarray(nib.load(theirs, mmap=False).dataobj))],
                                   repeats=repeats, warmup=1)
        for operation, (mine, baseline) in (("write", write), ("read", read)):
            rows.append({"volume": label, "operation": operation, "shape": list(shape), "codec": gzip_codec.codec(),
                         "qnkit_s": mine.as_dict(), "nibabel_s": baseline.as_dict(),
                         "speedup_vs_nibabel": baseline.median_s / mine.median_s,
                         "raw_mb": data.nbytes / 1e6, "qnkit_mb_per_s": data.nbytes / 1e6 / mine.median_s,
                         "file_mb": {"qnkit": ours.stat().st_size / 1e6, "nibabel": theirs.stat().st_size / 1e6}})
        ours.unlink()
        theirs.unlink()
    return rows
