"""Cython/OpenMP drivers of the CPU kernels.

Every driver works on C-contiguous 2-D views of shape (P, L): P = N*C planes of L spatial
elements.  Per-plane inputs (scale, shift, given statistics) arrive as contiguous float64 arrays
of length P (per sample and channel), C (per channel: plane p reads element p % C) or 0 (none),
so per-channel and per-sample parameters take the same path without expanding them.  The Python layer validates every
shape and dtype before calling in here; with bounds checking off a bad shape would be a silent
out-of-bounds access.

Work split (see docs/design.md): planes that fit in L2 are handled one plane per iteration of a
static ``prange`` (statistics, then normalization while the plane is still cached).  Planes
much larger than L2, or fewer planes than threads, are cut into k chunks: a first loop computes
per-chunk partial results, a second merges them per plane, and a third loop over the same
(plane, chunk) indices with the same static schedule, inside the same parallel region,
finishes each chunk on the thread that just read it.
"""
cimport cython
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt, isfinite, INFINITY
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongAndOverflow
from libc.stdlib cimport malloc, free

import numpy as np
cimport numpy as cnp

cnp.import_array()

from cpython.pycapsule cimport PyCapsule_New

cdef extern from "cin_pool.h":
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler cin_pool_handler
    int cin_pool_count
    size_t cin_pool_bytes
    size_t cin_pool_limit
    size_t cin_pool_min
    void cin_pool_clear()
    size_t cin_pool_set_limit(size_t limit)
    object PyDataMem_SetHandler(object handler)

# The output cache's NumPy memory handler (src/cin_pool.h): the arrays made under it keep it,
# and their buffers go back to the cache when freed.
cdef object _pool_capsule = PyCapsule_New(<void *>&cin_pool_handler, "mem_handler", NULL)


cdef object _new_output(int nd, cnp.npy_intp *dims, int t):
    """An uninitialised C-contiguous array for a result (forward y, backward dx), its buffer
    from the output cache (src/cin_pool.h) when one of its size is there.  Results under the
    cache's smallest size are plain arrays: switching the handler (a context variable, twice)
    would add 0.3 us to a call of 1 us."""
    cdef object old
    cdef Py_ssize_t nbytes = 4 if t == cnp.NPY_FLOAT else 8
    cdef int i
    for i in range(nd):
        nbytes *= dims[i]
    if cin_pool_limit == 0 or <size_t>nbytes < cin_pool_min:
        return cnp.PyArray_EMPTY(nd, dims, t, 0)
    old = PyDataMem_SetHandler(_pool_capsule)
    try:
        return cnp.PyArray_EMPTY(nd, dims, t, 0)
    finally:
        PyDataMem_SetHandler(old)


def set_output_cache_bytes(size_t nbytes):
    """Keep at most nbytes of freed result buffers (0: none, and what is kept is freed);
    returns the limit in force."""
    return int(cin_pool_set_limit(nbytes))


def output_cache_info():
    """(buffers kept, bytes kept, limit in bytes, smallest buffer kept)."""
    return int(cin_pool_count), int(cin_pool_bytes), int(cin_pool_limit), int(cin_pool_min)


def empty_output_cache():
    """Free every kept buffer (the limit stays)."""
    cin_pool_clear()

ctypedef fused floating:
    float
    double

cdef extern from "cin_omp.h" nogil:
    int omp_get_thread_num()
    int omp_get_num_threads()
    int omp_get_max_threads()
    void cin_barrier()
    int CIN_HAVE_OPENMP
    int CIN_OPENMP_VERSION

cdef extern from "cinstnorm_kernels.h" nogil:
    int cin_isa_supported()
    int cin_select_isa(int want)
    const char *cin_isa_name()
    void cin_chan_merge(double *n, double *mean, double *m2, double n_b, double mean_b,
                        double m2_b)
    void cin_chunk_stats_f(const float *x, Py_ssize_t n, double *mean, double *m2)
    void cin_chunk_stats_d(const double *x, Py_ssize_t n, double *mean, double *m2)
    void cin_small_forward_f(const float *x, float *y, Py_ssize_t n, Py_ssize_t L, Py_ssize_t p0,
                             const double *w, Py_ssize_t w_n, const double *b, Py_ssize_t b_n,
                             double eps, double *mean, double *var, double *rstd,
                             const float *r, int act, float slope, int stream)
    void cin_small_forward_d(const double *x, double *y, Py_ssize_t n, Py_ssize_t L,
                             Py_ssize_t p0, const double *w, Py_ssize_t w_n, const double *b,
                             Py_ssize_t b_n, double eps, double *mean, double *var, double *rstd,
                             const double *r, int act, double slope, int stream)
    void cin_small_backward_f(const float *dy, const float *x, float *dx, Py_ssize_t n,
                              Py_ssize_t L, Py_ssize_t p0, const double *m, Py_ssize_t m_n,
                              const double *r, Py_ssize_t r_n, const double *w, Py_ssize_t w_n,
                              int use_input_stats, double *sdy, double *sdyx, const double *b,
                              Py_ssize_t b_n, int act, float slope, int stream)
    void cin_small_backward_d(const double *dy, const double *x, double *dx, Py_ssize_t n,
                              Py_ssize_t L, Py_ssize_t p0, const double *m, Py_ssize_t m_n,
                              const double *r, Py_ssize_t r_n, const double *w, Py_ssize_t w_n,
                              int use_input_stats, double *sdy, double *sdyx, const double *b,
                              Py_ssize_t b_n, int act, double slope, int stream)
    enum: CIN_BLOCK
    enum: CIN_SMALL_BATCH
    enum: CIN_ACT_SILU
    enum: CIN_G_SCRATCH
    void cin_store_fence()
    void cin_normalize_f(const float *x, float *y, const float *r, Py_ssize_t n, float k,
                         float alpha, float beta, int act, float slope, int stream)
    void cin_normalize_d(const double *x, double *y, const double *r, Py_ssize_t n, double k,
                         double alpha, double beta, int act, double slope, int stream)
    void cin_backward_sums_f(const float *dy, const float *x, Py_ssize_t n, float k, float af,
                             float bf, int act, float slope, double *sdy, double *sdyx)
    void cin_backward_sums_d(const double *dy, const double *x, Py_ssize_t n, double k,
                             double af, double bf, int act, double slope, double *sdy,
                             double *sdyx)
    void cin_backward_dx_f(const float *dy, const float *x, float *dx, Py_ssize_t n, float k,
                           float a, float b, float c, float af, float bf, int act, float slope,
                           int stream)
    void cin_backward_dx_d(const double *dy, const double *x, double *dx, Py_ssize_t n,
                           double k, double a, double b, double c, double af, double bf,
                           int act, double slope, int stream)
    void cin_scale_f(const float *dy, const float *x, float *dx, Py_ssize_t n, float a, float k,
                     float af, float bf, int act, float slope, int stream)
    void cin_scale_d(const double *dy, const double *x, double *dx, Py_ssize_t n, double a,
                     double k, double af, double bf, int act, double slope, int stream)
    void cin_cl_stats_f(const float *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t ld,
                        float *s1, float *s2, float *k, double *mean, double *m2, int pf)
    void cin_cl_stats_d(const double *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t ld,
                        double *s1, double *s2, double *k, double *mean, double *m2, int pf)
    void cin_cl_normalize_f(const float *x, float *y, Py_ssize_t rows, Py_ssize_t w,
                            Py_ssize_t ld, const float *k, const float *a, const float *b,
                            const float *res, int act, float slope, int stream)
    void cin_cl_normalize_d(const double *x, double *y, Py_ssize_t rows, Py_ssize_t w,
                            Py_ssize_t ld, const double *k, const double *a, const double *b,
                            const double *res, int act, double slope, int stream)
    void cin_cl_backward_sums_f(const float *dy, const float *x, Py_ssize_t rows, Py_ssize_t w,
                                Py_ssize_t ld, const float *k, float *s1, float *s2,
                                double *sdy, double *sdyx, int pf, const float *af,
                                const float *bf, int act, float slope)
    void cin_cl_backward_sums_d(const double *dy, const double *x, Py_ssize_t rows,
                                Py_ssize_t w, Py_ssize_t ld, const double *k, double *s1,
                                double *s2, double *sdy, double *sdyx, int pf, const double *af,
                                const double *bf, int act, double slope)
    void cin_cl_backward_dx_f(const float *dy, const float *x, float *dx, Py_ssize_t rows,
                              Py_ssize_t w, Py_ssize_t ld, const float *k, const float *a,
                              const float *b, const float *cc, const float *af,
                              const float *bf, int act, float slope, int stream)
    void cin_cl_backward_dx_d(const double *dy, const double *x, double *dx, Py_ssize_t rows,
                              Py_ssize_t w, Py_ssize_t ld, const double *k, const double *a,
                              const double *b, const double *cc, const double *af,
                              const double *bf, int act, double slope, int stream)

cdef extern from *:
    """
    #ifndef CIN_BUILD_FLAGS
    #define CIN_BUILD_FLAGS "unknown"
    #endif
    #ifndef CIN_DEBUG_BUILD
    #define CIN_DEBUG_BUILD 0
    #endif
    """
    const char *CIN_BUILD_FLAGS
    int CIN_DEBUG_BUILD

cdef enum:
    # A chunk is about this many bytes: well inside a 512 KiB L2 together with its output.
    CHUNK_BYTES = 128 * 1024
    # Chunks are never cut smaller than this many elements (per-chunk overhead).
    MIN_CHUNK = 4096
    # Chunk boundaries are multiples of this many elements (whole cache lines, aligned SIMD).
    CHUNK_ALIGN = 16

cdef int _threads_used = 1


cdef void _record_team_size() noexcept nogil:
    """Remember how many threads the current parallel region really runs (a probe for tests)."""
    global _threads_used
    if omp_get_thread_num() == 0:
        _threads_used = omp_get_num_threads()


cdef Py_ssize_t _chunks_per_plane(Py_ssize_t P, Py_ssize_t L, Py_ssize_t itemsize,
                                  int n_threads) noexcept nogil:
    """How many chunks each plane is cut into (1: whole planes)."""
    cdef Py_ssize_t target = CHUNK_BYTES // itemsize
    cdef Py_ssize_t k = 1
    cdef Py_ssize_t most = L // MIN_CHUNK
    if L > 2 * target:
        k = (L + target - 1) // target
    if P < n_threads and k < n_threads:
        k = n_threads
    if k > most:
        k = most
    return k if k > 1 else 1


# Outputs larger than this are written with non-temporal stores (set at import to the LLC size,
# or CINSTNORM_STREAM_MIN_BYTES; see _config.configure_kernels_from_env).
cdef Py_ssize_t _stream_min_bytes = 32 * 1024 * 1024
# The last-level cache (set from the OS at import, see _config.last_level_cache_bytes): the
# channels-last groups of samples larger than the team's L2 take an eighth of it.  Separate from
# the streaming-store threshold, so that forcing streaming stores does not change the work split.
cdef Py_ssize_t _llc_bytes = 32 * 1024 * 1024
# One core's L2 (set from the OS at import, see _config.l2_cache_bytes): channels-last groups
# small enough to stay in the team's L2 between their two reads are sized by it.
cdef Py_ssize_t _l2_bytes = 512 * 1024

# Fewer elements than this per thread and the start-up of another thread costs more than it
# saves (an OpenMP region with two threads costs a few microseconds).
cdef Py_ssize_t _min_elements_per_thread = 16384


cdef int _team_size(Py_ssize_t elements, int n_threads) noexcept nogil:
    """Threads worth starting for `elements` elements, at most n_threads."""
    cdef Py_ssize_t useful = elements // _min_elements_per_thread
    if useful < 1:
        return 1
    return <int>useful if useful < n_threads else n_threads


cdef inline int _use_streaming_stores(Py_ssize_t out_bytes) noexcept nogil:
    """Non-temporal stores pay off only for outputs that do not fit in the last-level cache."""
    return 1 if out_bytes > _stream_min_bytes else 0


