/* CUDA kernels of cinstnorm: instance normalization of P planes of L elements each.
 *
 * Compiled at run time by CuPy (NVRTC) once per device and element type: every kernel is a
 * template over T = float or double, instantiated through CuPy's `name_expressions` (see
 * cinstnorm/_gpu.py, which also chooses the regime and launches).  No headers are included, so
 * the same text compiles under NVRTC and under nvcc (tests/test_cuda_compile.py).
 *
 * Data: x, y, dy, dx are C-contiguous (P, L) arrays of T.  Per-plane parameters (weight, bias,
 * given mean/var/rstd) are float64 arrays read as a[(p / C) * ns + p % C]: ns = 0 for a
 * per-channel (C,) array, ns = C for a per-plane (N, C) one; a null pointer means the default
 * (weight 1, bias 0).  Statistics are written as float64 per plane.  Plane starts and all
 * offsets of the chunk kernels are 64-bit; offsets inside a plane that the group and block
 * kernels hold in registers are int (such a plane has at most a few ten thousand elements).
 *
 * Slots: a plane is read in slots of 16 bytes (4 floats or 2 doubles).  With `vec` set, slot 0
 * starts at the 16-byte boundary at or before the plane's first element, so every slot that
 * lies entirely inside the plane is one aligned 16-byte load or store; the first and last slots
 * may be partial and are read and written element by element.  `vec` requires every array of
 * the call to have the same address modulo 16 (the host checks); without it all slots are read
 * element by element, which is correct for any alignment.
 *
 * Regimes (the host picks one per call; at most two launches):
 *   group : a power-of-two group of G <= 32 lanes per plane, S slots per lane held in registers,
 *           shuffle reductions: 1 read + 1 write (small planes).
 *   block : a thread block per plane, S slots per thread in registers, block reductions:
 *           1 read + 1 write (medium planes, enough of them to fill the device).
 *   chunk : kernel A writes per-chunk partial results; kernel B merges a plane's partials in
 *           its prologue, while its first loads are in flight, and finishes its chunk
 *           (large planes, or too few planes to fill the device).
 *
 * Numerics: statistics from registers are exact two-pass: a mean estimate m1 from sums around
 * the plane's first element, then sum(x - k) and sum((x - k)^2) around k = m1 rounded to T, so
 * x - k is exact near the mean; each thread accumulates its few dozen elements in T and the
 * reductions across threads are in double.  Elements a thread holds outside the plane are
 * loaded as the first pass's shift and set to the second pass's shift in between, so they add
 * nothing to either sum; one 64-bit mask per thread records which elements are real
 * (per-element predicates kept across the passes would cost a register each).  Chunk
 * partials are (count, mean, M2) from sums in T around the chunk's first element (elements
 * outside the chunk are loaded as that shift), merged in double (sum of counts and count-weighted
 * means, then M2 = sum(M2_j + n_j (mean_j - mean)^2), which has no cancellation).
 * Normalization is y = (x - k) * alpha + beta with k = mean rounded to T, alpha = rstd * w and
 * beta = b - (mean - k) * alpha computed in double: no x * alpha + beta cancellation.
 *
 * Fused activation and residual (issue 14): every forward kernel that writes y writes y = act((x
 * - k) * alpha + beta) + residual, in T, and every backward kernel that reads dy uses g = dy *
 * act'(t) in its place (in the sums and in dx), t = (x - k) * alpha + beta recomputed from x and
 * the given mean, rstd, weight and bias: bitwise the forward's t.  The residual (null: none) is a
 * (P, L) array of T like y, read slot by slot as y is stored; its gradient is dy itself, so the
 * backward never sees it.  Activation codes are those of cinstnorm._validation.ACTIVATIONS and
 * src/cinstnorm_kernels.h (CIN_ACT_* below), with the formulas of the CPU's cin_act /
 * cin_act_grad, in T (expf/erfcf for float, exp/erfc for double, where the CPU's GELU has a
 * vector normal CDF; GELU as 0.5 t erfc(-t / sqrt 2), which keeps the left tail's relative
 * accuracy that 1 + erf would cancel; SiLU and GELU-tanh through sigmoids, as the CPU's vector
 * forms).  Instantiations: a template bool FUSED on each kernel that normalizes or reads dy
 * (forward: an activation or a residual; backward: an activation), with the code, the slope and
 * the residual pointer as runtime arguments.  FUSED = false is the plain kernel, which reads none
 * of them (no activation code, no residual loads, within 2 registers of before); FUSED = true
 * selects the code per element on a uniform value, which costs next to nothing beside the libm
 * calls of SiLU and the GELUs, and keeps the instantiations at two per kernel instead of six or
 * twelve.  _gpu.py compiles the FUSED ones as a second module per C type, on the first call that
 * needs them, so a plain call pays no NVRTC time for them; their forward block regime has 8 slots
 * per thread only (16 slots beside the residual spill).
 */

#define CIN_DEV __device__ __forceinline__

/* Threads per block of the group and chunk kernels, and the most threads of a block kernel;
 * _gpu.py uses the same numbers (GROUP_THREADS, CHUNK_THREADS, BLOCK_MAX_THREADS). */
#define CIN_GROUP_THREADS 256
#define CIN_CHUNK_THREADS 256
#define CIN_BLOCK_MAX_THREADS 512
/* Two resident blocks of the largest size per SM, so that one loads while the other reduces,
 * for the plain forward block kernel with up to 8 slots (32 registers of data) per thread.
 * With a fused activation and residual (FUSED) one: its libm code and the residual's slots do
 * not fit beside 8 slots in the 64 registers of two blocks (ptxas spills 56 bytes there). */
