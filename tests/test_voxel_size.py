"""A NIfTI header whose voxel size (pixdim) is zero or not finite, where the affine is built from it, is refused
by qnkit in one line of its own (exit code 2), instead of nibabel's silent guess of 1 mm; under a valid
sform the pixdim is not used and the file reads quietly."""
from __future__ import annotations

import gzip
import io
import struct

import nibabel as nib
import numpy as np
import pytest



def _with_pixdim(path, values, *, sform: bool = False):
    """A .nii.gz whose header stores exactly ``values`` as pixdim[1:4] (nibabel itself would not write a 0),
    qform code 0 and sform code 0 (or 2 with a 3 mm affine when ``sform``)."""
    data = np.full((40, 40, 12), -1000, dtype=np.int16)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]) if sform else None)
    img.header.set_qform(None, code=0)
    if not sform:
        img.header.set_sform(None, code=0)
    raw = bytearray(img.header.binaryblock)
    raw[80:92] = struct.pack("<3f", *values)  # pixdim[1], pixdim[2], pixdim[3]
    buffer = io.BytesIO()
    nib.Nifti1Image(data, img.affine, img.header).to_file_map(
        {"image": nib.FileHolder(fileobj=buffer), "header": nib.FileHolder(fileobj=buffer)})
    body = bytearray(buffer.getvalue())
    body[:348] = raw
    path.write_bytes(gzip.compress(bytes(body)))
    return path


@pytest.mark.parametrize("pixdim", [(3.0, 3.0, 0.0), (0.0, 0.0, 0.0), (3.0, float("nan"), 3.0),
                                    (3.0, 3.0, float("inf"))])
def test_a_zero_or_non_finite_voxel_size_is_refused_in_qnkits_own_words(run_qnkit, tmp_path, pixdim):
    """nibabel would set a 0 to 1 mm, print its own warning and go on (a 3 mm CT then measured kidneys at
    a ninth of their volume); qnkit refuses the file in one line of its own, exit code 2."""
    ct = _with_pixdim(tmp_path / "ct.nii.gz", pixdim)
    proc = run_qnkit("segment", ct, "--no-progress")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"qnkit: error: {ct}: voxel size ") and "zero or not finite" in lines[0]
    assert "pixdim[1,2,3]" not in proc.stderr and proc.stdout == ""
    assert not list(tmp_path.glob("*_kidneys*"))


def test_a_zero_pixdim_under_a_valid_sform_is_read_from_the_sform_quietly(tmp_path, capfd):
    from qnkit import io as qio

    ct = _with_pixdim(tmp_path / "ct.nii.gz", (0.0, 0.0, 0.0), sform=True)
    _, geometry = qio.load_image(ct)
    assert geometry.spacing == (3.0, 3.0, 3.0)
    assert capfd.readouterr().err == ""  # not nibabel's "setting 0 dims to 1" either
