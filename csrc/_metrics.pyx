# cython: language_level=3
"""Private metric kernels. Call them through qnkit.kernels, which validates inputs."""
from cython.parallel cimport prange
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t

ctypedef fused pred_t:
    uint8_t
    int16_t
    int32_t
    int64_t
    float
    double

ctypedef fused target_t:
    uint8_t
    int16_t
    int32_t
    int64_t


def overlap_counts(const pred_t[::1] pred, const target_t[::1] target, double threshold, int num_threads):
    """(|P|, |T|, |P and T|) with P = pred > threshold and T = target > 0, in one pass.

    Float predictions are compared in their own precision (as NumPy compares a float32 array with a
    Python float), integer predictions in double.
    """
    cdef Py_ssize_t n = pred.shape[0], k
    cdef int64_t n_pred = 0, n_target = 0, n_both = 0
    cdef float threshold_f = <float>threshold
    cdef int p, t
    if pred_t is float:
        for k in prange(n, nogil=True, num_threads=num_threads, schedule="static"):
            p = pred[k] > threshold_f
            t = target[k] > 0
            n_pred += p
            n_target += t
            n_both += p & t
    else:
        for k in prange(n, nogil=True, num_threads=num_threads, schedule="static"):
            p = pred[k] > threshold
            t = target[k] > 0
            n_pred += p
            n_target += t
            n_both += p & t
    return n_pred, n_target, n_both