#define CIN_BLOCK_MIN_BLOCKS(S, FUSED) ((S) <= 8 && !(FUSED) ? 2 : 1)
/* Slots per thread per loop iteration of the chunk kernels (independent loads in flight). */
#define CIN_CHUNK_UNROLL 4
/* Resident blocks per SM that the fused chunk kernels are built for (_gpu.CHUNK_BLOCKS_PER_SM):
 * at most 85 registers per thread, which keeps ptxas from parking values in local memory
 * (sm_90) or taking 90 and more for the libm code.  The plain ones (FUSED false) need 64 or
 * fewer without a bound (0: none). */
#define CIN_CHUNK_MIN_BLOCKS(FUSED) ((FUSED) ? 3 : 0)
/* Fused activation codes (cinstnorm._validation.ACTIVATIONS, src/cinstnorm_kernels.h). */
#define CIN_ACT_NONE 0
#define CIN_ACT_RELU 1
#define CIN_ACT_LEAKY_RELU 2
#define CIN_ACT_SILU 3
#define CIN_ACT_GELU 4
#define CIN_ACT_GELU_TANH 5

namespace cin {

template <typename T> struct Vec;
template <> struct Vec<float> { static constexpr int n = 4; };
template <> struct Vec<double> { static constexpr int n = 2; };

/* ---- 16-byte and scalar memory access ---------------------------------------------------- */

CIN_DEV void vload(const float* __restrict__ p, float (&v)[4])
{
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}

CIN_DEV void vload(const double* __restrict__ p, double (&v)[2])
{
    const double2 q = __ldg(reinterpret_cast<const double2*>(p));
    v[0] = q.x; v[1] = q.y;
}

/* Outputs are never read again by these kernels: streaming (evict-first) stores keep x, which
 * the chunk regime reads twice, in L2. */
CIN_DEV void vstore(float* __restrict__ p, const float (&v)[4])
{
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}

CIN_DEV void vstore(double* __restrict__ p, const double (&v)[2])
{
    __stcs(reinterpret_cast<double2*>(p), make_double2(v[0], v[1]));
}

/* The elements [lo, hi) of one plane that a group, block or chunk reads and writes, seen as
 * 16-byte slots: slot s holds elements s*n - head ... s*n - head + n - 1. */
template <typename T, typename I>
struct Window {
    static constexpr int n = Vec<T>::n;
    I lo, hi;
    int head;   // elements of the plane before its first 16-byte boundary (0 without vec)
    bool vec;   // whole slots are 16-byte aligned in every array of the call

    CIN_DEV I first(I s) const { return s * n - head; }
    CIN_DEV bool valid(I e) const { return e >= lo && e < hi; }
    CIN_DEV bool full(I e0) const { return vec && e0 >= lo && e0 + n <= hi; }
};

template <typename T>
CIN_DEV int plane_head(const T* p, long long vec)
{
    return vec ? (int)((reinterpret_cast<unsigned long long>(p) & 15ull) / sizeof(T)) : 0;
}

template <typename T>
CIN_DEV long long plane_slots(long long L, int head)
{
    return (L + head + Vec<T>::n - 1) / Vec<T>::n;
}

template <typename T, typename I>
CIN_DEV Window<T, I> plane_window(const T* p, I L, long long vec)
{
    Window<T, I> w;
    w.head = plane_head(p, vec);
    w.vec = vec != 0;
    w.lo = 0;
    w.hi = L;
    return w;
}

/* Chunk j of a plane: slots [s0, s1) of chunk_slots each (the last ones may be short or empty). */
template <typename T>
CIN_DEV Window<T, long long> chunk_window(const T* p, long long L, long long vec, long long j,
                                          long long chunk_slots, long long& s0, long long& s1)
{
    Window<T, long long> w = plane_window(p, L, vec);
    const long long ns = plane_slots<T>(L, w.head);
    s0 = j * chunk_slots;
    if (s0 > ns) s0 = ns;
    s1 = s0 + chunk_slots;
    if (s1 > ns) s1 = ns;
    const long long lo = w.first(s0), hi = w.first(s1);
    w.lo = lo < 0 ? 0 : lo;
    w.hi = hi > L ? L : hi;
    if (w.hi < w.lo) w.hi = w.lo;
    return w;
}

/* U slots s, s + stride, ...: elements outside the window are set to `fill` without touching
 * memory (a fill that adds nothing to the sums that follow spares a mask per element).
 * Returns the batch's valid bits: bit u*n + j is set when element j of slot u is inside. */
template <typename T, int U, typename I>
CIN_DEV unsigned long long load_batch(const T* __restrict__ p, const Window<T, I>& w, I s,
                                      I stride, T fill, T (&v)[U][Vec<T>::n])
{
    constexpr int n = Vec<T>::n;
    static_assert(U * n <= 64, "a batch has at most 64 elements");
    unsigned long long bits = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const I e0 = w.first(s + u * stride);
        if (w.full(e0)) {
            vload(p + e0, v[u]);
            bits |= ((1ull << n) - 1) << (u * n);
        } else {
#pragma unroll
            for (int j = 0; j < n; ++j) {
                T t = fill;
                if (w.valid(e0 + j)) {
                    t = __ldg(p + e0 + j);
                    bits |= 1ull << (u * n + j);
                }
                v[u][j] = t;
            }
        }
    }
    return bits;
}

/* Writes the elements whose valid bit is set (see load_batch), plus the same elements of r
 * when r is not null (the residual: r has p's layout, and p's address modulo 16), read slot by
 * slot as the slots are stored. */
