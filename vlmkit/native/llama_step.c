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
    int kind;  /* 0 float32 rows (out, in); 1 float32 stored (in, out); 2 int8 rows + group scales; 3 4-bit */
    int out, in, group;
    const void *w;
    const void *scale, *lo; /* (out, in / group): float32 for int8, float16 bits for 4-bit */
    const float *bias;
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
    case 2: return vlmkit_gemv_i8((const int8_t *)m->w, (const float *)m->scale, x, m->bias, y, m->out, m->in, m->group, nthreads);
    case 3: return vlmkit_gemv_q4((const uint8_t *)m->w, (const uint16_t *)m->scale, (const uint16_t *)m->lo, x, m->bias, scratch, y, m->out, m->in, m->group, nthreads);
    default: return -1;
    }
}

/* Rows o..o+n-1 of m as float32 (n <= 4, stride in): a pointer into W for float32 rows, else
 * dequantized into buf (w = q * scale for int8, q * scale + lo for 4-bit, per group). */
static const float *rows_as_float(const vk_mat *m, int o, int n, float *restrict buf) {
    int in = m->in;
    if (m->kind == 0) return (const float *)m->w + (size_t)o * in;
    for (int r = 0; r < n; r++) {
        float *dst = buf + (size_t)r * in;
        if (m->kind == 2) {
            const int8_t *q = (const int8_t *)m->w + (size_t)(o + r) * in;
            const float *sc = (const float *)m->scale + (size_t)(o + r) * (in / m->group);
            for (int i = 0; i < in; i++) dst[i] = (float)q[i] * sc[i / m->group];
        } else {
            int groups = in / m->group;
            const uint8_t *q = (const uint8_t *)m->w + (size_t)(o + r) * (in / 2);
            const uint16_t *sc = (const uint16_t *)m->scale + (size_t)(o + r) * groups;
            const uint16_t *lo = (const uint16_t *)m->lo + (size_t)(o + r) * groups;
            for (int i = 0; i < in; i += 32) {
                float s = h2f(sc[i / m->group]), z = h2f(lo[i / m->group]);
                const uint8_t *b = q + i / 2;
                for (int j = 0; j < 16; j++) {
                    dst[i + j] = (float)(b[j] & 15) * s + z;
                    dst[i + 16 + j] = (float)(b[j] >> 4) * s + z;
                }
            }
        }
    }
    return buf;
}

/* Blocks of 4 rows ahead that a several-row product prefetches (2-16 measured alike: the 8-row
 * step 30-34 -> 22-26 ms on an AMD EPYC, where a burst of prefetches per block did nothing);
 * into L2 (PF_LOCALITY), as the one-row quantized products do. */
#define PREFETCH_BLOCKS 4
#ifdef LANES
/* R weight rows (stride n) against NB inputs (stride n): Y[b * ldy + r], R * NB accumulators, so
 * each weight load feeds NB FMAs and each input load R. R and NB are constants at every call
 * (R <= 4, NB <= 8), so the loops unroll and the accumulators live in registers. pf (or NULL):
 * R rows (stride n) to prefetch into L2, one cache line of each per 16 floats consumed,
 * so memory keeps streaming while the FMAs run. */
static inline __attribute__((always_inline)) void dot_block(const int R, const int NB, const float *restrict w0,
                                                            const float *restrict x0, int n, float *restrict Y,
                                                            int ldy, const float *pf) {
    vec a[4][8];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) a[r][b] = VZERO();
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        vec w[4], x[8];
        if (pf && (i & 15) == 0)
            for (int r = 0; r < R; r++) __builtin_prefetch(pf + (size_t)r * n + i, 0, PF_LOCALITY);
        for (int r = 0; r < R; r++) w[r] = VLOAD(w0 + (size_t)r * n + i);
        for (int b = 0; b < NB; b++) x[b] = VLOAD(x0 + (size_t)b * n + i);
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) a[r][b] = VFMA(w[r], x[b], a[r][b]);
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            float s = VSUM(a[r][b]);
            for (int k = i; k < n; k++) s += w0[(size_t)r * n + k] * x0[(size_t)b * n + k];
            Y[(size_t)b * ldy + r] = s;
        }
}

/* Four weight rows against four inputs: 16 accumulators (AVX2's 16 registers come close). */
static void dot4x4(const float *restrict w0, const float *restrict x0, int n, float *restrict Y, int ldy,
                   const float *pf) {
    dot_block(4, 4, w0, x0, n, Y, ldy, pf);
}
#endif

