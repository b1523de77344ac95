"""The cache sizes that size the work splits: read from sysconf, else from sysfs, else a
default; and handed to the kernels at import."""

import os

import pytest

import cinstnorm  # noqa: F401  (configures the kernels)
from cinstnorm import _config, _cpu

from helpers import PROFILES, machine_state, restore_machine


def _fake_sysfs(root, caches):
    """cpu0's cache directory with (level, type, size) entries, as Linux lays it out."""
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


@pytest.fixture
def no_sysconf(monkeypatch):
    def refuse(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "sysconf", refuse)


INTEL = [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
         (3, "Unified", "307200K")]


def test_sysfs_levels(tmp_path, no_sysconf):
    root = _fake_sysfs(tmp_path, INTEL)
    assert _config._cache_bytes((), (2,), root) == 2 * 1024 ** 2
    assert _config._cache_bytes((), (3, 2), root) == 300 * 1024 ** 2
    # level 1: the data cache, not the instruction cache listed after it
    assert _config._cache_bytes((), (1,), root) == 48 * 1024


def test_sysfs_fallback_order_and_missing(tmp_path, no_sysconf):
    root = _fake_sysfs(tmp_path, INTEL[:3])  # no L3: the LLC is the L2
    assert _config._cache_bytes((), (3, 2), root) == 2 * 1024 ** 2
    assert _config._cache_bytes((), (3,), root) == 0
    assert _config._cache_bytes((), (2,), str(tmp_path / "absent")) == 0


def test_sysfs_unreadable_sizes_are_skipped(tmp_path, no_sysconf):
    root = _fake_sysfs(tmp_path, [(2, "Unified", "lots"), (2, "Unified", "1M")])
    assert _config._cache_bytes((), (2,), root) == 1024 ** 2


def test_sysconf_comes_first(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_LEVEL2_CACHE_SIZE": 1 << 20}.get(name, 0))
    root = _fake_sysfs(tmp_path, INTEL)
    assert _config._cache_bytes(("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"), (3,),
                                root) == 1 << 20


def test_defaults_when_nothing_is_known(monkeypatch, no_sysconf, tmp_path):
    monkeypatch.setattr(_config, "SYSFS_CACHE", str(tmp_path))
    assert _config.l2_cache_bytes() == _config.DEFAULT_L2_BYTES
    assert _config.last_level_cache_bytes() == _config.DEFAULT_LLC_BYTES


def test_kernels_get_the_cache_sizes(tmp_path, monkeypatch, no_sysconf):
    # what the import does, on a fake machine: the kernels get its L2 and LLC, and streaming
    # stores start above the LLC size, or 4 MiB per core where that is less (or
    # CINSTNORM_STREAM_MIN_BYTES)
    state = machine_state()
    monkeypatch.setattr(_config, "SYSFS_CACHE", _fake_sysfs(tmp_path, INTEL))
    monkeypatch.setattr(_config, "available_cores", lambda: 128)
    monkeypatch.delenv("CINSTNORM_STREAM_MIN_BYTES", raising=False)
    monkeypatch.delenv("CINSTNORM_SIMD", raising=False)
    try:
        _config.configure_kernels_from_env()
        assert _cpu.l2_bytes() == 2 * 1024 ** 2
        assert _cpu.llc_bytes() == _cpu.stream_min_bytes() == 300 * 1024 ** 2
        assert cinstnorm.config()["l2_bytes"] == 2 * 1024 ** 2
        assert cinstnorm.config()["llc_bytes"] == 300 * 1024 ** 2
        monkeypatch.setenv("CINSTNORM_STREAM_MIN_BYTES", "12345")
        _config.configure_kernels_from_env()
        assert (_cpu.llc_bytes(), _cpu.stream_min_bytes()) == (300 * 1024 ** 2, 12345)
        monkeypatch.setenv("CINSTNORM_STREAM_MIN_BYTES", "lots")
        with pytest.warns(RuntimeWarning, match="not an integer"):
            _config.configure_kernels_from_env()
        assert _cpu.stream_min_bytes() == 300 * 1024 ** 2
        monkeypatch.delenv("CINSTNORM_STREAM_MIN_BYTES")
        monkeypatch.setattr(_config, "available_cores", lambda: 2)
        _config.configure_kernels_from_env()
        assert (_cpu.llc_bytes(), _cpu.stream_min_bytes()) == (300 * 1024 ** 2, 8 * 1024 ** 2)
    finally:
        restore_machine(state)


@pytest.mark.parametrize("llc, cores, want", [(32 << 20, 2, 8 << 20), (32 << 20, 16, 32 << 20),
                                              (4 << 20, 2, 4 << 20), (32 << 20, 0, 4 << 20)])
def test_default_stream_threshold(llc, cores, want):
    assert _config.default_stream_min_bytes(llc, cores) == want


def test_cache_setters_clamp_at_zero():
    state = machine_state()
    try:
        _cpu.set_l2_bytes(-5)
        _cpu.set_llc_bytes(-5)
        assert _cpu.l2_bytes() == _cpu.llc_bytes() == 0
    finally:
        restore_machine(state)


def test_the_suite_runs_on_the_default_profile(pinned_caches):
    # the host's caches are not what the tests see (conftest.pinned_caches)
    p = PROFILES[pinned_caches]
    assert (_cpu.l2_bytes(), _cpu.llc_bytes(), _cpu.stream_min_bytes()) == (p["l2"], p["llc"],
                                                                          p["llc"])
