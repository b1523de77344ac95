"""CuPy front end of the CUDA kernels in ``_cuda/instance_norm.cu``.

CuPy is imported lazily: importing this module, and every CPU call, works without it.  The
kernel source ships inside the package; it is compiled by CuPy (NVRTC) the first time a device
and dtype need it, and the compiled module is kept for the process (CuPy also caches it on
disk).

The three entry points mirror the CPU helpers of ``functional.py`` for CuPy arrays of shape
(N, C, *spatial): :func:`forward`, :func:`forward_fixed` and :func:`backward`.  They take
already validated arguments, copy a non-contiguous input to C order (the kernels read
contiguous (P, L) planes, P = N*C), and return outputs with the input's dtype and, when it is
a dense permutation, its stride order.

Regimes (docs/design.md, "GPU"): each call runs in one of three, chosen by :func:`choose_plan` from
the slots (16-byte pieces) per plane and the plane count:

- ``group``: G lanes (a power of two <= 32) per plane, the plane in registers.
- ``block``: a thread block per plane, the plane in registers.
- ``chunk``: planes cut into chunks; two launches (partials, then merge + finish).

The thresholds are the module constants below, so tests can aim at the boundaries.

The fused activation and residual (``act``, ``slope``, ``residual``) run inside the same
kernels, in their template instantiations with FUSED = true (a second module per C type,
compiled on the first call that needs it; see the .cu header).
"""
from __future__ import annotations

import functools
import importlib.resources
import math
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "gpu_available", "gpu_status", "require_cupy", "is_gpu_array", "to_gpu", "to_cpu",
    "forward", "forward_fixed", "backward", "choose_plan", "Plan",
]

# ---- constants shared with the .cu source (keep in step with its #defines) ----------------

SOURCE = "_cuda/instance_norm.cu"
VEC_BYTES = 16                # one slot: an aligned 16-byte load (4 floats, 2 doubles)
GROUP_THREADS = 256           # threads per block of the group kernels (CIN_GROUP_THREADS)
CHUNK_THREADS = 256           # threads per block of the chunk kernels (CIN_CHUNK_THREADS)
BLOCK_MAX_THREADS = 512       # most threads of a block kernel (CIN_BLOCK_MAX_THREADS)

# Slots per thread of each compiled register kernel (template arguments).
GROUP_SLOTS = (2, 8)
FORWARD_BLOCK_SLOTS = (8, 16)
BACKWARD_BLOCK_SLOTS = (8,)   # x and dy both in registers: 16 slots would spill
# A forward with an activation or a residual (the kernels' FUSED = true): 16 slots of x beside
# the residual's loads would spill (ptxas: 48 bytes for float), so its block regime ends at 8
# slots per thread, and larger planes are chunked.
FUSED_FORWARD_BLOCK_SLOTS = (8,)

# Regime thresholds, in slots per plane (a slot is 16 bytes).
GROUP_MAX_SLOTS = 32 * max(GROUP_SLOTS)                                 # 4 KiB planes
FORWARD_BLOCK_MAX_SLOTS = BLOCK_MAX_THREADS * max(FORWARD_BLOCK_SLOTS)  # 128 KiB planes
BACKWARD_BLOCK_MAX_SLOTS = BLOCK_MAX_THREADS * max(BACKWARD_BLOCK_SLOTS)  # 64 KiB planes
# Planes up to this size take the block regime even when there are fewer planes than SMs
# (a chunked launch pair costs more than a half-idle device for them).
SMALL_PLANE_SLOTS = 1024                                                # 16 KiB planes
# The block regime needs at least this many planes per SM to fill the device.
BLOCK_MIN_PLANES_PER_SM = 1
# Chunk regime: aim for this many blocks per SM (256 threads with 64 bytes in flight each), with
# chunks of at least MIN_CHUNK_SLOTS (every block of kernel B reads all its plane's partials,
# 24 bytes per chunk), and never more than MAX_CHUNKS per plane.
CHUNK_BLOCKS_PER_SM = 3
MIN_CHUNK_SLOTS = 2048                                                  # 32 KiB chunks
MAX_CHUNKS = 1024