#if defined(LANES) && LANES == 16
/* Two weight rows against eight inputs, 16 accumulators (AVX-512's 32 registers hold them): one
 * pass over the weights serves all eight rows, where two dot4x4 passes leave memory idle during
 * the second. */
static void dot2x8(const float *restrict w0, const float *restrict x0, int n, float *restrict Y, int ldy,
                   const float *pf) {
    dot_block(2, 8, w0, x0, n, Y, ldy, pf);
}
#define HAVE_DOT2X8 1
#endif

/* Y (B, out) = X (B, in) W^T (+ bias): each block of 4 weight rows is read (and dequantized)
 * once and multiplied by all B rows of X while it sits in L1. Not for kind 1 (returns -1). */
static int mat_rows(const vk_mat *m, const float *restrict X, float *restrict Y, int B, int nthreads) {
    int out = m->out, in = m->in;
    if (m->kind == 1 || (m->kind == 3 && (m->group <= 0 || m->group % 32 || in % m->group))) return -1;
    if (m->kind == 2 && !i8_group_ok(in, m->group)) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        float buf[4 * (size_t)in];
        int lo, hi;
        my_rows(out, 4, &lo, &hi);
        for (int o = lo; o < hi; o += 4) {
            const float *w = rows_as_float(m, o, 4, buf);
            /* float32 rows: the block PREFETCH_BLOCKS ahead streams in while this one is multiplied */
            const float *pf = m->kind == 0 && o + 4 * PREFETCH_BLOCKS + 4 <= hi ? w + (size_t)4 * PREFETCH_BLOCKS * in : NULL;
            int b = 0;
#ifdef HAVE_DOT2X8
            for (; b + 8 <= B; b += 8, pf = NULL) {
                dot2x8(w, X + (size_t)b * in, in, Y + (size_t)b * out + o, out, pf);
                dot2x8(w + (size_t)2 * in, X + (size_t)b * in, in, Y + (size_t)b * out + o + 2, out, pf ? pf + (size_t)2 * in : NULL);
            }
#endif
#ifdef LANES
            for (; b + 4 <= B; b += 4, pf = NULL) dot4x4(w, X + (size_t)b * in, in, Y + (size_t)b * out + o, out, pf);
#endif
            for (; b < B; b++) dot4_f32(w, X + (size_t)b * in, in, Y + (size_t)b * out + o);
        }
    }
    float buf1[in];
    for (int o = out / 4 * 4; o < out; o++) {
        const float *w = rows_as_float(m, o, 1, buf1);
        for (int b = 0; b < B; b++) Y[(size_t)b * out + o] = dot1_f32(w, X + (size_t)b * in, in);
    }
    if (m->bias)
        for (int b = 0; b < B; b++)
            for (int o = 0; o < out; o++) Y[(size_t)b * out + o] += m->bias[o];
    return 0;
}

/* Y (R, out) = X (R, in) W^T (+ bias) for a float32 row-major W: a few rows (a batched decode
 * step's LM head) with the weights read once. */
void vlmkit_gemm_f32_rows(const float *W, const float *X, const float *bias, float *Y, int R, int out, int in,
                          int nthreads) {
    vk_mat m = {0, out, in, 0, W, 0, 0, bias};
    mat_rows(&m, X, Y, R, nthreads);
}

