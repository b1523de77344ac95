"""Memory layouts: sliced, transposed (channels-last), Fortran, negatively strided, read-only,
memory-mapped and broadcast inputs give the reference numbers, are never modified, and the
output keeps the input's stride order; out= (including out is x) and float16.
"""

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import (Snapshot, assert_close, is_dense_in_order, layouts, make_affine, make_x,
                     stride_order)

SHAPES = {1: (2, 3, 9), 2: (2, 3, 5, 6), 3: (2, 3, 3, 4, 5)}
DTYPES = [np.float32, np.float64]


def _case(rng, tmp_path, dim, dtype):
    base = make_x(rng, SHAPES[dim], dtype)
    return base, layouts(base, tmp_path)


def _check_stride_order(y, x, name):
    order = stride_order(x)
    assert stride_order(y) == order, (name, x.strides, y.strides)
    if name != "negative":
        assert is_dense_in_order(y, order), (name, y.strides)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_forward_layouts(rng, tmp_path, dim, dtype, n_threads):
    base, xs = _case(rng, tmp_path, dim, dtype)
    w, b = make_affine(rng, 3, dtype)
    y_ref, mean_ref, rstd_ref = ref.forward(base, w, b)
    for name, x in xs.items():
        snap = Snapshot(x, w, b)
        y = cin.instance_norm(x, weight=w, bias=b, n_threads=n_threads)
        assert_close(y, y_ref, err_msg=name)
        _check_stride_order(y, x, name)
        y2, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
        assert_close(y2, y_ref, err_msg=name)
        assert_close(mean, mean_ref, err_msg=name)
        np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5 if dtype == np.float32 else 1e-10)
        _check_stride_order(y2, x, name)
        snap.assert_unchanged()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_running_stats_layouts(rng, tmp_path, dim, dtype):
    base, xs = _case(rng, tmp_path, dim, dtype)
    rm0 = rng.normal(size=3).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, 3).astype(dtype)
    exp_rm, exp_rv = ref.update_running_stats(base, rm0, rv0, 0.2)
    y_eval_ref = ref.forward(base, None, None, 1e-5, rm0, rv0, use_input_stats=False)[0]
    for name, x in xs.items():
        snap = Snapshot(x)
        rm, rv = rm0.copy(), rv0.copy()
        y = cin.instance_norm(x, rm, rv, use_input_stats=False)
        assert_close(y, y_eval_ref, err_msg=name)
        _check_stride_order(y, x, name)
        cin.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.2)
        assert_close(rm, exp_rm, err_msg=name)
        assert_close(rv, exp_rv, err_msg=name)
        snap.assert_unchanged()


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_backward_layouts(rng, tmp_path, dim, dtype, use_input_stats):
    base, xs = _case(rng, tmp_path, dim, dtype)
    dy_base = make_x(rng, base.shape, dtype, spread=1.0)
    dys = layouts(dy_base)
    w = make_affine(rng, 3, dtype)[0]
    cdt = np.float64 if dtype == np.float64 else np.float32
    if use_input_stats:
        mean, rstd = ref.instance_stats(base)
    else:
        mean, rstd = ref.running_as_plane_stats(rng.normal(size=3), rng.uniform(0.5, 2, 3), 2)
    mean, rstd = mean.astype(cdt), rstd.astype(cdt)
    expected = ref.backward(dy_base, base, mean, rstd, w, use_input_stats)
    stats_layouts = {"c": (mean, rstd), "f": (np.asfortranarray(mean), np.asfortranarray(rstd)),
                     "neg_f": (mean[::-1].copy()[::-1], rstd.T.copy().T)}
    for (name, x), (dname, dy), (sname, (mu, rs)) in zip(
            xs.items(), list(dys.items()) * 2, list(stats_layouts.items()) * 4):
        snap = Snapshot(x, dy, mu, rs, w)
        dx, dw, db = cin.instance_norm_backward(dy, x, mu, rs, w,
                                                use_input_stats=use_input_stats)
        msg = f"x {name}, dy {dname}, stats {sname}"
        assert_close(dx, expected[0], grad=True, err_msg=msg)
        assert_close(dw, expected[1], dtype=dtype, grad=True, err_msg=msg)
        assert_close(db, expected[2], dtype=dtype, grad=True, err_msg=msg)
        snap.assert_unchanged()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_module_layouts(rng, tmp_path, dim):
    cls = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}[dim]
    base, xs = _case(rng, tmp_path, dim, np.float32)
    dy = make_x(rng, base.shape, np.float32, spread=1.0)
    w, b = make_affine(rng, 3, np.float32)
    for name, x in xs.items():
        m = cls(3, affine=True, track_running_stats=True)
        m.weight[...] = w
        m.bias[...] = b
        model = ref.ModuleModel(3, affine=True, track_running_stats=True)
        model.weight, model.bias = w.astype(np.float64), b.astype(np.float64)
        snap = Snapshot(x, dy)
        y = m(x)
        assert_close(y, model.forward(base), err_msg=name)
        _check_stride_order(y, x, name)
        assert_close(m.backward(dy), model.backward(dy), grad=True, err_msg=name)
        assert_close(m.running_mean, model.running_mean, err_msg=name)
        assert_close(m.running_var, model.running_var, err_msg=name)
        m.eval()
        model.training = False
        y = m(x[0])  # unbatched view of the same layout
        assert_close(y, model.forward(base[:1])[0], err_msg=name)
        snap.assert_unchanged()


