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
