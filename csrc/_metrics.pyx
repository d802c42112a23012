# cython: language_level=3
"""Private metric kernels. Call them through qnkit.kernels, which validates inputs."""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t

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


def overlap_counts(const pred_t[::1] pred, const target_t[::1] target, double threshold):
    """(|P|, |T|, |P and T|) with P = pred > threshold and T = target > 0, in one pass."""
    cdef Py_ssize_t n = pred.shape[0], k
    cdef int64_t n_pred = 0, n_target = 0, n_both = 0
    cdef bint p, t
    with nogil:
        for k in range(n):
            p = pred[k] > threshold
            t = target[k] > 0
            n_pred += p
            n_target += t
            n_both += p & t
    return n_pred, n_target, n_both
