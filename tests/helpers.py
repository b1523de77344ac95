"""Small helpers shared by the tests: inputs, tolerances, snapshots, layouts, tools."""

import importlib.util
import pathlib

import numpy as np

# Tolerances for an output of magnitude about 1 (y, dx) against the float64 reference.
TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
    np.dtype(np.float32): dict(rtol=1e-5, atol=2e-5),
    np.dtype(np.float16): dict(rtol=2e-3, atol=4e-3),
}
# Tolerances for sums over many elements (dweight, dbias) and for backward outputs.
GRAD_TOL = {
    np.dtype(np.float64): dict(rtol=1e-9, atol=1e-9),
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-4),
    np.dtype(np.float16): dict(rtol=1e-2, atol=2e-2),
}

SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
MODULE_NAMES = {1: "InstanceNorm1d", 2: "InstanceNorm2d", 3: "InstanceNorm3d"}


def tol(dtype):
    return TOL[np.dtype(dtype)]


def grad_tol(dtype):
    return GRAD_TOL[np.dtype(dtype)]


def make_x(rng, shape, dtype=np.float64, spread=3.0):
    """Normal values with a different offset and scale in every (i0, i1) slice."""
    x = rng.standard_normal(shape)
    if len(shape) >= 2 and 0 not in shape:
        lead = shape[:2] + (1,) * (len(shape) - 2)
        x = x * rng.uniform(0.5, 2.0, lead) + rng.uniform(-spread, spread, lead)
    return x.astype(dtype)


def make_affine(rng, c, dtype=np.float64):
    """A weight in [0.5, 1.5] (some negative) and a bias in [-1, 1]."""
    w = rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 3 == 2, -1.0, 1.0)
    b = rng.uniform(-1.0, 1.0, c)
    return w.astype(dtype), b.astype(dtype)


def assert_close(actual, expected, dtype=None, grad=False, err_msg=""):
    """Compare with the tolerance for ``dtype`` (default: the actual array's dtype)."""
    actual = np.asarray(actual)
    dt = np.dtype(dtype if dtype is not None else actual.dtype)
    t = grad_tol(dt) if grad else tol(dt)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               err_msg=err_msg, **t)


def assert_sums_close(actual, expected, terms_abs_sum, dtype=None, err_msg=""):
    """Compare per-channel sums (dweight, dbias) by what floating point promises for a sum:
    the grad tolerance, or a few ulps of the dtype times the sum of the terms' magnitudes,
    whichever is larger (a channel whose terms cancel to nearly 0 is still accurate to that)."""
    actual = np.asarray(actual)
    dt = np.dtype(dtype if dtype is not None else actual.dtype)
    t = grad_tol(dt)
    diff = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    bound = np.maximum(t["atol"] + t["rtol"] * np.abs(expected),
                       16 * np.finfo(dt).eps * np.asarray(terms_abs_sum))
    assert np.all(diff <= bound), (err_msg, diff, bound)


# Central differences (float64): the step of fd_grad.
H = 1e-6