_INSTALL_HINT = (
    "install the CuPy wheel that matches your CUDA version: `pip install cupy-cuda12x` for "
    "CUDA 12.x or `pip install cupy-cuda13x` for CUDA 13.x (`nvidia-smi` shows the driver's "
    "CUDA version)"
)


# ---- CuPy and device discovery ------------------------------------------------------------

def _driver_cuda_version() -> Optional[Tuple[int, int]]:
    """The CUDA version of the installed NVIDIA driver (from libcuda), or None without one."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return version.value // 1000, (version.value % 1000) // 10
        except AttributeError:
            pass
    return None


def _install_hint() -> str:
    found = _driver_cuda_version()
    if found is None:
        return _INSTALL_HINT + "; no NVIDIA driver was found on this machine"
    major, minor = found
    return (f"`pip install cupy-cuda{major}x` matches this machine's driver "
            f"(CUDA {major}.{minor}); in general, " + _INSTALL_HINT)


def _import_cupy():
    """(cupy, None) or (None, the reason it cannot be imported)."""
    try:
        import cupy
    except ImportError as exc:  # not installed, or sys.modules['cupy'] = None
        return None, f"CuPy is not installed ({exc})"
    except Exception as exc:  # a broken install: missing CUDA libraries and the like
        return None, f"CuPy cannot be imported ({type(exc).__name__}: {exc})"
    return cupy, None


def _device_count(cupy) -> Tuple[int, Optional[str]]:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, no device, driver too old
        return 0, f"{type(exc).__name__}: {exc}"
    return count, None if count > 0 else "getDeviceCount() returned 0"


def require_cupy():
    """CuPy, when it is installed and sees a CUDA device.

    Raises
    ------
    ImportError
        CuPy is not installed (or cannot be imported); the message says which wheel to install.
    RuntimeError
        CuPy is installed but no CUDA device is visible.

    Examples
    --------
    >>> from cinstnorm import _gpu
    >>> cp = _gpu.require_cupy()  # doctest: +SKIP
    """
    cupy, why = _import_cupy()
    if cupy is None:
        raise ImportError(f"cinstnorm needs CuPy for GPU arrays: {why}; {_install_hint()}")
    count, why = _device_count(cupy)
    if count == 0:
        raise RuntimeError(
            f"cinstnorm needs a CUDA device for GPU arrays, but CuPy {cupy.__version__} sees "
            f"none ({why}); check `nvidia-smi` and CUDA_VISIBLE_DEVICES, and that the CuPy wheel "
            f"matches the driver's CUDA version"
        )
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (never raises)."""
    try:
        require_cupy()
    except (ImportError, RuntimeError):
        return False
    return True


def _sm_version(device) -> str:
    return f"sm_{device.compute_capability}"


def gpu_status() -> str:
    """One line for ``show_config()``: ``'cupy X.Y, device NAME (sm_XX)'`` or why not."""
    cupy, why = _import_cupy()
    if cupy is None:
        return f"not available: {why}; {_INSTALL_HINT}"
    count, why = _device_count(cupy)
    if count == 0:
        return f"not available: CuPy {cupy.__version__} sees no CUDA device ({why})"
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    more = f", {count} devices" if count > 1 else ""
    return f"cupy {cupy.__version__}, device {name} ({_sm_version(device)}){more}"


