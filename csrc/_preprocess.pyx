# cython: language_level=3
"""Private preprocessing kernels. Call them through qnkit.kernels, which validates inputs.

Every kernel takes C-contiguous memoryviews (except kidney_slice_range, which scans any strides
so that it can stop early without a copy) and releases the GIL.
"""
from cython.parallel cimport prange
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t

cdef extern from "qn_rows.h" nogil:
    void qn_stream_fence()
    void qn_downsample_row_i16(const int16_t* a, const int16_t* b, float* o, Py_ssize_t W,
                               int16_t lo, int16_t hi, float inv_span, int stream)
    void qn_downsample_labels_row_u8(const uint8_t* a, const uint8_t* b, uint8_t* o, Py_ssize_t W)
    void qn_border_row_binary_u8(const uint8_t* prev, const uint8_t* row, const uint8_t* next, float* o,
                                 Py_ssize_t W, float cw0, float cw1, float omega0, int stream)
    void qn_count_values_u8(const uint8_t* p, Py_ssize_t n, int64_t* counts)

ctypedef fused image_t:
    int16_t
    int32_t
    uint16_t
    float

ctypedef fused label_t:
    uint8_t
    int8_t
    int16_t
    uint16_t
    int32_t
    int64_t


cdef inline double _clip(double v, double lo, double hi) noexcept nogil:
    return lo if v < lo else (hi if v > hi else v)


cdef inline float _clipf(float v, float lo, float hi) noexcept nogil:
    v = lo if v < lo else v
    return hi if v > hi else v


def downsample_image(const image_t[:, :, ::1] ct, float[:, :, ::1] out, float[:, ::1] rows,
                     double lo, double hi, bint exact_in_float32, bint stream, int num_threads):
    """out[z, i, j] = scaled mean of the clipped 2x2 block; edge rows/columns are replicated.

    With integer voxels and an integer window (`exact_in_float32`), clipped sums are exact in
    float32 and the block is scaled in float32 as (sum / 4 - lo) * float32(1 / (hi - lo)):
    int16 rows with a window inside the int16 range go to the row kernel of qn_rows.h; other
    dtypes clip and add two rows into `rows` (scratch, one row per slice), then add column pairs.
    Otherwise the block mean is formed in double. `stream`: write with non-temporal stores.
    """
    cdef Py_ssize_t Z = ct.shape[0], H = ct.shape[1], W = ct.shape[2]
    cdef Py_ssize_t h = out.shape[1], w = out.shape[2], half_w = W // 2
    cdef Py_ssize_t z, i, j, k, r1
    cdef double inv_span = 1.0 / (hi - lo)
    cdef float lo_f = <float>lo, hi_f = <float>hi, inv_span_f = <float>(1.0 / (hi - lo)), quarter = 0.25
    cdef bint int16_rows = (image_t is int16_t and exact_in_float32 and -32768 <= lo and hi <= 32767)
    cdef const image_t* a
    cdef const image_t* b
    cdef float* o
    cdef float* s
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        s = &rows[z, 0]
        for i in range(h):
            r1 = 2 * i + 1
            if r1 >= H:
                r1 = H - 1
            a = &ct[z, 2 * i, 0]
            b = &ct[z, r1, 0]
            o = &out[z, i, 0]
            if image_t is int16_t and int16_rows:
                qn_downsample_row_i16(a, b, o, W, <int16_t>lo, <int16_t>hi, inv_span_f, stream)
            elif exact_in_float32:
                for k in range(W):
                    s[k] = _clipf(<float>a[k], lo_f, hi_f) + _clipf(<float>b[k], lo_f, hi_f)
                for j in range(half_w):
                    o[j] = ((s[2 * j] + s[2 * j + 1]) * quarter - lo_f) * inv_span_f
                if w > half_w:
                    o[w - 1] = ((s[W - 1] + s[W - 1]) * quarter - lo_f) * inv_span_f
            else:
                for j in range(half_w):
                    o[j] = <float>(((_clip(a[2 * j], lo, hi) + _clip(a[2 * j + 1], lo, hi)
                                     + _clip(b[2 * j], lo, hi) + _clip(b[2 * j + 1], lo, hi)) * 0.25
                                    - lo) * inv_span)
                if w > half_w:
                    o[w - 1] = <float>(((_clip(a[W - 1], lo, hi) + _clip(b[W - 1], lo, hi)) * 0.5
                                        - lo) * inv_span)
        if stream:
            qn_stream_fence()


def downsample_labels(const label_t[:, :, ::1] labels, uint8_t[:, :, ::1] out, uint8_t[:, ::1] rows,
                      int num_threads):
    """out = 1 where at least half of the (edge-replicated) 2x2 block is foreground (> 0).

    Two vector-friendly passes per output row: count foreground down each column pair of rows into
    `rows` (scratch, one row per slice), then add neighbouring columns.
    """
    cdef Py_ssize_t Z = labels.shape[0], H = labels.shape[1], W = labels.shape[2]
    cdef Py_ssize_t h = out.shape[1], w = out.shape[2], half_w = W // 2
    cdef Py_ssize_t z, i, j, k, r1
    cdef const label_t* a
    cdef const label_t* b
    cdef uint8_t* o
    cdef uint8_t* s
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        s = &rows[z, 0]
        for i in range(h):
            r1 = 2 * i + 1
            if r1 >= H:
                r1 = H - 1
            a = &labels[z, 2 * i, 0]
            b = &labels[z, r1, 0]
            o = &out[z, i, 0]
            if label_t is uint8_t:
                qn_downsample_labels_row_u8(a, b, o, W)
            else:
                for k in range(W):
                    s[k] = (a[k] > 0) + (b[k] > 0)
                for j in range(half_w):
                    o[j] = (s[2 * j] + s[2 * j + 1]) >= 2
                if w > half_w:
                    o[w - 1] = s[W - 1] >= 1


