"""Calls from many Python threads at once, and calls nested in other parallel code
(issue #5, item 5).

- 8 Python threads calling at once get exactly (bit for bit) the results of serial calls, for
  the functional API and for modules (one module per thread; a shared module in eval mode).
- The kernels release the GIL: another Python thread runs while a long call is in a kernel.
- Nested parallelism: calls from a ThreadPoolExecutor with 8 workers, and from inside another
  OpenMP parallel region (a tiny C library compiled here, calling back into Python), neither
  deadlock nor oversubscribe: inside an OpenMP region the kernels run on one thread (nested
  regions are inactive), and in a thread pool n_threads, cin.set_num_threads and
  threadpoolctl (entered inside the worker) bound every call's team. These scenarios run in a
  subprocess with a timeout, so a deadlock fails the test instead of hanging the suite.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import cinstnorm as cin
from cinstnorm import _cpu

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cin.__file__)))
needs_openmp = pytest.mark.skipif(not _cpu.openmp_enabled(), reason="built without OpenMP")

# (N, C, *spatial) of the inputs: tiny, many planes, few large planes (split across threads),
# channels-last; big enough (>= 2 * 16384 elements) that the kernels use several threads
SHAPES = [(2, 3, 5, 7), (8, 16, 32, 32), (1, 2, 256, 300), (3, 4, 64, 64)]


def make_inputs(seed):
    rng = np.random.default_rng(seed)
    shape = SHAPES[seed % len(SHAPES)]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-5, 5)).astype(
        np.float32 if seed % 2 else np.float64)
    if seed % 4 == 3:  # channels-last memory
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal(shape).astype(x.dtype)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(x.dtype)
    b = rng.uniform(-1, 1, shape[1]).astype(x.dtype)
    return x, dy, w, b


def functional_work(seed, n_threads=2):
    """Every functional entry point once; returns all results."""
    x, dy, w, b = make_inputs(seed)
    rm, rv = np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
    y1 = cin.instance_norm(x, rm, rv, w, b, momentum=0.3, n_threads=n_threads)
    y2 = cin.instance_norm(x, rm, rv, w, b, use_input_stats=False, n_threads=n_threads)
    y3, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=n_threads)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=n_threads)
    dx2, _, _ = cin.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=False,
                                           n_threads=n_threads)
    return [y1, y2, rm, rv, y3, mean, rstd, dx, dw, db, dx2]


def module_work(seed, steps=4):
    """A module of its own trained for a few steps; returns outputs and final state."""
    x, dy, w, b = make_inputs(seed)
    m = cin.InstanceNorm2d(x.shape[1], affine=True, track_running_stats=True, dtype=x.dtype,
                           momentum=None)
    results = []
    for i in range(steps):
        results.append(m(x * (1 + i), n_threads=2))
        results.append(m.backward(dy, n_threads=2))
    m.eval()
    results.append(m(x, n_threads=2))
    return results + [m.running_mean, m.running_var, m.weight_grad, m.bias_grad,
                      np.array(m.num_batches_tracked)]


def assert_identical(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert np.array_equal(u, v, equal_nan=True), f"result {i} differs"


def run_threads(fn, args, n=8):
    """Run fn(*args[i]) in n threads started together; returns results in order."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def body(i):
        try:
            barrier.wait()
            results[i] = fn(*args[i])
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("rounds", [3])
def test_eight_threads_functional_match_serial(rounds):
    serial = [functional_work(seed) for seed in range(8)]
    for _ in range(rounds):
        concurrent = run_threads(functional_work, [(seed,) for seed in range(8)])
        for s, c in zip(serial, concurrent):
            assert_identical(c, s)


def test_eight_threads_own_modules_match_serial():
    serial = [module_work(seed) for seed in range(8)]
    concurrent = run_threads(module_work, [(seed,) for seed in range(8)])
    for s, c in zip(serial, concurrent):
        assert_identical(c, s)


def test_shared_module_in_eval_mode_from_eight_threads():
    # eval with running statistics only reads the module's state: outputs are per call
    rng = np.random.default_rng(5)
    m = cin.InstanceNorm2d(16, affine=True, track_running_stats=True)
    m.running_mean[...] = rng.normal(size=16)
    m.running_var[...] = rng.uniform(0.5, 2, 16)
    m.weight[...] = rng.uniform(0.5, 1.5, 16)
    m.eval()
    xs = [rng.standard_normal((4, 16, 32, 32)).astype(np.float32) for _ in range(8)]
    serial = [m(x) for x in xs]
    state = [a.copy() for a in (m.weight, m.bias, m.running_mean, m.running_var)]
    for _ in range(3):
        concurrent = run_threads(lambda x: m(x), [(x,) for x in xs])
        for s, c in zip(serial, concurrent):
            assert np.array_equal(s, c)
    for before, now in zip(state, (m.weight, m.bias, m.running_mean, m.running_var)):
        assert np.array_equal(before, now)


