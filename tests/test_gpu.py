"""GPU path: ``cinstnorm._gpu`` and its CUDA kernels against the float64 reference.

Two backends run the same tests of ``_gpu.forward``, ``forward_fixed`` and ``backward``:

- ``cuda``: CuPy and the compiled kernels on a device (marked ``gpu``; skipped when CuPy or a
  device is missing);
- ``emulated``: no CuPy at all.  A NumPy stand-in for CuPy, and a NumPy model of what each
  kernel computes, called with the exact arguments ``_gpu`` passes (checked against the
  kernel signatures parsed from the .cu source).  It tests everything on the host side, on any
  machine: argument order and types, regime choice and capacity, chunk coverage (outputs start
  as NaN, so a missed element shows), per-plane parameter indexing, layouts and dtypes.  It
  cannot find a bug inside the CUDA code; the ``cuda`` backend does.

Sizes straddle every regime boundary of ``_gpu`` (group / block / chunk, for both dtypes), and
forced plans run every regime, with many small chunks and misaligned planes, on the same data.
Tests of the public API on CuPy arrays (functional and modules, device checks) are in
``TestPublicApi`` and run on every backend; the comparison with torch CUDA needs a device.
"""
import re
import sys
import types

import numpy as np
import pytest

from cinstnorm import _gpu
import reference as ref
from helpers import assert_close, make_affine, make_x, stride_order

DTYPES = [np.float32, np.float64]
VN = {np.dtype(np.float32): 4, np.dtype(np.float64): 2}


def _gpu_skip_reason():
    if _gpu.gpu_available():
        return None
    return _gpu.gpu_status()


GPU_SKIP = _gpu_skip_reason()
on_device = [pytest.mark.gpu, pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))]


# ---- CPU-only: importing, errors and status without CuPy --------------------------------

def test_module_imports_and_reports_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    assert _gpu.gpu_available() is False
    status = _gpu.gpu_status()
    assert status.startswith("not available") and "CuPy" in status
    assert "pip install cupy-cuda12x" in status and "cupy-cuda13x" in status
    assert _gpu.is_gpu_array(np.zeros(3)) is False


def test_require_cupy_says_what_is_missing_and_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError) as info:
        _gpu.require_cupy()
    message = str(info.value)
    assert "CuPy is not installed" in message
    assert "pip install cupy-cuda" in message and "CUDA" in message


