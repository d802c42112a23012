# cython: language_level=3
"""Private layout kernel: a tiled transposing copy. Call it through qnkit.kernels.copy_transposed."""
from cython.parallel cimport prange, threadid
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "qn_transpose.h" nogil:
    void qn_transpose_16_u8(const char* src, Py_ssize_t ss, char* dst, Py_ssize_t ds)
    void qn_transpose_8_u16(const char* src, Py_ssize_t ss, char* dst, Py_ssize_t ds)
    void qn_transpose_4_u32(const char* src, Py_ssize_t ss, char* dst, Py_ssize_t ds)
    void qn_transpose_2_u64(const char* src, Py_ssize_t ss, char* dst, Py_ssize_t ds)

ctypedef fused word_t:
    uint8_t
    uint16_t
    uint32_t
    uint64_t


def copy_rows_transposed(const word_t[:, :, :] src, word_t[:, :, :] dst, word_t[:, ::1] buffers,
                         Py_ssize_t[:, ::1] rows, Py_ssize_t tile_rows, int num_threads):
    """dst[...] = src, where src is fastest along axis 2 and dst along axis 1; strides in whole items, any sign.

    The rows of axes 0 and 1 (axis 1 fastest, as the destination walks them) are cut into tiles of `tile_rows`
    rows, shared out over the threads. A tile's rows are read a piece at a time along axis 2 (the buffer's
    width) into a small buffer, then written out along the rows, where the destination is contiguous, in
    16-byte square blocks transposed in registers (qn_transpose.h), one item at a time at the ragged edges
    and where the destination's rows do not follow each other. A tile runs on across planes of axis 0 when the
    destination does (a Fortran-order volume with few slices), so its writes stay whole cache lines. Going
    through the buffer matters when a stride is a power of two (a 512 x 512 slice apart): rows read in place
    would all map to the same cache sets and evict each other.
    `buffers`: one tile per thread (`num_threads` x `tile_rows` x the width, a multiple of 16 bytes); `rows`:
    scratch for each thread's row offsets (`num_threads` x 3 `tile_rows`).
    """
    cdef Py_ssize_t n0 = src.shape[0], n1 = src.shape[1], n2 = src.shape[2]
    cdef Py_ssize_t item = sizeof(word_t)
    cdef Py_ssize_t tile_cols = buffers.shape[1] // tile_rows
    cdef Py_ssize_t block = 16 // item  # items per row of a register block
    cdef Py_ssize_t total = n0 * n1
    cdef Py_ssize_t tiles = (total + tile_rows - 1) // tile_rows, pieces = (n2 + tile_cols - 1) // tile_cols
    cdef Py_ssize_t a0 = src.strides[0] // item, a1 = src.strides[1] // item, a2 = src.strides[2] // item
    cdef Py_ssize_t b0 = dst.strides[0] // item, b1 = dst.strides[1] // item, b2 = dst.strides[2] // item
    cdef const word_t* s = &src[0, 0, 0]
    cdef word_t* d = &dst[0, 0, 0]
    cdef word_t* buf
    cdef Py_ssize_t* src_row
    cdef Py_ssize_t* dst_row
    cdef Py_ssize_t* whole  # per block of rows: 1 where its destination rows follow each other
    cdef const word_t* row
    cdef word_t* out
    cdef Py_ssize_t t, r0, rn, q, qb, m, i, j, p, k0, kn, k, kb, full_k, blocks, covered
    for t in prange(tiles, nogil=True, num_threads=num_threads, schedule="static"):
        buf = &buffers[threadid(), 0]
        src_row = &rows[threadid(), 0]
        dst_row = src_row + tile_rows
        whole = dst_row + tile_rows
        r0 = t * tile_rows
        rn = min(tile_rows, total - r0)
        for q in range(rn):
            i = (r0 + q) // n1
            j = r0 + q - i * n1
            src_row[q] = i * a0 + j * a1
            dst_row[q] = i * b0 + j * b1
        blocks = rn // block
        for qb in range(blocks):
            whole[qb] = 1
            for m in range(1, block):
                if dst_row[qb * block + m] != dst_row[qb * block] + m:
                    whole[qb] = 0
        for p in range(pieces):
            k0 = p * tile_cols
            kn = min(tile_cols, n2 - k0)
            for q in range(rn):
                row = s + src_row[q] + k0 * a2
                if a2 == 1:
                    memcpy(buf + q * tile_cols, row, kn * item)
                else:
                    for k in range(kn):
                        buf[q * tile_cols + k] = row[k * a2]
            full_k = kn - kn % block
            for kb in range(full_k // block):
                for qb in range(blocks):
                    if whole[qb]:
                        _transpose_block(buf + qb * block * tile_cols + kb * block, tile_cols * item,
                                         d + dst_row[qb * block] + (k0 + kb * block) * b2, b2 * item)
            for q in range(rn):  # what the blocks left: ragged edges, rows that do not follow each other
                covered = full_k if q < blocks * block and whole[q // block] else 0
                out = d + dst_row[q]
                for k in range(covered, kn):
                    out[(k0 + k) * b2] = buf[q * tile_cols + k]


cdef inline void _transpose_block(const word_t* src, Py_ssize_t ss, word_t* dst, Py_ssize_t ds) noexcept nogil:
    """One square block of 16-byte rows (row strides in bytes)."""
    if word_t is uint8_t:
        qn_transpose_16_u8(<const char*>src, ss, <char*>dst, ds)
    elif word_t is uint16_t:
        qn_transpose_8_u16(<const char*>src, ss, <char*>dst, ds)
    elif word_t is uint32_t:
        qn_transpose_4_u32(<const char*>src, ss, <char*>dst, ds)
    else:
        qn_transpose_2_u64(<const char*>src, ss, <char*>dst, ds)
