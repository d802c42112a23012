"""Validated public entry points to the compiled preprocessing, resampling and metric kernels.

Each function checks dtype, shape and layout, makes C-contiguous what must be, allocates the output
(or checks the one given as `out`, to reuse a buffer across calls) and calls a private kernel from
csrc/ that runs without the GIL (OpenMP over slices).
Threads: `set_num_threads` (default: :func:`qnkit.cpus.default_threads`, the rule the backends share).
"""
from __future__ import annotations

import functools
import importlib
import os
import types

import numpy as np

from qnkit.cpus import default_threads

IMAGE_DTYPES = (np.int16, np.int32, np.uint16, np.float32)
LABEL_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64)
PRED_DTYPES = (np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64)
TARGET_DTYPES = (np.uint8, np.int16, np.int32, np.int64)
PROB_DTYPES = (np.uint8, np.float32)

_num_threads = default_threads()


# CPU features each optional build needs: /proc/cpuinfo flag names and NumPy's names for them.
_BUILD_FEATURES = {
    "avx2": ({"avx2", "fma", "f16c", "popcnt"}, ("AVX2", "FMA3", "F16C", "POPCNT")),
    "avx512": ({"avx2", "fma", "f16c", "popcnt", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
               ("AVX2", "FMA3", "F16C", "POPCNT", "AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ")),
}


@functools.lru_cache(maxsize=None)
def _cpu_has(build: str) -> bool:
    flags_needed, numpy_names = _BUILD_FEATURES[build]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return flags_needed <= set(flags)
    except OSError:
        features = getattr(getattr(np, "_core", None), "_multiarray_umath", None)
        features = getattr(features, "__cpu_features__", {})
        return all(features.get(name, False) for name in numpy_names)


def available_builds() -> list[str]:
    """Compiled builds of the kernels this machine can run, slowest first: "baseline" (portable),
    then "avx2" and "avx512" where the CPU supports them and they were compiled."""
    builds = ["baseline"]
    for build in _BUILD_FEATURES:
        if _cpu_has(build):
            try:
                importlib.import_module(f"qnkit._preprocess_{build}")
                builds.append(build)
            except ImportError:
                pass
    return builds


def use_build(build: str) -> None:
    """Run the kernels from one compiled build (default: the fastest this CPU supports).

    QNKIT_KERNELS=baseline forces the portable build at import.
    """
    global _impl, BUILD
    if build not in available_builds():
        raise ValueError(f"kernel build {build!r} is not available here; available: {available_builds()}")
    suffix = "" if build == "baseline" else f"_{build}"
    _impl = types.SimpleNamespace(**{name: importlib.import_module(f"qnkit._{name}{suffix}")
                                     for name in ("preprocess", "metrics", "resample", "layout")})
    BUILD = build


_impl: types.SimpleNamespace
BUILD: str
use_build(os.environ.get("QNKIT_KERNELS") or available_builds()[-1])


def set_num_threads(n: int) -> None:
    """Threads used by every kernel (one per slice at most)."""
    global _num_threads
    if int(n) < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _num_threads = int(n)


def get_num_threads() -> int:
    return _num_threads


def _names(dtypes) -> str:
    return ", ".join(np.dtype(d).name for d in dtypes)


def _volume(array, name: str, dtypes, contiguous: bool = True) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype == np.bool_ and np.uint8 in dtypes:
        array = array.view(np.uint8)
    if array.dtype.newbyteorder("=") not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name} has dtype {array.dtype}; expected one of: {_names(dtypes)}")
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D (slices, rows, columns), got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if contiguous:
        # Native byte order and C order are what the kernels read; copy only when needed.
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    return array


def _half(n: int) -> int:
    return (n + 1) // 2


# Outputs at least this large are written with non-temporal stores: they do not fit in cache, and
# streaming them skips reading each destination line before it is overwritten.
STREAM_BYTES = 1 << 23
_ALIGN = 64


