"""Sizes beyond 32-bit indexing (issue #5, item 6).

The kernels index with Py_ssize_t / ptrdiff_t throughout (src/*.h, cinstnorm/_cpu.pyx); these
tests make that visible. Values follow a period-8 pattern whose statistics are exact, so the
expected results are known in closed form and are checked block by block, without float64
copies of arrays of many GiB.

- CI: a float32 array of more than 2 GiB (byte offsets past 2**31), in place.
- slow (``-m slow``): a single plane of 2**31 + 1024 elements: forward with running statistics
  on a zero-stride broadcast (32 bytes of data; the kernels get a real 8 GiB working copy, and
  the output is another 8 GiB), backward with a broadcast gradient written over a real x
  (out=x), about 16 GiB at the peak; and a real 8 GiB array of 2**21 + 1 planes with
  per-sample weights, in place.
"""

import numpy as np
import pytest

import cinstnorm as cin

PATTERN = np.arange(8, dtype=np.float64) - 3.5  # mean 0, biased variance 5.25, exact in float32
PATTERN_VAR = 5.25
GiB = 1024 ** 3


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def needs_memory(gib):
    return pytest.mark.skipif(available_bytes() < gib * GiB,
                              reason=f"needs {gib} GiB of free memory")


def max_abs_error_rows(a, expected_row, block_rows=1 << 22):
    """max |a - expected_row| over an (R, 8) array, block by block (no full-size temporary)."""
    worst = 0.0
    for r0 in range(0, a.shape[0], block_rows):
        block = a[r0:r0 + block_rows].astype(np.float64)
        worst = max(worst, float(np.abs(block - expected_row).max()))
    return worst


def test_more_than_2_gib_in_place():
    # 2 planes of 2**28 + 64 float32: 2 GiB + 512 bytes, offsets past 2**31 bytes
    L = 2 ** 28 + 64
    x = np.empty((1, 2, L), np.float32)
    rows = x.reshape(2, L // 8, 8)
    rows[0] = PATTERN * 2 + 7          # exact in float32
    rows[1] = PATTERN * 0.5 - 3
    y, mean, rstd = cin.instance_norm_forward(x, eps=0.0, out=x)
    assert y is x
    np.testing.assert_allclose(mean[0], [7, -3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rstd[0], [1 / (2 * np.sqrt(PATTERN_VAR)),
                                         1 / (0.5 * np.sqrt(PATTERN_VAR))], rtol=1e-6)
    expected = PATTERN / np.sqrt(PATTERN_VAR)
    for c in range(2):
        assert max_abs_error_rows(rows[c], expected) < 2e-6


def test_zero_size_with_huge_logical_dimensions():
    # shape arithmetic in Python ints: no overflow, no allocation for nothing
    for shape in [(2 ** 40, 0, 2 ** 20), (0, 3, 2 ** 45), (2 ** 30, 0, 0, 2 ** 30)]:
        x = np.empty(shape, np.float32)
        y = cin.instance_norm(x)
        assert y.shape == shape and y.dtype == np.float32
    m = cin.InstanceNorm1d(3, affine=True, track_running_stats=True)
    assert m(np.empty((0, 3, 2 ** 40), np.float32)).shape == (0, 3, 2 ** 40)
    assert m.num_batches_tracked == 0 and np.all(m.running_var == 1)


def test_zero_size_spatial_with_huge_plane_count():
    # no per-plane statistics are allocated for an empty input, whatever N*C is
    x = np.empty((2, 2 ** 40, 0), np.float32)
    assert cin.instance_norm(x).shape == x.shape
    y, mean, rstd = cin.instance_norm_forward(x)
    assert y.shape == x.shape and mean.shape == (2, 2 ** 40) and np.isnan(mean[0, 0])
    m = cin.InstanceNorm1d(2 ** 40, track_running_stats=False)
    assert m(x).shape == x.shape


@pytest.mark.slow
@needs_memory(17)
def test_single_plane_of_more_than_2_31_elements():
    rows = 2 ** 28 + 128                    # (rows, 8): 2**31 + 1024 elements in one plane
    L = rows * 8
    assert L > 2 ** 31
    x = np.broadcast_to((PATTERN + 100).astype(np.float32), (1, 1, rows, 8))  # 32 bytes real
    rm, rv = np.zeros(1), np.ones(1)
    y = cin.instance_norm(x, rm, rv, eps=0.0, momentum=0.1)
    assert y.shape == x.shape and y.dtype == np.float32
    assert max_abs_error_rows(y.reshape(rows, 8), PATTERN / np.sqrt(PATTERN_VAR)) < 2e-5
    del y
    np.testing.assert_allclose(rm, [10.0], rtol=1e-9)
    np.testing.assert_allclose(rv, [0.9 + 0.1 * PATTERN_VAR * L / (L - 1)], rtol=1e-9)
    # backward through the instance statistics with a broadcast (period-8) gradient, dx
    # written over a real x (out=x): x, the working copy of dy, nothing else (16 GiB)
    x = np.empty((1, 1, rows, 8), np.float32)
    x[...] = PATTERN + 100
    g = np.array([1, -2, 0.5, 3, -1, 2, 0, 1.5])  # sum(g * xhat) = 7 / sqrt(5.25)
    dy = np.broadcast_to(g.astype(np.float32), x.shape)
    rstd = 1 / np.sqrt(PATTERN_VAR)
    w = np.array([1.5])
    dx, dw, db = cin.instance_norm_backward(dy, x, np.array([[100.0]]), np.array([[rstd]]), w,
                                            out=x)
    assert dx is x
    xhat = PATTERN * rstd
    expected_dx = w[0] * rstd * (g - g.mean() - xhat * (g * xhat).mean())
    assert max_abs_error_rows(dx.reshape(rows, 8), expected_dx) < 2e-5
    np.testing.assert_allclose(dw, [rows * (g * xhat).sum()], rtol=1e-5)
    np.testing.assert_allclose(db, [rows * g.sum()], rtol=1e-5)


@pytest.mark.slow
@needs_memory(9)
def test_many_planes_beyond_2_31_elements_in_place():
    P, L = 2 ** 21 + 1, 1024                # 2**31 + 1024 elements, plane offsets past 2**31
    x = np.empty((P, 1, L), np.float32)
    planes = np.arange(P)
    scale = 2.0 ** (planes % 3)
    offset = (planes % 7).astype(np.float64)
    weight = (1 + planes % 5).astype(np.float64).reshape(P, 1)  # per sample: p-th value read
    x4 = x.reshape(P, L // 8, 8)
    block = 1 << 16
    for p0 in range(0, P, block):
        sl = slice(p0, p0 + block)
        x4[sl] = PATTERN * scale[sl, None, None] + offset[sl, None, None]
    y, mean, rstd = cin.instance_norm_forward(x, weight, eps=0.0, out=x)
    assert y is x
    np.testing.assert_allclose(mean[:, 0], offset, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rstd[:, 0], 1 / (scale * np.sqrt(PATTERN_VAR)), rtol=1e-6)
    unit = PATTERN / np.sqrt(PATTERN_VAR)
    worst = 0.0
    for p0 in range(0, P, block):
        sl = slice(p0, p0 + block)
        got = x4[sl].astype(np.float64)
        worst = max(worst, float(np.abs(got - unit * weight[sl, :, None]).max()))
    assert worst < 1e-5
