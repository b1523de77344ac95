"""The output cache (src/cin_pool.h): freed results of 1 MiB or more are kept, within a limit
of bytes and 4 buffers, for the next result of the same size; the arrays are ordinary arrays
owning their data, with the same values as without the cache."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import cinstnorm as cin
from cinstnorm import _config, _cpu

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name

MIB = 1 << 20
SHAPE = (2, 4, 256, 256)  # 4 MiB in float64, 2 MiB in float32: both cached


@pytest.fixture
def cache():
    """A cache of 64 MiB, empty; the limit in force before is restored afterwards."""
    before = _cpu.output_cache_info()[2]
    cin.empty_output_cache()
    _cpu.set_output_cache_bytes(64 * MIB)
    yield
    cin.empty_output_cache()
    _cpu.set_output_cache_bytes(before)


def kept():
    count, nbytes, _, _ = _cpu.output_cache_info()
    return count, nbytes


def test_freed_result_is_taken_back(rng, cache):
    x = rng.standard_normal(SHAPE)
    y, _, _ = cin.instance_norm_forward(x)
    address = y.ctypes.data
    assert kept() == (0, 0)
    del y
    assert kept() == (1, x.nbytes)
    y, mean, rstd = cin.instance_norm_forward(x)
    assert y.ctypes.data == address and kept() == (0, 0)
    # the backward's dx is a result of the same size: it takes the forward's freed y
    del y
    dx, _, _ = cin.instance_norm_backward(np.ones_like(x), x, mean, rstd)
    assert dx.ctypes.data == address


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cached_arrays_are_ordinary_and_values_unchanged(rng, cache, dtype):
    x = rng.standard_normal(SHAPE).astype(dtype)
    dy = rng.standard_normal(SHAPE).astype(dtype)
    w = rng.uniform(0.5, 1.5, SHAPE[1]).astype(dtype)
    _cpu.set_output_cache_bytes(0)
    want_y, mean, rstd = cin.instance_norm_forward(x, w)
    want_dx = cin.instance_norm_backward(dy, x, mean, rstd, w)[0]
    _cpu.set_output_cache_bytes(64 * MIB)
    for _ in range(3):  # fresh, then taken back from the cache
        y = cin.instance_norm_forward(x, w)[0]
        dx = cin.instance_norm_backward(dy, x, mean, rstd, w)[0]
        for got, want in ((y, want_y), (dx, want_dx)):
            assert np.array_equal(got, want) and got.dtype == dtype
            assert got.flags.owndata and got.base is None
            assert got.flags.c_contiguous and got.flags.writeable and got.flags.aligned
            assert get_handler_name(got) == "cinstnorm_output_cache"
        del y, dx


def test_small_results_and_out_are_not_cached(rng, cache):
    x = rng.standard_normal((2, 3, 8, 8))
    y, _, _ = cin.instance_norm_forward(x)
    assert get_handler_name(y) != "cinstnorm_output_cache"  # under 1 MiB: a plain array
    del y
    assert kept() == (0, 0)
    edge = rng.standard_normal((1, 1, 1, MIB // 8))  # exactly 1 MiB: the cache's
    y = cin.instance_norm_forward(edge)[0]
    assert get_handler_name(y) == "cinstnorm_output_cache"
    del y
    assert kept() == (1, MIB)
    cin.empty_output_cache()
    big = rng.standard_normal(SHAPE)
    out = np.empty_like(big)
    cin.instance_norm_forward(big, out=out)
    del out
    assert kept() == (0, 0)  # the caller's own array is not the cache's


def test_limits_drop_the_oldest(rng, cache):
    _cpu.set_output_cache_bytes(5 * MIB)
    x = rng.standard_normal((1, 2, 256, 256))  # 1 MiB
    ys = [cin.instance_norm_forward(x)[0] for _ in range(7)]
    addresses = [y.ctypes.data for y in ys]
    while ys:  # freed first to last
        ys.pop(0)
    count, nbytes = kept()
    assert count == 4 and nbytes == 4 * MIB  # 4 buffers at most
    # the most recently freed comes back first
    again = [cin.instance_norm_forward(x)[0] for _ in range(4)]
    assert [a.ctypes.data for a in again] == addresses[3:][::-1]
    while again:
        again.pop(0)
    y3 = cin.instance_norm_forward(rng.standard_normal((3, 2, 256, 256)))[0]
    del y3  # 3 MiB more: the two oldest 1 MiB buffers must go
    count, nbytes = kept()
    assert nbytes <= 5 * MIB and (count, nbytes) == (3, 5 * MIB)
    big = cin.instance_norm_forward(rng.standard_normal((3, 2, 512, 512)))[0]  # 12 MiB
    del big  # over the whole limit: freed, the rest kept
    assert kept() == (3, 5 * MIB)


def test_limit_zero_frees_and_disables(rng, cache):
    x = rng.standard_normal(SHAPE)
    y = cin.instance_norm_forward(x)[0]
    del y
    assert kept() == (1, x.nbytes)
    assert _cpu.set_output_cache_bytes(0) == 0
    assert kept() == (0, 0)
    y = cin.instance_norm_forward(x)[0]
    assert get_handler_name(y) != "cinstnorm_output_cache"
    del y
    assert kept() == (0, 0)


def test_empty_output_cache(rng, cache):
    x = rng.standard_normal(SHAPE)
    ys = [cin.instance_norm_forward(x)[0] for _ in range(2)]
    del ys
    assert kept() == (2, 2 * x.nbytes)
    cin.empty_output_cache()
    assert kept() == (0, 0)
    assert _cpu.output_cache_info()[2] == 64 * MIB  # the limit stays


def test_resized_result_is_freed_at_its_new_size(rng, cache):
    x = rng.standard_normal(SHAPE)
    y = cin.instance_norm_forward(x)[0]
    y.resize((2 * x.size,), refcheck=False)  # NumPy reallocates through the handler
    y[:] = 1.0
    del y
    assert kept() == (1, 2 * x.nbytes)


@pytest.mark.parametrize("shape", [(1, 2, 256, 256), (2, 4, 256, 256), (4, 4, 256, 256)])
def test_results_sit_half_a_page_in(rng, cache, shape):
    # 2 KiB into a page (numpy's large arrays start 16 bytes in: a result at another offset
    # has no store 4 KiB from the same element's input loads), from 4 MiB on in a 2 MiB-aligned
    # block (huge pages for all of it); a resize keeps the values and the placement
    x = rng.standard_normal(shape)
    y = cin.instance_norm_forward(x)[0]
    assert y.ctypes.data % 4096 == 2048 and y.ctypes.data % 64 == 0
    if y.nbytes >= 4 * MIB:
        assert (y.ctypes.data - 2048) % (2 * MIB) == 0
    want = y.copy()
    y.resize((3 * x.size,), refcheck=False)
    assert y.ctypes.data % 4096 == 2048
    assert np.array_equal(y[:x.size], want.ravel())
    y.resize((x.size // 2,), refcheck=False)
    assert np.array_equal(y, want.ravel()[:x.size // 2])


def test_threads_share_the_cache(rng, cache):
    x = rng.standard_normal(SHAPE)
    dy = rng.standard_normal(SHAPE)
    want_y, mean, rstd = cin.instance_norm_forward(x, n_threads=1)
    want_dx = cin.instance_norm_backward(dy, x, mean, rstd, n_threads=1)[0]
    errors = []

    def work():
        try:
            for _ in range(20):
                y = cin.instance_norm_forward(x, n_threads=1)[0]
                dx = cin.instance_norm_backward(dy, x, mean, rstd, n_threads=1)[0]
                assert np.array_equal(y, want_y) and np.array_equal(dx, want_dx)
                del y, dx
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    count, nbytes = kept()
    assert count <= 4 and nbytes <= 64 * MIB


def test_default_limit_is_pinned():
    assert _config.default_output_cache_bytes(0) == 0
    assert _config.default_output_cache_bytes(1 << 30) == 128 * MIB
    assert _config.default_output_cache_bytes(24 << 30) == 256 * MIB


@pytest.mark.parametrize("value, want", [("0", 0), ("12345678", 12345678), ("lots", None),
                                         ("-5", None)])
def test_environment_sets_the_limit(value, want):
    code = ("import warnings, cinstnorm as cin, cinstnorm._config as c\n"
            "print(cin.config()['output_cache_bytes'], "
            "c.default_output_cache_bytes(c.physical_memory_bytes()))")
    env = dict(os.environ, CINSTNORM_OUTPUT_CACHE_BYTES=value)
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    got, default = map(int, run.stdout.split())
    if want is None:
        assert got == default and "CINSTNORM_OUTPUT_CACHE_BYTES" in run.stderr
    else:
        assert got == want and "CINSTNORM_OUTPUT_CACHE_BYTES" not in run.stderr
