"""cin.instance_norm / instance_norm_forward / instance_norm_backward against tests/reference.py.

1d/2d/3d, float32 and float64, 1 and 2 threads, every combination of weight and bias, the
functional running-stat update and the running-stat (eval) form.
"""

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import SPATIAL, Snapshot, assert_close, make_affine, make_x

DTYPES = [np.float32, np.float64]
AFFINE = ["none", "weight", "weight_bias", "bias"]


def _affine(rng, c, dtype, kind):
    w, b = make_affine(rng, c, dtype)
    return (w if "weight" in kind else None), (b if "bias" in kind else None)


def _compute_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kind", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_forward_matches_reference(rng, dim, dtype, kind, n_threads):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    w, b = _affine(rng, 4, dtype, kind)
    snap = Snapshot(x, w, b)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b, eps=1e-5)

    y, mean, rstd = cin.instance_norm_forward(x, w, b, 1e-5, n_threads=n_threads)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == rstd.shape == (3, 4)
    assert mean.dtype == rstd.dtype == _compute_dtype(dtype)
    assert_close(y, y_ref)
    assert_close(mean, mean_ref)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5 if dtype == np.float32 else 1e-10)

    y2 = cin.instance_norm(x, weight=w, bias=b, n_threads=n_threads)
    assert y2.shape == x.shape and y2.dtype == x.dtype
    assert_close(y2, y_ref)
    snap.assert_unchanged()


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5, 3.0])
def test_eps_values(rng, eps):
    x = make_x(rng, (2, 3, 4, 4))
    w, b = make_affine(rng, 3)
    assert_close(cin.instance_norm(x, weight=w, bias=b, eps=eps), ref.forward(x, w, b, eps)[0])
    y, mean, rstd = cin.instance_norm_forward(x, w, b, eps)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b, eps)
    assert_close(y, y_ref)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_and_two_element_planes(rng, dtype):
    # constant planes (variance 0, also at a large offset) and the smallest legal M = 2
    x = make_x(rng, (2, 3, 2), dtype)
    x[0, 0] = 7.0
    x[1, 2] = 1e5
    w, b = make_affine(rng, 3, dtype)
    y_ref = ref.forward(x, w, b)[0]
    y = cin.instance_norm(x, weight=w, bias=b)
    assert np.all(np.isfinite(y))
    assert_close(y, y_ref)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.7, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_running_update(rng, dim, dtype, momentum, n_threads):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    w, b = make_affine(rng, 4, dtype)
    rm = rng.normal(size=4).astype(dtype)
    rv = rng.uniform(0.5, 2.0, 4).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    rm_id, rv_id = id(rm), id(rv)
    y = cin.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=momentum,
                          n_threads=n_threads)
    assert_close(y, ref.forward(x, w, b)[0])
    exp_rm, exp_rv = ref.update_running_stats(x, rm0, rv0, momentum)
    assert id(rm) == rm_id and id(rv) == rv_id
    assert rm.dtype == dtype and rv.dtype == dtype
    assert_close(rm, exp_rm)
    assert_close(rv, exp_rv)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("kind", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_running_stats_eval(rng, dim, dtype, kind, n_threads):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    w, b = _affine(rng, 4, dtype, kind)
    rm = rng.normal(size=4).astype(dtype)
    rv = rng.uniform(0.5, 2.0, 4).astype(dtype)
    snap = Snapshot(x, w, b, rm, rv)
    y = cin.instance_norm(x, rm, rv, w, b, use_input_stats=False, momentum=0.3, eps=1e-3,
                          n_threads=n_threads)
    y_ref = ref.forward(x, w, b, 1e-3, rm, rv, use_input_stats=False)[0]
    assert y.dtype == x.dtype
    assert_close(y, y_ref)
    snap.assert_unchanged()  # buffers untouched when the running stats are used


def test_running_stats_accept_single_spatial_element(rng):
    # eval with running stats accepts M == 1
    x = make_x(rng, (2, 3, 1, 1))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    y = cin.instance_norm(x, rm, rv, use_input_stats=False)
    assert_close(y, ref.forward(x, None, None, 1e-5, rm, rv, use_input_stats=False)[0])


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_backward_instance_stats(rng, dim, dtype, with_weight, n_threads):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    dy = make_x(rng, x.shape, dtype, spread=1.0)
    w = make_affine(rng, 4, dtype)[0] if with_weight else None
    _, mean, rstd = cin.instance_norm_forward(x, w, None, 1e-5, n_threads=n_threads)
    _, mean_ref, rstd_ref = ref.forward(x, w, None, 1e-5)
    assert_close(mean, mean_ref)
    snap = Snapshot(dy, x, mean, rstd, w)

    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=True,
                                            n_threads=n_threads)
    dx_ref, dw_ref, db_ref = ref.backward_instance_stats(dy, x, mean_ref, rstd_ref, w)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dx_ref, grad=True)
    if with_weight:
        assert dw.shape == db.shape == (4,)
        assert_close(dw, dw_ref, dtype=dtype, grad=True)
        assert_close(db, db_ref, dtype=dtype, grad=True)
    else:
        assert dw is None and db is None
    snap.assert_unchanged()


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_backward_fixed_stats(rng, dim, dtype, with_weight, n_threads):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    dy = make_x(rng, x.shape, dtype, spread=1.0)
    w = make_affine(rng, 4, dtype)[0] if with_weight else None
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    mean, rstd = ref.running_as_plane_stats(rm, rv, 3, eps=1e-5)
    cdt = _compute_dtype(dtype)
    mean, rstd = mean.astype(cdt), rstd.astype(cdt)
    snap = Snapshot(dy, x, mean, rstd, w)

    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=False,
                                            n_threads=n_threads)
    dx_ref, dw_ref, db_ref = ref.backward_fixed_stats(dy, x, mean, rstd, w)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dx_ref, grad=True)
    if with_weight:
        assert_close(dw, dw_ref, dtype=dtype, grad=True)
        assert_close(db, db_ref, dtype=dtype, grad=True)
    else:
        assert dw is None and db is None
    snap.assert_unchanged()


