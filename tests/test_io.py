"""Tests for qnkit.io: orientation handling, dtype rules, exact write-back, errors."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from qnkit import io
from qnkit.errors import QnkitInputError
from qnkit.io import NiftiError


def _kits_labels_dir() -> Path:
    env = os.environ.get("QNKIT_KITS_LABELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "kits19-labels"


# A few of the 210 real label files (every 30th: varied headers, slice counts and spacings); all of them
# would take minutes of gzip reading for no new header kind.
KITS_LABELS = sorted(_kits_labels_dir().glob("case_*/segmentation.nii.gz"))[::30]

# Header fields that define the grid and must survive a load -> save round trip unchanged.
GRID_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
               "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
               "xyzt_units", "dim_info")

# One internal volume (slices, rows, cols) in KiTS orientation, and its voxel -> RAS+ affine.
INTERNAL_SHAPE = (5, 6, 7)
INTERNAL_AFFINE = np.array([[0.0, 0.0, -0.75, 120.0],
                            [0.0, -0.8, 0.0, 90.0],
                            [-2.5, 0.0, 0.0, -30.0],
                            [0.0, 0.0, 0.0, 1.0]])


def _rotation(deg: float) -> np.ndarray:
    """A 4x4 rotation about a tilted axis, small enough to keep the nearest orientation."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(deg)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    return out


def _internal_array(dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(INTERNAL_SHAPE)) - 100).reshape(INTERNAL_SHAPE).astype(dtype)


def _write_oriented(path, internal, internal_affine, axcodes, dtype=None):
    """Store an internal-layout array in file orientation ``axcodes``; return (file data, affine)."""
    ornt = ornt_transform(axcodes2ornt(io.INTERNAL_AXCODES), axcodes2ornt(axcodes))
    data = apply_orientation(internal, ornt)
    affine = internal_affine @ inv_ornt_aff(ornt, internal.shape)
    nib.save(nib.Nifti1Image(data, affine, dtype=dtype or data.dtype), path)
    return data, affine


