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

/* Whether out sits a little ahead of in, in the low 12 address bits: 0 < (out - in) mod 4096
 * <= CIN_ALIAS_AHEAD bytes.  An ascending elementwise loop then loads, right after each store,
 * bytes whose low address bits match that store's while it is still in flight (4K aliasing):
 * the load waits on it.  On the Xeon VM this made a forward or backward 1.6-1.8x slower when
 * the match extended to 1 MiB (buffers whose distance is a whole number of MiB plus 16-128
 * bytes, which glibc hands out), against no cost at other distances.  The elementwise bodies
 * walk such a range from its end instead, where every load precedes the stores it matches. */
#ifndef CIN_ALIAS_HELPER
#define CIN_ALIAS_HELPER
#define CIN_ALIAS_AHEAD 256
static inline int cin_store_ahead(const void *out, const void *in)
{
    uintptr_t d = ((uintptr_t)out - (uintptr_t)in) & 4095u;
    return d != 0 && d <= CIN_ALIAS_AHEAD;
}
#endif
/* Horizontal sum as a tree: halve the vector (upper half onto the lower) down to 16 bytes,
 * then add those lanes pairwise: log2(lanes) dependent adds, where a lane-by-lane loop is a
 * chain of one add (and one extract) per lane (64 cycles of latency for 16 floats), which is
 * what small planes, several sums per plane, wait on. */
typedef CIN_T CIN_FN(cin_v32) __attribute__((vector_size(32)));
typedef CIN_T CIN_FN(cin_v16) __attribute__((vector_size(16)));
#if (defined(__clang__) || __GNUC__ >= 12) && defined(CIN_TBYTES)
/* the halves of a vector in registers (vextract): the memcpy below made GCC 12 store a
 * 64-byte sum to the stack and load its halves back, twice per plane for the backward sums */
#if CIN_TBYTES == 4
#define CIN_LO32(v) __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
#define CIN_HI32(v) __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
#define CIN_LO16(v) __builtin_shufflevector(v, v, 0, 1, 2, 3)
#define CIN_HI16(v) __builtin_shufflevector(v, v, 4, 5, 6, 7)
#else
#define CIN_LO32(v) __builtin_shufflevector(v, v, 0, 1, 2, 3)
#define CIN_HI32(v) __builtin_shufflevector(v, v, 4, 5, 6, 7)
#define CIN_LO16(v) __builtin_shufflevector(v, v, 0, 1)
#define CIN_HI16(v) __builtin_shufflevector(v, v, 2, 3)
#endif
#endif
static inline CIN_T CIN_FN(cin_hsum)(CIN_FN(cin_vec) v)
{
#if CIN_VEC_BYTES == 64 && defined(CIN_LO32)
    CIN_FN(cin_v32) lo32 = CIN_LO32(v) + CIN_HI32(v);
#elif CIN_VEC_BYTES == 64
    CIN_FN(cin_v32) lo32, hi32;
    memcpy(&lo32, &v, 32);
    memcpy(&hi32, (const char *)&v + 32, 32);
    lo32 += hi32;
#elif CIN_VEC_BYTES == 32
    CIN_FN(cin_v32) lo32 = v;
#endif
#if CIN_VEC_BYTES >= 32 && defined(CIN_LO16)
    CIN_FN(cin_v16) q = CIN_LO16(lo32) + CIN_HI16(lo32);
#elif CIN_VEC_BYTES >= 32
    CIN_FN(cin_v16) q, hi16;
    memcpy(&q, &lo32, 16);
    memcpy(&hi16, (const char *)&lo32 + 16, 16);
    q += hi16;
#elif CIN_VEC_BYTES == 16
    CIN_FN(cin_v16) q = v;
#else
#error "cin_hsum: CIN_VEC_BYTES must be 16, 32 or 64"
#endif
#if CIN_TBYTES == 4
    return (q[0] + q[2]) + (q[1] + q[3]);
#else
    return q[0] + q[1];
#endif
}
#undef CIN_LO32
#undef CIN_HI32
#undef CIN_LO16
#undef CIN_HI16

/* out[j] = cin_hsum(v[j]) for j < m, bit for bit, m a power of two (at most 16): the same
 * halving tree for every vector, but run across the vectors at once, transposed.  Each step
 * takes pairs of vectors whose lanes form S segments each (one per input vector, of 2H
 * lanes) into one of 2S segments of H lanes: lane i of a segment plus lane i + H, as the
 * tree pairs them (shuffles of the low and of the high halves of every segment, one add).
 * The small-plane forward reduces its 8 and 16 sums per batch in log2(lanes) steps of m / 2
 * or fewer combines, where one hsum per sum took log2(lanes) steps of its own. */
#if (defined(__clang__) || __GNUC__ >= 12) && defined(CIN_TBYTES)
#define CIN_NL (CIN_VEC_BYTES / CIN_TBYTES)
#define CIN_HLO(o, S, H)                                                                       \
    ((((o) / (H)) >= (S) ? CIN_NL : 0) + (((o) / (H)) % (S)) * 2 * (H) + (o) % (H))
#define CIN_HHI(o, S, H) (CIN_HLO(o, S, H) + (H))
#define CIN_L2(F, b, S, H) F(b, S, H), F(b + 1, S, H)
#define CIN_L4(F, b, S, H) CIN_L2(F, b, S, H), CIN_L2(F, b + 2, S, H)
#define CIN_L8(F, b, S, H) CIN_L4(F, b, S, H), CIN_L4(F, b + 4, S, H)
#define CIN_L16(F, b, S, H) CIN_L8(F, b, S, H), CIN_L8(F, b + 8, S, H)
#if CIN_NL == 16
#define CIN_LANES(F, S, H) CIN_L16(F, 0, S, H)
#elif CIN_NL == 8
#define CIN_LANES(F, S, H) CIN_L8(F, 0, S, H)
#elif CIN_NL == 4
#define CIN_LANES(F, S, H) CIN_L4(F, 0, S, H)
#elif CIN_NL == 2
#define CIN_LANES(F, S, H) CIN_L2(F, 0, S, H)
#endif
#define CIN_HCOMB(u, w, S, H) (__builtin_shufflevector(u, w, CIN_LANES(CIN_HLO, S, H)) + \
                               __builtin_shufflevector(u, w, CIN_LANES(CIN_HHI, S, H)))
/* one step: pairs of vectors into one (a single vector with itself: its segments twice) */
#define CIN_HSTEP(S, H)                                                                        \
    do {                                                                                       \
        if (cnt == 1) {                                                                        \
            v[0] = CIN_HCOMB(v[0], v[0], S, H);                                                \
        } else {                                                                               \
            for (int i_ = 0; i_ < cnt / 2; i_++)                                               \
                v[i_] = CIN_HCOMB(v[2 * i_], v[2 * i_ + 1], S, H);                             \
            cnt /= 2;                                                                          \
        }                                                                                      \
    } while (0)
