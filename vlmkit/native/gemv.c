/* One-row matrix-vector products for vlmkit's CPU decode step (vlmkit/native/__init__.py).
 *
 * y[o] = scale[o] * sum_i W[o, i] * x[i] + bias[o],  o in [0, out),  W row-major (out, in).
 *
 * Each output row is a dot product over contiguous memory, so the weights stream from memory
 * front to back; x (a few KB) stays in L1. Four rows are done at a time against one load of x,
 * with two accumulators per row to hide the FMA latency. Rows are split across OpenMP threads in
 * contiguous blocks. W is float32 (gemv_f32), int8 with one float32 scale per group of inputs
 * (gemv_i8: the int8 values are widened to float32 in registers; x stays float32) or 4-bit with
 * IEEE float16 scales and minimums (gemv_q4, below; uint16_t bits widened per group).
 * Compiled on first use with the system C compiler (-O3 -march=native); no Python headers.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

int vlmkit_gemv_abi(void) { return 11; }

/* IEEE float16 bits -> float32: the F16C instruction where the CPU has it, else by hand. */
#if defined(__F16C__)
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    float f = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), e - 25);
    return (h & 0x8000) ? -f : f;
}
#endif

const char *vlmkit_gemv_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float VSUM8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---------------------------------------------------------------- float32 weights */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VSET1(a) _mm512_set1_ps(a)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUM(a) _mm512_reduce_add_ps(a)
#define VLOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VSET1(a) _mm256_set1_ps(a)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUM(a) VSUM8(a)
#define VLOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif

#ifdef LANES
/* Four rows w[0..3] (each n long, stride n) against x: y[0..3]. */
#define DOT4_BODY(LOADW)                                                                   \
    vec a0 = VZERO(), a1 = VZERO(), a2 = VZERO(), a3 = VZERO();                            \
    vec b0 = VZERO(), b1 = VZERO(), b2 = VZERO(), b3 = VZERO();                            \
    int i = 0;                                                                             \
    for (; i + 2 * LANES <= n; i += 2 * LANES) {                                           \
        vec x0 = VLOAD(x + i), x1 = VLOAD(x + i + LANES);                                  \
        a0 = VFMA(LOADW(w0 + i), x0, a0); b0 = VFMA(LOADW(w0 + i + LANES), x1, b0);        \
        a1 = VFMA(LOADW(w1 + i), x0, a1); b1 = VFMA(LOADW(w1 + i + LANES), x1, b1);        \
        a2 = VFMA(LOADW(w2 + i), x0, a2); b2 = VFMA(LOADW(w2 + i + LANES), x1, b2);        \
        a3 = VFMA(LOADW(w3 + i), x0, a3); b3 = VFMA(LOADW(w3 + i + LANES), x1, b3);        \
    }                                                                                      \
    for (; i + LANES <= n; i += LANES) {                                                   \
        vec x0 = VLOAD(x + i);                                                             \
        a0 = VFMA(LOADW(w0 + i), x0, a0); a1 = VFMA(LOADW(w1 + i), x0, a1);                \
        a2 = VFMA(LOADW(w2 + i), x0, a2); a3 = VFMA(LOADW(w3 + i), x0, a3);                \
    }                                                                                      \
    float s0 = VSUM(VADD(a0, b0)), s1 = VSUM(VADD(a1, b1));                                \
    float s2 = VSUM(VADD(a2, b2)), s3 = VSUM(VADD(a3, b3));                                \
    for (; i < n; i++) {                                                                   \
        s0 += (float)w0[i] * x[i]; s1 += (float)w1[i] * x[i];                              \
        s2 += (float)w2[i] * x[i]; s3 += (float)w3[i] * x[i];                              \
    }                                                                                      \
    y[0] = s0; y[1] = s1; y[2] = s2; y[3] = s3;
#else
#define DOT4_BODY(LOADW)                                                                   \
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                          \
    for (int i = 0; i < n; i++) {                                                          \
        s0 += (float)w0[i] * x[i]; s1 += (float)w1[i] * x[i];                              \
        s2 += (float)w2[i] * x[i]; s3 += (float)w3[i] * x[i];                              \
    }                                                                                      \
    y[0] = s0; y[1] = s1; y[2] = s2; y[3] = s3;
#endif

static inline void dot4_f32(const float *restrict w0, const float *restrict x, int n, float *restrict y) {
    const float *w1 = w0 + n, *w2 = w0 + 2 * (size_t)n, *w3 = w0 + 3 * (size_t)n;
    DOT4_BODY(VLOAD)
}

