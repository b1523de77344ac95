"""Zero-size inputs, NaN/Inf confined to their plane, and float32 accuracy at large means."""

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import Snapshot, assert_close, make_affine, make_x

CLASSES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
ZERO_SHAPES = [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5),
               (2, 3, 5, 0), (0, 3, 2, 2, 2), (2, 3, 2, 0, 2), (2, 0, 2, 2, 2)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", ZERO_SHAPES)
def test_zero_size_functional(shape, dtype):
    x = np.zeros(shape, dtype)
    c = shape[1]
    rm, rv = np.full(c, 0.25), np.full(c, 2.0)
    if dtype != np.float16:
        rm, rv = rm.astype(dtype), rv.astype(dtype)
        snap = Snapshot(rm, rv)
        for use_input_stats in (True, False):
            y = cin.instance_norm(x, rm, rv, use_input_stats=use_input_stats)
            assert y.shape == shape and y.dtype == dtype
        snap.assert_unchanged()
    y = cin.instance_norm(x)
    assert y.shape == shape and y.dtype == dtype
    y, mean, rstd = cin.instance_norm_forward(x)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == rstd.shape == shape[:2]


@pytest.mark.parametrize("shape", [s for s in ZERO_SHAPES if s[1] != 0])
def test_zero_size_backward(rng, shape):
    x = np.zeros(shape)
    c = shape[1]
    mean, rstd = np.zeros(shape[:2]), np.ones(shape[:2])
    w = make_affine(rng, c)[0]
    for use_input_stats in (True, False):
        dx, dw, db = cin.instance_norm_backward(np.zeros(shape), x, mean, rstd, w,
                                                use_input_stats=use_input_stats)
        assert dx.shape == shape
        # sums over nothing are zero
        np.testing.assert_array_equal(dw, np.zeros(c))
        np.testing.assert_array_equal(db, np.zeros(c))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("zero_axis, batched", [("batch", True), ("spatial", True),
                                                ("spatial", False)])
def test_zero_size_module_leaves_running_stats(rng, dim, zero_axis, batched):
    m = CLASSES[dim](3, affine=True, track_running_stats=True, dtype=np.float64)
    m(make_x(rng, (2, 3) + (4,) * dim))
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    spatial = (4,) * (dim - 1) + (0,) if zero_axis == "spatial" else (4,) * dim
    shape = ((0 if zero_axis == "batch" else 2, 3) if batched else (3,)) + spatial
    for mode in ("train", "eval"):
        getattr(m, mode)()
        y = m(np.zeros(shape))
        assert y.shape == shape and y.dtype == np.float64
        np.testing.assert_array_equal(m.running_mean, rm)
        np.testing.assert_array_equal(m.running_var, rv)
        dx = m.backward(np.zeros(shape))
        assert dx.shape == shape


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 2, 400, 300)])
def test_non_finite_poisons_only_its_plane(rng, shape, dtype, bad, n_threads):
    x = make_x(rng, shape, dtype)
    x[1 if shape[0] > 1 else 0, 1, 2, 3] = bad
    poisoned = np.zeros(shape[:2], bool)
    poisoned[1 if shape[0] > 1 else 0, 1] = True
    w, b = make_affine(rng, shape[1], dtype)
    clean = np.where(poisoned[:, :, None, None], 0.0, x)
    y_ref = ref.forward(clean, w, b)[0]
    for y in (cin.instance_norm(x, weight=w, bias=b, n_threads=n_threads),
              cin.instance_norm_forward(x, w, b, n_threads=n_threads)[0]):
        assert np.all(np.isnan(y[poisoned]))
        assert np.all(np.isfinite(y[~poisoned]))
        assert_close(y[~poisoned], y_ref[~poisoned])
    dy = make_x(rng, shape, dtype, spread=1.0)
    _, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
    dx, _, _ = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=n_threads)
    mean_ref, rstd_ref = ref.instance_stats(clean)
    dx_ref = ref.backward_instance_stats(dy, clean, mean_ref, rstd_ref, w)[0]
    assert np.all(np.isfinite(dx[~poisoned]))
    assert_close(dx[~poisoned], dx_ref[~poisoned], grad=True)