template <typename T, int U, typename I>
CIN_DEV void store_batch(T* __restrict__ p, const T* __restrict__ r, const Window<T, I>& w,
                         I s, I stride, unsigned long long bits, const T (&v)[U][Vec<T>::n])
{
    constexpr int n = Vec<T>::n;
    constexpr unsigned slot_ones = (1u << n) - 1;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const I e0 = w.first(s + u * stride);
        const unsigned in = (unsigned)(bits >> (u * n)) & slot_ones;
        if (w.vec && in == slot_ones) {
            T o[n];
#pragma unroll
            for (int j = 0; j < n; ++j) o[j] = v[u][j];
            if (r) {
                T q[n];
                vload(r + e0, q);
#pragma unroll
                for (int j = 0; j < n; ++j) o[j] += q[j];
            }
            vstore(p + e0, o);
        } else {
#pragma unroll
            for (int j = 0; j < n; ++j)
                if ((in >> j) & 1u) __stcs(p + e0 + j, r ? v[u][j] + __ldg(r + e0 + j) : v[u][j]);
        }
    }
}

template <typename T>
CIN_DEV double hsum(const T (&a)[Vec<T>::n])
{
    double t = 0.0;
#pragma unroll
    for (int j = 0; j < Vec<T>::n; ++j) t += (double)a[j];
    return t;
}

/* ---- reductions ---------------------------------------------------------------------------
 * Both leave the same total in every participating thread: the xor butterfly gives every lane
 * the same tree of additions (and IEEE addition is commutative), and every warp of a block
 * reduces the same per-warp totals in the same order.  Results are therefore bitwise equal
 * across the blocks of a plane and across runs. */

/* Lanes [g*width, (g+1)*width) of a warp; width a power of two <= 32.  Every lane of the warp
 * must call it. */
struct GroupSum {
    int width;

    template <int K>
    CIN_DEV void operator()(double (&v)[K]) const
    {
        for (int off = width >> 1; off > 0; off >>= 1) {
#pragma unroll
            for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
        }
    }
};

/* The whole block (blockDim.x a multiple of 32, at most 1024); buf holds 32*K doubles. */
struct BlockSum {
    double* buf;

    template <int K>
    CIN_DEV void operator()(double (&v)[K]) const
    {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int warps = blockDim.x >> 5;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
        }
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < K; ++k) buf[k * 32 + warp] = v[k];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < K; ++k) {
            double t = lane < warps ? buf[k * 32 + lane] : 0.0;
            for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
            v[k] = t;
        }
        __syncthreads();  // buf may be reused by the next reduction
    }
};

/* ---- per-plane parameters and the elementwise maps ------------------------------------- */

CIN_DEV double plane_param(const double* __restrict__ a, long long ns, long long C, long long p,
                           double fallback)
{
    return a ? a[(p / C) * ns + p % C] : fallback;
}

CIN_DEV double clamp_m2(double m2)
{
    return m2 < 0.0 ? 0.0 : m2;  // keeps NaN (fmax would not)
}

/* y = (x - k) * a + b: (x - mean) * rstd * w + bias without the x * alpha + beta cancellation. */
template <typename T>
struct Normalize {
    T k, a, b;

    CIN_DEV Normalize(double mean, double rstd, double w, double bias)
    {
        k = (T)mean;
        const double alpha = rstd * w;
        a = (T)alpha;
        b = (T)(bias - (mean - (double)k) * alpha);
    }

    CIN_DEV T operator()(T x) const { return (x - k) * a + b; }
};

/* Normalize with plane p's weight and bias (null: 1 and 0). */
template <typename T>
CIN_DEV Normalize<T> plane_normalize(double mean, double rstd, const double* __restrict__ weight,
                                     long long w_ns, const double* __restrict__ bias,
                                     long long b_ns, long long C, long long p)
{
    return Normalize<T>(mean, rstd, plane_param(weight, w_ns, C, p, 1.0),
                        plane_param(bias, b_ns, C, p, 0.0));
}

/* dx = a*dy + b*(x - k) + c with instance statistics (SPEC.md, Backward, rearranged per plane);
 * dx = a*dy with fixed statistics, which never reads x (a NaN in x must not leak into dx). */
template <typename T>
struct Grad {
    T k, a, b, c;
    bool input_stats;

    CIN_DEV Grad(double mean, double rstd, double w, double sdy, double sdyc, double inv_l,
                 bool use_input_stats)
    {
        input_stats = use_input_stats;
        k = (T)mean;
        const double ad = w * rstd;
        double bd = 0.0, cd = 0.0;
        if (use_input_stats) {
            bd = -ad * rstd * rstd * sdyc * inv_l;
            cd = -ad * sdy * inv_l + bd * ((double)k - mean);
        }
        a = (T)ad;
        b = (T)bd;
        c = (T)cd;
    }

    CIN_DEV T operator()(T dy, T x) const
    {
        return input_stats ? a * dy + b * (x - k) + c : a * dy;
    }
};

/* ---- the fused activation (see the header) ---------------------------------------------- */

CIN_DEV float act_exp(float t) { return expf(t); }
CIN_DEV double act_exp(double t) { return exp(t); }
CIN_DEV float act_erfc(float t) { return erfcf(t); }
CIN_DEV double act_erfc(double t) { return erfc(t); }

/* 1 - sigmoid(t) without cancellation, from sg = sigmoid(t) and e = exp(-t): e * sg where
 * t >= 0 (1 - sg loses the digits as sg -> 1), 1 - sg below (cin_vsigmoid_c of cin_vmath.h). */
template <typename T>
CIN_DEV T sigmoid_c(T t, T sg, T e)
{
    return t >= T(0) ? e * sg : T(1) - sg;
}

/* GELU-tanh's 2u = 2 sqrt(2/pi) (t + 0.044715 t^3): 0.5 t (1 + tanh u) = t * sigmoid(2u). */
template <typename T>
CIN_DEV T gelu_tanh_u2(T t)
{
    return T(2 * 0.79788456080286535588) * (t + T(0.044715) * t * t * t);
}

