/* Vector exp, the logistic sigmoid and the normal CDF for the fused SiLU, GELU-tanh and GELU
 * (erf) activations; part of the template body (included by cinstnorm_kernels_impl.h once per
 * element type and instruction set, after the vector typedefs; no include guard on purpose).
 * Every function is always inlined: out of line, a vector argument and result go through
 * memory and each call is a serial step (GELU 3x slower).
 *
 * GCC/Clang vector extensions only, so the same text runs on every SIMD path, and the scalar
 * activations (tails, channels-last rows) call it on a broadcast vector: an element's result
 * does not depend on where in a plane it sits or on the path.
 *
 * exp(x) = 2^n * p(r): n = round(x / ln 2) by the add-and-subtract-1.5*2^mant trick (the
 * integer n then sits in the low bits of the sum), r = x - n*ln2 in two steps (Cody-Waite;
 * |r| <= ln2/2, exact head), p the Taylor polynomial of exp to degree 7 (float, truncation
 * 5e-9) or 13 (double, 4e-18) (Estrin's scheme), 2^n built in the exponent bits.  Inputs above
 * 88 (float) or 709 (double) give +inf (exp is within 2x of overflow there), below
 * ln(smallest normal) 0, NaN propagates: relative error within 1.4 eps (float) and 1.8 eps
 * (double) of expl over [-87.3, 88] and [-708.3, 709] on every SIMD path (a dense scan),
 * and tests/test_vmath.py through the activations.
 * Relies on IEEE evaluation (no -ffast-math: the rounding trick must not be folded away).
 */

typedef CIN_UT CIN_FN(cin_uvec) __attribute__((vector_size(CIN_VEC_BYTES)));

/* m ? a : b lane by lane, m a comparison result (all ones or all zeros per lane). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vsel)(CIN_FN(cin_ivec) m, CIN_FN(cin_vec) a, CIN_FN(cin_vec) b)
{
    typedef CIN_FN(cin_ivec) CIN_IV;
    return (CIN_FN(cin_vec))(((CIN_IV)a & m) | ((CIN_IV)b & ~m));
}

/* sum c[k] s^k, k < nc (nc a constant after inlining, at most 24), by Estrin's scheme: pairs
 * c[2k] + c[2k+1] s, then pairs of those in s^2, s^4, ...: a dependency chain of log2(nc)
 * steps instead of Horner's nc, so that a loop keeps several vectors in flight (with Horner
 * the exp and the CDF polynomial waited on their latency chains: GELU 1.4x slower). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vpoly)(CIN_FN(cin_vec) s, const double *c, const int nc)
{
    CIN_FN(cin_vec) z = {0}, p[24];
#pragma GCC unroll 24
    for (int k = 0; k < nc; k++) p[k] = z + (CIN_T)c[k];
    int m = nc;
#pragma GCC unroll 6
    while (m > 1) {
#pragma GCC unroll 12
        for (int k = 0; k < m / 2; k++) p[k] = p[2 * k] + p[2 * k + 1] * s;
        if (m & 1) p[m / 2] = p[m - 1];
        m = (m + 1) / 2;
        s = s * s;
    }
    return p[0];
}

/* exp(x + xl) for a double-word argument (xl = 0 when dw is 0, a constant after inlining):
 * the limits are decided on x alone, xl only enters the reduced argument r, which is where a
 * rounded x + xl would lose the digits of an argument that is exact in two parts (GELU's
 * -t^2/2 at |t| >> 1).  The limits replace whatever the lanes beyond them computed, so no
 * clamp is needed first. */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vexp2)(CIN_FN(cin_vec) x, CIN_FN(cin_vec) xl, const int dw)
{
    typedef CIN_FN(cin_vec) V;
    typedef CIN_FN(cin_uvec) UV;
    const int f32 = sizeof(CIN_T) == 4;
    const CIN_T hi = f32 ? (CIN_T)88.0f : (CIN_T)709.0;   /* n <= n_max */
    const CIN_T lo = f32 ? (CIN_T)-87.33654f : (CIN_T)-708.39641853226408; /* ln(min normal) */
    const CIN_T magic = f32 ? (CIN_T)12582912.0f : (CIN_T)6755399441055744.0;  /* 1.5 * 2^mant */
    const CIN_T log2e = (CIN_T)1.44269504088896340736;
    const CIN_T ln2hi = f32 ? (CIN_T)0.693359375f : (CIN_T)6.93147180369123816490e-01;
    const CIN_T ln2lo = f32 ? (CIN_T)-2.12194440e-4f : (CIN_T)1.90821492927058770002e-10;
    const int mant = f32 ? 23 : 52;
    const CIN_UT bias = f32 ? 127 : 1023;
    V z = {0};
    V kn = (dw ? x + xl : x) * log2e + magic;
    V n = kn - magic;
    V r = x - n * ln2hi;    /* exact (ln2hi has few bits, x close to n ln2) */
    if (dw) r += xl;
    r -= n * ln2lo;
    static const double inv_fact[14] = {
        1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
        1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
    V p = CIN_FN(cin_vpoly)(r, inv_fact, f32 ? 8 : 14);
    /* kn's bits are magic's plus n in the low bits; 2^n = (n + bias) << mant */
    UV magic_bits, kn_bits;
    V mv = z + magic;
    memcpy(&magic_bits, &mv, sizeof mv);
    memcpy(&kn_bits, &kn, sizeof kn);
    UV sbits = (kn_bits - magic_bits + bias) << mant;
    V scale;
    memcpy(&scale, &sbits, sizeof scale);
    V e = p * scale;
    e = CIN_FN(cin_vsel)(x > hi, z + (CIN_T)INFINITY, e);
    return CIN_FN(cin_vsel)(x < lo, z, e);   /* NaN: neither, stays NaN */
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vexp)(CIN_FN(cin_vec) x)
{
    return CIN_FN(cin_vexp2)(x, x, 0);
}

/* exp(-t) and sigmoid(t) = 1 / (1 + exp(-t)) (0 for t -> -inf, 1 for t -> +inf). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vsigmoid)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) *e)
{
    *e = CIN_FN(cin_vexp)(-t);
    return (CIN_T)1 / ((CIN_T)1 + *e);
}

/* 1 - sigmoid(t) without cancellation: exp(-t) * sigmoid(t) where t >= 0 (1 - sg would lose
 * the digits as sg -> 1), 1 - sg below (exact enough there, and exp(-t) * sg is inf * 0 at
 * t -> -inf). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vsigmoid_c)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) sg, CIN_FN(cin_vec) e)
{
    CIN_FN(cin_vec) z = {0};
    return CIN_FN(cin_vsel)(t >= z, e * sg, (CIN_T)1 - sg);
}

/* SiLU t * sigmoid(t) (as t / (1 + exp(-t))) and GELU-tanh 0.5 t (1 + tanh u) with
 * u = sqrt(2/pi) (t + 0.044715 t^3), computed as t * sigmoid(2u) (the same function: no
 * cancellation in 1 + tanh u for t << 0). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vsilu)(CIN_FN(cin_vec) t)
{
    return t / ((CIN_T)1 + CIN_FN(cin_vexp)(-t));
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vgelu_tanh_u2)(CIN_FN(cin_vec) t)
{
    const CIN_T kb2 = (CIN_T)(2 * 0.79788456080286535588), kk = (CIN_T)0.044715;
    return kb2 * (t + kk * t * t * t);
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vgelu_tanh)(CIN_FN(cin_vec) t)
{
    return t / ((CIN_T)1 + CIN_FN(cin_vexp)(-CIN_FN(cin_vgelu_tanh_u2)(t)));
}

/* dy * silu'(t) = dy * sg (1 + t (1 - sg)) */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vsilu_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy)
{
    CIN_FN(cin_vec) e, sg = CIN_FN(cin_vsigmoid)(t, &e);
    return dy * (sg * ((CIN_T)1 + t * CIN_FN(cin_vsigmoid_c)(t, sg, e)));
}