def _write(path, data, affine=None, dtype=None, slope=None, inter=None, klass=nib.Nifti1Image):
    img = klass(data, np.eye(4) if affine is None else affine, dtype=dtype or data.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return Path(path)


def _same_header_field(a, b) -> bool:
    return np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f")


# --- real KiTS19 label files -------------------------------------------------------------


@pytest.mark.skipif(not KITS_LABELS, reason="KiTS19 label files not available")
@pytest.mark.parametrize("src", KITS_LABELS, ids=lambda p: p.parent.name)
def test_kits_labels_round_trip_exactly(src, tmp_path):
    labels, geom = io.load_labels(src)
    original = nib.load(src)
    assert labels.dtype == np.uint8 and labels.flags.c_contiguous
    assert nib.aff2axcodes(original.affine) == io.INTERNAL_AXCODES
    assert geom.internal_shape == labels.shape == original.shape  # KiTS is already internal
    assert set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(geom.internal_affine, original.affine)
    assert geom.spacing[0] == pytest.approx(abs(original.affine[2, 0]))

    out = io.save_mask(labels, geom, tmp_path / "mask.nii.gz")
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    assert (written.dataobj.slope, written.dataobj.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(written.header.get_qform(), original.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), original.header.get_sform())
    for field in GRID_FIELDS:
        assert _same_header_field(written.header[field], original.header[field]), field


# --- orientations ------------------------------------------------------------------------


ORIENTATIONS = {
    "kits": (("I", "P", "L"), np.eye(4)),
    "ras": (("R", "A", "S"), np.eye(4)),
    "lps": (("L", "P", "S"), np.eye(4)),
    "oblique_permuted": (("A", "S", "R"), _rotation(20.0)),
}


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_every_orientation_loads_to_the_same_internal_array(name, tmp_path):
    axcodes, tilt = ORIENTATIONS[name]
    internal = _internal_array()
    internal_affine = tilt @ INTERNAL_AFFINE
    src = tmp_path / f"{name}.nii.gz"
    file_data, file_affine = _write_oriented(src, internal, internal_affine, axcodes)

    image, geom = io.load_image(src)
    assert image.dtype == np.int16 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, internal)
    assert geom.shape == file_data.shape and geom.internal_shape == INTERNAL_SHAPE
    np.testing.assert_allclose(geom.internal_affine, internal_affine, atol=1e-5)
    np.testing.assert_allclose(geom.spacing, (2.5, 0.8, 0.75), rtol=1e-6)
    assert geom.voxel_volume_ml == pytest.approx(2.5 * 0.8 * 0.75 / 1000, rel=1e-6)
    np.testing.assert_array_equal(io.to_file_layout(image, geom), file_data)
    np.testing.assert_array_equal(io.to_internal(file_data, geom), internal)

    out = io.save_volume(image, geom, tmp_path / "out.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), file_data)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(written.affine, nib.load(src).affine)

    mask = (internal > 0).astype(np.uint8)
    np.testing.assert_array_equal(io.load_labels(io.save_mask(mask, geom, tmp_path / "m.nii"))[0], mask)


def test_labels_in_another_orientation_match_the_image_grid(tmp_path):
    internal = _internal_array()
    _write_oriented(tmp_path / "img.nii.gz", internal, INTERNAL_AFFINE, ("R", "A", "S"))
    _write_oriented(tmp_path / "seg.nii.gz", (internal > 0).astype(np.uint8), INTERNAL_AFFINE,
                    ("L", "P", "S"))
    _, g_img = io.load_image(tmp_path / "img.nii.gz")
    _, g_seg = io.load_labels(tmp_path / "seg.nii.gz")
    io.check_same_grid(g_img, g_seg)


@pytest.mark.parametrize("qcode,scode", [(1, 0), (0, 4), (0, 0), (2, 1)])
def test_qform_sform_codes_are_kept(qcode, scode, tmp_path):
    affine = np.array([[-0.7, 0, 0, 10], [0, 0.7, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    img = nib.Nifti1Image(_internal_array(), affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    nib.save(img, tmp_path / "in.nii")
    original = nib.load(tmp_path / "in.nii")

    data, geom = io.load_image(tmp_path / "in.nii")
    np.testing.assert_array_equal(geom.affine, original.affine)  # nibabel's best affine
    written = nib.load(io.save_volume(data, geom, tmp_path / "out.nii"))
    for field in GRID_FIELDS:
        assert _same_header_field(written.header[field], original.header[field]), field
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))


def test_nifti2_round_trip(tmp_path):
    src = _write(tmp_path / "in.nii.gz", _internal_array(np.int32), klass=nib.Nifti2Image)
    data, geom = io.load_image(src)
    written = nib.load(io.save_mask(data > 0, geom, tmp_path / "out.nii.gz"))
    assert isinstance(written, nib.Nifti2Image) and written.get_data_dtype() == np.uint8


# --- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("disk,expected", [
    (np.int16, np.int16), (np.int32, np.int32), (np.uint16, np.uint16),
    (np.float32, np.float32), (np.float64, np.float32),
    (np.int8, np.int16), (np.uint8, np.int16), (np.int64, np.int32), (np.uint32, np.int32),
    (">i2", np.int16),  # big-endian on disk -> native order in memory
])
def test_image_dtype_rules(disk, expected, tmp_path):
    values = np.arange(60).reshape(3, 4, 5) + (0 if np.dtype(disk).kind == "u" else -30)
    src = _write(tmp_path / "in.nii.gz", values.astype(disk))
    data, _ = io.load_image(src)
    assert data.dtype == np.dtype(expected) and data.dtype.isnative
    np.testing.assert_array_equal(data, apply_orientation(values, io.Geometry.from_affine(
        np.eye(4), values.shape).ornt))


def test_uint32_too_large_for_int32_becomes_float32(tmp_path):
    values = np.full((2, 2, 2), 2**31 + 256, dtype=np.uint32)
    data, _ = io.load_image(_write(tmp_path / "in.nii", values))
    assert data.dtype == np.float32 and data.max() == 2**31 + 256


def test_scaled_image_is_float32_with_scaling_applied(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    src = _write(tmp_path / "in.nii.gz", raw, affine=np.diag([-1, -1, 1, 1]), slope=2.0, inter=-1024.0)
    data, geom = io.load_image(src)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(io.to_file_layout(data, geom), raw * 2.0 - 1024.0)


def test_labels_are_integers_without_float(tmp_path):
    raw = np.array([0, 1, 2, 1] * 6, dtype=np.int16).reshape(2, 3, 4)
    labels, _ = io.load_labels(_write(tmp_path / "i16.nii.gz", raw))
    assert labels.dtype == np.uint8 and labels.flags.c_contiguous
    big, _ = io.load_labels(_write(tmp_path / "big.nii.gz", raw * 300))
    assert big.dtype == np.int32 and big.max() == 600
    floats, _ = io.load_labels(_write(tmp_path / "f.nii.gz", raw.astype(np.float32)))
    assert floats.dtype == np.uint8
    np.testing.assert_array_equal(floats, labels)


# --- errors ------------------------------------------------------------------------------


def _error(fn, *args, match, **kwargs):
    with pytest.raises(NiftiError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, QnkitInputError) and "\n" not in str(info.value)


def test_missing_and_non_nifti_files(tmp_path):
    _error(io.load_image, tmp_path / "nope.nii.gz", match="file not found")
    _error(io.load_image, tmp_path, match="not a file")
    (tmp_path / "notes.txt").write_text("hello")
    _error(io.load_image, tmp_path / "notes.txt", match="not a NIfTI file")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk" * 200)
    _error(io.load_image, tmp_path / "junk.nii.gz", match="not a readable NIfTI")
    (tmp_path / "junk.nii").write_bytes(b"junk" * 200)
    _error(io.load_labels, tmp_path / "junk.nii", match="not a readable NIfTI")
    (tmp_path / "empty.nii.gz").write_bytes(gzip.compress(b""))
    _error(io.load_image, tmp_path / "empty.nii.gz", match="not a readable NIfTI")


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_file(name, tmp_path):
    rng = np.random.default_rng(0)
    full = _write(tmp_path / ("full" + name[3:]), rng.integers(-1000, 1000, (20, 30, 40)).astype(np.int16))
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    _error(io.load_image, tmp_path / name, match="truncated or corrupt")
    _error(io.load_labels, tmp_path / name, match="truncated or corrupt")


def test_wrong_dimensionality(tmp_path):
    _error(io.load_image, _write(tmp_path / "2d.nii", np.zeros((4, 5), np.int16)), match="got a 2-D")
    _error(io.load_image, _write(tmp_path / "4d.nii", np.zeros((4, 5, 6, 3), np.int16)),
           match=r"got a 4-D \(3 volumes\)")


def test_trailing_singleton_4d_is_read_as_3d(tmp_path):
    values = np.arange(120, dtype=np.int16).reshape(4, 5, 6, 1)
    src = _write(tmp_path / "4d1.nii.gz", values)
    data, geom = io.load_image(src)
    assert data.ndim == 3 and geom.shape == (4, 5, 6)
    written = nib.load(io.save_volume(data, geom, tmp_path / "out.nii.gz"))
    assert written.shape == (4, 5, 6)
    np.testing.assert_array_equal(written.affine, nib.load(src).affine)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image_voxels(bad, tmp_path):
    values = np.zeros((3, 4, 5), np.float32)
    values[1, 2, 3] = bad
    _error(io.load_image, _write(tmp_path / "bad.nii.gz", values), match="1 NaN or infinite voxel")


def test_non_integer_labels(tmp_path):
    values = np.zeros((3, 4, 5), np.float32)
    values[0, 0, 0] = 0.5
    _error(io.load_labels, _write(tmp_path / "frac.nii.gz", values), match="not integer-valued")
    values[0, 0, 0] = np.nan
    _error(io.load_labels, _write(tmp_path / "nan.nii.gz", values), match="not integer-valued")


def test_grid_mismatch(tmp_path):
    _, a = io.load_image(_write(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16)))
    _, b = io.load_labels(_write(tmp_path / "b.nii", np.zeros((4, 5, 7), np.uint8)))
    shifted = np.diag([2.0, 1.0, 1.0, 1.0])
    _, c = io.load_labels(_write(tmp_path / "c.nii", np.zeros((4, 5, 6), np.uint8), affine=shifted))
    _error(io.check_same_grid, a, b, match="shape mismatch .*a.nii and .*b.nii")
    _error(io.check_same_grid, a, c, match="affine mismatch")


def test_bad_arrays_to_save(tmp_path):
    data, geom = io.load_image(_write(tmp_path / "in.nii.gz", np.zeros((4, 5, 6), np.int16)))
    _error(io.save_mask, np.zeros((6, 5, 5), np.uint8), geom, tmp_path / "m.nii.gz", match="does not match")
    _error(io.save_mask, data.astype(np.float32), geom, tmp_path / "m.nii.gz", match="bool or integer")
    _error(io.save_mask, data + 256, geom, tmp_path / "m.nii.gz", match="do not fit in uint8")
    _error(io.save_volume, data + 0.5, geom, tmp_path / "m.nii.gz", dtype=np.int16, match="non-integer")
    _error(io.save_mask, data, geom, tmp_path / "m.png", match=r"\.nii or \.nii\.gz")
    _error(io.save_mask, data, geom, tmp_path / "no" / "m.nii", match="does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


# --- writing safely ----------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path):
    data, geom = io.load_image(_write(tmp_path / "in.nii.gz", np.ones((4, 5, 6), np.int16)))
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    _error(io.save_mask, data, geom, out, match="exists; pass overwrite=True")
    assert out.read_bytes() == b"keep me"
    assert io.save_mask(data, geom, out, overwrite=True) == out
    assert io.load_labels(out)[0].sum() == data.size


def test_input_is_never_overwritten(tmp_path):
    src = _write(tmp_path / "in.nii.gz", np.ones((4, 5, 6), np.int16))
    before = src.read_bytes()
    data, geom = io.load_image(src)
    _error(io.save_mask, data, geom, src, overwrite=True, match="over the input")
    (tmp_path / "link.nii.gz").symlink_to(src)
    _error(io.save_mask, data, geom, tmp_path / "link.nii.gz", overwrite=True, match="over the input")
    assert src.read_bytes() == before


def test_no_temp_file_left_after_a_failed_write(tmp_path, monkeypatch):
    data, geom = io.load_image(_write(tmp_path / "in.nii.gz", np.ones((4, 5, 6), np.int16)))

    def half_write(filename, **options):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.gzip_codec, "open_write", half_write)
    _error(io.save_mask, data, geom, tmp_path / "out.nii.gz", match="cannot write: disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def test_is_nifti_path():
    assert io.is_nifti_path("a/case.nii.gz") and io.is_nifti_path("x.NII") and io.is_nifti_path(Path("y.nii"))
    assert not io.is_nifti_path("x.nii.zip") and not io.is_nifti_path("x.gz") and not io.is_nifti_path("nii")


def test_unsupported_data_type(tmp_path):
    src = _write(tmp_path / "c.nii", np.zeros((3, 4, 5), np.complex64))
    _error(io.load_image, src, match="unsupported image data type")
    _error(io.load_labels, src, match="unsupported label data type")


@pytest.mark.parametrize("name", ORIENTATIONS)
@pytest.mark.parametrize("disk", [np.int16, ">i2", np.uint8, np.int8, np.int32, np.uint16])
@pytest.mark.parametrize("planes_per_block", [1, 2, 100])
def test_images_are_read_block_by_block_into_the_internal_layout(name, disk, planes_per_block, tmp_path,
                                                                 monkeypatch):
    """Integer images are read in blocks of file planes straight into the internal layout: the same
    array as nibabel's whole-volume read reoriented, for every orientation, dtype (byte order included)
    and block size (one plane; two, leaving a short last block; all), gzipped or not."""
    axcodes, tilt = ORIENTATIONS[name]
    internal = _internal_array()
    internal = (internal % 100 if np.dtype(disk).kind == "u" else internal % 120 - 60).astype(disk)
    for suffix in (".nii.gz", ".nii"):
        src = tmp_path / f"{name}{suffix}"
        file_data, _ = _write_oriented(src, internal, tilt @ INTERNAL_AFFINE, axcodes)
        plane = file_data.shape[0] * file_data.shape[1] * np.dtype(disk).itemsize
        monkeypatch.setattr(io, "STREAM_BLOCK_BYTES", plane * planes_per_block)
        image, geom = io.load_image(src)
        reference = np.asanyarray(nib.load(src).dataobj)
        assert image.dtype == np.dtype(np.int16 if np.dtype(disk).itemsize == 1 else disk).newbyteorder("=")
        assert image.flags.c_contiguous and image.dtype.isnative
        np.testing.assert_array_equal(image, io.to_internal(reference, geom))
        np.testing.assert_array_equal(image, internal)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_in_a_later_block(name, tmp_path, monkeypatch):
    values = np.random.default_rng(1).integers(-1000, 1000, (20, 30, 40)).astype(np.int16)
    data = _write(tmp_path / ("full" + name[3:]), values).read_bytes()
    monkeypatch.setattr(io, "STREAM_BLOCK_BYTES", 20 * 30 * 2 * 3)  # 3 planes per block
    (tmp_path / name).write_bytes(data[: len(data) * 9 // 10])
    _error(io.load_image, tmp_path / name, match="truncated or corrupt")