/* act(t) and dy * act'(t) by code, in T: the formulas of cin_act and cin_act_grad in
 * src/cinstnorm_kernels_impl.h and src/cin_vmath.h, GELU with erfc (ReLU and LeakyReLU pass
 * dy where t > 0, as torch does; SiLU and GELU-tanh through sigmoids, so GELU-tanh has no
 * cancellation in 1 + tanh u for t << 0).  The code is selected per element (a uniform
 * branch): a switch per batch instead, with one straight-line loop per activation, let ptxas
 * interleave a batch's libm calls into twice the registers (up to 220 in the chunk kernels)
 * or spill. */
template <typename T>
struct Activation {
    int code;
    T s;  // LeakyReLU's negative slope

    CIN_DEV Activation(long long act, double slope) : code((int)act), s((T)slope) {}

    CIN_DEV T operator()(T t) const
    {
        switch (code) {
        case CIN_ACT_RELU: return t < T(0) ? T(0) : t;  // keeps NaN
        case CIN_ACT_LEAKY_RELU: return t < T(0) ? t * s : t;
        case CIN_ACT_SILU: return t / (T(1) + act_exp(-t));
        case CIN_ACT_GELU: return T(0.5) * t * act_erfc(t * T(-0.70710678118654752440));
        case CIN_ACT_GELU_TANH: return t / (T(1) + act_exp(-gelu_tanh_u2(t)));
        default: return t;
        }
    }

    CIN_DEV T grad(T t, T dy) const
    {
        switch (code) {
        case CIN_ACT_RELU: return t > T(0) ? dy : T(0);
        case CIN_ACT_LEAKY_RELU: return t > T(0) ? dy : dy * s;
        case CIN_ACT_SILU: {  // sg (1 + t (1 - sg))
            const T e = act_exp(-t), sg = T(1) / (T(1) + e);
            return dy * (sg * (T(1) + t * sigmoid_c(t, sg, e)));
        }
        case CIN_ACT_GELU: {
            const T cdf = T(0.5) * act_erfc(t * T(-0.70710678118654752440));
            const T pdf = act_exp(T(-0.5) * t * t) * T(0.39894228040143267794);
            return dy * (cdf + t * pdf);
        }
        case CIN_ACT_GELU_TANH: {  // torch's GeluBackward, approximate='tanh', as t sigmoid(2u)
            const T u2 = gelu_tanh_u2(t), e = act_exp(-u2), sg = T(1) / (T(1) + e);
            return dy * (sg + T(2) * t * sg * sigmoid_c(u2, sg, e) * T(0.79788456080286535588)
                              * (T(1) + T(3 * 0.044715) * t * t));
        }
        default: return dy;
        }
    }
};

/* The forward's elementwise map of a batch: v <- act((v - k) * a + b); ACT false: no
 * activation (the code is never read, so those kernels hold no activation code at all). */
template <typename T, int S, bool ACT>
CIN_DEV void normalize_registers(T (&v)[S][Vec<T>::n], const Normalize<T>& f,
                                 const Activation<T>& act)
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j) v[u][j] = ACT ? act(f(v[u][j])) : f(v[u][j]);
    }
}

/* The residual of the plane at offset off, or null (none, or a plain kernel: FUSED false). */
template <bool FUSED, typename T>
CIN_DEV const T* plane_residual(const T* residual, long long off)
{
    return FUSED && residual ? residual + off : nullptr;
}

/* The backward's dy -> g = dy * act'(t), t = the forward's pre-activation recomputed from x
 * (the forward's Normalize from the same mean, rstd, weight and bias, so bitwise its t).
 * ACT false: g = dy. */
template <typename T, bool ACT>
struct ActGrad {
    Normalize<T> pre;
    Activation<T> act;

    CIN_DEV ActGrad(double mean, double rstd, double w, double bias, long long code,
                    double slope)
        : pre(mean, rstd, w, bias), act(code, slope) {}

    template <int S>
    CIN_DEV void operator()(T (&g)[S][Vec<T>::n], const T (&v)[S][Vec<T>::n]) const
    {
        if constexpr (ACT) {
#pragma unroll
            for (int u = 0; u < S; ++u) {
#pragma unroll
                for (int j = 0; j < Vec<T>::n; ++j) g[u][j] = act.grad(pre(v[u][j]), g[u][j]);
            }
        }
    }
};

/* ---- one plane held in registers (group and block regimes) ----------------------------- */

template <typename T, int S>
CIN_DEV void sum_elements(const T (&v)[S][Vec<T>::n], T k, T (&a)[Vec<T>::n])
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j) a[j] += v[u][j] - k;
    }
}

template <typename T, int S>
CIN_DEV void sum_squares(const T (&v)[S][Vec<T>::n], T k, T (&a)[Vec<T>::n],
                         T (&q)[Vec<T>::n])
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j) {
            const T d = v[u][j] - k;
            a[j] += d;
            q[j] += d * d;
        }
    }
}

/* Elements whose valid bit is clear (see load_batch) set to k. */
template <typename T, int S>
CIN_DEV void refill(T (&v)[S][Vec<T>::n], unsigned long long bits, T k)
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j)
            v[u][j] = (bits >> (u * Vec<T>::n + j)) & 1ull ? v[u][j] : k;
    }
}

/* Exact two-pass mean and biased variance of a plane held in registers (see the header).
 * v: the thread's slots, loaded with fill k0 (the plane's first element), so that elements
 * past the plane add nothing to the first pass around k0; they are set to the second pass's
 * shift k before it, so that they add nothing there either. */
template <typename T, int S, class Sum>
CIN_DEV void register_stats(const Sum& sum, T (&v)[S][Vec<T>::n], unsigned long long bits, T k0,
                            double inv_l, double& mean, double& var)
{
    constexpr int n = Vec<T>::n;
    T a[n] = {};
    sum_elements<T, S>(v, k0, a);
    double s1[1] = {hsum<T>(a)};
    sum(s1);
    const T k = (T)((double)k0 + s1[0] * inv_l);
    refill<T, S>(v, bits, k);
    T c1[n] = {}, c2[n] = {};
    sum_squares<T, S>(v, k, c1, c2);
    double s2[2] = {hsum<T>(c1), hsum<T>(c2)};
    sum(s2);
    mean = (double)k + s2[0] * inv_l;
    var = clamp_m2(s2[1] - s2[0] * s2[0] * inv_l) * inv_l;
}


