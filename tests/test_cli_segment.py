"""`qnkit segment` as a user meets it, on small synthetic NIfTI files (a few seconds each, shipped model):
an error is one line on stderr even when stderr is a file."""
from __future__ import annotations


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