/* dy * d/dt [t sigmoid(2u)] = dy * (sg + 2 t sg (1 - sg) u'), u' = sqrt(2/pi)(1 + 3 0.044715 t^2)
 * (0.5 (1 + tanh u) = sg and 1 - tanh^2 u = 4 sg (1 - sg)) */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vgelu_tanh_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy)
{
    const CIN_T kb = (CIN_T)0.79788456080286535588, kk3 = (CIN_T)(3 * 0.044715);
    CIN_FN(cin_vec) u2 = CIN_FN(cin_vgelu_tanh_u2)(t);
    CIN_FN(cin_vec) e, sg = CIN_FN(cin_vsigmoid)(u2, &e);
    CIN_FN(cin_vec) sc = CIN_FN(cin_vsigmoid_c)(u2, sg, e);
    return dy * (sg + (CIN_T)2 * t * sg * sc * kb * ((CIN_T)1 + kk3 * t * t));
}

/* The standard normal CDF Phi(t) = erfc(-t / sqrt 2) / 2 (GELU's), and in *e the density's
 * exp(-t^2 / 2).  One formula for every t, no branches: with u = |t| / sqrt 2,
 *   erfc(u) = exp(-u^2) Y(q) / (1 + 2u),  q = (u - K) / (u + K),
 * Y = (1 + 2u) exp(u^2) erfc(u) a smooth function of q in [-1, 1) (1 at u = 0, 2/sqrt(pi) at
 * u -> inf), here the Chebyshev interpolant on the q of u in [0, u_max], in powers of
 * s = A q + B (Estrin's scheme), fitted for this library (tools/fit_erfc.py, 40-digit mpmath):
 * degree 10, K = 3 (float) and degree 22, K = 3.5 (double), 1.7 ulp as evaluated, u_max where
 * exp(-u^2) leaves the normal range (u is clamped there; the exp is 0 beyond).
 * exp(-u^2) = exp(-t^2 / 2) comes from t itself, as a double word: t = tz + (t - tz) with
 * tz's low mantissa bits cleared (12 of float's, 27 of double's), so tz^2 is exact and
 * -t^2/2 = -tz^2/2 - (t - tz)(t + tz)/2 loses nothing to the argument's rounding (t / sqrt 2
 * rounded, then squared, would give relative errors of 2u^2 ulp, 1e-13 at u = 26).
 * Phi = erfc/2 for t < 0 (relative accuracy deep in the tail, where 1 + erf cancels),
 * 1 - erfc/2 above; NaN propagates, Phi(+inf) = 1, Phi(-inf) = 0. */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vphi)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) *e)
{
    typedef CIN_FN(cin_vec) V;
    typedef CIN_FN(cin_uvec) UV;
    static const double cf[11] = {   /* Y(s) = sum cf[k] s^k, s = A q + B */
        1.2807296105084720851, -0.062005342335835378413, -0.11175736431484342616,
        0.12719930876963458574, -0.073808171605801701295, 0.026067605815043567461,
        -0.0045818273786374083047, -0.00035799899949255112832, 0.00032835923421831020929,
        -0.000010760444369863322248, -0.000017793451904351834749};
    static const double cd[23] = {
        1.2582591713387381171, -0.11743635346684073414, -0.043183059228400659742,
        0.11356442091110595196, -0.10814251736005345227, 0.06896628880173287188,
        -0.031442894771713273398, 0.0096050150598255583894, -0.0013183715713414028281,
        -0.00033941894902221890356, 0.00019584363137058188414, -0.000010017227436492433104,
        -0.000016848572872576302973, 3.1036079834893970466e-6, 1.4739598195987902551e-6,
        -4.2270329207000380355e-7, -1.5376017758790074515e-7, 4.922708017051907932e-8,
        1.9184918685751771519e-8, -4.925897873377042886e-9, -2.3913527848959689281e-9,
        3.1927933370085401722e-10, 1.9558274150361186399e-10};
    const int f32 = sizeof(CIN_T) == 4;
    const double *c = f32 ? cf : cd;
    const int nc = f32 ? 11 : 23;
    const CIN_T kq = f32 ? (CIN_T)3 : (CIN_T)3.5;
    const CIN_T umax = f32 ? (CIN_T)9.4f : (CIN_T)26.7;
    /* s = A q + B maps q of u in [0, u_max] onto [-1, 1] */
    const CIN_T qa = f32 ? (CIN_T)1.3191489361702127539 : (CIN_T)1.1310861423220973818;
    const CIN_T qb = f32 ? (CIN_T)0.3191489361702127539 : (CIN_T)0.13108614232209738177;
    const CIN_UT keep = f32 ? ~(CIN_UT)0xfff : ~(CIN_UT)0x7ffffff;
    const CIN_UT sign = (CIN_UT)1 << (8 * sizeof(CIN_T) - 1);
    V z = {0};
    UV tb;
    memcpy(&tb, &t, sizeof t);
    UV zb = tb & keep, ab = tb & ~sign;
    V tz, at;
    memcpy(&tz, &zb, sizeof tz);
    memcpy(&at, &ab, sizeof at);
    *e = CIN_FN(cin_vexp2)((CIN_T)-0.5 * (tz * tz), (CIN_T)-0.5 * ((t - tz) * (t + tz)), 1);
    V u = at * (CIN_T)0.70710678118654752440;
    u = CIN_FN(cin_vsel)(u > umax, z + umax, u);
    V w = (CIN_T)1 + (CIN_T)2 * u, uk = u + kq;
    V rd = (CIN_T)1 / (uk * w);                      /* 1 / ((u + K)(1 + 2u)) */
    V s = ((u - kq) * w * rd) * qa + qb;
    V y = CIN_FN(cin_vpoly)(s, c, nc);
    V half = (*e * y) * (uk * rd) * (CIN_T)0.5;      /* erfc(u) / 2 */
    return CIN_FN(cin_vsel)(t < z, half, (CIN_T)1 - half);
}

/* GELU t Phi(t) and its gradient dy (Phi(t) + t exp(-t^2/2) / sqrt(2 pi)). */
static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vgelu)(CIN_FN(cin_vec) t)
{
    CIN_FN(cin_vec) e;
    return t * CIN_FN(cin_vphi)(t, &e);
}

static CIN_ALWAYS_INLINE CIN_FN(cin_vec)
CIN_FN(cin_vgelu_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy)
{
    CIN_FN(cin_vec) e, p = CIN_FN(cin_vphi)(t, &e);
    return dy * (p + t * (e * (CIN_T)0.39894228040143267794));
}
