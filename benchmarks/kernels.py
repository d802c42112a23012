"""Kernel rows of `qnkit bench`: each compiled kernel against its NumPy reference and its memory floor.

The memory floor of a kernel is a plain copy moving the same traffic: a copy of B bytes reads B and
writes B, so a kernel that must read R bytes and write W bytes is compared with a copy of (R + W) / 2
bytes (threaded the same way as the kernel). The copy writes into a buffer it already owns, so the
kernels write into preallocated outputs too (their `out=` argument); a fresh output would add the
operating system's cost of mapping and zeroing new pages to the kernel alone. Kernel and copy are
timed in alternation. Ratios, not absolute times, are the figures that hold from one machine to
the next.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from qnkit import kernels
from qnkit.cpus import available_cpus
from qnkit.benchmarks import reference
from qnkit.benchmarks.timing import measure, measure_interleaved

HU_WINDOW = (-200.0, 400.0)


@dataclass
class KernelCase:
    name: str
    run: Callable[[], object]
    numpy: Callable[[], object]
    bytes_moved: int  # bytes the kernel must read plus bytes it must write


def bench_volume(shape=(100, 512, 512), seed: int = 0):
    """CT-like int16 volume and labels with two kidney-sized ellipsoids in the middle slices."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    ct = rng.normal(40, 300, size=shape).astype(np.int16)
    zz, yy, xx = np.ogrid[:z, :h, :w]
    labels = np.zeros(shape, np.uint8)
    for cx in (0.3 * w, 0.7 * w):
        inside = (((zz - 0.5 * z) / (0.2 * z)) ** 2 + ((yy - 0.6 * h) / (0.1 * h)) ** 2
                  + ((xx - cx) / (0.07 * w)) ** 2) < 1
        labels[inside] = 1
    labels[(zz == z // 2) & (yy > 0.55 * h) & (yy < 0.6 * h) & (xx < 0.3 * w) & (xx > 0.25 * w)] = 2
    prob = rng.random((z, (h + 1) // 2, (w + 1) // 2), dtype=np.float32)
    return ct, labels, prob


def kernel_cases(ct: np.ndarray, labels: np.ndarray, prob: np.ndarray) -> list[KernelCase]:
    lo, hi = HU_WINDOW
    n = ct.size
    half = prob.size
    range_start, range_stop = reference.kidney_slice_range(labels, 0) or (0, 0)
    kidney = (labels > 0).view(np.uint8)
    # kidney_slice_range must read every slice outside the kidneys, up to the first kidney voxel.
    scanned = (range_start + labels.shape[0] - range_stop) * labels[0].size
    pred = np.ascontiguousarray(np.broadcast_to(prob[:, :, None, :, None], (prob.shape[0], prob.shape[1], 2,
                                                                          prob.shape[2], 2)).reshape(ct.shape))
    image_half = kernels.downsample_image(ct, lo, hi)
    labels_half = kernels.downsample_labels(labels)
    weights = kernels.border_weights(kidney, 2.0)
    mask = kernels.upsample_threshold(prob, ct.shape[1:])
    # Writing a mask to a NIfTI file whose slices come first (KiTS19's layout) copies it into Fortran order.
    mask_in_file_order = np.empty(labels.shape, np.uint8, order="F")
    return [
        KernelCase("downsample_image", lambda: kernels.downsample_image(ct, lo, hi, out=image_half),
                   lambda: reference.downsample_image(ct, lo, hi), ct.nbytes + 4 * half),
        KernelCase("downsample_labels", lambda: kernels.downsample_labels(labels, out=labels_half),
                   lambda: reference.downsample_labels(labels), labels.nbytes + half),
        KernelCase("kidney_slice_range", lambda: kernels.kidney_slice_range(labels, 20),
                   lambda: reference.kidney_slice_range(labels, 20), scanned),
        # Training weights the binary kidney mask (tumor relabelled), so that is what is timed.
        KernelCase("border_weights", lambda: kernels.border_weights(kidney, 2.0, out=weights),
                   lambda: reference.border_weights(kidney, 2.0), kidney.nbytes + 4 * n),
        KernelCase("dice", lambda: kernels.dice(pred, labels), lambda: reference.dice(pred, labels),
                   pred.nbytes + labels.nbytes),
        KernelCase("upsample_threshold", lambda: kernels.upsample_threshold(prob, ct.shape[1:], out=mask),
                   lambda: reference.upsample_threshold(prob, ct.shape[1:]), prob.nbytes + n),
        KernelCase("copy_transposed", lambda: kernels.copy_transposed(mask_in_file_order, labels),
                   lambda: np.copyto(mask_in_file_order, labels), 2 * labels.nbytes),
    ]


def _copy_floor(nbytes: int, threads: int, pool: ThreadPoolExecutor) -> Callable[[], None]:
    """A copy of nbytes / 2 bytes, split over `threads` threads of `pool` (NumPy releases the GIL to copy)."""
    size = max(1, nbytes // 2)
    src = np.ones(size, np.uint8)
    dst = np.empty_like(src)
    if threads == 1:
        return lambda: np.copyto(dst, src)
    bounds = np.linspace(0, size, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return lambda: list(pool.map(lambda c: np.copyto(*c), chunks))


def run(shape=(100, 512, 512), thread_counts=None, repeats: int = 5, numpy_repeats: int = 3,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time every kernel at each thread count; one row per (kernel, threads)."""
    ct, labels, prob = bench_volume(shape)
    cases = kernel_cases(ct, labels, prob)
    thread_counts = thread_counts or sorted({1, available_cpus()})
    numpy_times = {}
    rows = []
    before = kernels.get_num_threads()
    try:
        for case in cases:
            if progress:
                progress(f"numpy {case.name}")
            numpy_times[case.name] = measure(case.numpy, repeats=numpy_repeats, warmup=1)
        for threads in thread_counts:
            kernels.set_num_threads(threads)
            with ThreadPoolExecutor(threads) as pool:
                timings = []
                for case in cases:
                    if progress:
                        progress(f"{case.name} x{threads}")
                    timings.append(measure_interleaved([case.run, _copy_floor(case.bytes_moved, threads, pool)],
                                                       repeats=repeats, warmup=2))
            for case, (kernel, floor) in zip(cases, timings):
                rows.append({
                    "kernel": case.name, "threads": threads, "shape": list(shape),
                    "kernel_s": kernel.as_dict(), "numpy_s": numpy_times[case.name].as_dict(),
                    "floor_s": floor.as_dict(), "bytes_moved": case.bytes_moved,
                    "speedup_vs_numpy": numpy_times[case.name].median_s / kernel.median_s,
                    "ratio_to_floor": kernel.median_s / floor.median_s,
                    "gb_per_s": case.bytes_moved / kernel.median_s / 1e9,
                })
    finally:
        kernels.set_num_threads(before)
    return rows
