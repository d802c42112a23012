"""KiTS19 folder discovery, large-tumor filter, deterministic splits and the preprocessed cache.

Order of operations (so that the test set is never touched by training):
1. `discover_cases` lists `case_XXXXX/{imaging,segmentation}.nii[.gz]` and reads `kits.json`.
2. `split_test` draws the 80:20 test split from all cases with a seeded RNG; the names go to
   RUN_DIR/evaluation_data.json and training never opens those files.
3. `build_cache` preprocesses the remaining cases once with the compiled kernels (downsample image
   and labels, kidney fraction per 2x2 block (soft target), crop to the kidney slice range, border
   weights) into `.npy` files, recording tumor and
   kidney voxel counts on the way.
4. `apply_filter` drops cases whose tumor distorts the kidney (kits.json radiographic size and/or
   tumor/kidney voxel ratio) and records why; `split_train_val` draws 80:20 from the rest.

The cache lives in CACHE/<params-hash>/<case_id>/ with a manifest that names the source files
(path, size, mtime_ns) and the preprocessing parameters; an entry is rebuilt when either changes.
Arrays are written to temporary files and renamed, the manifest last, so a half-written entry is
never used.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qnkit import kernels
from qnkit._atomic import atomic_path, write_text_atomic
from qnkit.errors import QnkitInputError

CACHE_VERSION = 2
CASE_RE = re.compile(r"^case_\d{5}$")
ARRAYS = ("image", "labels", "coverage", "weights")


@dataclass
class Case:
    case_id: str
    image: Path
    labels: Path
    radiographic_size_cm: float | None = None


@dataclass
class PreprocessParams:
    hu_lo: float
    hu_hi: float
    slice_margin: int
    omega0: float

    @classmethod
    def from_settings(cls, data) -> "PreprocessParams":
        return cls(float(data.hu_lo), float(data.hu_hi), int(data.slice_margin), float(data.omega0))

    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CacheEntry:
    """One preprocessed case: paths of its .npy arrays, slice count and label statistics."""
    case_id: str
    folder: Path
    num_slices: int
    kidney_voxels: int
    tumor_voxels: int
    slice_range: list = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def discover_cases(data_dir: str | Path, check_headers: bool = True) -> list[Case]:
    """All complete cases of a KiTS19-layout folder, sorted by case id (headers checked)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise QnkitInputError(f"data folder not found: {data_dir}")
    sizes = _read_kits_json(data_dir / "kits.json")
    cases, incomplete = [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and CASE_RE.match(p.name)):
        image, labels = _find(folder, "imaging"), _find(folder, "segmentation")
        if image is None or labels is None:
            incomplete.append(folder.name)
            continue
        cases.append(Case(folder.name, image, labels, sizes.get(folder.name)))
    if incomplete:
        raise QnkitInputError(f"{data_dir}: case folder(s) without imaging.nii[.gz] and segmentation.nii[.gz]: "
                              f"{', '.join(incomplete[:5])}{' ...' if len(incomplete) > 5 else ''}")
    if not cases:
        raise QnkitInputError(f"{data_dir}: no KiTS19 cases (case_XXXXX/imaging.nii.gz + segmentation.nii.gz)")
    if check_headers:
        for case in cases:
            _check_header_shapes(case)
    return cases


def _header_shape(path: Path) -> tuple:
    import nibabel as nib

    try:
        shape = tuple(nib.load(path).shape)
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip raise many types for a damaged file
        raise QnkitInputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_header_shapes(case: Case) -> None:
    """Image and labels must have one 3-D shape; checked from the headers only, for every case, so a
    malformed folder is refused before anything is written (test cases included, whose voxels training never reads)."""
    image, labels = _header_shape(case.image), _header_shape(case.labels)
    if len(image) != 3 or image != labels:
        raise QnkitInputError(f"{case.case_id}: image shape {image} and label shape {labels} differ or are not 3-D "
                              f"({case.image}, {case.labels})")


def _read_kits_json(path: Path) -> dict[str, float]:
    """case_id -> radiographic_size (cm) from an optional kits.json."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        out = {}
        for rec in records:
            size = rec.get("radiographic_size")
            if size is not None:
                out[str(rec["case_id"])] = float(size)
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise QnkitInputError(f"{path}: malformed kits.json ({exc})") from None


def _split(ids: list[str], fraction: float, seed: int, salt: str) -> tuple[list[str], list[str]]:
    """Seeded split of sorted ids into (rest, picked) with round(fraction * n) picked."""
    ids = sorted(ids)
    n_pick = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) >= 2:
        n_pick = max(1, n_pick)
    n_pick = min(n_pick, len(ids) - 1) if ids else 0
    order = list(ids)
    random.Random(f"{salt}:{seed}").shuffle(order)
    picked = set(order[:n_pick])
    return [i for i in ids if i not in picked], [i for i in ids if i in picked]


def split_test(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(train pool, test) cases."""
    rest, test = _split([c.case_id for c in cases], fraction, seed, "test")
    by_id = {c.case_id: c for c in cases}
    return [by_id[i] for i in rest], [by_id[i] for i in test]


