"""Checks of tests/reference.py itself, so the yardstick the suite uses is known to be right.

No cinstnorm here: the reference's backward is checked against finite differences of the
reference's forward, and its forward against a loop over planes written out longhand.
"""

import numpy as np
import pytest

import reference as ref
from helpers import make_affine, make_x


def _loop_forward(x, w, b, eps):
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            p = x[n, c]
            mu = sum(p.ravel()) / p.size
            var = sum((v - mu) ** 2 for v in p.ravel()) / p.size
            y[n, c] = (p - mu) / np.sqrt(var + eps) * w[c] + b[c]
    return y


def test_forward_matches_longhand_loop(rng):
    x = make_x(rng, (2, 3, 4, 5))
    w, b = make_affine(rng, 3)
    y, mean, rstd = ref.forward(x, w, b, eps=1e-3)
    np.testing.assert_allclose(y, _loop_forward(x, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    assert mean.shape == rstd.shape == (2, 3)


def test_running_update_longhand(rng):
    x = make_x(rng, (3, 2, 6))
    rm, rv = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    new_rm, new_rv = ref.update_running_stats(x, rm, rv, 0.25)
    for c in range(2):
        means = [x[n, c].mean() for n in range(3)]
        uvars = [x[n, c].var(ddof=1) for n in range(3)]
        assert new_rm[c] == pytest.approx(0.75 * rm[c] + 0.25 * np.mean(means), rel=1e-13)
        assert new_rv[c] == pytest.approx(0.75 * rv[c] + 0.25 * np.mean(uvars), rel=1e-13)
    # momentum None: cumulative average; the first step replaces, the second averages
    a, b = make_x(rng, (2, 2, 6)), make_x(rng, (2, 2, 6))
    rm1, rv1 = ref.update_running_stats(a, rm, rv, None, num_batches_tracked=1)
    rm2, rv2 = ref.update_running_stats(b, rm1, rv1, None, num_batches_tracked=2)
    np.testing.assert_allclose(rm2, (a.mean(axis=(0, 2)) + b.mean(axis=(0, 2))) / 2, rtol=1e-13)
    np.testing.assert_allclose(
        rv2, (a.var(axis=2, ddof=1).mean(0) + b.var(axis=2, ddof=1).mean(0)) / 2, rtol=1e-13)


def _fd_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_reference_backward_matches_finite_differences(rng, use_input_stats):
    x = make_x(rng, (2, 3, 5))
    w, b = make_affine(rng, 3)
    g = rng.standard_normal(x.shape)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)

    def loss():
        y, _, _ = ref.forward(x, w, b, 1e-5, rm, rv, use_input_stats)
        return float((y * g).sum())

    _, mean, rstd = ref.forward(x, w, b, 1e-5, rm, rv, use_input_stats)
    dx, dw, db = ref.backward(g, x, mean, rstd, w, use_input_stats)
    np.testing.assert_allclose(dx, _fd_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, _fd_grad(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _fd_grad(loss, b), rtol=1e-6, atol=1e-7)