#endif
static inline __attribute__((always_inline)) void
CIN_FN(cin_hsum_batch)(CIN_FN(cin_vec) *v, const int m, CIN_T *out)
{
#if defined(CIN_HSTEP) && CIN_TBYTES == 4
    /* float only: tiny float32 forward, Zen 4 VM, 0.89-0.94x the time of one cin_hsum per
     * vector (AVX-512 and AVX2); for double (half the lanes, a shorter tree per vector) the
     * transposed form measured 1.02-1.09x */
    int cnt = m;
#if CIN_NL == 16
    CIN_HSTEP(1, 8); CIN_HSTEP(2, 4); CIN_HSTEP(4, 2); CIN_HSTEP(8, 1);
#elif CIN_NL == 8
    CIN_HSTEP(1, 4); CIN_HSTEP(2, 2); CIN_HSTEP(4, 1);
#elif CIN_NL == 4
    CIN_HSTEP(1, 2); CIN_HSTEP(2, 1);
#else
    CIN_HSTEP(1, 1);
#endif
    for (int j = 0; j < m; j++) out[j] = v[j / CIN_NL][j % CIN_NL];
#else
    for (int j = 0; j < m; j++) out[j] = CIN_FN(cin_hsum)(v[j]);
#endif
}
#undef CIN_NL
#undef CIN_HLO
#undef CIN_HHI
#undef CIN_L2
#undef CIN_L4
#undef CIN_L8
#undef CIN_L16
#undef CIN_LANES
#undef CIN_HCOMB
#undef CIN_HSTEP

/* ---- fused activations (codes CIN_ACT_*, see cinstnorm_kernels.h) --------------------------
 * ReLU and LeakyReLU are selects in registers; SiLU, GELU and GELU-tanh use the vector exp
 * and normal CDF of cin_vmath.h (the scalar forms too, on a broadcast vector, so tails and
 * channels-last rows give the same bits).  No activation costs an extra pass over memory.
 * Every kernel that takes an activation code is instantiated per code (CIN_ACT_SWITCH) with
 * the code a constant, so the code-0 instantiation is the loop without an activation. */
typedef CIN_IT CIN_FN(cin_ivec) __attribute__((vector_size(CIN_VEC_BYTES)));
#include "cin_vmath.h"

/* f(t) for a vector function f, on lane 0 of a broadcast vector */
#define CIN_VSCALAR(f, ...) ({ CIN_FN(cin_vec) bz_ = {0}; f(__VA_ARGS__)[0]; })

/* act(t) */
static CIN_ALWAYS_INLINE CIN_T CIN_FN(cin_act)(CIN_T t, int act, CIN_T s)
{
    switch (act) {
    case CIN_ACT_RELU: return t < (CIN_T)0 ? (CIN_T)0 : t;   /* keeps NaN */
    case CIN_ACT_LEAKY_RELU: {
        /* the bit select of cin_vact, not t < 0 ? t * s : t: t * s then feeds no add (a
         * select did, and GCC fused t * s + residual in some of the versions of a vectorized
         * loop and not others: AVX2 results differed in the last bits with the alignment) */
        CIN_T ts = t * s;
        CIN_UT bt, bs, m = (CIN_UT)0 - (CIN_UT)(t < (CIN_T)0);
        memcpy(&bt, &t, sizeof bt);
        memcpy(&bs, &ts, sizeof bs);
        bt = (bt & ~m) | (bs & m);
        memcpy(&ts, &bt, sizeof ts);
        return ts;
    }
    case CIN_ACT_SILU: return CIN_VSCALAR(CIN_FN(cin_vsilu), bz_ + t);
    case CIN_ACT_GELU: return CIN_VSCALAR(CIN_FN(cin_vgelu), bz_ + t);
    case CIN_ACT_GELU_TANH: return CIN_VSCALAR(CIN_FN(cin_vgelu_tanh), bz_ + t);
    default: return t;
    }
}

/* The gradient through the activation: dy * act'(t) (ReLU, LeakyReLU: torch's choice at the
 * kink, t > 0 passes dy; ReLU gives an exact 0 elsewhere). */
static CIN_ALWAYS_INLINE CIN_T CIN_FN(cin_act_grad)(CIN_T t, CIN_T dy, int act, CIN_T s)
{
    switch (act) {
    case CIN_ACT_RELU: return t > (CIN_T)0 ? dy : (CIN_T)0;
    case CIN_ACT_LEAKY_RELU: return t > (CIN_T)0 ? dy : dy * s;
    case CIN_ACT_SILU: return CIN_VSCALAR(CIN_FN(cin_vsilu_grad), bz_ + t, bz_ + dy);
    case CIN_ACT_GELU: return CIN_VSCALAR(CIN_FN(cin_vgelu_grad), bz_ + t, bz_ + dy);
    case CIN_ACT_GELU_TANH:     /* torch's GeluBackward, approximate='tanh', as t sigmoid(2u) */
        return CIN_VSCALAR(CIN_FN(cin_vgelu_tanh_grad), bz_ + t, bz_ + dy);
    default: return dy;
    }
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec) CIN_FN(cin_vact)(CIN_FN(cin_vec) t, int act, CIN_T s)
{
    typedef CIN_FN(cin_ivec) CIN_IV;
    CIN_FN(cin_vec) z = {0};
    if (act == CIN_ACT_NONE) return t;
    if (act == CIN_ACT_RELU) { CIN_IV m = t < z; return (CIN_FN(cin_vec))((CIN_IV)t & ~m); }
    if (act == CIN_ACT_LEAKY_RELU) {
        CIN_IV m = t < z;
        return (CIN_FN(cin_vec))(((CIN_IV)t & ~m) | ((CIN_IV)(t * s) & m));
    }
    if (act == CIN_ACT_SILU) return CIN_FN(cin_vsilu)(t);
    if (act == CIN_ACT_GELU) return CIN_FN(cin_vgelu)(t);
    return CIN_FN(cin_vgelu_tanh)(t);
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vact_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy, int act, CIN_T s)
{
    typedef CIN_FN(cin_ivec) CIN_IV;
    CIN_FN(cin_vec) z = {0};
    if (act == CIN_ACT_NONE) return dy;
    if (act == CIN_ACT_RELU) { CIN_IV m = t > z; return (CIN_FN(cin_vec))((CIN_IV)dy & m); }
    if (act == CIN_ACT_LEAKY_RELU) {
        CIN_IV m = t > z;
        return (CIN_FN(cin_vec))(((CIN_IV)dy & m) | ((CIN_IV)(dy * s) & ~m));
    }
    if (act == CIN_ACT_SILU) return CIN_FN(cin_vsilu_grad)(t, dy);
    if (act == CIN_ACT_GELU) return CIN_FN(cin_vgelu_grad)(t, dy);
    return CIN_FN(cin_vgelu_tanh_grad)(t, dy);
}

/* The vector part of cin_shifted_sums: *va, *vq the lane sums of x - k and (x - k)^2 over
 * the elements before the one returned (the rest, fewer than CIN_VLEN, is the tail's). */
