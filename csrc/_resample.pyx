# cython: language_level=3
"""Private resampling kernels. Call them through qnkit.kernels, which validates inputs."""
from cython.parallel cimport prange
from libc.stdint cimport uint8_t

ctypedef fused prob_t:
    uint8_t
    float


def upsample_threshold(const prob_t[:, :, ::1] prob, uint8_t[:, :, ::1] out, float[:, ::1] rows,
                       float threshold, int num_threads):
    """out = (2x bilinear upsampling of prob, half-pixel centres, edge clamped) > threshold, cropped to out.

    Rows first: output row r blends low-res rows 0.75*near + 0.25*far; then columns the same way.
    Runs in float32 in exactly this order so that the NumPy reference reproduces it bit for bit.
    `rows` is scratch space, one low-res row per slice.
    """
    cdef Py_ssize_t Z = prob.shape[0], h = prob.shape[1], w = prob.shape[2]
    cdef Py_ssize_t H = out.shape[1], W = out.shape[2]
    cdef Py_ssize_t z, r, k, far, j, jl, jr
    cdef float near_w = 0.75, far_w = 0.25, c
    cdef float* buf
    cdef uint8_t* o
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        buf = &rows[z, 0]
        for r in range(H):
            k = r // 2
            if r % 2 == 0:
                far = k - 1 if k > 0 else 0
            else:
                far = k + 1 if k < h - 1 else h - 1
            for j in range(w):
                buf[j] = near_w * <float>prob[z, k, j] + far_w * <float>prob[z, far, j]
            o = &out[z, r, 0]
            for j in range(W // 2):
                jl = j - 1 if j > 0 else 0
                jr = j + 1 if j < w - 1 else w - 1
                c = near_w * buf[j]
                o[2 * j] = (c + far_w * buf[jl]) > threshold
                o[2 * j + 1] = (c + far_w * buf[jr]) > threshold
            if W % 2 == 1:
                j = W // 2
                jl = j - 1 if j > 0 else 0
                o[W - 1] = (near_w * buf[j] + far_w * buf[jl]) > threshold
