"""`qnkit segment` as a user meets it, on small synthetic NIfTI files (a few seconds each, shipped model):
every output path printed, the batch that really runs echoed, an optional preview that fails leaves the
finished mask alone, and an error is one line on stderr even when stderr is a file."""
from __future__ import annotations

import json

import pytest

from test_cli_domain import box_ct as _box_ct, run_in_process, warnings_in  # noqa: F401 (a fixture)


@pytest.fixture
def box_ct(tmp_path):
    return _box_ct(tmp_path / "box.nii.gz")


# --- what was written, and with what ---------------------------------------------------------------------


def concurrent_words(threads: int) -> str:
    return f" x {threads} concurrent calls" if threads > 1 else ""


def test_every_output_path_is_printed_and_the_batch_echo_says_what_ran(run_in_process, box_ct, tmp_path):
    """Mask, preview, the case's record (--resume) and the stats JSON each appear on stdout; --batch-size
    100000 on ONNX Runtime's CPU session (1 slice per call, one call per CPU at once) is echoed as what ran, not
    as asked (FP32 named: the shipped model's CPU default is INT8 only on a VNNI CPU)."""
    from qnkit.cpus import default_threads as backend_threads

    mask, preview, stats = tmp_path / "m.nii.gz", tmp_path / "p.png", tmp_path / "s.json"
    code, out, err = run_in_process("segment", box_ct, "--out", mask, "--preview", preview, "--stats", stats,
                                    "--resume", "--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32",
                                    "--batch-size", "100000", "--no-progress")
    assert code == 0, err
    record = tmp_path / "m.json"
    for path in (mask, preview, record, stats):
        assert path.is_file() and str(path) in out, (path, out)
    summary = out.splitlines()[-1]
    threads = backend_threads()
    assert summary.startswith(f"backend onnxruntime (fp32, cpu, batch 1{concurrent_words(threads)}, not 100000:") \
        and summary.endswith(
        f"stats -> {stats}"), summary
    assert "batch 100000" not in out + err
    (opened,) = [line for line in err.splitlines() if line.startswith("backend: ")]
    assert f"batch 1{concurrent_words(threads)}, not 100000" in opened
    backend = json.loads(stats.read_text())["backend"]
    assert backend["batch_size"] == 100000 and backend["slices_per_call"] == 1
    assert backend["concurrent_runs"] == threads and backend["intra_op_threads"] == 1


def test_a_preview_that_fails_leaves_the_finished_mask(run_in_process, box_ct, tmp_path, monkeypatch):
    """The preview is optional: its failure is a warning and exit code 1, and the mask and the stats
    (what the inference was for) stay; before, the mask was deleted with it."""
    from qnkit import batch

    def broken_preview(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(batch, "_write_preview", broken_preview)
    mask, preview, stats = tmp_path / "m.nii.gz", tmp_path / "p.png", tmp_path / "s.json"
    code, out, err = run_in_process("segment", box_ct, "--out", mask, "--preview", preview, "--stats", stats,
                                    "--no-progress")
    assert code == 1
    assert mask.is_file() and stats.is_file() and not preview.exists()
    assert any(f"preview {preview} not written" in w and "No space left on device" in w for w in warnings_in(err))
    assert err.splitlines()[-1] == f"qnkit: error: 1 preview(s) not written (the masks were): {preview}"
    assert f"-> {mask}" in out and str(preview) not in out  # what was written, and only that
    assert [case["name"] for case in json.loads(stats.read_text())["cases"]] == ["box"]


# --- one line on stderr, also when stderr is a file --------------------------------------------------------


def test_an_error_is_one_line_when_stderr_is_not_a_terminal(run_qnkit, tmp_path):
    """With progress on (the default) and stderr a pipe: no empty line from a progress bar before the
    error, for a NIfTI input and for a DICOM folder that fails to load."""
    bad_nifti = tmp_path / "ct.nii.gz"
    bad_nifti.write_bytes(b"not a nifti file")
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(bytes(128) + b"DICM" + bytes(64))  # DICOM magic, no image in it
    for source in (bad_nifti, series):
        proc = run_qnkit("segment", source, "--format", "nifti", "--out", tmp_path / "out.nii.gz")
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"qnkit: error: {source}"), repr(proc.stderr)
