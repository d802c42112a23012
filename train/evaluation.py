"""Test-set evaluation of a run: per-volume Dice on the ORIGINAL image grid.

Each test case of RUN_DIR/evaluation_data.json is segmented whole (no slice cropping) through
`qnkit.inference.segment_volume`, the path `qnkit segment` uses, with the eager torch backend (each
slice resampled to the model's pixel spacing and the probabilities brought back to the case's grid),
then post-processed as `qnkit segment` does by default (one kidney per side, stray pieces dropped), so the
figure is that of the mask a user gets; each case also keeps the network's raw mask Dice (`dice_network`).
Masks are compared with the labels (tumor counts as kidney). Mean and standard deviation over volumes go to
the evaluation TensorBoard writer at the checkpoint's epoch and to RUN_DIR/test_dice.json, from where
`qnkit export` copies them into the bundle's domain record.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qnkit import kernels
from qnkit._atomic import write_text_atomic
from qnkit.errors import QnkitInputError
from qnkit.inference import mirrored, model_pixel_spacing, segment_volume

#: RUN_DIR file with the last test evaluation's summary (checkpoint, epoch, mean and std Dice, cases).
TEST_DICE_NAME = "test_dice.json"


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


def _case_files(data_dir: Path, case_id: str) -> tuple[Path, Path]:
    from qnkit.train.data import _find

    folder = data_dir / case_id
    image, labels = _find(folder, "imaging"), _find(folder, "segmentation")
    if image is None or labels is None:
        raise QnkitInputError(f"{folder}: test case without imaging.nii[.gz] and segmentation.nii[.gz]")
    return image, labels


def evaluate(run_dir: Path, *, data_dir: Path | None = None, which: str | None = None, device: str = "cpu",
             batch_size: int | None = None, threshold: float | None = None, postprocess: bool = True,
             mirror: bool = False, progress=None, log: bool = True) -> dict:
    """{'checkpoint', 'epoch', 'postprocess', 'mean_dice', 'std_dice', 'mean_dice_network',
    'cases': [{case_id, dice, dice_network, ...}]}; `dice` scores the post-processed mask when `postprocess`."""
    from qnkit import io as qio
    from qnkit.nn.eager import make_predict_batch
    from qnkit.postprocess import kidney_sides
    from qnkit.segment import SegmentOptions
    from qnkit.train import checkpoint as ckpt
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
    pre = meta["preprocessing"]
    ev = meta.get("settings", {}).get("EVAL", {})
    threshold = float(pre.get("threshold", 0.5) if threshold is None else threshold)
    batch_size = batch_size or int(ev.get("batch_size", 16))
    predict = make_predict_batch(model, device)
    if mirror:
        predict = mirrored(predict)
    rows = []
    for case_id in ids:
        image_path, labels_path = _case_files(data_dir, case_id)
        ct, geometry = qio.load_image(image_path)
        labels, _ = qio.load_labels(labels_path)
        if ct.shape != labels.shape:
            raise QnkitInputError(f"{case_id}: image shape {ct.shape} and label shape {labels.shape} differ")
        mask, _ = segment_volume(ct, predict, hu_window=(pre["hu_lo"], pre["hu_hi"]), spacing_hw=geometry.spacing[1:],
                                 model_spacing=model_pixel_spacing(meta), batch_size=batch_size,
                                 threshold=threshold, pad_multiple=int(pre.get("pad_multiple", 16)))
        target = (labels > 0).astype(np.uint8)
        ml = float(geometry.voxel_volume_ml)
        raw_dice = kernels.dice(mask, target)
        if postprocess:
            mask = (kidney_sides(mask, ct, geometry, SegmentOptions())[0] > 0).astype(np.uint8)
        rows.append({"case_id": case_id, "dice": kernels.dice(mask, target), "dice_network": raw_dice,
                     "slices": int(ct.shape[0]), "kidney_ml": float(target.sum()) * ml,
                     "predicted_ml": float(mask.sum()) * ml})
        if progress is not None:
            progress(rows[-1])
    dices = np.array([r["dice"] for r in rows])
    result = {"run_dir": str(run_dir.resolve()), "checkpoint": which, "epoch": meta["epoch"],
              "checkpoint_sha256": meta.get("files", {}),
              "data_dir": str(data_dir), "threshold": threshold, "postprocess": postprocess,
              "mirror": mirror, "mean_dice": float(dices.mean()), "std_dice": float(dices.std()),
              "mean_dice_network": float(np.mean([r["dice_network"] for r in rows])), "cases": rows}
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
             "mean_dice": result["mean_dice"], "std_dice": result["std_dice"],
             "mean_dice_network": result["mean_dice_network"], "cases": len(rows)}, indent=1))
    return result
