"""Functional instance normalization: torch's ``F.instance_norm`` plus a forward/backward pair.

Every public function validates all of its arguments first (``_validation``), then runs the
compiled kernels (``_cpu``) on (P, L) = (N*C, spatial) views, and only then updates running
statistics, so a call that raises leaves every argument as it was.

The common case (dense float32/float64 ndarrays, plain scalars) is first offered to a fast path
in C (``_cpu.fast_forward``, ``fast_instance_norm``, ``fast_backward``): it makes the same
checks, runs the same kernels and returns the same arrays, in about a microsecond of overhead
instead of tens; on anything it does not take it returns None before touching anything, and the
path below runs, with its own errors.

CuPy input runs the same validation, then the CUDA kernels (``_gpu``); every array of such a
call (parameters, buffers, ``out``, ``dy``) must be on the input's device, and the results
(statistics and gradients too) are CuPy arrays there.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from . import _cpu, _gpu
from . import _validation as V
from ._gpu import is_gpu_array
from ._config import resolve_threads

__all__ = ["instance_norm", "instance_norm_forward", "instance_norm_backward", "adain",
           "adain_backward"]


# ---- plumbing between arbitrary NumPy arrays and the kernels -----------------------------------

_NONE = np.empty(0)  # "no parameter": the kernels then use 1 (scale) or 0 (shift, mean)


def _flat64(a) -> np.ndarray:
    """A (C,) or (N, C) per-channel / per-plane parameter as the kernels take it: contiguous
    float64, flattened (plane p = n*C + c reads element p % len); None -> empty."""
    if a is None:
        return _NONE
    return np.ascontiguousarray(a, dtype=np.float64).reshape(-1)


def _planes(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x as a C-contiguous (N*C, L) array of the compute dtype (a view when it already is one)."""
    return np.ascontiguousarray(x, dtype=dtype).reshape(x.shape[0] * x.shape[1], -1)


class _Layout:
    """How the kernels see an (N, C, *spatial) array: as C-contiguous (P, L) planes, or, when
    its memory is channels-last ((N, *spatial, C), e.g. ``a_nhwc.transpose(0, 3, 1, 2)``), as
    an (N, L, C) array read in place by the channels-last kernels."""

    def __init__(self, x: np.ndarray):
        self.shape = x.shape
        self.cl = False
        if x.ndim >= 3 and x.shape[1] > 1 and not x.flags.c_contiguous:
            self.cl = np.moveaxis(x, 1, -1).flags.c_contiguous
        N, C = x.shape[:2]
        self.kshape = (N, -1, C) if self.cl else (N * C, -1)

    def kernel_view(self, a: np.ndarray, dtype) -> np.ndarray:
        """`a` (shaped like x) in kernel order and dtype: a view when possible, else a copy
        (also of a misaligned buffer: the C kernels assume element-aligned pointers)."""
        if self.cl:
            k = np.ascontiguousarray(np.moveaxis(a, 1, -1), dtype=dtype).reshape(self.kshape)
        else:
            k = _planes(a, dtype)
        return k if k.flags.aligned else k.copy()

    def writable_view(self, a: np.ndarray, dtype):
        """`a` in kernel order without a copy, or None when its memory is not laid out so."""
        if a.dtype != dtype or not a.flags.aligned:
            return None
        k = np.moveaxis(a, 1, -1) if self.cl else a
        return k.reshape(self.kshape) if k.flags.c_contiguous else None

    def as_input_shape(self, k: np.ndarray) -> np.ndarray:
        """A kernel-order array as an x-shaped view (keeping its memory order)."""
        if self.cl:
            N, C = self.shape[:2]
            return np.moveaxis(k.reshape((N,) + self.shape[2:] + (C,)), -1, 1)
        return k.reshape(self.shape)

    def target(self, like: np.ndarray, xk: np.ndarray, out: Optional[np.ndarray], *also):
        """(y, yk): the array the kernel writes, x-shaped and in kernel order.

        `out` itself when it has the kernel's layout and dtype and each kernel input (xk and
        `also`) either is exactly out's memory (elementwise in place) or does not overlap it;
        else xk when it is a private copy of `like` (the kernels work in place, which saves an
        allocation); else a new array.
        """
        if out is not None:
            ok = self.writable_view(out, xk.dtype)
            if ok is not None and all(a.ctypes.data == ok.ctypes.data
                                      or not np.may_share_memory(ok, a) for a in (xk,) + also):
                return out, ok
        if not np.may_share_memory(xk, like):
            return self.as_input_shape(xk), xk
        yk = np.empty_like(xk)
        return self.as_input_shape(yk), yk