/* One dot product over a contiguous row, vectorized with four accumulators (a plain float loop
 * cannot be: its sum order is fixed). The int8 product runs one row at a time: one sequential
 * stream per thread, measured ~20% faster in the decode step than four interleaved int8 rows. */
#ifdef LANES
#define DOT1_BODY(LOADW)                                                                   \
    vec a = VZERO(), b = VZERO(), c = VZERO(), e = VZERO();                                \
    for (; i + 4 * LANES <= n; i += 4 * LANES) {                                           \
        a = VFMA(LOADW(w + i), VLOAD(x + i), a);                                           \
        b = VFMA(LOADW(w + i + LANES), VLOAD(x + i + LANES), b);                           \
        c = VFMA(LOADW(w + i + 2 * LANES), VLOAD(x + i + 2 * LANES), c);                   \
        e = VFMA(LOADW(w + i + 3 * LANES), VLOAD(x + i + 3 * LANES), e);                   \
    }                                                                                      \
    for (; i + LANES <= n; i += LANES) a = VFMA(LOADW(w + i), VLOAD(x + i), a);            \
    s = VSUM(VADD(VADD(a, b), VADD(c, e)));
#else
#define DOT1_BODY(LOADW)
#endif

static inline float dot1_f32(const float *restrict w, const float *restrict x, int n) {
    int i = 0;
    float s = 0.f;
    DOT1_BODY(VLOAD)
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static inline float dot1_i8(const int8_t *restrict w, const float *restrict x, int n) {
    int i = 0;
    float s = 0.f;
    DOT1_BODY(VLOAD_I8)
    for (; i < n; i++) s += (float)w[i] * x[i];
    return s;
}

/* Where the software prefetches of weights (read once per step) put them: __builtin_prefetch's
 * locality 2 (prefetcht1: into L2, not L1), so L1 keeps the activations the products reuse.
 * Paired A/B in one process against prefetchnta (locality 0) on an AMD EPYC Zen 4: 8-row fp32
 * decode 1.33x (8 of 8 pairs), w8 1.06x (12 of 12), w4 1.02x (7 of 12); into every level
 * (locality 3) was measured no better than prefetchnta. */
#ifndef PF_LOCALITY
#define PF_LOCALITY 2
#endif
/* Rows ahead that the one-row quantized products prefetch, and the prefetch itself: every cache
 * line of a bytes at p and of b bytes at q. w8 decode 1.17x, w4 1.04x on an AMD EPYC (paired A/B,
 * with prefetchnta then). The float32 one-row product has none: prefetcht1 of the row 2 ahead made
 * fp32 decode 0.88x (0 of 12 pairs). */
#define ROWS_AHEAD 4
static inline void prefetch_rows(const void *p, size_t a, const void *q, size_t b) {
    for (size_t k = 0; k < a; k += 64) __builtin_prefetch((const char *)p + k, 0, PF_LOCALITY);
    for (size_t k = 0; k < b; k += 64) __builtin_prefetch((const char *)q + k, 0, PF_LOCALITY);
}

/* Called inside an OpenMP parallel region: this thread's share [lo, hi) of out rows, in whole
 * units of `unit` rows (4: the four-row kernels, whose caller does the out % 4 tail rows; 1: one
 * row at a time). Without OpenMP the one thread takes them all. */
static inline void my_rows(int out, int unit, int *lo, int *hi) {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int units = out / unit, per = units / nt, extra = units % nt;
    int first = t * per + (t < extra ? t : extra);
    *lo = unit * first;
    *hi = unit * (first + per + (t < extra ? 1 : 0));
}

/* Float32 one-row product: in the vector builds each thread reads its share of rows as two
 * sequential streams (its first and second half, a row of each per pass, each row summed as
 * dot1_f32 sums it), with only the hardware prefetcher. Paired A/B in one process on an AMD EPYC
 * Zen 4: one stream per thread against four rows per pass with the non-temporal prefetch of the
 * next four, decode 1.19x and 1.36x (also faster on Zen 3, AVX2: 1.06-1.09x; alike on Zen 5,
 * 1.03-1.05x); two streams against one, 1.025-1.03x where the machine read ~35 GB/s and 1.095x
 * where it read ~54 (12 of 12 pairs); four streams against two, 1.01x. The portable build takes
 * four rows per pass (four independent sums). */
#ifdef LANES
static inline void dot1x2_f32(const float *restrict w, const float *restrict v, const float *restrict x, int n,
                              float *restrict yw, float *restrict yv) {
    vec a = VZERO(), b = VZERO(), c = VZERO(), e = VZERO();
    vec a2 = VZERO(), b2 = VZERO(), c2 = VZERO(), e2 = VZERO();
    int i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        vec x0 = VLOAD(x + i), x1 = VLOAD(x + i + LANES), x2 = VLOAD(x + i + 2 * LANES), x3 = VLOAD(x + i + 3 * LANES);
        a = VFMA(VLOAD(w + i), x0, a); a2 = VFMA(VLOAD(v + i), x0, a2);
        b = VFMA(VLOAD(w + i + LANES), x1, b); b2 = VFMA(VLOAD(v + i + LANES), x1, b2);
        c = VFMA(VLOAD(w + i + 2 * LANES), x2, c); c2 = VFMA(VLOAD(v + i + 2 * LANES), x2, c2);
        e = VFMA(VLOAD(w + i + 3 * LANES), x3, e); e2 = VFMA(VLOAD(v + i + 3 * LANES), x3, e2);
    }
    for (; i + LANES <= n; i += LANES) {
        vec xi = VLOAD(x + i);
        a = VFMA(VLOAD(w + i), xi, a); a2 = VFMA(VLOAD(v + i), xi, a2);
    }
    float s = VSUM(VADD(VADD(a, b), VADD(c, e))), t = VSUM(VADD(VADD(a2, b2), VADD(c2, e2)));
    for (; i < n; i++) { s += w[i] * x[i]; t += v[i] * x[i]; }
    *yw = s; *yv = t;
}
#endif