cdef inline Py_ssize_t _chunk_start(Py_ssize_t L, Py_ssize_t k, Py_ssize_t j) noexcept nogil:
    if j >= k:
        return L
    return ((L * j) // k) // CHUNK_ALIGN * CHUNK_ALIGN


cdef inline double _param(const double[::1] a, Py_ssize_t p, double fill) noexcept nogil:
    """Plane p's value of a per-plane parameter given as (P,), (C,) (p % C is the channel, as
    planes are (n, c) in C order) or empty (None: `fill`)."""
    cdef Py_ssize_t n = a.shape[0]
    return fill if n == 0 else a[p % n]


cdef inline double _param_pc(const double[::1] a, Py_ssize_t p, Py_ssize_t c,
                             double fill) noexcept nogil:
    """_param for plane p of channel c, without the integer division: a has P or C elements
    (a (P,) parameter when p < len, else a (C,) one) or none."""
    cdef Py_ssize_t n = a.shape[0]
    return fill if n == 0 else (a[p] if p < n else a[c])


cdef struct _Param:
    # A per-plane parameter as the pointer drivers read it: n values (P, C, or 0: none).
    # f: NULL, or (n == P) the float32 values not yet converted into p, which is then the
    # caller's scratch: a driver converts each plane's value before it reads it
    # (_param_convert, by every thread for its own planes) or all of them up front
    # (_param_ready); the fast backward defers it so that it runs in the parallel region.
    const double *p
    Py_ssize_t n
    const float *f


# no parameter (the kernels then use 1, or 0 for a shift)
cdef _Param _NONE_PARAM = _Param(NULL, 0, NULL)


cdef inline _Param _mv_param(const double[::1] a) noexcept nogil:
    cdef _Param r
    r.n = a.shape[0]
    r.p = &a[0] if r.n else NULL
    r.f = NULL
    return r


cdef inline void _param_convert(_Param a, Py_ssize_t lo, Py_ssize_t n) noexcept nogil:
    """Planes lo .. lo + n of a deferred float32 parameter into its float64 scratch."""
    cdef double *d = <double *>a.p
    cdef Py_ssize_t i
    if a.f != NULL:
        for i in range(lo, lo + n):
            d[i] = <double>a.f[i]


cdef inline void _param_ready(_Param *a) noexcept nogil:
    """All of a deferred parameter's values converted: a plain float64 _Param from now on."""
    _param_convert(a[0], 0, a.n)
    a.f = NULL


cdef inline double _pparam(_Param a, Py_ssize_t p, double fill) noexcept nogil:
    """_param on a _Param."""
    return fill if a.n == 0 else a.p[p % a.n]


cdef inline void _merge_chunks(Py_ssize_t L, Py_ssize_t k, const double *cmean,
                               const double *cm2, double *mean, double *m2) noexcept nogil:
    """Merge a plane's k chunk statistics (in chunk order, so the result does not depend on
    the thread count) into its mean and M2."""
    cdef double cnt = 0.0, m = 0.0, acc = 0.0
    cdef Py_ssize_t j
    for j in range(k):
        cin_chan_merge(&cnt, &m, &acc, <double>(_chunk_start(L, k, j + 1) - _chunk_start(L, k, j)),
                       cmean[j], cm2[j])
    mean[0] = m
    m2[0] = acc


# ---- fused-type front ends of the C inner loops -------------------------------------------

cdef inline void _stats(const floating *x, Py_ssize_t n, double *mean,
                        double *m2) noexcept nogil:
    if floating is float:
        cin_chunk_stats_f(x, n, mean, m2)
    else:
        cin_chunk_stats_d(x, n, mean, m2)


cdef inline void _small_forward(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t L,
                               Py_ssize_t p0, const double *w, Py_ssize_t w_n, const double *b,
                               Py_ssize_t b_n, double eps, double *mean, double *var,
                               double *rstd, const floating *r, int act, double slope,
                               int stream) noexcept nogil:
    if floating is float:
        cin_small_forward_f(x, y, n, L, p0, w, w_n, b, b_n, eps, mean, var, rstd, r, act,
                            <float>slope, stream)
    else:
        cin_small_forward_d(x, y, n, L, p0, w, w_n, b, b_n, eps, mean, var, rstd, r, act, slope,
                            stream)


cdef inline void _small_backward(const floating *dy, const floating *x, floating *dx,
                                 Py_ssize_t n, Py_ssize_t L, Py_ssize_t p0, _Param m, _Param r,
                                 _Param w, bint use_input_stats, double *sdy, double *sdyx,
                                 _Param b, int act, double slope, int stream) noexcept nogil:
    """cin_small_backward for planes p0.. (parameters as _pparam reads them)."""
    if floating is float:
        cin_small_backward_f(dy, x, dx, n, L, p0, m.p, m.n, r.p, r.n, w.p, w.n,
                             use_input_stats, sdy, sdyx, b.p, b.n, act, <float>slope, stream)
    else:
        cin_small_backward_d(dy, x, dx, n, L, p0, m.p, m.n, r.p, r.n, w.p, w.n,
                             use_input_stats, sdy, sdyx, b.p, b.n, act, slope, stream)


cdef inline void _normalize(const floating *x, floating *y, Py_ssize_t n, double mean,
                            double rstd, double w, double b, int stream,
                            const floating *r=NULL, int act=0,
                            double slope=0.0) noexcept nogil:
    """y = act((x - mean) * rstd * w + b) + r, evaluated with (x - k) * alpha + beta, k ~ mean
    (r: the residual, NULL for none; act: an activation code, see cinstnorm_kernels.h)."""
    cdef floating k = <floating>mean
    cdef double alpha = rstd * w
    cdef double beta = b - (mean - <double>k) * alpha
    if floating is float:
        cin_normalize_f(x, y, r, n, k, <float>alpha, <float>beta, act, <float>slope, stream)
    else:
        cin_normalize_d(x, y, r, n, k, alpha, beta, act, slope, stream)


cdef inline void _pre_activation(double mean, double rstd, double w, double b, floating *af,
                                 floating *bf) noexcept nogil:
    """The forward's t = (x - k) * af + bf (k = mean rounded, as _normalize computes it), which
    the backward recomputes for the gradient through an activation."""
    cdef floating k = <floating>mean
    cdef double alpha = rstd * w
    af[0] = <floating>alpha
    bf[0] = <floating>(b - (mean - <double>k) * alpha)


cdef inline void _bwd_sums(const floating *dy, const floating *x, Py_ssize_t n, double mean,
                           double *sdy, double *sdyc, int act=0, double rstd=1.0, double w=1.0,
                           double b=0.0, double slope=0.0) noexcept nogil:
    """sdy = sum(g), sdyc = sum(g * (x - mean)) (centred form); g = dy, or with an activation
    dy * act'(t) at the forward's t (rstd, w, b: its statistics and parameters)."""
    cdef floating k = <floating>mean
    cdef floating af = 0, bf = 0
    if act:
        _pre_activation(mean, rstd, w, b, &af, &bf)
    if floating is float:
        cin_backward_sums_f(dy, x, n, k, af, bf, act, <float>slope, sdy, sdyc)
    else:
        cin_backward_sums_d(dy, x, n, k, af, bf, act, slope, sdy, sdyc)
    sdyc[0] = sdyc[0] + (<double>k - mean) * sdy[0]


cdef inline void _bwd_g(const floating *dy, const floating *x, floating *g, Py_ssize_t n,
                        double mean, double rstd, double w, double b, int act,
                        double slope) noexcept nogil:
    """g = dy * act'(t) at the forward's t, the gradient through the activation (cin_scale
    with a = 1: the bits _bwd_sums and _bwd_dx compute for g inside their loops)."""
    cdef floating k = <floating>mean
    cdef floating af = 0, bf = 0
    _pre_activation(mean, rstd, w, b, &af, &bf)
    if floating is float:
        cin_scale_f(dy, x, g, n, 1.0, k, af, bf, act, <float>slope, 0)
    else:
        cin_scale_d(dy, x, g, n, 1.0, k, af, bf, act, slope, 0)


cdef inline void _bwd_dx(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                         double mean, double rstd, double w, double sdy, double sdyc,
                         double inv_count, bint use_input_stats, int stream, int act=0,
                         double b=0.0, double slope=0.0) noexcept nogil:
    """dx of one chunk from its plane's sums (see SPEC.md, Backward), through the activation
    `act` (b: the forward's bias) when one is given."""
    cdef floating k = <floating>mean
    cdef double a = w * rstd
    cdef double bb, c
    cdef floating af = 0, bf = 0
    if act:
        _pre_activation(mean, rstd, w, b, &af, &bf)
    if not use_input_stats:
        if floating is float:
            cin_scale_f(dy, x, dx, n, <float>a, k, af, bf, act, <float>slope, stream)
        else:
            cin_scale_d(dy, x, dx, n, a, k, af, bf, act, slope, stream)
        return
    bb = -a * rstd * rstd * sdyc * inv_count
    c = -a * sdy * inv_count + bb * (<double>k - mean)
    if floating is float:
        cin_backward_dx_f(dy, x, dx, n, k, <float>a, <float>bb, <float>c, af, bf, act,
                          <float>slope, stream)
    else:
        cin_backward_dx_d(dy, x, dx, n, k, a, bb, c, af, bf, act, slope, stream)


cdef inline const floating *_at(const floating *base, Py_ssize_t i) noexcept nogil:
    """base + i, or NULL for no array (the residual)."""
    return NULL if base == NULL else base + i


cdef inline const floating *_rows(const floating *base, Py_ssize_t p, Py_ssize_t L) noexcept nogil:
    """Plane p of a C-contiguous (P, L) array at base, or NULL for no array."""
    return NULL if base == NULL else base + p * L


# ---- drivers ------------------------------------------------------------------------------

cdef int _forward_planes(const floating *x,   # IN  (P, L) C-contiguous
                         floating *y,           # OUT (P, L), may be x itself
                         Py_ssize_t P, Py_ssize_t L,
                         _Param weight,         # IN  (P,), (C,) or none: scale
                         _Param bias,           # IN  (P,), (C,) or none: shift
                         double eps,
                         double *mean,          # OUT (P,)
                         double *var,           # OUT (P,) biased variance
                         double *rstd,          # OUT (P,) 1/sqrt(var + eps)
                         int n_threads,
                         const floating *rp,    # IN  (P, L) residual or NULL; may be y
                         int act, double slope) except -1:
    """Instance statistics of every plane, then y = act(normalized) + residual."""
    n_threads = _team_size(P * L, n_threads)
    cdef Py_ssize_t k = _chunks_per_plane(P, L, sizeof(floating), n_threads)
    cdef int stream = _use_streaming_stores(P * L * sizeof(floating))
    cdef Py_ssize_t p, i, j, lo, hi, nb
    cdef double inv_l = 1.0 / <double>L
    cdef double *cmean
    cdef double *cm2
    global _threads_used
    if k == 1 and L <= CIN_BLOCK:  # small planes: batches of CIN_SMALL_BATCH
        if n_threads == 1:  # tiny inputs: without the OpenMP region (about a microsecond)
            _threads_used = 1
            with nogil:
                _small_forward(x, y, P, L, 0, weight.p, weight.n, bias.p, bias.n, eps, mean,
                               var, rstd, rp, act, slope, stream)
                if stream:  # the batch kernels do not fence
                    cin_store_fence()
            return 0
        nb = (P + CIN_SMALL_BATCH - 1) // CIN_SMALL_BATCH
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            # each thread its contiguous share of the batches, in one call
            lo = _thread_share(0, nb, 0) * CIN_SMALL_BATCH
            hi = min(P, _thread_share(0, nb, 1) * CIN_SMALL_BATCH)
            if hi > lo:
                _small_forward(x + lo * L, y + lo * L, hi - lo, L, lo, weight.p, weight.n,
                               bias.p, bias.n, eps, mean + lo, var + lo, rstd + lo,
                               _rows(rp, lo, L), act, slope, stream)
            if stream:  # each thread, after its batches (the batch kernels do not fence)
                cin_store_fence()
        return 0
    if k == 1:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for p in prange(P, schedule='static'):
                _stats(x + p * L, L, &mean[p], &var[p])
                var[p] = var[p] * inv_l
                rstd[p] = 1.0 / sqrt(var[p] + eps)
                _normalize(x + p * L, y + p * L, L, mean[p], rstd[p], _pparam(weight, p, 1.0),
                           _pparam(bias, p, 0.0), stream, _rows(rp, p, L), act, slope)
        return 0
    cmean = <double *>malloc(2 * P * k * sizeof(double))
    if cmean == NULL:
        raise MemoryError()
    cm2 = cmean + P * k
    try:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for i in prange(P * k, schedule='static'):
                p = i // k
                j = i % k
                lo = _chunk_start(L, k, j)
                hi = _chunk_start(L, k, j + 1)
                _stats(x + p * L + lo, hi - lo, &cmean[i], &cm2[i])
            cin_barrier()
            for p in prange(P, schedule='static'):
                _merge_chunks(L, k, &cmean[p * k], &cm2[p * k], &mean[p], &var[p])
                var[p] = var[p] * inv_l
                rstd[p] = 1.0 / sqrt(var[p] + eps)
            cin_barrier()
            for i in prange(P * k, schedule='static'):
                p = i // k
                j = i % k
                lo = _chunk_start(L, k, j)
                hi = _chunk_start(L, k, j + 1)
                _normalize(x + p * L + lo, y + p * L + lo, hi - lo, mean[p], rstd[p],
                           _pparam(weight, p, 1.0), _pparam(bias, p, 0.0), stream,
                           _at(rp, p * L + lo), act, slope)
    finally:
        free(cmean)
    return 0


cdef int _normalize_impl(const floating[:, ::1] x,         # IN  (P, L)
                         floating[:, ::1] y,               # OUT (P, L), may be x itself
                         const double[::1] mean,           # IN  (P,) given (running) mean
                         const double[::1] rstd,           # IN  (P,) given 1/sqrt(var + eps)
                         const double[::1] weight,         # IN  (P,)
                         const double[::1] bias,           # IN  (P,)
                         int n_threads,
                         const floating[:, ::1] residual,  # IN (P, L) or None; may be y
                         int act, double slope) except -1:
    """y = act((x - mean) * rstd * weight + bias) + residual with given per-plane statistics."""
    cdef Py_ssize_t P = x.shape[0], L = x.shape[1]
    cdef const floating *rp = NULL if residual is None else &residual[0, 0]
    n_threads = _team_size(P * L, n_threads)
    cdef Py_ssize_t k = _chunks_per_plane(P, L, sizeof(floating), n_threads)
    cdef int stream = _use_streaming_stores(P * L * sizeof(floating))
    cdef Py_ssize_t p, i, j, lo, hi
    with nogil, parallel(num_threads=n_threads):
        _record_team_size()
        for i in prange(P * k, schedule='static'):
            p = i // k
            j = i % k
            lo = _chunk_start(L, k, j)
            hi = _chunk_start(L, k, j + 1)
            _normalize(&x[p, lo], &y[p, lo], hi - lo, _param(mean, p, 0.0), _param(rstd, p, 1.0),
                       _param(weight, p, 1.0), _param(bias, p, 0.0), stream,
                       _at(rp, p * L + lo), act, slope)
    return 0


# Channels summed together by _channel_sums: one block's running sums live on the stack;
# the backward's reduction in its parallel region splits the channels in _CSUM_TASK ones.
cdef enum:
    _CSUM_BLOCK = 256
    _CSUM_TASK = 64


cdef void _channel_sums(const double *s, Py_ssize_t N, Py_ssize_t C, int t, void *dst,
                        Py_ssize_t c_lo=0, Py_ssize_t c_hi=-1) noexcept nogil:
    """dst[c] = sum over n of s[n * C + c] for c in c_lo .. c_hi (-1: C), added in order of
    n, in x's dtype.  The sums run row by row over a block of channels: each channel's adds
    stay in order of n (the same bits as a loop over n per channel), while the loads run along
    memory and the block's chains of adds overlap (a loop over n per channel, one dependent add
    per strided load, took 9 us for the (64, 256) sums of a tiny-plane backward, twice per
    call; this 3.4 us)."""
    cdef Py_ssize_t n, c, c0, nb
    cdef double acc[_CSUM_BLOCK]
    cdef const double *row
    cdef float *f = <float *>dst
    cdef double *d = <double *>dst
    if c_hi < 0:
        c_hi = C
    c0 = c_lo
    while c0 < c_hi:
        nb = c_hi - c0 if c_hi - c0 < _CSUM_BLOCK else _CSUM_BLOCK
        for c in range(nb):
            acc[c] = s[c0 + c]
        for n in range(1, N):
            row = s + n * C + c0
            for c in range(nb):
                acc[c] = acc[c] + row[c]
        if t == cnp.NPY_FLOAT:
            for c in range(nb):
                f[c0 + c] = <float>acc[c]
        else:
            for c in range(nb):
                d[c0 + c] = acc[c]
        c0 += nb


cdef struct _Reduce:
    # dweight and dbias as the fast backward returns them: dw[c] = sum over n of
    # sum_dy_xhat[n * C + c], db likewise of sum_dy, in dtype t (_channel_sums); N == 0: none
    Py_ssize_t N
    int t
    void *dw
    void *db


cdef _Reduce _NO_REDUCE = _Reduce(0, 0, NULL, NULL)


cdef inline Py_ssize_t _reduce_tasks(_Reduce red, Py_ssize_t P) noexcept nogil:
    """The tasks of red: _CSUM_TASK channels of dweight, then the same of dbias."""
    cdef Py_ssize_t C = P // red.N if red.N else 0
    return 2 * ((C + _CSUM_TASK - 1) // _CSUM_TASK)


cdef inline void _reduce_task(_Reduce red, Py_ssize_t P, const double *sum_dy,
                              const double *sum_dy_xhat, Py_ssize_t i) noexcept nogil:
    """Task i of _reduce_tasks(red, P): its channels summed over n, in order of n."""
    cdef Py_ssize_t C = P // red.N, half = _reduce_tasks(red, P) // 2
    cdef Py_ssize_t j = i % half
    _channel_sums(sum_dy_xhat if i < half else sum_dy, red.N, C, red.t,
                  red.dw if i < half else red.db, j * _CSUM_TASK, min(C, (j + 1) * _CSUM_TASK))


cdef int _backward_planes(const floating *dy,   # IN  (P, L) C-contiguous
                          const floating *x,    # IN  (P, L)
                          Py_ssize_t P, Py_ssize_t L,
                          _Param mean,          # IN  (P,) or (C,) saved or running mean
                          _Param rstd,          # IN  saved or running 1/sqrt(var + eps)
                          _Param weight,        # IN  (P,), (C,) or none: scale
                          floating *dx,         # OUT (P, L), may be dy or x itself
                          double *sum_dy,       # OUT (P,) sum(dy)
                          double *sum_dy_xhat,  # OUT (P,) sum(dy * (x - mean) * rstd)
                          bint use_input_stats,
                          int n_threads,
                          _Param bias,          # IN  (P,), (C,) or none: the forward's shift
                                                #     (read only with an activation)
                          int act, double slope,
                          _Reduce red=_NO_REDUCE) except -1:
    """dx and the per-plane sums that dweight/dbias reduce from, through the activation `act`
    (the gradient g = dy * act'(t) takes dy's place, t recomputed from x), and with red.N
    those reductions (C = P / red.N).  Deferred float32 parameters (_Param.f) are converted
    by the small-plane batches for their own planes, up front on the other paths."""
    n_threads = _team_size(P * L, n_threads)
    cdef Py_ssize_t k = _chunks_per_plane(P, L, sizeof(floating), n_threads)
    cdef int stream = _use_streaming_stores(P * L * sizeof(floating))
    cdef Py_ssize_t i, lo, hi, nb = (P + CIN_SMALL_BATCH - 1) // CIN_SMALL_BATCH
    cdef Py_ssize_t ntask = _reduce_tasks(red, P)
    global _threads_used
    if k == 1 and L <= CIN_BLOCK:  # small planes: batches of CIN_SMALL_BATCH
        if n_threads == 1:  # tiny inputs: without the OpenMP region
            _threads_used = 1
            with nogil:
                _small_backward_range(dy, x, dx, 0, P, L, mean, rstd, weight, use_input_stats,
                                      sum_dy, sum_dy_xhat, bias, act, slope, stream)
                if stream:  # the batch kernels do not fence
                    cin_store_fence()
                for i in range(ntask):
                    _reduce_task(red, P, sum_dy, sum_dy_xhat, i)
            return 0
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            # each thread its contiguous share of the batches, in one call
            lo = _thread_share(0, nb, 0) * CIN_SMALL_BATCH
            hi = min(P, _thread_share(0, nb, 1) * CIN_SMALL_BATCH)
            _small_backward_range(dy, x, dx, lo, hi, L, mean, rstd, weight, use_input_stats,
                                  sum_dy, sum_dy_xhat, bias, act, slope, stream)
            if stream:  # each thread, after its batches (the batch kernels do not fence)
                cin_store_fence()
            if ntask:  # dweight, dbias: blocks of channels, each summed in order of n
                cin_barrier()
                for i in prange(ntask, schedule='static'):
                    _reduce_task(red, P, sum_dy, sum_dy_xhat, i)
        return 0
    _param_ready(&mean)
    _param_ready(&rstd)
    _param_ready(&weight)
    _param_ready(&bias)
    _backward_planes_large(dy, x, P, L, k, mean, rstd, weight, dx, sum_dy, sum_dy_xhat,
                           use_input_stats, n_threads, bias, act, slope, stream)
    with nogil:
        for i in range(ntask):
            _reduce_task(red, P, sum_dy, sum_dy_xhat, i)
    return 0


cdef inline void _small_backward_range(const floating *dy, const floating *x, floating *dx,
                                       Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t L, _Param m,
                                       _Param r, _Param w, bint use_input_stats, double *sdy,
                                       double *sdyx, _Param b, int act, double slope,
                                       int stream) noexcept nogil:
    """The small-plane backward of planes lo .. hi, their deferred parameters converted
    first."""
    cdef Py_ssize_t n = hi - lo
    if n <= 0:
        return
    _param_convert(m, lo, n)
    _param_convert(r, lo, n)
    _param_convert(w, lo, n)
    _param_convert(b, lo, n)
    _small_backward(dy + lo * L, x + lo * L, dx + lo * L, n, L, lo, m, r, w, use_input_stats,
                    sdy + lo, sdyx + lo, b, act, slope, stream)


cdef int _backward_planes_large(const floating *dy, const floating *x, Py_ssize_t P,
                                Py_ssize_t L, Py_ssize_t k, _Param mean, _Param rstd,
                                _Param weight, floating *dx, double *sum_dy,
                                double *sum_dy_xhat, bint use_input_stats, int n_threads,
                                _Param bias, int act, double slope, int stream) except -1:
    """_backward_planes of planes larger than CIN_BLOCK (or split in k chunks)."""
    cdef Py_ssize_t p, i, j, lo, hi
    cdef double inv_l = 1.0 / <double>L, sg, sc
    cdef double *cg
    cdef double *cc
    cdef floating *gs
    if k == 1:
        # SiLU and the GELUs are compute bound: g = dy * act'(t) once per plane, into a
        # thread's scratch gs (cache resident), then the plain sums and dx passes on it: the
        # same bits as recomputing g in both passes (cin_scale with a = 1 writes g itself).
        # Without the scratch (other activations, larger planes, no memory) g is recomputed.
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            gs = NULL
            if act >= CIN_ACT_SILU and L <= CIN_G_SCRATCH:
                gs = <floating *>malloc(L * sizeof(floating))
            for p in prange(P, schedule='static'):
                if gs != NULL:
                    _bwd_g(dy + p * L, x + p * L, gs, L, _pparam(mean, p, 0.0),
                           _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0),
                           _pparam(bias, p, 0.0), act, slope)
                    _bwd_sums(gs, x + p * L, L, _pparam(mean, p, 0.0), &sum_dy[p],
                              &sum_dy_xhat[p])
                    _bwd_dx(gs, x + p * L, dx + p * L, L, _pparam(mean, p, 0.0),
                            _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0), sum_dy[p],
                            sum_dy_xhat[p], inv_l, use_input_stats, stream)
                else:
                    _bwd_sums(dy + p * L, x + p * L, L, _pparam(mean, p, 0.0), &sum_dy[p],
                              &sum_dy_xhat[p], act, _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0),
                              _pparam(bias, p, 0.0), slope)
                    _bwd_dx(dy + p * L, x + p * L, dx + p * L, L, _pparam(mean, p, 0.0),
                            _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0),
                            sum_dy[p], sum_dy_xhat[p], inv_l, use_input_stats, stream, act,
                            _pparam(bias, p, 0.0), slope)
                sum_dy_xhat[p] = sum_dy_xhat[p] * _pparam(rstd, p, 1.0)
            free(gs)
        return 0
    cg = <double *>malloc(2 * P * k * sizeof(double))
    if cg == NULL:
        raise MemoryError()
    cc = cg + P * k
    try:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for i in prange(P * k, schedule='static'):
                p = i // k
                j = i % k
                lo = _chunk_start(L, k, j)
                hi = _chunk_start(L, k, j + 1)
                _bwd_sums(dy + p * L + lo, x + p * L + lo, hi - lo, _pparam(mean, p, 0.0),
                          &cg[i], &cc[i], act, _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0),
                          _pparam(bias, p, 0.0), slope)
            cin_barrier()
            for p in prange(P, schedule='static'):
                sg = 0.0
                sc = 0.0
                for j in range(k):
                    sg = sg + cg[p * k + j]
                    sc = sc + cc[p * k + j]
                sum_dy[p] = sg
                sum_dy_xhat[p] = sc
            cin_barrier()
            for i in prange(P * k, schedule='static'):
                p = i // k
                j = i % k
                lo = _chunk_start(L, k, j)
                hi = _chunk_start(L, k, j + 1)
                _bwd_dx(dy + p * L + lo, x + p * L + lo, dx + p * L + lo, hi - lo,
                        _pparam(mean, p, 0.0), _pparam(rstd, p, 1.0), _pparam(weight, p, 1.0),
                        sum_dy[p], sum_dy_xhat[p], inv_l, use_input_stats, stream, act,
                        _pparam(bias, p, 0.0), slope)
            cin_barrier()
            for p in prange(P, schedule='static'):
                sum_dy_xhat[p] = sum_dy_xhat[p] * _pparam(rstd, p, 1.0)
    finally:
        free(cg)
    return 0

