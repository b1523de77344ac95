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

from helpers import DEFAULT_PROFILE, PROFILES, machine_state, pin_machine, restore_machine  # noqa: E402


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