static int mat_op(const vk_mat *m, const float *X, float *Y, int B, float *small, int nthreads) {
    return B == 1 ? mat_vec(m, X, Y, small, nthreads) : mat_rows(m, X, Y, B, nthreads);
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

#include "attention.c"

/* a[i] = silu(g[i]) * u[i] for n values: silu(g) = g / (1 + e^-g), computed as g * e / (1 + e)
 * for g < 0 and g / (1 + e) otherwise with e = e^-|g| (vexp_neg: never overflows); expf for the
 * tail and in the portable build. */
static void silu_mul(const float *restrict g, const float *restrict u, float *restrict a, int n) {
    int i = 0;
#ifdef LANES
    for (; i + LANES <= n; i += LANES) {
        vec x = VLOAD(g + i), e = vexp_neg(VNEG_ABS(x)), one = VSET1(1.f);
        vec sig = VDIV(VIF_NEG(x, e, one), VADD(one, e));
        VSTORE(a + i, VMUL(VMUL(x, sig), VLOAD(u + i)));
    }
#endif
    for (; i < n; i++) a[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

void vlmkit_silu_mul(const float *restrict g, const float *restrict u, float *restrict a, int n) { silu_mul(g, u, a, n); }

/* Scratch floats vlmkit_llama_step needs for B rows and a cache of capacity cap. */
long vlmkit_llama_scratch(const vk_dims *dm, int cap, int B) {
    long H = dm->heads, Hk = dm->kv_heads, d = dm->head_dim, widest = dm->hidden;
    if (H * d > widest) widest = H * d;
    if (dm->inter > widest) widest = dm->inter;
    long chunks = ((long)cap + ATT_CHUNK - 1) / ATT_CHUNK;
    /* per row: normed, qkv, q, attention out, scores, attention parts, gate|up, act, tmp; then the
     * 4-bit kernel's sums */
    long row = dm->hidden + (H + 2 * Hk) * d + 2 * H * d + H * (long)cap + H * chunks * (d + 2) + 3L * dm->inter +
               dm->hidden;
    return B * row + widest / 32 + 1;
}

/* h (B, hidden) in place through every layer, all B rows at position pos (no padding).
 * keys/values: (layers, B, H_kv, cap, d) float32. Returns 0, -1 for a matrix it cannot run, -2 for
 * a bad size (pos outside the cache, scratch shorter than vlmkit_llama_scratch). */
int vlmkit_llama_step(const vk_dims *dm, const vk_layer *L, float *restrict h, const float *restrict cos,
                      const float *restrict sin, float *keys, float *values, int cap, int pos, int B,
                      float *scratch, long scratch_len, int nthreads) {
    int D = dm->hidden, H = dm->heads, Hk = dm->kv_heads, d = dm->head_dim, I = dm->inter;
    if (B < 1 || pos < 0 || pos >= cap || scratch_len < vlmkit_llama_scratch(dm, cap, B)) return -2;
    int W = (H + 2 * Hk) * d, len = pos + 1;
    float *normed = scratch, *qkv = normed + (size_t)B * D, *q = qkv + (size_t)B * W, *att = q + (size_t)B * H * d;
    size_t chunks = (size_t)(len + ATT_CHUNK - 1) / ATT_CHUNK;
    float *scores = att + (size_t)B * H * d, *parts = scores + (size_t)B * H * len;
    float *gu = parts + (size_t)B * H * chunks * (d + 2), *act = gu + (size_t)B * 2 * I;
    float *tmp = act + (size_t)B * I, *small = tmp + (size_t)B * D;
    size_t layer_kv = (size_t)B * Hk * cap * d;
    for (int l = 0; l < dm->layers; l++) {
        const vk_layer *ly = L + l;
#pragma omp parallel for num_threads(nthreads) if (B > 1) schedule(static)
        for (int b = 0; b < B; b++) rms_norm(h + (size_t)b * D, ly->norm1, dm->eps, D, normed + (size_t)b * D);
        if (mat_op(&ly->qkv, normed, qkv, B, small, nthreads)) return -1;
        float *K = keys + l * layer_kv, *V = values + l * layer_kv;
#pragma omp parallel for num_threads(nthreads) if (B > 1) schedule(static)
        for (int b = 0; b < B; b++) {
            float *row = qkv + (size_t)b * W;
            for (int hh = 0; hh < H + Hk; hh++) rope(row + (size_t)hh * d, cos, sin, d);
            for (int j = 0; j < H * d; j++) q[(size_t)b * H * d + j] = row[j];
            for (int hh = 0; hh < Hk; hh++) {
                size_t at = (((size_t)b * Hk + hh) * cap + pos) * d;
                const float *ks = row + (size_t)(H + hh) * d, *vs = row + (size_t)(H + Hk + hh) * d;
                for (int j = 0; j < d; j++) { K[at + j] = ks[j]; V[at + j] = vs[j]; }
            }
        }
        attend(q, K, V, B, H, Hk, d, cap, len, scores, parts, att, nthreads);
        if (mat_op(&ly->o, att, tmp, B, small, nthreads)) return -1;
        for (size_t i = 0; i < (size_t)B * D; i++) h[i] = h[i] + tmp[i];
#pragma omp parallel for num_threads(nthreads) if (B > 1) schedule(static)
        for (int b = 0; b < B; b++) rms_norm(h + (size_t)b * D, ly->norm2, dm->eps, D, normed + (size_t)b * D);
        if (mat_op(&ly->gate_up, normed, gu, B, small, nthreads)) return -1;
#pragma omp parallel for num_threads(nthreads) if (B > 1) schedule(static)
        for (int b = 0; b < B; b++) {
            const float *g = gu + (size_t)b * 2 * I;
            float *a = act + (size_t)b * I;
            silu_mul(g, g + I, a, I);
        }
        if (mat_op(&ly->down, act, tmp, B, small, nthreads)) return -1;
        for (size_t i = 0; i < (size_t)B * D; i++) h[i] = h[i] + tmp[i];
    }
    return 0;
}
