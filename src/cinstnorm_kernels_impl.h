/* Template body of the inner loops; included by cin_isa.h with CIN_T (element type), CIN_TS
 * (f or d), CIN_ISA (instruction-set suffix) and CIN_VEC_BYTES defined.  No include guard on
 * purpose.  Functions are named cin_<op>_<CIN_TS>_<CIN_ISA>. */

#define CIN_CAT3_(a, b, c) a##_##b##_##c
#define CIN_CAT3(a, b, c) CIN_CAT3_(a, b, c)
#define CIN_FN(op) CIN_CAT3(op, CIN_TS, CIN_ISA)
#define CIN_CAT2_(a, b) a##b
#define CIN_CAT2(a, b) CIN_CAT2_(a, b)
#define CIN_VLEN ((ptrdiff_t)(CIN_VEC_BYTES / sizeof(CIN_T)))
#if defined(CIN_STREAM_f)
#define CIN_STREAM CIN_CAT2(CIN_STREAM_, CIN_TS)
#endif
typedef CIN_T CIN_FN(cin_vec) __attribute__((vector_size(CIN_VEC_BYTES)));

/* Reductions keep four vector accumulators per sum in registers (GCC/Clang vector extensions:
 * the same source compiles to SSE2, AVX2, AVX-512 or NEON), so they are throughput bound,
 * not latency bound, and cost little set-up on small planes. */
static inline CIN_FN(cin_vec) CIN_FN(cin_load)(const CIN_T *p)
{
    CIN_FN(cin_vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline CIN_T CIN_FN(cin_hsum)(CIN_FN(cin_vec) v)
{
    CIN_T t = 0;
    for (int j = 0; j < (int)CIN_VLEN; j++) t += v[j];
    return t;
}

/* s1 = sum(x - k), s2 = sum((x - k)^2) over n elements, accumulated in CIN_T. */
static inline void CIN_FN(cin_shifted_sums)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n, CIN_T k,
                                            CIN_T *s1, CIN_T *s2)
{
    typedef CIN_FN(cin_vec) V;
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    ptrdiff_t i = 0;
    for (; i + 4 * CIN_VLEN <= n; i += 4 * CIN_VLEN) {
        V d0 = CIN_FN(cin_load)(x + i) - k;
        V d1 = CIN_FN(cin_load)(x + i + CIN_VLEN) - k;
        V d2 = CIN_FN(cin_load)(x + i + 2 * CIN_VLEN) - k;
        V d3 = CIN_FN(cin_load)(x + i + 3 * CIN_VLEN) - k;
        a0 += d0; q0 += d0 * d0;
        a1 += d1; q1 += d1 * d1;
        a2 += d2; q2 += d2 * d2;
        a3 += d3; q3 += d3 * d3;
    }
    for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
        V d = CIN_FN(cin_load)(x + i) - k;
        a0 += d; q0 += d * d;
    }
    CIN_T ta = CIN_FN(cin_hsum)((a0 + a1) + (a2 + a3));
    CIN_T tq = CIN_FN(cin_hsum)((q0 + q1) + (q2 + q3));
    for (; i < n; i++) {
        CIN_T d = x[i] - k;
        ta += d;
        tq += d * d;
    }
    *s1 = ta;
    *s2 = tq;
}

/* Plain sum of n elements in CIN_T (used once per chunk to pick the shift). */
static inline CIN_T CIN_FN(cin_sum)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n)
{
    typedef CIN_FN(cin_vec) V;
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    ptrdiff_t i = 0;
    for (; i + 4 * CIN_VLEN <= n; i += 4 * CIN_VLEN) {
        a0 += CIN_FN(cin_load)(x + i);
        a1 += CIN_FN(cin_load)(x + i + CIN_VLEN);
        a2 += CIN_FN(cin_load)(x + i + 2 * CIN_VLEN);
        a3 += CIN_FN(cin_load)(x + i + 3 * CIN_VLEN);
    }
    for (; i + CIN_VLEN <= n; i += CIN_VLEN) a0 += CIN_FN(cin_load)(x + i);
    CIN_T t = CIN_FN(cin_hsum)((a0 + a1) + (a2 + a3));
    for (; i < n; i++) t += x[i];
    return t;
}

