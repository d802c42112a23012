"""KiTS19 folder discovery, large-tumor filter, deterministic splits and the preprocessed cache.

Order of operations (so that the test set is never touched by training):
1. `discover_cases` lists `case_XXXXX/{imaging,segmentation}.nii[.gz]` and reads `kits.json`.
2. `split_test` draws the 80:20 test split from all cases with a seeded RNG; the names go to
   RUN_DIR/evaluation_data.json and training never opens those files.
3. `resolve_pixel_spacing` fixes the model's in-plane pixel spacing in mm ([DATA] pixel_spacing_mm:
   a number, or `auto` = 2 x the median pixel spacing of the training-pool headers), and
   `build_cache` preprocesses the remaining cases once (crop to the kidney slice range, image and
   kidney fraction resampled in-plane to that spacing by :mod:`qnkit.resample` -- the compiled 2x2
   kernels when a case is exactly 2:1 --, binary labels = fraction >= 0.5, border weights) into
   `.npy` files, recording tumor and kidney voxel counts on the way. Cases with different pixel
   sizes thus all reach the model at one spacing. For a 2.5-D model the image reaches further along z
   than the labels, by as many slices as its context planes reach (``image_slice_range`` in the
   manifest's stats), so that a slice's planes read the CT's own neighbours, as at inference.
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
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qnkit import kernels
from qnkit._atomic import atomic_path, write_text_atomic
from qnkit.errors import QnkitInputError

CACHE_VERSION = 3
CASE_RE = re.compile(r"^case_\d{5}$")
ARRAYS = ("image", "labels", "coverage", "weights")


@dataclass
class Case:
    case_id: str
    image: Path
    labels: Path
    radiographic_size_cm: float | None = None
    kits: dict = field(default_factory=dict)  # the case's kits.json record ({} without one)
    # optional hard_negatives.nii[.gz] beside them (qnkit synth's anatomy phantoms, version 5 on): background voxels
    # that [DATA] hard_negative_weight weighs up in the loss
    hard_negatives: Path | None = None


@dataclass
class PreprocessParams:
    hu_lo: float
    hu_hi: float
    slice_margin: int
    omega0: float
    # The model's in-plane pixel spacing (mm); None: half the resolution of each case (2x its own spacing).
    pixel_spacing_mm: float | None = None
    # A 2.5-D model's input planes per slice and their distance along z (mm); 1 and 0.0 for a 2-D model.
    context_planes: int = 1
    context_mm: float = 0.0
    # The loss weight of a case's hard negatives (its hard_negatives file) as a multiple of its kidney's class
    # weight; 0: none (and the file is not read).
    hard_negative_weight: float = 0.0
    # "median_frequency": QuickNAT's class weights (median class count / the pixel's class count, per volume);
    # "none": every pixel 1, as nnU-Net's cross-entropy. The border term omega0 is added either way.
    class_weights: str = "median_frequency"

    @classmethod
    def from_settings(cls, data, pixel_spacing_mm: float | None = None, context_planes: int = 1) -> "PreprocessParams":
        """The parameters of [DATA] `data`, the model's pixel spacing and its input planes per slice ([NETWORK]
        num_channels)."""
        return cls(float(data.hu_lo), float(data.hu_hi), int(data.slice_margin), float(data.omega0),
                   None if pixel_spacing_mm is None else float(pixel_spacing_mm), int(context_planes),
                   float(data.context_mm) if context_planes > 1 else 0.0, float(data.hard_negative_weight),
                   str(data.class_weights))

    @property
    def context(self) -> tuple[int, float | None]:
        """(planes per slice, their distance in mm) as :func:`qnkit.inference.model_context` gives them."""
        return (self.context_planes, self.context_mm) if self.context_planes > 1 else (1, None)

    def context_slices(self, slice_mm: float) -> int:
        """How many slices of `slice_mm` the outermost context plane lies from its slice (0 for a 2-D model)."""
        if self.context_planes == 1:
            return 0
        return int(math.ceil(self.context_planes // 2 * self.context_mm / float(slice_mm)))

    def record(self) -> dict:
        """The parameters as recorded (cache key, manifests, splits, checkpoints): a 2-D model's without the
        context fields and a run's without hard negatives without their weight, so that its records and cache
        are those of the runs before them."""
        record = asdict(self)
        if self.context_planes == 1:
            del record["context_planes"], record["context_mm"]
        if not self.hard_negative_weight:
            del record["hard_negative_weight"]
        if self.class_weights == "median_frequency":
            del record["class_weights"]
        return record

    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **self.record()}, sort_keys=True)
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
    stats: dict = field(default_factory=dict)  # the manifest's stats (shape, spacing_mm, model_shape, ...)

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
    records = _read_kits_json(data_dir / "kits.json")
    cases, incomplete = [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and CASE_RE.match(p.name)):
        image, labels = _find(folder, "imaging"), _find(folder, "segmentation")
        if image is None or labels is None:
            incomplete.append(folder.name)
            continue
        record = records.get(folder.name, {})
        size = record.get("radiographic_size")
        cases.append(Case(folder.name, image, labels, None if size is None else float(size), record,
                          _find(folder, "hard_negatives")))
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


def _read_kits_json(path: Path) -> dict[str, dict]:
    """case_id -> its record of an optional kits.json (radiographic_size checked to be a number)."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        out = {}
        for rec in records:
            if rec.get("radiographic_size") is not None:
                float(rec["radiographic_size"])
            out[str(rec["case_id"])] = dict(rec)
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