def is_gpu_array(a) -> bool:
    """True for a CuPy ndarray.  Never imports CuPy: no CuPy array exists before CuPy does."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def to_gpu(a, dtype=None):
    """``a`` (NumPy, CuPy or anything ``numpy.asarray`` takes) as a CuPy array on the current
    device; no copy when it already is one of that dtype."""
    return require_cupy().asarray(a, dtype=dtype)


def to_cpu(a) -> np.ndarray:
    """A CuPy array copied to the host; anything else through ``numpy.asarray``."""
    return a.get() if is_gpu_array(a) else np.asarray(a)


# ---- compiled kernels ---------------------------------------------------------------------

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _fused_flag(fused) -> str:
    """The kernels' template argument FUSED: true when the call has an activation (or, in the
    forward, a residual); the code, slope and residual pointer are runtime arguments (see the
    .cu header)."""
    return "true" if fused else "false"


def _forward_block_slots(fused: bool) -> tuple:
    return FUSED_FORWARD_BLOCK_SLOTS if fused else FORWARD_BLOCK_SLOTS


def kernel_names(ctype: str, fused: Optional[bool] = None) -> list:
    """Every kernel instantiation of the source for one C type ('float' or 'double'), as the
    name expressions that CuPy compiles and looks up: the plain ones (fused False), those with
    an activation and residual (fused True, compiled only when a call needs them), or both
    (None)."""
    if fused is None:
        return kernel_names(ctype, False) + kernel_names(ctype, True)
    flag = _fused_flag(fused)
    names = [f"cin_fwd_group<{ctype}, {s}, {flag}>" for s in GROUP_SLOTS]
    names += [f"cin_fwd_block<{ctype}, {s}, {flag}>" for s in _forward_block_slots(fused)]
    names += [f"cin_fwd_chunk_norm<{ctype}, {flag}>"]
    names += [f"cin_bwd_group<{ctype}, {s}, {flag}>" for s in GROUP_SLOTS]
    names += [f"cin_bwd_block<{ctype}, {s}, {flag}>" for s in BACKWARD_BLOCK_SLOTS]
    names += [f"cin_bwd_chunk_sums<{ctype}, {flag}>", f"cin_bwd_chunk_dx<{ctype}, {flag}>"]
    if not fused:
        names += [f"cin_fwd_chunk_stats<{ctype}>"]  # statistics only: no activation
    return names


@functools.lru_cache(maxsize=1)
def kernel_source() -> str:
    """The CUDA source shipped in the package."""
    return importlib.resources.files("cinstnorm").joinpath(SOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _module(device_id: int, ctype: str, fused: bool):
    """The RawModule of one C type and kernel group (see :func:`kernel_names`), compiled for
    one device (once per process)."""
    cupy = require_cupy()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(), options=("-std=c++17",),
                                name_expressions=kernel_names(ctype, fused))
        module.compile()
    return module


@functools.lru_cache(maxsize=None)
def _kernel(device_id: int, ctype: str, name: str):
    cupy = require_cupy()
    fused = name in kernel_names(ctype, True)
    with cupy.cuda.Device(device_id):
        return _module(device_id, ctype, fused).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    cupy = require_cupy()
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _launch(device_id: int, dtype, base: str, tparams: tuple, grid: int, block: int,
            args) -> None:
    """Launch the instantiation base<ctype, *tparams> of ``dtype``."""
    ctype = _CTYPES[np.dtype(dtype)]
    name = f"{base}<{', '.join((ctype,) + tuple(str(t) for t in tparams))}>"
    if not 0 < grid < 2 ** 31:
        raise ValueError(f"{name}: grid of {grid} blocks is out of range")
    _kernel(device_id, ctype, name)((grid,), (block,), tuple(args))


# ---- work split ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How one call runs: the regime and its launch shape.

    regime: "group", "block" or "chunk"; slots: slots per thread of the register kernels;
    threads: threads per block; group: lanes per plane (group regime); chunks, chunk_slots:
    chunks per plane and slots per chunk (chunk regime).
    """

    regime: str
    slots: int
    threads: int
    group: int = 1
    chunks: int = 1
    chunk_slots: int = 0

    def launches(self, kind: str) -> int:
        """Kernel launches of a call of this kind with this plan."""
        return 2 if self.regime == "chunk" and kind != "fixed" else 1

    def capacity(self) -> int:
        """Slots per plane the register kernels hold (0 for the chunk regime: no limit)."""
        if self.regime == "group":
            return self.group * self.slots
        if self.regime == "block":
            return self.threads * self.slots
        return 0


