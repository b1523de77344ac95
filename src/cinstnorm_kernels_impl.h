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
static CIN_ALWAYS_INLINE void CIN_FN(cin_normalize_nf)(const CIN_T *x, CIN_T *y, ptrdiff_t n,
                                                       CIN_T k, CIN_T alpha, CIN_T beta,
                                                       int stream)
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
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) y[j] = (x[j] - k) * alpha + beta;
}

/* cin_normalize_nf, then a store fence after streaming stores. */
static void CIN_FN(cin_normalize)(const CIN_T *x, CIN_T *y, ptrdiff_t n, CIN_T k, CIN_T alpha,
                                  CIN_T beta, int stream)
{
    CIN_FN(cin_normalize_nf)(x, y, n, k, alpha, beta, stream);
    if (stream) cin_store_fence();
}

/* Instance-statistics forward of n <= CIN_SMALL_BATCH consecutive planes of L <= CIN_BLOCK
 * elements (plane j at x + j * L, parameter index p0 + j: weight[(p0 + j) % w_n], 1 when w_n is
 * 0; bias likewise, 0): mean, biased var and rstd in double, then y.  The same arithmetic as
 * cin_chunk_stats followed by cin_normalize, plane by plane, but the per-plane scalar steps
 * (divisions, square root) run across the batch, in vectors, instead of as one long dependency
 * chain per plane: small planes are otherwise latency bound.  With stream, the caller fences
 * after its last batch (a fence per batch of small planes doubled the time of (64, 256, 8, 8)). */
static void CIN_FN(cin_small_forward)(const CIN_T *x, CIN_T *y, ptrdiff_t n, ptrdiff_t L,
                                      ptrdiff_t p0, const double *w, ptrdiff_t w_n,
                                      const double *b, ptrdiff_t b_n, double eps, double *mean,
                                      double *var, double *rstd, int stream)
{
    double s[CIN_SMALL_BATCH], q[CIN_SMALL_BATCH], wv[CIN_SMALL_BATCH], bv[CIN_SMALL_BATCH];
    double al[CIN_SMALL_BATCH], be[CIN_SMALL_BATCH];
    CIN_T k[CIN_SMALL_BATCH], kk[CIN_SMALL_BATCH];
    const double dl = (double)L, inv_l = 1.0 / dl;
    ptrdiff_t wi = w_n ? p0 % w_n : 0, bi = b_n ? p0 % b_n : 0;
    if (n > CIN_SMALL_BATCH) n = CIN_SMALL_BATCH;
    for (ptrdiff_t j = 0; j < n; j++) {
        s[j] = (double)CIN_FN(cin_sum)(x + j * L, L);
        wv[j] = w_n ? w[wi] : 1.0;
        bv[j] = b_n ? b[bi] : 0.0;
        if (w_n && ++wi == w_n) wi = 0;
        if (b_n && ++bi == b_n) bi = 0;
    }
    for (ptrdiff_t j = 0; j < n; j++) k[j] = (CIN_T)(s[j] / dl);
    for (ptrdiff_t j = 0; j < n; j++) {
        CIN_T a, b2;
        CIN_FN(cin_shifted_sums)(x + j * L, L, k[j], &a, &b2);
        s[j] = (double)a;
        q[j] = (double)b2;
    }
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        double dm = s[j] / dl;
        double m2 = q[j] - s[j] * dm;
        double mu = (double)k[j] + dm;
        double v = (m2 < 0.0 ? 0.0 : m2) * inv_l;
        double r = 1.0 / sqrt(v + eps);
        mean[j] = mu;
        var[j] = v;
        rstd[j] = r;
        kk[j] = (CIN_T)mu;
        al[j] = r * wv[j];
        be[j] = bv[j] - (mu - (double)kk[j]) * al[j];
    }
    for (ptrdiff_t j = 0; j < n; j++)
        CIN_FN(cin_normalize_nf)(x + j * L, y + j * L, L, kk[j], (CIN_T)al[j], (CIN_T)be[j],
                                 stream);
}

/* Backward sums over n elements: *sdy = sum(dy), *sdyx = sum(dy * (x - k)), accumulated in
 * CIN_T inside blocks and in double across blocks. */