/* dy <- dx of the batch. */
template <typename T, int S>
CIN_DEV void grad_registers(T (&g)[S][Vec<T>::n], const T (&v)[S][Vec<T>::n], const Grad<T>& f)
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j) g[u][j] = f(g[u][j], v[u][j]);
    }
}

/* sum(dy) and sum(dy * (x - k)) of a batch loaded with fills 0 (dy) and k (x), so elements
 * outside the window add nothing. */
template <typename T, int S>
CIN_DEV void grad_sums(const T (&g)[S][Vec<T>::n], const T (&v)[S][Vec<T>::n], T k,
                       T (&a1)[Vec<T>::n], T (&a2)[Vec<T>::n])
{
#pragma unroll
    for (int u = 0; u < S; ++u) {
#pragma unroll
        for (int j = 0; j < Vec<T>::n; ++j) {
            a1[j] += g[u][j];
            a2[j] += g[u][j] * (v[u][j] - k);
        }
    }
}

/* Backward of one plane from registers: dx, and sum(g), sum(g * (x - mean)) * rstd written
 * by the thread with `leader` set (before dx, so that they hold no registers meanwhile);
 * g = dy, or dy * act'(t) (see ActGrad; elements outside the plane, loaded as dy = 0 and
 * x = k, give g = 0). */
template <typename T, int S, bool ACT, class Sum>
CIN_DEV void register_backward(const Sum& sum, const T* __restrict__ dyp,
                               const T* __restrict__ xp, T* __restrict__ dxp,
                               const Window<T, int>& w, int first, int stride,
                               double inv_l, double mean, double rstd, double wt,
                               const ActGrad<T, ACT>& act, bool input_stats, bool leader,
                               double* __restrict__ sum_dy, double* __restrict__ sum_dy_xhat)
{
    constexpr int n = Vec<T>::n;
    const T k = (T)mean;
    T g[S][n], v[S][n];
    const unsigned long long bits = load_batch<T, S>(dyp, w, first, stride, T(0), g);
    load_batch<T, S>(xp, w, first, stride, k, v);
    act(g, v);
    T a1[n] = {}, a2[n] = {};
    grad_sums<T, S>(g, v, k, a1, a2);
    double s[2] = {hsum<T>(a1), hsum<T>(a2)};
    sum(s);
    const double sdy = s[0];
    const double sdyc = s[1] + ((double)k - mean) * sdy;
    if (leader) {
        *sum_dy = sdy;
        *sum_dy_xhat = sdyc * rstd;
    }
    grad_registers<T, S>(g, v, Grad<T>(mean, rstd, wt, sdy, sdyc, inv_l, input_stats));
    store_batch<T, S>(dxp, nullptr, w, first, stride, bits, g);
}

/* Mean and M2 of a plane from its chunks' (count, mean, M2) partials, the same in every block. */
CIN_DEV void merge_partials(const BlockSum& sum, const double* __restrict__ part, long long chunks,
                            double& mean, double& m2)
{
    double a[2] = {0.0, 0.0};
    for (long long i = threadIdx.x; i < chunks; i += blockDim.x) {
        a[0] += part[3 * i];
        a[1] += part[3 * i] * part[3 * i + 1];
    }
    sum(a);
    mean = a[1] / a[0];
    double c[1] = {0.0};
    for (long long i = threadIdx.x; i < chunks; i += blockDim.x) {
        const double d = part[3 * i + 1] - mean;
        c[0] += part[3 * i + 2] + part[3 * i] * d * d;
    }
    sum(c);
    m2 = c[0];
}

/* The per-plane parameters of a backward kernel for plane p; the bias only where the
 * pre-activation needs it (act: the kernel's FUSED, so a plain kernel never reads it). */
struct BackwardParams {
    double mean, rstd, w, b;

    CIN_DEV BackwardParams(const double* __restrict__ mean_p, long long m_ns,
                           const double* __restrict__ rstd_p, long long r_ns,
                           const double* __restrict__ weight, long long w_ns,
                           const double* __restrict__ bias, long long b_ns, long long C,
                           long long p, bool act)
        : mean(plane_param(mean_p, m_ns, C, p, 0.0)),
          rstd(plane_param(rstd_p, r_ns, C, p, 1.0)),
          w(plane_param(weight, w_ns, C, p, 1.0)),
          b(act ? plane_param(bias, b_ns, C, p, 0.0) : 0.0) {}

    template <typename T, bool ACT>
    CIN_DEV ActGrad<T, ACT> act_grad(long long act, double slope) const
    {
        return ActGrad<T, ACT>(mean, rstd, w, b, act, slope);
    }
};

}  // namespace cin

/* ==== forward: instance statistics, or given ones (eval) ================================== */

/* Every forward kernel writes y = act((x - k) * alpha + beta) + residual: act by code,
 * residual null or a (P, L) array like y.  FUSED false: the plain y = (x - k) * alpha + beta
 * (residual, act and slope are not read). */

/* Group regime.  Plane p = t / group for global thread t; lane r of a group owns slots
 * r, r + group, ..., r + (S-1)*group.  fixed_mean != null: normalize with the given mean and
 * var (eval) instead of the plane's statistics.  The stats outputs may be null. */
