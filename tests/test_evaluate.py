"""`qnkit evaluate`: per-volume Dice on the original grid through qnkit.inference."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_evaluate_json_and_dice_floor(trained_run):
    result = json.loads((trained_run.parent / "evaluation.json").read_text())
    test = json.loads((trained_run / "evaluation_data.json").read_text())["test"]
    assert [r["case_id"] for r in result["cases"]] == test
    dices = [r["dice"] for r in result["cases"]]
    assert result["mean_dice"] == pytest.approx(np.mean(dices)) and result["std_dice"] == pytest.approx(np.std(dices))
    assert all(0 <= d <= 1 for d in dices)
    assert result["checkpoint"] == "best" and result["postprocess"] is True
    assert result["mean_dice_network"] == pytest.approx(np.mean([r["dice_network"] for r in result["cases"]]))
    # 3 epochs of a tiny network: far from converged, but clearly better than chance.
    assert result["mean_dice"] > 0.15


def test_evaluate_matches_a_direct_full_grid_computation(trained_run):
    from qnkit import io as qio
    from qnkit import kernels, resample
    from qnkit.inference import segment_volume
    from qnkit.nn.eager import make_predict_batch
    from qnkit.postprocess import kidney_sides
    from qnkit.segment import SegmentOptions
    from qnkit.train import checkpoint as ckpt
    from qnkit.train.evaluation import evaluate

    result = evaluate(trained_run, which="last", log=False)
    raw = evaluate(trained_run, which="last", postprocess=False, log=False)
    model, meta = ckpt.load_model(trained_run, "last")
    data = json.loads((trained_run / "evaluation_data.json").read_text())
    case = data["test"][0]
    ct, geometry = qio.load_image(f"{data['data_dir']}/{case}/imaging.nii.gz")
    labels, _ = qio.load_labels(f"{data['data_dir']}/{case}/segmentation.nii.gz")
    model_mm = meta["domain"]["pixel_spacing_mm"]  # the run's model works in millimetres
    mask, probs = segment_volume(ct, make_predict_batch(model), hu_window=(-200, 400), spacing_hw=geometry.spacing[1:],
                                 model_spacing=model_mm, batch_size=5)
    assert mask.shape == ct.shape  # full volume, original grid, no slice cropping
    assert probs.shape[1:] == resample.model_grid_shape(ct.shape[1:], geometry.spacing[1:], model_mm)
    target = (labels > 0).astype(np.uint8)
    assert result["cases"][0]["dice_network"] == pytest.approx(kernels.dice(mask, target))
    assert raw["cases"][0]["dice"] == raw["cases"][0]["dice_network"] == result["cases"][0]["dice_network"]
    assert raw["postprocess"] is False
    # scored as `qnkit segment` writes it: one kidney per side, stray pieces dropped
    kept = kidney_sides(mask, ct, geometry, SegmentOptions())[0] > 0
    assert not np.any(kept & (mask == 0))
    assert result["cases"][0]["dice"] == pytest.approx(kernels.dice(kept.astype(np.uint8), target))


def test_evaluate_cli_errors(run_qnkit, tmp_path, trained_run):
    proc = run_qnkit("evaluate", tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr
    proc = run_qnkit("evaluate", trained_run, "--checkpoint", "worst")
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    proc = run_qnkit("evaluate", trained_run, "--data", tmp_path)
    assert proc.returncode == 2 and "case_" in proc.stderr
