"""qnkit.io.same_file: the one check that keeps every writer off its own input (segment, DICOM, NIfTI)."""
import os

from qnkit import io as qio
from qnkit import segment


def test_one_definition_serves_every_caller():
    assert segment.same_file is qio.same_file


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
