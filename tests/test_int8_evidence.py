"""INT8 as the CPU default only by evidence on real CT: the rule, the record in qnkit.json, the backend's choice.

`qnkit export --int8-evidence CT` segments the CT with the FP32 and the INT8 graph through the runtime's
pipeline and records the figures and the choice (``cpu_precision``); `open_backend(precision="auto")`
on the CPU runs INT8 only when that record says so. Here a synthetic case stands in for the real CT
(the real one is used by the shipped model's recipe).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import qnkit.backends as backends
from qnkit.bundle import FP32_ONNX, INT8_ONNX, WEIGHTS, Bundle


def _figures(name="ct.nii.gz", both=0.995, right_ml=80.0, left_ml=70.0):
    return {"data": name, "dice_int8_vs_fp32": {"both": both, "right": both, "left": both, "raw_every_slice": both},
            "kidney_ml": {"fp32": {"right": right_ml, "left": left_ml}, "int8": {"right": right_ml, "left": left_ml}}}


def test_rule_int8_only_when_every_ct_agrees_and_finds_kidney():
    from qnkit.export.int8_evidence import MIN_DICE, decide

    assert decide([])["default"] == "fp32"
    assert decide([_figures(both=MIN_DICE)])["default"] == "int8"
    assert decide([_figures(both=0.999), _figures("b.nii.gz", both=0.989)])["default"] == "fp32"
    no_kidney = decide([_figures(both=1.0, right_ml=0.0, left_ml=2.0)])
    assert no_kidney["default"] == "fp32" and "too little" in no_kidney["why"]
    assert decide([_figures(both=None, right_ml=0.0, left_ml=0.0)])["default"] == "fp32"


def _bundle(choice: str | None, passed: bool | None, int8_graph: bool = True) -> Bundle:
    artefacts = [FP32_ONNX, WEIGHTS] + ([INT8_ONNX] if int8_graph else [])
    meta = {"artefacts": {name: {"sha256": "0" * 64} for name in artefacts}, "verification": {}}
    if choice is not None:
        meta["cpu_precision"] = {"default": choice, "why": "test"}
    if passed is not None:
        meta["verification"]["int8_real_ct"] = {"passed": passed}
    return Bundle(Path("/nowhere/bundle"), meta)


@pytest.mark.parametrize("choice, passed, int8_graph, expected", [
    ("int8", True, True, "int8"),
    ("int8", False, True, "fp32"),  # a choice without passing evidence is not taken
    ("int8", True, False, "fp32"),  # no INT8 graph, nothing to run
    ("fp32", True, True, "fp32"),
    (None, None, True, "fp32"),  # exported before the rule, or without --int8-evidence
])
def test_cpu_precision_follows_the_recorded_evidence(choice, passed, int8_graph, expected):
    assert _bundle(choice, passed, int8_graph).cpu_precision == expected


def test_auto_on_the_cpu_runs_int8_only_with_onnxruntime(monkeypatch):
    attempts = []
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(backends, "_torch_cuda", lambda: False)

    def fake_open(bundle, kind, precision, device, batch_size, log, options):
        attempts.append((kind, device, precision))
        if kind == "onnxruntime" and "onnxruntime" not in installed:
            raise ImportError("no onnxruntime")
        return SimpleNamespace(name=kind, precision=precision, device=device, batch_size=batch_size)

    monkeypatch.setattr(backends, "_open", fake_open)
    installed = {"onnxruntime", "torch", "safetensors"}
    monkeypatch.setattr(backends, "_installed", lambda module: module in installed)
    lines = []
    backends.open_backend(_bundle("int8", True), "auto", log=lines.append)
    assert attempts == [("onnxruntime", "cpu", "int8")] and "INT8 by the bundle's evidence" in lines[-1]
    attempts.clear()
    backends.open_backend(_bundle("int8", True), "torch", log=lines.append)  # eager has no INT8 graph
    assert attempts == [("torch", "cpu", "fp32")]
    attempts.clear()
    backends.open_backend(_bundle("int8", True), "auto", precision="fp32", log=lines.append)  # asked: kept
    assert attempts == [("onnxruntime", "cpu", "fp32")]
    attempts.clear()
    installed.discard("onnxruntime")
    backends.open_backend(_bundle("int8", True), "auto", log=lines.append)
    assert attempts == [("torch", "cpu", "fp32")]


def test_export_records_the_evidence_and_the_choice(export_reusing_shared_graph, run_qnkit, tmp_path):
    """A synthetic CT as evidence: figures per CT, the choice consistent with them, a bundle that verifies."""
    import onnxruntime  # noqa: F401  (segmenting needs it: missing is an error, not a skip)
    from qnkit.bundle import load_bundle
    from qnkit.export.bundle_writer import export_bundle
    from qnkit.export.int8_evidence import MIN_DICE, MIN_KIDNEY_ML
    from qnkit.synth import make_case
    from qnkit.synth.writer import write_case

    case = write_case(make_case(3, size=128, seed=11), tmp_path / "cases")
    ct = case / "imaging.nii.gz"
    run, out = export_reusing_shared_graph[0], tmp_path / "bundle"
    said: list[str] = []
    export_bundle(run, out, input_size=(64, 64), int8_evidence=[ct], log=said.append)
    assert any("adding --int8" in line for line in said) and any("CPU default precision" in line for line in said)
    meta = json.loads((out / "qnkit.json").read_text())
    record, choice = meta["verification"]["int8_real_ct"], meta["cpu_precision"]
    [figures] = record["cts"]
    assert figures["data"] == "imaging.nii.gz" and len(figures["sha256"]) == 64
    dice = figures["dice_int8_vs_fp32"]
    assert set(dice) == {"both", "right", "left", "raw_every_slice"}
    fp32_ml = sum(figures["kidney_ml"]["fp32"].values())
    agrees = fp32_ml >= MIN_KIDNEY_ML and dice["both"] is not None and dice["both"] >= MIN_DICE
    assert choice["default"] == ("int8" if agrees else "fp32") and record["passed"] is agrees
    bundle = load_bundle(out)  # the manifest hash covers the new keys
    assert bundle.cpu_precision == choice["default"] and bundle.has(INT8_ONNX)
    verified = run_qnkit("verify", out)
    assert verified.returncode == 0
    assert f"CPU default (precision auto): {choice['default']}: {choice['why']}" in verified.stdout


def test_export_without_evidence_keeps_fp32_and_says_why(shared_bundle):
    meta = json.loads((shared_bundle[1] / "qnkit.json").read_text())
    assert meta["cpu_precision"]["default"] == "fp32" and "--int8-evidence" in meta["cpu_precision"]["why"]
    from qnkit.bundle import load_bundle

    assert load_bundle(shared_bundle[1]).cpu_precision == "fp32"


def test_evidence_that_is_not_nifti_is_one_line_and_exit_2(shared_bundle, run_qnkit, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    proc = run_qnkit("export", shared_bundle[0], "--out", tmp_path / "b", "--int8-evidence", bad)
    assert proc.returncode == 2 and "--int8-evidence" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()