static inline ptrdiff_t CIN_FN(cin_shifted_vsums)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n,
                                                  CIN_T k, CIN_FN(cin_vec) *va,
                                                  CIN_FN(cin_vec) *vq)
{
    typedef CIN_FN(cin_vec) V;
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    ptrdiff_t i = 0;
    if (n >= 4 * CIN_VLEN) {  /* the first block starts the sums (see cin_vsum) */
        a0 = CIN_FN(cin_load)(x) - k;
        a1 = CIN_FN(cin_load)(x + CIN_VLEN) - k;
        a2 = CIN_FN(cin_load)(x + 2 * CIN_VLEN) - k;
        a3 = CIN_FN(cin_load)(x + 3 * CIN_VLEN) - k;
        q0 = a0 * a0; q1 = a1 * a1; q2 = a2 * a2; q3 = a3 * a3;
        i = 4 * CIN_VLEN;
    }
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
    *va = (a0 + a1) + (a2 + a3);
    *vq = (q0 + q1) + (q2 + q3);
    return i;
}

/* the scalar tail of cin_shifted_sums, from element i on, onto the lane sums ta, tq */
static inline void CIN_FN(cin_shifted_tail)(const CIN_T *CIN_RESTRICT x, ptrdiff_t i,
                                            ptrdiff_t n, CIN_T k, CIN_T ta, CIN_T tq,
                                            CIN_T *s1, CIN_T *s2)
{
    for (; i < n; i++) {
        CIN_T d = x[i] - k;
        ta += d;
        tq += d * d;
    }
    *s1 = ta;
    *s2 = tq;
}

/* s1 = sum(x - k), s2 = sum((x - k)^2) over n elements, accumulated in CIN_T. */
static inline void CIN_FN(cin_shifted_sums)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n, CIN_T k,
                                            CIN_T *s1, CIN_T *s2)
{
    CIN_FN(cin_vec) va, vq;
    ptrdiff_t i = CIN_FN(cin_shifted_vsums)(x, n, k, &va, &vq);
    CIN_FN(cin_shifted_tail)(x, i, n, k, CIN_FN(cin_hsum)(va), CIN_FN(cin_hsum)(vq), s1, s2);
}

/* The vector part of cin_sum: *v the lane sums of the elements before the one returned. */
static inline ptrdiff_t CIN_FN(cin_vsum)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n,
                                         CIN_FN(cin_vec) *v)
{
    typedef CIN_FN(cin_vec) V;
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    ptrdiff_t i = 0;
    /* The first block starts the sums (not 0 + x: for a batch of 8 planes of 4 vectors, 64 of
     * the statistics' 159 vector adds), the same bits: 0 + x is x but for x = -0, and a sum
     * whose terms are not all -0 comes out the same either way; a plane of -0 then gets the
     * shift k = -0 where it got +0, with the same mean (+0), variance and y
     * (test_signed_zero_planes) */
    if (n >= 4 * CIN_VLEN) {
        a0 = CIN_FN(cin_load)(x);
        a1 = CIN_FN(cin_load)(x + CIN_VLEN);
        a2 = CIN_FN(cin_load)(x + 2 * CIN_VLEN);
        a3 = CIN_FN(cin_load)(x + 3 * CIN_VLEN);
        i = 4 * CIN_VLEN;
    }
    for (; i + 4 * CIN_VLEN <= n; i += 4 * CIN_VLEN) {
        a0 += CIN_FN(cin_load)(x + i);
        a1 += CIN_FN(cin_load)(x + i + CIN_VLEN);
        a2 += CIN_FN(cin_load)(x + i + 2 * CIN_VLEN);
        a3 += CIN_FN(cin_load)(x + i + 3 * CIN_VLEN);
    }
    for (; i + CIN_VLEN <= n; i += CIN_VLEN) a0 += CIN_FN(cin_load)(x + i);
    *v = (a0 + a1) + (a2 + a3);
    return i;
}

/* Plain sum of n elements in CIN_T (used once per chunk to pick the shift). */
static inline CIN_T CIN_FN(cin_sum)(const CIN_T *CIN_RESTRICT x, ptrdiff_t n)
{
    CIN_FN(cin_vec) v;
    ptrdiff_t i = CIN_FN(cin_vsum)(x, n, &v);
    CIN_T t = CIN_FN(cin_hsum)(v);
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

/* y[j] = act((x[j] - k) * alpha + beta) + r[j] (r: the residual, read only with res), one
 * element and one vector at j: the expression every loop of cin_normalize_body stores. */
static inline __attribute__((always_inline)) CIN_T
CIN_FN(cin_norm_at)(const CIN_T *x, const CIN_T *r, ptrdiff_t j, CIN_T k, CIN_T alpha,
                    CIN_T beta, const int act, CIN_T s, const int res)
{
    CIN_T v = CIN_FN(cin_act)((x[j] - k) * alpha + beta, act, s);
    if (res) v += r[j];
    return v;
}

static inline __attribute__((always_inline)) CIN_FN(cin_vec)
CIN_FN(cin_vnorm_at)(const CIN_T *x, const CIN_T *r, ptrdiff_t j, CIN_T k, CIN_T alpha,
                     CIN_T beta, const int act, CIN_T s, const int res)
{
    CIN_FN(cin_vec) v = CIN_FN(cin_vact)((CIN_FN(cin_load)(x + j) - k) * alpha + beta, act, s);
    if (res) v += CIN_FN(cin_load)(r + j);
    return v;
}

/* y = act((x - k) * alpha + beta) + r (r: the residual, NULL for none).  With k the plane
 * mean rounded to CIN_T, x - k is exact for x near the mean, which avoids the cancellation of
 * the usual x * alpha + (beta - mean * alpha).  x and y may be the same array (in place), and
 * so may r and y.  stream: non-temporal stores for y (outputs larger than the last-level
 * cache), which skip the read-for-ownership of y's lines; the body does not fence, its
 * callers do (once per call in cin_normalize, once per thread after the small batches).  act,
 * res: constants in each instantiation (cin_normalize below). */
static inline __attribute__((always_inline)) void
CIN_FN(cin_normalize_body)(const CIN_T *x, CIN_T *y, const CIN_T *r, ptrdiff_t n, CIN_T k,
                           CIN_T alpha, CIN_T beta, const int act, CIN_T s, const int res,
                           int stream)
{
#define CIN_NORM_ARGS(j) (x, r, j, k, alpha, beta, act, s, res)
    ptrdiff_t i = 0;
#ifdef CIN_STREAM
    if (stream) {
        for (; i < n && ((uintptr_t)(y + i) % CIN_VEC_BYTES) != 0; i++)
            y[i] = CIN_FN(cin_norm_at) CIN_NORM_ARGS(i);
        for (; i + CIN_VLEN <= n; i += CIN_VLEN)
            CIN_STREAM(y + i, CIN_FN(cin_vnorm_at) CIN_NORM_ARGS(i));
    }
#else
    (void)stream;
#endif
    if (i == 0 && (cin_store_ahead(y, x) || (res && cin_store_ahead(y, r)))) {
        /* from the end (see cin_store_ahead): the same arithmetic, element by element */
        ptrdiff_t m = n - n % CIN_VLEN;
        for (ptrdiff_t j = m; j < n; j++) y[j] = CIN_FN(cin_norm_at) CIN_NORM_ARGS(j);
        for (ptrdiff_t j = m - CIN_VLEN; j >= 0; j -= CIN_VLEN) {
            CIN_FN(cin_vec) v = CIN_FN(cin_vnorm_at) CIN_NORM_ARGS(j);
            memcpy(y + j, &v, sizeof v);
        }
        return;
    }
    /* SiLU and the GELUs in explicit vectors (the loop below vectorizes the selects of ReLU
     * and LeakyReLU by itself, not the vector exp and CDF) */
    if (act >= CIN_ACT_SILU)
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            CIN_FN(cin_vec) v = CIN_FN(cin_vnorm_at) CIN_NORM_ARGS(i);
            memcpy(y + i, &v, sizeof v);
        }
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) y[j] = CIN_FN(cin_norm_at) CIN_NORM_ARGS(j);
#undef CIN_NORM_ARGS
}

