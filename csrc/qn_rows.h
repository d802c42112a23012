/* Row kernels for the common dtypes (int16 CT, uint8 masks, float32 probabilities).
 *
 * The Cython kernels in this folder loop over slices and rows and call these for one row at a
 * time. Each function has a plain C body and, where the build targets AVX2 (the *_avx2 modules,
 * see setup.py), an intrinsics body that computes the same values bit for bit: the same float32
 * operations in the same order, no fused multiply-add. Wide outputs may be written with
 * non-temporal stores (`stream`), which skip the read-for-ownership of the destination lines;
 * a kernel that streams calls qn_stream_fence once per slice.
 */
#ifndef QN_ROWS_H
#define QN_ROWS_H



#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef ptrdiff_t qn_ssize;

#if defined(_MSC_VER)
#include <intrin.h>
#define qn_popcount32(x) ((int)__popcnt(x))
#else
#define qn_popcount32(x) __builtin_popcount(x)
#endif

static inline int32_t qn_clip_i16(int16_t v, int16_t lo, int16_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

#if defined(__AVX2__)
static inline int qn_aligned32(const void* p) { return ((uintptr_t)p & 31) == 0; }
#endif

/* Rows are read in order, but the hardware prefetchers of the machines we measured keep too few
 * lines in flight for a single thread to reach memory bandwidth: each row kernel asks for the
 * line QN_AHEAD bytes ahead of the one it reads (a prefetch never faults, even past the end). */
#define QN_AHEAD 8192

static inline void qn_prefetch(const void* p) {
#if defined(__AVX2__)
    _mm_prefetch((const char*)p, _MM_HINT_T0);
#elif defined(__GNUC__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
}

/* Prefetch every line of [p, p + nbytes). */
static inline void qn_prefetch_span(const void* p, qn_ssize nbytes) {
    for (qn_ssize k = 0; k < nbytes; k += 64) qn_prefetch((const char*)p + k);
}

/* Order the non-temporal stores of this thread before later ones; once after all streamed rows. */
static inline void qn_stream_fence(void) {
#if defined(__AVX2__)
    _mm_sfence();
#endif
}

/* Clip two int16 rows to [lo, hi], average 2x2 blocks, scale: o[j] = (sum / 4 - lo) * inv_span.
 * lo and hi are integers inside the int16 range, so every sum is exact in float32. */
static inline void qn_downsample_row_i16(const int16_t* a, const int16_t* b, float* o, qn_ssize W,
                                         int16_t lo, int16_t hi, float inv_span, int stream) {
    const float lo_f = (float)lo, quarter = 0.25f;
    qn_ssize half_w = W / 2, j = 0;
#if defined(__AVX2__)
    const __m256i vlo = _mm256_set1_epi16(lo), vhi = _mm256_set1_epi16(hi), ones = _mm256_set1_epi16(1);
    const __m256 vq = _mm256_set1_ps(quarter), vlof = _mm256_set1_ps(lo_f), vinv = _mm256_set1_ps(inv_span);
    stream = stream && qn_aligned32(o);
    for (; j + 16 <= half_w; j += 16) {
        qn_prefetch(a + 2 * j + QN_AHEAD / 2);
        qn_prefetch(b + 2 * j + QN_AHEAD / 2);
        __m256i a0 = _mm256_loadu_si256((const __m256i*)(a + 2 * j));
        __m256i a1 = _mm256_loadu_si256((const __m256i*)(a + 2 * j + 16));
        __m256i b0 = _mm256_loadu_si256((const __m256i*)(b + 2 * j));
        __m256i b1 = _mm256_loadu_si256((const __m256i*)(b + 2 * j + 16));
        a0 = _mm256_min_epi16(_mm256_max_epi16(a0, vlo), vhi);
        a1 = _mm256_min_epi16(_mm256_max_epi16(a1, vlo), vhi);
        b0 = _mm256_min_epi16(_mm256_max_epi16(b0, vlo), vhi);
        b1 = _mm256_min_epi16(_mm256_max_epi16(b1, vlo), vhi);
        /* madd with ones sums neighbouring columns into int32, in column order. */
        __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(a0, ones), _mm256_madd_epi16(b0, ones));
        __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(a1, ones), _mm256_madd_epi16(b1, ones));
        __m256 r0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s0), vq), vlof), vinv);
        __m256 r1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s1), vq), vlof), vinv);