cdef int _plane_stats_impl(const floating[:, ::1] x,  # IN  (P, L)
                           double[::1] mean,           # OUT (P,)
                           double[::1] var,            # OUT (P,) biased variance
                           int n_threads) except -1:
    """Mean and biased variance of every plane (no output array)."""
    cdef Py_ssize_t P = x.shape[0], L = x.shape[1]
    n_threads = _team_size(P * L, n_threads)
    cdef Py_ssize_t k = _chunks_per_plane(P, L, sizeof(floating), n_threads)
    cdef Py_ssize_t p, i, j, lo, hi
    cdef double inv_l = 1.0 / <double>L
    cdef double[::1] cmean = np.empty(P * k, dtype=np.float64)
    cdef double[::1] cm2 = np.empty(P * k, dtype=np.float64)
    with nogil, parallel(num_threads=n_threads):
        _record_team_size()
        for i in prange(P * k, schedule='static'):
            p = i // k
            j = i % k
            lo = _chunk_start(L, k, j)
            hi = _chunk_start(L, k, j + 1)
            _stats(&x[p, lo], hi - lo, &cmean[i], &cm2[i])
        cin_barrier()
        for p in prange(P, schedule='static'):
            _merge_chunks(L, k, &cmean[p * k], &cm2[p * k], &mean[p], &var[p])
            var[p] = var[p] * inv_l
    return 0