def filter_reasons(radiographic_size_cm: float | None, kidney_voxels: int, tumor_voxels: int, data) -> list[str]:
    """Why a case lies outside the seed's domain by the [DATA] filter rule (`data`: max_radiographic_size_cm,
    max_tumor_kidney_ratio): a tumor that distorts the kidney, or no kidney at all; [] for a case within it."""
    reasons = []
    limit = data.max_radiographic_size_cm
    if limit is not None and radiographic_size_cm is not None and radiographic_size_cm > limit:
        reasons.append(f"radiographic_size {radiographic_size_cm:g} cm > {limit:g} cm")
    limit = data.max_tumor_kidney_ratio
    if limit is not None and tumor_voxels > 0:
        ratio = tumor_voxels / max(kidney_voxels, 1)
        if ratio > limit:
            reasons.append(f"tumor/kidney voxel ratio {ratio:.3g} > {limit:g}")
    if kidney_voxels + tumor_voxels == 0:
        reasons.append("no kidney label")
    return reasons


def apply_filter(entries: dict[str, CacheEntry], cases: list[Case], data) -> tuple[list[str], list[dict]]:
    """(kept case ids, [{case_id, reason}]) by the DATA filter rule."""
    kept, filtered = [], []
    for case in cases:
        entry = entries[case.case_id]
        reasons = filter_reasons(case.radiographic_size_cm, entry.kidney_voxels, entry.tumor_voxels, data)
        if reasons:
            filtered.append({"case_id": case.case_id, "reason": "; ".join(reasons)})
        else:
            kept.append(case.case_id)
    return kept, filtered


def _identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _weighs_hard_negatives(case: Case, params: PreprocessParams) -> bool:
    """Whether preprocessing reads the case's hard-negative mask: it has one and the run weighs them."""
    return bool(params.hard_negative_weight) and case.hard_negatives is not None


def _manifest_for(case: Case, params: PreprocessParams) -> dict:
    sources = {"image": _identity(case.image), "labels": _identity(case.labels)}
    if _weighs_hard_negatives(case, params):
        sources["hard_negatives"] = _identity(case.hard_negatives)
    return {"version": CACHE_VERSION, "case_id": case.case_id, "params": params.record(), "sources": sources}


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
                      s["slice_range"], s)


def preprocess_case(case: Case, params: PreprocessParams) -> tuple[dict[str, np.ndarray], dict]:
    """Image, labels, kidney fraction and weights on the model's grid, cropped to the kidney slice range,
    and label stats.

    Image and kidney fraction ("coverage", the soft target) are resampled in-plane to
    `params.pixel_spacing_mm` by :mod:`qnkit.resample`; binary labels are coverage >= 0.5 and the
    border weights are computed from them. With `pixel_spacing_mm` None each case goes to half its
    own resolution (2x its spacing). For a 2.5-D model the image keeps the slices its context planes
    reach beyond the kidney range (within the volume; stats ``image_slice_range``).
    """
    from qnkit import io as qio
    from qnkit import resample

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
    if params.pixel_spacing_mm is None:
        spacing_hw, model_mm = (1.0, 1.0), 2.0
    else:
        spacing_hw, model_mm = igeom.spacing[1:], params.pixel_spacing_mm
    # Kidney fraction of each model pixel (tumor counts as kidney); exactly 2:1 it is the 2x2 block mean.
    coverage = resample.coverage_to_model_grid(labels[start:stop], spacing_hw, model_mm)
    labels_model = (coverage >= 0.5).view(np.uint8)
    reach = params.context_slices(igeom.spacing[0])
    image_start, image_stop = max(0, start - reach), min(labels.shape[0], stop + reach)
    image_model = resample.to_model_grid(image[image_start:image_stop], spacing_hw, model_mm,
                                         (params.hu_lo, params.hu_hi))
    weights = kernels.border_weights(labels_model, params.omega0)
    if params.class_weights == "none":
        weights = without_class_weights(weights, labels_model)
    hard = None
    if _weighs_hard_negatives(case, params):
        at_grid = _hard_negatives_at_grid(case, labels.shape, (start, stop), spacing_hw, model_mm)
        hard = weigh_hard_negatives(weights, labels_model, at_grid, params.hard_negative_weight)
    arrays = {"image": image_model, "labels": labels_model, "coverage": coverage, "weights": weights}
    stats = {"num_slices": int(stop - start), "kidney_voxels": kidney, "tumor_voxels": tumor,
             "slice_range": [int(start), int(stop)], "shape": list(labels.shape),
             "spacing_mm": [round(float(v), 6) for v in igeom.spacing], "model_shape": list(labels_model.shape)}
    if reach:
        stats["image_slice_range"] = [int(image_start), int(image_stop)]
    if hard is not None:
        stats["hard_negative_pixels"] = hard
    return arrays, stats