def _empty_aligned(shape, dtype) -> np.ndarray:
    """np.empty whose data starts on a cache-line boundary (non-temporal stores need 32 bytes)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _output(out, shape, dtype, source: np.ndarray) -> np.ndarray:
    """A new aligned output, or `out` once checked: exact dtype and shape, C-contiguous, writable."""
    if out is None:
        return _empty_aligned(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.dtype(dtype) or out.shape != tuple(shape):
        raise ValueError(f"out must be {np.dtype(dtype).name} of shape {tuple(shape)}, "
                         f"got {out.dtype} of shape {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, source):
        raise ValueError("out must not overlap the input")
    return out


def _stream(out: np.ndarray) -> bool:
    return out.nbytes >= STREAM_BYTES


def downsample_image(ct: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Clip CT to [lo, hi], scale lo->0 and hi->1, and average each 2x2 in-plane block.

    `ct`: (Z, H, W) int16, int32, uint16 or float32. Returns float32 (Z, ceil(H/2), ceil(W/2)),
    written into `out` when given. An odd last row or column is averaged with itself (edge
    replication), so every output pixel is the mean of the input pixels it covers.
    """
    if not np.isfinite(lo) or not np.isfinite(hi) or not hi > lo:
        raise ValueError(f"HU window must satisfy lo < hi, got lo={lo}, hi={hi}")
    ct = _volume(ct, "ct", IMAGE_DTYPES)
    z, h, w = ct.shape
    out = _output(out, (z, _half(h), _half(w)), np.float32, ct)
    exact = _exact_in_float32(ct.dtype, lo, hi)
    scratch = np.empty((z, w), dtype=np.float32)
    _impl.preprocess.downsample_image(ct, out, scratch, float(lo), float(hi), exact, _stream(out), _num_threads)
    return out


def _exact_in_float32(dtype: np.dtype, lo: float, hi: float) -> bool:
    """Whether clipped 2x2 sums and (sum/4 - lo) are exact in float32: integer voxels and window."""
    limit = 2.0 ** 21
    return (dtype.kind in "iu" and float(lo).is_integer() and float(hi).is_integer()
            and abs(lo) < limit and abs(hi) < limit)


