"""Bad input to `qnkit train`: one line on stderr, exit code 2, nothing half-written.

Runs `qnkit.cli.main` in-process (SystemExit carries the exit code) to avoid a torch import per case.
"""
import shutil
from types import SimpleNamespace

import pytest


@pytest.fixture
def run_qnkit(capsys):
    from qnkit.cli import main

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=exit_info.value.code, stderr=captured.err, stdout=captured.out)

    return run

FAST = ("--epochs", "1", "--num-filters", "4", "--no-progress", "--min-steps-per-epoch", "0")


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qnkit: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_settings_file(run_qnkit, synth_dataset, tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[TRAINING]\nmicro_batch = -1\n")
    out = tmp_path / "run"
    line = _one_line_error(run_qnkit("train", "--data", synth_dataset, "--out", out, "--settings", ini, *FAST))
    assert "bad.ini" in line and "[TRAINING]" in line and "micro_batch" in line
    assert not out.exists()


def test_bad_network_setting(run_qnkit, synth_dataset, tmp_path):
    ini = tmp_path / "net.ini"
    ini.write_text("[NETWORK]\nkernel_h = 4\n")
    out = tmp_path / "run"
    line = _one_line_error(run_qnkit("train", "--data", synth_dataset, "--out", out, "--settings", ini, *FAST))
    assert "kernel_h" in line and not out.exists()


def test_empty_and_malformed_data_folders(run_qnkit, synth_dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert "no KiTS19 cases" in _one_line_error(run_qnkit("train", "--data", tmp_path / "empty", "--out", out, *FAST))
    assert not out.exists()
    bad = tmp_path / "bad"
    shutil.copytree(synth_dataset, bad)
    (bad / "case_00003" / "imaging.nii.gz").write_bytes(b"this is not gzip")
    line = _one_line_error(run_qnkit("train", "--data", bad, "--out", out, *FAST, "--seed", "0"))
    assert "case_00003" in line and not out.exists()


def test_mismatched_shapes(run_qnkit, synth_dataset, mismatched_case_dataset, tmp_path):
    data = mismatched_case_dataset
    shutil.copytree(synth_dataset / "case_00001", data / "case_00001")
    shutil.copytree(synth_dataset / "case_00002", data / "case_00002")
    shutil.copytree(synth_dataset / "case_00003", data / "case_00003")
    out = tmp_path / "run"
    line = _one_line_error(run_qnkit("train", "--data", data, "--out", out, *FAST, "--seed", "0"))
    assert "shape" in line and not out.exists()


def test_non_empty_run_dir_needs_resume_or_force(run_qnkit, synth_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _one_line_error(run_qnkit("train", "--data", synth_dataset, "--out", out, *FAST))
    assert "--resume" in line and (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    _one_line_error(run_qnkit("train", "--out", tmp_path / "nothing", "--resume"))
    _one_line_error(run_qnkit("train", "--data", synth_dataset, "--out", out, "--resume", "--force"))


@pytest.mark.parametrize("args, word", [(("--device", "tpu"), "device"), (("--epochs", "0"), "epochs")])
def test_bad_options(run_qnkit, synth_dataset, tmp_path, args, word):
    out = tmp_path / "run"
    assert word in _one_line_error(run_qnkit("train", "--data", synth_dataset, "--out", out, *args))
    assert not out.exists()


@pytest.mark.parametrize("theirs, ours, context_mm, word", [
    ({"num_filters": 4}, {"num_filters": 4, "num_channels": 3}, 3.0, None),  # 2-D -> 3 planes: inflated
    ({"num_filters": 8}, {"num_filters": 4, "num_channels": 3}, 3.0, "num_filters"),  # filters are not dropped
    ({"num_filters": 4, "num_channels": 3}, {"num_filters": 8, "num_channels": 3}, 3.0, None),  # widened
    ({"num_filters": 4}, {"num_filters": 6, "num_channels": 3}, 3.0, None),  # inflated and widened
    ({"num_filters": 4, "kernel_h": 3}, {"num_filters": 8}, 0.0, "kernel_h"),  # nothing else may differ
    ({"num_filters": 4, "num_channels": 3}, {"num_filters": 4}, 0.0, "num_channels"),  # planes are not dropped
    ({"num_filters": 4, "num_channels": 3}, {"num_filters": 4, "num_channels": 5}, 3.0, "num_channels"),
    ({"num_filters": 4, "num_channels": 3}, {"num_filters": 4, "num_channels": 3}, 2.0, "mm apart"),
    ({"num_filters": 4, "num_channels": 3}, {"num_filters": 4, "num_channels": 3}, 3.0, None),  # same context
])
def test_init_from_inflates_only_a_2d_source(tmp_path, theirs, ours, context_mm, word):
    from qnkit.errors import QnkitInputError
    from qnkit.nn.config import QuickNATConfig
    from qnkit.train.runner import _check_init_source
    from qnkit.train.settings import Settings

    source_planes = theirs.get("num_channels", 1)
    source = {"network": QuickNATConfig(**theirs).to_dict(), "preprocessing": {"hu_lo": -200.0, "hu_hi": 400.0},
              "domain": {"pixel_spacing_mm": 2.0, **({"context_planes": 3, "context_mm": 3.0} if source_planes > 1
                                                     else {})}, "epoch": 1, "files": {}}
    settings = Settings()
    settings.data.context_mm = context_mm
    if word is not None:
        with pytest.raises(QnkitInputError, match=word):
            _check_init_source(source, tmp_path, QuickNATConfig(**ours), settings)
        return
    record = _check_init_source(source, tmp_path, QuickNATConfig(**ours), settings)
    assert ("inflated" in record) is (source_planes == 1 and ours.get("num_channels", 1) > 1)
    widened = record.get("widened")
    assert (widened is not None) is (ours["num_filters"] > theirs["num_filters"])
    if widened is not None:
        assert (widened["from_filters"], widened["to_filters"]) == (theirs["num_filters"], ours["num_filters"])
