"""NIfTI input/output in one internal layout.

Every volume qnkit works on is held as a C-contiguous ``(slices, rows, cols)`` array in the
KiTS19 orientation, nibabel axcodes ``('I', 'P', 'L')``: axis 0 runs superior→inferior,
axis 1 anterior→posterior, axis 2 patient right→left. Real KiTS19 files are already stored
this way, so for them loading and saving are pure copies; any other orientation is
reoriented with :mod:`nibabel.orientations` (axis permutations and flips only, no
resampling; an oblique volume is put in its nearest orientation and keeps its exact
affine in :attr:`Geometry.internal_affine`).

A :class:`Geometry` remembers the file's shape, affine, header and the orientation
transform, so that a result is written back on the input's exact grid: same shape, affine,
qform/sform matrices and codes, no intensity scaling.

Dtype rules (see :func:`load_image` and :func:`load_labels`):

* images: int16/int32/uint16 are kept; int8/uint8 become int16; uint32/int64/uint64 become
  int32 when the values fit, float32 otherwise; floats become float32; any scl_slope /
  scl_inter scaling gives float32. NaN or infinite voxels are refused.
* labels: read as integers without a float round trip; uint8 when the values fit in
  0..255, int32 otherwise; float labels must be integer-valued.

``.nii.gz`` files are decoded and encoded through :mod:`qnkit.gzip_codec` (ISA-L when the ``isal``
package is installed, several threads when writing), and the Fortran-order voxel data of a file are
turned into the internal C order by the tiled copy of :mod:`qnkit.array_layout`, both of which are
several times faster than nibabel's own path. :func:`write_nifti` writes any nibabel image that way.

A 4-D (or higher) file whose extra dimensions are all 1 (``(X, Y, Z, 1)``, common from
converters) is read as 3-D; written results are then 3-D on the same spatial grid.

A header whose voxel size (pixdim) is zero or not finite where the affine is built from it (no sform)
is refused: nibabel would put 1 mm in its place, and every volume in mL would be a guess.
"""
from __future__ import annotations

import contextlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from nibabel.spatialimages import HeaderDataError

from qnkit import gzip_codec
from qnkit._atomic import atomic_path
from qnkit.array_layout import copy_in_order, copy_into
from qnkit.errors import QnkitInputError

__all__ = [
    "INTERNAL_AXCODES",
    "Geometry",
    "NiftiError",
    "check_same_grid",
    "is_nifti_path",
    "load_image",
    "load_labels",
    "save_mask",
    "save_volume",
    "to_file_layout",
    "to_internal",
    "write_nifti",
]

#: Orientation of the internal layout (that of KiTS19 files).
INTERNAL_AXCODES = ("I", "P", "L")
_INTERNAL_ORNT = axcodes2ornt(INTERNAL_AXCODES)

# Errors nibabel (and gzip/zlib under it) raise for unreadable, damaged or truncated files.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError,
                *gzip_codec.READ_ERRORS)