/* Count-weighted statistics of n contiguous elements: *mean and *m2 = sum((x - mean)^2).
 * Blocks of CIN_BLOCK elements are summed around a shift k close to the mean (the first
 * block's plain mean, then the running mean), turned into (count, mean, M2) in double and
 * merged with Chan's formula. */
static void CIN_FN(cin_chunk_stats)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n,
                                    double *mean, double *m2)
{
    double cnt = 0.0, mu = 0.0, acc = 0.0;
    if (n <= 0) { *mean = 0.0; *m2 = 0.0; return; }
    ptrdiff_t first = n < CIN_BLOCK ? n : CIN_BLOCK;
    CIN_T k = (CIN_T)((double)CIN_FN(cin_sum)(x, first) / (double)first);
    for (ptrdiff_t b = 0; b < n; b += CIN_BLOCK) {
        ptrdiff_t nb = n - b < CIN_BLOCK ? n - b : CIN_BLOCK;
        CIN_T s1, s2;
        CIN_FN(cin_shifted_sums)(x + b, nb, k, &s1, &s2);
        double dm = (double)s1 / (double)nb;
        double bm2 = (double)s2 - (double)s1 * dm;
        if (bm2 < 0.0) bm2 = 0.0;
        cin_chan_merge(&cnt, &mu, &acc, (double)nb, (double)k + dm, bm2);
        k = (CIN_T)mu;
    }
    *mean = mu;
    *m2 = acc;
}

/* y = (x - k) * alpha + beta.  With k the plane mean rounded to CIN_T, x - k is exact for
 * x near the mean, which avoids the cancellation of the usual x * alpha + (beta - mean * alpha).
 * x and y may be the same array (in place).  stream: non-temporal stores for y (outputs
 * larger than the last-level cache), which skip the read-for-ownership of y's lines. */
static void CIN_FN(cin_normalize)(const CIN_T *x, CIN_T *y, ptrdiff_t n,
                                  CIN_T k, CIN_T alpha, CIN_T beta, int stream)
{
    ptrdiff_t i = 0;
#ifdef CIN_STREAM
    if (stream) {
        for (; i < n && ((uintptr_t)(y + i) % CIN_VEC_BYTES) != 0; i++)
            y[i] = (x[i] - k) * alpha + beta;
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            CIN_FN(cin_vec) v;
            memcpy(&v, x + i, sizeof v);
            v = (v - k) * alpha + beta;
            CIN_STREAM(y + i, v);
        }
        cin_store_fence();
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) y[j] = (x[j] - k) * alpha + beta;
}

/* Backward sums over n elements: *sdy = sum(dy), *sdyx = sum(dy * (x - k)), accumulated in
 * CIN_T inside blocks and in double across blocks. */
static void CIN_FN(cin_backward_sums)(const CIN_T *CIN_RESTRICT dy,
                                      const CIN_T *CIN_RESTRICT x, ptrdiff_t n, CIN_T k,
                                      double *sdy, double *sdyx)
{
    double tot_g = 0.0, tot_gx = 0.0;
    for (ptrdiff_t b = 0; b < n; b += CIN_BLOCK) {
        ptrdiff_t nb = n - b < CIN_BLOCK ? n - b : CIN_BLOCK;
        const CIN_T *g = dy + b, *v = x + b;
        typedef CIN_FN(cin_vec) V;
        V a0 = {0}, a1 = {0}, q0 = {0}, q1 = {0};
        ptrdiff_t i = 0;
        for (; i + 2 * CIN_VLEN <= nb; i += 2 * CIN_VLEN) {
            V g0 = CIN_FN(cin_load)(g + i), g1 = CIN_FN(cin_load)(g + i + CIN_VLEN);
            V v0 = CIN_FN(cin_load)(v + i) - k, v1 = CIN_FN(cin_load)(v + i + CIN_VLEN) - k;
            a0 += g0; q0 += g0 * v0;
            a1 += g1; q1 += g1 * v1;
        }
        CIN_T ta = CIN_FN(cin_hsum)(a0 + a1), tq = CIN_FN(cin_hsum)(q0 + q1);
        for (; i < nb; i++) { ta += g[i]; tq += g[i] * (v[i] - k); }
        tot_g += (double)ta;
        tot_gx += (double)tq;
    }
    *sdy = tot_g;
    *sdyx = tot_gx;
}

