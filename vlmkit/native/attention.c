/* Attention over the KV cache for the decode step: vlmkit/native/llama_step.c #includes this file
 * (after gemv.c's one-row kernels and its dot_block), so it is part of the same library. */

#ifdef LANES
#if LANES == 16
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VROUND(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VNEG_ABS(a) _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000u)))
#define VIF_NEG(x, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), b, a)
#else
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VROUND(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VNEG_ABS(a) _mm256_or_ps(a, _mm256_set1_ps(-0.0f))
#define VIF_NEG(x, a, b) _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ))
#endif

/* e^x lane by lane for x <= 0 (a score minus the max): x = n ln2 + r with n = round(x / ln2) and
 * |r| <= ln2 / 2 (ln2 in two parts, so r is exact to float32), e^r by its Taylor series to r^7
 * (truncated at under 6e-9 relative, a tenth of float32's spacing), times 2^n built in the
 * exponent bits. x below -87 is taken as -87 (e^-87 ~ 1.6e-38, not 0: beside the max's 1 it
 * leaves the sum unchanged); NaN stays NaN (VMAX returns its second operand for a NaN). */
static inline vec vexp_neg(vec x) {
    x = VMAX(VSET1(-87.0f), x);
    vec n = VROUND(VMUL(x, VSET1(1.44269504088896341f)));
    vec r = VFMA(n, VSET1(-0.693145751953125f), x);
    r = VFMA(n, VSET1(-1.42860682030941723e-6f), r);
    vec p = VFMA(VSET1(1.f / 5040.f), r, VSET1(1.f / 720.f));
    p = VFMA(p, r, VSET1(1.f / 120.f));
    p = VFMA(p, r, VSET1(1.f / 24.f));
    p = VFMA(p, r, VSET1(1.f / 6.f));
    p = VFMA(p, r, VSET1(0.5f));
    p = VFMA(p, r, VSET1(1.f));
    p = VFMA(p, r, VSET1(1.f));
    return VMUL(p, VPOW2(n));
}

/* s[0..n) *= scale in place; returns their max (NaN scores are skipped as in the scalar loop, or
 * carried: either way the head's output is NaN). */
static float scale_and_max(float *restrict s, int n, float scale) {
    vec m = VSET1(-INFINITY), sc = VSET1(scale);
    int t = 0;
    for (; t + LANES <= n; t += LANES) {
        vec v = VMUL(VLOAD(s + t), sc);
        VSTORE(s + t, v);
        m = VMAX(m, v);
    }
    float lanes[LANES], mx = -INFINITY;
    VSTORE(lanes, m);
    for (int k = 0; k < LANES; k++) mx = lanes[k] > mx ? lanes[k] : mx;
    for (; t < n; t++) {
        s[t] *= scale;
        if (s[t] > mx) mx = s[t];
    }
    return mx;
}

/* s[t] = e^(s[t] - mx) in place (vexp_neg, expf for the tail); returns their sum. */
static float exp_and_sum(float *restrict s, int n, float mx) {
    vec acc = VZERO(), m = VSET1(mx);
    int t = 0;
    for (; t + LANES <= n; t += LANES) {
        vec e = vexp_neg(VSUB(VLOAD(s + t), m));
        VSTORE(s + t, e);
        acc = VADD(acc, e);
    }
    float sum = VSUM(acc);
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}
#else
static float scale_and_max(float *restrict s, int n, float scale) {
    float mx = -INFINITY;
    for (int t = 0; t < n; t++) {
        s[t] *= scale;
        if (s[t] > mx) mx = s[t];
    }
    return mx;
}

static float exp_and_sum(float *restrict s, int n, float mx) {
    float sum = 0.f;
    for (int t = 0; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}
#endif

#ifdef LANES
/* oh (d) = sum_t p[t] V[t] over len value rows (stride d), d = NV * LANES: NV accumulators held in
 * registers for the whole pass (NV is a constant at every call, as in dot_block). */
static inline __attribute__((always_inline)) void weigh_values(const int NV, const float *restrict p,
                                                               const float *restrict V, int len, int d,
                                                               float *restrict oh) {
    vec acc[8];
    for (int k = 0; k < NV; k++) acc[k] = VZERO();
    for (int t = 0; t < len; t++) {
        vec pt = VSET1(p[t]);
        const float *v = V + (size_t)t * d;
        for (int k = 0; k < NV; k++) acc[k] = VFMA(pt, VLOAD(v + k * LANES), acc[k]);
    }
    for (int k = 0; k < NV; k++) VSTORE(oh + k * LANES, acc[k]);
}

/* weigh_values for this head size, or 0 when it is not 1..8 vectors (the caller loops). */
static int weigh_values_d(const float *restrict p, const float *restrict V, int len, int d, float *restrict oh) {
    if (d % LANES) return 0;
    switch (d / LANES) {
    case 1: weigh_values(1, p, V, len, d, oh); return 1;
    case 2: weigh_values(2, p, V, len, d, oh); return 1;
    case 3: weigh_values(3, p, V, len, d, oh); return 1;
    case 4: weigh_values(4, p, V, len, d, oh); return 1;
    case 5: weigh_values(5, p, V, len, d, oh); return 1;
    case 6: weigh_values(6, p, V, len, d, oh); return 1;
    case 7: weigh_values(7, p, V, len, d, oh); return 1;
    case 8: weigh_values(8, p, V, len, d, oh); return 1;
    default: return 0;
    }
}
#endif

/* Scores of G query heads (q: G * d) against n key rows (K, stride d): s[g * lds + t] = q_g . K[t].
 * Where there are vector kernels, SCORE_ROWS key rows per dot_block pass against all G heads (G <=
 * 8: each key load feeds G FMAs, so keys shared by a group of heads are read once), then one at a
 * time. AVX2 takes 2 rows (its 16 registers hold 2 x 3 sums; 4 x 3 spill: paired A/B in a C harness,
 * attention over 30 layers, 1.03-1.14x at 17 to 1,100 positions), AVX-512 4. */
#if defined(__AVX512F__)
#define SCORE_ROWS 4
#else
#define SCORE_ROWS 2
#endif
#define GROUP_SCORES(G)                                                                                    \
    for (; t + SCORE_ROWS <= n; t += SCORE_ROWS) dot_block(SCORE_ROWS, G, K + (size_t)t * d, q, d, s + t, lds, NULL)
static void scores_of(const float *restrict q, const float *restrict K, int G, int n, int d, float *restrict s,
                      int lds) {
    int t = 0;
#ifdef LANES
    switch (G) {
    case 1: GROUP_SCORES(1); break;
    case 2: GROUP_SCORES(2); break;
    case 3: GROUP_SCORES(3); break;
    case 4: GROUP_SCORES(4); break;
    case 5: GROUP_SCORES(5); break;
    case 6: GROUP_SCORES(6); break;
    case 7: GROUP_SCORES(7); break;
    case 8: GROUP_SCORES(8); break;
    default: break;
    }
#endif
    for (; t < n; t++)
        for (int g = 0; g < G; g++) s[(size_t)g * lds + t] = dot1_f32(q + (size_t)g * d, K + (size_t)t * d, d);
}
#undef GROUP_SCORES

/* Positions per attention chunk, at most: a cache of len positions splits into ceil(len / 256)
 * equal chunks, so a long cache gives every thread work and a chunk's keys and values stay in L2
 * while the query heads that share them read them. It depends on len only, never on the thread
 * count, so the sums are the same whatever the number of threads. */
#define ATT_CHUNK 256

/* G query heads (q: G * d) that share one key/value head against its positions in one chunk (K, V
 * at the chunk's first position, n rows of d): per head the scaled scores (into s, stride lds),
 * their max m, the sum l of exp(score - m) and o (d) = sum_t exp(score - m) V[t] (weigh_values where
 * d is a whole number of vectors), written as o, m, l (d + 2 floats) at part + g * stride. */
static void attend_chunk(const float *restrict q, const float *restrict K, const float *restrict V, int G, int d,
                         int n, float scale, float *restrict s, int lds, float *restrict part, size_t stride) {
    scores_of(q, K, G, n, d, s, lds);
    for (int g = 0; g < G; g++) {
        float *sg = s + (size_t)g * lds, *o = part + (size_t)g * stride;
        float mx = scale_and_max(sg, n, scale), sum = exp_and_sum(sg, n, mx);
        o[d] = mx;
        o[d + 1] = sum;
#ifdef LANES
        if (weigh_values_d(sg, V, n, d, o)) continue;
#endif
        for (int j = 0; j < d; j++) o[j] = 0.f;
        for (int t = 0; t < n; t++)
            for (int j = 0; j < d; j++) o[j] += sg[t] * V[(size_t)t * d + j];
    }
}

/* out (d): one query head's softmax-weighted values from its C chunk parts (o, m, l each, stride
 * d + 2): every o and l rescaled by exp(m - the largest m), summed, then o / l. */
static void merge_parts(const float *restrict part, int C, int d, float *restrict out) {
    float mx = -INFINITY, sum = 0.f;
    for (int c = 0; c < C; c++)
        if (part[(size_t)c * (d + 2) + d] > mx) mx = part[(size_t)c * (d + 2) + d];
    for (int j = 0; j < d; j++) out[j] = 0.f;
    for (int c = 0; c < C; c++) {
        const float *o = part + (size_t)c * (d + 2);
        float w = C == 1 ? 1.f : expf(o[d] - mx);
        sum += o[d + 1] * w;
        for (int j = 0; j < d; j++) out[j] += o[j] * w;
    }
    for (int j = 0; j < d; j++) out[j] /= sum;
}

/* q (B, H, d) against the cache of one layer: K, V (B, H_kv, cap, d), positions 0..len-1 ->
 * out (B, H, d). Work items: (row, key/value head, chunk) with the H / H_kv query heads of that
 * key/value head together, so each chunk of keys and values comes from memory once; or, when that
 * gives fewer than two items per thread (a short cache), one item per query head and chunk. Each
 * item leaves a part per head and chunk (attend_chunk), merged per head (merge_parts); the numbers
 * do not depend on how heads are grouped into items. scores: B * H * len floats; parts:
 * B * H * ceil(len / ATT_CHUNK) * (d + 2). */
static void attend(const float *restrict q, const float *restrict K, const float *restrict V, int B, int H, int H_kv,
                   int d, int cap, int len, float *restrict scores, float *restrict parts, float *restrict out,
                   int nthreads) {
    int rep = H / H_kv, C = (len + ATT_CHUNK - 1) / ATT_CHUNK, per = (len + C - 1) / C;
    int G = B * H_kv * C >= 2 * nthreads ? rep : 1, groups = rep / G;
    float scale = 1.0f / sqrtf((float)d);
    size_t stride = (size_t)C * (d + 2);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int item = 0; item < B * H_kv * groups * C; item++) {
        int k = item % groups, c = item / groups % C, bg = item / groups / C, b = bg / H_kv, g = bg % H_kv;
        int t0 = c * per, n = len - t0 < per ? len - t0 : per, bh = b * H + g * rep + k * G;
        size_t kv = ((size_t)b * H_kv + g) * cap * d + (size_t)t0 * d;
        attend_chunk(q + (size_t)bh * d, K + kv, V + kv, G, d, n, scale, scores + (size_t)bh * len + t0, len,
                     parts + (size_t)bh * stride + (size_t)c * (d + 2), stride);
        for (int h = bh; C == 1 && h < bh + G; h++) merge_parts(parts + (size_t)h * stride, 1, d, out + (size_t)h * d);
    }
    if (C == 1) return; /* each item wrote its heads' out */
#pragma omp parallel for num_threads(nthreads) if (B * H * C > 64) schedule(static)
    for (int bh = 0; bh < B * H; bh++) merge_parts(parts + (size_t)bh * stride, C, d, out + (size_t)bh * d);
}

/* y = e^x for n values x <= 0 as attention's softmax computes it (vexp_neg; expf where there are
 * no vector kernels), for the tests. */
void vlmkit_exp_neg(const float *restrict x, float *restrict y, int n) {
    int i = 0;
#ifdef LANES
    for (; i + LANES <= n; i += LANES) VSTORE(y + i, vexp_neg(VLOAD(x + i)));
#endif
    for (; i < n; i++) y[i] = expf(x[i]);
}