cdef inline bint _run_has_foreground(const label_t* s, Py_ssize_t n) noexcept nogil:
    # OR-reduce blocks (vectorises); look at single values only in a block with a non-zero bit.
    cdef Py_ssize_t start, stop, k
    cdef label_t acc
    for start in range(0, n, 4096):
        stop = start + 4096 if start + 4096 < n else n
        acc = 0
        for k in range(start, stop):
            acc = acc | s[k]
        if acc != 0:
            for k in range(start, stop):
                if s[k] > 0:
                    return True
    return False


cdef inline bint _slice_has_foreground(const label_t[:, :, :] labels, Py_ssize_t z,
                                       bint contiguous_slices) noexcept nogil:
    cdef Py_ssize_t i, j
    if contiguous_slices:
        return _run_has_foreground(&labels[z, 0, 0], labels.shape[1] * labels.shape[2])
    for i in range(labels.shape[1]):
        for j in range(labels.shape[2]):
            if labels[z, i, j] > 0:
                return True
    return False


def first_last_foreground_slice(const label_t[:, :, :] labels):
    """(first, last) slice index holding foreground, scanning inwards from both ends; (-1, -1) if none."""
    cdef Py_ssize_t Z = labels.shape[0], first = -1, last = -1, z
    cdef bint contiguous_slices = (labels.strides[2] == sizeof(label_t)
                                   and labels.strides[1] == labels.shape[2] * sizeof(label_t))
    with nogil:
        for z in range(Z):
            if _slice_has_foreground(labels, z, contiguous_slices):
                first = z
                break
        if first >= 0:
            for z in range(Z - 1, first - 1, -1):
                if _slice_has_foreground(labels, z, contiguous_slices):
                    last = z
                    break
    return first, last


def label_histogram(const label_t[:, :, ::1] labels, int64_t[:, ::1] counts, int num_threads):
    """counts[z, v] = number of voxels of slice z with value v; returns False if a value is outside [0, 255]."""
    cdef Py_ssize_t Z = labels.shape[0], n = labels.shape[1] * labels.shape[2]
    cdef Py_ssize_t z, k
    cdef const label_t* s
    cdef int64_t* c
    cdef label_t v
    cdef int bad = 0
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        s = &labels[z, 0, 0]
        c = &counts[z, 0]
        if label_t is uint8_t:
            qn_count_values_u8(s, n, c)
        else:
            for k in range(n):
                v = s[k]
                if v < 0 or v > 255:
                    bad += 1
                else:
                    c[<Py_ssize_t>v] += 1
    return bad == 0


def border_weights(const label_t[:, :, ::1] labels, const float[::1] class_weight,
                   float omega0, float[:, :, ::1] out, bint binary, bint stream, int num_threads):
    """out = class_weight[label] + omega0 where the in-plane central-difference gradient is non-zero.

    `binary`: labels are 0/1 (uint8 rows go to the row kernel of qn_rows.h). `stream`: write
    with non-temporal stores.
    """
    cdef Py_ssize_t Z = labels.shape[0], H = labels.shape[1], W = labels.shape[2]
    cdef Py_ssize_t z, i, j, up, down
    cdef const label_t* row
    cdef const label_t* prev
    cdef const label_t* nxt
    cdef float* o
    cdef const float* cw = &class_weight[0]
    cdef float cw0 = cw[0], cw1 = cw[1]
    for z in prange(Z, nogil=True, num_threads=num_threads, schedule="static"):
        for i in range(H):
            up = i - 1 if i > 0 else 0
            down = i + 1 if i < H - 1 else H - 1
            row = &labels[z, i, 0]
            prev = &labels[z, up, 0]
            nxt = &labels[z, down, 0]
            o = &out[z, i, 0]
            if W == 1:
                o[0] = cw[<Py_ssize_t>row[0]] + omega0 * (prev[0] != nxt[0])
            elif label_t is uint8_t and binary:
                qn_border_row_binary_u8(<const uint8_t*>prev, <const uint8_t*>row, <const uint8_t*>nxt, o, W,
                                        cw0, cw1, omega0, stream)
            else:
                o[0] = cw[<Py_ssize_t>row[0]] + omega0 * ((prev[0] != nxt[0]) | (row[1] != row[0]))
                if binary:
                    # Labels are 0/1: a select instead of a table lookup lets the loop vectorise.
                    for j in range(1, W - 1):
                        o[j] = (cw1 if row[j] != 0 else cw0) + omega0 * ((prev[j] != nxt[j]) | (row[j + 1] != row[j - 1]))
                else:
                    for j in range(1, W - 1):
                        o[j] = cw[<Py_ssize_t>row[j]] + omega0 * ((prev[j] != nxt[j]) | (row[j + 1] != row[j - 1]))
                o[W - 1] = (cw[<Py_ssize_t>row[W - 1]]
                            + omega0 * ((prev[W - 1] != nxt[W - 1]) | (row[W - 1] != row[W - 2])))
        if stream:
            qn_stream_fence()