/* dx = a * dy + b * (x - k) + c  (the input-statistics gradient, rearranged per plane).
 * dx may be dy itself. */
static void CIN_FN(cin_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                    CIN_T k, CIN_T a, CIN_T b, CIN_T c, int stream)
{
    ptrdiff_t i = 0;
#ifdef CIN_STREAM
    if (stream) {
        for (; i < n && ((uintptr_t)(dx + i) % CIN_VEC_BYTES) != 0; i++)
            dx[i] = a * dy[i] + b * (x[i] - k) + c;
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            CIN_FN(cin_vec) g, v;
            memcpy(&g, dy + i, sizeof g);
            memcpy(&v, x + i, sizeof v);
            v = a * g + b * (v - k) + c;
            CIN_STREAM(dx + i, v);
        }
        cin_store_fence();
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) dx[j] = a * dy[j] + b * (x[j] - k) + c;
}

/* dx = a * dy  (fixed running statistics: no gradient through the statistics). */
static void CIN_FN(cin_scale)(const CIN_T *dy, CIN_T *dx, ptrdiff_t n, CIN_T a, int stream)
{
    ptrdiff_t i = 0;
#ifdef CIN_STREAM
    if (stream) {
        for (; i < n && ((uintptr_t)(dx + i) % CIN_VEC_BYTES) != 0; i++) dx[i] = a * dy[i];
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            CIN_FN(cin_vec) g;
            memcpy(&g, dy + i, sizeof g);
            g = a * g;
            CIN_STREAM(dx + i, g);
        }
        cin_store_fence();
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) dx[j] = a * dy[j];
}

/* ---- channels-last: rows of C channels ((N, *spatial, C) memory), vectorised over c ------ */

/* Per-channel statistics of `rows` rows of C contiguous channels: mean[c] and m2[c].
 * Blocks of CIN_CL_BLOCK rows are summed in CIN_T around a per-channel shift k[c] (the first
 * block's mean, then the running mean) and merged across blocks in double (Chan).
 * s1, s2, k: scratch of C elements each. */
static void CIN_FN(cin_cl_stats)(const CIN_T *CIN_RESTRICT x, ptrdiff_t rows, ptrdiff_t C,
                                 CIN_T *CIN_RESTRICT s1, CIN_T *CIN_RESTRICT s2,
                                 CIN_T *CIN_RESTRICT k, double *mean, double *m2)
{
    ptrdiff_t first = rows < CIN_CL_BLOCK ? rows : CIN_CL_BLOCK;
    for (ptrdiff_t c = 0; c < C; c++) { s1[c] = 0; mean[c] = 0.0; m2[c] = 0.0; }
    for (ptrdiff_t r = 0; r < first; r++) {
        const CIN_T *row = x + r * C;
#pragma omp simd
        for (ptrdiff_t c = 0; c < C; c++) s1[c] += row[c];
    }
    for (ptrdiff_t c = 0; c < C; c++) k[c] = (CIN_T)((double)s1[c] / (double)first);
    double cnt = 0.0;
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BLOCK ? rows - b : CIN_CL_BLOCK;
        for (ptrdiff_t c = 0; c < C; c++) { s1[c] = 0; s2[c] = 0; }
        for (ptrdiff_t r = b; r < b + nb; r++) {
            const CIN_T *row = x + r * C;
#pragma omp simd
            for (ptrdiff_t c = 0; c < C; c++) {
                CIN_T d = row[c] - k[c];
                s1[c] += d;
                s2[c] += d * d;
            }
        }
        for (ptrdiff_t c = 0; c < C; c++) {
            double dm = (double)s1[c] / (double)nb;
            double bm2 = (double)s2[c] - (double)s1[c] * dm;
            double n_c = cnt, mu = mean[c], acc = m2[c];
            cin_chan_merge(&n_c, &mu, &acc, (double)nb, (double)k[c] + dm, bm2 < 0.0 ? 0.0 : bm2);
            mean[c] = mu;
            m2[c] = acc;
            k[c] = (CIN_T)mu;
        }
        cnt += (double)nb;
    }
}