def test_require_cupy_without_a_device(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(__version__="99.0", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match="no CUDA device|sees none"):
        _gpu.require_cupy()
    assert "no CUDA device" in _gpu.gpu_status()


def test_install_hint_names_the_driver_cuda_version(monkeypatch):
    monkeypatch.setattr(_gpu, "_driver_cuda_version", lambda: (12, 8))
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x` matches this machine"):
        _gpu.require_cupy()


def test_is_gpu_array_never_imports_cupy(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert _gpu.is_gpu_array(np.ones(2)) is False
    assert "cupy" not in sys.modules


def test_cuda_module_without_cupy_says_what_is_missing_and_changes_nothing(monkeypatch):
    import cinstnorm as cin

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match="pip install cupy-cuda"):
        cin.InstanceNorm2d(3, affine=True, device="cuda")
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    before = (m.weight, m.bias, m.running_mean, m.running_var)
    with pytest.raises(ImportError, match="CuPy"):
        m.to("cuda:0")
    assert m.device == "cpu" and (m.weight, m.bias, m.running_mean, m.running_var) == before
    with pytest.raises(ValueError, match="device must be"):
        cin.InstanceNorm2d(3, device="gpu")


# ---- CPU-only: the work split -------------------------------------------------------------

def _valid_plan(plan, kind, P, L, itemsize, head, fused=False):
    _gpu._check_plan(plan, kind, L, itemsize, head, fused)  # raises when slots would be lost
    assert plan.launches(kind) <= 2
    grid = {"group": -(-P * plan.group // max(plan.threads, 1)), "block": P,
            "chunk": P * plan.chunks}[plan.regime]
    assert 0 < grid < 2 ** 31
    if plan.regime == "chunk":
        assert plan.chunks <= _gpu.MAX_CHUNKS


@pytest.mark.parametrize("kind, fused", [("forward", False), ("forward", True),
                                         ("fixed", False), ("backward", False)])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_every_plan_holds_every_slot(kind, fused, itemsize):
    """fused: a forward with an activation or a residual (fewer block kernels)."""
    per = _gpu.VEC_BYTES // itemsize
    Ls = sorted({1, 2, 3, 7, 64, 255, 256, 257, 1000, 4096, 4097, 16384, 16385, 32768, 32769,
                 10 ** 5, 2 ** 20 + 3, 2 ** 26}
                | {b * per + d for b in (_gpu.GROUP_MAX_SLOTS, _gpu.SMALL_PLANE_SLOTS,
                                         _gpu.BACKWARD_BLOCK_MAX_SLOTS,
                                         _gpu.FORWARD_BLOCK_MAX_SLOTS) for d in (-1, 0, 1)})
    for L in Ls:
        for P in (1, 3, 131, 132, 1000, 70000):
            for head in (0, per - 1):
                for n_sm in (1, 80, 132):
                    plan = _gpu.choose_plan(kind, P, L, itemsize, head, n_sm, fused)
                    _valid_plan(plan, kind, P, L, itemsize, head, fused)


@pytest.mark.parametrize("itemsize", [4, 8])
def test_regime_boundaries(itemsize):
    per = _gpu.VEC_BYTES // itemsize
    many = 10 * 132

    def regime(kind, slots, P=many, fused=False):
        return _gpu.choose_plan(kind, P, slots * per, itemsize, 0, 132, fused).regime

    g = _gpu.GROUP_MAX_SLOTS
    assert [regime("forward", s) for s in (1, g, g + 1)] == ["group", "group", "block"]
    f = _gpu.FORWARD_BLOCK_MAX_SLOTS
    assert [regime("forward", s) for s in (f, f + 1)] == ["block", "chunk"]
    # with an activation or a residual the forward block regime stops at 8 slots per thread
    fused = _gpu.BLOCK_MAX_THREADS * max(_gpu.FUSED_FORWARD_BLOCK_SLOTS)
    assert fused < f
    assert [regime("forward", s, fused=True) for s in (g, g + 1, fused, fused + 1)] == \
        ["group", "block", "block", "chunk"]
    with pytest.raises(ValueError, match="cannot run"):  # the 16-slot kernel is not fused
        _gpu._check_plan(_gpu.Plan("block", 16, _gpu.BLOCK_MAX_THREADS), "forward", f * per,
                         itemsize, 0, True)
    b = _gpu.BACKWARD_BLOCK_MAX_SLOTS
    assert [regime("backward", s) for s in (g, g + 1, b, b + 1)] == \
        ["group", "block", "block", "chunk"]
    assert [regime("fixed", s) for s in (g, g + 1)] == ["group", "chunk"]
    # few planes: block only while the planes are small
    small = _gpu.SMALL_PLANE_SLOTS
    assert [regime("forward", s, P=3) for s in (small, small + 1)] == ["block", "chunk"]
    # one plane of (1, 1, 2048, 2048) float32 is spread over the device
    plan = _gpu.choose_plan("forward", 1, 2048 * 2048, 4, 0, 132)
    assert plan.regime == "chunk" and plan.chunks >= 132 and plan.launches("forward") == 2


# ---- the two backends ---------------------------------------------------------------------

def kernel_signatures():
    """{kernel: [(param, kind, elem)]} from the .cu: kind 'ptr', 'i64' or 'f64'; elem 'T' or
    'double' for pointers."""
    sigs = {}
    text = _gpu.kernel_source()
    for m in re.finditer(r"__global__[^;{]*?\b(cin_\w+)\s*\(([^)]*)\)", text, re.S):
        params = []
        for decl in m.group(2).split(","):
            decl = " ".join(decl.split())
            name = re.findall(r"(\w+)$", decl)[0]
            if "*" in decl:
                kind, elem = "ptr", "T" if re.match(r"(const )?T\b", decl) else "double"
            elif decl.startswith("long long"):
                kind, elem = "i64", None
            elif decl.startswith("double"):
                kind, elem = "f64", None
            else:
                raise AssertionError(f"unexpected kernel parameter {decl!r}")
            params.append((name, kind, elem))
        sigs[m.group(1)] = params
    return sigs


class FakeArray(np.ndarray):
    """A NumPy array that passes for a cupy.ndarray inside cinstnorm._gpu."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return FakeDevice(0)

    def get(self):
        return np.array(self).view(np.ndarray)


class FakeDevice:
    def __init__(self, device_id=0):
        self.id = device_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake(a):
    return a.view(FakeArray)


def _upload(a, dtype=None):
    """cupy.asarray: a device array as it is (when the dtype matches), host data copied."""
    if isinstance(a, FakeArray) and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    return _fake(np.array(a, dtype=dtype))


def _poisoned(a):
    """New memory starts as NaN, so an element that no kernel writes shows in the results."""
    if a.dtype.kind == "f":
        a.fill(np.nan)
    return _fake(a)


FAKE_CUPY = types.SimpleNamespace(
    __version__="0.0-emulated",
    ndarray=FakeArray,
    float16=np.float16, float32=np.float32, float64=np.float64,
    empty=lambda shape, dtype=np.float64: _poisoned(np.empty(shape, dtype)),
    empty_like=lambda a, dtype=None, order="K": _poisoned(np.empty_like(a, dtype, order)),
    zeros=lambda shape, dtype=np.float64: _fake(np.zeros(shape, dtype)),
    ones=lambda shape, dtype=np.float64: _fake(np.ones(shape, dtype)),
    asarray=lambda a, dtype=None: _upload(a, dtype),
    ascontiguousarray=lambda a, dtype=None: _fake(np.ascontiguousarray(a, dtype)),
    broadcast_to=lambda a, shape: _fake(np.broadcast_to(a, shape)),
    cuda=types.SimpleNamespace(Device=FakeDevice),
)


def _window(L, head, j, chunk_slots, n):
    """Element range [lo, hi) of chunk j (cin::chunk_window)."""
    ns = -(-(L + head) // n)
    s0 = min(j * chunk_slots, ns)
    s1 = min(s0 + chunk_slots, ns)
    lo, hi = max(s0 * n - head, 0), min(s1 * n - head, L)
    return lo, max(hi, lo)


class Emulator:
    """What each kernel computes, in float64 NumPy, from the arguments _gpu launches it with.

    The fused activation's formulas are the reference's (float64); what is emulated is how the
    kernels read their arguments: the template flag FUSED, the code and slope, the residual
    (read in y's (P, L) layout) and, in the backward, the weight and bias of the
    pre-activation.  The CUDA formulas themselves run on the host backend."""

    N_SM = 132

    def __init__(self):
        self.sigs = kernel_signatures()
        self.launches, self.names = [], []  # kernels, and their instantiations

    def kernel(self, device_id, ctype, name):
        base, targs = name.split("<", 1)
        targs = [t.strip() for t in targs.rstrip(">").split(",")]
        dtype = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}[targs[0]]
        slots = next((int(t) for t in targs[1:] if t.isdigit()), None)
        fused = {"true": True, "false": False}.get(targs[-1])
        assert name in _gpu.kernel_names(targs[0]), f"{name} is not compiled"

        def launch(grid, block, args):
            self.launches.append(base)
            self.names.append(name)
            a = self.bind(base, dtype, args)
            if fused is not None:  # a plain kernel ignores act and residual: none may be given
                wanted = a.act != 0 or getattr(a, "residual", None) is not None
                assert wanted == fused, f"{name} launched with act={a.act}"
                assert 0 <= a.act < len(ref.ACTIVATIONS), a.act
            a.fused = bool(fused)
            getattr(self, base)(a, dtype, slots, grid[0], block[0])

        return launch

    def bind(self, base, dtype, args):
        params = self.sigs[base]
        assert len(args) == len(params), f"{base}: {len(args)} arguments for {len(params)}"
        bound = {}
        for value, (name, kind, elem) in zip(args, params):
            if kind == "ptr":
                assert value is None or isinstance(value, FakeArray), (base, name, type(value))
                if value is not None:
                    want = dtype if elem == "T" else np.dtype(np.float64)
                    assert value.dtype == want, (base, name, value.dtype)
                    assert value.flags.c_contiguous, (base, name)
                    value = value.reshape(-1)
            elif kind == "i64":
                assert type(value) is np.int64, (base, name, type(value))
                value = int(value)
            else:
                assert type(value) is np.float64, (base, name, type(value))
                value = float(value)
            bound[name] = value
        if bound.get("vec"):  # aligned 16-byte access needs every array at the same offset
            offsets = {v.__array_interface__["data"][0] % _gpu.VEC_BYTES
                       for (name, kind, elem) in params if kind == "ptr" and elem == "T"
                       for v in [bound[name]] if v is not None}
            assert len(offsets) == 1, (base, offsets)
        return types.SimpleNamespace(**bound)

    # helpers
    @staticmethod
    def param(arr, ns, C, P, fallback):
        p = np.arange(P)
        return np.full(P, fallback) if arr is None else np.asarray(arr)[(p // C) * ns + p % C]

    @staticmethod
    def head(arr, p, L, vec):
        if not vec:
            return 0
        ptr = arr.__array_interface__["data"][0] + p * L * arr.itemsize
        return (ptr % _gpu.VEC_BYTES) // arr.itemsize

    def check_capacity(self, arr, P, L, vec, capacity):
        n = VN[arr.dtype]
        for p in range(P):
            assert -(-(L + self.head(arr, p, L, vec)) // n) <= capacity, "slots would be lost"

    @staticmethod
    def planes(arr, P, L):
        return arr[:P * L].reshape(P, L)

    def pre_activation(self, a, P, x, mean, rstd):
        """t = (x - mean) * rstd * weight + bias of every plane (x: (P, L) float64)."""
        w = self.param(a.weight, a.w_ns, a.C, P, 1.0)
        b = self.param(a.bias, a.b_ns, a.C, P, 0.0)
        return (x - mean[:, None]) * (rstd * w)[:, None] + b[:, None]

    @staticmethod
    def activation(a):
        """(name, slope) of the kernel's activation: (None, ...) in a plain kernel."""
        return (ref.ACTIVATIONS[a.act] if a.fused else None), a.slope

    def normalize_planes(self, a, dtype, P, mean, var):
        x = self.planes(a.x, P, a.L).astype(np.float64)
        rstd = 1.0 / np.sqrt(var + a.eps)
        y = ref.activation(self.pre_activation(a, P, x, mean, rstd), *self.activation(a))
        if a.fused and a.residual is not None:
            y = y + self.planes(a.residual, P, a.L)
        return y.astype(dtype), rstd

    def write_stats(self, a, sel, mean, var, rstd):
        if a.mean_out is not None:
            a.mean_out[sel], a.var_out[sel], a.rstd_out[sel] = mean, var, rstd

    # forward
    def plane_stats_or_fixed(self, a, P):
        if getattr(a, "fixed_mean", None) is not None:
            return (self.param(a.fixed_mean, a.m_ns, a.C, P, 0.0),
                    self.param(a.fixed_var, a.v_ns, a.C, P, 1.0))
        x = self.planes(a.x, P, a.L).astype(np.float64)
        return x.mean(axis=1), x.var(axis=1)

    def cin_fwd_group(self, a, dtype, slots, grid, block):
        assert block == _gpu.GROUP_THREADS and a.group in (1, 2, 4, 8, 16, 32)
        assert grid * block >= a.P * a.group > (grid - 1) * block
        self.check_capacity(a.x, a.P, a.L, a.vec, a.group * slots)
        mean, var = self.plane_stats_or_fixed(a, a.P)
        y, rstd = self.normalize_planes(a, dtype, a.P, mean, var)
        self.planes(a.y, a.P, a.L)[...] = y
        self.write_stats(a, slice(None), mean, var, rstd)

    def cin_fwd_block(self, a, dtype, slots, grid, block):
        assert block % 32 == 0 and 0 < block <= _gpu.BLOCK_MAX_THREADS
        self.check_capacity(a.x, grid, a.L, a.vec, block * slots)
        mean, var = self.plane_stats_or_fixed(a, grid)
        y, rstd = self.normalize_planes(a, dtype, grid, mean, var)
        self.planes(a.y, grid, a.L)[...] = y
        self.write_stats(a, slice(None), mean, var, rstd)

    def chunks_of(self, a, grid, per_plane):
        assert grid % per_plane == 0
        n = VN[a.x.dtype]
        for b in range(grid):
            p, j = divmod(b, per_plane)
            lo, hi = _window(a.L, self.head(a.x, p, a.L, a.vec), j, a.chunk_slots, n)
            yield b, p, j, p * a.L + lo, p * a.L + hi

    def cin_fwd_chunk_stats(self, a, dtype, slots, grid, block):
        assert block == _gpu.CHUNK_THREADS
        for b, p, j, lo, hi in self.chunks_of(a, grid, a.chunks):
            x = a.x[lo:hi].astype(np.float64)
            a.part[3 * b:3 * b + 3] = ((hi - lo, x.mean(), ((x - x.mean()) ** 2).sum())
                                       if hi > lo else (0.0, 0.0, 0.0))

    def cin_fwd_chunk_norm(self, a, dtype, slots, grid, block):
        assert block == _gpu.CHUNK_THREADS
        P = grid // a.chunks
        if a.part is not None:
            part = a.part[:3 * P * a.chunks].reshape(P, a.chunks, 3)
            count = part[:, :, 0].sum(axis=1)
            assert np.all(count == a.L), "the chunks do not cover the planes"
            mean = (part[:, :, 0] * part[:, :, 1]).sum(axis=1) / count
            m2 = (part[:, :, 2] + part[:, :, 0] * (part[:, :, 1] - mean[:, None]) ** 2).sum(1)
            var = m2 / a.L
        else:
            mean = self.param(a.fixed_mean, a.m_ns, a.C, P, 0.0)
            var = self.param(a.fixed_var, a.v_ns, a.C, P, 1.0)
        y, rstd = self.normalize_planes(a, dtype, P, mean, var)
        for b, p, j, lo, hi in self.chunks_of(a, grid, a.chunks):
            a.y[lo:hi] = y.reshape(-1)[lo:hi]
            if j == 0:
                self.write_stats(a, p, mean[p], var[p], rstd[p])

    # backward
    def g_planes(self, a, P):
        """g = dy, or dy * act'(t) with the forward's t from mean, rstd, weight and bias."""
        dy = self.planes(a.dy, P, a.L).astype(np.float64)
        name, slope = self.activation(a)
        if name is None:
            return dy
        x = self.planes(a.x, P, a.L).astype(np.float64)
        t = self.pre_activation(a, P, x, self.param(a.mean_p, a.m_ns, a.C, P, 0.0),
                                self.param(a.rstd_p, a.r_ns, a.C, P, 1.0))
        return dy * ref.activation_derivative(t, name, slope)

    def grads(self, a, dtype, P, sdy=None, sdyc_k=None):
        """dx, sum_dy, sum_dy_xhat of every plane (sums from chunk partials when given)."""
        L = a.L
        dy = self.g_planes(a, P)
        x = self.planes(a.x, P, L).astype(np.float64)
        mean = self.param(a.mean_p, a.m_ns, a.C, P, 0.0)
        rstd = self.param(a.rstd_p, a.r_ns, a.C, P, 1.0)
        w = self.param(a.weight, a.w_ns, a.C, P, 1.0)
        if sdy is None:
            sdy = dy.sum(axis=1)
            sdyc = (dy * (x - mean[:, None])).sum(axis=1)
        else:  # kernel A's sums are around k = mean rounded to T
            k = mean.astype(dtype).astype(np.float64)
            sdyc = sdyc_k + (k - mean) * sdy
        alpha = (w * rstd)[:, None]
        if a.input_stats:
            dx = alpha * (dy - sdy[:, None] / L
                          - (x - mean[:, None]) * (rstd ** 2 * sdyc)[:, None] / L)
        else:
            dx = alpha * dy
        return dx.astype(dtype), sdy, sdyc * rstd

    def cin_bwd_group(self, a, dtype, slots, grid, block):
        assert block == _gpu.GROUP_THREADS and grid * block >= a.P * a.group
        self.check_capacity(a.x, a.P, a.L, a.vec, a.group * slots)
        dx, a.sum_dy[:], a.sum_dy_xhat[:] = self.grads(a, dtype, a.P)
        self.planes(a.dx, a.P, a.L)[...] = dx

    def cin_bwd_block(self, a, dtype, slots, grid, block):
        assert block % 32 == 0 and 0 < block <= _gpu.BLOCK_MAX_THREADS
        self.check_capacity(a.x, grid, a.L, a.vec, block * slots)
        dx, a.sum_dy[:], a.sum_dy_xhat[:] = self.grads(a, dtype, grid)
        self.planes(a.dx, grid, a.L)[...] = dx

    def cin_bwd_chunk_sums(self, a, dtype, slots, grid, block):
        assert block == _gpu.CHUNK_THREADS
        P = grid // a.chunks
        mean = self.param(a.mean_p, a.m_ns, a.C, P, 0.0)
        k = mean.astype(dtype).astype(np.float64)
        dx, _, _ = self.grads(a, dtype, P)
        g = self.g_planes(a, P).reshape(-1)
        for b, p, j, lo, hi in self.chunks_of(a, grid, a.chunks):
            a.part[2 * b:2 * b + 2] = g[lo:hi].sum(), (g[lo:hi] * (a.x[lo:hi] - k[p])).sum()
            if not a.input_stats:
                a.dx[lo:hi] = dx.reshape(-1)[lo:hi]

    def cin_bwd_chunk_dx(self, a, dtype, slots, grid, block):
        assert block == _gpu.CHUNK_THREADS
        per_plane = a.chunks if a.input_stats else 1
        P = grid // per_plane
        part = a.part[:2 * P * a.chunks].reshape(P, a.chunks, 2).sum(axis=1)
        dx, sdy, sdyx = self.grads(a, dtype, P, part[:, 0], part[:, 1])
        for b, p, j, lo, hi in self.chunks_of(a, grid, per_plane):
            if j == 0:
                a.sum_dy[p], a.sum_dy_xhat[p] = sdy[p], sdyx[p]
            if a.input_stats:
                a.dx[lo:hi] = dx.reshape(-1)[lo:hi]


# The kernel source itself, compiled for the CPU: CUDA threads become fibers (ucontext) of one OS
# thread, run block after block; __syncthreads and each warp shuffle are barriers at which every
# thread of the block must arrive (a kernel whose threads disagree on them fails the launch).
HOST_SHIM = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

struct cin_dim3 { unsigned x, y, z; };
static cin_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline double2 make_double2(double a, double b) { return {a, b}; }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }

namespace host {
/* Memory checks, like compute-sanitizer's: every element access must lie inside one of the
 * launch's arrays and be aligned to its own size. */
static const unsigned long long* ranges;
static int nranges;
static int fault;

inline void check(const void* p, size_t bytes, bool write)
{
    const unsigned long long a = (unsigned long long)p;
    if (a % bytes) { fault |= 2; return; }
    for (int i = 0; i < nranges; ++i)
        if (a >= ranges[3 * i] && a + bytes <= ranges[3 * i + 1] && (!write || ranges[3 * i + 2]))
            return;
    fault |= write ? 8 : 4;
}

/* Fibers: x86-64 Linux switches stacks in a few instructions (ucontext's swapcontext makes two
 * system calls per switch, far too slow for a barrier per shuffle). */
extern "C" void cin_host_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl cin_host_switch
    .type cin_host_switch, @function
cin_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct Fiber { void* sp; std::vector<char> stack; bool done; };
static std::vector<Fiber> fibers;
static void* scheduler_sp;
static unsigned current;
static const std::function<void()>* body;
static unsigned long long exchange[1024];

__attribute__((noinline)) void barrier() { cin_host_switch(&fibers[current].sp, scheduler_sp); }

static void start()
{
    (*body)();
    fibers[current].done = true;
    for (;;) cin_host_switch(&fibers[current].sp, scheduler_sp);
}

static void prepare(Fiber& f)
{
    if (f.stack.empty()) f.stack.resize(1 << 16);
    uintptr_t top = ((uintptr_t)(f.stack.data() + f.stack.size())) & ~(uintptr_t)15;
    void** sp = (void**)(top - 8);  // start() sees rsp % 16 == 8, as after a call
    *--sp = (void*)start;           // popped by ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
    f.done = false;
}

/* Runs fn once per thread of every block; returns 0, or 1 when the threads of a block disagree
 * on their barriers (some finished while others wait), or the memory fault bits. */
int launch(long long grid, unsigned block, const std::function<void()>& fn,
           const unsigned long long* r, int nr)
{
    body = &fn;
    ranges = r;
    nranges = nr;
    fault = 0;
    if (fibers.size() < block) fibers.resize(block);
    gridDim = {(unsigned)grid, 1, 1};
    blockDim = {block, 1, 1};
    for (long long b = 0; b < grid; ++b) {
        blockIdx = {(unsigned)b, 0, 0};
        for (unsigned t = 0; t < block; ++t) prepare(fibers[t]);
        for (;;) {
            unsigned finished = 0;
            for (unsigned t = 0; t < block; ++t) {
                if (fibers[t].done) { ++finished; continue; }
                current = t;
                threadIdx = {t, 0, 0};
                cin_host_switch(&scheduler_sp, fibers[t].sp);
                if (fibers[t].done) ++finished;
            }
            if (finished == block) break;
            if (finished) return 1;
        }
        if (fault) return fault;
    }
    return 0;
}
}  // namespace host

template <class T> inline T __ldg(const T* p) { host::check(p, sizeof(T), false); return *p; }
template <class T> inline void __stcs(T* p, T v) { host::check(p, sizeof(T), true); *p = v; }

inline void __syncthreads() { host::barrier(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int off, int width = 32)
{
    (void)width;
    const unsigned t = threadIdx.x;
    std::memcpy(&host::exchange[t], &v, sizeof v);
    host::barrier();
    T r;
    std::memcpy(&r, &host::exchange[(t & ~31u) | ((t & 31u) ^ (unsigned)off)], sizeof r);
    host::barrier();
    return r;
}
"""


# double* parameters that kernels write (the others are const double*)
HOST_WRITTEN = {"mean_out", "var_out", "rstd_out", "part", "sum_dy", "sum_dy_xhat"}
T_WRITTEN = {"y", "dx"}


def _host_param_decl(ctype, name, elem):
    if elem == "T":
        return f"{'' if name in T_WRITTEN else 'const '}{ctype}*"
    return f"{'' if name in HOST_WRITTEN else 'const '}double*"


def build_host_library(tmp_dir):
    """Compile the shipped .cu with HOST_SHIM and one C wrapper per kernel instantiation."""
    import ctypes
    import shutil
    import subprocess

    import platform

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        pytest.skip("the host build of the kernels needs a C++ compiler on x86-64 Linux")
    sigs = kernel_signatures()
    wrappers, symbols = [], {}
    for ctype in ("float", "double"):
        for name in _gpu.kernel_names(ctype):
            base, targs = name.split("<", 1)
            targs = [t.strip() for t in targs.rstrip(">").split(",")]
            casts = []
            for i, (pname, kind, elem) in enumerate(sigs[base]):
                ctype_ = {"ptr": _host_param_decl(ctype, pname, elem), "i64": "long long",
                          "f64": "double"}[kind]
                casts.append(f"*reinterpret_cast<{ctype_}*>(a[{i}])")
            symbol = f"cin_host_{len(symbols)}"
            call = f"{base}<{', '.join(targs)}>({', '.join(casts)})"
            wrappers.append(
                f'extern "C" int {symbol}(long long grid, int block, void** a,\n'
                f"    const unsigned long long* ranges, int nranges)\n"
                f"{{ return host::launch(grid, (unsigned)block, [&] {{ {call}; }}, ranges, "
                f"nranges); }}\n")
            symbols[name] = symbol
    src = tmp_dir / "host_kernels.cpp"
    src.write_text(HOST_SHIM + "\n" + _gpu.kernel_source() + "\n" + "".join(wrappers))
    lib = tmp_dir / "host_kernels.so"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib),
                           str(src)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"host build of the kernels failed:\n{proc.stderr[-5000:]}"
    return ctypes.CDLL(str(lib)), symbols


class HostKernels:
    """_gpu._kernel for the host build: the same launches, run on the CPU, with every element
    access checked to lie inside the launch's arrays (writes: inside its outputs) and to be
    aligned."""

    FAULTS = {1: "threads of a block disagree on their barriers", 2: "misaligned access",
              4: "read outside the arrays", 8: "write outside the output arrays"}

    def __init__(self, lib, symbols):
        self.lib, self.symbols, self.launches, self.names = lib, symbols, [], []
        self.sigs = kernel_signatures()

    def kernel(self, device_id, ctype, name):
        import ctypes

        fn = getattr(self.lib, self.symbols[name])
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int]
        params = self.sigs[name.split("<")[0]]

        def launch(grid, block, args):
            self.launches.append(name.split("<")[0])
            self.names.append(name)
            held, ranges = [], []
            for a, (pname, kind, elem) in zip(args, params):
                if a is None:
                    held.append(ctypes.c_void_p(None))
                elif isinstance(a, np.ndarray):
                    ptr = a.__array_interface__["data"][0]
                    held.append(ctypes.c_void_p(ptr))
                    ranges += [ptr, ptr + a.nbytes, int(pname in T_WRITTEN | HOST_WRITTEN)]
                elif type(a) is np.int64:
                    held.append(ctypes.c_longlong(int(a)))
                elif type(a) is np.float64:
                    held.append(ctypes.c_double(float(a)))
                else:
                    raise TypeError(f"{name}: argument of type {type(a)}")
            argv = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
            table = (ctypes.c_ulonglong * max(len(ranges), 1))(*ranges)
            code = fn(grid[0], block[0], argv, table, len(ranges) // 3)
            assert code == 0, f"{name}: " + ", ".join(
                why for bit, why in self.FAULTS.items() if code & bit)

        return launch


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    return build_host_library(tmp_path_factory.mktemp("host_kernels"))


class Backend:
    """Arrays on the backend's device, and the checks that hold on it."""

    def __init__(self, name, xp, emulator=None):
        self.name, self.xp, self.emulator = name, xp, emulator

    def asarray(self, a):
        return None if a is None else self.xp.asarray(np.ascontiguousarray(a))

    def device(self, a):
        """A host array uploaded; a device array as it is (its layout and offset kept: the
        emulated device arrays are NumPy arrays too)."""
        return self.asarray(a) if type(a) is np.ndarray else a

    def asnumpy(self, a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def offset(self, a, elements):
        """a on the device, at an address `elements` past a 256-byte-aligned one."""
        buf = self.xp.empty(a.size + elements, dtype=a.dtype)
        view = buf[elements:elements + a.size].reshape(a.shape)
        view[...] = self.asarray(a)
        return view

    def channels_last(self, base):
        """A device array equal to ``base`` with the channel axis innermost in memory."""
        last = (0,) + tuple(range(2, base.ndim)) + (1,)
        return self.asarray(base.transpose(last)).transpose(
            tuple(int(i) for i in np.argsort(last)))

    def layouts(self, base):
        """Device arrays equal to the C-contiguous ``base`` in several memory layouts."""
        rev = tuple(slice(None, None, -1) for _ in base.shape)
        big = np.full(tuple(2 * s + 1 for s in base.shape), np.nan, dtype=base.dtype)
        big[tuple(slice(1, None, 2) for _ in base.shape)] = base
        out = {
            "contiguous": self.asarray(base),
            "channels_last": self.channels_last(base),
            "fortran": self.asarray(base.T).T,
            "sliced": self.asarray(big)[tuple(slice(1, None, 2) for _ in base.shape)],
            "negative": self.asarray(base[rev])[rev],
        }
        for name, a in out.items():
            assert np.array_equal(self.asnumpy(a), base), name
        return out

    def launches(self):
        return None if self.emulator is None else list(self.emulator.launches)

    def launched_names(self):
        """The kernel instantiations launched since the last reset (None on a device)."""
        return None if self.emulator is None else list(self.emulator.names)

    def reset_launches(self):
        if self.emulator is not None:
            self.emulator.launches.clear()
            self.emulator.names.clear()


@pytest.fixture(params=["emulated", "host", pytest.param("cuda", marks=on_device)])
def backend(request, monkeypatch):
    """emulated: NumPy model of the kernels; host: the kernel source run on the CPU; cuda: the
    kernels on a device."""
    if request.param == "cuda":
        return Backend("cuda", _gpu.require_cupy())
    if request.param == "host":
        kernels = HostKernels(*request.getfixturevalue("host_kernels"))
    else:
        kernels = Emulator()
    monkeypatch.setattr(_gpu, "require_cupy", lambda: FAKE_CUPY)
    monkeypatch.setitem(sys.modules, "cupy", FAKE_CUPY)  # the public API: FakeArray is on a GPU
    monkeypatch.setattr(_gpu, "_kernel", kernels.kernel)
    monkeypatch.setattr(_gpu, "_sm_count", lambda device_id: Emulator.N_SM)
    return Backend(request.param, FAKE_CUPY, kernels)


# ---- shapes at every regime boundary --------------------------------------------------------

def boundary_cases(dtype, kind):
    """(P planes, L) pairs just below and above each regime boundary of ``kind``."""
    per = VN[np.dtype(dtype)]
    few, many = 3, 140  # fewer / more planes than the 132 SMs of an H100 (and most GPUs)
    top = _gpu.BACKWARD_BLOCK_MAX_SLOTS if kind == "backward" else _gpu.FORWARD_BLOCK_MAX_SLOTS
    cases = [(many, 2), (few, 7), (many, 2 * per * 32 + 1),
             (many, _gpu.GROUP_MAX_SLOTS * per), (many, _gpu.GROUP_MAX_SLOTS * per + 1),
             (few, _gpu.SMALL_PLANE_SLOTS * per), (few, _gpu.SMALL_PLANE_SLOTS * per + 3),
             (many, top * per), (few, top * per + 1), (1, 3 * _gpu.MIN_CHUNK_SLOTS * per + 5)]
    if kind == "backward" or np.dtype(dtype) == np.float64:
        cases.append((many, top * per + 1))  # chunked with many planes: few chunks each
    return cases


def _shape(P, L):
    """An (N, C, L) shape with N*C = P, C > 1 where possible (per-channel parameters)."""
    C = next(c for c in (5, 4, 3, 2, 1) if P % c == 0)
    return (P // C, C, L)


def _regimes_seen(cases, kind, dtype):
    return {_gpu.choose_plan(kind, P, L, np.dtype(dtype).itemsize, 0, 132).regime
            for P, L in cases}


@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_boundary_cases_cover_every_regime(dtype, kind):
    assert _regimes_seen(boundary_cases(dtype, kind), kind, dtype) == {"group", "block", "chunk"}


# LeakyReLU's negative slope in the fused tests (not torch's default, so that it must be passed)
SLOPE = 0.2


def forward_and_check(backend, x, w=None, b=None, eps=1e-5, plan=None, tol_dtype=None,
                      residual=None, act=0):
    """_gpu.forward on a device copy of x (with the activation of code act, slope SLOPE, and a
    device residual), checked against the reference; returns launches."""
    backend.reset_launches()
    y, mean, var, rstd = _gpu.forward(backend.device(x), backend.asarray(w), backend.asarray(b),
                                      eps, plan=plan, residual=residual, act=act, slope=SLOPE)
    x_host = backend.asnumpy(x)
    ry, rmean, rrstd = ref.forward_act(
        x_host, w, b, eps, ref.ACTIVATIONS[act], SLOPE,
        None if residual is None else backend.asnumpy(residual))
    _, rvar = ref.plane_mean_var(x_host)
    assert stride_order(y) == stride_order(x)  # every caller's x is dense
    y = backend.asnumpy(y)
    assert y.dtype == x_host.dtype and y.shape == x_host.shape
    assert_close(y, ry, tol_dtype)
    N, C = x_host.shape[:2]
    for got, want in ((mean, rmean), (var, rvar), (rstd, rrstd)):
        got = backend.asnumpy(got)
        assert got.dtype == np.float64 and got.shape == (N * C,)
        scale = np.maximum(np.abs(want), 1.0).reshape(-1)
        assert np.all(np.abs(got - want.reshape(-1)) <= 1e-5 * scale)
    return backend.launches()


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_at_regime_boundaries(backend, rng, dtype):
    for P, L in boundary_cases(dtype, "forward"):
        x = make_x(rng, _shape(P, L), dtype)
        w, b = make_affine(rng, x.shape[1], dtype)
        launches = forward_and_check(backend, x, w, b)
        assert launches is None or len(launches) <= 2, (P, L, launches)


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_at_regime_boundaries(backend, rng, dtype, use_input_stats):
    for P, L in boundary_cases(dtype, "backward"):
        shape = _shape(P, L)
        x = make_x(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w, _ = make_affine(rng, shape[1], dtype)
        mean, rstd = ref.instance_stats(x)
        if not use_input_stats:  # running statistics: per channel, not the planes' own
            mean = np.broadcast_to(rng.normal(size=shape[1]), shape[:2])
            rstd = np.broadcast_to(rng.uniform(0.5, 2.0, shape[1]), shape[:2])
        backward_and_check(backend, dy, x, mean, rstd, w, use_input_stats)


def backward_and_check(backend, dy, x, mean, rstd, w, use_input_stats, plan=None, b=None,
                       act=0):
    """_gpu.backward (through the activation of code act, slope SLOPE, whose pre-activation
    reads the bias b) checked against the reference."""
    backend.reset_launches()
    dx, sdy, sdyx = _gpu.backward(
        backend.device(dy), backend.device(x),
        backend.asarray(np.ascontiguousarray(mean).reshape(-1)),
        backend.asarray(np.ascontiguousarray(rstd).reshape(-1)), backend.asarray(w),
        use_input_stats, plan=plan, bias=backend.asarray(b), act=act, slope=SLOPE)
    x_host, dy_host = backend.asnumpy(x), backend.asnumpy(dy)
    rdx, rdw, rdb = ref.backward_act(dy_host, x_host, mean, rstd,
                                     np.ones(x_host.shape[1]) if w is None else w, b,
                                     ref.ACTIVATIONS[act], SLOPE, use_input_stats)
    dx = backend.asnumpy(dx)
    assert dx.dtype == x_host.dtype and dx.shape == x_host.shape
    assert_close(dx, rdx, x_host.dtype, grad=True)
    N, C = x_host.shape[:2]
    assert_close(backend.asnumpy(sdy).reshape(N, C).sum(axis=0), rdb, np.float64 if
                 x_host.dtype == np.float64 else np.float32, grad=True)
    assert_close(backend.asnumpy(sdyx).reshape(N, C).sum(axis=0), rdw, np.float64 if
                 x_host.dtype == np.float64 else np.float32, grad=True)
    launches = backend.launches()
    assert launches is None or len(launches) <= 2


def forced_plans(kind, P, L, itemsize, fused=False):
    """Every regime that can run this case, with several chunkings (sized for planes that may
    start anywhere in a 16-byte slot); ``fused``: a forward with an activation or residual."""
    ns = _gpu.plane_slots(L, itemsize, _gpu.VEC_BYTES // itemsize - 1)
    plans = []
    if ns <= _gpu.GROUP_MAX_SLOTS:
        for slots in _gpu.GROUP_SLOTS:
            for group in (1, 2, 4, 8, 16, 32):
                if slots * group >= ns:
                    plans.append(_gpu.Plan("group", slots, _gpu.GROUP_THREADS, group))
                    break
    if kind != "fixed":
        choices = _gpu.BACKWARD_BLOCK_SLOTS if kind == "backward" else \
            _gpu._forward_block_slots(fused)
        for slots in choices:
            threads = 32 * -(-ns // (32 * slots))
            if threads <= _gpu.BLOCK_MAX_THREADS:
                plans.append(_gpu.Plan("block", slots, threads))
    tiny = 1 if ns <= 64 else 5 if ns <= 320 else ns // 16 + 1  # partial windows, <= 64 chunks
    for chunk_slots in sorted({tiny, 64, ns}):
        plans.append(_gpu.Plan("chunk", 0, _gpu.CHUNK_THREADS, 1, -(-ns // chunk_slots),
                               chunk_slots))
    return plans


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [5, 64, 999, 4097])
def test_forward_every_regime_same_numbers(backend, rng, dtype, L, offset):
    x = make_x(rng, (2, 3, L), dtype)
    w, b = make_affine(rng, 3, dtype)
    xd = backend.offset(x, offset)
    for plan in forced_plans("forward", 6, L, np.dtype(dtype).itemsize):
        forward_and_check(backend, xd, w, b, plan=plan)


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [6, 200, 3001])
def test_backward_every_regime_same_numbers(backend, rng, dtype, L, use_input_stats, offsets):
    """Planes misaligned alike (vector access with partial head slots) and differently (the
    element-by-element path)."""
    shape = (2, 3, L)
    x = make_x(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, _ = make_affine(rng, 3, dtype)
    mean, rstd = ref.instance_stats(x)
    xd, dyd = backend.offset(x, offsets[0]), backend.offset(dy, offsets[1])
    for plan in forced_plans("backward", 6, L, np.dtype(dtype).itemsize):
        backward_and_check(backend, dyd, xd, mean, rstd, w, use_input_stats, plan=plan)


@pytest.mark.parametrize("stats_shape", ["C", "NC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [3, 1024, 1025, 40000])
def test_forward_fixed(backend, rng, dtype, L, stats_shape):
    x = make_x(rng, (2, 5, L), dtype)
    w, b = make_affine(rng, 5, dtype)
    shape = (5,) if stats_shape == "C" else (2, 5)
    mean, var = rng.normal(size=shape), rng.uniform(0.5, 2.0, shape)
    for plan in [None] + forced_plans("fixed", 10, L, np.dtype(dtype).itemsize):
        backend.reset_launches()
        y = _gpu.forward_fixed(backend.asarray(x), backend.asarray(mean), backend.asarray(var),
                               backend.asarray(w), backend.asarray(b), 1e-3, plan=plan)
        m2, v2 = np.broadcast_to(mean, (2, 5)), np.broadcast_to(var, (2, 5))
        assert_close(backend.asnumpy(y), ref.normalize(x, m2, 1 / np.sqrt(v2 + 1e-3), w, b))
        launches = backend.launches()
        assert launches is None or len(launches) == 1


@pytest.mark.parametrize("L", [100, 5000, 70000])
def test_float32_large_offset_is_accurate(backend, rng, L):
    """Mean 1e5, std 1: within 1e-5 (torch's x*alpha + beta loses about 5e-3)."""
    x = (1e5 + rng.standard_normal((2, 2, L))).astype(np.float32)
    for plan in [None] + forced_plans("forward", 4, L, 4)[-2:]:
        y, _, _, _ = _gpu.forward(backend.asarray(x), plan=plan)
        ry, _, _ = ref.forward(x)
        assert np.abs(backend.asnumpy(y) - ry).max() <= 1e-5


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("L", [100, 5000, 70000])
def test_float32_large_offset_backward_is_accurate(backend, rng, L, use_input_stats):
    """Mean 1e5: the kernels work around k = mean rounded to float32; the difference between k
    and the float64 mean must be carried into sum(dy * (x - mean)) and dx."""
    x = (1e5 + rng.standard_normal((2, 2, L))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.array([1.5, -0.5])
    mean, rstd = ref.instance_stats(x)
    for plan in [None] + forced_plans("backward", 4, L, 4)[-2:]:
        backward_and_check(backend, dy, x, mean, rstd, w, use_input_stats, plan=plan)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_keep_numbers_and_stride_order(backend, rng, dtype):
    base = make_x(rng, (2, 3, 5, 6), dtype)
    for name, xd in backend.layouts(base).items():
        y, _, _, _ = _gpu.forward(xd)
        assert_close(backend.asnumpy(y), ref.forward(base)[0], err_msg=name)
        if name in ("channels_last", "fortran", "contiguous"):
            assert stride_order(y) == stride_order(xd), name
        dx, _, _ = _gpu.backward(xd, xd, *(backend.asarray(s.reshape(-1))
                                           for s in ref.instance_stats(base)))
        assert_close(backend.asnumpy(dx), ref.backward(base, base, *ref.instance_stats(base))[0],
                     grad=True, err_msg=name)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("L", [16, 3000, 50000])
def test_nan_poisons_only_its_plane(backend, rng, L):
    x = make_x(rng, (2, 3, L), np.float32)
    x[1, 2, L // 2] = np.nan
    x[0, 1, 0] = np.inf
    y, mean, var, rstd = _gpu.forward(backend.asarray(x))
    y = backend.asnumpy(y)
    bad = np.zeros((2, 3), bool)
    bad[1, 2] = bad[0, 1] = True
    assert np.isnan(y[bad]).all()
    assert np.isfinite(y[~bad]).all()
    assert_close(y[~bad], ref.forward(x)[0][~bad])
    assert np.isnan(backend.asnumpy(mean).reshape(2, 3)[1, 2])


def test_float16_computes_in_float32(backend, rng):
    x = make_x(rng, (2, 3, 33), np.float16)
    y, mean, _, _ = _gpu.forward(backend.asarray(x))
    assert backend.asnumpy(y).dtype == np.float16
    assert_close(backend.asnumpy(y), ref.forward(x)[0])
    dx, _, _ = _gpu.backward(backend.asarray(x), backend.asarray(x), mean,
                             backend.asarray(ref.instance_stats(x)[1].reshape(-1)))
    assert backend.asnumpy(dx).dtype == np.float16


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_zero_size(backend, shape):
    x = backend.asarray(np.zeros(shape, np.float32))
    y, mean, var, rstd = _gpu.forward(x)
    assert backend.asnumpy(y).shape == shape
    assert np.isnan(backend.asnumpy(mean)).all() and backend.asnumpy(mean).shape == (
        shape[0] * shape[1],)
    assert backend.asnumpy(_gpu.forward_fixed(x, np.zeros(3), np.ones(3))).shape == shape
    dx, sdy, sdyx = _gpu.backward(x, x, np.zeros(shape[0] * shape[1]),
                                  np.ones(shape[0] * shape[1]))
    assert backend.asnumpy(dx).shape == shape and not backend.asnumpy(sdy).any()


def test_per_sample_parameters(backend, rng):
    """weight/bias of shape (N, C) (AdaIN-style) are read per plane."""
    x = make_x(rng, (3, 4, 50), np.float64)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    y, _, _, _ = _gpu.forward(backend.asarray(x), backend.asarray(w), backend.asarray(b))
    mean, rstd = ref.instance_stats(x)
    want = (x - mean[..., None]) * rstd[..., None] * w[..., None] + b[..., None]
    assert_close(backend.asnumpy(y), want)


def test_emulated_backend_catches_uncovered_chunks(backend, rng, monkeypatch):
    """The emulated outputs start as NaN: a plan whose chunks miss elements must fail."""
    if backend.name != "emulated":
        pytest.skip("a check of the emulator itself")
    x = make_x(rng, (1, 2, 100), np.float32)
    short = _gpu.Plan("chunk", 0, _gpu.CHUNK_THREADS, 1, 2, 5)  # 10 of 25 slots
    with pytest.raises(ValueError, match="cannot run"):
        _gpu.forward(backend.asarray(x), plan=short)
    monkeypatch.setattr(_gpu, "_check_plan", lambda *args: None)
    with pytest.raises(AssertionError):
        forward_and_check(backend, x, plan=short)


# ---- the fused activation and residual in every regime (issue 14) ----------------------------

# L = 333: a plane fits the group regime for both dtypes and splits into several chunks.
FUSED_SHAPE = (2, 3, 9, 37)
# (flag, affine, layout): flag is the residual (forward) or use_input_stats (backward).
FUSED_COMBOS = [(flag, affine, layout) for flag in (False, True) for affine in (False, True)
                for layout in ("nchw", "channels_last")]


def fused_combos(backend, plan_index, plan, act):
    """The FUSED_COMBOS to run with one forced plan: all of them, except on the host backend
    (the kernel source on fibers: slow), where each plan runs the pair that differs only in
    the flag, the affine parameters and the layout rotating with the plan and the activation,
    and plans of many small chunks are left to the other backends (the chunk kernels' partial
    slots at the plane's ends are in the plans of few chunks too)."""
    if backend.name != "host":
        return FUSED_COMBOS
    if plan.regime == "chunk" and plan.chunks > 4:
        return []
    i = (plan_index + act) % 4
    return [FUSED_COMBOS[i], FUSED_COMBOS[i + 4]]


def fused_device(backend, a, layout):
    """a on the device: NCHW, channels-last, or NCHW one element past an aligned address
    ('offset': the kernels then read it element by element)."""
    if layout == "channels_last":
        return backend.channels_last(a)
    return backend.offset(a, 1) if layout == "offset" else backend.asarray(a)


def residual_layout(layout, affine):
    """A residual layout other than x's: NCHW for channels-last x; for NCHW x channels-last
    (converted to x's planes) or misaligned against x (no 16-byte access)."""
    if layout == "channels_last":
        return "nchw"
    return "channels_last" if affine else "offset"


def assert_fused_kernels(backend, fused):
    """Every launched kernel that has a FUSED template flag has it as the call needs: true with
    an activation (or a forward residual), false for a plain call (no check on a device)."""
    names = backend.launched_names()
    if names is None:
        return
    flags = {n[:-1].rsplit(",", 1)[1].strip() for n in names if "chunk_stats" not in n}
    assert flags == {"true" if fused else "false"}, names


@pytest.mark.parametrize("act", range(len(ref.ACTIVATIONS)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_forward_every_regime(backend, rng, dtype, act):
    """y = act(xhat * w + b) + residual in every regime, with and without the residual and the
    affine parameters, NCHW and channels-last x, the residual in another layout."""
    x, r = make_x(rng, FUSED_SHAPE, dtype), make_x(rng, FUSED_SHAPE, dtype)
    w, b = make_affine(rng, FUSED_SHAPE[1], dtype)
    P, L = 6, x[0, 0].size
    for i, plan in enumerate(forced_plans("forward", P, L, x.itemsize, fused=True)):
        for residual, affine, layout in fused_combos(backend, i, plan, act):
            xd = fused_device(backend, x, layout)
            rd = fused_device(backend, r, residual_layout(layout, affine)) if residual else None
            forward_and_check(backend, xd, *((w, b) if affine else (None, None)), plan=plan,
                              residual=rd, act=act)
            assert_fused_kernels(backend, act != 0 or residual)


@pytest.mark.parametrize("act", range(len(ref.ACTIVATIONS)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backward_every_regime(backend, rng, dtype, act):
    """dx, sum(g) and sum(g * xhat) with g = dy * act'(t), t recomputed from x, the statistics,
    the weight and the bias, in every regime (both chunk kernels read dy), with instance and
    running statistics, with and without the affine parameters, NCHW and channels-last."""
    x, dy = make_x(rng, FUSED_SHAPE, dtype), rng.standard_normal(FUSED_SHAPE).astype(dtype)
    N, C = FUSED_SHAPE[:2]
    w, b = make_affine(rng, C, dtype)
    stats = {True: ref.instance_stats(x),
             False: (np.broadcast_to(rng.normal(size=C), (N, C)),
                     np.broadcast_to(rng.uniform(0.5, 2.0, C), (N, C)))}
    for i, plan in enumerate(forced_plans("backward", N * C, x[0, 0].size, x.itemsize)):
        for use_input_stats, affine, layout in fused_combos(backend, i, plan, act):
            backward_and_check(backend, fused_device(backend, dy, layout),
                               fused_device(backend, x, layout), *stats[use_input_stats],
                               w if affine else None, use_input_stats, plan=plan,
                               b=b if affine else None, act=act)
            assert_fused_kernels(backend, act != 0)


def test_fused_forward_fixed_every_regime(backend, rng):
    """Running statistics (eval): the activation and the residual in the group and chunk
    kernels' fixed-statistics path."""
    x, r = make_x(rng, FUSED_SHAPE, np.float32), make_x(rng, FUSED_SHAPE, np.float32)
    w, b = make_affine(rng, FUSED_SHAPE[1], np.float32)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    rstd = np.broadcast_to(1 / np.sqrt(var + 1e-3), (2, 3))
    for i, plan in enumerate(forced_plans("fixed", 6, x[0, 0].size, 4)):
        act = 1 + i % (len(ref.ACTIVATIONS) - 1)
        rd = fused_device(backend, r, "channels_last")
        backend.reset_launches()
        y = _gpu.forward_fixed(backend.asarray(x), backend.asarray(mean), backend.asarray(var),
                               backend.asarray(w), backend.asarray(b), 1e-3, plan=plan,
                               residual=rd, act=act, slope=SLOPE)
        t = ref.normalize(x, np.broadcast_to(mean, (2, 3)), rstd, w, b)
        assert_close(backend.asnumpy(y), ref.activation(t, ref.ACTIVATIONS[act], SLOPE) + r)
        assert_fused_kernels(backend, True)


# ---- the public API on device arrays (every backend) -----------------------------------------

class TestPublicApi:
    """cinstnorm's public functions and modules given CuPy arrays (issue #4, part 1): on the
    emulated and host backends the stand-in CuPy is installed as ``sys.modules['cupy']``, so the
    public API sees its arrays as device arrays and routes them to ``_gpu``."""

    @pytest.fixture
    def cp(self, backend):
        return backend.xp

    @staticmethod
    def host(a):
        return _gpu.to_cpu(a)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_functional_matches_cpu(self, cp, backend, rng, dtype):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 17, 19), dtype)
        w, b = make_affine(rng, 3, dtype)
        backend.reset_launches()
        y = cin.instance_norm(cp.asarray(x), weight=cp.asarray(w), bias=cp.asarray(b))
        assert isinstance(y, cp.ndarray) and y.dtype == dtype
        assert backend.launches() in (None, ["cin_fwd_group"])
        assert_close(self.host(y), ref.forward(x, w, b)[0])
        y, mean, rstd = cin.instance_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
        assert all(isinstance(a, cp.ndarray) for a in (y, mean, rstd))
        assert mean.shape == rstd.shape == (2, 3) and mean.dtype == dtype
        dy = rng.standard_normal(x.shape).astype(dtype)
        dx, dw, db = cin.instance_norm_backward(cp.asarray(dy), cp.asarray(x), mean, rstd,
                                                cp.asarray(w))
        assert all(isinstance(a, cp.ndarray) for a in (dx, dw, db))
        rdx, rdw, rdb = ref.backward(dy, x, *ref.instance_stats(x), w)
        assert_close(self.host(dx), rdx, grad=True)
        assert_close(self.host(dw), rdw, grad=True)
        assert_close(self.host(db), rdb, grad=True)

    @pytest.mark.parametrize("use_input_stats", [True, False])
    def test_functional_running_buffers_on_device(self, cp, rng, use_input_stats):
        import cinstnorm as cin

        x = make_x(rng, (3, 4, 6, 5), np.float32)
        rm = rng.standard_normal(4).astype(np.float32)
        rv = rng.uniform(0.5, 2.0, 4).astype(np.float32)
        rm_d, rv_d = cp.asarray(rm), cp.asarray(rv)
        rm_c, rv_c = rm.copy(), rv.copy()
        y = cin.instance_norm(cp.asarray(x), rm_d, rv_d, use_input_stats=use_input_stats,
                              momentum=0.3)
        want = cin.instance_norm(x, rm_c, rv_c, use_input_stats=use_input_stats, momentum=0.3)
        assert isinstance(y, cp.ndarray)
        assert_close(self.host(y), want.astype(np.float64))
        assert_close(self.host(rm_d), rm_c.astype(np.float64))  # updated in place, same object
        assert_close(self.host(rv_d), rv_c.astype(np.float64))
        assert np.array_equal(self.host(rm_d), rm) != use_input_stats

    def test_out_and_in_place(self, cp, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 40), np.float64)
        out = cp.empty(x.shape, dtype=np.float64)
        y = cin.instance_norm(cp.asarray(x), out=out)
        assert y is out
        assert_close(self.host(out), ref.forward(x)[0])
        xd = cp.asarray(x)
        assert cin.instance_norm(xd, out=xd) is xd
        assert_close(self.host(xd), ref.forward(x)[0])
        with pytest.raises(TypeError, match="out is on cpu"):
            cin.instance_norm(cp.asarray(x), out=np.empty_like(x))
        with pytest.raises(ValueError, match="shape"):
            cin.instance_norm(cp.asarray(x), out=cp.empty((2, 3, 41)))

    def test_mixed_devices_in_functional_calls_are_clear_errors(self, cp, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 8), np.float32)
        w, b = make_affine(rng, 3, np.float32)
        xd, wd = cp.asarray(x), cp.asarray(w)
        with pytest.raises(TypeError, match="weight is on cpu but the input is on cuda:0"):
            cin.instance_norm(xd, weight=w)
        with pytest.raises(TypeError, match="weight is on cuda:0 but the input is on cpu"):
            cin.instance_norm(x, weight=wd)
        with pytest.raises(TypeError, match="running_mean is on cpu"):
            cin.instance_norm(xd, np.zeros(3, np.float32), cp.asarray(np.ones(3, np.float32)))
        y, mean, rstd = cin.instance_norm_forward(xd, wd)
        with pytest.raises(TypeError, match="dy is on cpu"):
            cin.instance_norm_backward(np.ones_like(x), xd, mean, rstd, wd)
        with pytest.raises(TypeError, match="mean is on cuda:0"):
            cin.instance_norm_backward(np.ones_like(x), x, mean, rstd)
        with pytest.raises(TypeError, match="style is on cpu but content is on cuda:0"):
            cin.adain(xd, x)
        # lists are not arrays on either side: converted, not refused
        assert isinstance(cin.instance_norm(xd, weight=[1.0, 2.0, 3.0]), cp.ndarray)

    def test_validation_is_the_cpu_validation(self, cp, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 8), np.float32)
        for call in (lambda a: cin.instance_norm(a[0]),  # 2D
                     lambda a: cin.instance_norm(a, weight=cp.asarray(np.ones(4, np.float32))
                                                 if isinstance(a, cp.ndarray) else
                                                 np.ones(4, np.float32)),
                     lambda a: cin.instance_norm(a[:, :, :1]),  # one spatial element
                     lambda a: cin.instance_norm(a, eps=-1.0),
                     lambda a: cin.instance_norm(a, use_input_stats=False)):
            with pytest.raises(ValueError) as on_cpu:
                call(x)
            with pytest.raises(ValueError) as on_device:
                call(cp.asarray(x))
            assert str(on_cpu.value) == str(on_device.value)
        with pytest.raises(TypeError, match="int32"):
            cin.instance_norm(cp.asarray(x.astype(np.int32)))

    def test_float16_and_layouts(self, cp, backend, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 5, 7), np.float16)
        y = cin.instance_norm(cp.asarray(x))
        assert isinstance(y, cp.ndarray) and y.dtype == np.float16
        assert_close(self.host(y), ref.forward(x)[0])
        base = make_x(rng, (2, 3, 5, 7), np.float32)
        for name, xd in backend.layouts(base).items():
            y = cin.instance_norm(xd)
            assert stride_order(y) == stride_order(xd), name
            assert_close(self.host(y), ref.forward(base)[0], err_msg=name)

    def test_empty_input(self, cp):
        import cinstnorm as cin

        x = cp.asarray(np.zeros((0, 3, 4), np.float32))
        y, mean, rstd = cin.instance_norm_forward(x)
        assert isinstance(y, cp.ndarray) and y.shape == (0, 3, 4)
        assert isinstance(mean, cp.ndarray) and mean.shape == (0, 3)
        y, mean, rstd = cin.instance_norm_forward(cp.asarray(np.zeros((2, 3, 0), np.float32)))
        assert np.isnan(self.host(mean)).all() and np.isnan(self.host(rstd)).all()

    def test_per_sample_affine_and_adain(self, cp, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 9, 4), np.float64)
        s = make_x(rng, (2, 3, 5, 6), np.float64)
        w, b = rng.uniform(0.5, 2, (2, 3)), rng.standard_normal((2, 3))
        dy = rng.standard_normal(x.shape)
        y, mean, rstd = cin.instance_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
        yc, meanc, rstdc = cin.instance_norm_forward(x, w, b)
        assert_close(self.host(y), yc)
        grads = cin.instance_norm_backward(cp.asarray(dy), cp.asarray(x), mean, rstd,
                                           cp.asarray(w))
        for got, want in zip(grads, cin.instance_norm_backward(dy, x, meanc, rstdc, w)):
            assert isinstance(got, cp.ndarray) and got.shape == want.shape
            assert_close(self.host(got), want, grad=True)
        ya = cin.adain(cp.asarray(x), cp.asarray(s))
        assert isinstance(ya, cp.ndarray)
        assert_close(self.host(ya), cin.adain(x, s))
        for got, want in zip(cin.adain_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(s)),
                             cin.adain_backward(dy, x, s)):
            assert isinstance(got, cp.ndarray)
            assert_close(self.host(got), want, grad=True)

    @pytest.mark.parametrize("momentum", [0.1, None])
    @pytest.mark.parametrize("mode", ["train", "eval"])
    @pytest.mark.parametrize("track", [False, True])
    @pytest.mark.parametrize("affine", [False, True])
    def test_modules_match_cpu_modules(self, cp, rng, affine, track, mode, momentum):
        import cinstnorm as cin

        gpu = cin.InstanceNorm2d(3, affine=affine, track_running_stats=track, device="cuda",
                                 momentum=momentum)
        cpu = cin.InstanceNorm2d(3, affine=affine, track_running_stats=track,
                                 momentum=momentum)
        assert gpu.device == "cuda:0" and cpu.device == "cpu"
        if affine:
            w, b = make_affine(rng, 3, np.float32)
            cpu.load_state_dict({"weight": w, "bias": b}, strict=False)
            gpu.load_state_dict({"weight": cp.asarray(w), "bias": b}, strict=False)
            assert isinstance(gpu.weight, cp.ndarray) and isinstance(gpu.bias, cp.ndarray)
        buffers = (gpu.running_mean, gpu.running_var)
        for step in range(3):
            if mode == "eval" and step == 2:
                cpu.eval()
                gpu.eval()
            x = make_x(rng, (2, 3, 9, 11), np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            y_gpu, y_cpu = gpu(cp.asarray(x)), cpu(x)
            assert isinstance(y_gpu, cp.ndarray)
            assert_close(self.host(y_gpu), y_cpu)
            dx = gpu.backward(cp.asarray(dy))
            assert isinstance(dx, cp.ndarray)
            assert_close(self.host(dx), cpu.backward(dy), grad=True)
        assert (gpu.running_mean, gpu.running_var) == buffers or not track  # same objects
        assert gpu.num_batches_tracked == cpu.num_batches_tracked
        state = gpu.state_dict()
        assert list(state) == list(cpu.state_dict())
        for key, value in cpu.state_dict().items():
            got = state[key]
            if key == "num_batches_tracked":
                assert isinstance(got, np.ndarray) and got.dtype == np.int64
            else:
                assert isinstance(got, cp.ndarray), key
            assert_close(self.host(got), np.asarray(value, np.float64), np.float32, grad=True)
        if affine:
            assert isinstance(gpu.weight_grad, cp.ndarray)
            assert_close(self.host(gpu.weight_grad), cpu.weight_grad, grad=True)
            assert_close(self.host(gpu.bias_grad), cpu.bias_grad, grad=True)

    def test_unbatched_input_on_a_module(self, cp, rng):
        import cinstnorm as cin

        m = cin.InstanceNorm1d(3, affine=True, device="cuda", dtype=np.float64)
        x = make_x(rng, (3, 10), np.float64)
        y = m(cp.asarray(x))
        assert isinstance(y, cp.ndarray) and y.shape == (3, 10)
        assert_close(self.host(y), ref.forward(x[None])[0][0])
        assert m.backward(cp.asarray(np.ones_like(x))).shape == (3, 10)

    def test_module_to_moves_parameters(self, cp, rng):
        import cinstnorm as cin

        m = cin.InstanceNorm1d(4, affine=True, track_running_stats=True)
        x = make_x(rng, (2, 4, 6), np.float32)
        m(x)
        m.backward(np.ones_like(x))
        state = {k: np.array(v) for k, v in m.state_dict().items()}
        assert m.to("cuda") is m and m.device == "cuda:0"
        for name in ("weight", "bias", "running_mean", "running_var", "weight_grad",
                     "bias_grad"):
            assert isinstance(getattr(m, name), cp.ndarray), name
        with pytest.raises(RuntimeError, match="before forward"):  # the saved input stayed
            m.backward(cp.asarray(np.ones_like(x)))
        m.cpu()
        assert m.device == "cpu"
        for name in ("weight", "bias", "running_mean", "running_var", "weight_grad"):
            assert type(getattr(m, name)) is np.ndarray, name
        for k, v in m.state_dict().items():
            assert np.array_equal(v, state[k]), k
        assert m.cuda().device == "cuda:0" and m.to("cuda:0").device == "cuda:0"
        with pytest.raises(ValueError, match="device must be"):
            m.to("tpu")
        assert m.device == "cuda:0"

    def test_load_state_dict_from_host_or_device(self, cp, rng):
        import cinstnorm as cin

        m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True, device="cuda")
        sd = {"weight": np.arange(3.0), "bias": cp.asarray(np.ones(3)),
              "running_mean": [1.0, 2.0, 3.0], "running_var": cp.asarray(np.full(3, 2.0)),
              "num_batches_tracked": np.array(7)}
        weight = m.weight
        m.load_state_dict(sd)
        assert m.weight is weight and isinstance(m.weight, cp.ndarray)
        assert m.weight.dtype == np.float32
        assert np.array_equal(self.host(m.running_mean), [1, 2, 3]) and m.num_batches_tracked == 7
        with pytest.raises(ValueError, match="size mismatch for running_var"):
            m.load_state_dict({**sd, "running_var": cp.asarray(np.ones(4))})
        cpu = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
        cpu.load_state_dict(m.state_dict())
        assert type(cpu.weight) is np.ndarray and np.array_equal(cpu.weight, [0, 1, 2])

    def test_fused_validation_raises_before_any_launch(self, cp, backend, rng):
        """Unknown activations, bad slopes and residuals of the wrong shape, dtype or device
        raise the CPU's errors on device arrays before any kernel runs, modifying nothing."""
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 5, 7), np.float32)
        w, b = make_affine(rng, 3, np.float32)
        mean, rstd = (s.astype(np.float32) for s in ref.instance_stats(x))
        host = dict(x=x, dy=rng.standard_normal(x.shape).astype(np.float32), w=w, b=b,
                    rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32), mean=mean,
                    rstd=rstd, out=np.full_like(x, 7.0), r=x + 1)

        def calls(a):
            """(error type, call) on the arrays a (all on the host or all on the device)."""
            def fwd(**kw):
                return cin.instance_norm_forward(a["x"], a["w"], a["b"], out=a["out"], **kw)

            def norm(**kw):  # tracking: the buffers would be updated
                return cin.instance_norm(a["x"], a["rm"], a["rv"], a["w"], a["b"],
                                         out=a["out"], **kw)

            def bwd(**kw):
                return cin.instance_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                  a["w"], a["b"], out=a["out"], **kw)

            bad = [(ValueError, dict(activation="tanh")), (TypeError, dict(activation=1)),
                   (ValueError, dict(activation="leaky_relu", negative_slope=float("nan"))),
                   (ValueError, dict(activation="relu", negative_slope=float("inf"))),
                   (TypeError, dict(negative_slope="0.2"))]
            out = [(err, lambda f=f, kw=kw: f(**kw)) for err, kw in bad for f in (fwd, norm, bwd)]
            for err, r in ((ValueError, a["r"][:, :, :4]), (TypeError, a["r"].astype(np.int32))):
                out += [(err, lambda f=f, r=r: f(activation="relu", residual=r))
                        for f in (fwd, norm)]
            return out

        device = {k: cp.asarray(v.copy()) for k, v in host.items()}
        cpu = {k: v.copy() for k, v in host.items()}
        for (err, on_cpu), (_, on_device) in zip(calls(cpu), calls(device)):
            with pytest.raises(err) as want:
                on_cpu()
            backend.reset_launches()
            with pytest.raises(err) as got:
                on_device()
            assert str(got.value) == str(want.value)
            assert backend.launches() in (None, [])
        with pytest.raises(TypeError, match="residual is on cpu"):
            cin.instance_norm_forward(device["x"], residual=x)
        for k, v in host.items():
            assert np.array_equal(self.host(device[k]), v), k
            assert np.array_equal(cpu[k], v), k

    def test_fused_calls_match_the_cpu_and_plain_calls_stay_plain(self, cp, backend, rng):
        """The activation and the residual through the public API on device arrays give the
        CPU's numbers; a call without them (a slope alone is not an activation) launches the
        kernels with FUSED = false, one with them FUSED = true."""
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 5, 7), np.float64)
        r, dy = make_x(rng, x.shape, np.float64), rng.standard_normal(x.shape)
        w, b = make_affine(rng, 3, np.float64)
        xd, rd, dyd, wd, bd = (cp.asarray(a) for a in (x, r, dy, w, b))
        for kw, fused in (({}, False), (dict(negative_slope=0.3), False),
                          (dict(activation="gelu"), True), (dict(residual=r), True),
                          (dict(activation="leaky_relu", negative_slope=0.3, residual=r), True)):
            kw_device = {k: rd if k == "residual" else v for k, v in kw.items()}
            backend.reset_launches()
            y, mean, rstd = cin.instance_norm_forward(xd, wd, bd, **kw_device)
            assert_fused_kernels(backend, fused)
            want = cin.instance_norm_forward(x, w, b, **kw)
            for got, cpu in zip((y, mean, rstd), want):
                assert_close(self.host(got), cpu)
            kw.pop("residual", None)
            backend.reset_launches()
            grads = cin.instance_norm_backward(dyd, xd, mean, rstd, wd, bd, **kw)
            assert_fused_kernels(backend, "activation" in kw)
            for got, cpu in zip(grads, cin.instance_norm_backward(dy, x, want[1], want[2], w, b,
                                                                  **kw)):
                assert_close(self.host(got), cpu, grad=True)
        # out may be the residual itself; float16 x computes in float32 (a float64 residual too)
        out = cp.asarray(r)
        y = cin.instance_norm_forward(xd, residual=out, out=out, activation="relu")[0]
        assert y is out
        assert_close(self.host(out), cin.instance_norm_forward(x, residual=r, activation="relu")[0])
        h = x.astype(np.float16)
        y = cin.instance_norm(cp.asarray(h), residual=rd, activation="silu")
        assert y.dtype == np.float16
        assert_close(self.host(y), cin.instance_norm(h, residual=r, activation="silu"))

    def test_module_with_activation_matches_cpu_module(self, cp, rng):
        import cinstnorm as cin

        kw = dict(affine=True, track_running_stats=True, activation="silu")
        gpu, cpu = cin.InstanceNorm2d(3, device="cuda", **kw), cin.InstanceNorm2d(3, **kw)
        for step in range(3):
            if step == 2:  # the running statistics: the fixed-statistics kernels
                gpu.eval()
                cpu.eval()
            x = make_x(rng, (2, 3, 6, 7), np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            assert_close(self.host(gpu(cp.asarray(x))), cpu(x))
            assert_close(self.host(gpu.backward(cp.asarray(dy))), cpu.backward(dy), grad=True)
        assert_close(self.host(gpu.weight_grad), cpu.weight_grad, grad=True)

    def test_mixing_devices_is_a_clear_error(self, cp, rng):
        import cinstnorm as cin

        x = make_x(rng, (2, 3, 10), np.float32)
        m = cin.InstanceNorm1d(3, affine=True)
        with pytest.raises(TypeError, match="input is on cuda:0 but this InstanceNorm1d's "
                                            "parameters and buffers are on cpu"):
            m(cp.asarray(x))
        g = cin.InstanceNorm1d(3, affine=True, device="cuda")
        with pytest.raises(TypeError, match="input is on cpu .* on cuda:0"):
            g(x)
        g(cp.asarray(x))
        with pytest.raises(TypeError, match="dy is on cpu"):
            g.backward(np.ones_like(x))
        # without parameters or buffers there is nothing to mix: either kind of input runs
        plain = cin.InstanceNorm1d(3)
        assert isinstance(plain(cp.asarray(x)), cp.ndarray)
        assert type(plain(x)) is np.ndarray


# ---- on a device only: torch CUDA -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_cuda(rng, dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    import cinstnorm as cin

    cp = _gpu.require_cupy()

    x = make_x(rng, (4, 8, 33, 35), dtype)
    w, b = make_affine(rng, 8, dtype)
    xt = torch.as_tensor(x, device="cuda").requires_grad_()
    wt = torch.as_tensor(w, device="cuda").requires_grad_()
    bt = torch.as_tensor(b, device="cuda").requires_grad_()
    yt = torch.nn.functional.instance_norm(xt, weight=wt, bias=bt)
    dy = rng.standard_normal(x.shape).astype(dtype)
    yt.backward(torch.as_tensor(dy, device="cuda"))
    y, mean, rstd = cin.instance_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    dx, dw, db = cin.instance_norm_backward(cp.asarray(dy), cp.asarray(x), mean, rstd,
                                            cp.asarray(w))
    assert_close(y.get(), yt.detach().cpu().numpy().astype(np.float64))
    assert_close(dx.get(), xt.grad.cpu().numpy().astype(np.float64), grad=True)
    assert_close(dw.get(), wt.grad.cpu().numpy().astype(np.float64), grad=True)
    assert_close(db.get(), bt.grad.cpu().numpy().astype(np.float64), grad=True)


# ---- fused activation and residual on CuPy arrays (issue 14) ----------------------------------

@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 64, 64), (1, 2, 512, 512)])
@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_activation_residual_forward_backward_and_eval(rng, shape, dtype, act):
    import cupy
    import cinstnorm as cin
    x = make_x(rng, shape, dtype)
    r = make_x(rng, shape, dtype)
    dy = make_x(rng, shape, dtype)
    w, b = make_affine(rng, shape[1], dtype)
    y, mean, rstd = cin.instance_norm_forward(cupy.asarray(x), cupy.asarray(w),
                                              cupy.asarray(b), activation=act,
                                              negative_slope=0.2, residual=cupy.asarray(r))
    want, _, _ = ref.forward_act(x, w, b, activation_name=act, negative_slope=0.2, residual=r)
    assert_close(y.get(), want)
    dx, dw, db = cin.instance_norm_backward(cupy.asarray(dy), cupy.asarray(x), mean, rstd,
                                            cupy.asarray(w), cupy.asarray(b), activation=act,
                                            negative_slope=0.2)
    got = ref.backward_act(dy, x, mean.get(), rstd.get(), w, b, act, 0.2)
    assert_close(dx.get(), got[0], grad=True)
    scale = max(1.0, np.abs(got[1]).max(), np.abs(got[2]).max())
    assert_close(dw.get() / scale, got[1] / scale, dtype, grad=True)
    assert_close(db.get() / scale, got[2] / scale, dtype, grad=True)
    rm, rv = rng.normal(size=shape[1]).astype(dtype), rng.uniform(0.5, 2, shape[1]).astype(dtype)
    ye = cin.instance_norm(cupy.asarray(x), cupy.asarray(rm), cupy.asarray(rv), cupy.asarray(w),
                           cupy.asarray(b), use_input_stats=False, activation=act,
                           negative_slope=0.2, residual=cupy.asarray(r))
    want, _, _ = ref.forward_act(x, w, b, activation_name=act, negative_slope=0.2, residual=r,
                                 running_mean=rm, running_var=rv, use_input_stats=False)
    assert_close(ye.get(), want)