def test_modules_document_thread_safety():
    text = " ".join(filter(None, [cin.modules.__doc__, cin.InstanceNorm2d.__doc__,
                                  cin.InstanceNorm2d.forward.__doc__])).lower()
    assert "thread" in text


def test_kernels_release_the_gil():
    # a pure-Python counter makes progress while the main thread is inside long kernel calls;
    # were the GIL held there, it would only move in the calls' short Python parts
    x = np.random.default_rng(0).standard_normal((1, 1, 4096, 4096)).astype(np.float32)
    out = np.empty_like(x)
    cin.instance_norm(x, out=out, n_threads=1)  # warm-up (page faults of out)
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.02)
        start, before = time.perf_counter(), count[0]
        for _ in range(5):
            cin.instance_norm(x, out=out, n_threads=1)
        elapsed, progressed = time.perf_counter() - start, count[0] - before
    finally:
        stop.set()
        t.join()
    assert progressed > 50_000, (progressed, elapsed)


# ---- nested parallelism, in subprocesses with a timeout -------------------------------------

def run_python(code, timeout=120, env_update=None):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(env_update or {})
    prelude = textwrap.dedent("""
        import os, sys, threading
        import numpy as np
        import cinstnorm as cin
        from cinstnorm import _cpu
        from concurrent.futures import ThreadPoolExecutor
        X = np.random.default_rng(0).standard_normal((2, 4, 128, 128)).astype(np.float32)
        EXPECTED = cin.instance_norm(X, n_threads=1)
        def call(**kw):
            y = cin.instance_norm(X, **kw)
            assert np.allclose(y, EXPECTED, rtol=1e-5, atol=1e-5)
            return _cpu.threads_used_last_call()
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"deadlock: the scenario did not finish in {timeout} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_thread_pool_of_eight_default_threads_no_deadlock():
    out = run_python("""
        with ThreadPoolExecutor(8) as ex:
            teams = list(ex.map(lambda i: call(), range(64)))
        print(max(teams))
    """)
    assert 1 <= int(out.split()[-1]) <= CORES


@needs_openmp
def test_thread_pool_bounded_by_documented_controls():
    # each worker's calls run on one thread when asked: n_threads, set_num_threads, or
    # threadpoolctl entered inside the worker (OpenMP limits are per calling thread)
    out = run_python("""
        from threadpoolctl import threadpool_limits
        def limited(i):
            with threadpool_limits(limits=1, user_api="openmp"):
                return call()
        with ThreadPoolExecutor(8) as ex:
            explicit = set(ex.map(lambda i: call(n_threads=1), range(32)))
            in_worker = set(ex.map(limited, range(32)))
        cin.set_num_threads(1)
        with ThreadPoolExecutor(8) as ex:
            global_setting = set(ex.map(lambda i: call(), range(32)))
        print(explicit, in_worker, global_setting)
        assert explicit == in_worker == global_setting == {1}
    """)
    assert out.strip() == "{1} {1} {1}"


OMP_LIB = r"""
#include <omp.h>
typedef int (*callback_t)(int);
/* Runs cb(thread number) on every thread of an OpenMP team; returns the sum of the results. */
int run_in_parallel_region(callback_t cb, int n_threads)
{
    int total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+:total)
    total += cb(omp_get_thread_num());
    return total;
}
"""


@pytest.fixture(scope="module")
def omp_library(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the OpenMP test library")
    d = tmp_path_factory.mktemp("omplib")
    src, lib = d / "outer.c", d / "libouter.so"
    src.write_text(OMP_LIB)
    proc = subprocess.run([cc, "-O1", "-fPIC", "-shared", "-fopenmp", str(src), "-o", str(lib)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build an OpenMP library: {proc.stderr[-500:]}")
    return str(lib)


@needs_openmp
@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for an outer team of 2")
def test_calls_from_inside_an_openmp_region(omp_library):
    # the outer team runs a Python callback on each of its threads; each makes a cinstnorm
    # call (default threads) and records the team that the kernel really ran with
    out = run_python(f"""
        import ctypes
        lib = ctypes.CDLL({omp_library!r})
        CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
        teams, lock = [], threading.Lock()
        def body(tid):
            try:
                for _ in range(5):
                    team = call()
                    with lock:
                        teams.append(team)
                return 0
            except Exception as exc:
                print("error", exc, file=sys.stderr)
                return 1
        cb = CB(body)
        failures = lib.run_in_parallel_region(cb, 4)
        print(failures, max(teams), len(teams))
    """)
    failures, team, calls = map(int, out.split())
    assert failures == 0 and calls == 20
    # nested OpenMP regions are inactive by default: no oversubscription (4 x CORES threads)
    assert team == 1
