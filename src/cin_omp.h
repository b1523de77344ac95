/* OpenMP runtime calls with a serial fallback, so a build without OpenMP still compiles
 * and reports one thread. */
#ifndef CIN_OMP_H
#define CIN_OMP_H
#ifdef _OPENMP
#include <omp.h>
#define CIN_HAVE_OPENMP 1
#define CIN_OPENMP_VERSION _OPENMP
#else
#define CIN_HAVE_OPENMP 0
#define CIN_OPENMP_VERSION 0
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
#endif

/* A barrier for the enclosing parallel region (an orphaned `omp barrier`).  Cython emits the
 * prange loops of one `with parallel()` block as `omp for nowait`; the phases that read what
 * other threads wrote in the previous loop are separated by this explicit barrier. */
static inline void cin_barrier(void)
{
#ifdef _OPENMP
#pragma omp barrier
#endif
}
#endif
