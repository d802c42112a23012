"""`qnkit bench --only train`: the recipe's training loop timed on whole slices and on windows, side by side."""
from __future__ import annotations

import io

import pytest


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory, synth_dataset):
    from qnkit.benchmarks import train_step

    return train_step.run(slices=8, repeats=1, num_filters=4, whole_side=64, data=synth_dataset, loader_workers=0,
                          variants=(("whole", 0, False, False), ("window", 32, False, False),
                                    ("window, bf16", 32, True, False)), workdir=tmp_path_factory.mktemp("bench-train"))


def test_rows_are_the_loops_on_their_inputs(train_rows):
    from qnkit.cpus import native_bf16

    whole, window, bf16 = train_rows["rows"]
    assert (whole["variant"], window["variant"], bf16["variant"]) == ("whole", "window", "window, bf16")
    assert whole["slice_shape"][0] >= 64 and whole["slice_shape"][0] % 16 == 0 and window["slice_shape"] == [32, 32]
    assert len(whole["timings_s"]) == len(window["timings_s"]) == 1
    assert whole["step"] == window["step"] == "FP32"
    native, why = native_bf16()
    assert bf16["step"] == (f"bfloat16 autocast ({why})" if native else f"FP32 (amp asked: {why})")


def test_flops_scale_with_the_pixels_and_rates_follow_from_the_times(train_rows):
    whole, window, _ = train_rows["rows"]
    area = (whole["slice_shape"][0] * whole["slice_shape"][1]) / (32 * 32)
    # convolutions cost the same per pixel: FLOPs per slice follow the area (the SE blocks' small dense layers aside)
    assert whole["gflop_per_slice"] / window["gflop_per_slice"] == pytest.approx(area, rel=1e-3)
    for row in (whole, window):
        seconds = row["timings_s"][0] / train_rows["slices_per_timing"]
        assert row["seconds_per_slice"] == pytest.approx(seconds)
        assert row["slices_per_s"] == pytest.approx(1 / seconds)
        assert row["gflop_per_s"] == pytest.approx(row["gflop_per_slice"] / seconds)
        assert row["speedup_per_slice"] == pytest.approx(whole["seconds_per_slice"] / seconds)
        assert row["best_seconds_per_slice"] == pytest.approx(min(row["timings_s"]) / train_rows["slices_per_timing"])
        assert row["best_speedup_per_slice"] == pytest.approx(whole["best_seconds_per_slice"] / row["best_seconds_per_slice"])


def test_the_table_prints_every_row(train_rows):
    from rich.console import Console

    from qnkit.commands.bench import _print

    out = io.StringIO()
    report = {"system": {"cpu": "test", "cores": 2, "gpu": None, "kernel_build": "x", "kernel_threads": 1},
              "mode": "quick", "train": train_rows}
    _print(Console(file=out, width=200), report)
    text = out.getvalue()
    assert "Training loop" in text and "whole" in text and "window" in text and "32x32" in text
