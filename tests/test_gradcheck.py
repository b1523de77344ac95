"""Finite-difference gradient checks in float64.

The loss is L = sum(y * g) for a random g, so dL/dy = g. Central differences of L computed
with cinstnorm's forward must match instance_norm_backward (and Module.backward).
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cinstnorm as cin
import reference as ref
from helpers import fd_grad, make_affine, make_x

FD_TOL = dict(rtol=1e-6, atol=1e-7)


SHAPES = [(2, 3, 5), (2, 2, 3, 3), (1, 2, 2, 2, 3)]


@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_instance_stats_gradients(rng, shape, affine):
    x = make_x(rng, shape)
    w, b = make_affine(rng, shape[1])
    w = None if affine == "none" else w
    b = b if affine == "weight_bias" else None
    g = rng.standard_normal(shape)

    def loss():
        return float((cin.instance_norm_forward(x, w, b, 1e-5, n_threads=1)[0] * g).sum())

    _, mean, rstd = cin.instance_norm_forward(x, w, b, 1e-5)
    dx, dw, db = cin.instance_norm_backward(g, x, mean, rstd, w, use_input_stats=True)
    np.testing.assert_allclose(dx, fd_grad(loss, x), **FD_TOL)
    if w is None:
        assert dw is None and db is None
        return
    np.testing.assert_allclose(dw, fd_grad(loss, w), **FD_TOL)
    if b is not None:
        np.testing.assert_allclose(db, fd_grad(loss, b), **FD_TOL)
    else:
        # dbias is returned even without a bias: the gradient a bias would get
        np.testing.assert_allclose(db, g.reshape(shape[0], shape[1], -1).sum(axis=(0, 2)),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", ["none", "weight_bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_stats_gradients(rng, shape, affine):
    x = make_x(rng, shape)
    c = shape[1]
    w, b = make_affine(rng, c)
    if affine == "none":
        w = b = None
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    g = rng.standard_normal(shape)

    def loss():
        y = cin.instance_norm(x, rm.copy(), rv.copy(), w, b, use_input_stats=False, eps=1e-5,
                            n_threads=1)
        return float((y * g).sum())

    mean, rstd = ref.running_as_plane_stats(rm, rv, shape[0], eps=1e-5)
    dx, dw, db = cin.instance_norm_backward(g, x, mean, rstd, w, use_input_stats=False)
    np.testing.assert_allclose(dx, fd_grad(loss, x), **FD_TOL)
    if w is None:
        assert dw is None and db is None
    else:
        np.testing.assert_allclose(dw, fd_grad(loss, w), **FD_TOL)
        np.testing.assert_allclose(db, fd_grad(loss, b), **FD_TOL)


@pytest.mark.parametrize("mode", ["train", "train_tracking", "eval_tracking"])
def test_module_backward_finite_differences(rng, mode):
    x = make_x(rng, (2, 3, 3, 4))
    g = rng.standard_normal(x.shape)
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=mode != "train", dtype=np.float64)
    w, b = make_affine(rng, 3)
    m.weight[...] = w
    m.bias[...] = b
    if mode == "eval_tracking":
        m.running_mean[...] = rng.normal(size=3)
        m.running_var[...] = rng.uniform(0.5, 2.0, 3)
        m.eval()

    def loss():
        return float((m(x) * g).sum())

    m(x)
    dx = m.backward(g)
    dw, db = m.weight_grad.copy(), m.bias_grad.copy()
    with threadpool_limits(limits=1, user_api="openmp"):
        fd_x = fd_grad(loss, x)
        fd_w = fd_grad(loss, m.weight)
        fd_b = fd_grad(loss, m.bias)
    np.testing.assert_allclose(dx, fd_x, **FD_TOL)
    np.testing.assert_allclose(dw, fd_w, **FD_TOL)
    np.testing.assert_allclose(db, fd_b, **FD_TOL)


def test_unbatched_module_backward_finite_differences(rng):
    x = make_x(rng, (3, 7))
    g = rng.standard_normal(x.shape)
    m = cin.InstanceNorm1d(3, affine=True, dtype=np.float64)
    m.weight[...] = make_affine(rng, 3)[0]

    def loss():
        return float((m(x) * g).sum())

    m(x)
    dx = m.backward(g)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, fd_grad(loss, x), **FD_TOL)
    np.testing.assert_allclose(m.weight_grad, fd_grad(loss, m.weight), **FD_TOL)