void vlmkit_gemv_f32(const float *restrict W, const float *restrict x, const float *restrict bias,
                     float *restrict y, int out, int in, int nthreads) {
#ifdef LANES
#pragma omp parallel num_threads(nthreads)
    {
        int lo, hi;
        my_rows(out, 1, &lo, &hi);
        int half = (hi - lo) / 2, mid = lo + half;
        for (int k = 0; k < half; k++)
            dot1x2_f32(W + (size_t)(lo + k) * in, W + (size_t)(mid + k) * in, x, in, y + lo + k, y + mid + k);
        for (int o = mid + half; o < hi; o++) y[o] = dot1_f32(W + (size_t)o * in, x, in);
    }
#else
#pragma omp parallel num_threads(nthreads)
    {
        int lo, hi;
        my_rows(out, 4, &lo, &hi);
        for (int o = lo; o < hi; o += 4) dot4_f32(W + (size_t)o * in, x, in, y + o);
    }
    for (int o = out / 4 * 4; o < out; o++) y[o] = dot1_f32(W + (size_t)o * in, x, in);
#endif
    if (bias)
        for (int o = 0; o < out; o++) y[o] += bias[o];
}

/* One int8 row against x with one scale per group of `group` inputs (a multiple of 32 dividing n,
 * checked by the caller). always_inline, so the caller's constant group (32) unrolls the inner
 * loop: with group as a run-time value the AVX2 build computed 6.4 Gw/s a core (AMD EPYC, in L2),
 * with 32 as a constant 15.8, so 2 threads were compute-bound below the memory bandwidth. */
static inline __attribute__((always_inline)) float i8_groups(const int8_t *restrict w, const float *restrict sc,
                                                             const float *restrict x, int n, const int group) {
    int groups = n / group, k = 0;
#ifdef LANES
    /* each group's partial sums (a + b) times its scale go into one of four totals in turn: one
     * running total would make every group wait for the previous group's FMA */
#define I8_GROUP(k, t)                                                                     \
    {                                                                                      \
        const int8_t *wg = w + (size_t)(k) * group;                                        \
        const float *xg = x + (size_t)(k) * group;                                         \
        vec a = VZERO(), b = VZERO();                                                      \
        for (int i = 0; i < group; i += 2 * LANES) {                                       \
            a = VFMA(VLOAD_I8(wg + i), VLOAD(xg + i), a);                                  \
            b = VFMA(VLOAD_I8(wg + i + LANES), VLOAD(xg + i + LANES), b);                  \
        }                                                                                  \
        t = VFMA(VADD(a, b), VSET1(sc[k]), t);                                             \
    }
    vec t0 = VZERO(), t1 = VZERO(), t2 = VZERO(), t3 = VZERO();
    for (; k + 4 <= groups; k += 4) {
        I8_GROUP(k, t0) I8_GROUP(k + 1, t1) I8_GROUP(k + 2, t2) I8_GROUP(k + 3, t3)
    }
    for (; k < groups; k++) I8_GROUP(k, t0)
#undef I8_GROUP
    return VSUM(VADD(VADD(t0, t1), VADD(t2, t3)));
#else
    float total = 0.f;
    for (; k < groups; k++) {
        float s = 0.f;
        for (int i = k * group; i < (k + 1) * group; i++) s += (float)w[i] * x[i];
        total += s * sc[k];
    }
    return total;
#endif
}