static CIN_ALWAYS_INLINE void CIN_FN(cin_backward_sums)(const CIN_T *CIN_RESTRICT dy,
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
static CIN_ALWAYS_INLINE void CIN_FN(cin_backward_dx_nf)(const CIN_T *dy, const CIN_T *x,
                                                         CIN_T *dx, ptrdiff_t n, CIN_T k,
                                                         CIN_T a, CIN_T b, CIN_T c, int stream)
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
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) dx[j] = a * dy[j] + b * (x[j] - k) + c;
}

static void CIN_FN(cin_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                    CIN_T k, CIN_T a, CIN_T b, CIN_T c, int stream)
{
    CIN_FN(cin_backward_dx_nf)(dy, x, dx, n, k, a, b, c, stream);
    if (stream) cin_store_fence();
}

/* dx = a * dy  (fixed running statistics: no gradient through the statistics). */
static CIN_ALWAYS_INLINE void CIN_FN(cin_scale_nf)(const CIN_T *dy, CIN_T *dx, ptrdiff_t n,
                                                   CIN_T a, int stream)
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
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) dx[j] = a * dy[j];
}

static void CIN_FN(cin_scale)(const CIN_T *dy, CIN_T *dx, ptrdiff_t n, CIN_T a, int stream)
{
    CIN_FN(cin_scale_nf)(dy, dx, n, a, stream);
    if (stream) cin_store_fence();
}

/* Backward of n <= CIN_SMALL_BATCH consecutive planes of L <= CIN_BLOCK elements (plane j at
 * dy/x/dx + j * L, parameter index p0 + j: mean[(p0 + j) % m_n] (0 when m_n is 0), rstd
 * (1), weight (1) likewise): per-plane sums(dy) and sum(dy * xhat), then dx.  The arithmetic
 * of cin_backward_sums and cin_backward_dx / cin_scale, plane by plane, but (as in
 * cin_small_forward) the per-plane scalar steps between the two passes run across the batch,
 * in vectors, instead of as a dependency chain in front of each plane's dx.  With stream, the
 * caller fences after its last batch, as for cin_small_forward. */
static void CIN_FN(cin_small_backward)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                       ptrdiff_t L, ptrdiff_t p0, const double *mean,
                                       ptrdiff_t m_n, const double *rstd, ptrdiff_t r_n,
                                       const double *w, ptrdiff_t w_n, int use_input_stats,
                                       double *sum_dy, double *sum_dy_xhat, int stream)
{
    double mu[CIN_SMALL_BATCH], rs[CIN_SMALL_BATCH], wv[CIN_SMALL_BATCH];
    double sg[CIN_SMALL_BATCH], sc[CIN_SMALL_BATCH];
    CIN_T k[CIN_SMALL_BATCH], ca[CIN_SMALL_BATCH], cb[CIN_SMALL_BATCH], cc[CIN_SMALL_BATCH];
    const double inv_l = 1.0 / (double)L;
    ptrdiff_t mi = m_n ? p0 % m_n : 0, ri = r_n ? p0 % r_n : 0, wi = w_n ? p0 % w_n : 0;
    if (n > CIN_SMALL_BATCH) n = CIN_SMALL_BATCH;
    for (ptrdiff_t j = 0; j < n; j++) {
        mu[j] = m_n ? mean[mi] : 0.0;
        rs[j] = r_n ? rstd[ri] : 1.0;
        wv[j] = w_n ? w[wi] : 1.0;
        if (m_n && ++mi == m_n) mi = 0;
        if (r_n && ++ri == r_n) ri = 0;
        if (w_n && ++wi == w_n) wi = 0;
        k[j] = (CIN_T)mu[j];
    }
    for (ptrdiff_t j = 0; j < n; j++)
        CIN_FN(cin_backward_sums)(dy + j * L, x + j * L, L, k[j], &sg[j], &sc[j]);
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        double s = sc[j] + ((double)k[j] - mu[j]) * sg[j];   /* centred: sum(dy * (x - mean)) */
        double a = wv[j] * rs[j];
        double b = use_input_stats ? -a * rs[j] * rs[j] * s * inv_l : 0.0;
        double c = use_input_stats ? -a * sg[j] * inv_l + b * ((double)k[j] - mu[j]) : 0.0;
        ca[j] = (CIN_T)a;
        cb[j] = (CIN_T)b;
        cc[j] = (CIN_T)c;
        sum_dy[j] = sg[j];
        sum_dy_xhat[j] = s * rs[j];
    }
    for (ptrdiff_t j = 0; j < n; j++) {
        if (!use_input_stats)
            CIN_FN(cin_scale_nf)(dy + j * L, dx + j * L, L, ca[j], stream);
        else
            CIN_FN(cin_backward_dx_nf)(dy + j * L, x + j * L, dx + j * L, L, k[j], ca[j], cb[j],
                                       cc[j], stream);
    }
}

