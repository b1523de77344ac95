"""Outputs a little ahead of an input in the low address bits (0 < (out - in) mod 4096 <= 256
bytes) take the elementwise loops from the end of each range (cin_store_ahead in
src/cinstnorm_kernels_impl.h, against 4K aliasing); the results must be bitwise those of an
output elsewhere, on every SIMD path, forward and backward, with and without an activation or
residual, small-plane batches, whole planes and chunked planes, odd lengths (scalar tails)."""

import numpy as np
import pytest

import cinstnorm as cin

SHAPES = [
    (4, 6, 8, 8),       # small-plane batches (64 elements)
    (2, 3, 5, 7),       # small planes, scalar tails only
    (2, 2, 40, 33),     # whole planes over one statistics block
    (1, 1, 300, 301),   # one plane, chunked across threads
]
# Bytes the output sits ahead of the input (mod 4096): inside the window, its edges, outside.
AHEAD = [16, 64, 128, 256, 4096 + 32, 1 << 20]
ACTS = [None, "relu", "leaky_relu", "silu", "gelu"]


class Arena:
    """Arrays carved from one page-aligned buffer at chosen byte offsets (so that their
    distances, not the allocator, decide which loop order the kernels take)."""

    def __init__(self, nbytes):
        self.raw = np.zeros(nbytes + 8192, np.uint8)
        self.base = (-self.raw.ctypes.data) % 4096

    def array(self, offset, like):
        a = self.raw[self.base + offset:self.base + offset + like.nbytes]
        return a.view(like.dtype).reshape(like.shape)


def _layout(x0, dy0, ahead):
    """x at 0, dy far away, and two outputs: `ahead` bytes past a whole number of pages
    beyond x's end, and one 2 KiB off that alignment (the ordinary order)."""
    n = x0.nbytes
    span = -(-n // 4096) * 4096 + 4096
    arena = Arena(4 * span + ahead + (2 << 20))
    x = arena.array(0, x0)
    dy = arena.array(span + 1024, dy0)
    x[...] = x0
    dy[...] = dy0
    far = arena.array(2 * span + ahead, x0)       # (far - x) mod 4096 == ahead mod 4096
    plain = arena.array(3 * span + ahead + 2048, x0)
    return x, dy, far, plain


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("ahead", AHEAD)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_ahead_of_input_same_bits(rng, simd, dtype, shape, ahead, act):
    x0 = rng.standard_normal(shape).astype(dtype) * 3 + 1
    dy0 = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
    b = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
    x, dy, far, plain = _layout(x0, dy0, ahead)
    assert (far.ctypes.data - x.ctypes.data) % 4096 == ahead % 4096
    _, mean, rstd = cin.instance_norm_forward(x, w, b, activation=act, n_threads=2, out=plain)
    cin.instance_norm_forward(x, w, b, activation=act, n_threads=2, out=far)
    np.testing.assert_array_equal(far, plain)
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    got = cin.instance_norm_backward(dy, x, mean, rstd, w, b, activation=act, n_threads=2,
                                     out=far)
    want = cin.instance_norm_backward(dy, x, mean, rstd, w, b, activation=act, n_threads=2,
                                      out=plain)
    np.testing.assert_array_equal(got[0], want[0])
    for g, h in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, h)
    np.testing.assert_array_equal(dy, dy0)


@pytest.mark.parametrize("ahead", [32, 2048])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_ahead_same_bits(rng, simd, dtype, ahead):
    shape = (2, 3, 17, 19)
    x0 = rng.standard_normal(shape).astype(dtype)
    r0 = rng.standard_normal(shape).astype(dtype)
    x, res, far, plain = _layout(x0, r0, ahead)
    cin.instance_norm_forward(x, residual=res, activation="relu", n_threads=2, out=plain)
    cin.instance_norm_forward(x, residual=res, activation="relu", n_threads=2, out=far)
    np.testing.assert_array_equal(far, plain)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_store_ahead_matches_reference(rng, simd, dtype):
    """The reversed order computes instance norm, not just the same bits as itself."""
    shape = (3, 4, 8, 8)
    x0 = rng.standard_normal(shape).astype(dtype)
    x, _, far, _ = _layout(x0, x0, 32)
    cin.instance_norm_forward(x, n_threads=2, out=far)
    x64 = x0.astype(np.float64)
    m = x64.mean(axis=(2, 3), keepdims=True)
    v = x64.var(axis=(2, 3), keepdims=True)
    want = (x64 - m) / np.sqrt(v + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(far, want, rtol=0, atol=tol)
