/* One pre-norm decoder layer (RMSNorm or LayerNorm, RoPE or none, grouped-query attention
 * over a KV cache, SwiGLU or a GELU feed-forward) for a decode step of a few rows, in one call.
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
 *     h = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1)))     n1 = norm(x)  (RMSNorm, or LayerNorm
 *     out = h + down(silu(gate(n2)) · up(n2))                   n2 = norm(h)   with its bias)
 *
 * or, for GPT-2-style blocks, out = h + down(gelu(up(n2))) (GELU exact or tanh-approximated).
 *
 * with row j's new key and value written at its position, and its query attending to
 * the keys at positions 0..position (everything the row has written, itself included).
 *
 * A bfloat16 layer (activations, norms, positions and cache in bfloat16, weights bfloat16
 * or quantized) rounds to bfloat16 wherever PyTorch's bfloat16 operations round: after
 * each product, norm, rotation, attention, activation and addition, each computed in
 * float32 in between, as PyTorch's CPU kernels compute them.
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
    const void *attention_norm, *mlp_norm;       /* (d_model,), in the activations' type */
    const void *attention_norm_bias, *mlp_norm_bias; /* LayerNorm's biases, or NULL */
    float eps, scale;                            /* the norms' epsilon; the attention scale */
    int64_t d_model, n_heads, n_kv_heads, head_dim, d_mlp;
    int64_t bfloat16;                            /* activations, norms, positions, cache: 1 bfloat16, 0 float32 */
    int64_t layer_norm;                          /* 1 LayerNorm (centred, optional bias), 0 RMSNorm */
    int64_t activation;                          /* 0 silu(gate)·up, 1 gelu(up), 2 gelu_tanh(up) */
};

/* ------------------------------------------------------------------ float32 or bfloat16 values */

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* a quiet nan */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* f, rounded as a bfloat16 operation would leave it (or as it is, in a float32 layer). */
static inline float rounded(float f, int bf16) { return bf16 ? from_bf16(to_bf16(f)) : f; }

/* Element i of a float32 or bfloat16 array. */
static inline float value_at(const void *p, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float f, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(f);
    else ((float *)p)[i] = f;
}

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

/* out = x·cos + swap_halves(x)·sin for one head of position `j` (the sin is signed, as
 * model.rope_cos_sin makes it); in bfloat16, x·cos is rounded first (its own operation),
 * then the sum (one addcmul). */
static inline void rope(const float *x, const void *cos, const void *sin, int64_t j, int64_t head_dim, int bf16,
                        float *out) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < head_dim; i++) {
        float c = value_at(cos, j * head_dim + i, bf16), s = value_at(sin, j * head_dim + i, bf16);
        out[i] = rounded(rounded(x[i] * c, bf16) + x[i < half ? i + half : i - half] * s, bf16);
    }
}

/* LayerNorm of one row: (x - mean) / sqrt(var + eps) · w + b (biased variance, as PyTorch), each
 * output rounded once in bfloat16 (nn.LayerNorm computes in float32 inside). */
static inline void layer_norm_row(const float *row, int64_t k, const void *w, const void *b, float eps, int bf16,
                                  float *out) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t i = 0; i < k; i++) mean += row[i];
    mean /= (float)k;
    for (int64_t i = 0; i < k; i++) var += (row[i] - mean) * (row[i] - mean);
    float scale = 1.0f / sqrtf(var / (float)k + eps);
    for (int64_t i = 0; i < k; i++)
        out[i] = rounded((row[i] - mean) * scale * value_at(w, i, bf16) + (b ? value_at(b, i, bf16) : 0.0f), bf16);
}

/* The layer's norm of one row. RMSNorm: in float32 w·(x·r); in bfloat16 w·round(x·r), rounded (model.RMSNorm). */
static inline void norm_row(const struct scribe_layer *L, const float *row, const void *w, const void *b, int bf16,
                            float *out) {
    int64_t k = L->d_model;
    float eps = L->eps;
    if (L->layer_norm) {
        layer_norm_row(row, k, w, b, eps, bf16, out);
        return;
    }
    if (!bf16) {
        rms_norm_row(row, k, w, eps, out);
        return;
    }
    float squares = 0.0f;
    for (int64_t i = 0; i < k; i++) squares += row[i] * row[i];
    float scale = 1.0f / sqrtf(squares / (float)k + eps);
    for (int64_t i = 0; i < k; i++) out[i] = rounded(value_at(w, i, 1) * rounded(row[i] * scale, 1), 1);
}