/* ---- channels-last: rows of lanes ((N, *spatial, C) memory), vectorised over lanes ------- */
/* Every kernel below works on `rows` rows of w lanes, row r starting at x + r * ld (ld >= w):
 * ld == w for whole rows of C channels (or super-rows of R*C), ld == C for a tile of w
 * channels out of C. */

/* Per-lane sums over nb rows: s1[c] = sum(x - k[c]) and s2[c] = sum((x - k[c])^2), or, with g
 * (the backward pass), s1[c] = sum(g) and s2[c] = sum(g * (x - k[c])), all in CIN_T.  The rows
 * are read in order, `step` rows at a time, the per-lane partial sums living in s1 and s2 (in
 * L1) between steps: every array is read forward and, with pf, software prefetches run about
 * CIN_CL_PF_BYTES ahead of each, so the loads seldom wait for memory (the stores to s1 and s2
 * would otherwise queue behind a missing load and keep the core from running ahead).  Each lane
 * adds its rows in order.  (Register tiles of lanes walking down the rows, which need no
 * stores, read a row's lines in a stride the prefetchers do not follow: up to 1.4x slower.) */
#define CIN_CL_PF_BYTES 4096
static void CIN_FN(cin_cl_block_sums)(const CIN_T *CIN_RESTRICT x, const CIN_T *CIN_RESTRICT g,
                                      ptrdiff_t nb, ptrdiff_t w, ptrdiff_t ld,
                                      const CIN_T *CIN_RESTRICT k, CIN_T *CIN_RESTRICT s1,
                                      CIN_T *CIN_RESTRICT s2, int step, int pf)
{
    typedef CIN_FN(cin_vec) V;
    ptrdiff_t row_bytes = pf ? w * (ptrdiff_t)sizeof(CIN_T) : 0;  /* 0: no prefetches */
    ptrdiff_t ahead = CIN_CL_PF_BYTES / (ld * (ptrdiff_t)sizeof(CIN_T));
    if (ahead < 1) ahead = 1;
    for (ptrdiff_t c = 0; c < w; c++) { s1[c] = 0; s2[c] = 0; }
    for (ptrdiff_t r = 0; r < nb; r += step) {
        int m = nb - r < step ? (int)(nb - r) : step;
        const CIN_T *xr = x + r * ld, *gr = g ? g + r * ld : NULL;
        for (int t = 0; t < m; t++) {
            /* a prefetch never faults, so running past the rows is harmless */
            const char *px = (const char *)(xr + (t + ahead) * ld);
            for (ptrdiff_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(px + l, 0, 3);
            if (g) {
                const char *pg = (const char *)(gr + (t + ahead) * ld);
                for (ptrdiff_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(pg + l, 0, 3);
            }
        }
        ptrdiff_t c = 0;
        for (; c + CIN_VLEN <= w; c += CIN_VLEN) {
            V kv = CIN_FN(cin_load)(k + c);
            V a = CIN_FN(cin_load)(s1 + c), q = CIN_FN(cin_load)(s2 + c);
            for (int t = 0; t < m; t++) {
                V d = CIN_FN(cin_load)(xr + t * ld + c) - kv;
                if (g) {
                    V gv = CIN_FN(cin_load)(gr + t * ld + c);
                    a += gv;
                    q += gv * d;
                } else {
                    a += d;
                    q += d * d;
                }
            }
            memcpy(s1 + c, &a, sizeof(V));
            memcpy(s2 + c, &q, sizeof(V));
        }
        for (; c < w; c++)
            for (int t = 0; t < m; t++) {
                CIN_T d = xr[t * ld + c] - k[c];
                if (g) { s1[c] += gr[t * ld + c]; s2[c] += gr[t * ld + c] * d; }
                else { s1[c] += d; s2[c] += d * d; }
            }
    }
}
#undef CIN_CL_PF_BYTES

/* Per-lane statistics: mean[c] and m2[c].  Blocks of CIN_CL_BLOCK rows are summed in CIN_T
 * around a per-lane shift k[c] (the mean of the first CIN_CL_HEAD rows, then the running mean)
 * and merged across blocks in double (Chan): one pass over x, plus the head rows, which the pass
 * then finds in cache.  A shift within a fraction of a standard deviation of the mean keeps
 * float32 sums free of cancellation.  s1, s2, k: scratch of w elements each. */
#define CIN_CL_HEAD 32
static void CIN_FN(cin_cl_stats)(const CIN_T *CIN_RESTRICT x, ptrdiff_t rows, ptrdiff_t w,
                                 ptrdiff_t ld, CIN_T *CIN_RESTRICT s1, CIN_T *CIN_RESTRICT s2,
                                 CIN_T *CIN_RESTRICT k, double *mean, double *m2, int pf)
{
    ptrdiff_t head = rows < CIN_CL_HEAD ? rows : CIN_CL_HEAD;
    for (ptrdiff_t c = 0; c < w; c++) { k[c] = 0; mean[c] = 0.0; m2[c] = 0.0; }
    if (head > 0) {
        CIN_FN(cin_cl_block_sums)(x, NULL, head, w, ld, k, s1, s2, CIN_CL_STATS_STEP, pf);
        for (ptrdiff_t c = 0; c < w; c++) k[c] = (CIN_T)((double)s1[c] / (double)head);
    }
    double cnt = 0.0;
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BLOCK ? rows - b : CIN_CL_BLOCK;
        CIN_FN(cin_cl_block_sums)(x + b * ld, NULL, nb, w, ld, k, s1, s2, CIN_CL_STATS_STEP,
                                  pf);
        /* Chan's merge of this block into the running (cnt, mean, m2), with the divisions
         * hoisted: every lane has the same counts. */
        double inv_nb = 1.0 / (double)nb, f = (double)nb / (cnt + (double)nb), g = cnt * f;
        int first = cnt == 0.0;
#pragma omp simd
        for (ptrdiff_t c = 0; c < w; c++) {
            double dm = (double)s1[c] * inv_nb;
            double bm2 = (double)s2[c] - (double)s1[c] * dm;
            double bmean = (double)k[c] + dm, delta = bmean - mean[c];
            bm2 = bm2 < 0.0 ? 0.0 : bm2;
            mean[c] = first ? bmean : mean[c] + delta * f;
            m2[c] = first ? bm2 : m2[c] + bm2 + delta * delta * g;
            k[c] = (CIN_T)mean[c];
        }
        cnt += (double)nb;
    }
}
#undef CIN_CL_HEAD

/* Per-lane backward sums: sdy[c] = sum(dy), sdyx[c] = sum(dy * (x - k[c])), in CIN_T within
 * blocks of CIN_CL_BWD_BLOCK rows and in double across blocks.  s1, s2: scratch of w. */
static void CIN_FN(cin_cl_backward_sums)(const CIN_T *CIN_RESTRICT dy,
                                         const CIN_T *CIN_RESTRICT x, ptrdiff_t rows,
                                         ptrdiff_t w, ptrdiff_t ld, const CIN_T *CIN_RESTRICT k,
                                         CIN_T *CIN_RESTRICT s1, CIN_T *CIN_RESTRICT s2,
                                         double *sdy, double *sdyx, int pf)
{
    for (ptrdiff_t c = 0; c < w; c++) { sdy[c] = 0.0; sdyx[c] = 0.0; }
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BWD_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BWD_BLOCK ? rows - b : CIN_CL_BWD_BLOCK;
        CIN_FN(cin_cl_block_sums)(x + b * ld, dy + b * ld, nb, w, ld, k, s1, s2,
                                  CIN_CL_BWD_STEP, pf);
        for (ptrdiff_t c = 0; c < w; c++) { sdy[c] += (double)s1[c]; sdyx[c] += (double)s2[c]; }
    }
}