def test_backward_accuracy_at_large_offset(rng):
    # planes far from zero (mean 1e4, std about 1): float64 gradients keep about 9 digits
    x = 1e4 + make_x(rng, (2, 3, 64), spread=0.0)
    dy = 1.0 + rng.standard_normal(x.shape)
    w = np.ones(3)
    _, mean, rstd = cin.instance_norm_forward(x, w)
    _, mean_ref, rstd_ref = ref.forward(x, w)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w)
    dx_ref, dw_ref, db_ref = ref.backward_instance_stats(dy, x, mean_ref, rstd_ref, w)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n_threads", [None, 1, 2, 3, -1, -2])
def test_n_threads_values_give_reference_results(rng, n_threads):
    x = make_x(rng, (2, 5, 6, 7))
    w, b = make_affine(rng, 5)
    dy = rng.standard_normal(x.shape)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b)
    y, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
    assert_close(y, y_ref)
    assert_close(cin.instance_norm(x, weight=w, bias=b, n_threads=n_threads), y_ref)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=n_threads)
    for got, exp in zip((dx, dw, db), ref.backward_instance_stats(dy, x, mean_ref, rstd_ref, w)):
        assert_close(got, exp, grad=True)


@pytest.mark.parametrize("shape", [(1, 1, 300, 300), (1, 2, 50000), (1, 1, 8, 64, 64),
                                   (2, 1, 70000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_large_planes_split_across_threads(rng, shape, dtype, n_threads):
    # fewer planes than threads and planes larger than L2: the chunked path with merged partials
    x = make_x(rng, shape, dtype)
    w, b = make_affine(rng, shape[1], dtype)
    dy = make_x(rng, shape, dtype, spread=1.0)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b)
    y, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
    assert_close(y, y_ref)
    assert_close(mean, mean_ref)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5 if dtype == np.float32 else 1e-10)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=n_threads)
    dx_ref, dw_ref, db_ref = ref.backward_instance_stats(dy, x, mean_ref, rstd_ref, w)
    assert_close(dx, dx_ref, grad=True)
    # sums over ~1e5 elements: scale the tolerance with the sum of absolute values
    scale = np.abs(dy.astype(np.float64)).reshape(shape[0], shape[1], -1).sum(axis=(0, 2))
    rt = 1e-5 if dtype == np.float32 else 1e-12
    assert np.all(np.abs(dw - dw_ref) <= rt * scale * 4)
    assert np.all(np.abs(db - db_ref) <= rt * scale)