#if defined(__AVX512DQ__)
        if (stream && ((uintptr_t)(o + j) & 63) == 0) {  /* one store for the whole line */
            _mm512_stream_ps(o + j, _mm512_insertf32x8(_mm512_castps256_ps512(r0), r1, 1));
        } else
#endif
        if (stream) {
            _mm256_stream_ps(o + j, r0);
            _mm256_stream_ps(o + j + 8, r1);
        } else {
            _mm256_storeu_ps(o + j, r0);
            _mm256_storeu_ps(o + j + 8, r1);
        }
    }
#endif
    for (; j < half_w; j++) {
        int32_t s = qn_clip_i16(a[2 * j], lo, hi) + qn_clip_i16(a[2 * j + 1], lo, hi)
                  + qn_clip_i16(b[2 * j], lo, hi) + qn_clip_i16(b[2 * j + 1], lo, hi);
        o[j] = ((float)s * quarter - lo_f) * inv_span;
    }
    if (W % 2 == 1) {
        int32_t s = 2 * (qn_clip_i16(a[W - 1], lo, hi) + qn_clip_i16(b[W - 1], lo, hi));
        o[half_w] = ((float)s * quarter - lo_f) * inv_span;
    }
}

/* o[j] = 1 where at least 2 of the 4 voxels of block j of rows a and b are non-zero. */
static inline void qn_downsample_labels_row_u8(const uint8_t* a, const uint8_t* b, uint8_t* o, qn_ssize W) {
    qn_ssize half_w = W / 2, j = 0;
#if defined(__AVX2__)
    const __m256i one8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (; j + 32 <= half_w; j += 32) {
        qn_prefetch(a + 2 * j + QN_AHEAD);
        qn_prefetch(b + 2 * j + QN_AHEAD);
        __m256i s0 = _mm256_add_epi8(_mm256_min_epu8(_mm256_loadu_si256((const __m256i*)(a + 2 * j)), one8),
                                     _mm256_min_epu8(_mm256_loadu_si256((const __m256i*)(b + 2 * j)), one8));
        __m256i s1 = _mm256_add_epi8(_mm256_min_epu8(_mm256_loadu_si256((const __m256i*)(a + 2 * j + 32)), one8),
                                     _mm256_min_epu8(_mm256_loadu_si256((const __m256i*)(b + 2 * j + 32)), one8));
        /* Pair sums as int16 (column order), compared with 1, narrowed back to bytes. */
        __m256i c0 = _mm256_cmpgt_epi16(_mm256_maddubs_epi16(s0, one8), ones16);
        __m256i c1 = _mm256_cmpgt_epi16(_mm256_maddubs_epi16(s1, one8), ones16);
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(c0, c1), 0xD8);
        _mm256_storeu_si256((__m256i*)(o + j), _mm256_and_si256(packed, one8));
    }
#endif
    for (; j < half_w; j++)
        o[j] = ((a[2 * j] != 0) + (a[2 * j + 1] != 0) + (b[2 * j] != 0) + (b[2 * j + 1] != 0)) >= 2;
    if (W % 2 == 1)
        o[half_w] = ((a[W - 1] != 0) + (b[W - 1] != 0)) >= 1;
}

#if defined(__AVX2__)
/* index[k] = 2 * edge + foreground for columns j .. j+31 of a 0/1 mask row (1 <= j, j + 32 < W). */
static inline void qn_border_index32(const uint8_t* prev, const uint8_t* row, const uint8_t* next, qn_ssize j,
                                     uint8_t* index) {
    const __m256i one8 = _mm256_set1_epi8(1), two8 = _mm256_set1_epi8(2);
    qn_prefetch(next + j + QN_AHEAD);
    __m256i up = _mm256_loadu_si256((const __m256i*)(prev + j));
    __m256i down = _mm256_loadu_si256((const __m256i*)(next + j));
    __m256i left = _mm256_loadu_si256((const __m256i*)(row + j - 1));
    __m256i right = _mm256_loadu_si256((const __m256i*)(row + j + 1));
    __m256i centre = _mm256_loadu_si256((const __m256i*)(row + j));
    __m256i flat = _mm256_and_si256(_mm256_cmpeq_epi8(up, down), _mm256_cmpeq_epi8(left, right));
    _mm256_store_si256((__m256i*)index, _mm256_or_si256(_mm256_min_epu8(centre, one8), _mm256_andnot_si256(flat, two8)));
}

