"""Test-set evaluation of a run: per-volume Dice of the mask `qnkit segment` writes, on the ORIGINAL grid.

Each test case of RUN_DIR/evaluation_data.json goes through :func:`qnkit.segment.segment_ct`, the one
path `qnkit segment` runs (the kidneys' slab, each slice resampled to the model's pixel spacing, the
probabilities brought back to the case's grid, post-processed: one kidney per side, stray pieces
dropped), with segment's default options and the checkpoint on the eager torch backend, so the figure
is that of the mask a user gets. Each case also keeps the network's raw mask Dice (`dice_network`: the
same prediction before post-processing). Masks are compared with the labels (tumor counts as kidney).
Mean and standard deviation over volumes go to the evaluation TensorBoard writer at the checkpoint's
epoch and to RUN_DIR/test_dice.json, from where `qnkit export` copies them into the bundle's domain record.

With `quality`, the same pass also draws `qnkit segment --quality --uncertainty N`'s mirror pass and
Monte-Carlo samples and gives each kidney its verdict beside its true Dice (:mod:`qnkit.quality_eval`),
with the calibration a bundle would carry or, given none, qnkit's default limits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qnkit import kernels
from qnkit._atomic import write_text_atomic
from qnkit.errors import QnkitInputError

#: RUN_DIR file with the last test evaluation's summary (checkpoint, epoch, mean and std Dice, cases).
TEST_DICE_NAME = "test_dice.json"
#: RUN_DIR file with the threshold calibrated on the validation split (:func:`calibrate_threshold`).
THRESHOLD_NAME = "threshold.json"
#: Thresholds tried by the calibration.
THRESHOLD_CANDIDATES = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.30 ... 0.70


def test_cases(run_dir: Path, data_dir: Path | None) -> tuple[Path, list[str]]:
    path = Path(run_dir) / "evaluation_data.json"
    try:
        record = json.loads(path.read_text())
        ids = list(record["test"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QnkitInputError(f"{path}: missing or unreadable test split ({exc.__class__.__name__})") from None
    if not ids:
        raise QnkitInputError(f"{path}: the test split is empty ([DATA] test_fraction = 0?)")
    return Path(data_dir or record["data_dir"]), ids


def split_cases(run_dir: Path, data_dir: Path | None, split: str) -> tuple[Path, list[str]]:
    """(data folder, case ids) of a run's `split`: "test" (evaluation_data.json) or "validation" (splits.json)."""
    if split == "test":
        return test_cases(run_dir, data_dir)
    path = Path(run_dir) / "splits.json"
    try:
        record = json.loads(path.read_text())
        ids = list(record[split])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QnkitInputError(f"{path}: missing or unreadable {split} split ({exc.__class__.__name__})") from None
    if not ids:
        raise QnkitInputError(f"{path}: the {split} split is empty")
    return Path(data_dir or record["data_dir"]), ids


