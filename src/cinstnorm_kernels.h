/* SIMD inner loops of cinstnorm, instantiated for float and double.
 *
 * Cython cannot emit `#pragma omp simd`, and gcc does not vectorize a floating-point reduction
 * without reassociation, so the hot loops live here as small static inline functions that the
 * Cython drivers call under nogil.  Reductions use CIN_LANES independent accumulators (several
 * SIMD registers' worth) so they are throughput bound rather than latency bound.
 *
 * Names: cin_<op>_f (float) and cin_<op>_d (double); the bodies live once in
 * cinstnorm_kernels_impl.h, included twice with CIN_T / CIN_SUFFIX defined.
 */
#ifndef CINSTNORM_KERNELS_H
#define CINSTNORM_KERNELS_H

#include <stddef.h>
#include <math.h>
#include <string.h>

#if defined(_MSC_VER)
#define CIN_RESTRICT __restrict
#else
#define CIN_RESTRICT __restrict__
#endif

/* Bytes of accumulators per reduction: four vector registers of the widest ISA compiled for. */
#if defined(__AVX512F__)
#define CIN_VEC_BYTES 64
#elif defined(__AVX__)
#define CIN_VEC_BYTES 32
#else
#define CIN_VEC_BYTES 16
#endif
#define CIN_ACC_BYTES (4 * CIN_VEC_BYTES)

/* Elements per statistics block: partial sums stay in the input precision inside a block and
 * are merged across blocks in double (Chan et al.), which bounds float32 rounding growth. */
#define CIN_BLOCK 1024

#if defined(__AVX512F__)
#define CIN_SIMD_NAME "avx512f"
#elif defined(__AVX2__) && defined(__FMA__)
#define CIN_SIMD_NAME "avx2+fma"
#elif defined(__AVX__)
#define CIN_SIMD_NAME "avx"
#elif defined(__SSE2__) || defined(_M_X64)
#define CIN_SIMD_NAME "sse2"
#elif defined(__ARM_NEON)
#define CIN_SIMD_NAME "neon"
#else
#define CIN_SIMD_NAME "scalar"
#endif

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

#define CIN_T float
#define CIN_SUFFIX _f
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_SUFFIX

#define CIN_T double
#define CIN_SUFFIX _d
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_SUFFIX

#endif
