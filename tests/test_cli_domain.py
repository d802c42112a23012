"""Out-of-domain inputs through `qnkit segment` (shipped model, small synthetic NIfTI files): no kidney found and
a volume too thin to hold one are warnings on stderr and in the stats JSON, and errors (exit code 2,
nothing written) under --strict."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qnkit.cli import main


@pytest.fixture
def run_in_process(capsys):
    """`qnkit ARGS` in this process -> (exit code, stdout, stderr)."""

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


def box_ct(path, slices: int = 24):
    """A CT without kidneys: air around a 9.6 x 9.6 cm block of soft tissue, 3 x 3 mm pixels, 5 mm slices
    (file axes x, y, z; small enough for the shipped model to run in about a second)."""
    data = np.full((48, 48, slices), -1000, dtype=np.int16)
    data[8:40, 8:40, :] = 20
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 5.0, 1.0])), path)
    return path


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("qnkit: warning: ")]



def test_no_kidney_found_is_a_warning_and_strict_makes_it_an_error(run_in_process, tmp_path):
    box = box_ct(tmp_path / "box.nii.gz")
    code, out, err = run_in_process("segment", box, "--out", tmp_path / "m.nii.gz", "--stats",
                                    tmp_path / "s.json", "--no-progress")
    assert code == 0 and "right absent, left absent" in out
    (warning,) = [w for w in warnings_in(err) if "no kidney found" in w]
    assert warning.startswith("qnkit: warning: box: no kidney found (right and left absent)")
    assert any("no kidney found" in w for w in json.loads((tmp_path / "s.json").read_text())["cases"][0]["warnings"])
    code, out, err = run_in_process("segment", box, "--out", tmp_path / "strict.nii.gz", "--strict",
                                    "--no-progress")
    lines = err.splitlines()
    assert code == 2 and lines[-1].startswith("qnkit: error: box: no kidney found") and "--strict" in lines[-1]
    assert not (tmp_path / "strict.nii.gz").exists()


def test_a_single_slice_cannot_hold_a_kidney(run_in_process, tmp_path):
    one = box_ct(tmp_path / "one.nii.gz", slices=1)
    code, _, err = run_in_process("segment", one, "--no-progress")
    assert code == 0
    assert any(w.startswith("qnkit: warning: one: the volume spans only 5 mm along the slices (1 slice of 5 mm)")
               for w in warnings_in(err)), err
    code, _, err = run_in_process("segment", one, "--strict", "--force", "--no-progress")
    assert code == 2 and "spans only 5 mm" in err.splitlines()[-1] and "--strict" in err.splitlines()[-1]


def test_the_extent_check_names_the_thin_axis():
    from qnkit.domain import MIN_EXTENT_MM, extent_warning

    assert extent_warning((200, 512, 512), (1.0, 0.7, 0.7)) is None
    assert "1 slice of 3 mm" in extent_warning((1, 512, 512), (3.0, 0.7, 0.7))
    assert "from side to side" in extent_warning((200, 512, 20), (1.0, 0.7, 1.0))
    assert extent_warning((6, 64, 64), (MIN_EXTENT_MM / 6, 1.0, 1.0)) is None  # exactly the floor is enough