def run_threshold(run_dir: Path, meta: dict) -> tuple[float, dict | None]:
    """The threshold a run's checkpoint ships with: the calibrated one and its record where
    :func:`calibrate_threshold` fitted RUN_DIR/threshold.json to this checkpoint (the SHA-256 of its files),
    else [EVAL] threshold and None."""
    from qnkit.segment import model_arguments

    try:
        record = json.loads((Path(run_dir) / THRESHOLD_NAME).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("checkpoint_sha256") == meta.get("files"):
        return float(record["threshold"]), record
    return float(model_arguments(meta)["threshold"]), None


def _memoised(predict_batch):
    """`predict_batch` that runs each distinct input slice through the network once (keyed by its bytes):
    segmenting a case at several thresholds then costs one pass of the network."""
    import hashlib

    seen: dict[bytes, np.ndarray] = {}

    def predict(x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        if keep is not None:
            return predict_batch(x, keep)
        keys = [hashlib.blake2b(np.ascontiguousarray(s).tobytes(), digest_size=16).digest() for s in x]
        todo = [i for i, k in enumerate(keys) if k not in seen]
        if todo:
            for i, y in zip(todo, predict_batch(np.ascontiguousarray(x[todo]))):
                seen[keys[i]] = y
        return np.stack([seen[k] for k in keys])

    predict.forget = seen.clear
    return predict


def calibrate_threshold(run_dir: Path, *, data_dir: Path | None = None, which: str = "best", device: str = "cpu",
                        batch_size: int | None = None, candidates=THRESHOLD_CANDIDATES, progress=None) -> dict:
    """The probability threshold at which the run's masks have the true kidney volume on its validation
    phantoms (never the test split, never a real CT), written to RUN_DIR/threshold.json for this checkpoint.

    A model's volume bias is what dosimetry inherits (absorbed dose = energy / mass): a checkpoint that
    draws its masks a few per cent outward on its own phantoms does so on patients. Each validation case
    goes through `qnkit segment`'s path (:func:`qnkit.segment.segment_ct`, post-processing included) at
    every candidate threshold, the network run once per slice; the threshold kept is the one whose median
    predicted / true volume over the cases is closest to 1 (the mean Dice at each is recorded beside it).
    `qnkit evaluate` and `qnkit export` then use it for this checkpoint.
    """
    from qnkit import io as qio
    from qnkit.nn.eager import make_predict_batch
    from qnkit.segment import SegmentOptions, model_arguments, segment_ct
    from qnkit.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    data_dir, ids = split_cases(run_dir, data_dir, "validation")
    model, meta = ckpt.load_model(run_dir, which)
    arguments = model_arguments(meta)
    ev = meta.get("settings", {}).get("EVAL", {})
    options = SegmentOptions(batch_size=batch_size or int(ev.get("batch_size", 16)))
    predict = _memoised(make_predict_batch(model, device))
    candidates = sorted(float(t) for t in candidates)
    ratios = np.zeros((len(ids), len(candidates)))
    dices = np.zeros_like(ratios)
    for row, case_id in enumerate(ids):
        image_path, labels_path = _case_files(data_dir, case_id)
        ct, geometry = qio.load_image(image_path)
        labels, _ = qio.load_labels(labels_path)
        target = (labels > 0).astype(np.uint8)
        true = max(int(target.sum()), 1)
        for col, t in enumerate(candidates):
            mask, _, _ = segment_ct(ct, geometry, predict, **{**arguments, "threshold": t}, options=options)
            ratios[row, col] = np.count_nonzero(mask) / true
            dices[row, col] = kernels.dice(mask, target)
        predict.forget()
        if progress is not None:
            progress(case_id, dict(zip(candidates, ratios[row])))
    median = np.median(ratios, axis=0)
    best = int(np.argmin(np.abs(median - 1.0)))
    record = {"threshold": candidates[best], "split": "validation", "cases": ids, "checkpoint": which,
              "epoch": meta.get("epoch"), "checkpoint_sha256": meta.get("files", {}),
              "rule": "median predicted / true kidney volume over the validation cases closest to 1",
              "default_threshold": float(arguments["threshold"]),
              "table": [{"threshold": t, "median_volume_ratio": round(float(m), 4),
                         "mean_dice": round(float(d), 4)}
                        for t, m, d in zip(candidates, median, dices.mean(axis=0))]}
    write_text_atomic(run_dir / THRESHOLD_NAME, json.dumps(record, indent=1))
    return record


def _case_files(data_dir: Path, case_id: str) -> tuple[Path, Path]:
    from qnkit.train.data import _find

    folder = data_dir / case_id
    image, labels = _find(folder, "imaging"), _find(folder, "segmentation")
    if image is None or labels is None:
        raise QnkitInputError(f"{folder}: test case without imaging.nii[.gz] and segmentation.nii[.gz]")
    return image, labels


def _filter_rule(meta: dict):
    """The [DATA] filter rule the checkpoint's run trained under (its settings; the defaults where absent)."""
    from qnkit.train.settings import Settings

    data = (meta.get("settings") or {}).get("DATA") or {}
    rule = {k: data[k] for k in ("max_radiographic_size_cm", "max_tumor_kidney_ratio") if k in data}
    return Settings.from_dict({"DATA": rule}, "the checkpoint's settings").data


def _radiographic_sizes(data_dir: Path) -> dict:
    """case_id -> kits.json radiographic_size (cm) of the cases that have one."""
    from qnkit.train.data import _read_kits_json

    records = _read_kits_json(Path(data_dir) / "kits.json")
    return {case: float(r["radiographic_size"]) for case, r in records.items() if r.get("radiographic_size") is not None}


def in_domain_summary(rows: list[dict]) -> dict:
    """The test cases within the seed's domain (the run's own filter rule: a tumor that distorts the kidney is out
    of it, as the seed's test set left such cases out): how many, their mean and lowest Dice and the worst case;
    the cases left out, by name."""
    kept = [r for r in rows if r.get("in_domain", True)]
    out = {"cases": len(kept), "out_of_domain": [r["case_id"] for r in rows if not r.get("in_domain", True)]}
    if kept:
        worst = min(kept, key=lambda r: r["dice"])
        out.update(mean_dice=float(np.mean([r["dice"] for r in kept])), min_dice=float(worst["dice"]),
                   worst_case=worst["case_id"])
    return out


def evaluate(run_dir: Path, *, data_dir: Path | None = None, which: str | None = None, device: str = "cpu",
             batch_size: int | None = None, threshold: float | None = None, postprocess: bool = True,
             mirror: bool = False, masks_dir: Path | None = None, progress=None, log: bool = True,
             quality: bool = False, uncertainty: int = 0, seed: int = 0, calibration: dict | None = None) -> dict:
    """{'checkpoint', 'epoch', 'postprocess', 'mean_dice', 'std_dice', 'mean_dice_network', 'in_domain',
    'cases': [{case_id, dice, dice_network, in_domain, ...}]}; `dice` scores the post-processed mask when
    `postprocess`. `mean_dice` is over every test case; `in_domain` (:func:`in_domain_summary`) over those the run's
    filter rule keeps, as the seed's test set was.

    `quality` (or `uncertainty` > 0): each case also gets "kidneys" ({"right", "left"}:
    :func:`qnkit.quality_eval.judged_kidneys`) and the result a "quality" summary
    (:func:`qnkit.quality_eval.quality_summary`); `calibration`: the limits ({"limits": ...}; default: qnkit's).

    `masks_dir`: each case's scored mask is also written there, named and encoded as `qnkit segment`
    writes it (CASE_kidneys.nii.gz), to look at or to compare with segment's.
    """
    from qnkit import io as qio
    from qnkit.nn.eager import make_predict_batch
    from qnkit.segment import MASK_SUFFIX, SegmentOptions, model_arguments, segment_ct
    from qnkit.train import checkpoint as ckpt
    from qnkit.train.data import filter_reasons
    from qnkit.train.tb_logging import Logger, tensorboard_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QnkitInputError(f"run folder not found: {run_dir}")
    data_dir, ids = test_cases(run_dir, data_dir)
    if which is None:  # the run's [EVAL] checkpoint
        from qnkit.train.settings import read_ini

        ini = run_dir / "settings.ini"
        which = read_ini(ini).eval.checkpoint if ini.is_file() else "best"
    model, meta = ckpt.load_model(run_dir, which)
    ev = meta.get("settings", {}).get("EVAL", {})
    arguments = model_arguments(meta)
    arguments["threshold"] = float(threshold) if threshold is not None else run_threshold(run_dir, meta)[0]
    quality = quality or uncertainty > 0
    options = SegmentOptions(batch_size=batch_size or int(ev.get("batch_size", 16)), postprocess=postprocess,
                             mirror=mirror, quality=quality, uncertainty=uncertainty, seed=seed)
    if quality:
        from qnkit import quality as Q
        from qnkit import quality_eval as QE

        limits, source = (calibration, "given") if calibration else Q.calibration_of(None)
    predict = make_predict_batch(model, device)
    domain_rule = _filter_rule(meta)
    radiographic = _radiographic_sizes(data_dir)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id in ids:
        image_path, labels_path = _case_files(data_dir, case_id)
        ct, geometry = qio.load_image(image_path)
        labels, _ = qio.load_labels(labels_path)
        if ct.shape != labels.shape:
            raise QnkitInputError(f"{case_id}: image shape {ct.shape} and label shape {labels.shape} differ")
        target = (labels > 0).astype(np.uint8)
        network, drawn = {}, []
        mask, sides, _ = segment_ct(ct, geometry, predict, **arguments, options=options, samples_out=drawn,
                                    network_mask=lambda raw: network.update(dice=kernels.dice(raw, target)))
        if masks_dir is not None:
            qio.save_mask(mask, geometry, Path(masks_dir) / f"{case_id}{MASK_SUFFIX}", overwrite=True)
        ml = float(geometry.voxel_volume_ml)
        outside = filter_reasons(radiographic.get(case_id), int(np.count_nonzero(labels == 1)),
                                 int(np.count_nonzero(labels == 2)), domain_rule)
        rows.append({"case_id": case_id, "dice": kernels.dice(mask, target), "dice_network": network["dice"],
                     "slices": int(ct.shape[0]), "kidney_ml": float(target.sum()) * ml,
                     "predicted_ml": float(np.count_nonzero(mask)) * ml, "in_domain": not outside,
                     **({"out_of_domain": "; ".join(outside)} if outside else {})})
        if quality:
            verdicts = Q.kidney_quality(sides, ct, geometry.spacing, drawn[0] if drawn else None, limits, source)
            rows[-1]["kidneys"] = QE.judged_kidneys(sides, QE.labelled_sides(labels, ct, geometry), verdicts, ml)
        if progress is not None:
            progress(rows[-1])
    dices = np.array([r["dice"] for r in rows])
    result = {"run_dir": str(run_dir.resolve()), "checkpoint": which, "epoch": meta["epoch"],
              "checkpoint_sha256": meta.get("files", {}),
              "data_dir": str(data_dir), "threshold": arguments["threshold"], "postprocess": postprocess,
              "mirror": mirror, "mean_dice": float(dices.mean()), "std_dice": float(dices.std()),
              "mean_dice_network": float(np.mean([r["dice_network"] for r in rows])),
              "in_domain": in_domain_summary(rows), "cases": rows}
    if quality:
        kidneys = [k for r in rows for k in r["kidneys"].values() if k is not None]
        result["quality"] = {"uncertainty": uncertainty, "seed": seed, "calibration": source,
                             **QE.quality_summary(kidneys)}
    if log:
        log_dir = meta.get("settings", {}).get("COMMON", {}).get("log_dir", "")
        logger = Logger(run_dir, log_dir=log_dir, writers=("evaluation",))
        logger.scalars("evaluation", meta["epoch"], {"dice": result["mean_dice"], "dice_std": result["std_dice"],
                                                     "dice_network": result["mean_dice_network"]})
        logger.text("evaluation", "cases", "\n".join(f"{r['case_id']}: {r['dice']:.4f}" for r in rows), meta["epoch"])
        logger.close()
        result["tensorboard"] = str(tensorboard_dir(run_dir, log_dir) / "evaluation")
        write_text_atomic(run_dir / TEST_DICE_NAME, json.dumps(
            {"checkpoint": which, "epoch": meta["epoch"], "postprocess": postprocess, "mirror": mirror,
             "threshold": arguments["threshold"], "mean_dice": result["mean_dice"], "std_dice": result["std_dice"],
             "mean_dice_network": result["mean_dice_network"], "cases": len(rows),
             "in_domain": result["in_domain"]}, indent=1))
    return result
