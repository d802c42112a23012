"""A realistic whole abdominal CT for the end-to-end bench: 512 x 512 at 0.7 mm, >= 300 thin slices.

Made with qnkit's anatomy generator (:mod:`qnkit.synth`: the deformed TotalSegmentator atlas from
the lung bases to the pelvis, real KiTS19 kidney shapes when the label maps are found, the CT
renderer's tissues, noise and scanner effects), on a grid a modern scanner writes: 0.7 mm pixels,
512 x 512, 1 mm slices, so the kidneys fill a minority of
the slices as in a real abdominal scan. Generation takes minutes, so the case is cached in the
bench's work folder and reused while its recipe (:data:`RECIPE`) is unchanged.

:func:`stretch_to` makes a longer CT (e.g. 1,000 slices, for the memory row) from it by repeating
the kidney-free slices above and below the kidneys, so the kidneys stay one pair in one place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

#: What the cached case is; a cache made with another recipe is rebuilt.
#: Seed 13, case 168: a body drawn with a long field (about 325 mm from above the kidneys to below them)
#: and a 512-pixel field of view at 0.7 mm, found by replaying the generator's first draws; any case
#: of >= 300 slices at 512 x 512 would do (the search goes on from it if the generator changes).
RECIPE = {"generator": "anatomy", "pixel_mm": 0.7, "size": 512, "min_slices": 300, "thickness_mm": 1.0,
          "seed": 13, "index": 168, "version": 2, "anatomy_version": 1}
KITS_LABELS_ENV = "QNKIT_KITS_LABELS"
_KITS_GUESSES = ("../shared/data/kits19-labels", "/work/shared/data/kits19-labels")


def _kits_labels() -> Path | None:
    """KiTS19 label maps for real kidney shapes ($QNKIT_KITS_LABELS or the shared data folder), if present."""
    for candidate in (os.environ.get(KITS_LABELS_ENV), *_KITS_GUESSES):
        if candidate and (Path(candidate) / "case_00000").is_dir():
            return Path(candidate)
    return None


def _make(index: int, thickness_mm: float, labels_from: Path | None):
    """(imaging int16, labels uint8, affine, meta) of one anatomy case on the recipe's grid, or None when short."""
    from qnkit.synth.anatomy import make_anatomy
    from qnkit.synth.appearance import draw_look
    from qnkit.synth.render import render

    rng = np.random.default_rng(np.random.SeedSequence([RECIPE["seed"], index, 1]))
    body = make_anatomy(rng, pixel_mm=RECIPE["pixel_mm"], thickness_mm=thickness_mm, labels_from=labels_from,
                        max_size=RECIPE["size"], version=RECIPE["anatomy_version"])
    if body.labels.shape[0] < RECIPE["min_slices"] or body.labels.shape[1] != RECIPE["size"]:
        return None
    imaging = render(rng, body.tissue, body.labels, body.spacing, draw_look(rng))
    meta = {**{k: (float(v) if isinstance(v, np.floating) else v) for k, v in body.meta.items()},
            "index": index, "thickness_mm": thickness_mm, "shape": list(body.labels.shape)}
    return imaging, body.labels, body.affine, meta


def _cached(folder: Path) -> dict | None:
    """The record of the CT cached in `folder` when it was made with this :data:`RECIPE` and is whole, else None."""
    try:
        meta = json.loads((folder / "recipe.json").read_text())
    except (OSError, ValueError):
        return None
    made_here = meta.get("recipe") == json.loads(json.dumps(RECIPE))
    return meta if made_here and (folder / "imaging.nii.gz").is_file() and (folder / "segmentation.nii.gz").is_file() \
        else None


