/* Vector exp and the logistic sigmoid for the fused SiLU and GELU-tanh activations; part of
 * the template body (included by cinstnorm_kernels_impl.h once per element type and
 * instruction set, after the vector typedefs; no include guard on purpose).
 *
 * GCC/Clang vector extensions only, so the same text runs on every SIMD path, and the scalar
 * activations (tails, channels-last rows) call it on a broadcast vector: an element's result
 * does not depend on where in a plane it sits or on the path.
 *
 * exp(x) = 2^n * p(r): n = round(x / ln 2) by the add-and-subtract-1.5*2^mant trick (the
 * integer n then sits in the low bits of the sum), r = x - n*ln2 in two steps (Cody-Waite;
 * |r| <= ln2/2, exact head), p the Taylor polynomial of exp to degree 7 (float, truncation
 * 5e-9) or 13 (double, 4e-18) in Horner form, 2^n built in the exponent bits.  Inputs above
 * 88 (float) or 709 (double) give +inf (exp is within 2x of overflow there), below ln(smallest normal) 0, NaN propagates: measured within
 * 2 ulp of libm over [-87, 88] (float) and [-708, 709] (double), tests/test_vmath.py.
 * Relies on IEEE evaluation (no -ffast-math: the rounding trick must not be folded away).
 */

typedef CIN_UT CIN_FN(cin_uvec) __attribute__((vector_size(CIN_VEC_BYTES)));

/* m ? a : b lane by lane, m a comparison result (all ones or all zeros per lane). */
static inline CIN_FN(cin_vec) CIN_FN(cin_vsel)(CIN_FN(cin_ivec) m, CIN_FN(cin_vec) a,
                                               CIN_FN(cin_vec) b)
{
    typedef CIN_FN(cin_ivec) CIN_IV;
    return (CIN_FN(cin_vec))(((CIN_IV)a & m) | ((CIN_IV)b & ~m));
}

static inline CIN_FN(cin_vec) CIN_FN(cin_vexp)(CIN_FN(cin_vec) x)
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
    V xc = CIN_FN(cin_vsel)(x > hi, z + hi, CIN_FN(cin_vsel)(x < lo, z + lo, x)); /* NaN stays */
    V kn = xc * log2e + magic;
    V n = kn - magic;
    V r = (xc - n * ln2hi) - n * ln2lo;
    V p;
    if (f32) {
        p = z + (CIN_T)(1.0 / 5040);
        p = p * r + (CIN_T)(1.0 / 720);
        p = p * r + (CIN_T)(1.0 / 120);
        p = p * r + (CIN_T)(1.0 / 24);
        p = p * r + (CIN_T)(1.0 / 6);
        p = p * r + (CIN_T)0.5;
    } else {
        p = z + (CIN_T)(1.0 / 6227020800.0);
        p = p * r + (CIN_T)(1.0 / 479001600.0);
        p = p * r + (CIN_T)(1.0 / 39916800.0);
        p = p * r + (CIN_T)(1.0 / 3628800.0);
        p = p * r + (CIN_T)(1.0 / 362880.0);
        p = p * r + (CIN_T)(1.0 / 40320.0);
        p = p * r + (CIN_T)(1.0 / 5040.0);
        p = p * r + (CIN_T)(1.0 / 720.0);
        p = p * r + (CIN_T)(1.0 / 120.0);
        p = p * r + (CIN_T)(1.0 / 24.0);
        p = p * r + (CIN_T)(1.0 / 6.0);
        p = p * r + (CIN_T)0.5;
    }
    p = (p * r + (CIN_T)1) * r + (CIN_T)1;
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
    return CIN_FN(cin_vsel)(x < lo, z, e);
}

/* exp(-t) and sigmoid(t) = 1 / (1 + exp(-t)) (0 for t -> -inf, 1 for t -> +inf). */
static inline CIN_FN(cin_vec) CIN_FN(cin_vsigmoid)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) *e)
{
    *e = CIN_FN(cin_vexp)(-t);
    return (CIN_T)1 / ((CIN_T)1 + *e);
}

/* 1 - sigmoid(t) without cancellation: exp(-t) * sigmoid(t) where t >= 0 (1 - sg would lose
 * the digits as sg -> 1), 1 - sg below (exact enough there, and exp(-t) * sg is inf * 0 at
 * t -> -inf). */
static inline CIN_FN(cin_vec) CIN_FN(cin_vsigmoid_c)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) sg,
                                                    CIN_FN(cin_vec) e)
{
    CIN_FN(cin_vec) z = {0};
    return CIN_FN(cin_vsel)(t >= z, e * sg, (CIN_T)1 - sg);
}

/* SiLU t * sigmoid(t) (as t / (1 + exp(-t))) and GELU-tanh 0.5 t (1 + tanh u) with
 * u = sqrt(2/pi) (t + 0.044715 t^3), computed as t * sigmoid(2u) (the same function: no
 * cancellation in 1 + tanh u for t << 0). */
static inline CIN_FN(cin_vec) CIN_FN(cin_vsilu)(CIN_FN(cin_vec) t)
{
    return t / ((CIN_T)1 + CIN_FN(cin_vexp)(-t));
}

static inline CIN_FN(cin_vec) CIN_FN(cin_vgelu_tanh_u2)(CIN_FN(cin_vec) t)
{
    const CIN_T kb2 = (CIN_T)(2 * 0.79788456080286535588), kk = (CIN_T)0.044715;
    return kb2 * (t + kk * t * t * t);
}

static inline CIN_FN(cin_vec) CIN_FN(cin_vgelu_tanh)(CIN_FN(cin_vec) t)
{
    return t / ((CIN_T)1 + CIN_FN(cin_vexp)(-CIN_FN(cin_vgelu_tanh_u2)(t)));
}

/* dy * silu'(t) = dy * sg (1 + t (1 - sg)) */
static inline CIN_FN(cin_vec) CIN_FN(cin_vsilu_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy)
{
    CIN_FN(cin_vec) e, sg = CIN_FN(cin_vsigmoid)(t, &e);
    return dy * (sg * ((CIN_T)1 + t * CIN_FN(cin_vsigmoid_c)(t, sg, e)));
}

/* dy * d/dt [t sigmoid(2u)] = dy * (sg + 2 t sg (1 - sg) u'), u' = sqrt(2/pi)(1 + 3 0.044715 t^2)
 * (0.5 (1 + tanh u) = sg and 1 - tanh^2 u = 4 sg (1 - sg)) */
static inline CIN_FN(cin_vec) CIN_FN(cin_vgelu_tanh_grad)(CIN_FN(cin_vec) t, CIN_FN(cin_vec) dy)
{
    const CIN_T kb = (CIN_T)0.79788456080286535588, kk3 = (CIN_T)(3 * 0.044715);
    CIN_FN(cin_vec) u2 = CIN_FN(cin_vgelu_tanh_u2)(t);
    CIN_FN(cin_vec) e, sg = CIN_FN(cin_vsigmoid)(u2, &e);
    CIN_FN(cin_vec) sc = CIN_FN(cin_vsigmoid_c)(u2, sg, e);
    return dy * (sg + (CIN_T)2 * t * sg * sc * kb * ((CIN_T)1 + kk3 * t * t));
}