def test_broadcast_zero_stride_input(rng):
    plane = make_x(rng, (1, 1, 5, 6))
    x = np.broadcast_to(plane, (2, 3, 5, 6))
    w, b = make_affine(rng, 3)
    y = cin.instance_norm(x, weight=w, bias=b)
    assert_close(y, ref.forward(np.ascontiguousarray(x), w, b)[0])
    x2 = np.broadcast_to(make_x(rng, (2, 3, 1, 6)), (2, 3, 5, 6))
    assert_close(cin.instance_norm(x2), ref.forward(np.ascontiguousarray(x2))[0])


def test_channels_last_output_is_channels_last(rng):
    # the example from the spec: an NCHW view of an NHWC array gives an NHWC-dense output
    a = make_x(rng, (2, 5, 6, 3), np.float32)
    x = a.transpose(0, 3, 1, 2)
    y = cin.instance_norm(x)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert_close(y, ref.forward(x)[0])
    y3 = cin.InstanceNorm3d(3)(make_x(rng, (2, 3, 4, 5, 3), np.float32).transpose(0, 4, 1, 2, 3))
    assert y3.transpose(0, 2, 3, 4, 1).flags.c_contiguous


# ---------------------------------------------------------------- out=

@pytest.mark.parametrize("fn", ["instance_norm", "instance_norm_forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_layout", ["contiguous", "fortran", "sliced", "channels_last"])
def test_out_argument(rng, fn, dtype, out_layout):
    x = make_x(rng, (2, 3, 5, 6), dtype)
    w, b = make_affine(rng, 3, dtype)
    y_ref = ref.forward(x, w, b)[0]
    if out_layout == "sliced":
        big = np.full((2, 3, 11, 6), np.nan, dtype=dtype)
        out = big[:, :, 1::2]
    else:
        out = layouts(np.zeros(x.shape, dtype))[out_layout]
    snap = Snapshot(x)
    if fn == "instance_norm":
        y = cin.instance_norm(x, weight=w, bias=b, out=out)
    else:
        y = cin.instance_norm_forward(x, w, b, out=out)[0]
    assert y is out
    assert_close(out, y_ref)
    if out_layout == "sliced":
        assert np.all(np.isnan(big[:, :, 0::2]))  # nothing written outside the view
    snap.assert_unchanged()


@pytest.mark.parametrize("fn", ["instance_norm", "instance_norm_forward"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "fortran", "sliced",
                                    "negative"])
def test_out_is_input_in_place(rng, fn, dtype, layout):
    base = make_x(rng, (2, 3, 5, 6), dtype)
    w, b = (None, None) if dtype == np.float16 else make_affine(rng, 3, dtype)
    y_ref = ref.forward(base, w, b)[0]
    x = layouts(base)[layout]
    if fn == "instance_norm":
        y = cin.instance_norm(x, weight=w, bias=b, out=x)
    else:
        y, mean, rstd = cin.instance_norm_forward(x, w, b, out=x)
        assert_close(mean, ref.instance_stats(base)[0], dtype=np.float32)
    assert y is x
    assert x.dtype == dtype
    assert_close(x, y_ref)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_float16_in_float16_out(rng, dim):
    x = make_x(rng, SHAPES[dim], np.float16)
    snap = Snapshot(x)
    y_ref, mean_ref, rstd_ref = ref.forward(x)
    y = cin.instance_norm(x)
    assert y.dtype == np.float16 and y.shape == x.shape
    assert_close(y, y_ref)
    y2, mean, rstd = cin.instance_norm_forward(x)
    assert y2.dtype == np.float16
    assert mean.dtype == rstd.dtype == np.float32
    assert_close(mean, mean_ref, dtype=np.float32)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)
    dy = make_x(rng, x.shape, np.float16, spread=1.0)
    dx, _, _ = cin.instance_norm_backward(dy, x, mean, rstd)
    assert dx.dtype == np.float16
    assert_close(dx, ref.backward_instance_stats(dy, x, mean_ref, rstd_ref)[0], grad=True)
    out = np.empty_like(x)
    assert cin.instance_norm(x, out=out) is out
    assert_close(out, y_ref)
    snap.assert_unchanged()
    xt = layouts(x)["channels_last"]
    assert_close(cin.instance_norm(xt), y_ref)
