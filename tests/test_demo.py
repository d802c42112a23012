"""`qnkit demo` end to end, shrunken (5 cases of 64x64, 12 short epochs, 8 filters): synth -> train -> export
(FP32 ONNX: no GPU here) -> segment the held-out case -> Dice, volumes, backend, speed, and the demo's time per
stage and machine, printed and written to WORKDIR/demo.json alike. A rerun reuses the data, run and bundle.
The full-size demo's time is measured by running `qnkit demo` itself, not asserted here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qnkit import io as qio
from qnkit import kernels
from qnkit.postprocess import LEFT, RIGHT

pytestmark = pytest.mark.slow

SHRUNKEN = ("--cases", "5", "--epochs", "12", "--size", "64", "--num-filters", "8", "--no-progress")
# The shrunken demo reached Dice 0.42 on its held-out case (2-core Xeon, AVX-512); a pipeline that lost
# the kidneys (a flipped axis, the wrong grid, an untrained network) scores 0 to 0.08 (everything kidney).
DICE_BAR = 0.3
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # `auto` chooses as on a machine without a GPU, whatever this one has


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def test_demo_end_to_end_and_rerun(run_qnkit, tmp_path):
    work = tmp_path / "demo"
    proc = run_qnkit("demo", "--workdir", work, *SHRUNKEN, env=CPU_ONLY)
    assert proc.returncode == 0, proc.stderr
    last = json.loads((work / "demo.json").read_text())["last"]
    split = json.loads((work / "run" / "evaluation_data.json").read_text())
    # Every held-out case is segmented (5 cases: one), and nothing else.
    assert [c["case"] for c in last["cases"]] == split["test"] and len(split["test"]) == 1
    for c in last["cases"]:
        case = c["case"]
        # The recorded Dice and volumes are the written mask's, recomputed here; the Dice is above the bar.
        mask, geometry = qio.load_labels(work / "output" / f"{case}_kidneys.nii.gz")
        labels, _ = qio.load_labels(work / "data" / case / "segmentation.nii.gz")
        assert c["dice"] == pytest.approx(kernels.dice(mask > 0, labels > 0), abs=1e-5)  # 5 decimals
        assert c["dice"] >= DICE_BAR, c
        ml = geometry.voxel_volume_ml
        assert c["volumes_ml"]["right"] == pytest.approx(np.count_nonzero(mask == RIGHT) * ml, abs=0.01)
        assert c["volumes_ml"]["left"] == pytest.approx(np.count_nonzero(mask == LEFT) * ml, abs=0.01)
        assert c["true_volumes_ml"]["right"] + c["true_volumes_ml"]["left"] == pytest.approx(
            np.count_nonzero(labels) * ml, abs=0.02)
        assert (work / "output" / f"{case}_preview.png").is_file()
        assert (work / "output" / f"{case}_stats.json").is_file()
        # ... and printed as recorded.
        assert f"held-out case {case} ({c['slices']} slices, 64x64): Dice {c['dice']:.4f}" in proc.stdout
        assert (f"kidney volumes: right {c['volumes_ml']['right']:.1f} mL (true {c['true_volumes_ml']['right']:.1f}), "
                f"left {c['volumes_ml']['left']:.1f} mL (true {c['true_volumes_ml']['left']:.1f})") in proc.stdout
    assert last["mean_dice"] == pytest.approx(np.mean([c["dice"] for c in last["cases"]]), abs=1e-5)
    assert f"test Dice: mean {last['mean_dice']:.4f} over 1 held-out case" in proc.stdout
    assert last["backend"] == "onnxruntime" and "backend: onnxruntime" in proc.stdout
    assert f"{last['slices_per_s']} slices/s end to end" in proc.stdout
    bundle = json.loads((work / "bundle" / "qnkit.json").read_text())
    assert "model.onnx" in bundle["artefacts"] and "model.fp16.onnx" not in bundle["artefacts"]  # no GPU: no FP16
    # The time per stage, in all, and the machine it was measured on: printed and recorded alike.
    stages = last["stages_s"]
    assert list(stages) == ["synth", "train", "export", "segment"] and last["reused"] == []
    assert all(v >= 0 for v in stages.values()) and last["seconds"] >= sum(stages.values()) - 0.5
    machine = last["machine"]
    assert machine["cpu"] and machine["cpus"] >= 1 and machine["gpu"] is None
    if _cpu_model():
        assert machine["cpu"] == _cpu_model()
    printed = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    assert f"demo time: {last['seconds']:.0f} s ({printed}) on {machine['cpu']}, {machine['cpus']} CPU" in proc.stdout
    assert f"figures: {work / 'demo.json'}" in proc.stdout

    weights = (work / "run" / "checkpoints" / "best" / "model.safetensors").stat().st_mtime_ns
    again = run_qnkit("demo", "--workdir", work, *SHRUNKEN, env=CPU_ONLY)
    assert again.returncode == 0, again.stderr
    assert (work / "run" / "checkpoints" / "best" / "model.safetensors").stat().st_mtime_ns == weights
    rerun = json.loads((work / "demo.json").read_text())["last"]
    assert set(rerun["stages_s"]) == {"segment"} and rerun["reused"] == ["data", "run", "bundle"]
    assert "; reused data, run, bundle)" in again.stdout
    assert rerun["cases"][0]["dice"] == last["cases"][0]["dice"]  # the same bundle, the same mask


def test_demo_refuses_a_foreign_workdir(run_qnkit, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("precious")
    proc = run_qnkit("demo", "--workdir", tmp_path, *SHRUNKEN)
    assert proc.returncode == 2
    assert proc.stderr.startswith("qnkit: error: ") and "not made by qnkit demo" in proc.stderr
    assert (tmp_path / "data" / "mine.txt").read_text() == "precious"
    assert not (tmp_path / "demo.json").exists()