class NiftiError(QnkitInputError):
    """A NIfTI file that cannot be read or written as asked (message names the file)."""


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume came from: enough to map arrays between file and internal layout.

    ``ornt`` is the nibabel orientation transform from file axes to internal axes.
    ``source`` is the file it was loaded from (``None`` for a geometry built by hand); it is
    used to refuse writing over the input.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    header: nib.Nifti1Header
    ornt: np.ndarray
    source: Path | None = None

    @classmethod
    def from_affine(cls, affine, shape, header: nib.Nifti1Header | None = None,
                    source: Path | None = None) -> "Geometry":
        """Build a geometry for a file-layout grid ``shape`` with voxel→RAS+ ``affine``.

        Without a header a fresh NIfTI-1 header is made with the affine as sform (code 2,
        'aligned') and qform (code 0), as nibabel does for a new image.
        """
        affine = np.array(affine, dtype=np.float64)
        shape = tuple(int(n) for n in shape)
        if affine.shape != (4, 4) or len(shape) != 3:
            raise NiftiError(f"need a 4x4 affine and a 3-D shape, got {affine.shape} and {shape}")
        file_ornt = io_orientation(affine)
        if np.isnan(file_ornt).any():
            raise NiftiError(f"{source or 'volume'}: affine is degenerate, no orientation: "
                             f"{affine.tolist()}")
        if header is None:
            header = nib.Nifti1Header()
            header.set_data_shape(shape)
            header.set_sform(affine, code="aligned")
            header.set_qform(affine, code="unknown")
        return cls(affine=affine, shape=shape, header=header.copy(),
                   ornt=ornt_transform(file_ornt, _INTERNAL_ORNT), source=source)

    @property
    def internal_shape(self) -> tuple[int, int, int]:
        """Array shape in the internal layout."""
        out = [0, 0, 0]
        for file_axis, (internal_axis, _) in enumerate(self.ornt):
            out[int(internal_axis)] = self.shape[file_axis]
        return tuple(out)

    @property
    def internal_affine(self) -> np.ndarray:
        """Voxel (internal index) → RAS+ mm affine."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the internal axes (slice, row, col)."""
        return tuple(float(s) for s in np.linalg.norm(self.internal_affine[:3, :3], axis=0))

    @property
    def orientation_guessed(self) -> bool:
        """True when the header's qform and sform codes are both 0 ('unknown'): the affine is then
        nibabel's guess from the voxel sizes alone, so left/right and up/down may be wrong."""
        return int(self.header["qform_code"]) == 0 and int(self.header["sform_code"]) == 0

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (exact for oblique/sheared affines)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def _to_file_ornt(self) -> np.ndarray:
        return ornt_transform(_INTERNAL_ORNT, io_orientation(self.affine))


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def to_internal(array_file_layout: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Reorient an array from the file's axes to the internal layout (C-contiguous).

    Extra trailing axes (e.g. channels) are carried along unchanged.
    """
    array = np.asanyarray(array_file_layout)
    _check_shape(array, geometry.shape, "file layout")
    oriented = apply_orientation(array, geometry.ornt)
    return oriented if oriented.flags.c_contiguous else copy_in_order(oriented, "C")


def to_file_layout(array_internal: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo :func:`to_internal`: reorient an internal-layout array to the file's axes."""
    array = np.asanyarray(array_internal)
    _check_shape(array, geometry.internal_shape, "internal layout")
    return np.ascontiguousarray(apply_orientation(array, geometry._to_file_ornt))


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Load a 3-D CT volume into the internal layout.

    Returns int16/int32/uint16 (the on-disk integer type, when unscaled) or float32; see
    the module docstring for the full dtype rules. NaN/inf voxels raise :class:`NiftiError`.
    """
    with _opened(path) as (img, geometry):
        proxy = img.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        disk = img.get_data_dtype()
        if disk.kind not in "iuf":
            raise NiftiError(f"{path}: unsupported image data type {disk}")
        if scaled or disk.kind == "f":
            data = _read(path, lambda: img.get_fdata(dtype=np.float32, caching="unchanged"))
        elif disk.newbyteorder("=") in _STREAMED:
            return _read(path, lambda: _read_into_internal(img, geometry)), geometry
        else:
            data = _read(path, lambda: np.asanyarray(proxy))
    if scaled or disk.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise NiftiError(f"{path}: image has {bad} NaN or infinite voxel(s)")
    else:
        data = _image_int(_as_native(data))
    return to_internal(data.reshape(geometry.shape), geometry), geometry


#: Unscaled integer types whose in-memory type follows from the type alone (kept, or int8/uint8 -> int16,
#: lossless): such images are read block by block straight into the internal layout. Wider ones
#: (:func:`_image_int`) depend on their values.
_STREAMED = {np.dtype(disk): np.dtype(kept) for disk, kept in (
    (np.int16, np.int16), (np.int32, np.int32), (np.uint16, np.uint16), (np.int8, np.int16), (np.uint8, np.int16))}

#: Bytes of whole file planes read per block.
STREAM_BLOCK_BYTES = 32 << 20


def _read_into_internal(img: nib.Nifti1Image, geometry: Geometry) -> np.ndarray:
    """The voxels of an unscaled integer image in the internal layout, read in blocks of whole planes
    (the file's slowest axis) and each copied into place through a reoriented view of the result: the
    volume is never held twice (whole, in the file's order, then transposed), which halves the peak
    memory of loading a CT and spares writing a volume's worth of fresh memory."""
    disk = img.dataobj.dtype
    out = np.empty(geometry.internal_shape, dtype=_STREAMED[disk.newbyteorder("=")])
    in_file_axes = apply_orientation(out, geometry._to_file_ornt)
    if not np.may_share_memory(in_file_axes, out):  # pragma: no cover - nibabel reorients by views
        raise RuntimeError("nibabel's apply_orientation copied instead of returning a view")
    nx, ny, nz = geometry.shape
    plane = nx * ny * disk.itemsize
    per_block = max(1, STREAM_BLOCK_BYTES // plane)
    buffer = bytearray(plane * min(per_block, nz))
    with _data_stream(img) as stream:
        stream.seek(img.dataobj.offset)
        for start in range(0, nz, per_block):
            count = min(per_block, nz - start)
            view = memoryview(buffer)[:count * plane]
            _read_exactly(stream, view)
            block = np.frombuffer(view, dtype=disk).reshape((nx, ny, count), order="F")
            copy_into(in_file_axes[:, :, start:start + count], block)
    return out


@contextlib.contextmanager
def _data_stream(img: nib.Nifti1Image):
    """The open stream of a .nii.gz being read (see :func:`_load_header`), or a .nii file opened here."""
    holder = img.file_map["image"]
    if holder.fileobj is not None:
        yield holder.fileobj
    else:
        with open(holder.filename, "rb") as stream:
            yield stream


def _read_exactly(stream, view: memoryview) -> None:
    """Fill `view` from `stream`; EOFError when the data end first (a truncated file)."""
    done = 0
    while done < len(view):
        n = stream.readinto(view[done:])
        if not n:
            raise EOFError(f"voxel data end {len(view) - done} bytes early")
        done += n


def load_geometry(path: str | os.PathLike) -> Geometry:
    """The Geometry of a NIfTI file from its header (voxel data are not read)."""
    return _open(path)[1]


def load_labels(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Load an integer label volume into the internal layout.

    Data are read with ``np.asanyarray(img.dataobj)``, so integer files never go through
    float. The result is uint8 when all labels are in 0..255, int32 otherwise. Float (or
    scaled) files must hold integer values only.
    """
    with _opened(path) as (img, geometry):
        disk = img.get_data_dtype()
        if disk.kind not in "iuf":
            raise NiftiError(f"{path}: unsupported label data type {disk}")
        data = _as_native(_read(path, lambda: np.asanyarray(img.dataobj)))
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all() or not np.array_equal(data, np.round(data)):
            raise NiftiError(f"{path}: labels are not integer-valued "
                             f"(float data with fractional, NaN or infinite values)")
    lo, hi = (data.min(), data.max()) if data.size else (0, 0)
    if 0 <= lo and hi <= 255:
        data = data.astype(np.uint8, copy=False)
    elif np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
        data = data.astype(np.int32, copy=False)
    else:
        raise NiftiError(f"{path}: label values {lo}..{hi} do not fit in int32")
    return to_internal(data.reshape(geometry.shape), geometry), geometry


def check_same_grid(image: Geometry, labels: Geometry, *, atol: float = 1e-3) -> None:
    """Raise :class:`NiftiError` unless two volumes share one voxel grid in internal layout.

    Compares internal shapes, then internal affines (mm, absolute tolerance ``atol``), so
    an image and labels stored in different orientations still match when they align.
    """
    names = f"{image.source or 'image'} and {labels.source or 'labels'}"
    if image.internal_shape != labels.internal_shape:
        raise NiftiError(f"shape mismatch between {names}: "
                         f"{image.internal_shape} vs {labels.internal_shape}")
    if not np.allclose(image.internal_affine, labels.internal_affine, rtol=0, atol=atol):
        raise NiftiError(f"affine mismatch between {names}: "
                         f"{image.internal_affine[:3].round(4).tolist()} vs "
                         f"{labels.internal_affine[:3].round(4).tolist()}")


def save_mask(mask_internal: np.ndarray, geometry: Geometry, path: str | os.PathLike, *,
              overwrite: bool = False) -> Path:
    """Write a bool/integer mask (values 0..255) as uint8 on the input's grid; see save_volume."""
    mask = np.asanyarray(mask_internal)
    if mask.dtype.kind not in "biu":
        raise NiftiError(f"mask must be bool or integer, got {mask.dtype}")
    return save_volume(mask, geometry, path, dtype=np.uint8, overwrite=overwrite)


def save_volume(array_internal: np.ndarray, geometry: Geometry, path: str | os.PathLike, *,
                dtype=None, overwrite: bool = False) -> Path:
    """Write an internal-layout array to ``path`` on the input's exact grid, atomically.

    The file gets the input's shape, affine, qform/sform matrices and codes and the rest
    of its header, with data type ``dtype`` (default: the array's) and no scaling
    (slope 1, intercept 0). Values are checked to fit ``dtype``; nothing is wrapped or
    rounded silently. An existing file is replaced only with ``overwrite=True``; the
    input file itself is never replaced. Returns the written path.
    """
    target = Path(path)
    _check_output_path(target)
    if geometry.source is not None and same_file(target, geometry.source):
        raise NiftiError(f"{target}: refusing to write over the input file")
    if target.exists() and not overwrite:
        raise NiftiError(f"{target} exists; pass overwrite=True to replace it")
    array = np.asanyarray(array_internal)
    _check_shape(array, geometry.internal_shape, "internal layout")
    if array.ndim != 3:
        raise NiftiError(f"can only write 3-D volumes, got shape {array.shape}")
    dtype = _checked_dtype(array, np.dtype(dtype) if dtype else None)
    # One tiled copy into the file's (Fortran) order, cast on the way: what the writer streams out.
    data = copy_in_order(apply_orientation(array, geometry._to_file_ornt), "F", dtype=dtype)
    return write_nifti(_image_on_grid(data, geometry), target, overwrite=overwrite)


def write_nifti(image: nib.Nifti1Image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a nibabel NIfTI image to ``.nii`` or ``.nii.gz``, atomically and fast; return the path.

    The bytes are exactly those nibabel would write (header, extensions, data), gzip-compressed for
    ``.nii.gz`` by :mod:`qnkit.gzip_codec` (ISA-L on several threads when installed; any gzip reader
    opens the result). An in-memory C-order array is turned into the file's Fortran order by one
    tiled copy first, much faster than nibabel's slice-by-slice transposition. An existing file is
    replaced only with ``overwrite=True``. Errors raise :class:`NiftiError`.
    """
    target = Path(path)
    _check_output_path(target)
    image = _with_fortran_data(image)
    try:
        with atomic_path(target, overwrite=overwrite) as tmp:
            if target.name.lower().endswith(".gz"):
                with gzip_codec.open_write(tmp) as stream:
                    image.to_file_map(image.make_file_map({"image": stream, "header": stream}))
            else:
                nib.save(image, tmp)
    except FileExistsError:
        raise NiftiError(f"{target} exists; pass overwrite=True to replace it") from None
    except OSError as exc:
        raise NiftiError(f"{target}: cannot write: {_one_line(exc)}") from exc
    return target


# --- helpers --------------------------------------------------------------------------


def _open(path) -> tuple[nib.Nifti1Image, Geometry]:
    """Read a NIfTI header and return it with its Geometry (the image's voxel data cannot be read)."""
    with _opened(path) as (img, geometry):
        return img, geometry


@contextlib.contextmanager
def _opened(path):
    """Open a NIfTI header and yield ``(image, Geometry)``; the voxel data are readable inside."""
    path = Path(path)
    if not path.exists():
        raise NiftiError(f"{path}: file not found")
    if not path.is_file():
        raise NiftiError(f"{path}: not a file")
    if not is_nifti_path(path):
        raise NiftiError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    with contextlib.ExitStack() as stack:
        try:
            img, stream = _load_header(path, stack)
        except NiftiError:
            raise
        except _READ_ERRORS as exc:
            raise NiftiError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from exc
        yield img, _geometry_of(img, path)
        if stream is not None and stream.tell() > img.dataobj.offset:
            # The voxels were read: read on to the gzip trailer, whose CRC check catches damaged data.
            _read(path, lambda: _drain(stream))


def _load_header(path: Path, stack: contextlib.ExitStack):
    """``(image, gzip stream or None)``: a NIfTI image whose data are read on demand (never memory-mapped,
    so damage shows when read). ``.nii.gz`` is decoded by :mod:`qnkit.gzip_codec` through a stream that
    ``stack`` closes. The header's voxel size is checked as written, before nibabel reads (and repairs) it.
    """
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as raw:
            start = raw.read(nib.Nifti2Header.sizeof_hdr)
        with _quiet_if(_check_voxel_size(path, start)):
            return nib.load(path, mmap=False), None
    stream = stack.enter_context(gzip_codec.open_read(path))
    start = stream.read(nib.Nifti2Header.sizeof_hdr)
    stream.seek(0)
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        if klass.header_class.may_contain_header(start):
            file_map = klass.make_file_map({"image": stream, "header": stream})
            with _quiet_if(_check_voxel_size(path, start)):
                return klass.from_file_map(file_map, mmap=False), stream
    raise ImageFileError("no NIfTI-1 or NIfTI-2 header")


def _check_voxel_size(path: Path, start: bytes) -> bool:
    """Refuse a header whose voxel size (pixdim 1-3) is zero or not finite where the affine is built from
    it (no sform). nibabel would replace a 0 by 1 mm with a warning of its own on stderr and go on, so a
    3 mm CT read that way reports kidneys of a third of their volume; nothing about the real size can be
    guessed. Returns True when the pixdim is unusable but unused (the sform gives the grid), so the
    caller silences nibabel's repair message. Bytes that are no NIfTI header are left to nibabel."""
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        if len(start) >= klass.sizeof_hdr and klass.may_contain_header(start):
            try:
                header = klass(start[:klass.sizeof_hdr], check=False)
            except (HeaderDataError, ValueError):
                return False
            break
    else:
        return False
    size = [float(v) for v in header["pixdim"][1:1 + min(3, max(0, int(header["dim"][0])))]]
    if all(np.isfinite(v) and v != 0 for v in size):
        return False
    if int(header["sform_code"]) > 0:
        return True
    raise NiftiError(f"{path}: voxel size {' x '.join(f'{v:g}' for v in size)} mm in the header (pixdim) is "
                     f"zero or not finite and no sform gives the grid, so the voxels' size is unknown; "
                     f"fix the header (e.g. set pixdim to the scanner's spacing)")


@contextlib.contextmanager
def _quiet_if(quiet: bool):
    """Keep nibabel's header-repair messages (warnings of its global logger) off stderr when ``quiet``."""
    logger = nib.imageglobals.logger
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drain(stream) -> None:
    """Read a stream to its end (for a gzip stream: up to and through its CRC check)."""
    while stream.read(1 << 20):
        pass


def _geometry_of(img, path: Path) -> Geometry:
    """Check that ``img`` is one 3-D volume with a usable affine and return its Geometry."""
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise NiftiError(f"{path}: not a single-file NIfTI image ({type(img).__name__})")
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        kind = f"{len(shape)}-D" if len(shape) != 4 else f"4-D ({shape[3]} volumes)"
        raise NiftiError(f"{path}: expected a 3-D volume, got a {kind} image of shape {img.shape}")
    if min(shape) < 1:
        raise NiftiError(f"{path}: empty volume of shape {shape}")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all():
        raise NiftiError(f"{path}: header has no usable affine")
    return Geometry.from_affine(affine, shape, img.header, source=path.resolve())


def _read(path, read):
    """Run a data read, turning truncated/corrupt-data errors into NiftiError."""
    try:
        return read()
    except _READ_ERRORS as exc:
        raise NiftiError(f"{path}: truncated or corrupt image data ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (nibabel's can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _as_native(data: np.ndarray) -> np.ndarray:
    """Return ``data`` as a plain ndarray in native byte order."""
    data = np.asarray(data)
    return data.astype(data.dtype.newbyteorder("="), copy=False)


def _image_int(data: np.ndarray) -> np.ndarray:
    """Map an unscaled integer image to int16/int32/uint16 (or float32 when it won't fit)."""
    if data.dtype in _STREAMED:
        return data.astype(_STREAMED[data.dtype], copy=False)
    i32 = np.iinfo(np.int32)
    if data.size == 0 or (data.min() >= i32.min and data.max() <= i32.max):
        return data.astype(np.int32)
    return data.astype(np.float32)


def _checked_dtype(data: np.ndarray, dtype: np.dtype | None) -> np.dtype:
    """The type ``data`` is written as (``dtype``, default its own in native order), refusing values
    that would wrap, round or overflow in it."""
    if dtype is None:
        dtype = data.dtype.newbyteorder("=")
    if data.dtype.kind == "b" or dtype == data.dtype:
        return dtype
    if dtype.kind in "iu":
        if data.dtype.kind == "f" and not (np.isfinite(data).all()
                                           and np.array_equal(data, np.round(data))):
            raise NiftiError(f"cannot store non-integer values as {dtype}")
        if data.size:
            info = np.iinfo(dtype)
            lo, hi = data.min(), data.max()
            if lo < info.min or hi > info.max:
                raise NiftiError(f"values {lo}..{hi} do not fit in {dtype}")
    elif dtype.kind != "f":
        raise NiftiError(f"unsupported output data type {dtype}")
    return dtype


def _check_output_path(target: Path) -> None:
    """Refuse an output name that is not NIfTI, or whose folder does not exist."""
    if not is_nifti_path(target):
        raise NiftiError(f"{target}: output must be a .nii or .nii.gz file")
    if not target.parent.is_dir():
        raise NiftiError(f"{target}: folder {target.parent} does not exist")


def _with_fortran_data(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """``image`` with its in-memory array in Fortran order (the file's), the same header otherwise."""
    data = image.dataobj
    if not isinstance(data, np.ndarray) or data.ndim != 3 or data.flags.f_contiguous:
        return image
    return type(image)(copy_in_order(data, "F"), image.affine, header=image.header, extra=image.extra)


def _image_on_grid(data: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    """A NIfTI image of file-layout ``data`` carrying the input's header and affine."""
    header = geometry.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0  # display range described the input's data
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # The header's own best affine equals geometry.affine, so nibabel leaves the
    # qform/sform fields and codes exactly as they were in the input.
    img = klass(data, geometry.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _check_shape(array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if array.ndim < 3 or tuple(array.shape[:3]) != tuple(shape):
        raise NiftiError(f"array of shape {array.shape} does not match the {what} shape {shape}")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same file (resolved path, or same inode), so that no writer
    overwrites its own input; False when either cannot be resolved."""
    try:
        a, b = Path(a), Path(b)
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False