/* One query head against `length` cached keys and values (rows of head_dim, float32 or
 * bfloat16): softmax(q·kᵀ·scale)·v. */
static void attend(const float *q, const void *keys, const void *values, int64_t length, int64_t head_dim,
                   float scale, int bf16, float *scores, float *out) {
    float best = -INFINITY;
    for (int64_t s = 0; s < length; s++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < head_dim; i++) dot += q[i] * value_at(keys, s * head_dim + i, bf16);
        scores[s] = dot * scale;
        if (scores[s] > best) best = scores[s];
    }
    float total = 0.0f;
    for (int64_t s = 0; s < length; s++) total += scores[s] = expf(scores[s] - best);
    for (int64_t i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int64_t s = 0; s < length; s++) {
        float p = scores[s] / total;
        for (int64_t i = 0; i < head_dim; i++) out[i] += p * value_at(values, s * head_dim + i, bf16);
    }
    for (int64_t i = 0; i < head_dim; i++) out[i] = rounded(out[i], bf16);
}

/* Where a layer's steps keep their numbers, all (m, ·) floats; see decode_layers. */
struct workspace {
    float *residual, *normed, *qkv, *attended, *sub, *gate_up, *hidden, *int4_scratch, *per_thread;
};

/* One layer for m rows, by every thread of the parallel region: `state` (m, d_model) holds
 * the layer's input and receives its output. keys, values: this layer's cache (see decode_layers). */
static void layer_body(const struct scribe_layer *L, float *state, int64_t m, const void *cos, const void *sin,
                       void *keys, void *values, int64_t row_stride, int64_t max_length, const int64_t *positions,
                       const struct workspace *w) {
    const int64_t C = L->d_model, H = L->n_heads, KV = L->n_kv_heads, hd = L->head_dim, F = L->d_mlp;
    const int64_t qkv_width = (H + 2 * KV) * hd, group_size = H / KV;
    const int bf16 = (int)L->bfloat16;
    float *scores = w->per_thread + (int64_t)omp_get_thread_num() * (max_length + hd), *rotated = scores + max_length;

    #pragma omp for
    for (int64_t j = 0; j < m; j++)
        norm_row(L, state + j * C, L->attention_norm, L->attention_norm_bias, bf16, w->normed + j * C);
    product(&L->qkv, w->normed, m, w->qkv, w->int4_scratch);

    /* rotary positions on q (in place) and k, and the new key and value into the cache */
    #pragma omp for
    for (int64_t unit = 0; unit < m * (H + KV); unit++) {
        int64_t j = unit / (H + KV), head = unit % (H + KV);
        float *row = w->qkv + j * qkv_width;
        if (head < H) {
            float *q = row + head * hd;
            for (int64_t i = 0; i < hd; i++) q[i] = rounded(q[i], bf16);
            if (cos) {
                rope(q, cos, sin, j, hd, bf16, rotated);
                memcpy(q, rotated, sizeof(float) * hd);
            }
        } else {
            int64_t g = head - H, at = j * row_stride + g * max_length * hd + positions[j] * hd;
            float *k = row + H * hd + g * hd, *v = row + (H + KV) * hd + g * hd;
            for (int64_t i = 0; i < hd; i++) k[i] = rounded(k[i], bf16);
            if (cos) {
                rope(k, cos, sin, j, hd, bf16, rotated);
                k = rotated;
            }
            for (int64_t i = 0; i < hd; i++) {
                store(keys, at + i, k[i], bf16);
                store(values, at + i, v[i], bf16);
            }
        }
    }

    #pragma omp for
    for (int64_t unit = 0; unit < m * H; unit++) {
        int64_t j = unit / H, h = unit % H, g = h / group_size, at = j * row_stride + g * max_length * hd;
        const char *key_rows = (const char *)keys + at * (bf16 ? 2 : 4);
        const char *value_rows = (const char *)values + at * (bf16 ? 2 : 4);
        attend(w->qkv + j * qkv_width + h * hd, key_rows, value_rows, positions[j] + 1, hd, L->scale, bf16, scores,
               w->attended + j * H * hd + h * hd);
    }
    product(&L->o, w->attended, m, w->sub, w->int4_scratch);

    #pragma omp for
    for (int64_t j = 0; j < m; j++) {
        for (int64_t i = 0; i < C; i++)
            w->residual[j * C + i] = rounded(state[j * C + i] + rounded(w->sub[j * C + i], bf16), bf16);
        norm_row(L, w->residual + j * C, L->mlp_norm, L->mlp_norm_bias, bf16, w->normed + j * C);
    }
    product(&L->gate_up, w->normed, m, w->gate_up, w->int4_scratch);

    #pragma omp for
    for (int64_t unit = 0; unit < m * F; unit++) {
        int64_t j = unit / F, i = unit % F;
        if (L->activation == 0) { /* gate rows, then up rows */
            float g = rounded(w->gate_up[j * 2 * F + i], bf16), u = rounded(w->gate_up[j * 2 * F + F + i], bf16);
            w->hidden[unit] = rounded(rounded(g / (1.0f + expf(-g)), bf16) * u, bf16);
        } else { /* up rows only */
            float u = rounded(w->gate_up[j * F + i], bf16), a;
            if (L->activation == 1) a = 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
            else a = 0.5f * u * (1.0f + tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u)));
            w->hidden[unit] = rounded(a, bf16);
        }
    }
    product(&L->down, w->hidden, m, w->sub, w->int4_scratch);

    #pragma omp for
    for (int64_t j = 0; j < m; j++)
        for (int64_t i = 0; i < C; i++)
            state[j * C + i] = rounded(w->residual[j * C + i] + rounded(w->sub[j * C + i], bf16), bf16);
}