/* y[r, c] = (x[r, c] - k[c]) * a[c] + b[c]; x and y may be the same array. */
static void CIN_FN(cin_cl_normalize)(const CIN_T *x, CIN_T *y, ptrdiff_t rows, ptrdiff_t C,
                                     const CIN_T *k, const CIN_T *a, const CIN_T *b)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const CIN_T *xr = x + r * C;
        CIN_T *yr = y + r * C;
#pragma omp simd
        for (ptrdiff_t c = 0; c < C; c++) yr[c] = (xr[c] - k[c]) * a[c] + b[c];
    }
}

/* Per-channel backward sums over `rows` rows: sdy[c] = sum(dy), sdyx[c] = sum(dy * (x - k[c])),
 * in CIN_T within blocks of rows and in double across blocks.  s1, s2: scratch of C. */
static void CIN_FN(cin_cl_backward_sums)(const CIN_T *CIN_RESTRICT dy,
                                         const CIN_T *CIN_RESTRICT x, ptrdiff_t rows,
                                         ptrdiff_t C, const CIN_T *CIN_RESTRICT k,
                                         CIN_T *CIN_RESTRICT s1, CIN_T *CIN_RESTRICT s2,
                                         double *sdy, double *sdyx)
{
    for (ptrdiff_t c = 0; c < C; c++) { sdy[c] = 0.0; sdyx[c] = 0.0; }
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BLOCK ? rows - b : CIN_CL_BLOCK;
        for (ptrdiff_t c = 0; c < C; c++) { s1[c] = 0; s2[c] = 0; }
        for (ptrdiff_t r = b; r < b + nb; r++) {
            const CIN_T *g = dy + r * C, *v = x + r * C;
#pragma omp simd
            for (ptrdiff_t c = 0; c < C; c++) {
                s1[c] += g[c];
                s2[c] += g[c] * (v[c] - k[c]);
            }
        }
        for (ptrdiff_t c = 0; c < C; c++) { sdy[c] += (double)s1[c]; sdyx[c] += (double)s2[c]; }
    }
}

/* dx[r, c] = a[c] * dy[r, c] + b[c] * (x[r, c] - k[c]) + cc[c]. */
static void CIN_FN(cin_cl_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx,
                                       ptrdiff_t rows, ptrdiff_t C, const CIN_T *k,
                                       const CIN_T *a, const CIN_T *b, const CIN_T *cc)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const CIN_T *g = dy + r * C, *v = x + r * C;
        CIN_T *o = dx + r * C;
#pragma omp simd
        for (ptrdiff_t c = 0; c < C; c++) o[c] = a[c] * g[c] + b[c] * (v[c] - k[c]) + cc[c];
    }
}

#undef CIN_STREAM
#undef CIN_VLEN
#undef CIN_FN
#undef CIN_CAT3
#undef CIN_CAT3_
#undef CIN_CAT2
#undef CIN_CAT2_