def split_train_val(case_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(case_ids) < 2:
        raise QnkitInputError(f"need at least 2 usable training cases for a train/validation split, "
                              f"got {len(case_ids)}")
    return _split(case_ids, fraction, seed, "val")


def apply_filter(entries: dict[str, CacheEntry], cases: list[Case], data) -> tuple[list[str], list[dict]]:
    """(kept case ids, [{case_id, reason}]) by the DATA filter rule."""
    kept, filtered = [], []
    for case in cases:
        entry = entries[case.case_id]
        reasons = []
        limit = data.max_radiographic_size_cm
        if limit is not None and case.radiographic_size_cm is not None and case.radiographic_size_cm > limit:
            reasons.append(f"radiographic_size {case.radiographic_size_cm:g} cm > {limit:g} cm")
        limit = data.max_tumor_kidney_ratio
        if limit is not None and entry.tumor_voxels > 0:
            ratio = entry.tumor_voxels / max(entry.kidney_voxels, 1)
            if ratio > limit:
                reasons.append(f"tumor/kidney voxel ratio {ratio:.3g} > {limit:g}")
        if entry.kidney_voxels + entry.tumor_voxels == 0:
            reasons.append("no kidney label")
        if reasons:
            filtered.append({"case_id": case.case_id, "reason": "; ".join(reasons)})
        else:
            kept.append(case.case_id)
    return kept, filtered


def _identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _manifest_for(case: Case, params: PreprocessParams) -> dict:
    return {"version": CACHE_VERSION, "case_id": case.case_id, "params": asdict(params),
            "sources": {"image": _identity(case.image), "labels": _identity(case.labels)}}


def _load_entry(folder: Path, expected: dict) -> CacheEntry | None:
    """The cached entry when its manifest matches `expected` and every array exists, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if {k: manifest.get(k) for k in expected} != expected:
        return None
    if not all((folder / f"{name}.npy").is_file() for name in ARRAYS):
        return None
    s = manifest["stats"]
    return CacheEntry(expected["case_id"], folder, s["num_slices"], s["kidney_voxels"], s["tumor_voxels"],
                      s["slice_range"])


def preprocess_case(case: Case, params: PreprocessParams) -> tuple[dict[str, np.ndarray], dict]:
    """Half-resolution image/labels/weights cropped to the kidney slice range, and label stats."""
    from qnkit import io as qio

    labels, lgeom = qio.load_labels(case.labels)
    image, igeom = qio.load_image(case.image)
    if image.shape != labels.shape:
        raise QnkitInputError(f"{case.case_id}: image shape {image.shape} and label shape {labels.shape} differ "
                              f"({case.image}, {case.labels})")
    if hasattr(qio, "check_same_grid"):
        qio.check_same_grid(igeom, lgeom)
    kidney = int(np.count_nonzero(labels == 1))
    tumor = int(np.count_nonzero(labels == 2))
    other = int(np.count_nonzero(labels > 2))
    if other:
        raise QnkitInputError(f"{case.labels}: {other} voxel(s) with labels other than 0, 1, 2")
    span = kernels.kidney_slice_range(labels, params.slice_margin)
    start, stop = span if span is not None else (0, labels.shape[0])
    labels_half = kernels.downsample_labels(np.ascontiguousarray(labels[start:stop]))
    image_half = kernels.downsample_image(np.ascontiguousarray(image[start:stop]), params.hu_lo, params.hu_hi)
    weights = kernels.border_weights(labels_half, params.omega0)
    # Kidney fraction of each 2x2 block: the mean of the 0/1 mask, by the same downsampling kernel.
    coverage = kernels.downsample_image((labels[start:stop] > 0).astype(np.uint16), 0.0, 1.0)
    arrays = {"image": image_half, "labels": labels_half, "coverage": coverage, "weights": weights}
    stats = {"num_slices": int(stop - start), "kidney_voxels": kidney, "tumor_voxels": tumor,
             "slice_range": [int(start), int(stop)], "shape": list(labels.shape),
             "half_shape": list(labels_half.shape)}
    return arrays, stats


def _write_entry(folder: Path, case: Case, params: PreprocessParams, expected: dict) -> CacheEntry:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # invalidate first: arrays change below
    arrays, stats = preprocess_case(case, params)
    for name, array in arrays.items():
        with atomic_path(folder / f"{name}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
    write_text_atomic(folder / "manifest.json", json.dumps({**expected, "stats": stats}, indent=1))
    return _load_entry(folder, expected)


def build_cache(cases: list[Case], params: PreprocessParams, cache_root: str | Path,
                progress=None) -> dict[str, CacheEntry]:
    """Preprocess every case not cached yet (or cached from other sources/params)."""
    root = Path(cache_root) / params.key()
    entries = {}
    for case in cases:
        folder = root / case.case_id
        expected = _manifest_for(case, params)
        entry = _load_entry(folder, expected)
        if entry is None:
            entry = _write_entry(folder, case, params, expected)
        entries[case.case_id] = entry
        if progress is not None:
            progress(case.case_id)
    return entries


def cached_entries(cases: list[Case], params: PreprocessParams, cache_root: str | Path) -> dict[str, CacheEntry]:
    """Entries written by `build_cache` (another rank built them); error when one is missing."""
    root = Path(cache_root) / params.key()
    out = {}
    for case in cases:
        entry = _load_entry(root / case.case_id, _manifest_for(case, params))
        if entry is None:
            raise RuntimeError(f"cache entry for {case.case_id} missing under {root}")
        out[case.case_id] = entry
    return out


def write_splits(run_dir: Path, *, data_dir: Path, seed: int, test: list[Case], train: list[str],
                 val: list[str], filtered: list[dict], params: PreprocessParams) -> None:
    """RUN_DIR/evaluation_data.json (the test split) and RUN_DIR/splits.json (everything)."""
    test_ids = [c.case_id for c in test]
    write_text_atomic(run_dir / "evaluation_data.json", json.dumps(
        {"data_dir": str(Path(data_dir).resolve()), "seed": seed, "test": test_ids}, indent=1))
    write_text_atomic(run_dir / "splits.json", json.dumps(
        {"data_dir": str(Path(data_dir).resolve()), "seed": seed, "train": train, "validation": val,
         "test": test_ids, "filtered": filtered, "preprocessing": asdict(params)}, indent=1))