template <typename T, int S, bool FUSED>
__global__ void __launch_bounds__(CIN_GROUP_THREADS)
cin_fwd_group(const T* __restrict__ x, T* __restrict__ y, long long P, long long L, long long C,
              long long group, long long vec,
              const double* __restrict__ weight, long long w_ns,
              const double* __restrict__ bias, long long b_ns,
              const double* __restrict__ fixed_mean, long long m_ns,
              const double* __restrict__ fixed_var, long long v_ns, double eps,
              double* __restrict__ mean_out, double* __restrict__ var_out,
              double* __restrict__ rstd_out, const T* __restrict__ residual, long long act,
              double slope)
{
    using namespace cin;
    constexpr int n = Vec<T>::n;
    const int G = (int)group;
    const long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / G;
    const bool active = p < P;
    const long long q = active ? p : 0;  // lanes past the last plane still join the shuffles
    const T* xp = x + q * L;
    const Window<T, int> w = plane_window(xp, active ? (int)L : 0, vec);
    const int first = threadIdx.x & (G - 1);
    const T k0 = active && !fixed_mean ? __ldg(xp) : T(0);
    T v[S][n];
    const unsigned long long bits = load_batch<T, S>(xp, w, first, G, k0, v);
    double mean, var;
    if (fixed_mean) {
        mean = plane_param(fixed_mean, m_ns, C, q, 0.0);
        var = plane_param(fixed_var, v_ns, C, q, 1.0);
    } else {
        register_stats<T, S>(GroupSum{G}, v, bits, k0, 1.0 / (double)L, mean, var);
    }
    const double rstd = 1.0 / sqrt(var + eps);
    if (active && first == 0 && mean_out) {
        mean_out[p] = mean;
        var_out[p] = var;
        rstd_out[p] = rstd;
    }
    const Normalize<T> f = plane_normalize<T>(mean, rstd, weight, w_ns, bias, b_ns, C, q);
    normalize_registers<T, S, FUSED>(v, f, Activation<T>(act, slope));
    store_batch<T, S>(y + q * L, plane_residual<FUSED>(residual, q * L), w, first, G,
                      bits, v);
}

/* Block regime: block p normalizes plane p; thread t owns slots t, t + blockDim.x, ... */
template <typename T, int S, bool FUSED>
__global__ void __launch_bounds__(CIN_BLOCK_MAX_THREADS, CIN_BLOCK_MIN_BLOCKS(S, FUSED))
cin_fwd_block(const T* __restrict__ x, T* __restrict__ y, long long L, long long C, long long vec,
              const double* __restrict__ weight, long long w_ns,
              const double* __restrict__ bias, long long b_ns, double eps,
              double* __restrict__ mean_out, double* __restrict__ var_out,
              double* __restrict__ rstd_out, const T* __restrict__ residual, long long act,
              double slope)
{
    using namespace cin;
    constexpr int n = Vec<T>::n;
    __shared__ double buf[64];
    const long long p = blockIdx.x;
    const T* xp = x + p * L;
    const Window<T, int> w = plane_window(xp, (int)L, vec);
    const int first = threadIdx.x, stride = blockDim.x;
    const T k0 = __ldg(xp);
    T v[S][n];
    const unsigned long long bits = load_batch<T, S>(xp, w, first, stride, k0, v);
    double mean, var;
    register_stats<T, S>(BlockSum{buf}, v, bits, k0, 1.0 / (double)L, mean, var);
    const double rstd = 1.0 / sqrt(var + eps);
    if (threadIdx.x == 0) {
        mean_out[p] = mean;
        var_out[p] = var;
        rstd_out[p] = rstd;
    }
    const Normalize<T> f = plane_normalize<T>(mean, rstd, weight, w_ns, bias, b_ns, C, p);
    normalize_registers<T, S, FUSED>(v, f, Activation<T>(act, slope));
    store_batch<T, S>(y + p * L, plane_residual<FUSED>(residual, p * L), w, first, stride,
                      bits, v);
}

/* Chunk regime, kernel A: block b = p * chunks + j writes part[3b..3b+2] = (count, mean, M2) of
 * chunk j of plane p, from sums in T around the chunk's first element. */
template <typename T>
__global__ void __launch_bounds__(CIN_CHUNK_THREADS)
cin_fwd_chunk_stats(const T* __restrict__ x, long long L, long long chunks,
                    long long chunk_slots, long long vec, double* __restrict__ part)
{
    using namespace cin;
    constexpr int n = Vec<T>::n, U = CIN_CHUNK_UNROLL;
    __shared__ double buf[64];
    const long long bd = blockDim.x;
    const long long b = blockIdx.x, p = b / chunks, j = b % chunks;
    const T* xp = x + p * L;
    long long s0, s1;
    const Window<T, long long> w = chunk_window(xp, L, vec, j, chunk_slots, s0, s1);
    const long long count = w.hi - w.lo;
    const T k = count > 0 ? __ldg(xp + w.lo) : T(0);
    T a1[n] = {}, a2[n] = {};
    for (long long s = s0 + threadIdx.x; s < s1; s += U * bd) {
        T v[U][n];
        load_batch<T, U>(xp, w, s, bd, k, v);  // fill k: adds nothing
        sum_squares<T, U>(v, k, a1, a2);
    }
    double s[2] = {hsum<T>(a1), hsum<T>(a2)};
    BlockSum{buf}(s);
    if (threadIdx.x == 0) {
        double* o = part + 3 * b;
        if (count > 0) {
            const double dm = s[0] / (double)count;
            o[0] = (double)count;
            o[1] = (double)k + dm;
            o[2] = clamp_m2(s[1] - s[0] * dm);
        } else {
            o[0] = o[1] = o[2] = 0.0;
        }
    }
}

/* Chunk regime, kernel B (and the whole eval forward for planes past the group regime):
 * block b = p * chunks + j normalizes chunk j of plane p, with the plane's statistics merged
 * from part (part != null) or the given fixed_mean/fixed_var.  Block j == 0 writes the plane's
 * statistics when mean_out != null. */
