# cython: language_level=3
"""Private resampling kernels. Call them through qnkit.kernels, which validates inputs."""
from cython.parallel cimport prange
from libc.stdint cimport uint8_t

ctypedef fused prob_t:
    uint8_t
    float


def upsample_threshold(const prob_t[:, :, ::1] prob, uint8_t[:, :, ::1] out, float[:, :, ::1] rows,
                       float threshold, int num_threads):
    """out = (2x bilinear upsampling of prob, half-pixel centres, edge clamped) > threshold, cropped to out.

    Rows first: output row r blends low-res rows 0.75*near + 0.25*far into v; then each column j
    gives a left value 0.75*v[j] + 0.25*v[j-1] and a right value 0.75*v[j] + 0.25*v[j+1]
    (clamped at the edges), which become output columns 2j and 2j+1. Runs in float32 in exactly
    this order so that the NumPy reference reproduces it bit for bit. `rows` is scratch space,
    three low-res rows (v, left, right) per slice; each pass is a plain vector loop.
    """
    cdef Py_ssize_t Z = prob.shape[0], h = prob.shape[1], w = prob.shape[2]
    cdef Py_ssize_t H = out.shape[1], W = out.shape[2], half_W = out.shape[2] // 2
    cdef Py_ssize_t z, r, k, far, j
    cdef float near_w = 0.75, far_w = 0.25
    cdef float* v
    cdef float* left
    cdef float* right
    cdef const prob_t* p_near
    cdef const prob_t* p_far
    cdef uint8_t* o
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        v = &rows[z, 0, 0]
        left = &rows[z, 1, 0]
        right = &rows[z, 2, 0]
        for r in range(H):
            k = r // 2
            if r % 2 == 0:
                far = k - 1 if k > 0 else 0
            else:
                far = k + 1 if k < h - 1 else h - 1
            p_near = &prob[z, k, 0]
            p_far = &prob[z, far, 0]
            for j in range(w):
                v[j] = near_w * <float>p_near[j] + far_w * <float>p_far[j]
            left[0] = near_w * v[0] + far_w * v[0]
            for j in range(1, w):
                left[j] = near_w * v[j] + far_w * v[j - 1]
            for j in range(w - 1):
                right[j] = near_w * v[j] + far_w * v[j + 1]
            right[w - 1] = near_w * v[w - 1] + far_w * v[w - 1]
            o = &out[z, r, 0]
            for j in range(half_W):
                o[2 * j] = left[j] > threshold
                o[2 * j + 1] = right[j] > threshold
            if W % 2 == 1:
                o[W - 1] = left[half_W] > threshold