static void CIN_FN(cin_normalize)(const CIN_T *x, CIN_T *y, const CIN_T *r, ptrdiff_t n,
                                  CIN_T k, CIN_T alpha, CIN_T beta, int act, CIN_T s,
                                  int stream)
{
#define CIN_BODY(A, R) CIN_FN(cin_normalize_body)(x, y, r, n, k, alpha, beta, A, s, R, stream)
    CIN_ACT_SWITCH(act, r != NULL)
#undef CIN_BODY
    if (stream) cin_store_fence();
}

/* Instance statistics of n <= CIN_SMALL_BATCH consecutive planes of L <= CIN_BLOCK elements
 * (plane j at x + j * L, parameter index p0 + j: weight[(p0 + j) % w_n], 1 when w_n is 0; bias
 * likewise, 0): mean, biased var and rstd in double, and the coefficients of each plane's y =
 * (x - kk[j]) * ca[j] + cb[j] (cin_small_norm_body).  The same arithmetic as cin_chunk_stats
 * followed by cin_normalize, plane by plane, but the per-plane scalar steps (divisions, square
 * root) run across the batch, in vectors, instead of as one long dependency chain per plane:
 * small planes are otherwise latency bound. */
static inline __attribute__((always_inline)) void
CIN_FN(cin_small_stats_body)(const CIN_T *x, ptrdiff_t n, ptrdiff_t L, ptrdiff_t p0,
                             const double *w, ptrdiff_t w_n, const double *b, ptrdiff_t b_n,
                             double eps, double *mean, double *var, double *rstd, CIN_T *kk,
                             CIN_T *ca, CIN_T *cb)
{
    double s[CIN_SMALL_BATCH], q[CIN_SMALL_BATCH], wv[CIN_SMALL_BATCH], bv[CIN_SMALL_BATCH];
    CIN_T k[CIN_SMALL_BATCH];
    const double dl = (double)L, inv_l = 1.0 / dl;
    ptrdiff_t wi = w_n ? p0 % w_n : 0, bi = b_n ? p0 % b_n : 0;
    if (n > CIN_SMALL_BATCH) n = CIN_SMALL_BATCH;
    /* the lane sums of cin_sum and of cin_shifted_sums, across the batch at once
     * (cin_hsum_batch, the same bits) */
    CIN_FN(cin_vec) v[2 * CIN_SMALL_BATCH];
    CIN_T t[2 * CIN_SMALL_BATCH];
    const ptrdiff_t rest = L - L % CIN_VLEN;  /* where the vector parts stop */
    const CIN_FN(cin_vec) zero = {0};
    for (ptrdiff_t j = 0; j < n; j++) CIN_FN(cin_vsum)(x + j * L, L, &v[j]);
    for (ptrdiff_t j = n; j < CIN_SMALL_BATCH; j++) v[j] = zero;
    CIN_FN(cin_hsum_batch)(v, CIN_SMALL_BATCH, t);
    if (rest < L)
        for (ptrdiff_t j = 0; j < n; j++)
            for (ptrdiff_t i = rest; i < L; i++) t[j] += x[j * L + i];
    for (ptrdiff_t j = 0; j < n; j++) {
        s[j] = (double)t[j];
        wv[j] = w_n ? w[wi] : 1.0;
        bv[j] = b_n ? b[bi] : 0.0;
        if (w_n && ++wi == w_n) wi = 0;
        if (b_n && ++bi == b_n) bi = 0;
    }
    for (ptrdiff_t j = 0; j < n; j++) k[j] = (CIN_T)(s[j] / dl);
    for (ptrdiff_t j = 0; j < n; j++)
        CIN_FN(cin_shifted_vsums)(x + j * L, L, k[j], &v[j], &v[CIN_SMALL_BATCH + j]);
    for (ptrdiff_t j = n; j < CIN_SMALL_BATCH; j++) v[j] = v[CIN_SMALL_BATCH + j] = zero;
    CIN_FN(cin_hsum_batch)(v, 2 * CIN_SMALL_BATCH, t);
    if (rest < L)
        for (ptrdiff_t j = 0; j < n; j++)
            CIN_FN(cin_shifted_tail)(x + j * L, rest, L, k[j], t[j], t[CIN_SMALL_BATCH + j],
                                     &t[j], &t[CIN_SMALL_BATCH + j]);
    for (ptrdiff_t j = 0; j < n; j++) {
        s[j] = (double)t[j];
        q[j] = (double)t[CIN_SMALL_BATCH + j];
    }
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        double dm = s[j] / dl;
        double m2 = q[j] - s[j] * dm;
        double mu = (double)k[j] + dm;
        double v = (m2 < 0.0 ? 0.0 : m2) * inv_l;
        double rr = 1.0 / sqrt(v + eps);
        mean[j] = mu;
        var[j] = v;
        rstd[j] = rr;
        CIN_T kj = (CIN_T)mu;
        double al = rr * wv[j];
        kk[j] = kj;
        ca[j] = (CIN_T)al;
        cb[j] = (CIN_T)(bv[j] - (mu - (double)kj) * al);
    }
}

/* y of the batch from its coefficients (cin_small_stats_body) */
static inline __attribute__((always_inline)) void
CIN_FN(cin_small_norm_body)(const CIN_T *x, CIN_T *y, ptrdiff_t n, ptrdiff_t L,
                            const CIN_T *kk, const CIN_T *ca, const CIN_T *cb, const CIN_T *r,
                            const int act, CIN_T slope, const int res, int stream)
{
    for (ptrdiff_t j = 0; j < n; j++)
        CIN_FN(cin_normalize_body)(x + j * L, y + j * L, res ? r + j * L : NULL, L, kk[j],
                                   ca[j], cb[j], act, slope, res, stream);
}

/* The small-plane forward of n planes (any number), batch by batch: the statistics of
 * CIN_SMALL_BATCH planes, then their y.  The plane loops are inlined (one instantiation per
 * activation and residual, cin_small_forward below), and with stream the caller fences once
 * after its last batch (a fence per plane of 64 elements made streaming stores 2-3x slower
 * than cached ones).  (Software-pipelined, the statistics of batch i before y of batch i - 1,
 * it measured no faster for tiny float32 and 1.2-1.4x the time for float64, Zen 4 VM.) */
