"""Shared fixtures for the cinstnorm test suite.

Needs only pytest, numpy and threadpoolctl. torch is optional: the ``torch`` fixture skips the
tests that use it when it cannot be imported, or fails them when CINSTNORM_REQUIRE_TORCH=1.
"""

import os
import sys
import zlib

import numpy as np
import pytest

# Make tests/reference.py and tests/helpers.py importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import (DEFAULT_PROFILE, PROFILES, machine_state, pin_machine,  # noqa: E402
                     restore_machine, simd_name)

# Every SIMD path the build compiles: the x86-64 build always compiles all three, dispatched at
# run time.
SIMD_PATHS = ["baseline", "avx2", "avx512"]


@pytest.fixture(scope="session", autouse=True)
def pinned_caches():
    """Every test sees the cache sizes of the default machine profile, not the host's: the work
    splits (and so which kernels run) are the same on every machine.  The SIMD path stays the
    best this CPU runs; the tests that depend on it pin it (``simd``, ``machine``)."""
    state = machine_state()
    pin_machine(DEFAULT_PROFILE, simd=False)
    yield DEFAULT_PROFILE
    restore_machine(state)


@pytest.fixture(params=sorted(PROFILES))
def machine(request):
    """Each machine profile in turn (cache sizes and SIMD path), restored afterwards."""
    state = machine_state()
    simd = pin_machine(request.param)
    yield dict(PROFILES[request.param], name=request.param, simd_pinned=simd)
    restore_machine(state)


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Each compiled SIMD path in turn, forced with select_simd and restored afterwards; a path
    this CPU cannot run is reported as a skip (not left out silently)."""
    from cinstnorm import _cpu
    if request.param not in _cpu.simd_supported():
        pytest.skip(f"this CPU cannot run the {request.param} path "
                    f"(it runs {', '.join(_cpu.simd_supported())})")
    before = _cpu.simd_path()
    assert _cpu.select_simd(request.param).startswith(request.param.replace("avx512", "avx512f"))
    yield request.param
    # back to the path in use before (CINSTNORM_SIMD may have forced one: not "auto")
    _cpu.select_simd(simd_name(before))
    assert _cpu.simd_path() == before


@pytest.fixture(params=[False, True], ids=["cached-stores", "streaming-stores"])
def streaming(request):
    """Cached stores, then non-temporal (streaming) stores for every output, whatever its size
    (the streaming threshold forced to 0 or out of reach), restored afterwards."""
    from cinstnorm import _cpu
    before = _cpu.stream_min_bytes()
    _cpu.set_stream_min_bytes(0 if request.param else 1 << 62)
    yield request.param
    _cpu.set_stream_min_bytes(before)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fixed across runs, different between tests."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def torch():
    """torch, or a skip (a failure with CINSTNORM_REQUIRE_TORCH=1) when it cannot be imported."""
    try:
        import torch as torch_module
    except ImportError as exc:
        if os.environ.get("CINSTNORM_REQUIRE_TORCH") == "1":
            pytest.fail(f"CINSTNORM_REQUIRE_TORCH=1 but torch cannot be imported: {exc}")
        pytest.skip(f"torch not importable: {exc}")
    # torch's own OpenMP pool spinning beside cinstnorm's on a small machine slows both a lot;
    # parity is about numbers, so torch runs single-threaded
    torch_module.set_num_threads(1)
    return torch_module
