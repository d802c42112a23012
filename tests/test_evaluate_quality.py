"""`qnkit evaluate --quality`: each kidney's quality verdict beside its true Dice, and how well the score ranks them."""
import json
import math
import shutil

import pytest

from qnkit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def _kidney(dice, score, **signals):
    return {"dice": dice, "score": score, "verdict": "check" if score > 1 else "ok",
            "signals": {"hu_spread": 50.0, "at_edge": 0.0, **signals}}


@pytest.mark.slow
def test_evaluate_quality_json_line_and_plot(trained_run, tmp_path, run_qnkit):
    """Every kidney of the tiny run's test cases gets its Dice, score, verdict and signals (the dropout samples'
    too); the sides add up to the mask evaluate scored; the summary's Spearman and counts are those of the
    kidneys; one line says the Spearman; the plot is a PNG."""
    from qnkit.quality import spearman

    run = shutil.copytree(trained_run, tmp_path / "run")  # evaluate logs into the run folder: the shared one stays
    report, plot = tmp_path / "evaluation.json", tmp_path / "quality.png"
    proc = run_qnkit("evaluate", run, "--uncertainty", "2", "--json", report, "--quality-plot", plot)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    summary = result["quality"]
    assert summary["uncertainty"] == 2 and summary["seed"] == 0 and summary["calibration"].startswith("default")
    judged = []
    for row in result["cases"]:
        assert set(row["kidneys"]) == {"right", "left"}
        kidneys = [k for k in row["kidneys"].values() if k is not None]
        assert sum(k["predicted_ml"] for k in kidneys) == pytest.approx(row["predicted_ml"], abs=0.01)
        assert sum(k["true_ml"] for k in kidneys) == pytest.approx(row["kidney_ml"], abs=0.01)
        for kidney in kidneys:
            assert 0 <= kidney["dice"] <= 1
            if kidney["verdict"] is None:  # a labelled kidney the mask does not have
                assert kidney["predicted_ml"] == 0 and kidney["dice"] == 0
                continue
            assert (kidney["verdict"] == "check") == (kidney["score"] > 1) == bool(kidney["reasons"])
            assert kidney["samples"] == 2 and {"mc_disagreement", "mirror_disagreement"} <= set(kidney["signals"])
            judged.append(kidney)
    assert summary["kidneys"] == len(judged) >= 1
    rho = summary["spearman"]["score"]
    expected = spearman([k["score"] for k in judged], [k["dice"] for k in judged])
    if math.isnan(expected):
        assert rho is None
    else:
        assert -1 <= rho <= 1 and rho == pytest.approx(expected, abs=1e-4)
    if len(judged) < 3:
        assert rho is None
    assert summary["flagged"] == sum(k["verdict"] == "check" for k in judged)
    assert summary["bad"] == sum(k["dice"] < 0.75 for k in judged)
    assert summary["bad_flagged"] == sum(k["dice"] < 0.75 and k["verdict"] == "check" for k in judged)
    assert summary["good_not_flagged"] == sum(k["dice"] >= 0.9 and k["verdict"] == "ok" for k in judged)
    lines = [line for line in proc.stdout.splitlines() if "Spearman" in line]
    assert len(lines) == 1 and lines[0].startswith("quality: Spearman(score, Dice)")
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_quality_summary_spearman_counts_and_plot():
    """Spearman of the score and of each signal over the judged kidneys (a labelled kidney not found counted
    apart), None below 3 kidneys or for a constant signal; the plot renders with and without kidneys."""
    from scipy.stats import spearmanr

    from qnkit.quality_eval import quality_summary, render_quality_plot

    missed = {"dice": 0.0, "score": None, "verdict": None, "signals": None}
    kidneys = [_kidney(0.95, 0.4, hu_spread=40.0), _kidney(0.92, 1.3, hu_spread=90.0),
               _kidney(0.6, 2.5, hu_spread=150.0), _kidney(0.7, 0.8, hu_spread=60.0), missed]
    summary = quality_summary(kidneys)
    scores, dice = [0.4, 1.3, 2.5, 0.8], [0.95, 0.92, 0.6, 0.7]
    assert summary["kidneys"] == 4 and summary["not_found"] == 1
    assert summary["spearman"]["score"] == pytest.approx(spearmanr(scores, dice).statistic, abs=1e-4)
    assert summary["spearman"]["hu_spread"] == pytest.approx(spearmanr([40, 90, 150, 60], dice).statistic, abs=1e-4)
    assert summary["spearman"]["at_edge"] is None and summary["spearman"]["mc_disagreement"] is None
    assert (summary["flagged"], summary["bad"], summary["bad_flagged"], summary["good"], summary["good_not_flagged"]) \
        == (2, 2, 1, 2, 1)
    json.dumps(summary, allow_nan=False)  # None, never NaN: valid JSON

    two = quality_summary(kidneys[:2])
    assert two["spearman"]["score"] is None and all(v is None for v in two["spearman"].values())
    assert render_quality_plot(kidneys[:4], summary, title="run")[:8] == PNG_MAGIC
    assert render_quality_plot([], quality_summary([]))[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, message", [
    (["--quality-plot", "{tmp}/plot.jpg"], "expected a .png"),
    (["--quality-plot", "{tmp}"], "expected a .png"),
    (["--quality-plot", "{tmp}/missing/plot.png"], "folder does not exist"),
    (["--uncertainty", "-1"], "--uncertainty"),
])
def test_evaluate_quality_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    """Checked before any run folder is read: one line, exit code 2."""
    code = run_cli("evaluate", tmp_path / "no-run", *(a.format(tmp=tmp_path) for a in args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_calibration_fit_and_held_out_summary_share_the_evaluate_summary(tmp_path):
    """benchmarks/quality_calibration.py: limits from the good calibration kidneys, held-out kidneys judged with
    them and summarised as `qnkit evaluate --quality` does, the scatter plot written."""
    from qnkit.benchmarks import quality_calibration as C

    def row(dice, volume, spread):
        return {"case": "c", "side": "right", "dice": dice,
                "signals": {"volume_implausibility": volume, "hu_spread": spread, "mirror_disagreement": 0.02,
                            "second_lump": 0.0, "concavity": 0.2, "at_edge": 0.0}}

    calibration_rows = [row(0.9 + 0.005 * k, 1.0, 49.0 - k) for k in range(10)] + [row(0.4, 2.5, 200.0)]
    held = [row(0.95, 1.0, 42.0), row(0.6, 1.8, 60.0), row(0.3, 3.0, 180.0), row(0.92, 1.0, 45.0)]
    (tmp_path / "cal.json").write_text(json.dumps(calibration_rows))
    (tmp_path / "held.json").write_text(json.dumps(held))
    out, plot = tmp_path / "calibration.json", tmp_path / "held.png"
    assert C.main(["fit", str(tmp_path / "cal.json"), "--held-out", str(tmp_path / "held.json"), "--out", str(out),
                   "--plot", str(plot)]) == 0
    calibration = json.loads(out.read_text())
    assert calibration["limits"]["hu_spread"] < 60 and calibration["limits"]["volume_implausibility"] == 1.0
    held_out = calibration["held_out"]
    assert (held_out["kidneys"], held_out["bad"], held_out["bad_flagged"], held_out["good_not_flagged"]) == (4, 2, 2, 2)
    assert held_out["spearman"]["score"] < -0.6
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_calibration_measure_resumes_without_measuring_twice(tmp_path, monkeypatch):
    """`measure --resume` keeps the rows already written and measures only the case-variants not in them; each
    case's low-dose noise comes from its own generator, so a resumed measurement draws what a whole one does."""
    import numpy as np

    from qnkit.benchmarks import quality_calibration as C
    from qnkit.synth import write_dataset

    write_dataset(tmp_path / "set", cases=2, seed=3, size=48, progress=False)
    calls, noise = [], {}

    def fake_case(name, ct, labels, geometry, *args):
        calls.append(name)
        noise[name] = float(np.asarray(ct, dtype=np.float64).sum())
        return [{"case": name, "side": "right", "dice": 0.9, "signals": {}}]

    monkeypatch.setattr(C, "measure_case", fake_case)
    out = tmp_path / "rows.json"
    assert C.main(["measure", "--out", str(out), str(tmp_path / "set")]) == 0
    whole = json.loads(out.read_text())
    first_calls, first_noise = list(calls), dict(noise)
    assert {"set/case_00000/original", "set/case_00001/lowdose"} <= set(first_calls)

    out.write_text(json.dumps([r for r in whole if not r["case"].startswith("set/case_00001")]))
    calls.clear()
    assert C.main(["measure", "--out", str(out), "--resume", str(tmp_path / "set")]) == 0
    assert calls and all(name.startswith("set/case_00001") for name in calls)
    assert noise["set/case_00001/lowdose"] == first_noise["set/case_00001/lowdose"]
    assert sorted(r["case"] for r in json.loads(out.read_text())) == sorted(r["case"] for r in whole)


def test_fit_leaves_out_a_signal_that_ranks_the_wrong_way_and_floors_the_second_lump():
    """A signal higher on good kidneys than on bad ones gets limit null: reported, not judged; a calibration
    whose good kidneys never show a second lump still needs a real lump (>= 0.15) to flag one."""
    from qnkit.benchmarks import quality_calibration as C
    from qnkit.errors import QnkitInputError
    from qnkit.quality import SIGNALS, check_calibration, verdict

    rows = [{"case": f"c{k}", "side": "right", "dice": 0.5 + 0.04 * k,
             "signals": {"hu_spread": 30.0 + 10 * k, "second_lump": 0.0, "concavity": 0.5 - 0.03 * k,
                         "volume_implausibility": 1.0, "at_edge": 0.0}} for k in range(12)]
    calibration = C.fit(rows)
    limits = calibration["limits"]
    assert limits["hu_spread"] is None and "hu_spread" in calibration["left_out"]
    assert limits["second_lump"] == 0.15 and limits["concavity"] > 0
    check_calibration(calibration)
    judged = verdict({"hu_spread": 900.0, "second_lump": 0.05, "concavity": 0.0}, calibration)
    assert judged["verdict"] == "ok" and judged["score"] < 1
    with pytest.raises(QnkitInputError, match="every quality limit is null"):
        check_calibration({"limits": {name: None for name in SIGNALS}})
    with pytest.raises(QnkitInputError, match="concavity"):
        check_calibration({"limits": {**limits, "concavity": -1}})