static inline __attribute__((always_inline)) void
CIN_FN(cin_small_forward_body)(const CIN_T *x, CIN_T *y, ptrdiff_t n, ptrdiff_t L, ptrdiff_t p0,
                               const double *w, ptrdiff_t w_n, const double *b, ptrdiff_t b_n,
                               double eps, double *mean, double *var, double *rstd,
                               const CIN_T *r, const int act, CIN_T slope, const int res,
                               int stream)
{
    CIN_T c[3][CIN_SMALL_BATCH];
    for (ptrdiff_t i = 0; i < n; i += CIN_SMALL_BATCH) {
        ptrdiff_t m = n - i < CIN_SMALL_BATCH ? n - i : CIN_SMALL_BATCH;
        CIN_FN(cin_small_stats_body)(x + i * L, m, L, p0 + i, w, w_n, b, b_n, eps, mean + i,
                                     var + i, rstd + i, c[0], c[1], c[2]);
        CIN_FN(cin_small_norm_body)(x + i * L, y + i * L, m, L, c[0], c[1], c[2],
                                    res ? r + i * L : NULL, act, slope, res, stream);
    }
}

static void CIN_FN(cin_small_forward)(const CIN_T *x, CIN_T *y, ptrdiff_t n, ptrdiff_t L,
                                      ptrdiff_t p0, const double *w, ptrdiff_t w_n,
                                      const double *b, ptrdiff_t b_n, double eps, double *mean,
                                      double *var, double *rstd, const CIN_T *r, int act,
                                      CIN_T slope, int stream)
{
#define CIN_BODY(A, R) CIN_FN(cin_small_forward_body)(x, y, n, L, p0, w, w_n, b, b_n, eps, mean, \
                                                      var, rstd, r, A, slope, R, stream)
    CIN_ACT_SWITCH(act, r != NULL)
#undef CIN_BODY
}

/* Backward sums over n elements: *sdy = sum(g), *sdyx = sum(g * (x - k)), accumulated in
 * CIN_T inside blocks and in double across blocks.  g = dy without an activation, else the
 * gradient through it, dy * act'(t), with the pre-activation t = (x - k) * af + bf recomputed
 * from x (the forward's coefficients). */
static inline __attribute__((always_inline)) void
CIN_FN(cin_backward_sums_body)(const CIN_T *CIN_RESTRICT dy, const CIN_T *CIN_RESTRICT x,
                               ptrdiff_t n, CIN_T k, CIN_T af, CIN_T bf, const int act,
                               CIN_T s, double *sdy, double *sdyx)
{
    double tot_g = 0.0, tot_gx = 0.0;
    for (ptrdiff_t b = 0; b < n; b += CIN_BLOCK) {
        ptrdiff_t nb = n - b < CIN_BLOCK ? n - b : CIN_BLOCK;
        const CIN_T *g = dy + b, *v = x + b;
        typedef CIN_FN(cin_vec) V;
        V a0 = {0}, a1 = {0}, q0 = {0}, q1 = {0};
        ptrdiff_t i = 0;
        if (nb >= 2 * CIN_VLEN) {  /* the first step starts the sums (see cin_vsum) */
            V v0 = CIN_FN(cin_load)(v) - k, v1 = CIN_FN(cin_load)(v + CIN_VLEN) - k;
            a0 = CIN_FN(cin_load)(g);
            a1 = CIN_FN(cin_load)(g + CIN_VLEN);
            if (act) {
                a0 = CIN_FN(cin_vact_grad)(v0 * af + bf, a0, act, s);
                a1 = CIN_FN(cin_vact_grad)(v1 * af + bf, a1, act, s);
            }
            q0 = a0 * v0;
            q1 = a1 * v1;
            i = 2 * CIN_VLEN;
        }
        for (; i + 2 * CIN_VLEN <= nb; i += 2 * CIN_VLEN) {
            V g0 = CIN_FN(cin_load)(g + i), g1 = CIN_FN(cin_load)(g + i + CIN_VLEN);
            V v0 = CIN_FN(cin_load)(v + i) - k, v1 = CIN_FN(cin_load)(v + i + CIN_VLEN) - k;
            if (act) {
                g0 = CIN_FN(cin_vact_grad)(v0 * af + bf, g0, act, s);
                g1 = CIN_FN(cin_vact_grad)(v1 * af + bf, g1, act, s);
            }
            a0 += g0; q0 += g0 * v0;
            a1 += g1; q1 += g1 * v1;
        }
        CIN_T ta = CIN_FN(cin_hsum)(a0 + a1), tq = CIN_FN(cin_hsum)(q0 + q1);
        for (; i < nb; i++) {
            CIN_T d = v[i] - k, gi = g[i];
            if (act) gi = CIN_FN(cin_act_grad)(d * af + bf, gi, act, s);
            ta += gi; tq += gi * d;
        }
        tot_g += (double)ta;
        tot_gx += (double)tq;
    }
    *sdy = tot_g;
    *sdyx = tot_gx;
}

static void CIN_FN(cin_backward_sums)(const CIN_T *dy, const CIN_T *x, ptrdiff_t n, CIN_T k,
                                      CIN_T af, CIN_T bf, int act, CIN_T s, double *sdy,
                                      double *sdyx)
{
#define CIN_BODY(A, R) CIN_FN(cin_backward_sums_body)(dy, x, n, k, af, bf, A, s, sdy, sdyx)
    CIN_ACT_SWITCH(act, 0)
#undef CIN_BODY
}

/* dx[j] = a * g + b * (x[j] - k) + c, or a * g with fixed statistics, where g = dy[j] or
 * with an activation its gradient at (x[j] - k) * af + bf; x is read only with act or !fixed.
 * One element and one vector at j: the expression every loop of cin_backward_dx_body stores. */
static inline __attribute__((always_inline)) CIN_T
CIN_FN(cin_dx_at)(const CIN_T *dy, const CIN_T *x, ptrdiff_t j, CIN_T k, CIN_T a, CIN_T b,
                  CIN_T c, CIN_T af, CIN_T bf, const int act, CIN_T s, const int fixed)
{
    CIN_T g = dy[j];
    if (act) g = CIN_FN(cin_act_grad)((x[j] - k) * af + bf, g, act, s);
    return fixed ? a * g : a * g + b * (x[j] - k) + c;
}

static inline __attribute__((always_inline)) CIN_FN(cin_vec)
CIN_FN(cin_vdx_at)(const CIN_T *dy, const CIN_T *x, ptrdiff_t j, CIN_T k, CIN_T a, CIN_T b,
                   CIN_T c, CIN_T af, CIN_T bf, const int act, CIN_T s, const int fixed)
{
    CIN_FN(cin_vec) g = CIN_FN(cin_load)(dy + j), v = {0};
    if (act || !fixed) v = CIN_FN(cin_load)(x + j);
    if (act) g = CIN_FN(cin_vact_grad)((v - k) * af + bf, g, act, s);
    return fixed ? a * g : a * g + b * (v - k) + c;
}

/* dx = a * g + b * (x - k) + c  (the input-statistics gradient, rearranged per plane), or
 * with fixed (running) statistics dx = a * g, which reads x only for an activation's g (g as
 * in cin_backward_sums_body).  dx may be dy itself.  No store fence (as cin_normalize_body). */