def test_non_finite_in_eval_with_running_stats_stays_local(rng):
    x = make_x(rng, (2, 3, 4, 4))
    x[0, 2, 1, 1] = np.nan
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    y = cin.instance_norm(x, rm, rv, use_input_stats=False)
    y_ref = ref.forward(x, None, None, 1e-5, rm, rv, use_input_stats=False)[0]
    assert np.isnan(y[0, 2, 1, 1]) and np.isnan(y).sum() == 1
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10, equal_nan=True)


# ---------------------------------------------------------------- float32 accuracy

@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(4, 8, 32, 32), (2, 3, 5000), (1, 1, 512, 512),
                                   (1, 2, 8, 32, 32), (3, 2, 7, 13)])
def test_float32_accuracy_at_mean_1e5(rng, shape, affine, n_threads):
    # planes with mean 1e5 and std 1: |y - reference| <= 1e-5 (torch 2.13: about 5e-3)
    x = (1e5 + rng.standard_normal(shape)).astype(np.float32)
    w, b = make_affine(rng, shape[1], np.float32) if affine else (None, None)
    y_ref = ref.forward(x, w, b)[0]  # from the float32 values, in float64
    y = cin.instance_norm(x, weight=w, bias=b, n_threads=n_threads)
    assert np.abs(y - y_ref).max() <= 1e-5
    y2, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
    assert np.abs(y2 - y_ref).max() <= 1e-5
    _, mean_ref, rstd_ref = ref.forward(x)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-4)
    m = (cin.InstanceNorm1d if len(shape) == 3 else cin.InstanceNorm2d if len(shape) == 4
         else cin.InstanceNorm3d)(shape[1], track_running_stats=True)
    assert np.abs(m(x) - ref.forward(x)[0]).max() <= 1e-5


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape", [(4, 40, 17, 19), (2, 3, 300, 301), (2, 200, 16, 16),
                                   (3, 24, 2000), (1, 5, 4, 30, 30),
                                   # short samples: a shift from 4 rows (64 rows) or from 1 row
                                   (8, 256, 8, 8), (3, 7, 2, 3), (2, 16, 15)])
def test_float32_accuracy_at_mean_1e5_channels_last(rng, shape, n_threads):
    # the channels-last kernels (statistics, forward and backward) keep the same bound
    perm = (0,) + tuple(range(2, len(shape))) + (1,)
    x = (1e5 + rng.standard_normal(shape)).astype(np.float32)
    x_cl = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    w, b = make_affine(rng, shape[1], np.float32)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b)
    y, mean, rstd = cin.instance_norm_forward(x_cl, w, b, n_threads=n_threads)
    assert np.abs(y - y_ref).max() <= 1e-5
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-4)
    dy = rng.standard_normal(shape).astype(np.float32)
    # from the float32 statistics the API hands out (a float32 mean at 1e5 is itself 4e-3 off)
    dx_ref = ref.backward(dy, x, mean.astype(np.float64), rstd.astype(np.float64), w)[0]
    dx = cin.instance_norm_backward(np.ascontiguousarray(dy.transpose(perm)).transpose(
        np.argsort(perm)), x_cl, mean, rstd, w, n_threads=n_threads)[0]
    assert np.abs(dx - dx_ref).max() <= 1e-4 * max(1.0, np.abs(dx_ref).max())


@pytest.mark.parametrize("offset, limit", [(1e3, 1e-5), (-3e4, 1e-5), (1e6, 1e-4)])
def test_float32_accuracy_other_offsets(rng, offset, limit):
    x = (offset + rng.standard_normal((2, 3, 40, 40))).astype(np.float32)
    y_ref = ref.forward(x)[0]
    assert np.abs(cin.instance_norm(x) - y_ref).max() <= limit