def plane_slots(L: int, itemsize: int, max_head: int) -> int:
    """16-byte slots a plane of L elements spans when it starts max_head elements past a
    16-byte boundary."""
    per = VEC_BYTES // itemsize
    return -(-(L + max_head) // per)


def _chunk_plan(P: int, ns: int, n_sm: int) -> Plan:
    chunks = max(1, -(-CHUNK_BLOCKS_PER_SM * n_sm // P))
    chunks = min(chunks, max(1, ns // MIN_CHUNK_SLOTS), MAX_CHUNKS)
    chunk_slots = -(-ns // chunks)
    chunks = -(-ns // chunk_slots)
    return Plan("chunk", 0, CHUNK_THREADS, 1, chunks, chunk_slots)


def choose_plan(kind: str, P: int, L: int, itemsize: int, max_head: int, n_sm: int,
                fused: bool = False) -> Plan:
    """The regime for ``kind`` ('forward', 'fixed' = eval forward, or 'backward') on P planes
    of L elements of ``itemsize`` bytes whose first elements lie at most ``max_head`` elements
    past a 16-byte boundary, on a device with ``n_sm`` multiprocessors; ``fused``: a forward
    with an activation or a residual (fewer block kernels, FUSED_FORWARD_BLOCK_SLOTS)."""
    if kind not in ("forward", "fixed", "backward"):
        raise ValueError(f"unknown kind {kind!r}")
    ns = plane_slots(L, itemsize, max_head)
    if ns <= GROUP_MAX_SLOTS:
        slots = next(s for s in GROUP_SLOTS if 32 * s >= ns)
        group = 1 << max(0, math.ceil(math.log2(-(-ns // slots))))
        return Plan("group", slots, GROUP_THREADS, group)
    if kind == "fixed":  # elementwise: chunks need no second launch
        return _chunk_plan(P, ns, n_sm)
    choices = BACKWARD_BLOCK_SLOTS if kind == "backward" else _forward_block_slots(fused)
    fills = P >= BLOCK_MIN_PLANES_PER_SM * n_sm or ns <= SMALL_PLANE_SLOTS
    if ns <= BLOCK_MAX_THREADS * max(choices) and fills:
        slots = next(s for s in choices if BLOCK_MAX_THREADS * s >= ns)
        threads = 32 * -(-ns // (32 * slots))
        return Plan("block", slots, threads)
    return _chunk_plan(P, ns, n_sm)


# ---- arrays between the caller's layout and the (P, L) kernels -----------------------------

def _compute_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _planes(cupy, x, dtype):
    """x as a C-contiguous (P, L) array of the compute dtype, element-aligned."""
    x2 = cupy.ascontiguousarray(x, dtype=dtype)
    if x2.data.ptr % x2.itemsize:
        x2 = x2.copy()
    return x2.reshape(x.shape[0] * x.shape[1], -1)


def _empty_congruent(cupy, like):
    """An empty array shaped like ``like`` whose address equals like's modulo 16, so that the
    kernels can use aligned 16-byte access on both."""
    if like.data.ptr % VEC_BYTES == 0:  # CuPy's allocations are 256-byte aligned
        return cupy.empty(like.shape, dtype=like.dtype)
    per = VEC_BYTES // like.itemsize
    buf = cupy.empty(like.size + per, dtype=like.dtype)
    shift = ((like.data.ptr - buf.data.ptr) % VEC_BYTES) // like.itemsize
    return buf[shift:shift + like.size].reshape(like.shape)


def _vector_access(*arrays) -> int:
    """1 when every array has the same address modulo 16 (slots aligned in all of them)."""
    return int(len({a.data.ptr % VEC_BYTES for a in arrays}) == 1)


def _max_head(x2, vec: int) -> int:
    """Largest offset (in elements) of a plane's start past a 16-byte boundary."""
    per = VEC_BYTES // x2.itemsize
    if not vec:
        return 0
    if x2.data.ptr % VEC_BYTES == 0 and (x2.shape[1] * x2.itemsize) % VEC_BYTES == 0:
        return 0
    return per - 1


def _plane_param(cupy, a, N: int, C: int):
    """(float64 device array, ns) read by the kernels as a[(p // C) * ns + p % C]; (None, 0)
    for None.  Takes (C,) (ns = 0), (N, C) or (N*C,) (ns = C), NumPy or CuPy."""
    if a is None:
        return None, np.int64(0)
    a = cupy.asarray(a, dtype=cupy.float64)
    if a.shape == (C,):
        return cupy.ascontiguousarray(a), np.int64(0)
    if a.ndim == 1 and a.size == N * C:
        a = a.reshape(N, C)
    return cupy.ascontiguousarray(cupy.broadcast_to(a, (N, C))), np.int64(C)


def _deliver(cupy, result, x):
    """The (P, L) result as an array with x's shape, dtype and (when dense) stride order."""
    result = result.reshape(x.shape)
    if not x.flags.c_contiguous:
        final = cupy.empty_like(x, order="K")
        if not final.flags.c_contiguous:
            final[...] = result
            return final
    return result.astype(x.dtype, copy=False)


def _prepare(cupy, kind: str, plan, x, *more, fused: bool = False):
    """What every launch of ``kind`` (``fused``: see :func:`choose_plan`) needs from a non-empty
    (N, C, *spatial) input x (and the arrays ``more`` of its shape, or None): (device id, L,
    compute dtype, the inputs as C-contiguous (P, L) planes of the compute dtype (None stays
    None), an output congruent with x's planes, whether all of them take aligned 16-byte
    access, the plan)."""
    P = x.shape[0] * x.shape[1]
    dev, L, cdt = x.device.id, x.size // P, _compute_dtype(x.dtype)
    planes = tuple(None if a is None else _planes(cupy, a, cdt) for a in (x,) + more)
    out = _empty_congruent(cupy, planes[0])
    vec = _vector_access(*(a for a in planes if a is not None), out)
    return dev, L, cdt, planes, out, vec, _plan_for(kind, plan, planes[0], vec, dev, fused)


# ---- entry points -------------------------------------------------------------------------

def forward(x, weight=None, bias=None, eps: float = 1e-5, *, plan: Optional[Plan] = None,
            residual=None, act: int = 0, slope: float = 0.0):
    """Normalize with instance statistics.

    Parameters
    ----------
    x : cupy.ndarray, shape (N, C, *spatial)
        float16, float32 or float64 (float16 is computed in float32); any strides.
    weight, bias : array (C,) or (N, C), NumPy or CuPy, optional
    eps : float
    plan : Plan, optional
        Force a regime (tests); by default :func:`choose_plan` decides.
    residual : array of x's shape, optional
        Added after the activation, in the compute dtype (any layout and float dtype: it is
        converted once to the C-contiguous (P, L) planes of the compute dtype that the kernels
        read, unless it already is that).
    act, slope : int, float
        The fused activation's code (``_validation.ACTIVATIONS``; 0: none) and LeakyReLU's
        negative slope: ``y = act(xhat * weight + bias) + residual``, in the kernels.

    Returns
    -------
    y : cupy.ndarray
        x's shape and dtype.
    mean, var, rstd : cupy.ndarray, float64, shape (N*C,)
        Per-plane mean, biased variance and ``1/sqrt(var + eps)`` (NaN for an empty input).
    """
    cupy = require_cupy()
    N, C = x.shape[:2]
    P = N * C
    with x.device:
        stats = [cupy.empty(P, dtype=cupy.float64) for _ in range(3)]
        if x.size == 0:
            for a in stats:
                a.fill(np.nan)
            return cupy.empty_like(x), *stats
        is_fused = bool(act) or residual is not None
        dev, L, cdt, (x2, r2), y2, vec, plan = _prepare(cupy, "forward", plan, x, residual,
                                                        fused=is_fused)
        w, w_ns = _plane_param(cupy, weight, N, C)
        b, b_ns = _plane_param(cupy, bias, N, C)
        i64, f64 = np.int64, np.float64
        mean, var, rstd = stats
        epilogue = (r2, i64(act), f64(slope))
        flag = _fused_flag(is_fused)
        if plan.regime == "group":
            grid = -(-P * plan.group // plan.threads)
            _launch(dev, cdt, "cin_fwd_group", (plan.slots, flag), grid, plan.threads,
                    (x2, y2, i64(P), i64(L), i64(C), i64(plan.group), i64(vec), w, w_ns, b, b_ns,
                     None, i64(0), None, i64(0), f64(eps), mean, var, rstd) + epilogue)
        elif plan.regime == "block":
            _launch(dev, cdt, "cin_fwd_block", (plan.slots, flag), P, plan.threads,
                    (x2, y2, i64(L), i64(C), i64(vec), w, w_ns, b, b_ns, f64(eps),
                     mean, var, rstd) + epilogue)
        else:
            part = cupy.empty(3 * P * plan.chunks, dtype=cupy.float64)
            grid = P * plan.chunks
            _launch(dev, cdt, "cin_fwd_chunk_stats", (), grid, plan.threads,
                    (x2, i64(L), i64(plan.chunks), i64(plan.chunk_slots), i64(vec), part))
            _launch(dev, cdt, "cin_fwd_chunk_norm", (flag,), grid, plan.threads,
                    (x2, y2, i64(L), i64(C), i64(plan.chunks), i64(plan.chunk_slots), i64(vec),
                     part, None, i64(0), None, i64(0), w, w_ns, b, b_ns, f64(eps),
                     mean, var, rstd) + epilogue)
        return _deliver(cupy, y2, x), mean, var, rstd


def forward_fixed(x, mean, var, weight=None, bias=None, eps: float = 1e-5, *,
                  plan: Optional[Plan] = None, residual=None, act: int = 0, slope: float = 0.0):
    """Normalize with given statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``mean``, ``var``, ``weight``, ``bias``: (C,) or (N, C), NumPy or CuPy (weight/bias may be
    None).  ``residual``, ``act``, ``slope``: the fused activation and residual, as in
    :func:`forward`.  One launch.  Returns y with x's shape and dtype.
    """
    cupy = require_cupy()
    with x.device:
        if x.size == 0:
            return cupy.empty_like(x)
        N, C = x.shape[:2]
        P = N * C
        dev, L, cdt, (x2, r2), y2, vec, plan = _prepare(cupy, "fixed", plan, x, residual)
        m, m_ns = _plane_param(cupy, mean, N, C)
        v, v_ns = _plane_param(cupy, var, N, C)
        w, w_ns = _plane_param(cupy, weight, N, C)
        b, b_ns = _plane_param(cupy, bias, N, C)
        i64, f64 = np.int64, np.float64
        epilogue = (r2, i64(act), f64(slope))
        flag = _fused_flag(bool(act) or residual is not None)
        if plan.regime == "group":
            grid = -(-P * plan.group // plan.threads)
            _launch(dev, cdt, "cin_fwd_group", (plan.slots, flag), grid, plan.threads,
                    (x2, y2, i64(P), i64(L), i64(C), i64(plan.group), i64(vec), w, w_ns, b, b_ns,
                     m, m_ns, v, v_ns, f64(eps), None, None, None) + epilogue)
        elif plan.regime == "chunk":
            _launch(dev, cdt, "cin_fwd_chunk_norm", (flag,), P * plan.chunks,
                    plan.threads,
                    (x2, y2, i64(L), i64(C), i64(plan.chunks), i64(plan.chunk_slots), i64(vec),
                     None, m, m_ns, v, v_ns, w, w_ns, b, b_ns, f64(eps), None, None, None)
                    + epilogue)
        else:
            raise ValueError(f"no {plan.regime!r} regime for fixed statistics")
        return _deliver(cupy, y2, x)


def backward(dy, x, mean_p, rstd_p, weight=None, use_input_stats: bool = True, *,
             plan: Optional[Plan] = None, bias=None, act: int = 0, slope: float = 0.0):
    """dx and the per-plane sums that dweight and dbias reduce from.

    Parameters
    ----------
    dy, x : cupy.ndarray, shape (N, C, *spatial), same dtype; any strides.
    mean_p, rstd_p : array (N*C,), (N, C) or (C,), NumPy or CuPy
        The forward's statistics, or the running mean and ``1/sqrt(running_var + eps)``.
    weight : array (C,) or (N, C), optional
    use_input_stats : bool
        True: gradient through the statistics; False: ``dx = dy * weight * rstd``.
    bias : array (C,) or (N, C), optional
        The forward's bias; read only with an activation (for its pre-activation t).
    act, slope : int, float
        The forward's fused activation (code, 0: none) and negative slope: the kernels use
        ``g = dy * act'(t)`` in dy's place, ``t = (x - mean) * rstd * weight + bias``.

    Returns
    -------
    dx : cupy.ndarray
        x's shape and dtype.
    sum_dy, sum_dy_xhat : cupy.ndarray, float64, shape (N*C,)
        ``sum(g)`` and ``sum(g * (x - mean) * rstd)`` per plane (zeros for an empty input).
    """
    cupy = require_cupy()
    N, C = x.shape[:2]
    P = N * C
    with x.device:
        if x.size == 0:
            return (cupy.empty_like(x), cupy.zeros(P, dtype=cupy.float64),
                    cupy.zeros(P, dtype=cupy.float64))
        dev, L, cdt, (x2, dy2), dx2, vec, plan = _prepare(cupy, "backward", plan, x, dy)
        m, m_ns = _plane_param(cupy, mean_p, N, C)
        r, r_ns = _plane_param(cupy, rstd_p, N, C)
        w, w_ns = _plane_param(cupy, weight, N, C)
        b, b_ns = _plane_param(cupy, bias if act else None, N, C)
        sum_dy = cupy.empty(P, dtype=cupy.float64)
        sum_dy_xhat = cupy.empty(P, dtype=cupy.float64)
        i64, f64 = np.int64, np.float64
        stats = (m, m_ns, r, r_ns, w, w_ns, b, b_ns, i64(act), f64(slope),
                 i64(bool(use_input_stats)))
        flag = _fused_flag(act)
        if plan.regime == "group":
            grid = -(-P * plan.group // plan.threads)
            _launch(dev, cdt, "cin_bwd_group", (plan.slots, flag), grid, plan.threads,
                    (dy2, x2, dx2, i64(P), i64(L), i64(C), i64(plan.group), i64(vec)) + stats
                    + (sum_dy, sum_dy_xhat))
        elif plan.regime == "block":
            _launch(dev, cdt, "cin_bwd_block", (plan.slots, flag), P, plan.threads,
                    (dy2, x2, dx2, i64(L), i64(C), i64(vec)) + stats + (sum_dy, sum_dy_xhat))
        else:
            part = cupy.empty(2 * P * plan.chunks, dtype=cupy.float64)
            shape = (dy2, x2, dx2, i64(L), i64(C), i64(plan.chunks), i64(plan.chunk_slots),
                     i64(vec)) + stats
            _launch(dev, cdt, "cin_bwd_chunk_sums", (flag,), P * plan.chunks, plan.threads,
                    shape + (part,))
            grid = P * plan.chunks if use_input_stats else P
            _launch(dev, cdt, "cin_bwd_chunk_dx", (flag,), grid, plan.threads,
                    shape + (part, sum_dy, sum_dy_xhat))
        return _deliver(cupy, dx2, x), sum_dy, sum_dy_xhat


def _plan_for(kind: str, plan: Optional[Plan], x2, vec: int, dev: int, fused: bool) -> Plan:
    """The given plan (tests), else the chosen one; checked to hold every slot of a plane."""
    P, L = x2.shape
    head = _max_head(x2, vec)
    plan = plan or choose_plan(kind, P, L, x2.itemsize, head, _sm_count(dev), fused)
    _check_plan(plan, kind, L, x2.itemsize, head, fused)
    return plan


def _check_plan(plan: Plan, kind: str, L: int, itemsize: int, max_head: int,
                fused: bool = False) -> None:
    """A forced or chosen plan must hold every slot of a plane (else elements would be lost)
    and name a compiled kernel."""
    ns = plane_slots(L, itemsize, max_head)
    if plan.regime == "group":
        ok = plan.slots in GROUP_SLOTS and plan.group in (1, 2, 4, 8, 16, 32) \
            and plan.threads == GROUP_THREADS and plan.capacity() >= ns
    elif plan.regime == "block":
        choices = BACKWARD_BLOCK_SLOTS if kind == "backward" else _forward_block_slots(fused)
        ok = kind != "fixed" and plan.slots in choices and plan.threads % 32 == 0 \
            and 0 < plan.threads <= BLOCK_MAX_THREADS and plan.capacity() >= ns
    elif plan.regime == "chunk":
        ok = plan.threads == CHUNK_THREADS and plan.chunks >= 1 \
            and plan.chunks * plan.chunk_slots >= ns
    else:
        ok = False
    if not ok:
        raise ValueError(f"{plan} cannot run a {kind} pass over planes of {ns} slots")