static inline __attribute__((always_inline)) void
CIN_FN(cin_backward_dx_body)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n, CIN_T k,
                             CIN_T a, CIN_T b, CIN_T c, CIN_T af, CIN_T bf, const int act,
                             CIN_T s, const int fixed, int stream)
{
#define CIN_DX_ARGS(j) (dy, x, j, k, a, b, c, af, bf, act, s, fixed)
    ptrdiff_t i = 0;
#ifdef CIN_STREAM
    if (stream) {
        for (; i < n && ((uintptr_t)(dx + i) % CIN_VEC_BYTES) != 0; i++)
            dx[i] = CIN_FN(cin_dx_at) CIN_DX_ARGS(i);
        for (; i + CIN_VLEN <= n; i += CIN_VLEN)
            CIN_STREAM(dx + i, CIN_FN(cin_vdx_at) CIN_DX_ARGS(i));
    }
#else
    (void)stream;
#endif
    if (i == 0 && (cin_store_ahead(dx, dy) || ((act || !fixed) && cin_store_ahead(dx, x)))) {
        /* from the end, as in cin_normalize_body */
        ptrdiff_t m = n - n % CIN_VLEN;
        for (ptrdiff_t j = m; j < n; j++) dx[j] = CIN_FN(cin_dx_at) CIN_DX_ARGS(j);
        for (ptrdiff_t j = m - CIN_VLEN; j >= 0; j -= CIN_VLEN) {
            CIN_FN(cin_vec) v = CIN_FN(cin_vdx_at) CIN_DX_ARGS(j);
            memcpy(dx + j, &v, sizeof v);
        }
        return;
    }
    if (act >= CIN_ACT_SILU)    /* as in cin_normalize_body */
        for (; i + CIN_VLEN <= n; i += CIN_VLEN) {
            CIN_FN(cin_vec) v = CIN_FN(cin_vdx_at) CIN_DX_ARGS(i);
            memcpy(dx + i, &v, sizeof v);
        }
#pragma omp simd
    for (ptrdiff_t j = i; j < n; j++) dx[j] = CIN_FN(cin_dx_at) CIN_DX_ARGS(j);
#undef CIN_DX_ARGS
}

static void CIN_FN(cin_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                    CIN_T k, CIN_T a, CIN_T b, CIN_T c, CIN_T af, CIN_T bf,
                                    int act, CIN_T s, int stream)
{
#define CIN_BODY(A, R) CIN_FN(cin_backward_dx_body)(dy, x, dx, n, k, a, b, c, af, bf, A, s, 0,  \
                                                    stream)
    CIN_ACT_SWITCH(act, 0)
#undef CIN_BODY
    if (stream) cin_store_fence();
}

/* dx = a * g  (fixed running statistics: no gradient through the statistics); x, k, af, bf
 * are read only with an activation (x may then be NULL). */
static void CIN_FN(cin_scale)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n, CIN_T a,
                              CIN_T k, CIN_T af, CIN_T bf, int act, CIN_T s, int stream)
{
#define CIN_BODY(A, R) CIN_FN(cin_backward_dx_body)(dy, x, dx, n, k, a, 0, 0, af, bf, A, s, 1,  \
                                                    stream)
    CIN_ACT_SWITCH(act, 0)
#undef CIN_BODY
    if (stream) cin_store_fence();
}

/* Backward of n <= CIN_SMALL_BATCH consecutive planes of L <= CIN_BLOCK elements (plane j at
 * dy/x/dx + j * L, parameter index p0 + j: mean[(p0 + j) % m_n] (0 when m_n is 0), rstd
 * (1), weight (1), bias (0, read only with an activation) likewise): per-plane sums(g) and
 * sum(g * xhat), then dx.  The arithmetic of cin_backward_sums and cin_backward_dx /
 * cin_scale, plane by plane, with the parameter lookups done once per batch and (as in
 * cin_small_forward) the per-plane coefficient steps between the two passes run across the
 * batch, in vectors, instead of as a dependency chain in front of each plane's dx.  The plane
 * loops are inlined (one instantiation per activation, cin_small_backward below); with stream
 * the caller fences after its last batch. */
static inline __attribute__((always_inline)) void
CIN_FN(cin_small_backward_body)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                ptrdiff_t L, ptrdiff_t p0, const double *mean, ptrdiff_t m_n,
                                const double *rstd, ptrdiff_t r_n, const double *w,
                                ptrdiff_t w_n, int use_input_stats, double *sum_dy,
                                double *sum_dy_xhat, const double *bias, ptrdiff_t b_n,
                                const int act, CIN_T slope, int stream, CIN_T *gb)
{
    double mu[CIN_SMALL_BATCH], rs[CIN_SMALL_BATCH], wv[CIN_SMALL_BATCH];
    double sg[CIN_SMALL_BATCH], sc[CIN_SMALL_BATCH];
    CIN_T k[CIN_SMALL_BATCH], af[CIN_SMALL_BATCH], bf[CIN_SMALL_BATCH];
    CIN_T ca[CIN_SMALL_BATCH], cb[CIN_SMALL_BATCH], cc[CIN_SMALL_BATCH];
    const double inv_l = 1.0 / (double)L;
    ptrdiff_t mi = m_n ? p0 % m_n : 0, ri = r_n ? p0 % r_n : 0, wi = w_n ? p0 % w_n : 0;
    ptrdiff_t bi = b_n ? p0 % b_n : 0;
    if (n > CIN_SMALL_BATCH) n = CIN_SMALL_BATCH;
    for (ptrdiff_t j = 0; j < n; j++) {
        mu[j] = m_n ? mean[mi] : 0.0;
        rs[j] = r_n ? rstd[ri] : 1.0;
        wv[j] = w_n ? w[wi] : 1.0;
        if (m_n && ++mi == m_n) mi = 0;
        if (r_n && ++ri == r_n) ri = 0;
        if (w_n && ++wi == w_n) wi = 0;
        k[j] = (CIN_T)mu[j];
        af[j] = bf[j] = 0;
        if (act) {  /* the forward's t = (x - k) * af + bf */
            double al = rs[j] * wv[j];
            af[j] = (CIN_T)al;
            bf[j] = (CIN_T)((b_n ? bias[bi] : 0.0) - (mu[j] - (double)k[j]) * al);
            if (b_n && ++bi == b_n) bi = 0;
        }
    }
    /* a line of each stream CIN_SMALL_PF_BYTES ahead (a prefetch never faults) */
    __builtin_prefetch((const char *)dy + CIN_SMALL_PF_BYTES, 0, 3);
    __builtin_prefetch((const char *)x + CIN_SMALL_PF_BYTES, 0, 3);
    __builtin_prefetch((const char *)dx + CIN_SMALL_PF_BYTES, 1, 3);
    /* gb (SiLU and the GELUs): g once per element into gb (the bits the passes below would
     * compute for it), then the passes on it without the activation */
    const int a2 = gb ? CIN_ACT_NONE : act;
    if (gb) {
        for (ptrdiff_t j = 0; j < n; j++)
            CIN_FN(cin_backward_dx_body)(dy + j * L, x + j * L, gb + j * L, L, k[j], 1, 0, 0,
                                         af[j], bf[j], act, slope, 1, 0);
        dy = gb;
    }
    for (ptrdiff_t j = 0; j < n; j++)
        CIN_FN(cin_backward_sums_body)(dy + j * L, x + j * L, L, k[j], af[j], bf[j], a2, slope,
                                       &sg[j], &sc[j]);
#pragma omp simd
    for (ptrdiff_t j = 0; j < n; j++) {
        double sj = sc[j] + ((double)k[j] - mu[j]) * sg[j];  /* centred: sum(g * (x - mean)) */
        double a = wv[j] * rs[j];
        double b = use_input_stats ? -a * rs[j] * rs[j] * sj * inv_l : 0.0;
        double c = use_input_stats ? -a * sg[j] * inv_l + b * ((double)k[j] - mu[j]) : 0.0;
        ca[j] = (CIN_T)a;
        cb[j] = (CIN_T)b;
        cc[j] = (CIN_T)c;
        sum_dy[j] = sg[j];
        sum_dy_xhat[j] = sj * rs[j];
    }
    for (ptrdiff_t j = 0; j < n; j++) {
        if (use_input_stats)
            CIN_FN(cin_backward_dx_body)(dy + j * L, x + j * L, dx + j * L, L, k[j], ca[j],
                                         cb[j], cc[j], af[j], bf[j], a2, slope, 0, stream);
        else
            CIN_FN(cin_backward_dx_body)(dy + j * L, x + j * L, dx + j * L, L, k[j], ca[j], 0, 0,
                                         af[j], bf[j], a2, slope, 1, stream);
    }
}

