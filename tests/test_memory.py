"""Resident memory stays flat over many calls, failing ones included (issue #5, item 4).

RSS is read from /proc/self/statm. After a warm-up (NumPy's and malloc's caches, OpenMP thread
pools), 100,000 small calls of every entry point may grow it by at most a few MiB: a leak of
even 64 bytes per call would show. Failing calls are made with large arguments, so that a
buffer leaked on an error path (a working copy, an output) would add megabytes per call.
"""

import gc
import os

import numpy as np
import pytest

import cinstnorm as cin



def _sanitizer_loaded():
    """AddressSanitizer keeps freed memory in quarantine: RSS is no measure of leaks there."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                       reason="needs /proc/self/statm (Linux)"),
    pytest.mark.skipif(_sanitizer_loaded(), reason="RSS under AddressSanitizer's quarantine"),
]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MiB = 1024 * 1024


def rss_bytes():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def small_call_mix(rng):
    """A function that makes 10 small calls of every kind per invocation."""
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    x16 = x.astype(np.float16)
    xt = np.asfortranarray(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.empty_like(x)
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    m_eval = cin.InstanceNorm2d(3, affine=True, track_running_stats=True).eval()

    def ten_calls():
        cin.instance_norm(x, rm, rv, w, b, momentum=0.1)
        cin.instance_norm(xt, rm, rv, use_input_stats=False)
        cin.instance_norm(x16, out=None)
        y, mean, rstd = cin.instance_norm_forward(x, w, b, out=out)
        cin.instance_norm_backward(dy, x, mean, rstd, w)
        cin.instance_norm_backward(dy, xt, mean, rstd, None, use_input_stats=False)
        m(x)
        m.backward(dy)
        m_eval(x[0])
        m.state_dict()
    return ten_calls


def failing_call_mix(rng):
    """10 failing calls per invocation, every one with ~1 MiB arguments."""
    x = rng.standard_normal((4, 8, 64, 128)).astype(np.float32)  # 1 MiB
    xt = np.asfortranarray(x)
    dy = np.ones_like(x)
    mean = np.zeros((4, 8), np.float32)
    rstd = np.ones((4, 8), np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    m = cin.InstanceNorm2d(8, affine=True, track_running_stats=True)
    m(x)
    bad_state = {"weight": np.ones(8), "bias": np.ones(8), "running_mean": np.ones(8),
                 "running_var": np.ones(9)}
    calls = [
        lambda: cin.instance_norm(xt, out=np.empty((4, 8, 64, 127), np.float32)),
        lambda: cin.instance_norm(xt, out=ro),
        lambda: cin.instance_norm(xt, weight=np.ones(9)),
        lambda: cin.instance_norm(xt, np.zeros(8, np.float32), None),
        lambda: cin.instance_norm(xt.astype(np.complex64)),
        lambda: cin.instance_norm_backward(dy, xt, mean[:, :7], rstd),
        lambda: cin.instance_norm_backward(dy[..., :-1], xt, mean, rstd),
        lambda: m(x[:, :7]),
        lambda: m.backward(dy.astype(np.float64)),
        lambda: m.load_state_dict(bad_state),
    ]

    def ten_calls():
        for call in calls:
            try:
                call()
            except (TypeError, ValueError, KeyError, RuntimeError):
                pass
            else:
                raise AssertionError("a failing call did not fail")
    return ten_calls


def growth(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    before = rss_bytes()
    for _ in range(repeats):
        fn()
    return rss_bytes() - before


def test_rss_flat_over_100000_small_calls(rng):
    grew = growth(small_call_mix(rng), repeats=10_000, warmup=300)  # 100,000 calls
    print(f"RSS growth over 100,000 small calls: {grew / MiB:.2f} MiB")
    assert grew < 4 * MiB, f"RSS grew {grew / MiB:.1f} MiB over 100,000 small calls"


def test_rss_flat_over_failing_calls(rng):
    grew = growth(failing_call_mix(rng), repeats=300, warmup=20)  # 3,000 failing calls
    print(f"RSS growth over 3,000 failing calls with 1 MiB arguments: {grew / MiB:.2f} MiB")
    assert grew < 8 * MiB, f"RSS grew {grew / MiB:.1f} MiB over 3,000 failing calls"


def test_no_numpy_buffers_left_behind_by_failing_calls(rng):
    # tracemalloc sees every NumPy data buffer: none may survive a failing call
    import tracemalloc
    fn = failing_call_mix(rng)
    fn()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            fn()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    numpy_domain = tracemalloc.DomainFilter(True, 389047)  # NumPy's tracemalloc domain
    diff = after.filter_traces([numpy_domain]).compare_to(
        before.filter_traces([numpy_domain]), "filename")
    leaked = sum(d.size_diff for d in diff if d.size_diff > 0)
    assert leaked < 256 * 1024, [str(d) for d in diff[:5]]


def test_no_reference_leaks_in_failing_calls(rng):
    # objects kept alive by an exception path (tracebacks, frames, arrays) would pile up
    fn = failing_call_mix(rng)
    fn()
    gc.collect()
    counts = len(gc.get_objects())
    for _ in range(50):
        fn()
    gc.collect()
    assert len(gc.get_objects()) - counts < 500
