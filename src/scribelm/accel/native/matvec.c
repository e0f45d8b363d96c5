/* Matrix-vector products for decoding on a CPU: y = x · Wᵀ (+ bias) for a few rows of x.
 *
 * Decoding one token reads every weight once and does one multiply-add with it, so
 * the time goes to streaming W from memory. These loops read W exactly once, in
 * order, on every core, with no set-up cost per call:
 *
 *   - the output rows are split evenly between the threads of PyTorch's own OpenMP
 *     pool (the caller passes torch.get_num_threads());
 *   - each thread takes a block of weight rows at a time (4 of float32 / bfloat16,
 *     ROWS = 8 of the shorter int8 and int4 rows) and keeps one vector accumulator
 *     per row, so each load of x serves that many multiply-adds and the core keeps
 *     that many independent streams in flight (more streams than the hardware
 *     prefetcher follows cost bandwidth: 4 long float rows measured ~15% faster than 8);
 *   - for several rows of x (a small batch) the same block of W is reused from
 *     cache for each of them.
 *
 * (And RMSNorm over a few rows, for the same reason: no set-up cost.)
 *
 * Weights: float32 or bfloat16 (N, K); int8 (N, K) with one float32 scale per row (w = q·s);
 * int4 two per byte (low nibble = even input, high = odd input) with float16 scale
 * and min per group of G inputs (w = q·s + min). Arithmetic is written with GCC/Clang
 * vector extensions, one register wide for the machine it is built on (-march=native).
 */
#include "matvec.h"

void scribe_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias, float *y,
                       int threads) {
    #pragma omp parallel num_threads(threads)
    linear_share(FLOAT32, x, m, k, w, n, NULL, bias, y);
}

/* bfloat16 weights, float32 activations, bias and result (the caller rounds to bfloat16). */
void scribe_linear_bf16(const float *x, int64_t m, int64_t k, const uint16_t *w, int64_t n, const float *bias, float *y,
                        int threads) {
    #pragma omp parallel num_threads(threads)
    linear_share(BFLOAT16, x, m, k, w, n, NULL, bias, y);
}

/* int8 weights with one float32 scale per row. */
void scribe_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scales, int64_t n,
                      const float *bias, float *y, int threads) {
    #pragma omp parallel num_threads(threads)
    linear_share(INT8, x, m, k, w, n, scales, bias, y);
}

/* int4, two per byte, with a float16 scale and min per group of inputs. Returns 0, or -1 when
 * the scratch memory cannot be had. group must be a multiple of 2·LANES. */
int scribe_linear_i4(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *scales,
                     const uint16_t *mins, int64_t group, int64_t n, const float *bias, float *y, int threads) {
    float *scratch = malloc(sizeof(float) * (size_t)(m * (k + k / group)));
    if (!scratch) return -1;
    i4_prepare(x, m, k, group, scratch);
    #pragma omp parallel num_threads(threads)
    linear_share_i4(scratch, m, k, w, scales, mins, group, n, bias, y);
    free(scratch);
    return 0;
}

/* y = x / sqrt(mean(x²) + eps) · w for each of m rows of k features. A decode step norms one
 * short row at a time, where PyTorch's rms_norm costs more in dispatch than in arithmetic. */
void scribe_rms_norm(const float *x, int64_t m, int64_t k, const float *w, float eps, float *y) {
    for (int64_t j = 0; j < m; j++) rms_norm_row(x + j * k, k, w, eps, y + j * k);
}

int scribe_lanes(void) { return LANES; }