/* cin_small_backward_body on the n planes (any number) from plane p0 on, batch by batch, in
 * the scope of cin_small_backward's arguments */
#define CIN_SMALL_BACKWARD_BATCHES(A, G)                                                        \
    for (ptrdiff_t i_ = 0; i_ < n; i_ += CIN_SMALL_BATCH)                                       \
    CIN_FN(cin_small_backward_body)(dy + i_ * L, x + i_ * L, dx + i_ * L, n - i_, L, p0 + i_,   \
                                    mean, m_n, rstd, r_n, w, w_n, use_input_stats, sum_dy + i_, \
                                    sum_dy_xhat + i_, bias, b_n, A, slope, stream, G)

/* Through SiLU or a GELU, with g on this frame's stack (out of line, so that the other
 * instantiations keep a small frame). */
static __attribute__((noinline)) void
CIN_FN(cin_small_backward_g)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                             ptrdiff_t L, ptrdiff_t p0, const double *mean, ptrdiff_t m_n,
                             const double *rstd, ptrdiff_t r_n, const double *w, ptrdiff_t w_n,
                             int use_input_stats, double *sum_dy, double *sum_dy_xhat,
                             const double *bias, ptrdiff_t b_n, int act, CIN_T slope, int stream)
{
    CIN_T gb[CIN_SMALL_BATCH * CIN_BLOCK];
    CIN_SMALL_BACKWARD_BATCHES(act, gb);
}

/* The small-plane backward of n planes (any number; plane j at dy/x/dx + j * L, parameters as
 * cin_small_backward_body reads them from index p0 + j, sums into sum_dy[j], sum_dy_xhat[j]) */
static void CIN_FN(cin_small_backward)(const CIN_T *dy, const CIN_T *x, CIN_T *dx, ptrdiff_t n,
                                       ptrdiff_t L, ptrdiff_t p0, const double *mean,
                                       ptrdiff_t m_n, const double *rstd, ptrdiff_t r_n,
                                       const double *w, ptrdiff_t w_n, int use_input_stats,
                                       double *sum_dy, double *sum_dy_xhat, const double *bias,
                                       ptrdiff_t b_n, int act, CIN_T slope, int stream)
{
    if (act >= CIN_ACT_SILU) {
        CIN_FN(cin_small_backward_g)(dy, x, dx, n, L, p0, mean, m_n, rstd, r_n, w, w_n,
                                     use_input_stats, sum_dy, sum_dy_xhat, bias, b_n, act, slope,
                                     stream);
        return;
    }
#define CIN_BODY(A, R) CIN_SMALL_BACKWARD_BATCHES(A, NULL)
    CIN_ACT_SWITCH(act, 0)
#undef CIN_BODY
}
#undef CIN_SMALL_BACKWARD_BATCHES

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
static inline __attribute__((always_inline)) void
CIN_FN(cin_cl_block_sums)(const CIN_T *CIN_RESTRICT x, const CIN_T *CIN_RESTRICT g, ptrdiff_t nb,
                          ptrdiff_t w, ptrdiff_t ld, const CIN_T *CIN_RESTRICT k,
                          CIN_T *CIN_RESTRICT s1, CIN_T *CIN_RESTRICT s2, int step, int pf,
                          const CIN_T *CIN_RESTRICT af, const CIN_T *CIN_RESTRICT bf,
                          const int act, CIN_T sl)
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
            V kv = CIN_FN(cin_load)(k + c), afv = {0}, bfv = {0};
            V a = CIN_FN(cin_load)(s1 + c), q = CIN_FN(cin_load)(s2 + c);
            if (act) { afv = CIN_FN(cin_load)(af + c); bfv = CIN_FN(cin_load)(bf + c); }
            for (int t = 0; t < m; t++) {
                V d = CIN_FN(cin_load)(xr + t * ld + c) - kv;
                if (g) {
                    V gv = CIN_FN(cin_load)(gr + t * ld + c);
                    if (act) gv = CIN_FN(cin_vact_grad)(d * afv + bfv, gv, act, sl);
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
                if (g) {
                    CIN_T gv = gr[t * ld + c];
                    if (act) gv = CIN_FN(cin_act_grad)(d * af[c] + bf[c], gv, act, sl);
                    s1[c] += gv; s2[c] += gv * d;
                }
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
        CIN_FN(cin_cl_block_sums)(x, NULL, head, w, ld, k, s1, s2, CIN_CL_STATS_STEP, pf, NULL,
                                  NULL, 0, 0);
        for (ptrdiff_t c = 0; c < w; c++) k[c] = (CIN_T)((double)s1[c] / (double)head);
    }
    double cnt = 0.0;
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BLOCK ? rows - b : CIN_CL_BLOCK;
        CIN_FN(cin_cl_block_sums)(x + b * ld, NULL, nb, w, ld, k, s1, s2, CIN_CL_STATS_STEP,
                                  pf, NULL, NULL, 0, 0);
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

/* Per-lane backward sums: sdy[c] = sum(g), sdyx[c] = sum(g * (x - k[c])), in CIN_T within
 * blocks of CIN_CL_BWD_BLOCK rows and in double across blocks; g = dy, or with an activation
 * dy * act'(t), t = (x - k[c]) * af[c] + bf[c].  s1, s2: scratch of w. */
static inline __attribute__((always_inline)) void
CIN_FN(cin_cl_backward_sums_body)(const CIN_T *CIN_RESTRICT dy, const CIN_T *CIN_RESTRICT x,
                                  ptrdiff_t rows, ptrdiff_t w, ptrdiff_t ld,
                                  const CIN_T *CIN_RESTRICT k, CIN_T *CIN_RESTRICT s1,
                                  CIN_T *CIN_RESTRICT s2, double *sdy, double *sdyx, int pf,
                                  const CIN_T *af, const CIN_T *bf, const int act, CIN_T sl)
{
    for (ptrdiff_t c = 0; c < w; c++) { sdy[c] = 0.0; sdyx[c] = 0.0; }
    for (ptrdiff_t b = 0; b < rows; b += CIN_CL_BWD_BLOCK) {
        ptrdiff_t nb = rows - b < CIN_CL_BWD_BLOCK ? rows - b : CIN_CL_BWD_BLOCK;
        CIN_FN(cin_cl_block_sums)(x + b * ld, dy + b * ld, nb, w, ld, k, s1, s2,
                                  CIN_CL_BWD_STEP, pf, af, bf, act, sl);
        for (ptrdiff_t c = 0; c < w; c++) { sdy[c] += (double)s1[c]; sdyx[c] += (double)s2[c]; }
    }
}

static void CIN_FN(cin_cl_backward_sums)(const CIN_T *dy, const CIN_T *x, ptrdiff_t rows,
                                         ptrdiff_t w, ptrdiff_t ld, const CIN_T *k, CIN_T *s1,
                                         CIN_T *s2, double *sdy, double *sdyx, int pf,
                                         const CIN_T *af, const CIN_T *bf, int act, CIN_T sl)
{
#define CIN_BODY(A, R) CIN_FN(cin_cl_backward_sums_body)(dy, x, rows, w, ld, k, s1, s2, sdy,     \
                                                         sdyx, pf, af, bf, A, sl)
    CIN_ACT_SWITCH(act, 0)
#undef CIN_BODY
}