template <typename T, bool FUSED>
__global__ void __launch_bounds__(CIN_CHUNK_THREADS, CIN_CHUNK_MIN_BLOCKS(FUSED))
cin_fwd_chunk_norm(const T* __restrict__ x, T* __restrict__ y, long long L, long long C,
                   long long chunks, long long chunk_slots, long long vec,
                   const double* __restrict__ part,
                   const double* __restrict__ fixed_mean, long long m_ns,
                   const double* __restrict__ fixed_var, long long v_ns,
                   const double* __restrict__ weight, long long w_ns,
                   const double* __restrict__ bias, long long b_ns, double eps,
                   double* __restrict__ mean_out, double* __restrict__ var_out,
                   double* __restrict__ rstd_out, const T* __restrict__ residual, long long act,
                   double slope)
{
    using namespace cin;
    constexpr int n = Vec<T>::n, U = CIN_CHUNK_UNROLL;
    __shared__ double buf[64];
    const long long bd = blockDim.x;
    const long long b = blockIdx.x, p = b / chunks, j = b % chunks;
    const T* xp = x + p * L;
    T* yp = y + p * L;
    const T* rp = plane_residual<FUSED>(residual, p * L);
    long long s0, s1;
    const Window<T, long long> w = chunk_window(xp, L, vec, j, chunk_slots, s0, s1);
    long long s = s0 + threadIdx.x;
    T v[U][n];
    unsigned long long bits = load_batch<T, U>(xp, w, s, bd, T(0), v);  // in flight: merge
    double mean, var;
    if (part) {
        double m2;
        merge_partials(BlockSum{buf}, part + 3 * p * chunks, chunks, mean, m2);
        var = m2 / (double)L;
    } else {
        mean = plane_param(fixed_mean, m_ns, C, p, 0.0);
        var = plane_param(fixed_var, v_ns, C, p, 1.0);
    }
    const double rstd = 1.0 / sqrt(var + eps);
    const Normalize<T> f = plane_normalize<T>(mean, rstd, weight, w_ns, bias, b_ns, C, p);
    const Activation<T> fa(act, slope);
    if (j == 0 && threadIdx.x == 0 && mean_out) {
        mean_out[p] = mean;
        var_out[p] = var;
        rstd_out[p] = rstd;
    }
    for (;;) {
        normalize_registers<T, U, FUSED>(v, f, fa);
        store_batch<T, U>(yp, rp, w, s, bd, bits, v);
        s += U * bd;
        if (s >= s1) break;
        bits = load_batch<T, U>(xp, w, s, bd, T(0), v);
    }
}

/* ==== backward =========================================================================== *
 * mean, rstd: the forward's per-plane statistics (or the running ones, input_stats == 0).
 * Outputs: dx, sum_dy[p] = sum(g), sum_dy_xhat[p] = sum(g * (x - mean)) * rstd, where g = dy,
 * or with FUSED (an activation) g = dy * act'(t): t = (x - k) * alpha + beta, the forward's
 * pre-activation from mean, rstd, weight and bias (bias is read only for it), act by code and
 * slope.  g takes dy's place everywhere, in the sums and in dx. */

template <typename T, int S, bool FUSED>
__global__ void __launch_bounds__(CIN_GROUP_THREADS)
cin_bwd_group(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
              long long P, long long L, long long C, long long group, long long vec,
              const double* __restrict__ mean_p, long long m_ns,
              const double* __restrict__ rstd_p, long long r_ns,
              const double* __restrict__ weight, long long w_ns,
              const double* __restrict__ bias, long long b_ns, long long act, double slope,
              long long input_stats, double* __restrict__ sum_dy,
              double* __restrict__ sum_dy_xhat)
{
    using namespace cin;
    const int G = (int)group;
    const long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / G;
    const bool active = p < P;
    const long long q = active ? p : 0;
    const long long off = q * L;
    const Window<T, int> w = plane_window(x + off, active ? (int)L : 0, vec);
    const int first = threadIdx.x & (G - 1);
    const BackwardParams prm(mean_p, m_ns, rstd_p, r_ns, weight, w_ns, bias, b_ns, C, q,
                             FUSED);
    register_backward<T, S, FUSED>(GroupSum{G}, dy + off, x + off, dx + off, w, first, G,
                                 1.0 / (double)L, prm.mean, prm.rstd, prm.w,
                                 prm.act_grad<T, FUSED>(act, slope), input_stats != 0,
                                 active && first == 0, sum_dy + q, sum_dy_xhat + q);
}

template <typename T, int S, bool FUSED>
__global__ void __launch_bounds__(CIN_BLOCK_MAX_THREADS)
cin_bwd_block(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
              long long L, long long C, long long vec,
              const double* __restrict__ mean_p, long long m_ns,
              const double* __restrict__ rstd_p, long long r_ns,
              const double* __restrict__ weight, long long w_ns,
              const double* __restrict__ bias, long long b_ns, long long act, double slope,
              long long input_stats, double* __restrict__ sum_dy,
              double* __restrict__ sum_dy_xhat)
{
    using namespace cin;
    __shared__ double buf[64];
    const long long p = blockIdx.x, off = p * L;
    const Window<T, int> w = plane_window(x + off, (int)L, vec);
    const BackwardParams prm(mean_p, m_ns, rstd_p, r_ns, weight, w_ns, bias, b_ns, C, p,
                             FUSED);
    register_backward<T, S, FUSED>(BlockSum{buf}, dy + off, x + off, dx + off, w,
                                 (int)threadIdx.x, (int)blockDim.x, 1.0 / (double)L, prm.mean,
                                 prm.rstd, prm.w, prm.act_grad<T, FUSED>(act, slope),
                                 input_stats != 0, threadIdx.x == 0, sum_dy + p,
                                 sum_dy_xhat + p);
}

