"""No writer overwrites its own input, even when the output names the input by another path: a relative
path, a symbolic link or a hard link (qnkit.io.same_file, used by `qnkit segment`'s output plan, the NIfTI
writer and the DICOM writer). Each writer is tested through its own entry point, and the input's bytes
are checked to be unchanged."""
import os

import nibabel as nib
import numpy as np
import pytest

from qnkit import io as qio


@pytest.fixture
def ct(tmp_path):
    """A small valid CT NIfTI file and its bytes."""
    path = tmp_path / "ct.nii.gz"
    data = np.full((8, 8, 4), -1000, dtype=np.int16)
    data[2:6, 2:6, :] = 40
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path, path.read_bytes()


def _aliases(path):
    """The same file under other names: a relative path with '..', a symbolic link, a hard link."""
    folder = path.parent
    os.symlink(path, folder / "symlink.nii.gz")
    os.link(path, folder / "hardlink.nii.gz")
    return [folder / "sub" / ".." / path.name, folder / "symlink.nii.gz", folder / "hardlink.nii.gz"]


def test_same_file_by_path_link_and_inode(tmp_path, monkeypatch):
    a = tmp_path / "ct.nii.gz"
    a.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert qio.same_file("ct.nii.gz", a)  # plain strings, relative and absolute
    assert qio.same_file(tmp_path / "sub" / ".." / "ct.nii.gz", a)
    os.symlink(a, tmp_path / "link.nii.gz")
    assert qio.same_file(tmp_path / "link.nii.gz", a)
    os.link(a, tmp_path / "hard.nii.gz")
    assert qio.same_file(tmp_path / "hard.nii.gz", a)  # another name, the same inode
    (tmp_path / "other.nii.gz").write_bytes(b"x")
    assert not qio.same_file(tmp_path / "other.nii.gz", a)
    assert not qio.same_file(tmp_path / "missing.nii.gz", a)


def test_segment_refuses_an_output_that_is_its_input_even_with_force(ct, capsys):
    """`qnkit segment CT --out ALIAS --force`: one line, exit 2, the CT untouched, before any work."""
    from qnkit.cli import main

    path, original = ct
    (path.parent / "sub").mkdir()
    for alias in _aliases(path):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", str(path), "--out", str(alias), "--force", "--no-progress"])
        err = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "refusing to write over an input file" in err[0], err
        assert path.read_bytes() == original


def test_the_nifti_writer_refuses_its_source_under_another_name(ct):
    path, original = ct
    (path.parent / "sub").mkdir()
    mask, geometry = qio.load_labels(path)
    for alias in _aliases(path):
        with pytest.raises(qio.NiftiError, match="refusing to write over the input file"):
            qio.save_mask(mask > 0, geometry, alias, overwrite=True)
        assert path.read_bytes() == original


def test_the_dicom_writer_refuses_an_input_under_another_name(tmp_path):
    """A SEG or RTSTRUCT is never written over a file of the source series (checked before the dataset
    is touched, so no dataset is needed to test it)."""
    from qnkit.dicom.output import save_dataset
    from qnkit.dicom.series import DicomError

    source = tmp_path / "series" / "1.dcm"
    source.parent.mkdir()
    source.write_bytes(b"a DICOM file of the series")
    os.link(source, tmp_path / "seg.dcm")
    with pytest.raises(DicomError, match="refusing to write over an input file"):
        save_dataset(None, tmp_path / "seg.dcm", overwrite=True, inputs=(source,))
    assert source.read_bytes() == b"a DICOM file of the series"
