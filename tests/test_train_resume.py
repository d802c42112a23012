"""--resume after a SIGKILL in the middle of an epoch reaches exactly the uninterrupted run's result.

The kill comes from the test, not from the shipped solver: `qnkit train` runs in a subprocess whose
Solver.train_epoch is wrapped so that its loader SIGKILLs the process at one (epoch, micro-step).
"""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ARGS = ("--epochs", "3", "--num-filters", "4", "--micro-batch", "4", "--effective-batch", "8",
        "--min-steps-per-epoch", "0", "--no-progress", "--device", "cpu", "--seed", "1", "--num-workers", "0")


KILL_AT_STEP = """
import os, signal, sys
from qnkit.train.solver import Solver

kill_epoch, kill_step = map(int, sys.argv[1].split(":"))
train_epoch = Solver.train_epoch


class KillingLoader:
    def __init__(self, loader, epoch):
        self.loader, self.epoch = loader, epoch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader):
            if (self.epoch, step) == (kill_epoch, kill_step):
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


Solver.train_epoch = lambda self, loader, n, epoch, *rest: train_epoch(self, KillingLoader(loader, epoch), n, epoch, *rest)
from qnkit.cli import main
main(sys.argv[2:])
"""


def _train_killed_at(kill_at: str, *args):
    """`qnkit train ARGS` SIGKILLed at the start of micro-step STEP of epoch EPOCH ("EPOCH:STEP")."""
    import os

    env = {**os.environ, "QNKIT_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, kill_at, "train", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def _records(run):
    timing = {"seconds", "cpu_seconds", "cpu_hours", "wall_hours"}  # how long it took differs; what it computed not
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_matches_uninterrupted_run(synth_dataset_factory, tmp_path, run_qnkit):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    synth_dataset = synth_dataset_factory(4, 64, 0)  # 2 training volumes: cheap
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_qnkit("train", "--data", synth_dataset, "--out", whole, *ARGS)
    assert proc.returncode == 0, proc.stderr
    proc = _train_killed_at("2:3", "--data", synth_dataset, "--out", killed, *ARGS)
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


def test_resume_with_a_new_schedule_restarts_it_there(synth_dataset_factory, tmp_path, run_qnkit):
    """--resume --lr/--step-size: a warm restart from the new lr at the resumed epoch, written to the
    run's settings.ini so that a later plain --resume continues that schedule instead of restarting again."""
    synth_dataset = synth_dataset_factory(4, 64, 0)
    run = tmp_path / "run"
    first = ("--epochs", "2", "--num-filters", "4", "--micro-batch", "4", "--effective-batch", "8", "--lr", "1e-3",
             "--min-steps-per-epoch", "0",
             "--no-progress", "--device", "cpu", "--seed", "1", "--num-workers", "0")
    proc = run_qnkit("train", "--data", synth_dataset, "--out", run, *first)
    assert proc.returncode == 0, proc.stderr
    assert [r["lr"] for r in _records(run)] == [1e-3, 1e-3]  # step_size 50: no decay yet
    proc = run_qnkit("train", "--out", run, "--resume", "--epochs", "4", "--lr", "4e-3", "--step-size", "1",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "schedule restarted at epoch 2: lr 0.004" in " ".join(proc.stderr.split())
    proc = run_qnkit("train", "--out", run, "--resume", "--epochs", "5", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "restarted" not in proc.stderr
    assert [r["lr"] for r in _records(run)] == [1e-3, 1e-3, 4e-3, 2e-3, 1e-3]
    assert "lr = 0.004" in (run / "settings.ini").read_text()


def _parameters(path):
    """Trainable weights of a checkpoint (BatchNorm's running statistics move even at lr ~ 0)."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if "running_" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def source_run(synth_dataset_factory, tmp_path_factory, run_qnkit):
    """A one-epoch run to start others from."""
    source = tmp_path_factory.mktemp("init_source") / "source"
    proc = run_qnkit("train", "--data", synth_dataset_factory(4, 64, 0), "--out", source, "--epochs", "1", *ARGS[2:])
    assert proc.returncode == 0, proc.stderr
    return source


def test_init_from_fine_tunes_another_runs_best_weights(source_run, synth_dataset_factory, tmp_path, run_qnkit):
    """--init-from: the new run starts from the source's best weights (at lr ~ 0 it ends where they were),
    takes its settings and pixel spacing, records where its weights came from, and keeps that on --resume."""
    import torch

    source, tuned = source_run, tmp_path / "tuned"
    proc = run_qnkit("train", "--data", synth_dataset_factory(4, 64, 3), "--out", tuned, "--init-from", source,
                     "--epochs", "1", "--lr", "1e-12", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "weights from" in proc.stderr

    best = json.loads((source / "checkpoints" / "best" / "meta.json").read_text())
    meta = json.loads((tuned / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["initialised_from"] == {"run_dir": str(source.absolute()), "checkpoint": "best",
                                        "epoch": best["epoch"], "model_sha256": best["files"]["model.safetensors"]}
    assert meta["network"] == best["network"]  # the source's settings.ini: 4 filters without saying so
    assert meta["domain"]["pixel_spacing_mm"] == best["domain"]["pixel_spacing_mm"]
    start, end = _parameters(source / "checkpoints" / "best" / "model.safetensors"), \
        _parameters(tuned / "checkpoints" / "last" / "model.safetensors")
    assert start.keys() == end.keys() and all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)

    proc = run_qnkit("train", "--out", tuned, "--resume", "--epochs", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tuned / "checkpoints" / "last" / "meta.json").read_text())
    assert again["epoch"] == 2 and again["initialised_from"] == meta["initialised_from"]


def test_init_from_a_narrower_run_widens_it(source_run, synth_dataset_factory, tmp_path, run_qnkit):
    """--init-from with more --num-filters: the new run starts from the source's weights widened (Net2WiderNet),
    trains, and records it."""
    wide = tmp_path / "wide"
    proc = run_qnkit("train", "--data", synth_dataset_factory(4, 64, 0), "--out", wide, "--init-from", source_run,
                     "--num-filters", "6", "--epochs", "1", "--lr", "1e-12", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "its 4 filters widened to 6" in " ".join(proc.stderr.split())
    meta = json.loads((wide / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["network"]["num_filters"] == 6
    assert (meta["initialised_from"]["widened"]["from_filters"], meta["initialised_from"]["widened"]["to_filters"]) \
        == (4, 6)


@pytest.mark.parametrize("args, words", [
    (("--num-filters", "2"), ("network differs", "num_filters")),  # fewer filters: widening only goes up
    (("--settings", "KERNEL3"), ("network differs", "kernel_h")),
    (("--settings", "KERNEL3", "--num-filters", "8"), ("network differs", "kernel_h")),  # wider, but not only
    (("--resume",), ("--init-from", "--resume")),
])
def test_init_from_refuses_what_cannot_start_from_those_weights(source_run, synth_dataset_factory, tmp_path,
                                                                 capsys, args, words):
    from qnkit.cli import main

    out = tmp_path / "new"
    kernel3 = tmp_path / "kernel3.ini"  # the source's network with 3x3 kernels
    kernel3.write_text("[NETWORK]\nnum_filters = 4\nkernel_h = 3\nkernel_w = 3\n")
    args = [str(kernel3) if a == "KERNEL3" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(synth_dataset_factory(4, 64, 0)), "--out", str(out), "--init-from",
              str(source_run), *args, "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()


def test_init_from_a_folder_without_a_run(synth_dataset_factory, tmp_path, capsys):
    from qnkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(synth_dataset_factory(4, 64, 0)), "--out", str(tmp_path / "new"),
              "--init-from", str(tmp_path / "nowhere"), "--no-progress"])
    assert exit_info.value.code == 2 and "no 'best' checkpoint" in capsys.readouterr().err


def test_poly_schedule_decays_to_the_last_epoch_and_stretches_on_resume(synth_dataset_factory, tmp_path, run_qnkit):
    """--schedule poly: lr x (1 - e/E)^0.9 per epoch; --resume --epochs 4 decays to the new end from where it
    was; a step-schedule run resumed with --schedule poly restarts there."""
    data = synth_dataset_factory(4, 64, 0)
    run = tmp_path / "poly"
    proc = run_qnkit("train", "--data", data, "--out", run, "--epochs", "2", *ARGS[2:], "--lr", "1e-3",
                     "--schedule", "poly")
    assert proc.returncode == 0, proc.stderr
    proc = run_qnkit("train", "--out", run, "--resume", "--epochs", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "restarted" not in proc.stderr
    lrs = [r["lr"] for r in _records(run)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.25 ** 0.9])

    step = tmp_path / "step"
    proc = run_qnkit("train", "--data", data, "--out", step, "--epochs", "1", *ARGS[2:], "--lr", "1e-3")
    assert proc.returncode == 0, proc.stderr
    proc = run_qnkit("train", "--out", step, "--resume", "--epochs", "3", "--schedule", "poly", "--no-progress")
    assert proc.returncode == 0 and "poly to epoch 3" in " ".join(proc.stderr.split()), proc.stderr
    assert [r["lr"] for r in _records(step)] == pytest.approx([1e-3, 1e-3, 1e-3 * 0.5 ** 0.9])
