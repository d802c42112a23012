/* Square block transposes for the layout kernel (_layout.pyx): one 16-byte register per row.
 *
 * qn_transpose_N_uW(src, ss, dst, ds) writes dst row c, item r = src row r, item c for an N x N block of
 * W-bit items (N = 128 / W: 16 bytes per row), row strides `ss` and `ds` in bytes. With SSE2 (every
 * x86-64 build) the block is transposed in registers by log2(N) rounds of unpacking row i with row
 * i + N/2, the classic perfect-shuffle transpose; other targets run the plain C loop. Both move the
 * same bytes.
 */
#ifndef QN_TRANSPOSE_H
#define QN_TRANSPOSE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__SSE2__)
#define QN_TRANSPOSE_BODY(N, UNPACKLO, UNPACKHI)                                               \
    __m128i r[N], t[N];                                                                        \
    for (int i = 0; i < N; i++) r[i] = _mm_loadu_si128((const __m128i*)(src + i * ss));        \
    for (int n = N; n > 1; n /= 2) {                                                           \
        for (int i = 0; i < N / 2; i++) {                                                      \
            t[2 * i] = UNPACKLO(r[i], r[i + N / 2]);                                           \
            t[2 * i + 1] = UNPACKHI(r[i], r[i + N / 2]);                                       \
        }                                                                                      \
        for (int i = 0; i < N; i++) r[i] = t[i];                                               \
    }                                                                                          \
    for (int i = 0; i < N; i++) _mm_storeu_si128((__m128i*)(dst + i * ds), r[i]);
#else
#define QN_TRANSPOSE_BODY(N, UNPACKLO, UNPACKHI)                                               \
    for (int c = 0; c < N; c++)                                                                \
        for (int r = 0; r < N; r++)                                                            \
            memcpy(dst + c * ds + r * (16 / N), src + r * ss + c * (16 / N), 16 / N);
#endif

static inline void qn_transpose_16_u8(const char* src, ptrdiff_t ss, char* dst, ptrdiff_t ds) {
    QN_TRANSPOSE_BODY(16, _mm_unpacklo_epi8, _mm_unpackhi_epi8)
}

static inline void qn_transpose_8_u16(const char* src, ptrdiff_t ss, char* dst, ptrdiff_t ds) {
    QN_TRANSPOSE_BODY(8, _mm_unpacklo_epi16, _mm_unpackhi_epi16)
}

static inline void qn_transpose_4_u32(const char* src, ptrdiff_t ss, char* dst, ptrdiff_t ds) {
    QN_TRANSPOSE_BODY(4, _mm_unpacklo_epi32, _mm_unpackhi_epi32)
}

static inline void qn_transpose_2_u64(const char* src, ptrdiff_t ss, char* dst, ptrdiff_t ds) {
    QN_TRANSPOSE_BODY(2, _mm_unpacklo_epi64, _mm_unpackhi_epi64)
}

#endif
