"""End to end on a tiny synthetic dataset: run folder, checkpoints, metrics, TensorBoard."""
import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_run_folder_layout(trained_run):
    for name in ("settings.ini", "evaluation_data.json", "splits.json", "metrics.jsonl",
                 "checkpoints/best/model.safetensors", "checkpoints/best/meta.json",
                 "checkpoints/last/model.safetensors", "checkpoints/last/state.pt", "checkpoints/last/meta.json"):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.rglob("*.tmp*")) and not list((trained_run / "checkpoints").glob(".*"))
    splits = json.loads((trained_run / "splits.json").read_text())
    test = json.loads((trained_run / "evaluation_data.json").read_text())["test"]
    assert test == splits["test"] and len(test) == 2
    assert not set(test) & set(splits["train"] + splits["validation"])
    cached = {p.name for p in (trained_run / "cache").glob("*/case_*")}
    assert not cached & set(test), "training preprocessed a test case"


def test_metrics_finite_and_loss_decreasing(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("train_loss", "val_loss", "train_dice", "val_dice"):
            assert math.isfinite(r[key]), key
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_checkpoint_metadata_and_safe_loading(trained_run):
    import torch

    from qnkit.train import checkpoint as ckpt

    model, meta = ckpt.load_model(trained_run, "best")
    assert meta["network"]["num_filters"] == 8 and meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["preprocessing"]["hu_lo"] == -200 and meta["settings"]["TRAINING"]["epochs"] == 3
    assert meta["metrics"]["val_dice"] == max(
        json.loads(line)["val_dice"] for line in (trained_run / "metrics.jsonl").read_text().splitlines())
    state = ckpt.load_state(ckpt.locate(trained_run, "last"))  # torch.load(weights_only=True)
    assert state["loop"]["epoch"] == 3 and "optimizer" in state and isinstance(state["rng"]["torch"], torch.Tensor)
    x = torch.zeros(1, 1, 32, 32)
    assert model(x).shape == x.shape


def test_checkpoint_hash_mismatch_is_detected(trained_run, tmp_path):
    import shutil

    from qnkit.errors import QnkitInputError
    from qnkit.train import checkpoint as ckpt

    copy = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", copy / "checkpoints")
    weights = copy / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(QnkitInputError, match="sha256"):
        ckpt.load_model(copy, "best")


def test_tensorboard_writers_hold_per_epoch_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for writer in ("train", "validation", "evaluation"):
        folder = trained_run / "tensorboard" / writer
        assert list(folder.glob("events.out.tfevents.*")), writer
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        steps[writer] = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        if writer != "evaluation":
            assert {"best_batch", "worst_batch"} <= set(acc.Tags()["images"])
    assert steps["train"]["loss"] == [1, 2, 3] and steps["train"]["dice"] == [1, 2, 3]
    assert steps["validation"]["loss"] == [1, 2, 3] and steps["validation"]["dice"] == [1, 2, 3]
    assert len(steps["evaluation"]["dice"]) >= 1


def test_window_training_with_a_reference_set(synth_dataset, synth_dataset_factory, tmp_path, run_qnkit):
    """--crop-size trains on windows (validation on whole slices), --reference-data scores a fixed set after every
    epoch, and every epoch records its CPU and wall time, cumulated; resuming without windows goes on from there."""
    run = tmp_path / "run"
    reference = synth_dataset_factory(cases=3, size=64, seed=1)  # other cases under the same ids (case_00000 ...)
    args = ("--epochs", "1", "--num-filters", "4", "--micro-batch", "4", "--effective-batch", "4", "--no-progress",
            "--device", "cpu", "--min-steps-per-epoch", "0")
    proc = run_qnkit("train", "--data", synth_dataset, "--out", run, *args, "--crop-size", "32",
                     "--reference-data", reference)
    assert proc.returncode == 0, proc.stderr
    proc = run_qnkit("train", "--out", run, "--resume", "--epochs", "2", "--crop-size", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    first, second = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert first["train_slice_side"] == 32 and second["train_slice_side"] is None
    for r in (first, second):
        assert 0 <= r["reference_dice"] <= 1 and math.isfinite(r["reference_loss"]) and r["reference_seconds"] >= 0
        assert r["cpu_seconds"] > 0 and r["seconds"] > 0
    assert second["cpu_hours"] == pytest.approx(first["cpu_hours"] + second["cpu_seconds"] / 3600, abs=2e-4)
    assert second["wall_hours"] > first["wall_hours"]
    cached = {p.name for p in (run / "cache" / "reference").glob("*/case_*")}
    assert cached == {"case_00000", "case_00001", "case_00002"}  # the run's own preprocessing, in a cache of its own