/* The elementwise channels-last passes: y[r, c] = (x[r, c] - k[c]) * a[c] + b[c] (cc == NULL),
 * or dx[r, c] = a[c] * dy[r, c] + b[c] * (x[r, c] - k[c]) + cc[c] (dy given); out may be x or
 * dy itself.
 * stream: non-temporal stores.  With ld == w the rows are one flat run of rows * w elements
 * (aligned stores need not start a row): lane o of an element is its index modulo w, and the
 * coefficients are read as vectors at k + o, so they must hold w + CIN_VLEN lanes, periodic in
 * w (k[w + j] = k[j]), and w >= CIN_VLEN (else, or with ld > w, plain stores). */
#define CIN_CL_ELEM(i, o) (dy ? a[o] * dy[i] + b[o] * (x[i] - k[o]) + cc[o]                      \
                              : (x[i] - k[o]) * a[o] + b[o])
static void CIN_FN(cin_cl_apply)(const CIN_T *x, const CIN_T *dy, CIN_T *out, ptrdiff_t rows,
                                 ptrdiff_t w, ptrdiff_t ld, const CIN_T *k, const CIN_T *a,
                                 const CIN_T *b, const CIN_T *cc, int stream)
{
    typedef CIN_FN(cin_vec) V;
#ifdef CIN_STREAM
    if (stream && ld == w && w >= CIN_VLEN) {
        ptrdiff_t n = rows * w, i = 0, o = 0;
        for (; i < n && ((uintptr_t)(out + i) % CIN_VEC_BYTES) != 0; i++) {
            out[i] = CIN_CL_ELEM(i, o);
            if (++o == w) o = 0;
        }
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            V v = CIN_FN(cin_load)(x + i) - CIN_FN(cin_load)(k + o);
            if (dy) v = CIN_FN(cin_load)(a + o) * CIN_FN(cin_load)(dy + i)
                        + CIN_FN(cin_load)(b + o) * v + CIN_FN(cin_load)(cc + o);
            else v = v * CIN_FN(cin_load)(a + o) + CIN_FN(cin_load)(b + o);
            CIN_STREAM(out + i, v);
            o += CIN_VLEN;
            if (o >= w) o -= w;
        }
        for (; i < n; i++) {
            out[i] = CIN_CL_ELEM(i, o);
            if (++o == w) o = 0;
        }
        cin_store_fence();
        return;
    }
