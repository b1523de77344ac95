"""Per-sample (N, C) affine parameters and AdaIN, against float64 references and finite
differences."""

import numpy as np
import pytest

import cinstnorm as cin

from helpers import assert_close, make_x
from test_gradcheck import fd_grad as _numeric_grad


def _stats(a):
    p = np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1)
    return p.mean(-1), p.var(-1)


def _expand(a, ndim):
    return a.reshape(a.shape + (1,) * (ndim - 2))


def adain_ref(c, s, eps=1e-5):
    mc, vc = _stats(c)
    ms, vs = _stats(s)
    nd = c.ndim
    return ((np.asarray(c, np.float64) - _expand(mc, nd)) / np.sqrt(_expand(vc, nd) + eps)
            * np.sqrt(_expand(vs, nd) + eps) + _expand(ms, nd))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("style_spatial", [(6, 7), (3, 4), (40, 50)])
def test_adain_matches_reference(rng, dtype, style_spatial):
    c = make_x(rng, (3, 4, 6, 7), dtype)
    s = make_x(rng, (3, 4) + style_spatial, dtype, spread=5.0)
    y = cin.adain(c, s)
    assert y.dtype == dtype and y.shape == c.shape
    assert_close(y, adain_ref(c, s), err_msg="adain")


def test_adain_1d_and_3d(rng):
    for shape_c, shape_s in [((2, 3, 50), (2, 3, 20)), ((2, 3, 4, 5, 6), (2, 3, 3, 3, 3))]:
        c, s = make_x(rng, shape_c), make_x(rng, shape_s)
        assert_close(cin.adain(c, s), adain_ref(c, s))


def test_adain_gradients_by_finite_differences(rng):
    c = make_x(rng, (2, 3, 4, 5))
    s = make_x(rng, (2, 3, 3, 4))
    g = rng.standard_normal(c.shape)
    dc, ds = cin.adain_backward(g, c, s)
    loss = lambda: float((adain_ref(c, s) * g).sum())  # noqa: E731
    np.testing.assert_allclose(dc, _numeric_grad(loss, c), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ds, _numeric_grad(loss, s), rtol=1e-6, atol=1e-7)


def test_adain_float32_gradients_close_to_float64(rng):
    c = make_x(rng, (2, 3, 20, 21))
    s = make_x(rng, (2, 3, 9, 8))
    g = rng.standard_normal(c.shape)
    dc64, ds64 = cin.adain_backward(g, c, s)
    dc32, ds32 = cin.adain_backward(g.astype(np.float32), c.astype(np.float32),
                                    s.astype(np.float32))
    assert_close(dc32, dc64, grad=True)
    assert_close(ds32, ds64, grad=True)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda c, s: (c, s[:1]), ValueError, "style must have content's"),
    (lambda c, s: (c, s.astype(np.float32)), TypeError, "does not match content dtype"),
    (lambda c, s: (c, s[..., :1, :1]), ValueError, "more than 1 spatial element"),
    (lambda c, s: (c.astype(np.int64), s), TypeError, "int64"),
])
def test_adain_validation(rng, bad, exc, match):
    c, s = make_x(rng, (2, 3, 4, 4)), make_x(rng, (2, 3, 4, 4))
    with pytest.raises(exc, match=match):
        cin.adain(*bad(c, s))


def _per_sample_ref(x, w, b, eps=1e-5):
    m, v = _stats(x)
    nd = x.ndim
    return ((np.asarray(x, np.float64) - _expand(m, nd)) / np.sqrt(_expand(v, nd) + eps)
            * _expand(np.asarray(w, np.float64), nd) + _expand(np.asarray(b, np.float64), nd))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_sample_affine_forward_backward(rng, dtype):
    x = make_x(rng, (3, 4, 5, 6), dtype)
    w = rng.uniform(0.5, 1.5, (3, 4)).astype(dtype)
    b = rng.uniform(-1, 1, (3, 4)).astype(dtype)
    y, mean, rstd = cin.instance_norm_forward(x, w, b)
    assert_close(y, _per_sample_ref(x, w, b))
    g = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = cin.instance_norm_backward(g, x, mean, rstd, w)
    assert dw.shape == (3, 4) and db.shape == (3, 4)
    p = np.asarray(x, np.float64).reshape(3, 4, -1)
    xhat = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, keepdims=True) + 1e-5)
    gp = np.asarray(g, np.float64).reshape(3, 4, -1)
    assert_close(dw, (gp * xhat).sum(-1), grad=True)
    assert_close(db, gp.sum(-1), grad=True)
    if dtype == np.float64:
        x64 = x.copy()
        loss = lambda: float((_per_sample_ref(x64, w, b) * g).sum())  # noqa: E731
        np.testing.assert_allclose(dx, _numeric_grad(loss, x64), rtol=1e-6, atol=1e-7)


def test_per_sample_weight_wrong_shape(rng):
    x = make_x(rng, (3, 4, 5, 6))
    with pytest.raises(ValueError, match=r"\(4,\) or \(3, 4\)"):
        cin.instance_norm_forward(x, np.ones((2, 4)))