def without_class_weights(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """QuickNAT's `weights` of `labels` with the median-frequency class weight of each pixel replaced by 1 (the border
    term stays), in place: a false positive then costs what a missed kidney pixel costs, as in nnU-Net's loss.
    Median-frequency weights make a background pixel of an abdominal slice ~30x cheaper than a kidney pixel, which
    pushes every doubtful pixel next to a kidney (sinus, spleen, liver) into it."""
    weights -= kernels.class_weights(labels)[labels]
    weights += np.float32(1.0)
    return weights


def _hard_negatives_at_grid(case: Case, shape: tuple, span: tuple, spacing_hw, model_mm: float) -> np.ndarray:
    """The case's hard negatives on the model's grid (bool: at least half of a model pixel), its kidney slices."""
    from qnkit import io as qio
    from qnkit import resample

    mask, _ = qio.load_labels(case.hard_negatives)
    if mask.shape != tuple(shape):
        raise QnkitInputError(f"{case.case_id}: hard negatives {case.hard_negatives} have shape {mask.shape}, "
                              f"the labels {tuple(shape)}")
    if mask.max(initial=0) > 1:
        raise QnkitInputError(f"{case.hard_negatives}: a hard-negative mask holds 0 and 1 only")
    return resample.coverage_to_model_grid(mask[span[0]:span[1]], spacing_hw, model_mm) >= 0.5


def weigh_hard_negatives(weights: np.ndarray, labels: np.ndarray, hard: np.ndarray, factor: float) -> int:
    """Raise the loss weight of the background pixels of `hard` to `factor` times the kidney's class weight, in
    place, where it is lower: a false positive there then costs what a missed kidney pixel costs. The class weight
    is read from `weights` as its lowest kidney pixel (border pixels carry omega0 on top): the median-frequency
    weight of label 1, or 1 after :func:`without_class_weights`. Returns the pixels weighed."""
    hard = hard & (labels == 0)
    kidney = labels > 0
    if not hard.any() or not kidney.any():
        return 0
    kidney_weight = float(np.min(weights[kidney]))
    np.maximum(weights, np.float32(factor * kidney_weight), out=weights, where=hard)
    return int(hard.sum())


def case_spacings(cases: list[Case]) -> list[tuple[float, float, float]]:
    """(slice, row, column) voxel spacing in mm of each case's image, read from its header."""
    from qnkit import io as qio

    return [qio.load_geometry(case.image).spacing for case in cases]


def resolve_pixel_spacing(setting, cases: list[Case]) -> float:
    """The model's in-plane pixel spacing (mm) from [DATA] pixel_spacing_mm: the number given, or for
    `auto` 2 x the median in-plane pixel spacing of `cases` (their headers), rounded to 0.01 mm
    (KiTS19: ~1.6 mm, the report's half-resolution 256x256 input)."""
    text = str(setting).strip().lower()
    if text != "auto":
        return float(text)
    if not cases:
        raise QnkitInputError("[DATA] pixel_spacing_mm = auto needs at least one training case")
    inplane = [(row + col) / 2 for _, row, col in case_spacings(cases)]
    return max(0.01, round(2 * float(np.median(inplane)), 2))


def training_data_record(cases: list[Case]) -> dict:
    """Where the training cases came from: {"source": "synthetic", "generator": ..., "cases": n} when
    `qnkit synth` made them (kits.json `synthetic` / `qnkit_synth`, or the NIfTI descrip), else
    {"source": "kits19" | "other", "cases": n}. `generator` passes the kits.json "qnkit_synth"
    record through (one dict when all cases share it, else the list of distinct ones; None without)."""
    def synthetic(case: Case) -> bool:
        if case.kits:
            return bool(case.kits.get("synthetic")) or "qnkit_synth" in case.kits
        import nibabel as nib

        try:
            return bytes(nib.load(case.image).header["descrip"].item()).startswith(b"qnkit")
        except Exception:  # noqa: BLE001 - an unreadable header is simply not ours
            return False

    flags = [synthetic(c) for c in cases]
    if cases and all(flags):
        generators = []
        for case in cases:
            gen = case.kits.get("qnkit_synth")
            if gen is not None and gen not in generators:
                generators.append(gen)
        generator = generators[0] if len(generators) == 1 else (generators or None)
        return {"source": "synthetic", "generator": generator, "cases": len(cases)}
    kits19 = bool(cases) and not any(flags) and all("tumor_histologic_subtype" in c.kits for c in cases)
    return {"source": "kits19" if kits19 else "other", "cases": len(cases)}


def training_pad_multiple(entries: list[CacheEntry], pad_multiple: int) -> int:
    """Padding multiple that gives every training slice one shape, so that slices of cases with
    different model grids (other fields of view or pixel sizes) batch together: `pad_multiple` when
    all grids are equal, else the largest grid side padded to `pad_multiple` (every slice then pads
    to that square; padded pixels carry loss weight 0)."""
    grids = {tuple(e.stats["model_shape"][1:]) for e in entries if e.stats.get("model_shape")}
    if len(grids) <= 1:
        return int(pad_multiple)
    side = max(max(g) for g in grids)
    return -(-side // int(pad_multiple)) * int(pad_multiple)


def model_domain(params: PreprocessParams, entries: list[CacheEntry], cases: list[Case], pad_multiple: int) -> dict:
    """The model's domain for the checkpoint and the bundle: pixel spacing (mm), slice-thickness range
    of the training cases, HU window, input size (the training slices' grid padded to `pad_multiple`)
    and the training data's source; a 2.5-D model's also its context planes per slice and their distance
    in mm (``context_planes``, ``context_mm``: :func:`qnkit.inference.model_context` reads them)."""
    thickness = [e.stats["spacing_mm"][0] for e in entries if e.stats.get("spacing_mm")]
    grids = [e.stats["model_shape"][1:] for e in entries if e.stats.get("model_shape")]
    pad = max(1, int(pad_multiple))
    size = [-(-max(g[i] for g in grids) // pad) * pad for i in (0, 1)] if grids else None
    domain = {"pixel_spacing_mm": params.pixel_spacing_mm,
              "slice_thickness_mm": [min(thickness), max(thickness)] if thickness else None,
              "hu_window": [params.hu_lo, params.hu_hi], "input_size": size,
              "training_data": training_data_record(cases)}
    if params.context_planes > 1:
        domain.update(context_planes=params.context_planes, context_mm=params.context_mm)
    return domain


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


def _write_entries(missing: list[tuple], workers: int):
    """The entries of ``missing`` ((folder, case, params, expected) each) in order, written in ``workers``
    processes when there is more than one to write."""
    if workers <= 1 or len(missing) <= 1:
        yield from (_write_entry(*job) for job in missing)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent's OpenMP and torch thread pools do not survive a fork
    with ProcessPoolExecutor(min(workers, len(missing)), mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_write_entry, *zip(*missing))


def build_cache(cases: list[Case], params: PreprocessParams, cache_root: str | Path,
                progress=None, workers: int = 1) -> dict[str, CacheEntry]:
    """Preprocess every case not cached yet (or cached from other sources/params); with ``workers`` > 1
    the missing cases are preprocessed in that many processes (each case writes its own folder)."""
    root = Path(cache_root) / params.key()
    entries, missing = {}, []
    for case in cases:
        expected = _manifest_for(case, params)
        entry = _load_entry(root / case.case_id, expected)
        if entry is None:
            missing.append((root / case.case_id, case, params, expected))
        else:
            entries[case.case_id] = entry
            if progress is not None:
                progress(case.case_id)
    for (_, case, _, _), entry in zip(missing, _write_entries(missing, workers)):
        entries[case.case_id] = entry
        if progress is not None:
            progress(case.case_id)
    return {case.case_id: entries[case.case_id] for case in cases}


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
                 val: list[str], filtered: list[dict], params: PreprocessParams, domain: dict | None = None) -> None:
    """RUN_DIR/evaluation_data.json (the test split) and RUN_DIR/splits.json (everything)."""
    test_ids = [c.case_id for c in test]
    write_text_atomic(run_dir / "evaluation_data.json", json.dumps(
        {"data_dir": str(Path(data_dir).resolve()), "seed": seed, "test": test_ids}, indent=1))
    write_text_atomic(run_dir / "splits.json", json.dumps(
        {"data_dir": str(Path(data_dir).resolve()), "seed": seed, "train": train, "validation": val,
         "test": test_ids, "filtered": filtered, "preprocessing": params.record(), "domain": domain}, indent=1))