def whole_ct(workdir: Path, log=lambda *a: None) -> tuple[Path, Path, dict]:
    """(imaging.nii.gz, segmentation.nii.gz, meta) of the cached whole CT in ``workdir/whole_ct``, built if needed."""
    from qnkit._atomic import write_text_atomic
    from qnkit.synth.writer import _nifti
    from qnkit import io as qio

    folder = Path(workdir) / "whole_ct"
    image, labels, record = folder / "imaging.nii.gz", folder / "segmentation.nii.gz", folder / "recipe.json"
    meta = _cached(folder)
    if meta is not None:
        return image, labels, meta
    folder.mkdir(parents=True, exist_ok=True)
    kits = _kits_labels()
    made = None
    for index in range(RECIPE["index"], RECIPE["index"] + 20):
        log(f"whole CT: drawing anatomy case {index} (takes minutes; cached in {folder})")
        made = _make(index, RECIPE["thickness_mm"], kits)
        if made is not None:
            break
    if made is None:
        raise RuntimeError("the anatomy generator drew no case of >= 300 slices at 512 x 512 in 20 tries")
    imaging, seg, affine, meta = made
    for path, data in ((image, imaging), (labels, seg)):
        qio.write_nifti(_nifti(np.ascontiguousarray(data), affine), path, overwrite=True)
    meta = {"recipe": RECIPE, "case": meta, "kidney_shapes": "KiTS19" if kits else "atlas",
            "kidney_slices": int(seg.any(axis=(1, 2)).sum())}
    write_text_atomic(record, json.dumps(meta, indent=1), overwrite=True)
    return image, labels, meta


def whole_ct_in_subprocess(workdir: Path, log=lambda *a: None) -> tuple[Path, Path, dict]:
    """:func:`whole_ct`, generating (when the cache misses) in a fresh interpreter: generation peaks at
    about 2.4 GB, which must not add to the bench process's own memory (its 4 GB budget)."""
    import subprocess
    import sys

    if _cached(Path(workdir) / "whole_ct") is None:
        log(f"whole CT: generating it (takes minutes; cached in {Path(workdir) / 'whole_ct'})")
        proc = subprocess.run([sys.executable, "-m", "qnkit.benchmarks.whole_ct", str(workdir)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(f"whole CT generation failed: {lines[-1] if lines else proc.returncode}")
    return whole_ct(workdir, log=log)


def stretch_to(source: Path, target: Path, slices: int, labels: Path | None = None) -> Path:
    """Write ``target``: ``source``'s CT lengthened to ``slices`` slices by repeating its end bands.

    Above and below, the slices of the source's kidney-free end bands (from ``labels``; without
    labels the outer fifth of each end) are repeated back and forth (mirrored), so the kidneys stay
    one pair in the middle of a scan as long as a long chest-abdomen-pelvis CT. Kept beside the
    source and reused when it exists with the right shape.
    """
    from qnkit import io as qio
    from qnkit.synth.writer import _nifti

    target = Path(target)
    if target.is_file():
        try:
            if qio.load_geometry(target).internal_shape[0] == slices:
                return target
        except Exception:  # noqa: BLE001 - unreadable: rebuild
            pass
    ct, geometry = qio.load_image(source)
    z = ct.shape[0]
    top, bottom = z // 5, z - z // 5  # kidney-free bands [0, top) and [bottom, z)
    if labels is not None:
        kidney = np.flatnonzero(qio.load_labels(labels)[0].any(axis=(1, 2)))
        if kidney.size:
            top, bottom = max(1, int(kidney[0]) - 10), min(z - 1, int(kidney[-1]) + 11)
    before = max(0, (slices - z) // 2)
    after = max(0, slices - z - before)

    def band(n: int, lo: int, hi: int, upward: bool) -> np.ndarray:
        """n slice indices walking away from the source's end, back and forth inside [lo, hi)."""
        width = hi - lo
        walk = np.arange(1, n + 1) % (2 * width)
        walk = np.where(walk < width, walk, 2 * width - 1 - walk)
        return (lo + walk) if upward else (hi - 1 - walk)

    index = np.concatenate([band(before, 0, top, True)[::-1], np.arange(z), band(after, bottom, z, False)])
    data = ct[index]
    del ct
    # The same in-plane grid and slice thickness; the origin moves up by the slices added on top.
    affine = geometry.internal_affine.copy()
    affine[:3, 3] -= affine[:3, 0] * before
    qio.write_nifti(_nifti(data, affine), target, overwrite=True)
    return target


if __name__ == "__main__":  # python -m qnkit.benchmarks.whole_ct WORKDIR: fill the cache
    import sys

    whole_ct(Path(sys.argv[1]))