def downsample_labels(labels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Binary kidney mask at half in-plane resolution.

    Foreground is any label > 0 (tumor counts as kidney). An output pixel is 1 when at least half
    of its 2x2 block is foreground (2 of 4); an odd last row or column is replicated, as in
    `downsample_image`. Returns uint8 (Z, ceil(H/2), ceil(W/2)) in {0, 1}, written into `out`
    when given.
    """
    labels = _volume(labels, "labels", LABEL_DTYPES)
    z, h, w = labels.shape
    out = _output(out, (z, _half(h), _half(w)), np.uint8, labels)
    scratch = np.empty((z, w), dtype=np.uint8)
    _impl.preprocess.downsample_labels(labels, out, scratch, _num_threads)
    return out


def kidney_slice_range(labels: np.ndarray, margin: int = 20) -> tuple[int, int] | None:
    """Half-open slice range within `margin` slices of any foreground slice, clamped to [0, Z].

    Scans inwards from both ends and stops at the first foreground voxel, so any strides are
    fine (no copy). Returns None when no voxel is foreground.
    """
    if int(margin) != margin or margin < 0:
        raise ValueError(f"margin must be a non-negative integer, got {margin}")
    labels = _volume(labels, "labels", LABEL_DTYPES, contiguous=False)
    if not labels.dtype.isnative:
        labels = labels.astype(labels.dtype.newbyteorder("="))
    first, last = _impl.preprocess.first_last_foreground_slice(labels)
    if first < 0:
        return None
    return max(0, first - int(margin)), min(labels.shape[0], last + 1 + int(margin))


def _label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label value 0..255 (validated C-contiguous labels)."""
    counts = np.zeros((labels.shape[0], 256), dtype=np.int64)
    if not _impl.preprocess.label_histogram(labels, counts, _num_threads):
        raise ValueError("labels must lie in [0, 255] for class weighting")
    return counts.sum(axis=0)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Median-frequency class weights as a 256-entry float32 lookup table indexed by label value.

    weight[c] = median(counts of the classes present) / count(c); classes absent get 0.
    """
    return _median_frequency(_label_counts(_volume(labels, "labels", LABEL_DTYPES)))


def _median_frequency(counts: np.ndarray) -> np.ndarray:
    present = counts > 0
    lut = np.zeros(256, dtype=np.float32)
    lut[present] = np.median(counts[present]) / counts[present]
    return lut


def border_weights(labels: np.ndarray, omega0: float = 2.0, out: np.ndarray | None = None) -> np.ndarray:
    """QuickNAT per-voxel loss weights for one volume.

    Each voxel gets median(class counts) / count(its class) (median-frequency balancing over the
    classes present in this volume) plus `omega0` where the in-plane label gradient, as
    `numpy.gradient` over the two in-plane axes computes it, is non-zero. Returns float32 of the
    labels' shape, written into `out` when given. Label values must lie in [0, 255].
    """
    if not np.isfinite(omega0):
        raise ValueError(f"omega0 must be finite, got {omega0}")
    labels = _volume(labels, "labels", LABEL_DTYPES)
    totals = _label_counts(labels)
    lut = _median_frequency(totals)
    out = _output(out, labels.shape, np.float32, labels)
    binary = not totals[2:].any()
    _impl.preprocess.border_weights(labels, lut, np.float32(omega0), out, binary, _stream(out), _num_threads)
    return out


def _flat(array, name: str, dtypes) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    if array.dtype.newbyteorder("=") not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name} has dtype {array.dtype}; expected bool or one of: {_names(dtypes)}")
    # A view for contiguous input; a non-contiguous input costs one copy.
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).reshape(-1)


def dice(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5, smooth: float = 1.0) -> float:
    """Dice overlap (2|P and T| + smooth) / (|P| + |T| + smooth).

    `pred`: a mask or probabilities (foreground where > threshold); `target`: a mask (foreground
    where > 0). Any shape, the same for both. Two empty masks give 1.0 (with smooth > 0).
    """
    if smooth < 0 or not np.isfinite(smooth):
        raise ValueError(f"smooth must be finite and >= 0, got {smooth}")
    n_pred, n_target, n_both = _overlap_counts(pred, target, threshold)
    denominator = n_pred + n_target + smooth
    if denominator == 0:
        raise ValueError("dice is undefined for two empty masks with smooth=0")
    return (2.0 * n_both + smooth) / denominator


def mask_dice(a: np.ndarray, b: np.ndarray, empty: float | None = 1.0) -> float | None:
    """Exact Dice 2|A and B| / (|A| + |B|) of two masks (foreground > 0 in each, no smoothing), the
    measure for comparing two segmentations; `empty` when both masks are empty."""
    n_a, n_b, n_both = _overlap_counts(a, b, 0.0)
    return empty if n_a + n_b == 0 else 2.0 * n_both / (n_a + n_b)


def _overlap_counts(pred: np.ndarray, target: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(|pred > threshold|, |target > 0|, |both|), validated."""
    if getattr(pred, "shape", None) != getattr(target, "shape", None):
        raise ValueError(f"pred and target shapes differ: {getattr(pred, 'shape', None)} vs "
                         f"{getattr(target, 'shape', None)}")
    p = _flat(pred, "pred", PRED_DTYPES)
    t = _flat(target, "target", TARGET_DTYPES)
    return _impl.metrics.overlap_counts(p, t, float(threshold), _num_threads)


def upsample_threshold(prob: np.ndarray, shape: tuple[int, int], threshold: float = 0.5,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Map a half-resolution probability map (or 0/1 mask) back to full resolution as a mask.

    2x bilinear interpolation with half-pixel centres (as torch's `interpolate(scale_factor=2,
    mode="bilinear", align_corners=False)`), cropped to `shape` = (H, W), thresholded
    (foreground where > threshold) in the same pass. `prob`: (Z, h, w) float32 or uint8 with
    h = ceil(H/2) .. H/2 + padding, i.e. H <= 2h and W <= 2w. Returns uint8 (Z, H, W) in {0, 1},
    written into `out` when given.
    """
    prob = _volume(prob, "prob", PROB_DTYPES)
    try:
        H, W = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (rows, columns), got {shape!r}") from None
    z, h, w = prob.shape
    if not (0 < H <= 2 * h and 0 < W <= 2 * w):
        raise ValueError(f"output in-plane shape {(H, W)} does not fit a 2x upsampling of {(h, w)}")
    out = _output(out, (z, H, W), np.uint8, prob)
    scratch = np.empty((z, w + 2), dtype=np.float32)
    _impl.resample.upsample_threshold(prob, out, scratch, np.float32(threshold), _stream(out), _num_threads)
    return out


#: The transposing copy's tile: rows of the source by bytes along its fastest axis (16 KiB, it stays in L1). Of
#: 32x512, 64x256, 64x512, 128x128, 64x1024, 128x256 and 16x1024, 32x512 was among the fastest on a 512x512x48
#: and a 512x512x325 uint8 mask into Fortran order (AMD EPYC Zen 4, 2 threads: 17 ms for the larger, where a
#: plain copy of it takes 9.9 ms and NumPy's transposing copy about 1 s; 128x128: 31 ms).
TRANSPOSE_TILE_ROWS, TRANSPOSE_TILE_BYTES = 32, 512
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def copy_transposed(out: np.ndarray, array: np.ndarray) -> np.ndarray:
    """``out[...] = array`` for two 3-D arrays of one shape and dtype whose fastest axes differ (a
    C-order volume into a Fortran-order one, or the reverse, under any reorientation); returns `out`.

    NumPy's own copy walks one side a whole plane apart per item; this one moves tiles through a buffer that
    stays in L1 (:data:`TRANSPOSE_TILE_ROWS` x :data:`TRANSPOSE_TILE_BYTES`), shared out over the threads. Any strides (negative included) are fine. A bool array may be
    copied into a uint8 one. When the fastest axes agree there is nothing to tile and NumPy copies, as it does
    for the rare view whose strides are not whole items.
    """
    for name, a in (("out", out), ("array", array)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.ndim != 3:
            raise ValueError(f"{name} must be 3-D, got shape {a.shape}")
    if out.shape != array.shape:
        raise ValueError(f"cannot copy an array of shape {array.shape} into one of shape {out.shape}")
    if array.dtype == np.bool_ and out.dtype == np.uint8:
        array = array.view(np.uint8)
    if out.dtype != array.dtype:
        raise TypeError(f"out has dtype {out.dtype} and array {array.dtype}; copy_transposed does not cast")
    if array.dtype.kind not in "biuf" or array.dtype.itemsize not in _WORDS:
        raise TypeError(f"copy_transposed copies bool, integer and float arrays, got {array.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if array.size == 0:
        return out
    if np.may_share_memory(out, array):
        raise ValueError("out must not overlap the input")
    source_fast, target_fast = fastest_axis(array), fastest_axis(out)
    item = array.dtype.itemsize
    if source_fast == target_fast or any(stride % item for stride in array.strides + out.strides):
        out[...] = array
        return out
    other = 3 - source_fast - target_fast
    axes = (other, target_fast, source_fast)  # the kernel's layout: source fastest last, destination's second
    word = _WORDS[item]
    threads = max(1, min(_num_threads, array.shape[other] * array.shape[target_fast] // TRANSPOSE_TILE_ROWS))
    buffers = np.empty((threads, TRANSPOSE_TILE_ROWS * (TRANSPOSE_TILE_BYTES // item)), word)
    rows = np.empty((threads, 3 * TRANSPOSE_TILE_ROWS), np.intp)
    _impl.layout.copy_rows_transposed(array.transpose(axes).view(word), out.transpose(axes).view(word), buffers, rows,
                             TRANSPOSE_TILE_ROWS, threads)
    return out


def fastest_axis(array: np.ndarray) -> int:
    """The axis with the smallest stride (in bytes, ignoring sign) among axes longer than 1."""
    axes = [axis for axis in range(array.ndim) if array.shape[axis] > 1] or [array.ndim - 1]
    return min(axes, key=lambda axis: abs(array.strides[axis]))
