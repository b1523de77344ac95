"""instance_norm_backward(out=...): dx written into a given array, in place over dy or x too."""

import numpy as np
import pytest

import cinstnorm as cin

import reference as ref
from helpers import Snapshot, assert_close, make_affine, make_x


def _case(rng, dtype, shape=(2, 3, 9, 10)):
    x = make_x(rng, shape, dtype)
    dy = make_x(rng, shape, dtype)
    w, _ = make_affine(rng, shape[1], dtype)
    _, mean, rstd = cin.instance_norm_forward(x, w)
    want = ref.backward(dy, x, mean, rstd, w)
    return x, dy, w, mean, rstd, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", ["new", "dy", "x", "fortran", "misaligned-view"])
def test_backward_into_out(rng, dtype, target):
    x, dy, w, mean, rstd, (dx_ref, dw_ref, db_ref) = _case(rng, dtype)
    if target == "new":
        out = np.empty_like(x)
    elif target == "dy":
        out = dy
    elif target == "x":
        out = x
    elif target == "fortran":
        out = np.empty_like(x, order="F")
    else:
        out = np.empty((2, 3, 9, 11), dtype)[..., 1:]
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, out=out)
    assert dx is out
    assert_close(dx, dx_ref, grad=True)
    assert_close(dw, dw_ref, grad=True)
    assert_close(db, db_ref, grad=True)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 9, 9)), np.zeros((2, 3, 9, 10), np.float32)])
def test_backward_bad_out_raises_and_modifies_nothing(rng, bad):
    x, dy, w, mean, rstd, _ = _case(rng, np.float64)
    snap = Snapshot(x, dy, w, mean, rstd, bad)
    with pytest.raises(ValueError, match="out must have the input's shape"):
        cin.instance_norm_backward(dy, x, mean, rstd, w, out=bad)
    snap.assert_unchanged()


def test_backward_out_float16(rng):
    x, dy, w, mean, rstd, (dx_ref, _, _) = _case(rng, np.float32)
    x16, dy16 = x.astype(np.float16), dy.astype(np.float16)
    _, mean16, rstd16 = cin.instance_norm_forward(x16, w)
    out = np.empty_like(x16)
    dx, _, _ = cin.instance_norm_backward(dy16, x16, mean16, rstd16, w, out=out)
    assert dx is out and dx.dtype == np.float16
    assert_close(dx, ref.backward(dy16, x16, mean16, rstd16, w)[0], grad=True)
