"""`qnkit bench --quick`: every section runs and reports its figures and ratios (no time is asserted)."""
import json

import pytest

from qnkit import kernels
from qnkit.cli import main


def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def test_bench_quick_writes_every_row_json_and_plot(tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = run_cli("bench", "--quick", "--json", str(report_path), "--plot", str(plot_path),
                   "--workdir", str(tmp_path / "work"))
    assert code in (0, None)
    report = json.loads(report_path.read_text())
    assert report["system"]["kernel_build"] in kernels.available_builds()

    kernel_rows = {(row["kernel"], row["threads"]) for row in report["kernels"]}
    for name in ("downsample_image", "downsample_labels", "kidney_slice_range", "border_weights", "dice",
                 "upsample_threshold"):
        assert (name, 1) in kernel_rows
    for row in report["kernels"]:
        assert row["speedup_vs_numpy"] > 0 and row["ratio_to_floor"] > 0

    rows = [row for row in report["backends"] if "error" not in row]
    labels = {row["backend"] for row in rows}
    assert {"torch fp32 cpu", "onnxruntime fp32 cpu"} <= labels
    eager = [row for row in rows if row["backend"] == "torch fp32 cpu"]
    assert all(row["speedup_vs_eager_fp32"] == pytest.approx(1.0) for row in eager)
    assert {row["batch"] for row in eager} == {1, 4}
    onnx = next(row for row in rows if row["backend"] == "onnxruntime fp32 cpu")
    assert onnx["dice_agreement_vs_eager"] > 0.99 and onnx["agreement_meaningful"] is False

    e2e = report["end_to_end"]
    assert set(e2e["stages_s"]) >= {"load", "preprocess", "inference", "postprocess", "write", "wall"}
    assert 0 <= e2e["share_outside_inference"] <= 1
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Backends" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "--only"),
    (["--batch-sizes", "0,4"], "--batch-sizes"),
    (["--json", "/nonexistent-folder/x.json"], "folder does not exist"),
    (["--model", "/nonexistent-bundle"], "bundle not found"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert run_cli("bench", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
