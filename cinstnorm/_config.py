"""Thread-count settings shared by every kernel call."""
from __future__ import annotations

import operator
import os
from typing import Optional

from . import _cpu

_user_threads: Optional[int] = None


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


def get_num_threads() -> int:
    """The thread count a call with ``n_threads=None`` would use now.

    Examples
    --------
    >>> import cinstnorm as cin
    >>> cin.get_num_threads() >= 1
    True
    """
    return resolve_threads(None)
