/* SIMD inner loops of cinstnorm, instantiated for float and double and, on x86-64 with gcc or
 * clang, for three instruction sets chosen at run time.
 *
 * Cython cannot emit `#pragma omp simd`, and gcc does not vectorize a floating-point reduction
 * without reassociation, so the hot loops live here as small functions that the Cython drivers
 * call under nogil.  Reductions use four independent vector accumulators per sum, so they
 * are throughput bound rather than latency bound; elementwise loops use `#pragma omp simd`.
 *
 * Layout of the code: cinstnorm_kernels_impl.h holds each loop once; cin_isa.h instantiates it
 * for float and double under one instruction set; this file includes cin_isa.h once per ISA
 * (baseline, then AVX2+FMA and AVX-512F inside `#pragma GCC target` regions) and keeps a table
 * of function pointers that cin_select_isa() fills.  The public entry points cin_<op>_<f|d>
 * call through that table.
 */
#ifndef CINSTNORM_KERNELS_H
#define CINSTNORM_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#define CIN_RESTRICT __restrict
#define CIN_ALWAYS_INLINE __forceinline
#else
#define CIN_RESTRICT __restrict__
#define CIN_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CIN_X86_DISPATCH 1
#include <immintrin.h>
#else
#define CIN_X86_DISPATCH 0
#endif

/* Elements per statistics block: partial sums stay in the input precision inside a block and
 * are merged across blocks in double (Chan et al.), which bounds float32 rounding growth. */
#define CIN_BLOCK 1024
/* Rows per statistics block in the channels-last kernels (each channel sums this many values). */
#define CIN_CL_BLOCK 256
/* Small planes (at most CIN_BLOCK elements) go through the instance-statistics forward in
 * batches of this many (cin_small_forward). */
#define CIN_SMALL_BATCH 8
/* (cin_hsum_batch reduces 2 * CIN_SMALL_BATCH sums at once: a power of two, at most 16) */
_Static_assert(CIN_SMALL_BATCH == 1 || CIN_SMALL_BATCH == 2 || CIN_SMALL_BATCH == 4 ||
               CIN_SMALL_BATCH == 8, "CIN_SMALL_BATCH must be 1, 2, 4 or 8");
/* The small-plane backward touches each stream this far ahead of a batch, one prefetch per
 * stream and batch: the page's TLB entry and first lines are there before the batch reaches
 * it (numpy's arrays are partly on 4 KiB pages, where the hardware prefetchers stop at each
 * page's end).  Tiny-plane float32 backward, Intel Xeon VM, 2 threads: 275 us without, 266
 * at 2 KiB, 262 at 16 KiB, 283 at 32 KiB and beyond. */
#define CIN_SMALL_PF_BYTES 16384
/* Rows per block of the channels-last backward sums: each lane sums one product per row, so
 * shorter runs than the statistics' keep the float32 error of sum(dy * (x - k)) small. */
#define CIN_CL_BWD_BLOCK 64
/* Rows the channels-last sums read per step (cin_cl_block_sums): four interleaved rows of x
 * for the statistics, one row each of dy and x for the backward (of 1 and 4, each measured
 * faster for its pass on the Zen 3 development VM). */
#define CIN_CL_STATS_STEP 4
#define CIN_CL_BWD_STEP 1

/* Fused activation codes (cinstnorm._validation.ACTIVATIONS maps the names to them). */
#define CIN_ACT_NONE 0
#define CIN_ACT_RELU 1
#define CIN_ACT_LEAKY_RELU 2
#define CIN_ACT_SILU 3
#define CIN_ACT_GELU 4
#define CIN_ACT_GELU_TANH 5
/* The backward through SiLU or a GELU (compute bound) evaluates g = dy * act'(t) once per
 * plane, into a thread's scratch, instead of once in the sums pass and again in the dx pass:
 * for planes of at most this many elements (128 KiB of float, cache resident), and for the
 * small-plane batches on the stack. */
#define CIN_G_SCRATCH 32768

/* Calls CIN_BODY(act, flag) with both arguments compile-time constants where it matters: one
 * instantiation each for no activation, ReLU and LeakyReLU (selects in registers), and one for
 * the vector-math activations (act passed on: their arithmetic dominates the cost), each with
 * flag 0 and 1 (a residual, or fixed statistics).  CIN_BODY is defined by the caller. */