/* One int8 row with one scale per group: group == n (one scale for the row, any n) or a multiple
 * of 32 dividing n (checked by the caller); 32 runs as a constant (see i8_groups). */
static inline float dot1_i8g(const int8_t *restrict w, const float *restrict sc, const float *restrict x, int n,
                             int group) {
    if (group == n) return dot1_i8(w, x, n) * sc[0];
    return group == 32 ? i8_groups(w, sc, x, n, 32) : i8_groups(w, sc, x, n, group);
}

static inline int i8_group_ok(int in, int group) { return group == in || (group > 0 && group % 32 == 0 && in % group == 0); }

/* y[o] of the int8 product, prefetching the row ROWS_AHEAD further on while it is before end. */
static inline void i8_row(const int8_t *restrict W, const float *restrict scale, const float *restrict x,
                          const float *restrict bias, float *restrict y, int o, int end, int in, int group) {
    int groups = in / group;
    if (o + ROWS_AHEAD < end) prefetch_rows(W + (size_t)(o + ROWS_AHEAD) * in, in, scale + (size_t)(o + ROWS_AHEAD) * groups, groups * 4);
    y[o] = dot1_i8g(W + (size_t)o * in, scale + (size_t)o * groups, x, in, group) + (bias ? bias[o] : 0.f);
}

/* scale: (out, in / group) float32. Returns 0, or -1 for a group size it does not take. Each
 * thread reads its rows as two streams, its two halves a row of each in turn, as the float32
 * product does (w8 decode 1.06x and 1.04x, 12 of 12 pairs each, on an AMD EPYC Zen 4). */
int vlmkit_gemv_i8(const int8_t *restrict W, const float *restrict scale, const float *restrict x,
                   const float *restrict bias, float *restrict y, int out, int in, int group, int nthreads) {
    if (!i8_group_ok(in, group)) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        int lo, hi;
        my_rows(out, 1, &lo, &hi);
        int half = (hi - lo) / 2, mid = lo + half;
        for (int k = 0; k < half; k++) {
            i8_row(W, scale, x, bias, y, lo + k, mid, in, group);
            i8_row(W, scale, x, bias, y, mid + k, hi, in, group);
        }
        if ((hi - lo) % 2) i8_row(W, scale, x, bias, y, hi - 1, hi, in, group);
    }
    return 0;
}

/* ---------------------------------------------------------------- 4-bit weights
 * W[o, i] ~ q[o, i] * scale[o, g] + lo[o, g], q in 0..15, g = i / group (group a multiple of 32);
 * scale and lo are float16 bits.
 * q is packed per block of 32 inputs into 16 bytes: byte j holds q[j] (low nibble) and q[j + 16]
 * (high nibble). So y[o] = sum_g scale[o, g] * dot(q[o, g], x[g]) + sum_g lo[o, g] * xsum[g],
 * with xsum[g] the sum of x over group g (computed once per call).
 */
/* sum_g h[g] * x[g] over n float16 values h: F16C eight at a time where the CPU has it. */
static inline float dot_h16(const uint16_t *restrict h, const float *restrict x, int n) {
    float s = 0.f;
    int g = 0;
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= n; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + g))), _mm256_loadu_ps(x + g), acc);
    s = VSUM8(acc);
#endif
    for (; g < n; g++) s += h2f(h[g]) * x[g];
    return s;
}

#if defined(__AVX512F__)
/* One block of 32 inputs: sum_j q[j] * x[j] as 16 partial sums (low nibbles x[0..15], high x[16..31]). */
static inline vec q4_block(const uint8_t *restrict p, const float *restrict x) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), _mm512_loadu_ps(x));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), _mm512_loadu_ps(x + 16), lo);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* One block of 32 inputs: sum_j q[j] * x[j] as 8 partial sums (bytes 0..7 and 8..15 in two halves). */
static inline vec q4_block(const uint8_t *restrict p, const float *restrict x) {
    __m256i m = _mm256_set1_epi32(15);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, m)), _mm256_loadu_ps(x));
    __m256 c = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, m)), _mm256_loadu_ps(x + 8));
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_loadu_ps(x + 16), a);
    c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), _mm256_loadu_ps(x + 24), c);
    return _mm256_add_ps(a, c);
}
#endif

#ifdef LANES
/* The float values of 8 float16 scales: F16C at once where the CPU has it. */
static inline void h2f8(const uint16_t *restrict h, float *restrict out) {
#if defined(__F16C__)
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
#else
    for (int j = 0; j < 8; j++) out[j] = h2f(h[j]);
#endif
}

