# cython: language_level=3
"""Private metric kernels. Call them through qnkit.kernels, which validates inputs."""
from cython.parallel cimport prange
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t

cdef extern from "qn_rows.h" nogil:
    void qn_overlap_f32_u8(const float* p, const uint8_t* t, Py_ssize_t n, float threshold, int64_t* sums)
    void qn_overlap_u8_u8(const uint8_t* p, const uint8_t* t, Py_ssize_t n, uint8_t cutoff, int64_t* sums)

cdef enum:
    MAX_CHUNKS = 256

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
    Python float), integer predictions in double. A float32 or uint8 prediction with a uint8 target
    is counted by the row kernels of qn_rows.h, in chunks shared out over the threads.
    """
    cdef Py_ssize_t n = pred.shape[0], k
    cdef int64_t n_pred = 0, n_target = 0, n_both = 0
    cdef float threshold_f = <float>threshold
    cdef int p, t
    cdef int64_t sums[3 * MAX_CHUNKS]
    cdef Py_ssize_t chunks, chunk, c, start
    cdef uint8_t cutoff = 0
    cdef bint vector_pair = target_t is uint8_t and (pred_t is float or (
        pred_t is uint8_t and threshold == threshold and threshold < 255))
    if vector_pair:
        if pred_t is uint8_t and threshold >= 0:
            cutoff = <uint8_t>(<int>threshold + 1)  # p > threshold for an integer p
        chunks = min(MAX_CHUNKS, 4 * max(1, num_threads), max(1, n // 65536))
        chunk = (n + chunks - 1) // chunks
        for k in range(3 * chunks):
            sums[k] = 0
        for c in prange(chunks, nogil=True, num_threads=num_threads, schedule="static"):
            start = c * chunk
            if start < n:
                if pred_t is float and target_t is uint8_t:
                    qn_overlap_f32_u8(&pred[start], &target[start], min(chunk, n - start), threshold_f, &sums[3 * c])
                elif pred_t is uint8_t and target_t is uint8_t:
                    qn_overlap_u8_u8(&pred[start], &target[start], min(chunk, n - start), cutoff, &sums[3 * c])
        for k in range(chunks):
            n_pred += sums[3 * k]
            n_target += sums[3 * k + 1]
            n_both += sums[3 * k + 2]
        return n_pred, n_target, n_both
    for k in prange(n, nogil=True, num_threads=num_threads, schedule="static"):
        if pred_t is float:
            p = pred[k] > threshold_f
        else:
            p = pred[k] > threshold
        t = target[k] > 0
        n_pred += p
        n_target += t
        n_both += p & t
    return n_pred, n_target, n_both