/* o[0:32] = table[index[0:32]], the four weights in lanes 0-3 of `table`; AVX-512 stores whole lines. */
static inline void qn_border_write32(__m256 table, const uint8_t* index, float* o, int stream) {
#if defined(__AVX512F__)
    const __m512 table16 = _mm512_castps256_ps512(table);
    for (int q = 0; q < 2; q++) {
        __m512 value = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(index + 16 * q))),
                                             table16);
        if (stream) _mm512_stream_ps(o + 16 * q, value);
        else _mm512_storeu_ps(o + 16 * q, value);
    }
#else
    for (int q = 0; q < 4; q++) {
        __m256 value = _mm256_permutevar8x32_ps(table, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(index + 8 * q))));
        if (stream) _mm256_stream_ps(o + 8 * q, value);
        else _mm256_storeu_ps(o + 8 * q, value);
    }
#endif
}
#endif

/* One weight by the formula, for the columns that the vector blocks do not cover. */
static inline float qn_border_weight(uint8_t up, uint8_t down, uint8_t left, uint8_t centre, uint8_t right,
                                     float cw0, float cw1, float omega0) {
    return (centre ? cw1 : cw0) + omega0 * (float)((up != down) | (left != right));
}

/* QuickNAT weights of one row of a 0/1 mask (1 < W), between the rows above and below:
 * o[j] = (row[j] ? cw1 : cw0) + (omega0 where the in-plane central difference is non-zero). */
static inline void qn_border_row_binary_u8(const uint8_t* prev, const uint8_t* row, const uint8_t* next,
                                           float* o, qn_ssize W, float cw0, float cw1, float omega0, int stream) {
    qn_ssize j = 1;
    o[0] = qn_border_weight(prev[0], next[0], row[0], row[0], row[1], cw0, cw1, omega0);
#if defined(__AVX2__)
    if (W - 1 >= 33) {
        /* Each voxel is one of four values, indexed by 2 * edge + foreground: a vpermps table. */
        const float values[4] = {cw0 + omega0 * 0.0f, cw1 + omega0 * 0.0f, cw0 + omega0, cw1 + omega0};
        const __m256 table = _mm256_setr_ps(values[0], values[1], values[2], values[3], 0.0f, 0.0f, 0.0f, 0.0f);
        uint8_t index[32] __attribute__((aligned(32)));
        qn_ssize last = W - 33, k;
#if defined(__AVX512F__)
        const qn_ssize line = 16;  /* floats per streamed store: a whole cache line */
#else
        const qn_ssize line = 8;
#endif
        /* Streamed blocks start on store-size boundaries; the columns before the first one and after
         * the last one are stored one by one, so that no line mixes streamed and cached stores. */
        stream = stream && ((uintptr_t)o & 3) == 0;
        if (stream) {
            qn_ssize first = line - (qn_ssize)(((uintptr_t)(o + 1) >> 2) & (line - 1)) + 1;
            first = first == line + 1 ? 1 : first;
            if (first > 1) {
                qn_border_index32(prev, row, next, 1, index);
                for (k = 1; k < first; k++) o[k] = values[index[k - 1]];
            }
            j = first;
        }
        for (; j <= last; j += 32) {
            qn_border_index32(prev, row, next, j, index);
            qn_border_write32(table, index, o + j, stream);
        }
        if (j < W - 1) {
            qn_border_index32(prev, row, next, last, index);
            if (stream) {
                for (k = j; k < W - 1; k++) o[k] = values[index[k - last]];
            } else {
                qn_border_write32(table, index, o + last, 0);
            }
            j = W - 1;
        }
    }
#endif
    for (; j < W - 1; j++)
        o[j] = qn_border_weight(prev[j], next[j], row[j - 1], row[j], row[j + 1], cw0, cw1, omega0);
    o[W - 1] = qn_border_weight(prev[W - 1], next[W - 1], row[W - 2], row[W - 1], row[W - 1], cw0, cw1, omega0);
}

/* Add the number of voxels of each value in p[0:n] to counts[256]. Masks hold few distinct
 * values, so blocks whose maximum is small are counted with vector compares, not a histogram. */