/* The elementwise channels-last passes: y[r, c] = act((x[r, c] - k[c]) * a[c] + b[c]) +
 * res[r, c] (bwd == 0; res only when given), or dx[r, c] = a[c] * g + b[c] * (x[r, c] - k[c]) +
 * cc[c] (bwd), with g = dy[r, c] or, with an activation, the gradient through it at
 * t = (x[r, c] - k[c]) * af[c] + bf[c]; fixed: dx = a[c] * g.  out may be x, dy or res itself.
 * stream: non-temporal stores.  With ld == w the rows are one flat run of rows * w elements
 * (aligned stores need not start a row): lane o of an element is its index modulo w, and the
 * coefficients are read as vectors at k + o, so they must hold w + CIN_VLEN lanes, periodic in
 * w (k[w + j] = k[j]), and w >= CIN_VLEN (else, or with ld > w, plain stores). */
#define CIN_CL_G(i, o) (act ? CIN_FN(cin_act_grad)((x[i] - k[o]) * af[o] + bf[o], dy[i], act, sl) \
                            : dy[i])
#define CIN_CL_ELEM(i, o) (bwd ? (fixed ? a[o] * CIN_CL_G(i, o)                                  \
                                        : a[o] * CIN_CL_G(i, o) + b[o] * (x[i] - k[o]) + cc[o])   \
                               : ({ CIN_T v_ = CIN_FN(cin_act)((x[i] - k[o]) * a[o] + b[o], act, \
                                                               sl);                              \
                                    if (res) v_ += rs[i];                                        \
                                    v_; }))
static inline __attribute__((always_inline)) void
CIN_FN(cin_cl_apply)(const CIN_T *x, const CIN_T *dy, CIN_T *out, ptrdiff_t rows, ptrdiff_t w,
                     ptrdiff_t ld, const CIN_T *k, const CIN_T *a, const CIN_T *b,
                     const CIN_T *cc, const CIN_T *rs, const CIN_T *af, const CIN_T *bf,
                     const int act, CIN_T sl, const int res, const int bwd, const int fixed,
                     int stream)
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
            if (bwd) {
                V g = CIN_FN(cin_load)(dy + i);
                if (act)
                    g = CIN_FN(cin_vact_grad)(v * CIN_FN(cin_load)(af + o)
                                              + CIN_FN(cin_load)(bf + o), g, act, sl);
                if (fixed) v = CIN_FN(cin_load)(a + o) * g;
                else v = CIN_FN(cin_load)(a + o) * g + CIN_FN(cin_load)(b + o) * v
                         + CIN_FN(cin_load)(cc + o);
            } else {
                v = CIN_FN(cin_vact)(v * CIN_FN(cin_load)(a + o) + CIN_FN(cin_load)(b + o), act,
                                     sl);
                if (res) v += CIN_FN(cin_load)(rs + i);
            }
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
        if (bwd) {
            const CIN_T *gr = dy + r * ld;
#pragma omp simd
            for (ptrdiff_t c = 0; c < w; c++) {
                CIN_T g = gr[c];
                if (act) g = CIN_FN(cin_act_grad)((xr[c] - k[c]) * af[c] + bf[c], g, act, sl);
                yr[c] = fixed ? a[c] * g : a[c] * g + b[c] * (xr[c] - k[c]) + cc[c];
            }
        } else {
            const CIN_T *rr = res ? rs + r * ld : NULL;
#pragma omp simd
            for (ptrdiff_t c = 0; c < w; c++) {
                CIN_T v = CIN_FN(cin_act)((xr[c] - k[c]) * a[c] + b[c], act, sl);
                if (res) v += rr[c];
                yr[c] = v;
            }
        }
    }
}
#undef CIN_CL_ELEM
#undef CIN_CL_G

/* y = act((x - k) * a + b) + res (res may be NULL) */
static void CIN_FN(cin_cl_normalize)(const CIN_T *x, CIN_T *y, ptrdiff_t rows, ptrdiff_t w,
                                     ptrdiff_t ld, const CIN_T *k, const CIN_T *a, const CIN_T *b,
                                     const CIN_T *res, int act, CIN_T sl, int stream)
{
#define CIN_BODY(A, R) CIN_FN(cin_cl_apply)(x, NULL, y, rows, w, ld, k, a, b, NULL, res, NULL,   \
                                            NULL, A, sl, R, 0, 0, stream)
    CIN_ACT_SWITCH(act, res != NULL)
#undef CIN_BODY
}

/* dx from the gradient coefficients; cc == NULL: fixed statistics, dx = a * g (b unused). */
static void CIN_FN(cin_cl_backward_dx)(const CIN_T *dy, const CIN_T *x, CIN_T *dx,
                                       ptrdiff_t rows, ptrdiff_t w, ptrdiff_t ld, const CIN_T *k,
                                       const CIN_T *a, const CIN_T *b, const CIN_T *cc,
                                       const CIN_T *af, const CIN_T *bf, int act, CIN_T sl,
                                       int stream)
{
#define CIN_BODY(A, F) CIN_FN(cin_cl_apply)(x, dy, dx, rows, w, ld, k, a, b, cc, NULL, af, bf,   \
                                            A, sl, 0, 1, F, stream)
    CIN_ACT_SWITCH(act, cc == NULL)
#undef CIN_BODY
}

#undef CIN_STREAM
#undef CIN_VLEN
#undef CIN_FN
#undef CIN_CAT3
#undef CIN_CAT3_
#undef CIN_CAT2
#undef CIN_CAT2_
