/* One decode step of a Llama decoder (B = 1, T = 1) in one call: vlmkit/components/llama_fused.py.
 *
 * For each layer: h += o_proj(attn(rope(qkv_proj(rmsnorm(h))))) then
 * h += down_proj(silu(gate) * up), gate|up = gate_up_proj(rmsnorm(h)); the new key/value are
 * written into the KV cache at position pos and attention runs over positions 0..pos.
 * This file is #included by gemv.c (one library); it uses that file's one-row kernels.
 * Rounding follows torch's decode path: RMSNorm as x * rsqrt(mean(x^2) + eps) * w, RoPE as two
 * rounded products then a sum (compiled with -ffp-contract=off), softmax in float32.
 */
#include <math.h>

typedef struct {
    int kind;  /* 0 float32 rows (out, in); 1 float32 stored (in, out); 2 int8 rows + scale; 3 4-bit */
    int out, in, group;
    const void *w;
    const float *scale, *lo, *bias;
} vk_mat;

typedef struct {
    vk_mat qkv, o, gate_up, down;
    const float *norm1, *norm2;
} vk_layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, act; /* act: 0 silu */
    float eps;
} vk_dims;

/* y = W x for a (out, in) matrix stored (in, out): y[o] = sum_i Wt[i, o] x[i]. */
static void gemv_t_f32(const float *restrict Wt, const float *restrict x, const float *restrict bias,
                       float *restrict y, int out, int in, int nthreads) {
    int chunk = 256;
    int blocks = (out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int lo = b * chunk, hi = lo + chunk < out ? lo + chunk : out;
        for (int o = lo; o < hi; o++) y[o] = 0.f;
        for (int i = 0; i < in; i++) {
            const float *row = Wt + (size_t)i * out;
            float xi = x[i];
            for (int o = lo; o < hi; o++) y[o] += row[o] * xi;
        }
    }
    if (bias)
        for (int o = 0; o < out; o++) y[o] += bias[o];
}

static int mat_vec(const vk_mat *m, const float *x, float *y, float *scratch, int nthreads) {
    switch (m->kind) {
    case 0: vlmkit_gemv_f32((const float *)m->w, x, m->bias, y, m->out, m->in, nthreads); return 0;
    case 1: gemv_t_f32((const float *)m->w, x, m->bias, y, m->out, m->in, nthreads); return 0;
    case 2: vlmkit_gemv_i8((const int8_t *)m->w, m->scale, x, m->bias, y, m->out, m->in, nthreads); return 0;
    case 3: return vlmkit_gemv_q4((const uint8_t *)m->w, m->scale, m->lo, x, m->bias, scratch, y, m->out, m->in, m->group, nthreads);
    default: return -1;
    }
}

static void rms_norm(const float *restrict x, const float *restrict w, float eps, int n, float *restrict out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* x * cos + roll(x, d/2) * signed_sin over one head of d values, in place. */
static void rope(float *restrict x, const float *restrict cos, const float *restrict sin, int d) {
    int half = d / 2;
    for (int j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        float ca = a * cos[j], sb = b * sin[j];
        float cb = b * cos[j + half], sa = a * sin[j + half];
        x[j] = ca + sb;
        x[j + half] = cb + sa;
    }
}

/* q (H, d) against the cache of one layer: K, V (H_kv, cap, d), positions 0..len-1 -> out (H, d). */
static void attend(const float *restrict q, const float *restrict K, const float *restrict V, int H, int H_kv,
                   int d, int cap, int len, float *restrict scores, float *restrict out, int nthreads) {
    int rep = H / H_kv;
    float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * d;
        const float *Kh = K + (size_t)(h / rep) * cap * d, *Vh = V + (size_t)(h / rep) * cap * d;
        float *s = scores + (size_t)h * len, *oh = out + (size_t)h * d;
        float mx = -INFINITY;
        for (int t = 0; t < len; t++) {
            const float *k = Kh + (size_t)t * d;
            float dot = 0.f;
            for (int j = 0; j < d; j++) dot += qh[j] * k[j];
            s[t] = dot * scale;
            if (s[t] > mx) mx = s[t];
        }
        float sum = 0.f;
        for (int t = 0; t < len; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        for (int j = 0; j < d; j++) oh[j] = 0.f;
        for (int t = 0; t < len; t++) {
            const float *v = Vh + (size_t)t * d;
            float p = s[t] / sum;
            for (int j = 0; j < d; j++) oh[j] += p * v[j];
        }
    }
}

/* Scratch floats vlmkit_llama_step needs for a cache of capacity cap. */
long vlmkit_llama_scratch(const vk_dims *dm, int cap) {
    long H = dm->heads, Hk = dm->kv_heads, d = dm->head_dim, widest = dm->hidden;
    if (H * d > widest) widest = H * d;
    if (dm->inter > widest) widest = dm->inter;
    /* normed, qkv, attention out, scores, gate|up, act, tmp, per-group sums of the 4-bit kernel */
    return dm->hidden + (H + 2 * Hk) * d + H * d + H * (long)cap + 3L * dm->inter + dm->hidden + widest / 32 + 1;
}

/* h (hidden,) in place through every layer. keys/values: (layers, 1, H_kv, cap, d) float32.
 * Returns 0, or -1 for a matrix it cannot run. */
int vlmkit_llama_step(const vk_dims *dm, const vk_layer *L, float *restrict h, const float *restrict cos,
                      const float *restrict sin, float *keys, float *values, int cap, int pos, float *scratch,
                      int nthreads) {
    int D = dm->hidden, H = dm->heads, Hk = dm->kv_heads, d = dm->head_dim, I = dm->inter;
    float *normed = scratch, *qkv = normed + D, *att = qkv + (H + 2 * Hk) * d, *scores = att + H * d;
    float *gu = scores + (size_t)H * (pos + 1), *act = gu + 2 * I, *tmp = act + I, *small = tmp + D;
    size_t layer_kv = (size_t)Hk * cap * d;
    for (int l = 0; l < dm->layers; l++) {
        const vk_layer *ly = L + l;
        rms_norm(h, ly->norm1, dm->eps, D, normed);
        if (mat_vec(&ly->qkv, normed, qkv, small, nthreads)) return -1;
        for (int hh = 0; hh < H + Hk; hh++) rope(qkv + (size_t)hh * d, cos, sin, d);
        float *K = keys + l * layer_kv, *V = values + l * layer_kv;
        for (int hh = 0; hh < Hk; hh++) {
            float *kd = K + (size_t)hh * cap * d + (size_t)pos * d, *vd = V + (size_t)hh * cap * d + (size_t)pos * d;
            const float *ks = qkv + (size_t)(H + hh) * d, *vs = qkv + (size_t)(H + Hk + hh) * d;
            for (int j = 0; j < d; j++) { kd[j] = ks[j]; vd[j] = vs[j]; }
        }
        attend(qkv, K, V, H, Hk, d, cap, pos + 1, scores, att, nthreads);
        if (mat_vec(&ly->o, att, tmp, small, nthreads)) return -1;
        for (int i = 0; i < D; i++) h[i] = h[i] + tmp[i];
        rms_norm(h, ly->norm2, dm->eps, D, normed);
        if (mat_vec(&ly->gate_up, normed, gu, small, nthreads)) return -1;
        for (int i = 0; i < I; i++) {
            float g = gu[i];
            act[i] = (g / (1.0f + expf(-g))) * gu[I + i];
        }
        if (mat_vec(&ly->down, act, tmp, small, nthreads)) return -1;
        for (int i = 0; i < D; i++) h[i] = h[i] + tmp[i];
    }
    return 0;
}
