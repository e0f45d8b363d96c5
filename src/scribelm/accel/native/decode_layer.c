/* One pre-norm decoder layer (RMSNorm, RoPE, grouped-query attention over a KV cache,
 * SwiGLU feed-forward) for a decode step of a few rows, in one call.
 *
 * A decode step of a 100M-parameter model spends ~13 ms streaming its weights and, run
 * as PyTorch operations from Python, another ~4 ms on the ~40 small operations per layer
 * between the products (each one cheap alone, but each found with cold caches after a
 * product has streamed megabytes through them). Here the whole layer is one parallel
 * region of PyTorch's own OpenMP threads: the products are the same loops as matvec.c
 * (the same summation order, so the same numbers), and the steps between them (norms,
 * rotary positions, the cache write, attention for one query, the gated activation,
 * residual additions) are a few microseconds of arithmetic behind a barrier each.
 *
 * The layer computes, for each row j (float32 throughout):
 *
 *     h = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1)))     n1 = rmsnorm(x) · attention_norm
 *     out = h + down(silu(gate(n2)) · up(n2))                   n2 = rmsnorm(h) · mlp_norm
 *
 * with row j's new key and value written at its position, and its query attending to
 * the keys at positions 0..position (everything the row has written, itself included).
 */
#include <math.h>

#include "matvec.h"

/* A weight matrix of any of the kernels' types. */
struct scribe_matrix {
    int32_t type; /* 0 float32, 1 bfloat16, 2 int8 (float32 scale per row), 3 int4 (float16 scale and min per group) */
    int32_t unused;
    const void *weight; /* (n, k), or (n, k/2) bytes for int4 */
    const void *scales;
    const void *mins;
    const float *bias; /* (n,) or NULL */
    int64_t n, k, group;
};

struct scribe_layer {
    struct scribe_matrix qkv, o, gate_up, down; /* qkv: q rows, then k, then v; gate_up: gate rows, then up */
    const float *attention_norm, *mlp_norm;      /* (d_model,) */
    float eps, scale;                            /* RMSNorm's epsilon; the attention scale */
    int64_t d_model, n_heads, n_kv_heads, head_dim, d_mlp;
};

/* y = x · wᵀ (+ bias) for m rows; called by every thread of the region, returns after a barrier. */
static void product(const struct scribe_matrix *w, const float *x, int64_t m, float *y, float *int4_scratch) {
    switch (w->type) {
    case 0: linear_share(FLOAT32, x, m, w->k, w->weight, w->n, NULL, w->bias, y); break;
    case 1: linear_share(BFLOAT16, x, m, w->k, w->weight, w->n, NULL, w->bias, y); break;
    case 2: linear_share(INT8, x, m, w->k, w->weight, w->n, w->scales, w->bias, y); break;
    default:
        #pragma omp single
        i4_prepare(x, m, w->k, w->group, int4_scratch);
        linear_share_i4(int4_scratch, m, w->k, w->weight, w->scales, w->mins, w->group, w->n, w->bias, y);
    }
    #pragma omp barrier
}

/* out = x·cos + swap_halves(x)·sin for one head (the sin is signed, as model.rope_cos_sin makes it). */
static inline void rope(const float *x, const float *cos, const float *sin, int64_t head_dim, float *out) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < head_dim; i++) out[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
}

/* One query head against `length` cached keys and values (rows of head_dim): softmax(q·kᵀ·scale)·v. */
static void attend(const float *q, const float *keys, const float *values, int64_t length, int64_t head_dim,
                   float scale, float *scores, float *out) {
    float best = -INFINITY;
    for (int64_t s = 0; s < length; s++) {
        const float *k = keys + s * head_dim;
        float dot = 0.0f;
        for (int64_t i = 0; i < head_dim; i++) dot += q[i] * k[i];
        scores[s] = dot * scale;
        if (scores[s] > best) best = scores[s];
    }
    float total = 0.0f;
    for (int64_t s = 0; s < length; s++) total += scores[s] = expf(scores[s] - best);
    for (int64_t i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int64_t s = 0; s < length; s++) {
        const float *v = values + s * head_dim;
        float p = scores[s] / total;
        for (int64_t i = 0; i < head_dim; i++) out[i] += p * v[i];
    }
}