static inline void qn_count_values_u8(const uint8_t* p, qn_ssize n, int64_t* counts) {
    enum { BLOCK = 8192, FEW = 4 };
    for (qn_ssize start = 0; start < n; start += BLOCK) {
        qn_ssize len = n - start < BLOCK ? n - start : BLOCK, k;
        const uint8_t* s = p + start;
        qn_prefetch_span(s + BLOCK, len);
        uint8_t top = 0;
        for (k = 0; k < len; k++) top = s[k] > top ? s[k] : top;
        if (top > FEW) {
            for (k = 0; k < len; k++) counts[s[k]]++;
            continue;
        }
        int64_t others = 0;
        for (int value = 1; value <= top; value++) {
            int64_t c = 0;
            k = 0;
#if defined(__AVX2__)
            const __m256i v = _mm256_set1_epi8((char)value), one8 = _mm256_set1_epi8(1);
            __m256i acc = _mm256_setzero_si256();
            for (; k + 32 <= len; k += 32) {
                __m256i hit = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i*)(s + k)), v), one8);
                acc = _mm256_add_epi64(acc, _mm256_sad_epu8(hit, _mm256_setzero_si256()));
            }
            c = _mm256_extract_epi64(acc, 0) + _mm256_extract_epi64(acc, 1)
              + _mm256_extract_epi64(acc, 2) + _mm256_extract_epi64(acc, 3);
#endif
            for (; k < len; k++) c += s[k] == value;
            counts[value] += c;
            others += c;
        }
        counts[0] += len - others;
    }
}

/* Add the counts of one block of 32 voxels, given as bit masks of P and T. */
static inline void qn_add_overlap_bits(uint32_t pred_bits, uint32_t target_bits, int64_t* counts) {
    counts[0] += qn_popcount32(pred_bits);
    counts[1] += qn_popcount32(target_bits);
    counts[2] += qn_popcount32(pred_bits & target_bits);
}

/* Counts over p > threshold (float32) and t != 0: adds |P|, |T| and |P and T| to sums[0..2]. */
static inline void qn_overlap_f32_u8(const float* p, const uint8_t* t, qn_ssize n, float threshold, int64_t* sums) {
    int64_t counts[3] = {0, 0, 0};
    qn_ssize k = 0;
#if defined(__AVX2__)
    const __m256 thr = _mm256_set1_ps(threshold);
    const __m256i zero = _mm256_setzero_si256();
    for (; k + 32 <= n; k += 32) {
        qn_prefetch(p + k + QN_AHEAD / 4);
        qn_prefetch(p + k + 16 + QN_AHEAD / 4);
        qn_prefetch(t + k + QN_AHEAD);
        uint32_t pm = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + k), thr, _CMP_GT_OQ))
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + k + 8), thr, _CMP_GT_OQ)) << 8
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + k + 16), thr, _CMP_GT_OQ)) << 16
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + k + 24), thr, _CMP_GT_OQ)) << 24;
        uint32_t tm = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i*)(t + k)), zero));
        qn_add_overlap_bits(pm, tm, counts);
    }
#endif
    for (; k < n; k++) qn_add_overlap_bits(p[k] > threshold, t[k] != 0, counts);
    for (int c = 0; c < 3; c++) sums[c] += counts[c];
}

/* As qn_overlap_f32_u8 for a uint8 prediction, foreground where p >= cutoff. */
static inline void qn_overlap_u8_u8(const uint8_t* p, const uint8_t* t, qn_ssize n, uint8_t cutoff, int64_t* sums) {
    int64_t counts[3] = {0, 0, 0};
    qn_ssize k = 0;
#if defined(__AVX2__)
    const __m256i c = _mm256_set1_epi8((char)cutoff), zero = _mm256_setzero_si256();
    for (; k + 32 <= n; k += 32) {
        qn_prefetch(p + k + QN_AHEAD);
        qn_prefetch(t + k + QN_AHEAD);
        __m256i pv = _mm256_loadu_si256((const __m256i*)(p + k));
        uint32_t pm = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(pv, c), pv));
        uint32_t tm = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i*)(t + k)), zero));
        qn_add_overlap_bits(pm, tm, counts);
    }
#endif
    for (; k < n; k++) qn_add_overlap_bits(p[k] >= cutoff, t[k] != 0, counts);
    for (int c = 0; c < 3; c++) sums[c] += counts[c];
}

