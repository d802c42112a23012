# cython: language_level=3
"""Private resampling kernels. Call them through qnkit.kernels, which validates inputs."""
from cython.parallel cimport prange
from libc.stdint cimport uint8_t

cdef extern from "qn_rows.h" nogil:
    void qn_stream_fence()
    void qn_prefetch_span(const void* p, Py_ssize_t nbytes)
    void qn_upsample_row_f32(const float* near, const float* far, Py_ssize_t w, float* vp,
                             uint8_t* o, Py_ssize_t W, float threshold, int stream)
    void qn_upsample_pairs(const float* vp, uint8_t* o, Py_ssize_t pairs, float threshold, int stream)

ctypedef fused prob_t:
    uint8_t
    float


def upsample_threshold(const prob_t[:, :, ::1] prob, uint8_t[:, :, ::1] out, float[:, ::1] rows,
                       float threshold, bint stream, int num_threads):
    """out = (2x bilinear upsampling of prob, half-pixel centres, edge clamped) > threshold, cropped to out.

    Rows first: output row r blends low-res rows 0.75*near + 0.25*far into v; then each column j
    gives a left value 0.75*v[j] + 0.25*v[j-1] and a right value 0.75*v[j] + 0.25*v[j+1]
    (clamped at the edges), which become output columns 2j and 2j+1. Runs in float32 in exactly
    this order so that the NumPy reference reproduces it bit for bit. `rows` is scratch space, one
    row of w + 2 per slice holding v with its edge values repeated once on each side, so the
    column pass (qn_upsample_pairs) needs no edge cases. `stream`: non-temporal stores.
    """
    cdef Py_ssize_t Z = prob.shape[0], h = prob.shape[1], w = prob.shape[2]
    cdef Py_ssize_t H = out.shape[1], W = out.shape[2], half_W = out.shape[2] // 2
    cdef Py_ssize_t z, r, k, far, j
    cdef float near_w = 0.75, far_w = 0.25
    cdef float* vp
    cdef const prob_t* p_base
    cdef const prob_t* p_near
    cdef uint8_t* o_base
    cdef const prob_t* p_far
    cdef uint8_t* o
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        # Row pointers from slice bases: indexing the memoryviews per row costs more than the row.
        vp = &rows[z, 0]
        p_base = &prob[z, 0, 0]
        o_base = &out[z, 0, 0]
        for r in range(H):
            k = r // 2
            if r % 2 == 0:
                far = k - 1 if k > 0 else 0
                if k + 4 < h:
                    qn_prefetch_span(p_base + (k + 4) * w, w * sizeof(prob_t))
            else:
                far = k + 1 if k < h - 1 else h - 1
            p_near = p_base + k * w
            p_far = p_base + far * w
            o = o_base + r * W
            if prob_t is float:
                qn_upsample_row_f32(p_near, p_far, w, vp, o, W, threshold, stream)
            else:
                for j in range(w):
                    vp[j + 1] = near_w * <float>p_near[j] + far_w * <float>p_far[j]
                vp[0] = vp[1]
                vp[w + 1] = vp[w]
                qn_upsample_pairs(vp, o, half_W, threshold, stream)
                if W % 2 == 1:
                    o[W - 1] = (near_w * vp[half_W + 1] + far_w * vp[half_W]) > threshold
        if stream:
            qn_stream_fence()