/* x (m, d_model) -> out (m, d_model). cos, sin: (m, head_dim) or NULL (no rotary positions).
 * keys, values: this layer's cache, row j's head g at keys + j·row_stride + g·max_length·head_dim,
 * one head_dim row per position; positions (m,): where row j writes (it then attends 0..positions[j]).
 * Returns 0, or -1 when scratch memory cannot be had. */
int scribe_decode_layer(const struct scribe_layer *L, const float *x, float *out, int64_t m, const float *cos,
                        const float *sin, float *keys, float *values, int64_t row_stride, int64_t max_length,
                        const int64_t *positions, int threads) {
    const int64_t C = L->d_model, H = L->n_heads, KV = L->n_kv_heads, hd = L->head_dim, F = L->d_mlp;
    const int64_t qkv_width = (H + 2 * KV) * hd, widest = C > F ? C : F;
    size_t floats = (size_t)(m * (C + qkv_width + H * hd + C + 2 * F + F + widest + widest)) +
                    (size_t)threads * (size_t)(max_length + hd);
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch) return -1;
    float *normed = scratch, *qkv = normed + m * C, *attended = qkv + m * qkv_width, *sub = attended + m * H * hd;
    float *gate_up = sub + m * C, *hidden = gate_up + m * 2 * F, *int4_scratch = hidden + m * F;
    float *per_thread = int4_scratch + m * 2 * widest;
    const int64_t group_size = H / KV;

    #pragma omp parallel num_threads(threads)
    {
        float *scores = per_thread + (int64_t)omp_get_thread_num() * (max_length + hd), *rotated = scores + max_length;

        #pragma omp for
        for (int64_t j = 0; j < m; j++) rms_norm_row(x + j * C, C, L->attention_norm, L->eps, normed + j * C);
        product(&L->qkv, normed, m, qkv, int4_scratch);

        /* rotary positions on q (in place) and k, and the new key and value into the cache */
        #pragma omp for
        for (int64_t unit = 0; unit < m * (H + KV); unit++) {
            int64_t j = unit / (H + KV), head = unit % (H + KV);
            float *row = qkv + j * qkv_width;
            if (head < H) {
                if (cos) {
                    rope(row + head * hd, cos + j * hd, sin + j * hd, hd, rotated);
                    memcpy(row + head * hd, rotated, sizeof(float) * hd);
                }
            } else {
                int64_t g = head - H, at = j * row_stride + g * max_length * hd + positions[j] * hd;
                const float *k = row + H * hd + g * hd, *v = row + (H + KV) * hd + g * hd;
                if (cos) rope(k, cos + j * hd, sin + j * hd, hd, keys + at);
                else memcpy(keys + at, k, sizeof(float) * hd);
                memcpy(values + at, v, sizeof(float) * hd);
            }
        }

        #pragma omp for
        for (int64_t unit = 0; unit < m * H; unit++) {
            int64_t j = unit / H, h = unit % H, g = h / group_size, at = j * row_stride + g * max_length * hd;
            attend(qkv + j * qkv_width + h * hd, keys + at, values + at, positions[j] + 1, hd, L->scale, scores,
                   attended + j * H * hd + h * hd);
        }
        product(&L->o, attended, m, sub, int4_scratch);

        #pragma omp for
        for (int64_t j = 0; j < m; j++) {
            for (int64_t i = 0; i < C; i++) out[j * C + i] = x[j * C + i] + sub[j * C + i];
            rms_norm_row(out + j * C, C, L->mlp_norm, L->eps, normed + j * C);
        }
        product(&L->gate_up, normed, m, gate_up, int4_scratch);

        #pragma omp for
        for (int64_t unit = 0; unit < m * F; unit++) {
            int64_t j = unit / F, i = unit % F;
            float g = gate_up[j * 2 * F + i], u = gate_up[j * 2 * F + F + i];
            hidden[unit] = g / (1.0f + expf(-g)) * u;
        }
        product(&L->down, hidden, m, sub, int4_scratch);

        #pragma omp for
        for (int64_t j = 0; j < m; j++)
            for (int64_t i = 0; i < C; i++) out[j * C + i] += sub[j * C + i];
    }
    free(scratch);
    return 0;
}