/* One vertically blended low-res row with its edges repeated: vp[1 + j] = 0.75 near[j] + 0.25 far[j],
 * vp[0] = vp[1], vp[w + 1] = vp[w] (the layout qn_upsample_pairs reads). */
static inline void qn_blend_rows_f32(const float* near, const float* far, float* vp, qn_ssize w) {
    const float near_w = 0.75f, far_w = 0.25f;
    qn_ssize j = 0;
#if defined(__AVX512F__)
    const __m512 vn = _mm512_set1_ps(near_w), vf = _mm512_set1_ps(far_w);
    for (; j + 16 <= w; j += 16)
        _mm512_storeu_ps(vp + 1 + j, _mm512_add_ps(_mm512_mul_ps(vn, _mm512_loadu_ps(near + j)),
                                                   _mm512_mul_ps(vf, _mm512_loadu_ps(far + j))));
#elif defined(__AVX2__)
    const __m256 vn = _mm256_set1_ps(near_w), vf = _mm256_set1_ps(far_w);
    for (; j + 8 <= w; j += 8)
        _mm256_storeu_ps(vp + 1 + j, _mm256_add_ps(_mm256_mul_ps(vn, _mm256_loadu_ps(near + j)),
                                                   _mm256_mul_ps(vf, _mm256_loadu_ps(far + j))));
#endif
    for (; j < w; j++)
        vp[1 + j] = near_w * near[j] + far_w * far[j];
    /* Recomputed rather than read back, which would wait on the vector stores just issued. */
    vp[0] = near_w * near[0] + far_w * far[0];
    vp[w + 1] = near_w * near[w - 1] + far_w * far[w - 1];
}

/* Output columns 2j and 2j+1 (j < pairs) of one upsampled row, thresholded. `vp` is the vertically
 * blended low-res row with one clamped value on each side: vp[0] = v[0], vp[1..w] = v, vp[w+1] = v[w-1].
 * left[j] = 0.75 v[j] + 0.25 v[j-1] and right[j] = 0.75 v[j] + 0.25 v[j+1]. */
static inline void qn_upsample_pairs(const float* vp, uint8_t* o, qn_ssize pairs, float threshold, int stream) {
    const float near_w = 0.75f, far_w = 0.25f;
    qn_ssize j = 0;
#if defined(__AVX2__)
    const __m256 vn = _mm256_set1_ps(near_w), vf = _mm256_set1_ps(far_w), thr = _mm256_set1_ps(threshold);
    const __m256i one8 = _mm256_set1_epi8(1);
    stream = stream && qn_aligned32(o);
    for (; j + 32 <= pairs; j += 32) {
        __m256i halves[2];
        for (int q = 0; q < 2; q++) {
            __m256i words[2];
            for (int r = 0; r < 2; r++) {
                const float* c = vp + 1 + j + 16 * q + 8 * r;
                __m256 centre = _mm256_mul_ps(vn, _mm256_loadu_ps(c));
                __m256 left = _mm256_cmp_ps(_mm256_add_ps(centre, _mm256_mul_ps(vf, _mm256_loadu_ps(c - 1))), thr, _CMP_GT_OQ);
                __m256 right = _mm256_cmp_ps(_mm256_add_ps(centre, _mm256_mul_ps(vf, _mm256_loadu_ps(c + 1))), thr, _CMP_GT_OQ);
                /* Interleave left/right in-lane; packs keeps lanes, so the 16 words come out in order. */
                words[r] = _mm256_packs_epi32(_mm256_castps_si256(_mm256_unpacklo_ps(left, right)),
                                              _mm256_castps_si256(_mm256_unpackhi_ps(left, right)));
            }
            halves[q] = _mm256_and_si256(_mm256_permute4x64_epi64(_mm256_packs_epi16(words[0], words[1]), 0xD8), one8);
        }
        if (stream) {
            _mm256_stream_si256((__m256i*)(o + 2 * j), halves[0]);
            _mm256_stream_si256((__m256i*)(o + 2 * j + 32), halves[1]);
        } else {
            _mm256_storeu_si256((__m256i*)(o + 2 * j), halves[0]);
            _mm256_storeu_si256((__m256i*)(o + 2 * j + 32), halves[1]);
        }
    }
#endif
    for (; j < pairs; j++) {
        float centre = near_w * vp[j + 1];
        o[2 * j] = (centre + far_w * vp[j]) > threshold;
        o[2 * j + 1] = (centre + far_w * vp[j + 2]) > threshold;
    }
}