/* n_layers layers one after another: x (m, d_model) -> out (m, d_model), float32 or bfloat16
 * (the layers' `bfloat16`, which all share). cos, sin: (m, head_dim) or NULL (no rotary
 * positions). keys, values: the cache, layer l's row j's head g at element
 * l·layer_stride + j·row_stride + g·max_length·head_dim, one head_dim row per position;
 * positions (m,): where row j writes (it then attends 0..positions[j]).
 * Returns 0, or -1 when scratch memory cannot be had. */
int scribe_decode_layers(const struct scribe_layer *layers, int64_t n_layers, const void *x, void *out, int64_t m,
                         const void *cos, const void *sin, void *keys, void *values, int64_t layer_stride,
                         int64_t row_stride, int64_t max_length, const int64_t *positions, int threads) {
    const int64_t C = layers[0].d_model;
    const int bf16 = (int)layers[0].bfloat16, size = bf16 ? 2 : 4;
    int64_t qkv_width = 0, attended = 0, F = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const struct scribe_layer *L = layers + l;
        int64_t width = (L->n_heads + 2 * L->n_kv_heads) * L->head_dim;
        if (width > qkv_width) qkv_width = width;
        if (L->n_heads * L->head_dim > attended) attended = L->n_heads * L->head_dim;
        if (L->d_mlp > F) F = L->d_mlp;
    }
    int64_t widest = C > F ? C : F, hd_most = qkv_width;
    size_t floats = (size_t)(m * (C + C + C + qkv_width + attended + C + 2 * F + F + 2 * widest)) +
                    (size_t)threads * (size_t)(max_length + hd_most);
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch) return -1;
    struct workspace w;
    float *state = scratch;
    w.residual = state + m * C;
    w.normed = w.residual + m * C;
    w.qkv = w.normed + m * C;
    w.attended = w.qkv + m * qkv_width;
    w.sub = w.attended + m * attended;
    w.gate_up = w.sub + m * C;
    w.hidden = w.gate_up + m * 2 * F;
    w.int4_scratch = w.hidden + m * F;
    w.per_thread = w.int4_scratch + m * 2 * widest;

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for
        for (int64_t i = 0; i < m * C; i++) state[i] = value_at(x, i, bf16);
        for (int64_t l = 0; l < n_layers; l++)
            layer_body(layers + l, state, m, cos, sin, (char *)keys + l * layer_stride * size,
                       (char *)values + l * layer_stride * size, row_stride, max_length, positions, &w);
        #pragma omp for
        for (int64_t i = 0; i < m * C; i++) store(out, i, state[i], bf16);
    }
    free(scratch);
    return 0;
}
