"""Fast .nii.gz I/O: qnkit.gzip_codec (ISA-L or the standard library), qnkit.io.write_nifti and the
tiled C/Fortran copy of qnkit.array_layout. Round trips are exact, the output is plain gzip that the
standard library and nibabel open, and everything works the same when ``isal`` is not installed."""
from __future__ import annotations

import gzip
import importlib
import sys

import nibabel as nib
import numpy as np
import pytest

from qnkit import gzip_codec, io
from qnkit.array_layout import copy_in_order
from qnkit.io import NiftiError

AFFINE = np.array([[0.0, 0.0, -0.8, 100.0], [0.0, -0.8, 0.0, 80.0], [-2.5, 0.0, 0.0, 10.0], [0, 0, 0, 1]])


@pytest.fixture(params=["isal", "zlib"])
def codec(request, monkeypatch):
    """Run a test with ISA-L, and again as if the ``isal`` package were not installed."""
    if request.param == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import ...` now raises ImportError
        importlib.reload(gzip_codec)
        yield "zlib"
        monkeypatch.delitem(sys.modules, "isal")
        importlib.reload(gzip_codec)
    else:
        import isal  # noqa: F401  (core: a missing ISA-L is an error, not a skip)

        yield "isal"


def _ct(shape=(24, 96, 80), seed=0) -> np.ndarray:
    """A CT-like int16 volume: air outside a noisy soft-tissue ellipse."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.45 * shape[2])) ** 2 < 1
    ct = np.where(body, 40, -1000) + rng.normal(0, 15, shape)
    return np.broadcast_to(ct, shape).astype(np.int16)


def test_codec_names_the_package_in_use(codec):
    assert gzip_codec.codec() == codec


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_volume_and_mask_round_trip_exactly(codec, name, tmp_path):
    ct = _ct()
    geometry = io.Geometry.from_affine(AFFINE, ct.shape)
    io.save_volume(ct, geometry, tmp_path / name)
    loaded, loaded_geometry = io.load_image(tmp_path / name)
    assert loaded.dtype == np.int16 and loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, ct)
    np.testing.assert_allclose(loaded_geometry.affine, AFFINE, atol=1e-5)  # float32 in the header

    mask = ct > 0
    io.save_mask(mask, loaded_geometry, tmp_path / ("mask_" + name))
    labels, _ = io.load_labels(tmp_path / ("mask_" + name))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mask)


def test_written_bytes_are_nibabels_and_plain_gzip(codec, tmp_path):
    """The decompressed file is byte for byte what nibabel serialises; stdlib gzip and nibabel read it.

    The volume spans several 1 MiB compression blocks, so the threaded writer's block joins are checked.
    """
    ct = _ct((40, 160, 192))  # 2.3 MiB of voxels
    image = nib.Nifti1Image(ct, AFFINE)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"written by a test"))
    path = io.write_nifti(image, tmp_path / "ct.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    assert raw == image.to_bytes()
    again = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), ct)
    assert again.header.extensions[0].get_content() == b"written by a test"


def test_nifti2_gz_round_trip(codec, tmp_path):
    ct = _ct((6, 20, 30))
    path = io.write_nifti(nib.Nifti2Image(ct, AFFINE), tmp_path / "ct.nii.gz")
    loaded, geometry = io.load_image(path)
    assert isinstance(geometry.header, nib.Nifti2Header)
    np.testing.assert_array_equal(loaded, ct)


def test_files_of_one_codec_are_read_by_the_other(tmp_path, monkeypatch):
    import isal  # noqa: F401  (core: a missing ISA-L is an error, not a skip)

    ct = _ct((8, 40, 50))
    io.write_nifti(nib.Nifti1Image(ct, AFFINE), tmp_path / "isal.nii.gz")
    monkeypatch.setitem(sys.modules, "isal", None)
    importlib.reload(gzip_codec)
    try:
        assert gzip_codec.codec() == "zlib"
        np.testing.assert_array_equal(io.load_image(tmp_path / "isal.nii.gz")[0], ct)
        io.write_nifti(nib.Nifti1Image(ct, AFFINE), tmp_path / "zlib.nii.gz")
    finally:
        monkeypatch.delitem(sys.modules, "isal")
        importlib.reload(gzip_codec)
    assert gzip_codec.codec() == "isal"
    np.testing.assert_array_equal(io.load_image(tmp_path / "zlib.nii.gz")[0], ct)


def test_write_nifti_refuses_to_replace_without_overwrite(tmp_path):
    image = nib.Nifti1Image(_ct((2, 8, 8)), AFFINE)
    path = io.write_nifti(image, tmp_path / "a.nii.gz")
    with pytest.raises(NiftiError, match="exists"):
        io.write_nifti(image, path)
    io.write_nifti(nib.Nifti1Image(np.zeros((2, 8, 8), np.int16), AFFINE), path, overwrite=True)
    assert not io.load_image(path)[0].any()
    with pytest.raises(NiftiError, match="must be a .nii"):
        io.write_nifti(image, tmp_path / "a.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_damaged_deflate_data_is_a_clear_error(codec, tmp_path):
    path = io.write_nifti(nib.Nifti1Image(_ct((8, 64, 64)), AFFINE), tmp_path / "ct.nii.gz")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroed bytes in the middle of the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(NiftiError, match="truncated or corrupt|not a readable"):
        io.load_image(path)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("view", ["contiguous", "fortran", "flipped", "transposed", "sliced"])
def test_copy_in_order_equals_numpy(order, view):
    base = np.arange(70 * 90 * 33, dtype=np.int32).reshape(70, 90, 33)
    array = {"contiguous": base, "fortran": np.asfortranarray(base), "flipped": base[::-1, :, ::-1],
             "transposed": base.transpose(2, 0, 1), "sliced": base[3:60:2, 5:, 1:30]}[view]
    out = copy_in_order(array, order)
    assert out.flags.c_contiguous if order == "C" else out.flags.f_contiguous
    assert not np.shares_memory(out, base)
    np.testing.assert_array_equal(out, array)
    cast = copy_in_order(array, order, dtype=np.float32)
    assert cast.dtype == np.float32
    np.testing.assert_array_equal(cast, array.astype(np.float32))


def test_copy_in_order_other_dimensions():
    for array in (np.arange(12).reshape(3, 4), np.zeros((0, 3, 4)), np.arange(24).reshape(2, 3, 2, 2)):
        np.testing.assert_array_equal(copy_in_order(array.T, "C"), array.T)
