"""`qnkit evaluate`: per-volume Dice, on the original grid, of the mask `qnkit segment` writes."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


# The session's trained run (conftest.SMALL_TRAIN_ARGS: 3 epochs, 8 filters, seed 0, one thread) scores a
# mean Dice of 0.369 (post-processed) and 0.367 (network) on its two test cases (2-core AMD EPYC); the
# floor sits under that with room for other CPUs' arithmetic, far above what a broken path gives (0 for an
# empty mask, 0.04-0.05 for a mask of the whole body of these phantoms).
DICE_FLOOR = 0.30


def test_evaluate_json_and_dice_floor(trained_run):
    from qnkit import io as qio

    result = json.loads((trained_run.parent / "evaluation.json").read_text())
    test = json.loads((trained_run / "evaluation_data.json").read_text())["test"]
    assert [r["case_id"] for r in result["cases"]] == test
    dices = [r["dice"] for r in result["cases"]]
    assert result["mean_dice"] == pytest.approx(np.mean(dices)) and result["std_dice"] == pytest.approx(np.std(dices))
    assert result["checkpoint"] == "best" and result["postprocess"] is True
    assert result["mean_dice_network"] == pytest.approx(np.mean([r["dice_network"] for r in result["cases"]]))
    for row in result["cases"]:
        labels, geometry = qio.load_labels(f"{result['data_dir']}/{row['case_id']}/segmentation.nii.gz")
        assert row["slices"] == labels.shape[0]
        assert row["kidney_ml"] == pytest.approx(np.count_nonzero(labels) * geometry.voxel_volume_ml)
        # Dice can be no higher than the two volumes allow: 2 min(P, T) / (P + T)
        predicted, truth = row["predicted_ml"], row["kidney_ml"]
        assert row["dice"] <= 2 * min(predicted, truth) / (predicted + truth) + 1e-3, row
    assert result["mean_dice"] >= DICE_FLOOR and result["mean_dice_network"] >= DICE_FLOOR, result["mean_dice"]
    # the seed's domain: the run's filter rule (tumor/kidney voxel ratio <= 1) applied to each test case
    for row in result["cases"]:
        labels, _ = qio.load_labels(f"{result['data_dir']}/{row['case_id']}/segmentation.nii.gz")
        ratio = np.count_nonzero(labels == 2) / max(1, np.count_nonzero(labels == 1))
        assert row["in_domain"] == (ratio <= 1.0) and ("out_of_domain" in row) == (not row["in_domain"])
    inside = [r for r in result["cases"] if r["in_domain"]]
    assert result["in_domain"]["cases"] == len(inside)
    if inside:
        assert result["in_domain"]["mean_dice"] == pytest.approx(np.mean([r["dice"] for r in inside]))


def test_in_domain_summary_names_the_worst_and_the_cases_left_out():
    from qnkit.train.evaluation import in_domain_summary

    rows = [{"case_id": "a", "dice": 0.9, "in_domain": True}, {"case_id": "b", "dice": 0.2, "in_domain": False},
            {"case_id": "c", "dice": 0.7, "in_domain": True}]
    assert in_domain_summary(rows) == {"cases": 2, "out_of_domain": ["b"], "mean_dice": pytest.approx(0.8),
                                       "min_dice": 0.7, "worst_case": "c"}
    assert in_domain_summary([{"case_id": "b", "dice": 0.2, "in_domain": False}]) == {"cases": 0,
                                                                                       "out_of_domain": ["b"]}


def _voxels(path) -> bytes:
    """A written mask's NIfTI, header and voxels, as bytes (the gzip wrapper's time stamp left out)."""
    import gzip

    return gzip.decompress(path.read_bytes())


def test_evaluate_scores_the_mask_segment_writes(run_qnkit, trained_run, exported_bundle, tmp_path):
    """One path: for each test case, the mask evaluate scores is byte for byte the mask `qnkit segment`
    writes with the bundle exported from the same checkpoint (eager torch, as evaluate runs it), with
    post-processing and without (--no-postprocess: the raw network mask evaluate scores beside it)."""
    from qnkit import io as qio
    from qnkit import kernels
    from qnkit.train.evaluation import evaluate

    data = json.loads((trained_run / "evaluation_data.json").read_text())
    cases = [f"{data['data_dir']}/{case}" for case in data["test"]]
    results = {}
    for name, flags in (("kept", ()), ("raw", ("--no-postprocess",))):
        results[name] = evaluate(trained_run, which="best", postprocess=not flags,
                                 masks_dir=tmp_path / f"evaluate_{name}", log=False)
        proc = run_qnkit("segment", *cases, "--model", exported_bundle, "--backend", "torch", "--out",
                         tmp_path / f"segment_{name}", "--no-progress", *flags)
        assert proc.returncode == 0, proc.stderr
        for row in results[name]["cases"]:
            ours = tmp_path / f"evaluate_{name}" / f"{row['case_id']}_kidneys.nii.gz"
            assert _voxels(ours) == _voxels(tmp_path / f"segment_{name}" / ours.name), (name, row["case_id"])
            mask, _ = qio.load_labels(ours)
            labels, _ = qio.load_labels(f"{data['data_dir']}/{row['case_id']}/segmentation.nii.gz")
            assert row["dice"] == kernels.dice(mask, (labels > 0).astype(np.uint8))
    kept, raw = results["kept"]["cases"], results["raw"]["cases"]
    assert [r["dice"] for r in raw] == [r["dice_network"] for r in raw] == [r["dice_network"] for r in kept]


def test_evaluate_cli_errors(run_qnkit, tmp_path, trained_run):
    proc = run_qnkit("evaluate", tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr
    proc = run_qnkit("evaluate", trained_run, "--checkpoint", "worst")
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    proc = run_qnkit("evaluate", trained_run, "--data", tmp_path)
    assert proc.returncode == 2 and "case_" in proc.stderr