def fd_grad(loss, a):
    """Central-difference gradient of loss() with respect to the array ``a`` (changed in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + H
        fp = loss()
        a[i] = old - H
        fm = loss()
        a[i] = old
        g[i] = (fp - fm) / (2 * H)
    return g


class Snapshot:
    """Copies of some arrays (None allowed), to check later that nothing modified them."""

    def __init__(self, *arrays):
        self.arrays = arrays
        self.copies = [None if a is None else np.array(a, copy=True) for a in arrays]

    def assert_unchanged(self):
        for i, (a, c) in enumerate(zip(self.arrays, self.copies)):
            if a is None:
                continue
            a = np.asarray(a)
            assert a.dtype == c.dtype and a.shape == c.shape, f"array {i} changed dtype/shape"
            nan_ok = c.dtype.kind in "fc"
            assert np.array_equal(a, c, equal_nan=nan_ok), f"array {i} was modified"


def stride_order(a):
    """Axes sorted from the largest to the smallest absolute stride (ties by axis)."""
    return tuple(sorted(range(a.ndim), key=lambda ax: (-abs(a.strides[ax]), ax)))


def is_dense_in_order(a, order):
    """True when ``a`` transposed to ``order`` is C-contiguous."""
    return a.transpose(order).flags.c_contiguous


def layouts(base, tmp_path=None):
    """Arrays holding the same values as the C-contiguous ``base`` in many memory layouts.

    Returns a dict name -> array; every array equals ``base`` elementwise.
    """
    nd = base.ndim
    out = {"contiguous": base.copy()}
    # channels-last memory, NC... view
    last = (0,) + tuple(range(2, nd)) + (1,)
    nhwc = np.ascontiguousarray(base.transpose(last))
    inv = np.argsort(last)
    out["channels_last"] = nhwc.transpose(tuple(inv))
    out["fortran"] = np.asfortranarray(base)
    # a strided slice of a larger array
    big = np.full(tuple(2 * s + 1 for s in base.shape), np.nan, dtype=base.dtype)
    view = big[tuple(slice(1, None, 2) for _ in base.shape)]
    view[...] = base
    out["sliced"] = view
    # negative strides on every axis: the reversed copy, viewed reversed
    rev = tuple(slice(None, None, -1) for _ in base.shape)
    out["negative"] = np.ascontiguousarray(base[rev])[rev]
    # a transposed permutation that mixes spatial axes
    perm = tuple(reversed(range(nd)))
    out["reversed_axes"] = np.ascontiguousarray(base.transpose(perm)).transpose(perm)
    ro = base.copy()
    ro.flags.writeable = False
    out["readonly"] = ro
    if tmp_path is not None:
        path = tmp_path / f"x_{base.dtype}_{'x'.join(map(str, base.shape))}.bin"
        mm = np.memmap(path, dtype=base.dtype, mode="w+", shape=base.shape)
        mm[...] = base
        mm.flush()
        del mm
        out["memmap_r"] = np.memmap(path, dtype=base.dtype, mode="r", shape=base.shape)
    for name, a in out.items():
        assert np.array_equal(a, base), name
    return out


# ---- machine profiles ----------------------------------------------------------------------
# What a work split or a kernel choice reads of the machine (one core's L2, the last-level cache
# and with it the streaming-store threshold, the SIMD path) is pinned by the tests, never read
# from the host: the same suite must pass on every VM kind.  Three profiles of the machines this
# project runs on; "epyc-zen3" is what every test runs under unless it asks for another.
KiB, MiB = 1024, 1024 * 1024
PROFILES = {
    "epyc-zen3": dict(l2=512 * KiB, llc=32 * MiB, simd="avx2"),
    "xeon-avx512": dict(l2=2 * MiB, llc=300 * MiB, simd="avx512"),
    "small-sse2": dict(l2=1 * MiB, llc=8 * MiB, simd="baseline"),
}
DEFAULT_PROFILE = "epyc-zen3"


def machine_state():
    """The kernels' machine settings now (to restore them later)."""
    from cinstnorm import _cpu
    return dict(l2=_cpu.l2_bytes(), llc=_cpu.llc_bytes(), stream=_cpu.stream_min_bytes(),
                simd=_cpu.simd_path())


def simd_name(path):
    """The select_simd name of a path as simd_path() reports it ('avx512f' -> 'avx512',
    'avx2+fma' -> 'avx2', 'baseline (sse2)' -> 'baseline')."""
    return ("avx512" if path.startswith("avx512") else
            "avx2" if path.startswith("avx2") else "baseline")


def restore_machine(state):
    from cinstnorm import _cpu
    _cpu.set_l2_bytes(state["l2"])
    _cpu.set_llc_bytes(state["llc"])
    _cpu.set_stream_min_bytes(state["stream"])
    _cpu.select_simd(simd_name(state["simd"]))


def pin_machine(name, simd=True):
    """Give the kernels profile ``name``'s cache sizes (streaming stores above its LLC size)
    and, with ``simd``, its SIMD path: where this CPU cannot run that path, the baseline path,
    which every x86-64 (and the portable C build) runs.  Returns the SIMD path pinned."""
    from cinstnorm import _cpu
    p = PROFILES[name]
    _cpu.set_l2_bytes(p["l2"])
    _cpu.set_llc_bytes(p["llc"])
    _cpu.set_stream_min_bytes(p["llc"])
    if not simd:
        return None
    path = p["simd"] if p["simd"] in _cpu.simd_supported() else "baseline"
    _cpu.select_simd(path)
    return path


def load_tool(name):
    """tools/<name>.py of this checkout, imported as a module (tools/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
