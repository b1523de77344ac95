"""cinstnorm: instance normalization (torch.nn.InstanceNorm1d/2d/3d) on NumPy arrays.

Compiled Cython/OpenMP kernels with SIMD inner loops compute the forward and backward passes for
float32 and float64 (float16 is computed in float32); no torch needed.

>>> import numpy as np, cinstnorm as cin
>>> x = np.random.default_rng(0).normal(5, 10, (2, 3, 4, 4)).astype(np.float32)
>>> y = cin.InstanceNorm2d(3, affine=True)(x)
>>> bool(abs(y.mean()) < 1e-5)
True
"""
from __future__ import annotations

import os
import platform
import sys

try:
    from . import _cpu
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    from ._source_tree import missing_extension_error
    raise missing_extension_error(__path__[0], _exc) from None
from ._config import (available_cores, configure_kernels_from_env, get_num_threads,
                      set_num_threads)
from .functional import (adain, adain_backward, instance_norm, instance_norm_backward,
                         instance_norm_forward)
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, StateDictKeyError

__version__ = "0.1.0"

configure_kernels_from_env()

__all__ = [
    "instance_norm", "instance_norm_forward", "instance_norm_backward", "adain",
    "adain_backward",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "StateDictKeyError",
    "set_num_threads", "get_num_threads", "show_config", "config", "empty_output_cache",
    "__version__",
]


def empty_output_cache() -> None:
    """Free the result buffers cinstnorm keeps for reuse.

    The forward's y and the backward's dx, when at least 1 MiB, are allocated from a small
    cache of freed results (at most 4 buffers and ``config()["output_cache_bytes"]`` bytes:
    256 MiB, or an eighth of the machine's memory where that is less; the environment
    variable CINSTNORM_OUTPUT_CACHE_BYTES sets it at import, 0 turning the cache off).  A
    result of the size of a freed one takes its buffer back, pages already mapped, instead of
    a fresh mapping whose pages the OS zeroes at first touch (which doubled the time of a
    64 MiB float64 backward).  The arrays are ordinary NumPy arrays owning their data; only
    their buffers outlive them.  This call returns what the cache holds to the system.
    """
    _cpu.empty_output_cache()


def _openmp_runtime() -> str:
    """The OpenMP runtime library loaded into this process, as threadpoolctl sees it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (install threadpoolctl to see it)"
    libs = [f"{i.get('internal_api')} {i.get('version') or ''} ({i.get('filepath')})".strip()
            for i in threadpool_info() if i.get("user_api") == "openmp"]
    return "; ".join(libs) if libs else "none found"


def _gpu_status() -> str:
    from . import _gpu
    return _gpu.gpu_status()


def config() -> dict:
    """Build and runtime facts as a dict (what :func:`show_config` prints)."""
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "openmp": _cpu.openmp_enabled(),
        "openmp_version": _cpu.openmp_version(),
        "openmp_runtime": _openmp_runtime() if _cpu.openmp_enabled() else "none (serial build)",
        "threads_default": get_num_threads(),
        "cores_available": available_cores(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "simd_path": _cpu.simd_path(),
        "simd_supported": ", ".join(_cpu.simd_supported()),
        "stream_stores_above_bytes": _cpu.stream_min_bytes(),
        "output_cache_bytes": _cpu.output_cache_info()[2],
        "l2_bytes": _cpu.l2_bytes(),
        "llc_bytes": _cpu.llc_bytes(),
        "compiler_flags": _cpu.build_flags(),
        "bounds_checking": _cpu.bounds_checking(),
        "gpu": _gpu_status(),
    }


def show_config() -> None:
    """Print version, OpenMP (on/off, runtime), threads, SIMD path and compiler flags.

    Examples
    --------
    >>> import cinstnorm as cin
    >>> cin.show_config()  # doctest: +SKIP
    cinstnorm 0.1.0
    ...
    """
    cfg = config()
    print(f"cinstnorm {cfg.pop('version')}")
    if not cfg["openmp"]:
        print("WARNING: built without OpenMP: every kernel runs on one thread")
    width = max(len(k) for k in cfg)
    for k, v in cfg.items():
        print(f"  {k:<{width}}  {v}")