# ---- channels-last drivers: x is (N, L, C) C-contiguous, i.e. (N, *spatial, C) memory ----------
# Statistics need every row of a sample before any of its elements can be normalized, so the
# channels-last passes read each sample twice.  Work items are (sample, block of rows) over
# whole (super-)rows; each computes per-channel partial results with loops vectorised over
# channels, a per-(n, c) merge follows, then a third loop over the same items (each thread
# keeps its share, _thread_share) finishes them, last read first: whatever of them is still in
# cache is read before it is evicted (up to 6 % faster than the same order on a Xeon VM).
# Samples go in groups small enough for the second read to find them in the team's L2 or in
# the LLC (see _samples_per_group).  The per-channel sums read the rows in order, with
# software prefetches ahead (cin_cl_block_sums).  (Walking one sample's tile of channels down
# all its rows instead, to reuse the tile from L2, measured 2 to 7x slower on a Zen 3 VM: a
# stride of C elements defeats the prefetchers and the TLB.  On an Intel Xeon VM with a 2 MiB
# L2, tiles of 16 to 64 channels, each a self-contained item with no barrier, with prefetches
# a tile's 4 KiB ahead, were still 1.2 to 3x slower than these row-ordered passes.)

cdef enum:
    # Coefficient arrays hold RC + CL_PAD lanes, periodic in C, so that the streaming-store
    # loops can read a whole vector (up to 16 lanes) at any lane offset below RC.
    CL_PAD = 16
    CL_ITEMS_PER_THREAD = 2
    # Samples (all arrays read) up to this size go whole to one thread: with the output, twice
    # this per thread stays in that core's L2 and its share of the LLC between the two reads.
    # Their sums run without software prefetches: a sample is one short forward run per array,
    # which the hardware prefetchers follow, and the prefetch instructions cost more than they
    # save (on a Xeon VM, paired: tiny float64 7 to 8 % faster without, the other fused shapes
    # unchanged; the larger, row-block items were 3 to 13 % slower without).
    CL_FUSE_BYTES = 1024 * 1024


cdef Py_ssize_t _cl_chunks(Py_ssize_t N, Py_ssize_t L, int n_threads) noexcept nogil:
    """Row blocks per sample for groups of N samples: as few as give every thread
    CL_ITEMS_PER_THREAD items (each block costs a Chan merge per channel, and the items are
    equal, so a static schedule balances them)."""
    cdef Py_ssize_t k = (CL_ITEMS_PER_THREAD * n_threads + N - 1) // N
    if k > L:
        k = L
    return k if k > 1 else 1


cdef inline Py_ssize_t _row_start(Py_ssize_t L, Py_ssize_t k, Py_ssize_t j) noexcept nogil:
    return L if j >= k else (L * j) // k


cdef inline void _cl_stats(const floating *x, Py_ssize_t rows, Py_ssize_t w, Py_ssize_t ld,
                           floating *s1, floating *s2, floating *k, double *mean,
                           double *m2, int pf) noexcept nogil:
    if floating is float:
        cin_cl_stats_f(x, rows, w, ld, s1, s2, k, mean, m2, pf)
    else:
        cin_cl_stats_d(x, rows, w, ld, s1, s2, k, mean, m2, pf)


cdef inline void _cl_normalize(const floating *x, floating *y, Py_ssize_t rows, Py_ssize_t w,
                               Py_ssize_t ld, const floating *k, const floating *a,
                               const floating *b, int stream, const floating *res=NULL,
                               int act=0, double slope=0.0) noexcept nogil:
    if floating is float:
        cin_cl_normalize_f(x, y, rows, w, ld, k, a, b, res, act, <float>slope, stream)
    else:
        cin_cl_normalize_d(x, y, rows, w, ld, k, a, b, res, act, slope, stream)


cdef inline void _cl_bwd_sums(const floating *dy, const floating *x, Py_ssize_t rows,
                              Py_ssize_t w, Py_ssize_t ld, const floating *k, floating *s1,
                              floating *s2, double *sdy, double *sdyx, int pf,
                              const floating *af, const floating *bf, int act,
                              double slope) noexcept nogil:
    if floating is float:
        cin_cl_backward_sums_f(dy, x, rows, w, ld, k, s1, s2, sdy, sdyx, pf, af, bf, act,
                               <float>slope)
    else:
        cin_cl_backward_sums_d(dy, x, rows, w, ld, k, s1, s2, sdy, sdyx, pf, af, bf, act, slope)


cdef inline void _cl_bwd_dx(const floating *dy, const floating *x, floating *dx, Py_ssize_t rows,
                            Py_ssize_t w, Py_ssize_t ld, const floating *k, const floating *a,
                            const floating *b, const floating *cc, int stream,
                            const floating *af, const floating *bf, int act,
                            double slope) noexcept nogil:
    """dx from the gradient coefficients (through the activation `act`, its pre-activation
    t = (x - k) * af + bf); cc = NULL: fixed statistics, dx = a * g.  (Fixed statistics without
    an activation use _cl_normalize with dy as x, see _cl_item_dx.)"""
    if floating is float:
        cin_cl_backward_dx_f(dy, x, dx, rows, w, ld, k, a, b, cc, af, bf, act, <float>slope,
                             stream)
    else:
        cin_cl_backward_dx_d(dy, x, dx, rows, w, ld, k, a, b, cc, af, bf, act, slope, stream)