def _residual_view(lay: _Layout, residual, dtype):
    """The residual in the kernel's layout and dtype: a view when its memory already is (e.g.
    channels-last x with a channels-last residual), else converted once (an NCHW residual for
    channels-last x is copied to channels-last, and vice versa); None stays None."""
    return None if residual is None else lay.kernel_view(residual, dtype)


def _also(rk) -> tuple:
    """The residual as an extra kernel input for _Layout.target (none: no extra input)."""
    return () if rk is None else (rk,)


def _stride_order(a: np.ndarray) -> tuple:
    return tuple(sorted(range(a.ndim), key=lambda ax: (-abs(a.strides[ax]), ax)))


def _finish(result: np.ndarray, like: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    """Deliver `result` into `out`, or as an array with `like`'s dtype and stride order."""
    if out is not None:
        if result is not out:
            np.copyto(out, result, casting="same_kind")
        return out
    if like.flags.c_contiguous or _stride_order(result) == _stride_order(like):
        return result if result.dtype == like.dtype else result.astype(like.dtype)
    final = np.empty_like(like, order="K", subok=False)
    if final.flags.c_contiguous and result.flags.c_contiguous and result.dtype == like.dtype:
        return result
    np.copyto(final, result, casting="same_kind")
    return final


def _per_plane(a, N: int, C: int, fill: float) -> np.ndarray:
    """A (C,), (N, C) or (N*C,) parameter (or None -> fill) expanded to float64 (N*C,)."""
    planes = np.empty((N, C))
    planes[...] = fill if a is None else np.asarray(a, dtype=np.float64).reshape(-1, C)
    return planes.reshape(-1)


def _empty_like_input(x: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    return out if out is not None else np.empty_like(x, order="K", subok=False)


def _gpu_deliver(y, out):
    """A GPU result, copied into ``out`` when one is given (the kernels allocate their output)."""
    if out is None:
        return y
    out[...] = y
    return out


def _unfused(activation, negative_slope, residual) -> bool:
    """No activation, no residual and a valid negative_slope (checked even when unused): the
    public calls may then take the fast paths in C, which know neither."""
    return (activation is None and residual is None and type(negative_slope) is float
            and math.isfinite(negative_slope))


def _valid_activation(activation, negative_slope) -> int:
    """The code of a known activation name with a finite float slope, else 0 (the general
    path then validates, in its order, and raises what is wrong)."""
    if type(negative_slope) is not float or not math.isfinite(negative_slope):
        return 0
    return V.ACTIVATIONS.get(activation, 0) if type(activation) is str else 0


def _forward(x, weight, bias, eps: float, n_threads: int, out=None, residual=None,
             act: int = 0, slope: float = 0.0):
    """Normalize with instance statistics, then the activation (code act, see
    _validation.ACTIVATIONS) and the residual; returns y and float64 (P,) mean, var, rstd."""
    fast = None
    if residual is None:
        fast = _cpu.fast_forward(x, weight, bias, eps, n_threads, out, _cpu.FORWARD_Y_PLANES,
                                 act, slope)
    if fast is not None:  # dense x, weight, bias and out: read and written in place
        y, stats = fast
        return y, stats[0], stats[1], stats[2]
    if is_gpu_array(x):
        y, mean, var, rstd = _gpu.forward(x, weight, bias, eps, residual=residual, act=act,
                                          slope=slope)
        return _gpu_deliver(y, out), mean, var, rstd
    N, C = x.shape[:2]
    P = N * C
    if x.size == 0:  # undefined statistics, without allocating N*C of them (N*C may be huge)
        mean, var, rstd = np.broadcast_to(np.nan, (3, P))
        return _empty_like_input(x, out), mean, var, rstd
    stats = np.empty((3, P))
    mean, var, rstd = stats
    lay = _Layout(x)
    xk = lay.kernel_view(x, V.compute_dtype(x.dtype))
    rk = _residual_view(lay, residual, xk.dtype)
    y, yk = lay.target(x, xk, out, *_also(rk))
    if lay.cl:
        _cpu.forward_channels_last(xk, yk, _flat64(weight), _flat64(bias), eps, mean, var, rstd,
                                   True, n_threads, rk, act, slope)
    else:
        _cpu.forward_train(xk, yk, _flat64(weight), _flat64(bias), eps, stats, n_threads, rk,
                           act, slope)
    return _finish(y, x, out), mean, var, rstd


def _forward_fixed(x, mean, var, weight, bias, eps: float, n_threads: int, out=None,
                   residual=None, act: int = 0, slope: float = 0.0):
    """Normalize with given (running) statistics of shape (C,) or (N, C), then the activation
    and the residual."""
    if is_gpu_array(x):
        return _gpu_deliver(_gpu.forward_fixed(x, mean, var, weight, bias, eps,
                                               residual=residual, act=act, slope=slope), out)
    return _apply(x, mean, 1.0 / np.sqrt(_flat64(var) + eps), weight, bias, n_threads, out,
                  residual, act, slope)


def _apply(x, mean, scale, weight, bias, n_threads: int, out=None, residual=None,
           act: int = 0, slope: float = 0.0):
    """y = act((x - mean) * scale * weight + bias) + residual, every parameter (C,), (N, C),
    (P,) or None."""
    if is_gpu_array(x):  # the fixed-statistics kernel with rstd = 1/sqrt(0 + 1) = 1
        C = x.shape[1]
        w = scale if weight is None else weight.reshape(-1, C) * scale.reshape(-1, C)
        zero = _gpu.require_cupy().zeros(C)
        return _gpu_deliver(_gpu.forward_fixed(x, mean, zero, w, bias, 1.0, residual=residual,
                                               act=act, slope=slope), out)
    if x.size == 0:
        return _empty_like_input(x, out)
    N, C = x.shape[:2]
    lay = _Layout(x)
    xk = lay.kernel_view(x, V.compute_dtype(x.dtype))
    rk = _residual_view(lay, residual, xk.dtype)
    y, yk = lay.target(x, xk, out, *_also(rk))
    if lay.cl:
        mean_p, scale_p = _per_plane(mean, N, C, 0.0), _per_plane(scale, N, C, 1.0)
        _cpu.forward_channels_last(xk, yk, _flat64(weight), _flat64(bias), 0.0, mean_p,
                                   np.empty(N * C), scale_p, False, n_threads, rk, act, slope)
    else:
        _cpu.normalize(xk, yk, _flat64(mean), _flat64(scale), _flat64(weight), _flat64(bias),
                       n_threads, rk, act, slope)
    return _finish(y, x, out)


def _plane_stats(x, n_threads: int):
    """float64 (P,) mean and biased variance of every plane (NaN for empty planes)."""
    if is_gpu_array(x):  # no statistics-only kernel on the GPU: the forward's, y unused
        _, mean, var, _ = _gpu.forward(x)
        return mean, var
    P = x.shape[0] * x.shape[1]
    mean, var = np.empty((2, P))
    if x.size == 0:
        mean.fill(np.nan)
        var.fill(np.nan)
        return mean, var
    _cpu.plane_stats(_planes(x, V.compute_dtype(x.dtype)), mean, var, n_threads)
    return mean, var


def _backward(dy, x, mean_p, rstd_p, weight, use_input_stats: bool, n_threads: int, out=None,
              bias=None, act: int = 0, slope: float = 0.0):
    """dx and float64 (P,) sums: sum(g) and sum(g * xhat), g = dy, or with an activation
    (code act) dy * act'(xhat * weight + bias); mean_p, rstd_p: (N, C), (P,) or (C,)."""
    bias64 = _flat64(bias) if act else _NONE  # the pre-activation needs the bias
    fast = _cpu.fast_backward(dy, x, mean_p, rstd_p, weight, use_input_stats, n_threads, out,
                              True, bias if act else None, act, slope)
    if fast is not None:  # dense arrays: read and written in place
        dx, sums = fast
        return dx, sums[0], sums[1]
    if is_gpu_array(x):
        dx, sum_dy, sum_dy_xhat = _gpu.backward(dy, x, mean_p, rstd_p, weight, use_input_stats,
                                                bias=bias, act=act, slope=slope)
        return _gpu_deliver(dx, out), sum_dy, sum_dy_xhat
    N, C = x.shape[:2]
    P = N * C
    if x.size == 0:
        sums = np.broadcast_to(0.0, (2, P))  # empty sums, without allocating N*C of them
        return _empty_like_input(x, out), sums[0], sums[1]
    lay = _Layout(x)
    cdt = V.compute_dtype(x.dtype)
    xk = lay.kernel_view(x, cdt)
    dyk = lay.kernel_view(dy, cdt)
    dx, dxk = lay.target(dy, dyk, out, xk)
    sum_dy, sum_dy_xhat = np.empty((2, P))
    kernel = _cpu.backward_channels_last if lay.cl else _cpu.backward
    kernel(dyk, xk, _flat64(mean_p), _flat64(rstd_p), _flat64(weight), dxk, sum_dy, sum_dy_xhat,
           use_input_stats, n_threads, bias64, act, slope)
    return _finish(dx, x, out), sum_dy, sum_dy_xhat


def _running_update(running_mean, running_var, mean_p, var_p, shape, factor: float) -> None:
    """Momentum update of the buffers in place from per-plane mean and biased variance."""
    N, C = shape[:2]
    L = V.spatial_size(shape)
    batch_mean = mean_p.reshape(N, C).mean(axis=0)
    batch_var = (var_p.reshape(N, C) * (L / (L - 1))).mean(axis=0)
    new_mean = (1.0 - factor) * running_mean + factor * batch_mean
    new_var = (1.0 - factor) * running_var + factor * batch_var
    running_mean[...] = new_mean
    running_var[...] = new_var


def _channel_sums(sums_p, N: int, C: int, dtype):
    """(C,) sums over n of per-plane (N*C,) sums, in order of n (as the fast path adds them)."""
    if type(sums_p) is np.ndarray and sums_p.size:
        return _cpu.channel_sums(np.ascontiguousarray(sums_p), N, C, dtype)
    return sums_p.reshape(N, C).sum(axis=0).astype(dtype)  # CuPy sums, or none (N = 0)


# ---- public API -----------------------------------------------------------------------------

def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: Optional[float] = 0.1,
                  eps: float = 1e-5, *, activation: Optional[str] = None,
                  negative_slope: float = 0.01, residual=None, n_threads: Optional[int] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """Instance normalization with torch's ``F.instance_norm`` signature and meaning.

    Each (n, c) plane of ``input`` is normalized by its own mean and biased variance
    (``use_input_stats=True``), or by ``running_mean``/``running_var``
    (``use_input_stats=False``), then scaled by ``weight[c]`` and shifted by ``bias[c]``.
    With ``use_input_stats=True`` and buffers given, the buffers are updated in place:
    ``r = (1 - momentum) * r + momentum * batch_stat`` (unbiased variance).

    Parameters
    ----------
    input : ndarray, shape (N, C, *spatial)
        float16, float32 or float64 (float16 is computed in float32); any strides.
    running_mean, running_var : ndarray (C,), optional
        Running statistics; both or neither. Updated in place when ``use_input_stats``.
    weight, bias : array_like (C,), optional
        Per-channel scale and shift.
    use_input_stats : bool
        Normalize with the input's statistics (True) or with the running ones (False).
    momentum : float
        Weight of the new batch statistic in the running update.
    eps : float
        Added to the variance, finite and >= 0.
    activation : str, optional
        Fused after the affine step, in both modes (see :func:`instance_norm_forward`).
    negative_slope : float
        LeakyReLU's slope.
    residual : ndarray, optional
        Added after the activation (input's shape, any layout, a floating dtype).
    n_threads : int, optional
        Threads for this call (None: library default; -1: all cores).
    out : ndarray, optional
        Destination with the input's shape and dtype; may be ``input`` itself.

    Returns
    -------
    ndarray
        The normalized array (``act(...) + residual`` when given), with the input's shape,
        dtype and stride order.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
    >>> y = cin.instance_norm(x)
    >>> np.round(y[0, 0, 0], 3)
    array([-1.528, -1.091, -0.655, -0.218], dtype=float32)
    """
    fast = None
    if _unfused(activation, negative_slope, residual):
        fast = _cpu.fast_instance_norm(input, running_mean, running_var, weight, bias,
                                       use_input_stats, momentum, eps, n_threads, out)
    if fast is not None:  # the common case, checked in C (see _cpu.fast_forward)
        return fast
    x = V.as_input(input)
    V.check_batched(x)
    eps = V.check_eps(eps)
    momentum = V.check_momentum(momentum)
    N, C = x.shape[:2]
    V.check_devices(x, weight=weight, bias=bias, running_mean=running_mean,
                    running_var=running_var)
    weight = V.check_per_channel(weight, C, "weight")
    bias = V.check_per_channel(bias, C, "bias")
    tracking = V.check_running_buffers(running_mean, running_var, C, use_input_stats, momentum)
    V.check_spatial(x.shape, use_input_stats)
    V.check_out(out, x)
    act, slope = V.check_activation(activation, negative_slope)
    residual = V.check_residual(residual, x)
    nt = resolve_threads(n_threads)
    if not use_input_stats:
        return _forward_fixed(x, running_mean, running_var, weight, bias, eps, nt, out,
                              residual, act, slope)
    y, mean_p, var_p, _ = _forward(x, weight, bias, eps, nt, out, residual, act, slope)
    if tracking and x.size > 0:
        _running_update(running_mean, running_var, mean_p, var_p, x.shape, momentum)
    return y


def instance_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, *,
                          activation: Optional[str] = None, negative_slope: float = 0.01,
                          residual=None, n_threads: Optional[int] = None,
                          out: Optional[np.ndarray] = None
                          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalize with instance statistics and return what the backward pass needs.

    Computes ``y = act(xhat * weight + bias) + residual`` in one pass over memory (the
    activation and the residual are fused into the normalize loop of every kernel path).

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial)
        float16, float32 or float64; any strides.
    weight, bias : array_like (C,) or (N, C), optional
        Per-channel scale and shift, or per-sample ones (AdaIN-style conditioning).
    eps : float
        Added to the variance.
    activation : {None, "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"}
        Applied after the affine step: torch's ``F.relu``, ``F.leaky_relu(negative_slope)``,
        ``F.silu``, ``F.gelu`` (exact, erf form) and ``F.gelu(approximate="tanh")``.
    negative_slope : float
        LeakyReLU's slope (finite).
    residual : ndarray, optional
        Added after the activation (a ResNet skip connection): x's shape, any layout and any
        floating dtype (it is read in x's compute dtype; a layout other than the kernel's,
        e.g. NCHW for channels-last x, is converted once).
    n_threads : int, optional
        Threads for this call.
    out : ndarray, optional
        Destination with x's shape and dtype; may be ``x`` (or the residual) itself.

    Returns
    -------
    y : ndarray
        ``act(normalized x) + residual`` (x's shape, dtype and stride order).
    mean, rstd : ndarray, shape (N, C)
        Per-plane mean and ``1/sqrt(var + eps)`` in the compute dtype (float32 for float16).

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> x = np.random.default_rng(0).normal(5, 10, (2, 3, 4, 4)).astype(np.float32)
    >>> y, mean, rstd = cin.instance_norm_forward(x)
    >>> mean.shape, bool(np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-5))
    ((2, 3), True)
    >>> y, _, _ = cin.instance_norm_forward(x, activation="relu", residual=x)
    >>> bool((y >= x - 1e-6).all())
    True
    """
    fast = None
    if _unfused(activation, negative_slope, residual):
        fast = _cpu.fast_forward(x, weight, bias, eps, n_threads, out)
    elif residual is None and (code := _valid_activation(activation, negative_slope)):
        fast = _cpu.fast_forward(x, weight, bias, eps, n_threads, out, _cpu.FORWARD_Y_STATS,
                                 code, negative_slope)
    if fast is not None:  # the common case, checked in C
        return fast
    x = V.as_input(x)
    V.check_batched(x)
    eps = V.check_eps(eps)
    N, C = x.shape[:2]
    V.check_devices(x, weight=weight, bias=bias)
    weight = V.check_per_channel(weight, C, "weight", N)
    bias = V.check_per_channel(bias, C, "bias", N)
    V.check_spatial(x.shape, True)
    V.check_out(out, x)
    act, slope = V.check_activation(activation, negative_slope)
    residual = V.check_residual(residual, x)
    nt = resolve_threads(n_threads)
    y, mean_p, _, rstd_p = _forward(x, weight, bias, eps, nt, out, residual, act, slope)
    cdt = V.compute_dtype(x.dtype)
    if x.size == 0:  # read-only NaN views: N*C may be too large to allocate
        xp = _gpu.require_cupy() if is_gpu_array(x) else np
        nan = xp.broadcast_to(xp.asarray(np.nan, dtype=cdt), (N, C))
        return y, nan, nan
    return y, mean_p.reshape(N, C).astype(cdt), rstd_p.reshape(N, C).astype(cdt)


def instance_norm_backward(dy, x, mean, rstd, weight=None, bias=None, *,
                           activation: Optional[str] = None, negative_slope: float = 0.01,
                           use_input_stats: bool = True, n_threads: Optional[int] = None,
                           out: Optional[np.ndarray] = None):
    """Gradients of instance normalization from the saved statistics.

    With an ``activation`` (that of :func:`instance_norm_forward`) the gradient flows through
    it: the pre-activation ``t = xhat * weight + bias`` is recomputed from x and the saved
    statistics (nothing else is saved), ``g = dy * act'(t)`` takes dy's place, and
    ``dweight = sum(g * xhat)``, ``dbias = sum(g)``.  A forward ``residual``'s gradient is dy
    itself (the residual is added after the activation), so it needs no call here.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; x's shape and dtype.
    x : ndarray, shape (N, C, *spatial)
        The forward input.
    mean, rstd : array_like, shape (N, C) (or (C,) for fixed statistics)
        From :func:`instance_norm_forward`, or with ``use_input_stats=False`` the running mean
        and ``1/sqrt(running_var + eps)``.
    weight : array_like (C,) or (N, C), optional
        The forward's weight.
    bias : array_like (C,) or (N, C), optional
        The forward's bias: read only with an activation (for ``t``).
    activation : str, optional
        The forward's activation (names as in :func:`instance_norm_forward`).
    negative_slope : float
        The forward's LeakyReLU slope.
    use_input_stats : bool
        True: the statistics were computed from x, and the gradient flows through them.
        False: they were fixed (eval with running statistics): ``dx = dy * weight * rstd``.
    n_threads : int, optional
        Threads for this call.
    out : ndarray, optional
        Destination for dx with x's shape and dtype (may be ``dy`` or ``x`` itself); saves the
        allocation (and its page faults) in a training loop.

    Returns
    -------
    dx : ndarray
        x's shape, dtype and stride order (``out`` when given).
    dweight, dbias : ndarray (C,) or (N, C), or None
        dweight is None when ``weight`` is None, dbias when both ``weight`` and ``bias`` are;
        the parameter's shape otherwise (per-sample gradients for a per-sample weight).

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 3, 8, 8)); w = np.ones(3)
    >>> y, mean, rstd = cin.instance_norm_forward(x, w)
    >>> dx, dw, db = cin.instance_norm_backward(np.ones_like(x), x, mean, rstd, w)
    >>> bool(np.abs(dx).max() < 1e-12), db.tolist()
    (True, [128.0, 128.0, 128.0])
    """
    fast = None
    if _unfused(activation, negative_slope, None):  # a bias is then only checked
        fast = _cpu.fast_backward(dy, x, mean, rstd, weight, use_input_stats, n_threads, out,
                                  False, bias)
    elif code := _valid_activation(activation, negative_slope):
        fast = _cpu.fast_backward(dy, x, mean, rstd, weight, use_input_stats, n_threads, out,
                                  False, bias, code, negative_slope)
    if fast is not None:  # the common case, checked in C
        return fast
    x = V.as_input(x, "x")
    dy = V.as_input(dy, "dy")
    V.check_batched(x, "x")
    V.check_same(dy, x, "dy")
    N, C = x.shape[:2]
    V.check_devices(x, mean=mean, rstd=rstd, weight=weight)
    V.check_devices(x, bias=bias)
    mean = V.check_stats(mean, N, C, "mean")
    rstd = V.check_stats(rstd, N, C, "rstd")
    weight = V.check_per_channel(weight, C, "weight", N)
    bias = V.check_per_channel(bias, C, "bias", N)
    V.check_spatial(x.shape, use_input_stats)
    V.check_out(out, x)
    act, slope = V.check_activation(activation, negative_slope)
    nt = resolve_threads(n_threads)
    dx, sum_dy, sum_dy_xhat = _backward(dy, x, mean, rstd, weight, bool(use_input_stats), nt,
                                        out, bias, act, slope)
    if weight is None and bias is None:
        return dx, None, None
    cdt = V.compute_dtype(x.dtype)
    if np.ndim(weight) == 2 or np.ndim(bias) == 2:  # per-sample affine: gradients per (n, c)
        dw, db = sum_dy_xhat.reshape(N, C).astype(cdt), sum_dy.reshape(N, C).astype(cdt)
    else:
        dw, db = _channel_sums(sum_dy_xhat, N, C, cdt), _channel_sums(sum_dy, N, C, cdt)
    return dx, None if weight is None else dw, db


def _check_adain(content, style, eps):
    c = V.as_input(content, "content")
    s = V.as_input(style, "style")
    V.check_batched(c, "content")
    V.check_batched(s, "style")
    V.check_device(s, c, "style", "content")
    if s.shape[:2] != c.shape[:2]:
        raise ValueError(f"style must have content's (N, C) = {c.shape[:2]}, got {s.shape[:2]}")
    if s.dtype != c.dtype:
        raise TypeError(f"style dtype {s.dtype} does not match content dtype {c.dtype}")
    V.check_spatial(c.shape, True)
    V.check_spatial(s.shape, True)
    return c, s, V.check_eps(eps)


def adain(content, style, eps: float = 1e-5, *, n_threads: Optional[int] = None,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """Adaptive instance normalization (Huang and Belongie, 2017).

    ``y = (content - mean_c) / sqrt(var_c + eps) * sqrt(var_s + eps) + mean_s`` per (n, c),
    with the (biased) statistics of each plane of ``content`` and ``style``; ``style`` may have
    a different spatial size.

    Parameters
    ----------
    content : ndarray, shape (N, C, *spatial)
    style : ndarray, shape (N, C, *spatial_s), same dtype
    eps : float
    n_threads : int, optional
    out : ndarray, optional
        Destination with content's shape and dtype.

    Returns
    -------
    ndarray
        content's shape, dtype and stride order.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> rng = np.random.default_rng(0)
    >>> c, s = rng.normal(0, 1, (1, 2, 16, 16)), rng.normal(5, 3, (1, 2, 8, 8))
    >>> y = cin.adain(c, s)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), s.mean(axis=(2, 3))))
    True
    """
    c, s, eps = _check_adain(content, style, eps)
    V.check_out(out, c)
    nt = resolve_threads(n_threads)
    N, C = c.shape[:2]
    mean_s, var_s = _plane_stats(s, nt)
    y, _, _, _ = _forward(c, np.sqrt(var_s + eps).reshape(N, C), mean_s.reshape(N, C), eps, nt,
                          out)
    return y


def adain_backward(dy, content, style, eps: float = 1e-5, *, n_threads: Optional[int] = None):
    """Gradients of :func:`adain` with respect to ``content`` and ``style``.

    The statistics of both inputs are recomputed (one pass over each).

    Returns
    -------
    dcontent, dstyle : ndarray
        Shaped like ``content`` and ``style``.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> rng = np.random.default_rng(0)
    >>> c, s = rng.normal(size=(1, 2, 6, 6)), rng.normal(size=(1, 2, 4, 4))
    >>> dc, ds = cin.adain_backward(np.ones_like(c), c, s)
    >>> dc.shape, ds.shape, bool(np.allclose(ds.sum(axis=(2, 3)), 36.0))
    ((1, 2, 6, 6), (1, 2, 4, 4), True)
    """
    c, s, eps = _check_adain(content, style, eps)
    dy = V.as_input(dy, "dy")
    V.check_same(dy, c, "dy")
    nt = resolve_threads(n_threads)
    mean_c, var_c = _plane_stats(c, nt)
    mean_s, var_s = _plane_stats(s, nt)
    sigma_s = np.sqrt(var_s + eps)
    dcontent, sum_dy, sum_dy_xhat = _backward(dy, c, mean_c, 1.0 / np.sqrt(var_c + eps),
                                              sigma_s, True, nt)
    # y depends on style through mean_s (d/ds = 1/Ms) and sigma_s (d/ds = (s - mean_s)/(Ms sigma_s))
    m_s = V.spatial_size(s.shape)
    dstyle = _apply(s, mean_s, sum_dy_xhat / (m_s * sigma_s), None, sum_dy / m_s, nt)
    return dcontent, dstyle
