"""INT8 as the CPU default only by evidence on real CT and held-out phantoms, on a CPU with an INT8 dot product:
the rule, the record in qnkit.json, the backend's choice, and what `qnkit verify` says.

`qnkit export --int8-evidence CT` segments the CT and held-out phantoms with the FP32 and the INT8 graph
through the runtime's pipeline and records the figures and the choice (``cpu_precision``);
`open_backend(precision="auto")` on the CPU runs INT8 only when that record says so and the CPU has VNNI
(or another INT8 dot-product instruction). Here a synthetic case stands in for the real CT (the real one is
used by the shipped model's recipe).
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


def _phantoms(dices, kidney_ml=80.0):
    cases = [_figures(f"case_{i:05d}", both=d, right_ml=kidney_ml, left_ml=kidney_ml) for i, d in enumerate(dices)]
    scores = {c["data"]: c["dice_int8_vs_fp32"]["both"] for c in cases}
    worst = min(scores, key=scores.get)
    return {"cases": cases, "cases_counted": len(cases), "mean_dice": sum(dices) / len(dices),
            "min_dice": scores[worst], "worst": worst}


def test_rule_int8_only_when_every_ct_and_every_phantom_agrees():
    from qnkit.export.int8_evidence import MIN_DICE, MIN_PHANTOMS, decide

    enough = _phantoms([0.995] * MIN_PHANTOMS)
    assert decide([])["default"] == "fp32"
    chosen = decide([_figures(both=MIN_DICE)], enough)
    assert chosen["default"] == "int8" and f"{MIN_PHANTOMS} held-out phantoms" in chosen["why"]
    assert decide([_figures(both=0.999), _figures("b.nii.gz", both=0.989)], enough)["default"] == "fp32"
    no_kidney = decide([_figures(both=1.0, right_ml=0.0, left_ml=2.0)], enough)
    assert no_kidney["default"] == "fp32" and "too little" in no_kidney["why"]
    assert decide([_figures(both=None, right_ml=0.0, left_ml=0.0)], enough)["default"] == "fp32"
    # the phantoms: every one must agree, there must be enough of them, and they must have been compared
    one_short = decide([_figures()], _phantoms([0.995] * (MIN_PHANTOMS - 1) + [MIN_DICE - 0.0004]))
    assert one_short["default"] == "fp32" and f"case_{MIN_PHANTOMS - 1:05d}" in one_short["why"]
    too_few = decide([_figures()], _phantoms([0.999] * (MIN_PHANTOMS - 1)))
    assert too_few["default"] == "fp32" and f"the rule needs {MIN_PHANTOMS}" in too_few["why"]
    empty = decide([_figures()], _phantoms([1.0] * MIN_PHANTOMS, kidney_ml=1.0))  # FP32 finds no kidney: no evidence
    assert empty["default"] == "fp32" and "0 phantoms with kidney" in empty["why"]
    assert "no held-out phantoms" in decide([_figures()])["why"]


def _bundle(choice: str | None, passed: bool | None, int8_graph: bool = True, phantoms_passed: bool | None = None) -> Bundle:
    artefacts = [FP32_ONNX, WEIGHTS] + ([INT8_ONNX] if int8_graph else [])
    meta = {"artefacts": {name: {"sha256": "0" * 64} for name in artefacts}, "verification": {}}
    if choice is not None:
        meta["cpu_precision"] = {"default": choice, "why": "test"}
    if passed is not None:
        meta["verification"]["int8_real_ct"] = {"passed": passed}
        meta["verification"]["int8_phantoms"] = {"passed": passed if phantoms_passed is None else phantoms_passed}
    return Bundle(Path("/nowhere/bundle"), meta)


@pytest.fixture
def vnni(monkeypatch):
    """This CPU has (True) or lacks (False) an INT8 dot-product instruction, whatever the machine running the test."""
    import qnkit.bundle

    def set_to(present: bool):
        monkeypatch.setattr(qnkit.bundle, "int8_dot_product",
                            lambda *a: (True, "AVX512-VNNI") if present else (False, "none of AVX512-VNNI in its flags"))
    set_to(True)
    return set_to


@pytest.mark.parametrize("choice, passed, int8_graph, phantoms_passed, expected", [
    ("int8", True, True, None, "int8"),
    ("int8", False, True, None, "fp32"),  # a choice without passing evidence is not taken
    ("int8", True, True, False, "fp32"),  # the real CT agreed, the phantoms did not
    ("int8", True, False, None, "fp32"),  # no INT8 graph, nothing to run
    ("fp32", True, True, None, "fp32"),
    (None, None, True, None, "fp32"),  # exported before the rule, or without --int8-evidence
])
def test_cpu_precision_follows_the_recorded_evidence(vnni, choice, passed, int8_graph, phantoms_passed, expected):
    assert _bundle(choice, passed, int8_graph, phantoms_passed).cpu_precision == expected


def test_int8_default_needs_an_int8_dot_product_and_says_so(vnni):
    bundle = _bundle("int8", True)
    assert bundle.cpu_precision == "int8" and "AVX512-VNNI" in bundle.cpu_precision_why
    vnni(False)
    assert bundle.cpu_precision == "fp32"
    assert "no INT8 dot-product instruction" in bundle.cpu_precision_why and "evidence passed" in bundle.cpu_precision_why


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n", (True, "AVX512-VNNI")),
    ("flags\t\t: fpu sse2 avx2 fma avx_vnni\n", (True, "AVX-VNNI")),
    ("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n", (False, None)),
    ("Features\t: fp asimd evtstrm aes asimddp\n", (True, "ARM dot product (SDOT/UDOT)")),
])
def test_int8_dot_product_reads_the_cpu_flags(tmp_path, text, expected):
    from qnkit.bundle import int8_dot_product

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    found, what = int8_dot_product(cpuinfo)
    assert found is expected[0] and (what == expected[1] if found else "none of" in what)
    assert int8_dot_product(tmp_path / "missing") == (False, f"cannot tell: {tmp_path / 'missing'} unreadable (not Linux?)")


def test_auto_on_the_cpu_runs_int8_only_with_onnxruntime(monkeypatch, vnni):
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


def test_export_records_the_evidence_and_the_choice(export_reusing_shared_graph, run_qnkit, tmp_path, monkeypatch):
    """A synthetic CT and two held-out phantoms as evidence (the rule asks for two here): figures per CT and per
    phantom, the choice consistent with them, a bundle that verifies and says why. The INT8 graph is made
    without its sensitivity search (the shared bundle's export runs that): this test is about the evidence."""
    import onnxruntime  # noqa: F401  (segmenting needs it: missing is an error, not a skip)
    from qnkit.bundle import int8_dot_product, load_bundle
    from qnkit.export import int8 as int8_module
    from qnkit.export import int8_evidence
    from qnkit.export.bundle_writer import export_bundle
    from qnkit.export.int8_evidence import MIN_DICE, MIN_KIDNEY_ML
    from qnkit.synth import make_case
    from qnkit.synth.writer import write_case

    quantize = int8_module.quantize_int8
    monkeypatch.setattr(int8_module, "quantize_int8", lambda *a, **k: quantize(*a, **{**k, "search": False,
                                                                                      "calibration_cases": 1}))
    monkeypatch.setattr(int8_evidence, "MIN_PHANTOMS", 2)
    case = write_case(make_case(3, size=128, seed=11), tmp_path / "cases")
    ct = case / "imaging.nii.gz"
    run, out = export_reusing_shared_graph[0], tmp_path / "bundle"
    said: list[str] = []
    export_bundle(run, out, input_size=(64, 64), int8_evidence=[ct], int8_phantoms=2, log=said.append)
    assert any("adding --int8" in line for line in said) and any("CPU default precision" in line for line in said)
    meta = json.loads((out / "qnkit.json").read_text())
    record, phantoms, choice = (meta["verification"]["int8_real_ct"], meta["verification"]["int8_phantoms"],
                                meta["cpu_precision"])
    [figures] = record["cts"]
    assert figures["data"] == "imaging.nii.gz" and len(figures["sha256"]) == 64
    dice = figures["dice_int8_vs_fp32"]
    assert set(dice) == {"both", "right", "left", "raw_every_slice"}
    fp32_ml = sum(figures["kidney_ml"]["fp32"].values())
    real_agrees = fp32_ml >= MIN_KIDNEY_ML and dice["both"] is not None and dice["both"] >= MIN_DICE
    assert record["passed"] is real_agrees
    assert [c["data"] for c in phantoms["cases"]] == ["case_00000", "case_00001"]
    assert phantoms["made"]["seed"] == int8_evidence.PHANTOM_SEED and phantoms["made"]["cases"] == 2
    counted = [c for c in phantoms["cases"] if sum(c["kidney_ml"]["fp32"].values()) >= MIN_KIDNEY_ML]
    assert phantoms["cases_counted"] == len(counted)
    phantoms_agree = len(counted) >= 2 and all(c["dice_int8_vs_fp32"]["both"] >= MIN_DICE for c in counted)
    assert phantoms["passed"] is phantoms_agree
    assert choice["default"] == ("int8" if real_agrees and phantoms_agree else "fp32")
    bundle = load_bundle(out)  # the manifest hash covers the new keys
    expected = "int8" if choice["default"] == "int8" and int8_dot_product()[0] else "fp32"
    assert bundle.cpu_precision == expected and bundle.has(INT8_ONNX)
    verified = run_qnkit("verify", out)
    assert verified.returncode == 0
    assert f"CPU default (precision auto): {expected}: {bundle.cpu_precision_why}" in verified.stdout
    assert "int8 graph:" in verified.stdout and "int8 evidence: imaging.nii.gz" in verified.stdout


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
