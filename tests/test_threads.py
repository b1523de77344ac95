"""Thread control, proved with the kernel's own probe of how many OpenMP threads ran.

cinstnorm._cpu.threads_used_last_call() reports the threads that ran in the parallel region of
the most recent kernel call. Global settings (set_num_threads, OMP_NUM_THREADS) are tested in
subprocesses so that nothing leaks into the other tests.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cinstnorm as cin
import reference as ref
from helpers import assert_close, make_affine, make_x
from cinstnorm import _cpu

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

needs_openmp = pytest.mark.skipif(not _cpu.openmp_enabled(), reason="built without OpenMP")
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="needs at least 2 cores")


def _big(rng, shape=(4, 8, 64, 64)):
    return make_x(rng, shape, np.float32)


def _calls(x):
    """One call of each kernel entry point; yields its name after the call."""
    w = np.ones(x.shape[1], np.float32)
    dy = np.ones_like(x)

    def run(n_threads):
        cin.instance_norm(x, weight=w, n_threads=n_threads)
        yield "instance_norm"
        rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
        cin.instance_norm(x, rm, rv, use_input_stats=False, n_threads=n_threads)
        yield "instance_norm eval"
        _, mean, rstd = cin.instance_norm_forward(x, w, n_threads=n_threads)
        yield "instance_norm_forward"
        cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=n_threads)
        yield "instance_norm_backward"
        cin.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=False,
                                   n_threads=n_threads)
        yield "instance_norm_backward fixed"
    return run


def test_probe_without_openmp_reports_one(rng):
    if _cpu.openmp_enabled():
        pytest.skip("built with OpenMP")
    cin.instance_norm(_big(rng), n_threads=2)
    assert _cpu.threads_used_last_call() == 1


@needs_openmp
@pytest.mark.parametrize("n_threads", [1, 2])
def test_explicit_n_threads(rng, n_threads):
    for name in _calls(_big(rng))(n_threads):
        assert _cpu.threads_used_last_call() == n_threads, name


@needs_openmp
@pytest.mark.parametrize("shape", [(1, 1, 2048, 2048), (1, 1, 64, 128, 128), (1, 3, 300000)])
def test_few_planes_use_every_thread(rng, shape):
    # fewer planes than threads: the planes are split so that both threads work (docs/design.md)
    x = make_x(rng, shape, np.float32)
    for name in _calls(x)(2):
        assert _cpu.threads_used_last_call() == 2, name


@needs_openmp
@pytest.mark.parametrize("cores", [1, 2, 4])
def test_negative_n_threads(rng, monkeypatch, cores):
    # the core count is pinned (not the host's): -1 = all cores, -cores = 1, fewer is an error
    from cinstnorm import _config
    monkeypatch.setattr(_config, "available_cores", lambda: cores)
    x = _big(rng)
    cin.instance_norm(x, n_threads=-1)
    assert _cpu.threads_used_last_call() == cores
    cin.instance_norm(x, n_threads=-cores)
    assert _cpu.threads_used_last_call() == 1
    with pytest.raises(ValueError, match=f"fewer than one thread \\({cores} cores"):
        cin.instance_norm(x, n_threads=-cores - 1)


@needs_openmp
def test_threadpool_limits_limits_the_default(rng):
    x = _big(rng)
    with threadpool_limits(limits=1, user_api="openmp"):
        for name in _calls(x)(None):
            assert _cpu.threads_used_last_call() == 1, name
        m = cin.InstanceNorm2d(8, affine=True, track_running_stats=True)
        m(x)
        assert _cpu.threads_used_last_call() == 1
        m.backward(np.ones_like(x))
        assert _cpu.threads_used_last_call() == 1
        # an explicit n_threads is not a default: it is obeyed
        cin.instance_norm(x, n_threads=2)
        assert _cpu.threads_used_last_call() == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_results_under_threadpool_limits(rng, threads):
    x = make_x(rng, (2, 3, 200, 300), np.float32)
    w, b = make_affine(rng, 3, np.float32)
    with threadpool_limits(limits=threads, user_api="openmp"):
        y = cin.instance_norm(x, weight=w, bias=b)
    assert_close(y, ref.forward(x, w, b)[0])


def _run_python(code, env_update=None, drop=("OMP_NUM_THREADS",), prelude_first=""):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(cin.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    env.update(env_update or {})
    prelude = textwrap.dedent("""
        import os
        import numpy as np
        import cinstnorm as cin
        from cinstnorm import _cpu
        from threadpoolctl import threadpool_limits
        CORES = len(os.sched_getaffinity(0))
        x = np.random.default_rng(0).standard_normal((4, 8, 64, 64)).astype(np.float32)
        def used(**kw):
            cin.instance_norm(x, **kw)
            return _cpu.threads_used_last_call()
    """)
    proc = subprocess.run([sys.executable, "-c", prelude_first + prelude + textwrap.dedent(code)],
                          env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_openmp
@needs_two_cores
def test_default_is_all_cores_and_threadpoolctl_limits_it():
    _run_python("""
        assert cin.get_num_threads() == CORES, cin.get_num_threads()
        assert used() == CORES, used()
        with threadpool_limits(limits=1, user_api="openmp"):
            assert used() == 1
        assert used() == CORES
    """)


@needs_openmp
def test_default_follows_the_affinity_mask():
    # the process may use one core (pinned, whatever the host has): the default is 1 thread
    _run_python("""
        assert CORES == 1 and cin.get_num_threads() == 1, (CORES, cin.get_num_threads())
        assert used() == 1
        assert used(n_threads=2) == 2
    """, prelude_first="import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})")


@needs_openmp
@needs_two_cores
def test_omp_num_threads_environment():
    _run_python("""
        assert cin.get_num_threads() == 1, cin.get_num_threads()
        assert used() == 1
        assert used(n_threads=2) == 2
    """, env_update={"OMP_NUM_THREADS": "1"})


@needs_openmp
@needs_two_cores
def test_set_num_threads_overrides_default_and_threadpoolctl():
    _run_python("""
        cin.set_num_threads(1)
        assert cin.get_num_threads() == 1
        assert used() == 1
        assert used(n_threads=2) == 2   # an explicit argument wins
        cin.set_num_threads(2)
        assert cin.get_num_threads() == 2
        with threadpool_limits(limits=1, user_api="openmp"):
            assert used() == 2          # set_num_threads is not overridden by threadpoolctl
    """)


def test_set_num_threads_zero_is_rejected_and_changes_nothing():
    _run_python("""
        before = cin.get_num_threads()
        try:
            cin.set_num_threads(0)
        except ValueError:
            pass
        else:
            raise AssertionError("set_num_threads(0) did not raise ValueError")
        assert cin.get_num_threads() == before
    """)


def test_get_num_threads_is_positive():
    n = cin.get_num_threads()
    assert isinstance(n, int) and n >= 1


def test_show_config(capsys):
    result = cin.show_config()
    text = (result or "") + capsys.readouterr().out
    assert text.strip()
    assert "openmp" in text.lower()
