"""The vector exp and normal CDF behind the fused SiLU, GELU and GELU-tanh (src/cin_vmath.h),
through the public API: with weight 0 the pre-activation of channel c is exactly bias[c], so y[:, c] = act(bias[c])
and, with dy = 1, dbias[c] / plane size = act'(bias[c]) (the backward's g = dy * act'(t)
summed).  Dense grids and the special values, float32 and float64, every SIMD path the host
has, NCHW and channels-last, planes with a vector body and a scalar tail (the scalar form
must give the same bits as the vector one)."""

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest

import cinstnorm as cin


GRID = np.concatenate([np.linspace(-30, 30, 6001), [-1e4, -200, -100, -89.5, -88.2, -87.5,
                                                     -1e-30, 0.0, 1e-30, 87.5, 88.2, 89.5,
                                                     100, 200, 1e4]])


def _sigmoid(z):
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z) if z > -1e4 else 0.0
    return e / (1 + e)


def _u2(t):  # 2u of GELU-tanh
    return 2 * 0.79788456080286535588 * (t + 0.044715 * t ** 3)


def _gelu(t):
    """GELU t Phi(t) and its derivative Phi(t) + t phi(t), Phi from libm's erfc at the rounded
    u = |t| / sqrt 2 corrected to first order for that rounding, exp(-t^2 / 2) likewise for the
    rounding of t^2 / 2 (each rounding would otherwise be a relative error of t^2 ulp)."""
    u = abs(t) / math.sqrt(2)
    with localcontext() as ctx:
        ctx.prec = 50
        du = float(Decimal(abs(t)) / Decimal(2).sqrt() - Decimal(u))
    h = t * t / 2
    dh = float(Fraction(t) ** 2 / 2 - Fraction(h))
    e = math.exp(-h) * (1 - dh)
    ec = math.erfc(u) - du * 2 / math.sqrt(math.pi) * math.exp(-u * u)
    phi = ec / 2 if t < 0 else 1 - ec / 2
    return t * phi, phi + t * e / math.sqrt(2 * math.pi)


def reference(name, t):
    """(act(t), act'(t)) in float64, from the definitions (t sigmoid(2u) is 0.5 t (1 + tanh u)
    without its cancellation)."""
    if not math.isfinite(t):
        raise ValueError(t)
    if name == "gelu":
        return _gelu(t)
    if name == "silu":
        s = _sigmoid(t)
        return t * s, s * (1 + t * (1 - s))
    z = _u2(t) if abs(t) < 1e3 else math.copysign(math.inf, t)
    s = _sigmoid(z)
    du = 0.79788456080286535588 * (1 + 3 * 0.044715 * t * t)
    return t * s, s + 2 * t * s * (1 - s) * du


def _run(act, dtype, layout):
    C, H, W = GRID.size, 4, 5   # 20 per plane: a 16-, 8- or 4-lane body and a tail
    b = GRID.astype(dtype)
    w = np.zeros(C, dtype)
    x = np.random.default_rng(0).normal(size=(1, C, H, W)).astype(dtype)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y, mean, rstd = cin.instance_norm_forward(x, w, b, activation=act, n_threads=2)
    dy = np.ones_like(x)
    _, _, db = cin.instance_norm_backward(dy, x, mean, rstd, w, b, activation=act, n_threads=2)
    return b, y, db / (H * W)


def _tolerance(act, t, eps):
    # the rounding of the argument of exp (|t|, |2u| ulps) carries into the result's relative
    # error; a few ulps on top (GELU's exp argument is exact in two parts: no such term)
    if act == "gelu":
        return 6 * eps
    arg = abs(t) if act == "silu" else abs(_u2(t)) if abs(t) < 1e3 else 0.0
    return 6 * eps * (1 + arg)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_dense_grid(simd, act, dtype, layout):
    b, y, g = _run(act, dtype, layout)
    eps = np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny
    # every element of a plane is the same value: vector body and scalar tail agree bitwise
    assert (y == y[:, :, :1, :1]).all()
    worst_v = worst_g = 0.0
    for c, t in enumerate(b.astype(np.float64)):
        v_ref, g_ref = reference(act, t)
        tol = _tolerance(act, t, eps)
        ev = abs(y[0, c, 0, 0] - v_ref) / max(abs(v_ref), tiny / eps)
        eg = abs(g[c] - g_ref) / max(abs(g_ref), 1.0)
        assert ev <= tol, (act, t, y[0, c, 0, 0], v_ref)
        assert eg <= 8 * tol, (act, t, g[c], g_ref)   # + the sum over the plane
        worst_v, worst_g = max(worst_v, ev / eps), max(worst_g, eg / eps)
    print(f"{act} {np.dtype(dtype).name} {layout}: worst {worst_v:.1f} eps (value), "
          f"{worst_g:.1f} eps (gradient)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(simd, dtype):
    # the limits torch gives: act(+inf) = inf, act(-inf) = nan (-inf * 0), the tails exact
    b = np.array([np.inf, -np.inf, np.nan, 1e4, -1e4, 0.0], dtype)
    x = np.random.default_rng(1).normal(size=(1, b.size, 3, 3)).astype(dtype)
    w = np.zeros(b.size, dtype)
    for act in ("silu", "gelu", "gelu_tanh"):
        y, _, _ = cin.instance_norm_forward(x, w, b, activation=act, n_threads=1)
        v = y[0, :, 0, 0]
        assert v[0] == np.inf and np.isnan(v[1]) and np.isnan(v[2])
        assert v[3] == dtype(1e4) and v[4] == 0 and np.signbit(v[4]) and v[5] == 0


def test_matches_torch_where_torch_is_accurate(simd):
    torch = pytest.importorskip("torch")
    t = np.linspace(-8, 8, 2001)
    b = t.astype(np.float32)
    x = np.random.default_rng(2).normal(size=(1, b.size, 2, 3)).astype(np.float32)
    w = np.zeros(b.size, np.float32)
    for act, f in (("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu),
                   ("gelu_tanh", lambda a: torch.nn.functional.gelu(a, approximate="tanh"))):
        y, _, _ = cin.instance_norm_forward(x, w, b, activation=act, n_threads=1)
        want = f(torch.from_numpy(b.astype(np.float64))).numpy()
        np.testing.assert_allclose(y[0, :, 0, 0], want, rtol=2e-6, atol=1e-6)
