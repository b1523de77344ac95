"""Thread-count settings shared by every kernel call."""
from __future__ import annotations

import operator
import os
import warnings
from typing import Optional

from . import _cpu

_user_threads: Optional[int] = None

DEFAULT_LLC_BYTES = 32 * 1024 * 1024
DEFAULT_L2_BYTES = 512 * 1024
# The share of the last-level cache one core can count on for the output of a call: a VM sees
# the whole socket's L3 (105 MiB on a 2-core Xeon VM) but shares it with the other tenants'
# cores.  Measured on that VM (2 threads, forward with out= on the bench shapes, and the same
# followed by a forward that reads y): streaming stores cost 1.2x (1.36x with the reader) at a
# 4 MiB output, are even at 8 to 12 MiB (1.0 to 1.1x with the reader) and save 0.8x (0.75 to
# 0.9x with the reader) from 16 MiB on, far below the 105 MiB.
STREAM_BYTES_PER_CORE = 4 * 1024 * 1024
# Freed results (forward y, backward dx, 1 MiB or more) kept for the next call of the same
# size, at most this many bytes (src/cin_pool.h; CINSTNORM_OUTPUT_CACHE_BYTES, 0 for none): a
# fresh buffer's pages are zeroed by the kernel at first touch, which doubled the time of a
# 64 MiB float64 backward on the Xeon VM.  256 MiB holds the y and dx of a 128 MiB input.
OUTPUT_CACHE_BYTES = 256 * 1024 * 1024


SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"


def _cache_bytes(sysconf_names, sysfs_levels, sysfs=None) -> int:
    """A cache's size from sysconf, else from sysfs (cpu0's data or unified cache of that
    level, under ``sysfs``, default SYSFS_CACHE), else 0."""
    for name in sysconf_names:
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            size = 0
        if size and size > 0:
            return int(size)
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    sysfs = SYSFS_CACHE if sysfs is None else sysfs
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return 0
    for level in sysfs_levels:
        for entry in entries:
            try:
                with open(f"{sysfs}/{entry}/level") as f:
                    if f.read().strip() != str(level):
                        continue
                with open(f"{sysfs}/{entry}/type") as f:
                    if f.read().strip() == "Instruction":
                        continue
                with open(f"{sysfs}/{entry}/size") as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            if text and text[-1] in units and text[:-1].isdigit():
                return int(text[:-1]) * units[text[-1]]
    return 0


def last_level_cache_bytes() -> int:
    """Size of the last-level cache (L3, else L2) as the OS reports it, else 32 MiB."""
    return (_cache_bytes(("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"), (3, 2))
            or DEFAULT_LLC_BYTES)


def l2_cache_bytes() -> int:
    """Size of one core's L2 as the OS reports it, else 512 KiB."""
    return _cache_bytes(("SC_LEVEL2_CACHE_SIZE",), (2,)) or DEFAULT_L2_BYTES


def configure_kernels_from_env() -> None:
    """Apply CINSTNORM_SIMD (auto|baseline|avx2|avx512) and CINSTNORM_STREAM_MIN_BYTES, and
    tell the kernels the L2 and last-level cache sizes (which size the channels-last sample
    groups).

    Streaming (non-temporal) stores are used for outputs larger than
    :func:`default_stream_min_bytes` by default: below that, the output is better left in
    cache for whoever reads it next.
    """
    want = os.environ.get("CINSTNORM_SIMD", "auto").strip().lower() or "auto"
    try:
        _cpu.select_simd(want)
    except ValueError as exc:
        warnings.warn(f"CINSTNORM_SIMD: {exc}; using auto", RuntimeWarning, stacklevel=2)
        _cpu.select_simd("auto")
    llc = last_level_cache_bytes()
    _cpu.set_l2_bytes(l2_cache_bytes())
    _cpu.set_llc_bytes(llc)
    default = default_stream_min_bytes(llc, available_cores())
    stream = os.environ.get("CINSTNORM_STREAM_MIN_BYTES", "").strip()
    try:
        _cpu.set_stream_min_bytes(int(stream) if stream else default)
    except ValueError:
        warnings.warn(f"CINSTNORM_STREAM_MIN_BYTES={stream!r} is not an integer; ignored",
                      RuntimeWarning, stacklevel=2)
        _cpu.set_stream_min_bytes(default)
    default = default_output_cache_bytes(physical_memory_bytes())
    cache = os.environ.get("CINSTNORM_OUTPUT_CACHE_BYTES", "").strip()
    try:
        nbytes = int(cache) if cache else default
        if nbytes < 0:
            raise ValueError
    except ValueError:
        warnings.warn(f"CINSTNORM_OUTPUT_CACHE_BYTES={cache!r} is not a non-negative integer; "
                      "ignored", RuntimeWarning, stacklevel=2)
        nbytes = default
    _cpu.set_output_cache_bytes(nbytes)


def physical_memory_bytes() -> int:
    """The machine's memory as the OS reports it, else 0 (unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def default_output_cache_bytes(memory: int) -> int:
    """How many bytes of freed results the output cache keeps by default: OUTPUT_CACHE_BYTES,
    or an eighth of the machine's memory where that is less (unknown memory: 0, no cache)."""
    return min(OUTPUT_CACHE_BYTES, memory // 8) if memory > 0 else 0


def default_stream_min_bytes(llc: int, cores: int) -> int:
    """The output size above which streaming stores are used: the last-level cache, or
    STREAM_BYTES_PER_CORE per core of this process where that is less (a VM's cores share
    the socket's L3 with other tenants')."""
    return min(llc, STREAM_BYTES_PER_CORE * max(1, cores))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _check_count(n, what: str) -> int:
    if isinstance(n, bool):
        raise TypeError(f"{what} must be an int or None, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{what} must be an int or None, got {type(n).__name__}") from None
    if n == 0:
        raise ValueError(f"{what}=0 is not valid: use a positive count, or -1 for all cores")
    if n < 0:
        cores = available_cores()
        n = cores + 1 + n
        if n < 1:
            raise ValueError(f"{what} asks for fewer than one thread ({cores} cores available)")
    return n


def resolve_threads(n_threads=None) -> int:
    """The thread count a kernel call uses.

    None: the value given to :func:`set_num_threads`, else the OpenMP default of the calling
    thread (``OMP_NUM_THREADS``, else the cores this process may use), which
    ``threadpoolctl.threadpool_limits(k, user_api="openmp")`` lowers. Positive: that many.
    Negative: ``cores + 1 + n`` (-1 = all cores). 0: ValueError.
    """
    if n_threads is None:
        if _user_threads is not None:
            return _user_threads
        return max(1, _cpu.omp_max_threads())
    return _check_count(n_threads, "n_threads")


def set_num_threads(n: Optional[int]) -> None:
    """Set the default thread count of every cinstnorm call (None restores the OpenMP default).

    Parameters
    ----------
    n : int or None
        Positive: that many threads; negative: ``cores + 1 + n`` (-1 = all cores);
        None: back to ``OMP_NUM_THREADS`` / the cores this process may use.

    Examples
    --------
    >>> import cinstnorm as cin
    >>> cin.set_num_threads(1)
    >>> cin.get_num_threads()
    1
    >>> cin.set_num_threads(None)
    """
    global _user_threads
    _user_threads = None if n is None else _check_count(n, "n")
    _cpu.set_default_threads(_user_threads)  # what the fast paths read


def get_num_threads() -> int:
    """The thread count a call with ``n_threads=None`` would use now.

    Examples
    --------
    >>> import cinstnorm as cin
    >>> cin.get_num_threads() >= 1
    True
    """
    return resolve_threads(None)