#define CIN_ACT_SWITCH(act, flag)                                                               \
    if (flag) {                                                                                 \
        switch (act) {                                                                          \
        case CIN_ACT_NONE: CIN_BODY(CIN_ACT_NONE, 1); break;                                    \
        case CIN_ACT_RELU: CIN_BODY(CIN_ACT_RELU, 1); break;                                    \
        case CIN_ACT_LEAKY_RELU: CIN_BODY(CIN_ACT_LEAKY_RELU, 1); break;                        \
        default: CIN_BODY(act, 1); break;                                                       \
        }                                                                                       \
    } else {                                                                                    \
        switch (act) {                                                                          \
        case CIN_ACT_NONE: CIN_BODY(CIN_ACT_NONE, 0); break;                                    \
        case CIN_ACT_RELU: CIN_BODY(CIN_ACT_RELU, 0); break;                                    \
        case CIN_ACT_LEAKY_RELU: CIN_BODY(CIN_ACT_LEAKY_RELU, 0); break;                        \
        default: CIN_BODY(act, 0); break;                                                       \
        }                                                                                       \
    }

/* Merge a group (n_b, mean_b, m2_b) into the running (n, mean, m2): Chan's parallel formula. */
static inline void cin_chan_merge(double *n, double *mean, double *m2,
                                  double n_b, double mean_b, double m2_b)
{
    if (n_b <= 0.0) return;
    if (*n <= 0.0) { *n = n_b; *mean = mean_b; *m2 = m2_b; return; }
    double tot = *n + n_b;
    double delta = mean_b - *mean;
    *mean += delta * (n_b / tot);
    *m2 += m2_b + delta * delta * (*n * n_b / tot);
    *n = tot;
}

/* Order earlier non-temporal stores before whatever follows (a no-op without them). */
static inline void cin_store_fence(void)
{
#if CIN_X86_DISPATCH
    _mm_sfence();
#endif
}

/* ---- instantiations ------------------------------------------------------------------------ */

/* Baseline: whatever the compiler targets by default (SSE2 on x86-64, NEON on arm64). */
#define CIN_ISA base
#if defined(__AVX512F__)
#define CIN_VEC_BYTES 64
#elif defined(__AVX__)
#define CIN_VEC_BYTES 32
#else
#define CIN_VEC_BYTES 16
#endif
#if CIN_X86_DISPATCH
#if CIN_VEC_BYTES == 64
#define CIN_STREAM_f(p, v) _mm512_stream_ps((p), (__m512)(v))
#define CIN_STREAM_d(p, v) _mm512_stream_pd((p), (__m512d)(v))
#elif CIN_VEC_BYTES == 32
#define CIN_STREAM_f(p, v) _mm256_stream_ps((p), (__m256)(v))
#define CIN_STREAM_d(p, v) _mm256_stream_pd((p), (__m256d)(v))
#else
#define CIN_STREAM_f(p, v) _mm_stream_ps((p), (__m128)(v))
#define CIN_STREAM_d(p, v) _mm_stream_pd((p), (__m128d)(v))
#endif
#endif
#include "cin_isa.h"

#if CIN_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CIN_ISA avx2
#define CIN_VEC_BYTES 32
#define CIN_STREAM_f(p, v) _mm256_stream_ps((p), (__m256)(v))
#define CIN_STREAM_d(p, v) _mm256_stream_pd((p), (__m256d)(v))
#include "cin_isa.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define CIN_ISA avx512
#define CIN_VEC_BYTES 64
#define CIN_STREAM_f(p, v) _mm512_stream_ps((p), (__m512)(v))
#define CIN_STREAM_d(p, v) _mm512_stream_pd((p), (__m512d)(v))
#include "cin_isa.h"
#pragma GCC pop_options
#endif

/* ---- run-time dispatch ----------------------------------------------------------------------- */