/* One output row of the float32 upsampling: the low-res rows `near` and `far` (w values) blended
 * vertically, then horizontally, thresholded into o[0:W]; `vp` is scratch of w + 2 floats.
 * With AVX-512 the blend stays in registers: the neighbours v[j-1] and v[j+1] of a block come from
 * valignd with the previous block and the next value, so nothing is stored and read back. */
static inline void qn_upsample_row_f32(const float* near, const float* far, qn_ssize w, float* vp,
                                       uint8_t* o, qn_ssize W, float threshold, int stream) {
    const float near_w = 0.75f, far_w = 0.25f;
    qn_ssize pairs = W / 2;
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__BMI2__)
    const __m512 vn = _mm512_set1_ps(near_w), vf = _mm512_set1_ps(far_w), thr = _mm512_set1_ps(threshold);
    const __m256i one8 = _mm256_set1_epi8(1);
    qn_ssize j = 0, i;
    __m512 before = _mm512_set1_ps(near_w * near[0] + far_w * far[0]);  /* lane 15 = v[j - 1], clamped */
    stream = stream && qn_aligned32(o);
    __m256i pending = _mm256_setzero_si256();  /* first half of a 64-byte line, when streaming */
    int have_pending = 0;
    for (; j + 16 <= pairs; j += 16) {
        qn_ssize m = j + 16 < w ? j + 16 : w - 1;
        __m512 v = _mm512_add_ps(_mm512_mul_ps(vn, _mm512_loadu_ps(near + j)), _mm512_mul_ps(vf, _mm512_loadu_ps(far + j)));
        __m512 after = _mm512_set1_ps(near_w * near[m] + far_w * far[m]);  /* lane 0 = v[j + 16], clamped */
        __m512 v_left = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(v), _mm512_castps_si512(before), 15));
        __m512 v_right = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(after), _mm512_castps_si512(v), 1));
        __m512 centre = _mm512_mul_ps(vn, v);
        uint32_t left = _mm512_cmp_ps_mask(_mm512_add_ps(centre, _mm512_mul_ps(vf, v_left)), thr, _CMP_GT_OQ);
        uint32_t right = _mm512_cmp_ps_mask(_mm512_add_ps(centre, _mm512_mul_ps(vf, v_right)), thr, _CMP_GT_OQ);
        /* pdep interleaves the left and right bits; a masked move turns bits into 0/1 bytes. */
        __m256i bytes = _mm256_maskz_mov_epi8((__mmask32)(_pdep_u32(left, 0x55555555u) | _pdep_u32(right, 0xAAAAAAAAu)), one8);
        if (!stream) {
            _mm256_storeu_si256((__m256i*)(o + 2 * j), bytes);
        } else if (have_pending) {
            _mm512_stream_si512((__m512i*)(o + 2 * j - 32), _mm512_inserti64x4(_mm512_castsi256_si512(pending), bytes, 1));
            have_pending = 0;
        } else if (((uintptr_t)(o + 2 * j) & 63) == 0 && j + 32 <= pairs) {
            pending = bytes;  /* streamed with the next block as one whole line */
            have_pending = 1;
        } else {
            _mm256_stream_si256((__m256i*)(o + 2 * j), bytes);
        }
        before = v;
    }
    for (; j < pairs + W % 2; j++) {
        float v[3];
        for (i = 0; i < 3; i++) {
            qn_ssize c = j - 1 + i < 0 ? 0 : (j - 1 + i > w - 1 ? w - 1 : j - 1 + i);
            v[i] = near_w * near[c] + far_w * far[c];
        }
        float centre = near_w * v[1];
        o[2 * j] = (centre + far_w * v[0]) > threshold;
        if (j < pairs) o[2 * j + 1] = (centre + far_w * v[2]) > threshold;
    }
#else
    qn_blend_rows_f32(near, far, vp, w);
    qn_upsample_pairs(vp, o, pairs, threshold, stream);
    if (W % 2 == 1) o[W - 1] = (near_w * vp[pairs + 1] + far_w * vp[pairs]) > threshold;
#endif
}

#endif