/* One 4-bit row: each group's blocks (q4_block, per ISA above) times its scale go into one of
 * four totals in turn (one running total would make every group wait for the previous FMA);
 * the minimums add lo . xsum. Scales are widened eight at a time. always_inline, so the caller's
 * constant group (32) leaves one block per group and no inner loop (as i8_groups). */
#define Q4_GROUP(g, t, s)                                                                  \
    {                                                                                      \
        const uint8_t *pg = p + (size_t)(g) * blocks * 16;                                 \
        const float *xg = x + (size_t)(g) * group;                                         \
        vec v = q4_block(pg, xg);                                                          \
        for (int k = 1; k < blocks; k++) v = VADD(v, q4_block(pg + (size_t)k * 16, xg + k * 32)); \
        t = VFMA(v, VSET1(s), t);                                                          \
    }
static inline __attribute__((always_inline)) float q4_groups(const uint8_t *restrict p, const uint16_t *restrict sc,
                                                             const uint16_t *restrict lo, const float *restrict x,
                                                             const float *restrict xsum, int in, const int group) {
    int groups = in / group, blocks = group / 32, g = 0;
    vec t0 = VZERO(), t1 = VZERO(), t2 = VZERO(), t3 = VZERO();
    float s[8];
    for (; g + 8 <= groups; g += 8) {
        h2f8(sc + g, s);
        Q4_GROUP(g, t0, s[0]) Q4_GROUP(g + 1, t1, s[1]) Q4_GROUP(g + 2, t2, s[2]) Q4_GROUP(g + 3, t3, s[3])
        Q4_GROUP(g + 4, t0, s[4]) Q4_GROUP(g + 5, t1, s[5]) Q4_GROUP(g + 6, t2, s[6]) Q4_GROUP(g + 7, t3, s[7])
    }
    for (; g < groups; g++) Q4_GROUP(g, t0, h2f(sc[g]))
    return VSUM(VADD(VADD(t0, t1), VADD(t2, t3))) + dot_h16(lo, xsum, groups);
}
#undef Q4_GROUP
static inline float q4_row(const uint8_t *restrict p, const uint16_t *restrict sc, const uint16_t *restrict lo,
                           const float *restrict x, const float *restrict xsum, int in, int group) {
    return group == 32 ? q4_groups(p, sc, lo, x, xsum, in, 32) : q4_groups(p, sc, lo, x, xsum, in, group);
}
#else
static inline float q4_row(const uint8_t *restrict p, const uint16_t *restrict sc, const uint16_t *restrict lo,
                           const float *restrict x, const float *restrict xsum, int in, int group) {
    float total = 0.f;
    for (int g = 0; g < in / group; g++) {
        float s = 0.f;
        for (int i = g * group; i < (g + 1) * group; i += 32) {
            const uint8_t *b = p + (size_t)(i / 32) * 16;
            for (int j = 0; j < 16; j++) s += (float)(b[j] & 15) * x[i + j] + (float)(b[j] >> 4) * x[i + 16 + j];
        }
        total += h2f(sc[g]) * s;
    }
    return total + dot_h16(lo, xsum, in / group);
}
#endif

/* xsum: caller-provided scratch of in / group floats. Returns 0, or -1 for a bad shape. */
int vlmkit_gemv_q4(const uint8_t *restrict Q, const uint16_t *restrict scale, const uint16_t *restrict lo,
                   const float *restrict x, const float *restrict bias, float *restrict xsum, float *restrict y,
                   int out, int in, int group, int nthreads) {
    if (group <= 0 || group % 32 || in % group) return -1;
    int groups = in / group;
    for (int g = 0; g < groups; g++) {
        float s = 0.f;
        for (int i = g * group; i < (g + 1) * group; i++) s += x[i];
        xsum[g] = s;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int first, last;
        my_rows(out, 1, &first, &last);
        for (int o = first; o < last; o++) {
            if (o + ROWS_AHEAD < last) {
                size_t a = (size_t)(o + ROWS_AHEAD);
                prefetch_rows(Q + a * (in / 2), in / 2, scale + a * groups, groups * 2);
                prefetch_rows(lo + a * groups, groups * 2, NULL, 0);
            }
            y[o] = q4_row(Q + (size_t)o * (in / 2), scale + (size_t)o * groups, lo + (size_t)o * groups, x, xsum, in, group);
        }
    }
    if (bias)
        for (int o = 0; o < out; o++) y[o] += bias[o];
    return 0;
}
#include "llama_step.c"