#define CIN_TABLE_TYPES(T, S)                                                                   \
    void (*chunk_stats_##S)(const T *, ptrdiff_t, double *, double *);                          \
    void (*small_forward_##S)(const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *,  \
                              ptrdiff_t, const double *, ptrdiff_t, double, double *, double *, \
                              double *, const T *, int, T, int);                                \
    void (*normalize_##S)(const T *, T *, const T *, ptrdiff_t, T, T, T, int, T, int);          \
    void (*backward_sums_##S)(const T *, const T *, ptrdiff_t, T, T, T, int, T, double *,       \
                              double *);                                                        \
    void (*backward_dx_##S)(const T *, const T *, T *, ptrdiff_t, T, T, T, T, T, T, int, T,     \
                            int);                                                               \
    void (*scale_##S)(const T *, const T *, T *, ptrdiff_t, T, T, T, T, int, T, int);           \
    void (*small_backward_##S)(const T *, const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t,      \
                               const double *, ptrdiff_t, const double *, ptrdiff_t,            \
                               const double *, ptrdiff_t, int, double *, double *,              \
                               const double *, ptrdiff_t, int, T, int);                         \
    void (*cl_stats_##S)(const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, T *, T *, T *, double *,   \
                         double *, int);                                                        \
    void (*cl_normalize_##S)(const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *,        \
                             const T *, const T *, const T *, int, T, int);                     \
    void (*cl_backward_sums_##S)(const T *, const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t,         \
                                 const T *, T *, T *, double *, double *, int, const T *,       \
                                 const T *, int, T);                                            \
    void (*cl_backward_dx_##S)(const T *, const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t,      \
                               const T *, const T *, const T *, const T *, const T *,           \
                               const T *, int, T, int);

typedef struct {
    const char *name;
    CIN_TABLE_TYPES(float, f)
    CIN_TABLE_TYPES(double, d)
} cin_kernel_table;

#define CIN_TABLE(isa, label)                                                                   \
    { label,                                                                                    \
      cin_chunk_stats_f_##isa, cin_small_forward_f_##isa, cin_normalize_f_##isa,                \
      cin_backward_sums_f_##isa, cin_backward_dx_f_##isa, cin_scale_f_##isa,                    \
      cin_small_backward_f_##isa,                                                               \
      cin_cl_stats_f_##isa,                                                                     \
      cin_cl_normalize_f_##isa, cin_cl_backward_sums_f_##isa, cin_cl_backward_dx_f_##isa,       \
      cin_chunk_stats_d_##isa, cin_small_forward_d_##isa, cin_normalize_d_##isa,                \
      cin_backward_sums_d_##isa, cin_backward_dx_d_##isa, cin_scale_d_##isa,                    \
      cin_small_backward_d_##isa,                                                               \
      cin_cl_stats_d_##isa,                                                                     \
      cin_cl_normalize_d_##isa, cin_cl_backward_sums_d_##isa, cin_cl_backward_dx_d_##isa }

#if defined(__AVX512F__)
#define CIN_BASE_LABEL "baseline (avx512f, compile-time)"
#elif defined(__AVX2__) && defined(__FMA__)
#define CIN_BASE_LABEL "baseline (avx2+fma, compile-time)"
#elif defined(__x86_64__)
#define CIN_BASE_LABEL "baseline (sse2)"
#elif defined(__ARM_NEON)
#define CIN_BASE_LABEL "baseline (neon)"
#else
#define CIN_BASE_LABEL "baseline (scalar)"
#endif

static const cin_kernel_table cin_table_base = CIN_TABLE(base, CIN_BASE_LABEL);
#if CIN_X86_DISPATCH
static const cin_kernel_table cin_table_avx2 = CIN_TABLE(avx2, "avx2+fma");
static const cin_kernel_table cin_table_avx512 = CIN_TABLE(avx512, "avx512f");
#endif
static const cin_kernel_table *cin_k = &cin_table_base;

/* Which ISAs this CPU runs: bit 0 baseline, bit 1 AVX2+FMA, bit 2 AVX-512F. */
static int cin_isa_supported(void)
{
    int bits = 1;
#if CIN_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= 2;
    if ((bits & 2) && __builtin_cpu_supports("avx512f")) bits |= 4;
#endif
    return bits;
}

/* Use ISA level `want` (0 baseline, 1 avx2, 2 avx512, -1 best) capped by what the CPU has;
 * returns the level chosen. */
static int cin_select_isa(int want)
{
    int bits = cin_isa_supported();
    int level = 0;
    if (bits & 2) level = 1;
    if (bits & 4) level = 2;
    if (want >= 0 && want < level) level = want;
#if CIN_X86_DISPATCH
    cin_k = level == 2 ? &cin_table_avx512 : level == 1 ? &cin_table_avx2 : &cin_table_base;
#else
    level = 0;
    cin_k = &cin_table_base;
#endif
    return level;
}

static const char *cin_isa_name(void) { return cin_k->name; }


#define CIN_ENTRY_POINTS(T, S)                                                                  \
    static inline void cin_chunk_stats_##S(const T *x, ptrdiff_t n, double *mean, double *m2)  \
    { cin_k->chunk_stats_##S(x, n, mean, m2); }                                                 \
    static inline void cin_small_forward_##S(const T *x, T *y, ptrdiff_t n, ptrdiff_t L,        \
                                             ptrdiff_t p0, const double *w, ptrdiff_t w_n,      \
                                             const double *b, ptrdiff_t b_n, double eps,        \
                                             double *mean, double *var, double *rstd,           \
                                             const T *r, int act, T sl, int st)                 \
    { cin_k->small_forward_##S(x, y, n, L, p0, w, w_n, b, b_n, eps, mean, var, rstd, r, act,   \
                               sl, st); }                                                       \
    static inline void cin_normalize_##S(const T *x, T *y, const T *r, ptrdiff_t n, T k, T a,   \
                                         T b, int act, T sl, int st)                            \
    { cin_k->normalize_##S(x, y, r, n, k, a, b, act, sl, st); }                                 \
    static inline void cin_backward_sums_##S(const T *dy, const T *x, ptrdiff_t n, T k, T af,   \
                                             T bf, int act, T sl, double *sdy, double *sdyx)    \
    { cin_k->backward_sums_##S(dy, x, n, k, af, bf, act, sl, sdy, sdyx); }                      \
    static inline void cin_backward_dx_##S(const T *dy, const T *x, T *dx, ptrdiff_t n, T k,    \
                                           T a, T b, T c, T af, T bf, int act, T sl, int st)    \
    { cin_k->backward_dx_##S(dy, x, dx, n, k, a, b, c, af, bf, act, sl, st); }                  \
    static inline void cin_scale_##S(const T *dy, const T *x, T *dx, ptrdiff_t n, T a, T k,     \
                                     T af, T bf, int act, T sl, int st)                         \
    { cin_k->scale_##S(dy, x, dx, n, a, k, af, bf, act, sl, st); }                              \
    static inline void cin_small_backward_##S(const T *dy, const T *x, T *dx, ptrdiff_t n,      \
                                              ptrdiff_t L, ptrdiff_t p0, const double *m,       \
                                              ptrdiff_t m_n, const double *r, ptrdiff_t r_n,    \
                                              const double *w, ptrdiff_t w_n, int use,          \
                                              double *sdy, double *sdyx, const double *b,       \
                                              ptrdiff_t b_n, int act, T sl, int st)             \
    { cin_k->small_backward_##S(dy, x, dx, n, L, p0, m, m_n, r, r_n, w, w_n, use, sdy, sdyx,   \
                                b, b_n, act, sl, st); }                                         \
    static inline void cin_cl_stats_##S(const T *x, ptrdiff_t rows, ptrdiff_t w, ptrdiff_t ld,  \
                                        T *s1, T *s2, T *k, double *mean, double *m2, int pf)   \
    { cin_k->cl_stats_##S(x, rows, w, ld, s1, s2, k, mean, m2, pf); }                           \
    static inline void cin_cl_normalize_##S(const T *x, T *y, ptrdiff_t rows, ptrdiff_t w,      \
                                            ptrdiff_t ld, const T *k, const T *a, const T *b,   \
                                            const T *res, int act, T sl, int st)                \
    { cin_k->cl_normalize_##S(x, y, rows, w, ld, k, a, b, res, act, sl, st); }                  \
    static inline void cin_cl_backward_sums_##S(const T *dy, const T *x, ptrdiff_t rows,        \
                                                ptrdiff_t w, ptrdiff_t ld, const T *k, T *s1,   \
                                                T *s2, double *sdy, double *sdyx, int pf,       \
                                                const T *af, const T *bf, int act, T sl)        \
    { cin_k->cl_backward_sums_##S(dy, x, rows, w, ld, k, s1, s2, sdy, sdyx, pf, af, bf, act,   \
                                  sl); }                                                        \
    static inline void cin_cl_backward_dx_##S(const T *dy, const T *x, T *dx, ptrdiff_t rows,   \
                                              ptrdiff_t w, ptrdiff_t ld, const T *k,            \
                                              const T *a, const T *b, const T *cc,              \
                                              const T *af, const T *bf, int act, T sl, int st)  \
    { cin_k->cl_backward_dx_##S(dy, x, dx, rows, w, ld, k, a, b, cc, af, bf, act, sl, st); }

CIN_ENTRY_POINTS(float, f)
CIN_ENTRY_POINTS(double, d)

#endif
