/* Shared by the native kernels (matvec.c, decode_layer.c): vector helpers and each thread's
 * share of a matrix-vector product, called inside an OpenMP parallel region. */
#ifndef SCRIBE_MATVEC_H
#define SCRIBE_MATVEC_H
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One vector register of floats: 16 with AVX-512, 8 with AVX2, 4 elsewhere (SSE, NEON). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
#elif defined(__AVX2__)
#include <immintrin.h>
#define LANES 8
#else
#define LANES 4
#endif
#define ROWS 8 /* most weight rows per block */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

static inline vfloat load_floats(const float *p) { vfloat v; memcpy(&v, p, sizeof v); return v; }

/* LANES int8 or bfloat16 weights, or the low / high nibbles of LANES bytes, as floats. Compilers do not
 * widen 8-bit vectors well on their own, so x86 gets the instructions spelled out. */
#if defined(__AVX512F__)
static inline vfloat load_int8(const int8_t *p) {
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vfloat load_bf16(const uint16_t *p) { /* bfloat16 is the top half of a float32 */
    return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
static inline void load_nibbles(const uint8_t *p, vfloat *low, vfloat *high) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *low = (vfloat)_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
    *high = (vfloat)_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
}
#elif defined(__AVX2__)
static inline vfloat load_int8(const int8_t *p) {
    return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vfloat load_bf16(const uint16_t *p) {
    return (vfloat)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
static inline void load_nibbles(const uint8_t *p, vfloat *low, vfloat *high) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *low = (vfloat)_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
    *high = (vfloat)_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
}
#else
static inline vfloat load_int8(const int8_t *p) {
    vfloat v;
    for (int l = 0; l < LANES; l++) v[l] = (float)p[l];
    return v;
}
static inline vfloat load_bf16(const uint16_t *p) {
    vfloat v;
    for (int l = 0; l < LANES; l++) {
        uint32_t bits = (uint32_t)p[l] << 16;
        memcpy(&v[l], &bits, sizeof bits);
    }
    return v;
}
static inline void load_nibbles(const uint8_t *p, vfloat *low, vfloat *high) {
    for (int l = 0; l < LANES; l++) { (*low)[l] = (float)(p[l] & 15); (*high)[l] = (float)(p[l] >> 4); }
}
#endif

/* The sum of a register's lanes, halving it in a few steps (a row of many short products ends
 * in one of these each, so a lane-by-lane loop would cost more than the products). */
static inline float sum_lanes(vfloat v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
    __m128 half = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
#else
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
#endif
}

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    float f;
    if (exponent == 0) { /* zero or subnormal: mantissa · 2^-24 */
        f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (exponent == 31) bits = sign | 0x7f800000u | (mantissa << 13); /* inf, nan */
    else bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* This thread's share [first, last) of `blocks` blocks of rows, inside a parallel region. */
static inline void my_share(int64_t blocks, int64_t *first, int64_t *last) {
    int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    *first = blocks * thread / team;
    *last = blocks * (thread + 1) / team;
}

/* While one block of rows is read, ask for the next one (contiguous, its rows·K weights) to be
 * fetched into cache at the same pace: `done` bytes of the current block read so far,
 * `step` bytes per loop turn. Rows of a few hundred bytes (int8) are too short for the
 * hardware's stream detection to reach full speed on its own. */
static inline void prefetch_share(const char *ahead, int64_t done, int64_t step) {
    if (!ahead) return;
    for (int64_t offset = 0; offset < step; offset += 64) __builtin_prefetch(ahead + done + offset, 0, 3);
}

/* ------------------------------------------------------------------ float32, bfloat16, int8 */

/* The three weight types that are read one element per input. Every function below takes
 * the type as a constant and is inlined where it is called, so the compiler makes one
 * specialized loop per type and the switches cost nothing. */
enum weight_type { FLOAT32, BFLOAT16, INT8 };

static inline __attribute__((always_inline)) int64_t weight_size(enum weight_type type) {
    return type == FLOAT32 ? 4 : type == BFLOAT16 ? 2 : 1;
}

/* Rows per block (see the top of the file). */
static inline __attribute__((always_inline)) int block_rows(enum weight_type type) {
    return type == INT8 ? ROWS : 4;
}

/* LANES weights from element `at` of w, as floats. */
static inline __attribute__((always_inline)) vfloat load_weights(enum weight_type type, const void *w, int64_t at) {
    switch (type) {
    case FLOAT32: return load_floats((const float *)w + at);
    case BFLOAT16: return load_bf16((const uint16_t *)w + at);
    default: return load_int8((const int8_t *)w + at);
    }
}

/* One weight, element `at` of w, as a float (for the tail of a row shorter than LANES). */
static inline __attribute__((always_inline)) float weight_at(enum weight_type type, const void *w, int64_t at) {
    switch (type) {
    case FLOAT32: return ((const float *)w)[at];
    case BFLOAT16: {
        uint32_t bits = (uint32_t)((const uint16_t *)w)[at] << 16; /* bfloat16 is the top half of a float32 */
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    default: return (float)((const int8_t *)w)[at];
    }
}

/* out[r] = x · row r of w, for `rows` (at most ROWS) consecutive rows of k weights. */
static inline __attribute__((always_inline)) void dot_rows(enum weight_type type, const float *x, const void *w,
                                                           int64_t k, int rows, float *out, const char *ahead) {
    vfloat acc[ROWS] = {0};
    int64_t whole = k - k % LANES, size = weight_size(type);
    for (int64_t i = 0; i < whole; i += LANES) {
        vfloat xv = load_floats(x + i);
        prefetch_share(ahead, i * rows * size, rows * LANES * size);
        for (int r = 0; r < rows; r++) acc[r] += load_weights(type, w, r * k + i) * xv;
    }
    for (int r = 0; r < rows; r++) {
        float s = sum_lanes(acc[r]);
        for (int64_t i = whole; i < k; i++) s += weight_at(type, w, r * k + i) * x[i];
        out[r] = s;
    }
}

/* This thread's share of y = x · (w · scales)ᵀ + bias, one block of output rows after another.
 * Called inside the parallel region of each entry point below (OpenMP outlines the region
 * before inlining, so the region itself must sit where `type` is a literal). */
static inline __attribute__((always_inline)) void linear_share(enum weight_type type, const float *x, int64_t m,
                                                               int64_t k, const void *w, int64_t n,
                                                               const float *scales, const float *bias, float *y) {
    int64_t first, last, size = weight_size(type);
    const int per_block = block_rows(type);
    const char *weights = w;
    my_share((n + per_block - 1) / per_block, &first, &last);
    /* One thread reading long float32 rows is one stream the hardware prefetcher follows on its
     * own; asking as well only spends issue slots (about 25% slower, benchmarks/serve_load.py). */
    int prefetch = type != FLOAT32 || omp_get_num_threads() > 1;
    for (int64_t b = first; b < last; b++) {
        int64_t row = b * per_block;
        int rows = n - row < per_block ? (int)(n - row) : per_block;
        const char *block = weights + row * k * size;
        for (int64_t j = 0; j < m; j++) {
            float *out = y + j * n + row;
            if (rows == per_block)
                dot_rows(type, x + j * k, block, k, per_block, out,
                         prefetch && j == 0 && b + 1 < last ? block + per_block * k * size : NULL);
            else
                for (int r = 0; r < rows; r++) dot_rows(type, x + j * k, block + r * k * size, k, 1, out + r, NULL);
            if (scales) for (int r = 0; r < rows; r++) out[r] *= scales[row + r];
            if (bias) for (int r = 0; r < rows; r++) out[r] += bias[row + r];
        }
    }
}

/* ------------------------------------------------------------------ int4, scale and min per group */

/* ROWS rows: Σ_g s_g·(q_g · x_g) + min_g·Σx_g, with x split into its even and odd inputs
 * (the low and high nibbles) and its per-group sums made once per call. */
static inline __attribute__((always_inline)) void dot_rows_i4(const float *even, const float *odd,
                                                               const float *group_sums, const uint8_t *w,
                                                               const uint16_t *scales, const uint16_t *mins,
                                                               int64_t k, int64_t group, int rows, float *out,
                                                               const char *ahead) {
    int64_t groups = k / group, half = group / 2, row_bytes = k / 2;
    vfloat acc[ROWS] = {0};
    float offset[ROWS] = {0};
    for (int64_t g = 0; g < groups; g++) {
        vfloat part[ROWS] = {0};
        for (int64_t i = g * half; i < (g + 1) * half; i += LANES) {
            vfloat xe = load_floats(even + i), xo = load_floats(odd + i), low, high;
            prefetch_share(ahead, i * ROWS, ROWS * LANES);
            for (int r = 0; r < rows; r++) {
                load_nibbles(w + r * row_bytes + i, &low, &high);
                part[r] += low * xe + high * xo;
            }
        }
        for (int r = 0; r < rows; r++) {
            acc[r] += part[r] * half_to_float(scales[r * groups + g]);
            offset[r] += half_to_float(mins[r * groups + g]) * group_sums[g];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = sum_lanes(acc[r]) + offset[r];
}

/* x row by row -> even inputs, odd inputs (k/2 each) and sums per group, the int4 kernel's
 * view of x: scratch holds m·(k + k/group) floats. */
static inline void i4_prepare(const float *x, int64_t m, int64_t k, int64_t group, float *scratch) {
    int64_t groups = k / group;
    for (int64_t j = 0; j < m; j++) {
        float *even = scratch + j * k, *odd = even + k / 2, *sums = scratch + m * k + j * groups;
        for (int64_t i = 0; i < k / 2; i++) { even[i] = x[j * k + 2 * i]; odd[i] = x[j * k + 2 * i + 1]; }
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t i = 0; i < group; i++) s += x[j * k + g * group + i];
            sums[g] = s;
        }
    }
}

/* This thread's share of the int4 product, from i4_prepare's scratch (inside a parallel region). */
static inline void linear_share_i4(const float *scratch, int64_t m, int64_t k, const uint8_t *w,
                                   const uint16_t *scales, const uint16_t *mins, int64_t group, int64_t n,
                                   const float *bias, float *y) {
    int64_t groups = k / group, first, last;
    my_share((n + ROWS - 1) / ROWS, &first, &last);
    for (int64_t b = first; b < last; b++) {
        int64_t row = b * ROWS;
        int rows = n - row < ROWS ? (int)(n - row) : ROWS;
        const uint8_t *block = w + row * (k / 2);
        for (int64_t j = 0; j < m; j++) {
            const float *even = scratch + j * k, *odd = even + k / 2, *sums = scratch + m * k + j * groups;
            float *out = y + j * n + row;
            const uint16_t *s = scales + row * groups, *z = mins + row * groups;
            if (rows == ROWS)
                dot_rows_i4(even, odd, sums, block, s, z, k, group, ROWS, out,
                            j == 0 && b + 1 < last ? (const char *)(block + ROWS * (k / 2)) : NULL);
            else
                for (int r = 0; r < rows; r++)
                    dot_rows_i4(even, odd, sums, block + r * (k / 2), s + r * groups, z + r * groups, k, group, 1,
                                out + r, NULL);
            if (bias) for (int r = 0; r < rows; r++) out[r] += bias[row + r];
        }
    }
}

/* ------------------------------------------------------------------ RMSNorm */

/* y = x / sqrt(mean(x²) + eps) · w for one row of k features. */
static inline void rms_norm_row(const float *row, int64_t k, const float *w, float eps, float *out) {
    int64_t whole = k - k % LANES;
    vfloat acc = {0};
    for (int64_t i = 0; i < whole; i += LANES) {
        vfloat v = load_floats(row + i);
        acc += v * v;
    }
    float squares = sum_lanes(acc);
    for (int64_t i = whole; i < k; i++) squares += row[i] * row[i];
    float scale = 1.0f / __builtin_sqrtf(squares / (float)k + eps);
    for (int64_t i = 0; i < k; i++) out[i] = w[i] * (row[i] * scale);
}

#endif