#else
    (void)stream;
#endif
    for (ptrdiff_t r = 0; r < rows; r++) {
        const CIN_T *xr = x + r * ld;
        CIN_T *yr = out + r * ld;
        if (dy) {
            const CIN_T *gr = dy + r * ld;
#pragma omp simd
            for (ptrdiff_t c = 0; c < w; c++) yr[c] = a[c] * gr[c] + b[c] * (xr[c] - k[c]) + cc[c];
        } else {
#pragma omp simd
            for (ptrdiff_t c = 0; c < w; c++) yr[c] = (xr[c] - k[c]) * a[c] + b[c];
        }
    }
}
#undef CIN_CL_ELEM

static void CIN_FN(cin_cl_normalize)(const CIN_T *x, CIN_T *y, ptrdiff_t rows, ptrdiff_t w,
                                     ptrdiff_t ld, const CIN_T *k, const CIN_T *a, const CIN_T *b,
                                     int stream)
{
    CIN_FN(cin_cl_apply)(x, NULL, y, rows, w, ld, k, a, b, NULL, stream);
}

static void CIN_FN(cin_cl_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx,
                                       ptrdiff_t rows, ptrdiff_t w, ptrdiff_t ld, const CIN_T *k,
                                       const CIN_T *a, const CIN_T *b, const CIN_T *cc, int stream)
{
    CIN_FN(cin_cl_apply)(x, dy, dx, rows, w, ld, k, a, b, cc, stream);
}

#undef CIN_STREAM
#undef CIN_VLEN
#undef CIN_FN
#undef CIN_CAT3
#undef CIN_CAT3_
#undef CIN_CAT2
#undef CIN_CAT2_