/* Chunk regime, kernel A: part[2b], part[2b+1] = sum(g), sum(g * (x - k)) of chunk j of
 * plane p (b = p * chunks + j, k = mean rounded to T).  With fixed statistics dx = w*rstd*g
 * needs no sums, so this kernel also writes dx, and kernel B only merges the sums. */
template <typename T, bool FUSED>
__global__ void __launch_bounds__(CIN_CHUNK_THREADS, CIN_CHUNK_MIN_BLOCKS(FUSED))
cin_bwd_chunk_sums(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                   long long L, long long C, long long chunks, long long chunk_slots,
                   long long vec, const double* __restrict__ mean_p, long long m_ns,
                   const double* __restrict__ rstd_p, long long r_ns,
                   const double* __restrict__ weight, long long w_ns,
                   const double* __restrict__ bias, long long b_ns, long long act, double slope,
                   long long input_stats, double* __restrict__ part)
{
    using namespace cin;
    constexpr int n = Vec<T>::n, U = CIN_CHUNK_UNROLL;
    __shared__ double buf[64];
    const long long bd = blockDim.x;
    const long long b = blockIdx.x, p = b / chunks, j = b % chunks, off = p * L;
    long long s0, s1;
    const Window<T, long long> w = chunk_window(x + off, L, vec, j, chunk_slots, s0, s1);
    const BackwardParams prm(mean_p, m_ns, rstd_p, r_ns, weight, w_ns, bias, b_ns, C, p,
                             FUSED);
    const T k = (T)prm.mean;
    const Grad<T> f(prm.mean, prm.rstd, prm.w, 0.0, 0.0, 0.0, false);
    const ActGrad<T, FUSED> ag = prm.act_grad<T, FUSED>(act, slope);
    T a1[n] = {}, a2[n] = {};
    for (long long s = s0 + threadIdx.x; s < s1; s += U * bd) {
        T g[U][n], v[U][n];
        const unsigned long long bits = load_batch<T, U>(dy + off, w, s, bd, T(0), g);
        load_batch<T, U>(x + off, w, s, bd, k, v);
        ag(g, v);  // outside the chunk: dy = 0, x = k, so g = 0
        grad_sums<T, U>(g, v, k, a1, a2);
        if (!input_stats) {
            grad_registers<T, U>(g, v, f);
            store_batch<T, U>(dx + off, nullptr, w, s, bd, bits, g);
        }
    }
    double s[2] = {hsum<T>(a1), hsum<T>(a2)};
    BlockSum{buf}(s);
    if (threadIdx.x == 0) {
        part[2 * b] = s[0];
        part[2 * b + 1] = s[1];
    }
}

/* Chunk regime, kernel B: merges the plane's partial sums (the same in every block) and, with
 * instance statistics, computes dx of chunk j.  Grid: P * chunks blocks with instance
 * statistics, P blocks with fixed ones (dx is already written). */
template <typename T, bool FUSED>
__global__ void __launch_bounds__(CIN_CHUNK_THREADS, CIN_CHUNK_MIN_BLOCKS(FUSED))
cin_bwd_chunk_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                 long long L, long long C, long long chunks, long long chunk_slots,
                 long long vec, const double* __restrict__ mean_p, long long m_ns,
                 const double* __restrict__ rstd_p, long long r_ns,
                 const double* __restrict__ weight, long long w_ns,
                 const double* __restrict__ bias, long long b_ns, long long act, double slope,
                 long long input_stats, const double* __restrict__ part,
                 double* __restrict__ sum_dy, double* __restrict__ sum_dy_xhat)
{
    using namespace cin;
    constexpr int n = Vec<T>::n, U = CIN_CHUNK_UNROLL;
    __shared__ double buf[64];
    const long long bd = blockDim.x;
    const long long per_plane = input_stats ? chunks : 1;
    const long long b = blockIdx.x, p = b / per_plane, j = b % per_plane, off = p * L;
    long long s0, s1;
    const Window<T, long long> w = chunk_window(x + off, L, vec, j, chunk_slots, s0, s1);
    const BackwardParams prm(mean_p, m_ns, rstd_p, r_ns, weight, w_ns, bias, b_ns, C, p,
                             FUSED);
    const double mean = prm.mean, rstd = prm.rstd;
    long long s = s0 + threadIdx.x;
    T g[U][n] = {}, v[U][n] = {};
    unsigned long long bits = 0;
    if (input_stats) {  // in flight during the merge
        bits = load_batch<T, U>(dy + off, w, s, bd, T(0), g);
        load_batch<T, U>(x + off, w, s, bd, T(0), v);
    }
    const double* pp = part + 2 * p * chunks;
    double a[2] = {0.0, 0.0};
    for (long long i = threadIdx.x; i < chunks; i += bd) {
        a[0] += pp[2 * i];
        a[1] += pp[2 * i + 1];
    }
    BlockSum{buf}(a);
    const double sdy = a[0];
    const double sdyc = a[1] + ((double)(T)mean - mean) * sdy;
    if (j == 0 && threadIdx.x == 0) {
        sum_dy[p] = sdy;
        sum_dy_xhat[p] = sdyc * rstd;
    }
    if (!input_stats) return;
    const Grad<T> f(mean, rstd, prm.w, sdy, sdyc, 1.0 / (double)L, true);
    const ActGrad<T, FUSED> ag = prm.act_grad<T, FUSED>(act, slope);
    for (;;) {
        ag(g, v);  // dy is read again here: the same g as kernel A's
        grad_registers<T, U>(g, v, f);
        store_batch<T, U>(dx + off, nullptr, w, s, bd, bits, g);
        s += U * bd;
        if (s >= s1) break;
        bits = load_batch<T, U>(dy + off, w, s, bd, T(0), g);
        load_batch<T, U>(x + off, w, s, bd, T(0), v);
    }
}