cdef Py_ssize_t _samples_per_group(Py_ssize_t sample_bytes, Py_ssize_t N,
                                   int n_threads) noexcept nogil:
    """Samples processed together (statistics, merge, normalize) so that what the first loop
    reads is still in cache when the third loop reads it again (last read first).

    In the team's L2 when a sample fits in it: samples whose share per thread takes half of its
    L2 at most (at least one), so that the output the third loop writes evicts other lines
    than the ones it has yet to read (on a 2-core Xeon VM, 2 MiB of L2 per core: style float32,
    2 MiB samples, 1.16 to 1.20 times the NCHW time in groups of one against 1.25 to 1.32 in
    groups of two).  Else in the last-level cache: an eighth of it, so that with the output the
    group takes a quarter.  (A process gets only about its cores' share of a shared LLC: on a
    2-core Zen 3 VM, one 32 MiB L3 for 8 cores, reads ran at L3 speed up to about 8 MiB and at
    DRAM speed from 16 MiB on.)"""
    cdef Py_ssize_t l2 = n_threads * _l2_bytes, g
    if sample_bytes < 1:
        sample_bytes = 1
    if sample_bytes <= l2:
        g = (l2 // 2) // sample_bytes
    else:
        g = (_llc_bytes // 8) // sample_bytes
    return 1 if g < 1 else (N if g > N else g)


cdef Py_ssize_t _cl_replicas(Py_ssize_t C) noexcept nogil:
    """Rows handled as one "super-row" of R*C virtual channels, so that the loops over channels
    run over a whole number of 16-element vectors even when C is small (C = 3: 16 rows, 48
    lanes).  Each virtual channel keeps its own partial results; they are folded per channel."""
    cdef Py_ssize_t g = 16, a = C
    if C >= 16:
        return 1
    while a:  # gcd(C, 16)
        g, a = a, g % a
    return 16 // g


cdef inline Py_ssize_t _thread_share(Py_ssize_t lo, Py_ssize_t hi, int end) noexcept nogil:
    """Start (end = 0) or end (end = 1) of the calling thread's contiguous share of items
    lo..hi-1 in a parallel region: equal shares, the first (hi - lo) % team threads one more."""
    cdef Py_ssize_t n = hi - lo, T = omp_get_num_threads()
    cdef Py_ssize_t t = omp_get_thread_num() + end
    return lo + (n // T) * t + (t if t < n % T else n % T)


cdef inline Py_ssize_t _item_rows(Py_ssize_t L, Py_ssize_t k, Py_ssize_t i) noexcept nogil:
    """Rows of item i (sample i // k, row block i % k)."""
    return _row_start(L, k, i % k + 1) - _row_start(L, k, i % k)


cdef struct _ClItem:
    Py_ssize_t s, lo, full, rem  # sample, first row, super-rows of R rows, leftover rows


cdef inline _ClItem _cl_item(Py_ssize_t L, Py_ssize_t k, Py_ssize_t R,
                             Py_ssize_t i) noexcept nogil:
    """Item i of a row-block split (k blocks per sample).  Returned by value: a struct
    assigned in a parallel block is thread-private, as results through pointers would not
    be."""
    cdef _ClItem it
    it.s = i // k
    it.lo = _row_start(L, k, i % k)
    it.full = _item_rows(L, k, i) // R
    it.rem = _item_rows(L, k, i) % R
    return it


cdef inline void _set_lanes(floating *row, Py_ssize_t c, Py_ssize_t C, Py_ssize_t RC,
                            floating v) noexcept nogil:
    """A coefficient of channel c in every lane of a (super-)row of coefficients, padding
    included."""
    cdef Py_ssize_t lane = c
    while lane < RC + CL_PAD:
        row[lane] = v
        lane += C


cdef inline void _cl_plane_stats(double m, double m2, Py_ssize_t L, double eps, double *mean,
                                 double *var, double *rstd) noexcept nogil:
    """A plane's mean, biased variance and 1/sqrt(var + eps) from its mean and M2."""
    mean[0] = m
    var[0] = m2 / <double>L
    rstd[0] = 1.0 / sqrt(var[0] + eps)


cdef inline void _cl_fwd_coefs(double mean, double rstd, double w, double b, floating *k,
                               floating *a, floating *beta) noexcept nogil:
    """A plane's y = (x - k) * a + beta, k = mean rounded to the data type."""
    cdef double ad = rstd * w
    k[0] = <floating>mean
    a[0] = <floating>ad
    beta[0] = <floating>(b - (mean - <double>k[0]) * ad)


cdef inline void _cl_bwd_coefs(double kd, Py_ssize_t L, double sg, double sx, double mu,
                               double rs, double w, bint use_input_stats, double *sdy,
                               double *sdyx, floating *a, floating *b,
                               floating *cc) noexcept nogil:
    """A plane from its sums sg = sum(dy) and sx = sum(dy * (x - k)), k = kd: sum(dy) and the
    centred sum(dy * xhat), and the coefficients of dx = a * dy + b * (x - k) + cc."""
    cdef double ad = w * rs, bd = 0.0, cd = 0.0
    sx = sx + (kd - mu) * sg       # centred: sum(dy * (x - mean))
    sdy[0] = sg
    sdyx[0] = sx * rs
    if use_input_stats:
        bd = -ad * rs * rs * sx / <double>L
        cd = -ad * sg / <double>L + bd * (kd - mu)
    a[0] = <floating>ad
    b[0] = <floating>bd
    cc[0] = <floating>cd


cdef inline const double *_sample_param(const double[::1] a, Py_ssize_t n, Py_ssize_t C,
                                         const double *fill, Py_ssize_t *step) noexcept nogil:
    """Sample n's C values of a (P,), (C,) or empty parameter: a pointer and its step (0: every
    channel reads *fill)."""
    step[0] = 1
    if a.shape[0] == 0:
        step[0] = 0
        return fill
    return &a[n * C] if a.shape[0] > C else &a[0]


cdef inline void _pad_lanes(floating *row, Py_ssize_t C) noexcept nogil:
    """Lanes C..C+CL_PAD-1 of a coefficient row of C >= CL_PAD channels (R == 1): the first
    CL_PAD lanes again (what _set_lanes writes there)."""
    cdef Py_ssize_t j
    for j in range(CL_PAD):
        row[C + j] = row[j]


cdef void _cl_fwd_sample_r1(floating *row, Py_ssize_t T, Py_ssize_t n, Py_ssize_t C,
                            Py_ssize_t L, const double *pm, const double *pm2,
                            const double[::1] weight, const double[::1] bias, double eps,
                            double[::1] mean, double[::1] var, double[::1] rstd,
                            bint use_input_stats) noexcept nogil:
    """Sample n's statistics from its partial sums pm/pm2 (one piece per channel, R == 1;
    unless given) and its coefficient rows, as the per-channel loop with _cl_fwd_coefficients
    computes them, in one loop over the channels."""
    cdef double one = 1.0, zero = 0.0
    cdef Py_ssize_t ws, bs, c, p0 = n * C
    cdef const double *w = _sample_param(weight, n, C, &one, &ws)
    cdef const double *b = _sample_param(bias, n, C, &zero, &bs)
    for c in range(C):
        if use_input_stats:
            _cl_plane_stats(pm[c], pm2[c], L, eps, &mean[p0 + c], &var[p0 + c], &rstd[p0 + c])
        _cl_fwd_coefs(mean[p0 + c], rstd[p0 + c], w[c * ws], b[c * bs], &row[c], &row[T + c],
                      &row[2 * T + c])
    _pad_lanes(row, C)
    _pad_lanes(row + T, C)
    _pad_lanes(row + 2 * T, C)


cdef void _cl_bwd_shift_r1(floating *row, Py_ssize_t n, Py_ssize_t C,
                           const double[::1] mean) noexcept nogil:
    """Sample n's shift row k = mean (R == 1)."""
    cdef double zero = 0.0
    cdef Py_ssize_t ms, c
    cdef const double *mu = _sample_param(mean, n, C, &zero, &ms)
    for c in range(C):
        row[c] = <floating>mu[c * ms]
    _pad_lanes(row, C)


cdef void _cl_bwd_sample_r1(floating *row, Py_ssize_t T, Py_ssize_t n, Py_ssize_t C,
                            Py_ssize_t L, const double *pg, const double *px,
                            const double[::1] mean, const double[::1] rstd,
                            const double[::1] weight, bint use_input_stats, double *sdy,
                            double *sdyx) noexcept nogil:
    """_cl_bwd_channel for every channel of sample n (R == 1) in one loop: its sums (sdy, sdyx:
    the sample's C outputs) and coefficient rows."""
    cdef double zero = 0.0, one = 1.0
    cdef Py_ssize_t ms, rss, ws, c
    cdef const double *m = _sample_param(mean, n, C, &zero, &ms)
    cdef const double *r = _sample_param(rstd, n, C, &one, &rss)
    cdef const double *w = _sample_param(weight, n, C, &one, &ws)
    for c in range(C):
        _cl_bwd_coefs(<double>row[c], L, pg[c], px[c], m[c * ms], r[c * rss], w[c * ws],
                      use_input_stats, &sdy[c], &sdyx[c], &row[T + c], &row[2 * T + c],
                      &row[3 * T + c])
    _pad_lanes(row + T, C)
    _pad_lanes(row + 2 * T, C)
    _pad_lanes(row + 3 * T, C)


cdef inline void _cl_channel_stats(const double *pm, const double *pm2, Py_ssize_t stride,
                                   Py_ssize_t k, Py_ssize_t L, Py_ssize_t R, Py_ssize_t C,
                                   Py_ssize_t c, double *mean, double *m2) noexcept nogil:
    """Channel c's mean and M2 from the partial statistics of one sample's k row blocks (item j
    at pm + j * stride: R super-row lanes of each channel, then the leftover rows')."""
    cdef double cnt = 0.0
    cdef Py_ssize_t j, r, full, rem
    mean[0] = 0.0
    m2[0] = 0.0
    for j in range(k):
        full = _item_rows(L, k, j) // R
        rem = _item_rows(L, k, j) % R
        for r in range(R):
            cin_chan_merge(&cnt, mean, m2, <double>full, pm[j * stride + r * C + c],
                           pm2[j * stride + r * C + c])
        cin_chan_merge(&cnt, mean, m2, <double>rem, pm[j * stride + R * C + c],
                       pm2[j * stride + R * C + c])


cdef inline void _cl_channel_sums(const double *pg, const double *px, Py_ssize_t stride,
                                  Py_ssize_t k, Py_ssize_t R, Py_ssize_t C, Py_ssize_t c,
                                  double *sg, double *sx) noexcept nogil:
    """Channel c's backward sums from the partial sums of one sample's k row blocks."""
    cdef Py_ssize_t j, r
    sg[0] = 0.0
    sx[0] = 0.0
    for j in range(k):
        for r in range(R + 1):
            sg[0] += pg[j * stride + r * C + c]
            sx[0] += px[j * stride + r * C + c]


class _ClPlan:
    """The work split of one channels-last call (see the comment above) over `arrays` input
    arrays, and its scratch."""

    def __init__(self, Py_ssize_t N, Py_ssize_t L, Py_ssize_t C, Py_ssize_t itemsize,
                 Py_ssize_t arrays, int n_threads, dt):
        self.n_threads = _team_size(N * L * C, n_threads)
        self.stream = _use_streaming_stores(N * L * C * itemsize)
        # fused: samples small enough to stay in L2 between their two reads, and enough of them
        # to share out whole
        self.fused = arrays * L * C * itemsize <= CL_FUSE_BYTES and N >= 2 * self.n_threads
        # samples per group first: every group must feed every thread
        self.G = N if self.fused else _samples_per_group(arrays * L * C * itemsize, N,
                                                          self.n_threads)
        self.k = 1 if self.fused else _cl_chunks(self.G, L, self.n_threads)
        self.R = _cl_replicas(C)
        RC = self.R * C
        # buffers per sample (coefficients) and per item (scratch, partial results); fused
        # (k == 1): per thread instead, reused sample after sample (fewer fresh pages per call)
        owners = self.n_threads if self.fused else N
        self.scratch = np.empty((owners * self.k, 3, RC), dtype=dt)
        # rows: k, a, b (forward: beta), cc, and for an activation the forward's af, bf
        self.coef = np.empty((6, owners, RC + CL_PAD), dtype=dt)
        # partial results per item: RC virtual channels, then C for the leftover rows
        self.part = np.empty((2, owners * self.k, RC + C), dtype=np.float64)


cdef int _forward_cl_impl(const floating[:, :, ::1] x,  # IN  (N, L, C)
                          floating[:, :, ::1] y,        # OUT (N, L, C), may be x itself
                          const double[::1] weight,     # IN  (P,), (C,) or empty
                          const double[::1] bias,       # IN  (P,), (C,) or empty
                          double eps,
                          double[::1] mean,             # OUT (P,) plane p = n*C + c
                          double[::1] var,              # OUT (P,) biased variance
                          double[::1] rstd,             # OUT (P,)
                          bint use_input_stats,         # False: mean/var given (eval)
                          int n_threads,
                          const floating[:, :, ::1] residual,  # IN (N, L, C) or None
                          int act, double slope) except -1:
    """Channels-last forward: statistics (unless given) then normalization, the activation
    and the residual."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2], k, R, G
    dt = np.float32 if floating is float else np.float64
    plan = _ClPlan(N, L, C, sizeof(floating), 1, n_threads, dt)
    cdef floating[:, :, ::1] scratch = plan.scratch, coef = plan.coef
    cdef double[:, :, ::1] part = plan.part
    cdef int team = plan.n_threads, stream = plan.stream
    cdef bint fused = plan.fused
    k, R, G = plan.k, plan.R, plan.G
    cdef const floating *rp = NULL if residual is None else &residual[0, 0, 0]
    _forward_cl_groups(x, y, weight, bias, eps, mean, var, rstd, use_input_stats, team, G, k, R,
                       scratch, coef, part, stream, fused, rp, act, slope)
    return 0


cdef inline void _cl_item_stats(const floating *x0, Py_ssize_t full, Py_ssize_t rem,
                                Py_ssize_t R, Py_ssize_t C, floating *scr, double *pm,
                                double *pm2, int pf) noexcept nogil:
    """Partial statistics of one item: `full` super-rows of R*C lanes from x0, then `rem` rows
    of C lanes, into pm/pm2 (RC lanes, then C).  scr: 3 * RC elements of scratch.  pf: with
    software prefetches (see the comment above CL_FUSE_BYTES)."""
    cdef Py_ssize_t RC = R * C
    if full > 0:
        _cl_stats(x0, full, RC, RC, scr, scr + RC, scr + 2 * RC, pm, pm2, pf)
    if rem > 0:
        _cl_stats(x0 + full * RC, rem, C, C, scr, scr + RC, scr + 2 * RC, pm + RC, pm2 + RC,
                  pf)


cdef inline void _cl_item_normalize(const floating *x0, floating *y0, Py_ssize_t full,
                                    Py_ssize_t rem, Py_ssize_t R, Py_ssize_t C,
                                    const floating *row, Py_ssize_t t, int stream,
                                    const floating *r0, int act, double slope) noexcept nogil:
    """Normalize one item with its sample's coefficient rows (k at row, a at row + t, beta at
    row + 2 t), then the activation and the residual (r0: the item's rows of it, or NULL)."""
    cdef Py_ssize_t RC = R * C
    if full > 0:
        _cl_normalize(x0, y0, full, RC, RC, row, row + t, row + 2 * t, stream, r0, act, slope)
    if rem > 0:
        _cl_normalize(x0 + full * RC, y0 + full * RC, rem, C, C, row, row + t, row + 2 * t, 0,
                      _at(r0, full * RC), act, slope)


cdef int _forward_cl_groups(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                            const double[::1] weight, const double[::1] bias, double eps,
                            double[::1] mean, double[::1] var, double[::1] rstd,
                            bint use_input_stats, int n_threads, Py_ssize_t G, Py_ssize_t k,
                            Py_ssize_t R, floating[:, :, ::1] scratch, floating[:, :, ::1] coef,
                            double[:, :, ::1] part, int stream, bint fused,
                            const floating *rp, int act, double slope) except -1:
    """The channels-last forward, G samples at a time: their statistics, merge, normalize, all
    groups in one parallel region.  fused (k == 1): each thread takes whole samples through all
    three steps, no barrier."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2], RC = R * C, g0, g1
    cdef Py_ssize_t T = coef.strides[0] // sizeof(floating)  # one coefficient row to the next
    cdef Py_ssize_t i, j, n, c, p, full, rem, t, first, last
    cdef _ClItem it
    cdef double m, m2
    if fused:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for n in prange(0, N, schedule='static'):
                t = threadid()  # this thread's buffers
                full = L // R
                rem = L % R
                if use_input_stats:
                    _cl_item_stats(&x[n, 0, 0], full, rem, R, C, &scratch[t, 0, 0],
                                   &part[0, t, 0], &part[1, t, 0], 0)
                if R == 1:  # one loop over the channels, no per-channel calls
                    _cl_fwd_sample_r1(&coef[0, t, 0], T, n, C, L, &part[0, t, 0], &part[1, t, 0],
                                      weight, bias, eps, mean, var, rstd, use_input_stats)
                else:
                    for c in range(C):
                        p = n * C + c
                        if use_input_stats:
                            # assigned here so that prange keeps them thread-private
                            m = m2 = 0.0
                            _cl_channel_stats(&part[0, t, 0], &part[1, t, 0], RC + C, 1, L, R,
                                              C, c, &m, &m2)
                            _cl_plane_stats(m, m2, L, eps, &mean[p], &var[p], &rstd[p])
                        _cl_fwd_coefficients(&coef[0, t, 0], T, c, C, RC, mean[p], rstd[p],
                                             _param_pc(weight, p, c, 1.0),
                                             _param_pc(bias, p, c, 0.0))
                _cl_item_normalize(&x[n, 0, 0], &y[n, 0, 0], full, rem, R, C, &coef[0, t, 0],
                                   T, stream, _at(rp, n * L * C), act, slope)
    else:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for j in range((N + G - 1) // G):  # every thread runs every group
                g0 = j * G
                g1 = g0 + G if g0 + G < N else N
                # this thread's items (assigned in the parallel block: thread-private)
                first = _thread_share(g0 * k, g1 * k, 0)
                last = _thread_share(g0 * k, g1 * k, 1)
                if use_input_stats:
                    for i in range(first, last):
                        it = _cl_item(L, k, R, i)
                        _cl_item_stats(&x[it.s, it.lo, 0], it.full, it.rem, R, C,
                                       &scratch[i, 0, 0], &part[0, i, 0], &part[1, i, 0], 1)
                cin_barrier()
                for p in prange(g0 * C, g1 * C, schedule='static'):
                    n = p // C
                    if use_input_stats:
                        m = m2 = 0.0  # assigned here so that prange keeps them thread-private
                        _cl_channel_stats(&part[0, n * k, 0], &part[1, n * k, 0], RC + C, k, L, R,
                                          C, p % C, &m, &m2)
                        _cl_plane_stats(m, m2, L, eps, &mean[p], &var[p], &rstd[p])
                    _cl_fwd_coefficients(&coef[0, n, 0], T, p % C, C, RC, mean[p], rstd[p],
                                         _param(weight, p, 1.0), _param(bias, p, 0.0))
                cin_barrier()
                # the same items, last read first: what is still in cache is read before it goes
                for i in range(last - 1, first - 1, -1):
                    it = _cl_item(L, k, R, i)
                    _cl_item_normalize(&x[it.s, it.lo, 0], &y[it.s, it.lo, 0], it.full, it.rem,
                                       R, C, &coef[0, it.s, 0], T, stream,
                                       _at(rp, (it.s * L + it.lo) * C), act, slope)
    return 0


cdef int _backward_cl_impl(const floating[:, :, ::1] dy,  # IN  (N, L, C)
                           const floating[:, :, ::1] x,   # IN  (N, L, C)
                           const double[::1] mean,        # IN  (P,), (C,)
                           const double[::1] rstd,        # IN  (P,), (C,)
                           const double[::1] weight,      # IN  (P,), (C,) or empty
                           floating[:, :, ::1] dx,        # OUT (N, L, C)
                           double[::1] sum_dy,            # OUT (P,)
                           double[::1] sum_dy_xhat,       # OUT (P,)
                           bint use_input_stats,
                           int n_threads,
                           const double[::1] bias,        # IN  (P,), (C,) or empty (activations)
                           int act, double slope) except -1:
    """Channels-last backward: per-channel sums, then dx (through the activation `act`)."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2], k, R, G
    dt = np.float32 if floating is float else np.float64
    plan = _ClPlan(N, L, C, sizeof(floating), 2, n_threads, dt)
    cdef floating[:, :, ::1] scratch = plan.scratch, coef = plan.coef
    cdef double[:, :, ::1] part = plan.part
    cdef int team = plan.n_threads, stream = plan.stream
    cdef bint fused = plan.fused
    k, R, G = plan.k, plan.R, plan.G
    _backward_cl_groups(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xhat, use_input_stats,
                        team, G, k, R, scratch, coef, part, stream, fused, bias, act, slope)
    return 0


cdef inline void _cl_fwd_coefficients(floating *row, Py_ssize_t t, Py_ssize_t c, Py_ssize_t C,
                                      Py_ssize_t RC, double mean, double rstd, double w,
                                      double b) noexcept nogil:
    """_cl_fwd_coefs of plane (n, c) into every lane of channel c of sample n's coefficient
    rows: k at row (= &coef[0, n, 0]), a at row + t, beta at row + 2 t."""
    cdef floating k, a, beta
    _cl_fwd_coefs(mean, rstd, w, b, &k, &a, &beta)
    _set_lanes(row, c, C, RC, k)
    _set_lanes(row + t, c, C, RC, a)
    _set_lanes(row + 2 * t, c, C, RC, beta)


cdef inline void _cl_bwd_channel(floating *row, Py_ssize_t t, Py_ssize_t c, Py_ssize_t C,
                                 Py_ssize_t RC, Py_ssize_t L, double sg, double sx, double mu,
                                 double rs, double w, bint use_input_stats, double *sdy,
                                 double *sdyx) noexcept nogil:
    """_cl_bwd_coefs of plane (n, c), k = row[c] (row = &coef[0, n, 0]), with the coefficients
    in every lane of channel c of rows row + t, row + 2 t and row + 3 t."""
    cdef floating a, b, cc
    _cl_bwd_coefs(<double>row[c], L, sg, sx, mu, rs, w, use_input_stats, sdy, sdyx, &a, &b,
                  &cc)
    _set_lanes(row + t, c, C, RC, a)
    _set_lanes(row + 2 * t, c, C, RC, b)
    _set_lanes(row + 3 * t, c, C, RC, cc)


cdef inline void _cl_pre_act_lanes(floating *row, Py_ssize_t t, Py_ssize_t c, Py_ssize_t C,
                                   Py_ssize_t RC, double mean, double rstd, double w,
                                   double b) noexcept nogil:
    """The forward's pre-activation coefficients of plane (n, c) (_pre_activation) into every
    lane of channel c of rows row + 4 t (af) and row + 5 t (bf), row = &coef[0, n, 0]."""
    cdef floating af, bf
    _pre_activation(mean, rstd, w, b, &af, &bf)
    _set_lanes(row + 4 * t, c, C, RC, af)
    _set_lanes(row + 5 * t, c, C, RC, bf)


cdef inline void _cl_item_sums(const floating *g0, const floating *x0, Py_ssize_t full,
                               Py_ssize_t rem, Py_ssize_t R, Py_ssize_t C, const floating *krow,
                               floating *scr, double *pg, double *px, int pf, Py_ssize_t t=0,
                               int act=0, double slope=0.0) noexcept nogil:
    """Partial backward sums of one item (layout and pf of _cl_item_stats; k: the sample's
    shift row, with an activation's af, bf at krow + 4 t, krow + 5 t); pg/px are zeroed first,
    so parts an item lacks add nothing."""
    cdef Py_ssize_t RC = R * C, j
    for j in range(RC + C):
        pg[j] = 0.0
        px[j] = 0.0
    if full > 0:
        _cl_bwd_sums(g0, x0, full, RC, RC, krow, scr, scr + RC, pg, px, pf, krow + 4 * t,
                     krow + 5 * t, act, slope)
    if rem > 0:
        _cl_bwd_sums(g0 + full * RC, x0 + full * RC, rem, C, C, krow, scr, scr + RC, pg + RC,
                     px + RC, pf, krow + 4 * t, krow + 5 * t, act, slope)


cdef inline void _cl_item_dx(const floating *g0, const floating *x0, floating *d0,
                             Py_ssize_t full, Py_ssize_t rem, Py_ssize_t R, Py_ssize_t C,
                             const floating *row, Py_ssize_t t, bint use_input_stats,
                             int stream, int act=0, double slope=0.0) noexcept nogil:
    """dx of one item from its sample's coefficient rows (k, a, b, cc at row + 0..3 t; an
    activation's af, bf at row + 4 t, row + 5 t)."""
    cdef Py_ssize_t RC = R * C
    cdef const floating *cc = NULL if not use_input_stats else row + 3 * t
    if act:  # fixed statistics too: cc = NULL, dx = a * g
        if full > 0:
            _cl_bwd_dx(g0, x0, d0, full, RC, RC, row, row + t, row + 2 * t, cc, stream,
                       row + 4 * t, row + 5 * t, act, slope)
        if rem > 0:
            _cl_bwd_dx(g0 + full * RC, x0 + full * RC, d0 + full * RC, rem, C, C, row, row + t,
                       row + 2 * t, cc, 0, row + 4 * t, row + 5 * t, act, slope)
        return
    if not use_input_stats:
        # dx = a * dy, written so that x and the mean (an Inf, a NaN) cannot leak in; b and cc
        # are 0 here and serve as offset and shift
        if full > 0:
            _cl_normalize(g0, d0, full, RC, RC, row + 3 * t, row + t, row + 2 * t, stream)
        if rem > 0:
            _cl_normalize(g0 + full * RC, d0 + full * RC, rem, C, C, row + 3 * t, row + t,
                          row + 2 * t, 0)
        return
    if full > 0:
        _cl_bwd_dx(g0, x0, d0, full, RC, RC, row, row + t, row + 2 * t, row + 3 * t, stream,
                   NULL, NULL, 0, 0.0)
    if rem > 0:
        _cl_bwd_dx(g0 + full * RC, x0 + full * RC, d0 + full * RC, rem, C, C, row, row + t,
                   row + 2 * t, row + 3 * t, 0, NULL, NULL, 0, 0.0)


cdef int _backward_cl_groups(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                             const double[::1] mean, const double[::1] rstd,
                             const double[::1] weight, floating[:, :, ::1] dx,
                             double[::1] sum_dy, double[::1] sum_dy_xhat, bint use_input_stats,
                             int n_threads, Py_ssize_t G, Py_ssize_t k, Py_ssize_t R,
                             floating[:, :, ::1] scratch, floating[:, :, ::1] coef,
                             double[:, :, ::1] part, int stream, bint fused,
                             const double[::1] bias, int act, double slope) except -1:
    """The channels-last backward, G samples at a time: sums, merge, dx, all groups in one
    parallel region, through the activation `act` (bias: the forward's).  fused (k == 1): each
    thread takes whole samples through all the steps, no barrier."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2], RC = R * C, g0, g1
    cdef Py_ssize_t T = coef.strides[0] // sizeof(floating)  # one coefficient row to the next
    cdef Py_ssize_t i, j, n, c, p, full, rem, t, first, last
    cdef _ClItem it
    cdef double sg, sx
    if fused:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for n in prange(0, N, schedule='static'):
                t = threadid()  # this thread's buffers
                full = L // R
                rem = L % R
                # one loop over the channels (R == 1), or a call per channel
                if R == 1:
                    _cl_bwd_shift_r1(&coef[0, t, 0], n, C, mean)
                else:
                    for c in range(C):
                        _set_lanes(&coef[0, t, 0], c, C, RC,
                                   <floating>_param_pc(mean, n * C + c, c, 0.0))
                if act:
                    for c in range(C):
                        p = n * C + c
                        _cl_pre_act_lanes(&coef[0, t, 0], T, c, C, RC, _param_pc(mean, p, c, 0.0),
                                          _param_pc(rstd, p, c, 1.0),
                                          _param_pc(weight, p, c, 1.0),
                                          _param_pc(bias, p, c, 0.0))
                _cl_item_sums(&dy[n, 0, 0], &x[n, 0, 0], full, rem, R, C, &coef[0, t, 0],
                              &scratch[t, 0, 0], &part[0, t, 0], &part[1, t, 0], 0, T, act,
                              slope)
                if R == 1:
                    _cl_bwd_sample_r1(&coef[0, t, 0], T, n, C, L, &part[0, t, 0], &part[1, t, 0],
                                      mean, rstd, weight, use_input_stats, &sum_dy[n * C],
                                      &sum_dy_xhat[n * C])
                else:
                    for c in range(C):
                        p = n * C + c
                        sg = sx = 0.0  # assigned here so that prange keeps them thread-private
                        _cl_channel_sums(&part[0, t, 0], &part[1, t, 0], RC + C, 1, R, C, c, &sg,
                                         &sx)
                        _cl_bwd_channel(&coef[0, t, 0], T, c, C, RC, L, sg, sx,
                                        _param_pc(mean, p, c, 0.0), _param_pc(rstd, p, c, 1.0),
                                        _param_pc(weight, p, c, 1.0), use_input_stats,
                                        &sum_dy[p], &sum_dy_xhat[p])
                _cl_item_dx(&dy[n, 0, 0], &x[n, 0, 0], &dx[n, 0, 0], full, rem, R, C,
                            &coef[0, t, 0], T, use_input_stats, stream, act, slope)
    else:
        with nogil, parallel(num_threads=n_threads):
            _record_team_size()
            for j in range((N + G - 1) // G):  # every thread runs every group
                g0 = j * G
                g1 = g0 + G if g0 + G < N else N
                for p in prange(g0 * C, g1 * C, schedule='static'):
                    _set_lanes(&coef[0, p // C, 0], p % C, C, RC, <floating>_param(mean, p, 0.0))
                    if act:
                        _cl_pre_act_lanes(&coef[0, p // C, 0], T, p % C, C, RC,
                                          _param(mean, p, 0.0), _param(rstd, p, 1.0),
                                          _param(weight, p, 1.0), _param(bias, p, 0.0))
                cin_barrier()
                # this thread's items (assigned in the parallel block: thread-private)
                first = _thread_share(g0 * k, g1 * k, 0)
                last = _thread_share(g0 * k, g1 * k, 1)
                for i in range(first, last):
                    it = _cl_item(L, k, R, i)
                    _cl_item_sums(&dy[it.s, it.lo, 0], &x[it.s, it.lo, 0], it.full, it.rem, R, C,
                                  &coef[0, it.s, 0], &scratch[i, 0, 0], &part[0, i, 0],
                                  &part[1, i, 0], 1, T, act, slope)
                cin_barrier()
                for p in prange(g0 * C, g1 * C, schedule='static'):
                    n = p // C
                    sg = sx = 0.0  # assigned here so that prange keeps them thread-private
                    _cl_channel_sums(&part[0, n * k, 0], &part[1, n * k, 0], RC + C, k, R, C,
                                     p % C, &sg, &sx)
                    _cl_bwd_channel(&coef[0, n, 0], T, p % C, C, RC, L, sg, sx,
                                    _param(mean, p, 0.0), _param(rstd, p, 1.0),
                                    _param(weight, p, 1.0), use_input_stats, &sum_dy[p],
                                    &sum_dy_xhat[p])
                cin_barrier()
                # the same items, last read first: what is still in cache is read before it goes
                for i in range(last - 1, first - 1, -1):
                    it = _cl_item(L, k, R, i)
                    _cl_item_dx(&dy[it.s, it.lo, 0], &x[it.s, it.lo, 0], &dx[it.s, it.lo, 0],
                                it.full, it.rem, R, C, &coef[0, it.s, 0], T, use_input_stats,
                                stream, act, slope)
    return 0


_F32 = np.dtype(np.float32)
_NO_PARAM = np.empty(0)  # an absent per-plane parameter


# Thin def wrappers: a fused-type def function dispatches on its arguments' types in Python
# (microseconds per call); choosing the specialization from x.dtype is far cheaper.

def forward_train(x, y, weight, bias, double eps, stats, int n_threads, residual=None,
                  int act=0, double slope=0.0):
    """Instance statistics of every (P, L) plane of x into stats (float64 (3, P): mean, biased
    variance, rstd), then y = act((x - mean) * rstd * weight + bias) + residual; x, y (and the
    residual, x's shape and dtype, or None) are C-contiguous float32 or float64; act is an
    activation code (cinstnorm_kernels.h), slope LeakyReLU's."""
    cdef double[:, ::1] st = stats  # one buffer for the three (each costs a buffer request)
    cdef const float[:, ::1] xf
    cdef float[:, ::1] yf
    cdef const double[:, ::1] xd
    cdef double[:, ::1] yd
    cdef const float[:, ::1] rf
    cdef const double[:, ::1] rd
    cdef const float *rpf
    cdef const double *rpd
    cdef _Param w = _mv_param(weight), b = _mv_param(bias)
    if x.itemsize == 4:  # float32 (the callers pass float32 or float64)
        xf = x
        yf = y
        rpf = NULL
        if residual is not None:
            rf = residual
            rpf = &rf[0, 0]
        _forward_planes(&xf[0, 0], &yf[0, 0], xf.shape[0], xf.shape[1], w, b, eps, &st[0, 0],
                        &st[1, 0], &st[2, 0], n_threads, rpf, act, slope)
    else:
        xd = x
        yd = y
        rpd = NULL
        if residual is not None:
            rd = residual
            rpd = &rd[0, 0]
        _forward_planes(&xd[0, 0], &yd[0, 0], xd.shape[0], xd.shape[1], w, b, eps, &st[0, 0],
                        &st[1, 0], &st[2, 0], n_threads, rpd, act, slope)


def forward_channels_last(x, y, weight, bias, double eps, mean, var, rstd,
                          bint use_input_stats, int n_threads, residual=None, int act=0,
                          double slope=0.0):
    """Forward on (N, L, C) C-contiguous x and y (channels-last memory). With use_input_stats
    the statistics go into mean/var/rstd (P,); without, mean and rstd are read from them.
    residual ((N, L, C) like x, or None), act, slope: as forward_train."""
    if x.dtype == _F32:
        _forward_cl_impl[cython.float](x, y, weight, bias, eps, mean, var, rstd,
                                       use_input_stats, n_threads, residual, act, slope)
    else:
        _forward_cl_impl[cython.double](x, y, weight, bias, eps, mean, var, rstd,
                                        use_input_stats, n_threads, residual, act, slope)


def backward_channels_last(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xhat,
                           bint use_input_stats, int n_threads, bias=_NO_PARAM, int act=0,
                           double slope=0.0):
    """backward() for (N, L, C) C-contiguous dy, x and dx (channels-last memory)."""
    if x.dtype == _F32:
        _backward_cl_impl[cython.float](dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xhat,
                                        use_input_stats, n_threads, bias, act, slope)
    else:
        _backward_cl_impl[cython.double](dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xhat,
                                         use_input_stats, n_threads, bias, act, slope)


def plane_stats(x, mean, var, int n_threads):
    """Mean and biased variance of every (P, L) plane of x into float64 (P,) mean and var."""
    if x.dtype == _F32:
        _plane_stats_impl[cython.float](x, mean, var, n_threads)
    else:
        _plane_stats_impl[cython.double](x, mean, var, n_threads)


def normalize(x, y, mean, rstd, weight, bias, int n_threads, residual=None, int act=0,
              double slope=0.0):
    """y = act((x - mean) * rstd * weight + bias) + residual with given per-plane float64 (P,)
    statistics (residual, act, slope: as forward_train)."""
    if x.dtype == _F32:
        _normalize_impl[cython.float](x, y, mean, rstd, weight, bias, n_threads, residual, act,
                                      slope)
    else:
        _normalize_impl[cython.double](x, y, mean, rstd, weight, bias, n_threads, residual, act,
                                       slope)


def backward(dy, x, mean, rstd, weight, dx, double[::1] sum_dy, double[::1] sum_dy_xhat,
             bint use_input_stats, int n_threads, bias=_NO_PARAM, int act=0, double slope=0.0):
    """dx from dy, x and per-plane statistics; per-plane sum(g) and sum(g * xhat), g = dy or,
    with an activation code act, dy * act'(t) at the forward's t = xhat * weight + bias
    (bias: (P,), (C,) or empty float64, read only with an activation)."""
    cdef const float[:, ::1] gf, xf
    cdef float[:, ::1] df
    cdef const double[:, ::1] gd, xd
    cdef double[:, ::1] dd
    cdef _Param m = _mv_param(mean), r = _mv_param(rstd), w = _mv_param(weight)
    cdef _Param b = _mv_param(bias)
    if x.dtype == _F32:
        gf = dy
        xf = x
        df = dx
        _backward_planes(&gf[0, 0], &xf[0, 0], xf.shape[0], xf.shape[1], m, r, w, &df[0, 0],
                         &sum_dy[0], &sum_dy_xhat[0], use_input_stats, n_threads, b, act,
                         slope)
    else:
        gd = dy
        xd = x
        dd = dx
        _backward_planes(&gd[0, 0], &xd[0, 0], xd.shape[0], xd.shape[1], m, r, w, &dd[0, 0],
                         &sum_dy[0], &sum_dy_xhat[0], use_input_stats, n_threads, b, act,
                         slope)


# ---- fast paths of the public calls -------------------------------------------------------
# A call on dense arrays (exact ndarrays, C-contiguous, aligned, native float32/float64) with
# plain arguments spends most of its time in Python when the input is small: validation,
# layout, parameter conversion, thread resolution (20 to 40 us against 2 to 10 us of kernel on
# (1, 64, 16, 16)).  These functions check the common case here, in C, run the same pointer
# drivers as the full path (so the results are bitwise the same), and return None for anything
# else: the full Python path then runs, raises its own errors, or handles the unusual layout.
# Nothing is written before every check has passed.

# set_num_threads(n): n; 0: the OpenMP default; -1: a count outside the fast paths' range
cdef int _default_threads = 0

cdef enum:
    # Scratch doubles on the stack (converted parameters, statistics): P = 200 planes or so.
    _STACK_DOUBLES = 1024
    _MAX_FAST_THREADS = 4096
    _DENSE = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    # fast_forward modes: what it returns
    FAST_Y = 0          # y
    FAST_Y_STATS = 1    # (y, mean, rstd): (N, C) arrays of x's dtype
    FAST_Y_PLANES = 2   # (y, stats): float64 (3, P) mean, biased variance, rstd


# the modes for Python callers
FORWARD_Y, FORWARD_Y_STATS, FORWARD_Y_PLANES = FAST_Y, FAST_Y_STATS, FAST_Y_PLANES


def set_default_threads(n):
    """The thread count of calls with n_threads=None (set_num_threads; None: the OpenMP
    default)."""
    global _default_threads
    if n is None:
        _default_threads = 0
    else:
        _default_threads = n if 1 <= n <= _MAX_FAST_THREADS else -1


cdef int _fast_threads(object n_threads) except -1:
    """n_threads of a fast call: None (the default) or a positive int (at most
    _MAX_FAST_THREADS); 0 for anything else, which the full path resolves or rejects."""
    cdef int overflow = 0
    cdef long v
    if n_threads is None:
        if _default_threads != 0:
            return _default_threads if _default_threads > 0 else 0
        v = omp_get_max_threads()
        return <int>v if v > 0 else 1
    if type(n_threads) is not int:
        return 0
    v = PyLong_AsLongAndOverflow(n_threads, &overflow)
    if overflow or v < 1 or v > _MAX_FAST_THREADS:
        return 0
    return <int>v


cdef inline int _dense_type(object a) noexcept:
    """NPY_FLOAT or NPY_DOUBLE for an exact ndarray the kernels read in place (C-contiguous,
    aligned, native byte order); -1 for anything else."""
    cdef cnp.ndarray arr
    cdef int t
    if type(a) is not cnp.ndarray:
        return -1
    arr = <cnp.ndarray>a
    if (cnp.PyArray_FLAGS(arr) & _DENSE) != _DENSE:
        return -1
    t = cnp.PyArray_TYPE(arr)
    if (t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE) or not cnp.PyArray_ISNOTSWAPPED(arr):
        return -1
    return t


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i, nd = cnp.PyArray_NDIM(a)
    if cnp.PyArray_NDIM(b) != nd:
        return False
    for i in range(nd):
        if cnp.PyArray_DIM(a, i) != cnp.PyArray_DIM(b, i):
            return False
    return True


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether two dense arrays share memory without being the same memory."""
    cdef char *pa = cnp.PyArray_BYTES(a)
    cdef char *pb = cnp.PyArray_BYTES(b)
    if pa == pb:
        return cnp.PyArray_NBYTES(a) != cnp.PyArray_NBYTES(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef bint _fast_out(object out, cnp.ndarray x, int t, object other) noexcept:
    """out (not None) can take the kernel's output in place: a dense, writable array of x's
    shape and dtype that is x's (and other's) memory or shares none of it."""
    cdef cnp.ndarray o
    if _dense_type(out) != t:
        return False
    o = <cnp.ndarray>out
    if not _same_shape(o, x) or not cnp.PyArray_ISWRITEABLE(o) or _overlap(o, x):
        return False
    return other is None or not _overlap(o, <cnp.ndarray>other)


cdef enum:
    # shapes a parameter may have (_load_param): per channel, per (n, c), per plane flattened
    _SHAPE_C = 1
    _SHAPE_NC = 2
    _SHAPE_P = 4


cdef int _load_param(object a, Py_ssize_t N, Py_ssize_t C, int shapes, double *buf,
                     _Param *out, bint defer=False) noexcept:
    """A dense parameter of one of `shapes` ((C,), (N, C), (N*C,)) as the kernels read it:
    float64 in place, float32 converted into buf (room for N*C), or with `defer` and N*C
    values left for the driver to convert (out.f; see _Param); None: no parameter.
    Returns 0, or -1 for anything else (the full path takes it)."""
    cdef cnp.ndarray arr
    cdef int nd
    cdef Py_ssize_t n, i
    cdef const float *f
    out.f = NULL
    if a is None:
        out.p = NULL
        out.n = 0
        return 0
    if _dense_type(a) < 0:
        return -1
    arr = <cnp.ndarray>a
    nd = cnp.PyArray_NDIM(arr)
    if nd == 1 and (shapes & _SHAPE_C) and cnp.PyArray_DIM(arr, 0) == C:
        n = C
    elif nd == 1 and (shapes & _SHAPE_P) and cnp.PyArray_DIM(arr, 0) == N * C:
        n = N * C
    elif (nd == 2 and (shapes & _SHAPE_NC) and cnp.PyArray_DIM(arr, 0) == N
          and cnp.PyArray_DIM(arr, 1) == C):
        n = N * C
    else:
        return -1
    out.n = n
    if cnp.PyArray_TYPE(arr) == cnp.NPY_DOUBLE:
        out.p = <const double *>cnp.PyArray_DATA(arr)
        return 0
    f = <const float *>cnp.PyArray_DATA(arr)
    out.p = buf
    if defer and n == N * C:
        out.f = f
        return 0
    for i in range(n):
        buf[i] = <double>f[i]
    return 0


cdef double *_scratch(Py_ssize_t need, double *stack) except NULL:
    """Room for `need` doubles: `stack` (_STACK_DOUBLES of them) when enough, else malloc'd
    (the caller frees what is not its stack)."""
    cdef double *mem
    if need <= _STACK_DOUBLES:
        return stack
    mem = <double *>malloc(need * sizeof(double))
    if mem == NULL:
        raise MemoryError()
    return mem


cdef inline Py_ssize_t _spatial(cnp.ndarray x) noexcept:
    cdef Py_ssize_t L = 1
    cdef int i
    for i in range(2, cnp.PyArray_NDIM(x)):
        L *= cnp.PyArray_DIM(x, i)
    return L


cdef void _to_dtype(const double *s, Py_ssize_t n, int t, void *dst) noexcept nogil:
    """n doubles into a float32 (t == NPY_FLOAT) or float64 array's data."""
    cdef Py_ssize_t i
    cdef float *f = <float *>dst
    cdef double *d = <double *>dst
    if t == cnp.NPY_FLOAT:
        for i in range(n):
            f[i] = <float>s[i]
    else:
        for i in range(n):
            d[i] = s[i]


def channel_sums(double[::1] sums, Py_ssize_t N, Py_ssize_t C, dtype, acc=None):
    """(C,) array of ``dtype`` (float32 or float64): per-plane float64 (N*C,) sums added over
    n, in order (what the fast backward returns as dweight and dbias), plus ``acc`` (None, or
    an earlier (C,) gradient to accumulate into, added in float64)."""
    cdef int t = cnp.NPY_FLOAT if np.dtype(dtype) == _F32 else cnp.NPY_DOUBLE
    cdef cnp.npy_intp dims[1]
    cdef Py_ssize_t c
    cdef double *d
    cdef const float *fa
    cdef const double *da
    if sums.shape[0] != N * C or N < 1:
        raise ValueError(f"expected {N} * {C} sums, got {sums.shape[0]}")
    dims[0] = C
    if acc is not None and (_dense_type(acc) < 0 or cnp.PyArray_NDIM(<cnp.ndarray>acc) != 1
                            or cnp.PyArray_DIM(<cnp.ndarray>acc, 0) != C):
        return (acc + channel_sums(sums, N, C, np.float64)).astype(dtype)
    res = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
    d = <double *>cnp.PyArray_DATA(<cnp.ndarray>res)
    _channel_sums(&sums[0], N, C, cnp.NPY_DOUBLE, d)
    if acc is not None:
        if cnp.PyArray_TYPE(<cnp.ndarray>acc) == cnp.NPY_FLOAT:
            fa = <const float *>cnp.PyArray_DATA(<cnp.ndarray>acc)
            for c in range(C):
                d[c] = <double>fa[c] + d[c]
        else:
            da = <const double *>cnp.PyArray_DATA(<cnp.ndarray>acc)
            for c in range(C):
                d[c] = da[c] + d[c]
    if t == cnp.NPY_DOUBLE:
        return res
    out = cnp.PyArray_EMPTY(1, dims, t, 0)
    _to_dtype(d, C, t, cnp.PyArray_DATA(<cnp.ndarray>out))
    return out


cdef object _fast_forward(object x, object weight, object bias, object eps, object n_threads,
                          object out, int mode, bint per_sample, int act=0, double slope=0.0):
    """fast_forward; per_sample: weight and bias may be (N, C); act, slope: a validated
    activation code and slope (no residual)."""
    cdef int t = _dense_type(x), nt
    cdef cnp.ndarray xa
    cdef Py_ssize_t N, C, L, P, need
    cdef double e
    cdef double stack[_STACK_DOUBLES]
    cdef double *mem
    cdef double *mean
    cdef double *var
    cdef double *rstd
    cdef _Param w, b
    cdef int shapes = _SHAPE_C | _SHAPE_NC if per_sample else _SHAPE_C
    if t < 0:
        return None
    xa = <cnp.ndarray>x
    if cnp.PyArray_NDIM(xa) < 3:
        return None
    N = cnp.PyArray_DIM(xa, 0)
    C = cnp.PyArray_DIM(xa, 1)
    L = _spatial(xa)
    P = N * C
    if P == 0 or L < 2 or type(eps) is not float:
        return None
    e = PyFloat_AS_DOUBLE(eps)
    if not (e >= 0.0 and e < INFINITY):
        return None
    nt = _fast_threads(n_threads)
    if nt == 0 or (out is not None and not _fast_out(out, xa, t, None)):
        return None
    need = 5 * P if per_sample else 2 * C + 3 * P
    mem = _scratch(need, stack)
    try:
        if (_load_param(weight, N, C, shapes, mem, &w) < 0
                or _load_param(bias, N, C, shapes, mem + w.n, &b) < 0):
            return None
        mean = mem + w.n + b.n
        var = mean + P
        rstd = var + P
        y = out if out is not None else _new_output(cnp.PyArray_NDIM(xa),
                                                    cnp.PyArray_DIMS(xa), t)
        if mode == FAST_Y_PLANES:
            stats = np.empty((3, P))
            mean = <double *>cnp.PyArray_DATA(<cnp.ndarray>stats)
            var = mean + P
            rstd = var + P
        if t == cnp.NPY_FLOAT:
            _forward_planes(<const float *>cnp.PyArray_DATA(xa),
                            <float *>cnp.PyArray_DATA(<cnp.ndarray>y), P, L, w, b, e, mean,
                            var, rstd, nt, NULL, act, slope)
        else:
            _forward_planes(<const double *>cnp.PyArray_DATA(xa),
                            <double *>cnp.PyArray_DATA(<cnp.ndarray>y), P, L, w, b, e, mean,
                            var, rstd, nt, NULL, act, slope)
        if mode == FAST_Y:
            return y
        if mode == FAST_Y_PLANES:
            return y, stats
        m_out = _nc_array(N, C, t)
        r_out = _nc_array(N, C, t)
        _to_dtype(mean, P, t, cnp.PyArray_DATA(<cnp.ndarray>m_out))
        _to_dtype(rstd, P, t, cnp.PyArray_DATA(<cnp.ndarray>r_out))
        return y, m_out, r_out
    finally:
        if mem != &stack[0]:
            free(mem)


cdef inline object _nc_array(Py_ssize_t N, Py_ssize_t C, int t):
    cdef cnp.npy_intp dims[2]
    dims[0] = N
    dims[1] = C
    return cnp.PyArray_EMPTY(2, dims, t, 0)


def fast_forward(x, weight, bias, eps, n_threads, out, int mode=FAST_Y_STATS, int act=0,
                 double slope=0.0):
    """instance_norm_forward(x, weight, bias, eps, n_threads=, out=) when every argument is in
    the common case (dense x with at least 2 spatial elements, weight and bias None or dense
    (C,) or (N, C), eps a float in [0, inf), n_threads None or positive, out None or a dense
    writable array of x's shape and dtype, x itself or apart from it); None otherwise.  mode
    FAST_Y_PLANES returns (y, float64 (3, P) statistics) instead, FAST_Y just y.  act, slope:
    a fused activation already validated (code and float slope; without a residual)."""
    return _fast_forward(x, weight, bias, eps, n_threads, out, mode, True, act, slope)


def fast_instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                       eps, n_threads, out):
    """instance_norm(...) without running statistics when every argument is in the common
    case (see fast_forward; weight and bias (C,) only, momentum None or a finite float); None
    otherwise."""
    if running_mean is not None or running_var is not None or use_input_stats is not True:
        return None
    if momentum is not None and (type(momentum) is not float
                                 or not isfinite(PyFloat_AS_DOUBLE(momentum))):
        return None
    return _fast_forward(x, weight, bias, eps, n_threads, out, FAST_Y, False)


def fast_backward(dy, x, mean, rstd, weight, use_input_stats, n_threads, out,
                  bint planes=False, bias=None, int act=0, double slope=0.0):
    """instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats=, n_threads=, out=)
    when every argument is in the common case (dense dy and x of one shape and dtype, mean,
    rstd and weight dense (N, C) or (C,) (weight may be None), use_input_stats a bool (True: at
    least 2 spatial elements), n_threads and out as for fast_forward, out may be dy or x);
    None otherwise.  planes (the internal call, validated already): mean, rstd and weight
    may be (P,) too, and it returns (dx, float64 (2, P) sum(dy), sum(dy * xhat)) instead.
    act, slope: a fused activation already validated (code, float slope), with the forward's
    bias (None, or of weight's shape: dbias then takes weight's shape as dweight does; without
    an activation only its shape is checked, as the full path does)."""
    cdef int t = _dense_type(x), nt
    cdef cnp.ndarray xa, ga
    cdef Py_ssize_t N, C, L, P, need
    cdef bint use
    cdef double stack[_STACK_DOUBLES]
    cdef double *mem
    cdef double *sdy
    cdef double *sdyx
    cdef _Param m, r, w, bp
    cdef _Reduce red = _NO_REDUCE
    cdef bint per_channel
    # the public call's (N, C) or (C,) parameters; the modules' saved (P,) statistics too
    cdef int shapes = _SHAPE_C | _SHAPE_NC | (_SHAPE_P if planes else 0)
    if t < 0 or _dense_type(dy) != t:
        return None
    if bias is not None and (weight is None or _dense_type(bias) < 0
                             or _dense_type(weight) < 0
                             or cnp.PyArray_NDIM(<cnp.ndarray>bias)
                             != cnp.PyArray_NDIM(<cnp.ndarray>weight)):
        return None
    xa = <cnp.ndarray>x
    ga = <cnp.ndarray>dy
    if cnp.PyArray_NDIM(xa) < 3 or not _same_shape(xa, ga):
        return None
    if use_input_stats is True:
        use = True
    elif use_input_stats is False:
        use = False
    else:
        return None
    N = cnp.PyArray_DIM(xa, 0)
    C = cnp.PyArray_DIM(xa, 1)
    L = _spatial(xa)
    P = N * C
    if P == 0 or L < 1 or (use and L < 2):
        return None
    nt = _fast_threads(n_threads)
    if nt == 0 or (out is not None and not _fast_out(out, xa, t, dy)):
        return None
    need = 6 * P
    mem = _scratch(need, stack)
    try:
        # float32 (N, C) statistics and weights: converted by the kernels' threads
        if (_load_param(mean, N, C, shapes, mem, &m, True) < 0
                or _load_param(rstd, N, C, shapes, mem + P, &r, True) < 0
                or _load_param(weight, N, C, shapes, mem + 2 * P, &w, True) < 0
                or _load_param(bias, N, C, shapes, mem + 5 * P, &bp, True) < 0):
            return None
        if act == 0:  # the bias is read only through an activation: its shape was checked
            bp = _NONE_PARAM
        sdy = mem + 3 * P
        sdyx = sdy + P
        if planes:
            sums = np.empty((2, P))
            sdy = <double *>cnp.PyArray_DATA(<cnp.ndarray>sums)
            sdyx = sdy + P
        dx = out if out is not None else _new_output(cnp.PyArray_NDIM(xa),
                                                     cnp.PyArray_DIMS(xa), t)
        # per-channel dweight and dbias: summed over n by the kernels' threads
        per_channel = (weight is not None and not planes
                       and not (w.n == P and cnp.PyArray_NDIM(<cnp.ndarray>weight) == 2))
        if per_channel:
            dw = _c_array(C, t)
            db = _c_array(C, t)
            red = _Reduce(N, t, cnp.PyArray_DATA(<cnp.ndarray>dw),
                          cnp.PyArray_DATA(<cnp.ndarray>db))
        if t == cnp.NPY_FLOAT:
            _backward_planes(<const float *>cnp.PyArray_DATA(ga),
                             <const float *>cnp.PyArray_DATA(xa), P, L, m, r, w,
                             <float *>cnp.PyArray_DATA(<cnp.ndarray>dx), sdy, sdyx, use, nt,
                             bp, act, slope, red)
        else:
            _backward_planes(<const double *>cnp.PyArray_DATA(ga),
                             <const double *>cnp.PyArray_DATA(xa), P, L, m, r, w,
                             <double *>cnp.PyArray_DATA(<cnp.ndarray>dx), sdy, sdyx, use, nt,
                             bp, act, slope, red)
        if planes:
            return dx, sums
        if weight is None:
            return dx, None, None
        if per_channel:
            return dx, dw, db
        dw = _nc_array(N, C, t)  # per sample: per plane
        db = _nc_array(N, C, t)
        _to_dtype(sdyx, P, t, cnp.PyArray_DATA(<cnp.ndarray>dw))
        _to_dtype(sdy, P, t, cnp.PyArray_DATA(<cnp.ndarray>db))
        return dx, dw, db
    finally:
        if mem != &stack[0]:
            free(mem)


cdef inline object _c_array(Py_ssize_t C, int t):
    cdef cnp.npy_intp dims[1]
    dims[0] = C
    return cnp.PyArray_EMPTY(1, dims, t, 0)


# ---- build and runtime facts ----------------------------------------------------------------

def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CIN_HAVE_OPENMP)


def openmp_version():
    """The _OPENMP date macro of the build (0 without OpenMP)."""
    return int(CIN_OPENMP_VERSION)


def omp_max_threads():
    """omp_get_max_threads() of the calling thread (threadpoolctl changes it)."""
    return int(omp_get_max_threads())


def threads_used_last_call():
    """Threads that really ran the parallel region of the most recent kernel call."""
    return int(_threads_used)


def simd_path():
    """The instruction set of the inner loops that run now."""
    return cin_isa_name().decode()


_ISA_LEVELS = {"baseline": 0, "avx2": 1, "avx512": 2}


def simd_supported():
    """The SIMD paths this CPU can run, in order."""
    bits = cin_isa_supported()
    return [name for name, level in _ISA_LEVELS.items() if bits & (1 << level)]


def select_simd(name):
    """Run the inner loops with `name` ('auto', 'baseline', 'avx2', 'avx512'), capped by what
    the CPU supports; returns the path now in use."""
    if name not in ("auto",) + tuple(_ISA_LEVELS):
        raise ValueError(f"unknown SIMD path {name!r}: use auto, baseline, avx2 or avx512")
    cin_select_isa(-1 if name == "auto" else _ISA_LEVELS[name])
    return simd_path()


def set_stream_min_bytes(Py_ssize_t nbytes):
    """Outputs larger than this use non-temporal (streaming) stores."""
    global _stream_min_bytes
    _stream_min_bytes = max(0, nbytes)


def stream_min_bytes():
    return int(_stream_min_bytes)


def set_l2_bytes(Py_ssize_t nbytes):
    """One core's L2 size, which sizes the channels-last sample groups (0: ignore the L2)."""
    global _l2_bytes
    _l2_bytes = max(0, nbytes)


def l2_bytes():
    return int(_l2_bytes)


def set_llc_bytes(Py_ssize_t nbytes):
    """The last-level cache size, which sizes the channels-last groups of samples larger than
    the team's L2 (an eighth of it per group)."""
    global _llc_bytes
    _llc_bytes = max(0, nbytes)


def llc_bytes():
    return int(_llc_bytes)


def set_min_elements_per_thread(Py_ssize_t n):
    """Below this many elements per thread a call uses fewer threads (1 for tiny inputs)."""
    global _min_elements_per_thread
    _min_elements_per_thread = max(1, n)


def min_elements_per_thread():
    return int(_min_elements_per_thread)


def build_flags():
    """Compiler flags the extension was built with."""
    return CIN_BUILD_FLAGS.decode()



def bounds_checking():
    """True in a CINSTNORM_DEBUG=1 build (Cython bounds checking on)."""
    return bool(CIN_DEBUG_BUILD)
