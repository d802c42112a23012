"""The threshold calibrated on a run's validation phantoms (true kidney volume): fitted once per checkpoint,
used by `qnkit evaluate` and sealed into the bundle by `qnkit export`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


def test_memoised_prediction_runs_each_distinct_slice_once():
    from qnkit.train.evaluation import _memoised

    calls = []

    def predict(x, keep=None):
        calls.append(len(x))
        return x[:, :1] * 2.0

    rng = np.random.default_rng(0)
    a, b = rng.random((3, 2, 8, 8), dtype=np.float32), rng.random((2, 2, 8, 8), dtype=np.float32)
    memo = _memoised(predict)
    np.testing.assert_array_equal(memo(a), a[:, :1] * 2.0)
    both = np.concatenate([b[:1], a[1:], b[1:]])  # two new slices among two seen ones
    np.testing.assert_array_equal(memo(both), both[:, :1] * 2.0)
    assert calls == [3, 2]
    memo(a[::-1].copy())
    assert calls == [3, 2]  # all seen
    memo.forget()
    memo(a)
    assert calls == [3, 2, 3]
    keep = np.ones((3, 8, 2), dtype=np.float32)
    memo(a, keep)  # a Monte-Carlo sample is never cached
    assert calls[-1] == 3 and len(calls) == 4


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The shared trained run, copied: calibrating writes into the run folder."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_calibrated_threshold_is_fitted_on_validation_used_by_evaluate_and_sealed_by_export(run_copy, tmp_path):
    from qnkit import io as qio
    from qnkit.bundle import load_bundle
    from qnkit.export.bundle_writer import export_bundle
    from qnkit.nn.eager import make_predict_batch
    from qnkit.segment import SegmentOptions, model_arguments, segment_ct
    from qnkit.train import checkpoint as ckpt
    from qnkit.train.evaluation import (THRESHOLD_CANDIDATES, THRESHOLD_NAME, _case_files, calibrate_threshold,
                                        evaluate, run_threshold, split_cases)

    record = calibrate_threshold(run_copy)
    validation = json.loads((run_copy / "splits.json").read_text())["validation"]
    assert record["cases"] == validation and record["split"] == "validation"
    assert record["threshold"] in THRESHOLD_CANDIDATES
    table = {row["threshold"]: row["median_volume_ratio"] for row in record["table"]}
    assert sorted(table) == sorted(THRESHOLD_CANDIDATES)
    assert abs(table[record["threshold"]] - 1) == min(abs(r - 1) for r in table.values())
    assert json.loads((run_copy / THRESHOLD_NAME).read_text()) == record

    # The figure in the table is that of the plain path (no memo) at that threshold.
    model, meta = ckpt.load_model(run_copy, "best")
    data_dir, ids = split_cases(run_copy, None, "validation")
    ratios = []
    for case in ids:
        image, labels = _case_files(data_dir, case)
        ct, geometry = qio.load_image(image)
        truth = qio.load_labels(labels)[0] > 0
        mask, _, _ = segment_ct(ct, geometry, make_predict_batch(model), **{**model_arguments(meta),
                                "threshold": record["threshold"]}, options=SegmentOptions())
        ratios.append(np.count_nonzero(mask) / max(int(truth.sum()), 1))
    assert float(np.median(ratios)) == pytest.approx(table[record["threshold"]], abs=1e-4)

    assert run_threshold(run_copy, meta) == (record["threshold"], record)
    assert run_threshold(run_copy, {**meta, "files": {"model.safetensors": "another checkpoint"}})[1] is None
    assert evaluate(run_copy, log=False)["threshold"] == record["threshold"]
    assert evaluate(run_copy, log=False, threshold=0.5)["threshold"] == 0.5  # an explicit one wins

    export_bundle(run_copy, tmp_path / "bundle", log=lambda m: None)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.threshold == record["threshold"]
    assert bundle.metadata["threshold_calibration"]["table"] == record["table"]


def test_evaluate_cli_calibrates_and_refuses_two_thresholds(run_copy, run_qnkit):
    proc = run_qnkit("evaluate", run_copy, "--calibrate-threshold", "--threshold", "0.4")
    assert proc.returncode == 2 and "--calibrate-threshold" in proc.stderr
    proc = run_qnkit("evaluate", run_copy, "--calibrate-threshold", "--json", run_copy / "ev.json")
    assert proc.returncode == 0, proc.stderr
    fitted = json.loads((run_copy / "threshold.json").read_text())["threshold"]
    assert json.loads((run_copy / "ev.json").read_text())["threshold"] == fitted
    assert f"threshold {fitted:.2f}" in proc.stderr
