"""--resume after a SIGKILL in the middle of an epoch reaches exactly the uninterrupted run's result."""
import json

import pytest

pytestmark = pytest.mark.slow

ARGS = ("--epochs", "3", "--num-filters", "4", "--micro-batch", "4", "--effective-batch", "8",
        "--no-progress", "--device", "cpu", "--seed", "1", "--num-workers", "0")


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_matches_uninterrupted_run(synth_dataset_factory, tmp_path, run_qnkit):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    synth_dataset = synth_dataset_factory(4, 64, 0)  # 2 training volumes: cheap
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_qnkit("train", "--data", synth_dataset, "--out", whole, *ARGS)
    assert proc.returncode == 0, proc.stderr
    proc = run_qnkit("train", "--data", synth_dataset, "--out", killed, *ARGS, env={"QNKIT_TEST_KILL_AT": "2:3"})
    assert proc.returncode == -9, proc.stderr  # SIGKILL in epoch 2, micro-step 3
    assert [r["epoch"] for r in _records(killed)] == [1]
    proc = run_qnkit("train", "--data", synth_dataset, "--out", killed, *ARGS)
    assert proc.returncode == 2 and "--resume" in proc.stderr  # never silently overwritten
    proc = run_qnkit("train", "--out", killed, "--resume", "--num-filters", "16")
    assert proc.returncode == 2 and "num_filters" in proc.stderr
    proc = run_qnkit("train", "--out", killed, "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    assert _records(killed) == _records(whole)
    for kind in ("best", "last"):
        a = load_file(str(whole / "checkpoints" / kind / "model.safetensors"))
        b = load_file(str(killed / "checkpoints" / kind / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), kind
    acc = EventAccumulator(str(killed / "tensorboard" / "validation"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
