"""Shapes, parameter grids and input data shared by every benchmark class.

The shapes are the benchmark table of docs/design.md. They are written out here, not imported from
``cinstnorm._bench``, so that the suite measures the same thing at every commit asv checks out.

asv re-runs ``setup`` before every sample, so the inputs are memoised per process: each
benchmark process (one per parameter combination) makes its arrays once, from fixed seeds.
Benchmarks must treat the returned arrays as read-only.
"""
import functools
import os

import numpy as np

SHAPES = {
    "small-planes": (32, 64, 32, 32),
    "style": (8, 128, 64, 64),
    "few-big": (1, 3, 1024, 1024),
    "dram": (16, 64, 128, 128),
    "tiny": (64, 256, 8, 8),
    "one-plane": (1, 1, 2048, 2048),
    "volume": (2, 32, 32, 64, 64),
}
DTYPES = ["float32", "float64"]
EPS = 1e-5


def available_cores():
    """Number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_counts():
    """1, 2 and all cores, without duplicates or more threads than cores."""
    cores = available_cores()
    return sorted({1, min(2, cores), cores})


class ShapeDtype:
    """Benchmark grid over the docs/design.md shapes and both float dtypes.

    asv re-runs ``setup`` before each sample and (with ``setup``) times one call per sample;
    ``repeat`` keeps each parameter combination to a few seconds.
    """

    params = [list(SHAPES), DTYPES]
    param_names = ["shape", "dtype"]
    timeout = 180
    repeat = (3, 10, 2.0)


class ShapeDtypeThreads(ShapeDtype):
    """The same grid, times the thread counts 1, 2 and all cores."""

    params = ShapeDtype.params + [thread_counts()]
    param_names = ShapeDtype.param_names + ["n_threads"]


@functools.lru_cache(maxsize=2)
def random_input(shape_name, dtype):
    """Standard-normal input of a named shape (seed 0)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal(SHAPES[shape_name], dtype=dtype)


@functools.lru_cache(maxsize=2)
def affine_parameters(shape_name, dtype):
    """(weight, bias) of length C, near (1, 0) as after a little training (seed 2)."""
    rng = np.random.default_rng(2)
    channels = SHAPES[shape_name][1]
    weight = (1.0 + 0.1 * rng.standard_normal(channels)).astype(dtype)
    bias = (0.1 * rng.standard_normal(channels)).astype(dtype)
    return weight, bias


@functools.lru_cache(maxsize=2)
def backward_inputs(shape_name, dtype):
    """(x, dy, mean, rstd): the input, an upstream gradient (seed 1) and x's saved statistics.

    The forward that yields the statistics writes into dy's buffer before dy is filled, so no
    third full-size array is ever allocated (this keeps peak-memory benchmarks honest).
    """
    import cinstnorm as cin

    x = random_input(shape_name, dtype)
    weight, bias = affine_parameters(shape_name, dtype)
    dy = np.empty_like(x)
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, eps=EPS, out=dy)
    np.random.default_rng(1).standard_normal(out=dy, dtype=dtype)
    return x, dy, mean, rstd


def touched_empty_like(x):
    """An output array whose pages are already mapped, so timings exclude page faults."""
    out = np.empty_like(x)
    out.fill(0)
    return out


def module_class(shape_name):
    """cinstnorm's InstanceNorm1d/2d/3d class that takes inputs of this shape."""
    import cinstnorm as cin

    spatial_dims = len(SHAPES[shape_name]) - 2
    return {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}[spatial_dims]


_WARMED = set()


def warm_up_once(key, fn):
    """Call ``fn`` the first time ``key`` is seen in this process.

    A process's first call pays one-off costs (thread-pool start, torch's lazy initialisation
    and autograd engine, up to ~1 s) that ``--quick`` runs, which time a single call, would
    otherwise report as the benchmark's time.
    """
    if key not in _WARMED:
        fn()
        _WARMED.add(key)


def import_torch():
    """torch, or NotImplementedError (asv's "skip this benchmark") when it is not installed."""
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch
