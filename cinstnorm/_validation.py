"""Every shape, dtype and argument check, done before any kernel runs.

Nothing here modifies its arguments; callers update state only after all checks and the
kernel have succeeded, so a failing call leaves inputs, outputs and buffers as they were.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings

import numpy as np

from ._gpu import is_gpu_array

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = _NATIVE


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the kernels compute in: float16 runs in float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def check_float_dtype(dtype: np.dtype, what: str = "input") -> None:
    """float16/32/64 pass; everything else is a TypeError naming the dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize > 8:
        raise TypeError(
            f"{what} dtype {dtype} is not supported: cinstnorm computes in float32 or float64 "
            f"(float16 is computed in float32)"
        )


def to_numpy(value, what: str = "input") -> np.ndarray:
    """An ndarray view of `value`: NumPy arrays as they are; CPU tensors of torch (or any
    DLPack producer) without a copy through DLPack; anything else through np.asarray."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__cuda_array_interface__"):
        raise TypeError(
            f"{what} is a GPU array of type {type(value).__name__}: cinstnorm runs GPU calls on "
            f"CuPy arrays (wrap it with cupy.asarray, which shares the memory)"
        )
    if hasattr(value, "__dlpack__"):
        if hasattr(value, "detach"):  # a torch tensor that may require grad
            value = value.detach()
        try:
            return np.from_dlpack(value)
        except (TypeError, BufferError, RuntimeError, ValueError):
            pass  # e.g. a dtype NumPy cannot take over DLPack (bfloat16): fall back
    return np.asarray(value)


def device_name(a) -> str:
    """'cuda:N' for a CuPy array on device N, else 'cpu'."""
    return f"cuda:{a.device.id}" if is_gpu_array(a) else "cpu"


def check_device(a, x, name: str, what: str = "the input") -> None:
    """An array argument must live where x does (no silent transfers between host and device).

    Lists, scalars and other non-array values are not checked: they are converted to x's kind.
    """
    if a is None or (type(a) is np.ndarray and type(x) is np.ndarray):  # both on the host
        return
    if not (isinstance(a, np.ndarray) or is_gpu_array(a)):
        return
    here, there = device_name(a), device_name(x)
    if here != there:
        raise TypeError(
            f"{name} is on {here} but {what} is on {there}: every array of a call must be on "
            f"one device (move it with cupy.asarray(a) or a.get())"
        )


def as_input(x, what: str = "input"):
    """x as an ndarray (NumPy, or CuPy for a GPU call) of a supported floating dtype (no copy
    when it already is one)."""
    if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64):  # the common case
        return x
    if is_gpu_array(x):  # CuPy arrays are always in native byte order
        check_float_dtype(x.dtype, what)
        return x
    if not isinstance(x, np.ndarray):
        x = to_numpy(x, what)
    check_float_dtype(x.dtype, what)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def check_batched(x: np.ndarray, what: str = "input") -> None:
    """Functional calls take (N, C, *spatial) with at least one spatial axis."""
    if x.ndim < 3:
        raise ValueError(
            f"expected {what} of shape (N, C, *spatial) with at least one spatial axis "
            f"(got {x.ndim}D input)"
        )


def spatial_size(shape) -> int:
    return math.prod(shape[2:])


def check_spatial(shape, use_input_stats: bool) -> None:
    """Instance statistics need more than one element per plane (non-empty input)."""
    if use_input_stats and spatial_size(shape) == 1 and math.prod(shape) > 0:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {tuple(shape)}"
        )


def check_eps(eps) -> float:
    if type(eps) is float and 0.0 <= eps < math.inf:  # the common case, without ABC checks
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return eps


def check_momentum(momentum):
    if momentum is None:
        return None
    if type(momentum) is float and math.isfinite(momentum):
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"momentum must be None or a finite real number, got {momentum!r}")
    momentum = float(momentum)
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be None or a finite real number, got {momentum!r}")
    return momentum


def check_per_channel(arr, C: int, name: str, N: int | None = None):
    """A (C,) parameter or buffer as an ndarray; (N, C) too when N is given (per sample)."""
    if arr is None:
        return None
    a = arr if isinstance(arr, np.ndarray) or is_gpu_array(arr) else np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} dtype {a.dtype} is not supported: use a real floating dtype")
    ok = a.shape == (C,) or (N is not None and a.shape == (N, C))
    if not ok:
        want = f"({C},)" if N is None else f"({C},) or ({N}, {C})"
        raise ValueError(
            f"{name} must have shape {want} to match the input's C = {C} channels, "
            f"got shape {a.shape}"
        )
    return a


def check_buffer(buf, C: int, name: str) -> np.ndarray:
    """A running-statistics buffer that is updated in place: writable float (C,) ndarray."""
    if not (isinstance(buf, np.ndarray) or is_gpu_array(buf)):
        raise TypeError(f"{name} must be a NumPy (or, for GPU input, CuPy) array: it is "
                        f"updated in place; got {type(buf).__name__}")
    check_float_dtype(buf.dtype, name)
    if buf.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the input's C = {C} channels, "
                         f"got shape {buf.shape}")
    return buf


def check_writable_buffer(buf: np.ndarray, name: str) -> None:
    if not getattr(buf.flags, "writeable", True):  # CuPy arrays are always writable
        raise ValueError(f"{name} is read-only but must be updated in place")


def check_running_buffers(running_mean, running_var, C: int, use_input_stats: bool,
                          momentum) -> bool:
    """The functional forms' buffer rules; returns whether buffers are given (tracking)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or neither)")
    tracking = running_mean is not None
    if tracking:
        check_buffer(running_mean, C, "running_mean")
        check_buffer(running_var, C, "running_var")
    if not use_input_stats and not tracking:
        raise ValueError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    if use_input_stats and tracking:
        check_writable_buffer(running_mean, "running_mean")
        check_writable_buffer(running_var, "running_var")
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) needs a batch count: use the "
                             "InstanceNorm modules, or pass momentum=1/num_batches")
    return tracking


def check_out(out, x: np.ndarray) -> None:
    if out is None:
        return
    if not (isinstance(out, np.ndarray) or is_gpu_array(out)):
        raise TypeError(f"out must be a NumPy or CuPy array, got {type(out).__name__}")
    check_device(out, x, "out")
    # byte order aside: a byte-swapped x was converted to native order, out stays as given
    if out.shape != x.shape or out.dtype.newbyteorder("=") != x.dtype.newbyteorder("="):
        raise ValueError(
            f"out must have the input's shape {x.shape} and dtype {x.dtype}, "
            f"got shape {out.shape} and dtype {out.dtype}"
        )
    if not getattr(out.flags, "writeable", True):
        raise ValueError("out is read-only")


def check_devices(x, **arrays) -> None:
    """check_device for each keyword argument (name=array) against x."""
    if sys.modules.get("cupy") is None:  # no CuPy array can exist: all on the host
        return
    for name, a in arrays.items():
        check_device(a, x, name)


def check_same(a: np.ndarray, x: np.ndarray, name: str) -> None:
    check_device(a, x, name)
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the input's shape {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} dtype {a.dtype} does not match the input dtype {x.dtype}")


def check_stats(a, N: int, C: int, name: str) -> np.ndarray:
    """Saved statistics: (N, C), or (C,) for fixed (running) statistics shared by all samples."""
    if not is_gpu_array(a):
        a = np.asarray(a)
    check_float_dtype(a.dtype, name)
    if a.shape not in ((N, C), (C,)):
        raise ValueError(f"{name} must have shape ({N}, {C}) (or ({C},)), got {a.shape}")
    return a


def check_module_input(x: np.ndarray, dims: tuple, num_features: int, affine: bool,
                       tracking: bool) -> None:
    """Rank and channel checks of InstanceNorm{1,2,3}d (dims = (unbatched, batched) ranks)."""
    if x.ndim not in dims:
        raise ValueError(f"expected {dims[0]}D or {dims[1]}D input (got {x.ndim}D input)")
    c = x.shape[0] if x.ndim == dims[0] else x.shape[1]
    if c == num_features:
        return
    if affine:
        raise ValueError(
            f"expected input's size at dim={x.ndim - dims[0]} to match num_features "
            f"({num_features}), but got: {c}."
        )
    if tracking:
        raise ValueError(
            f"expected input's channel count to match num_features ({num_features}) of the "
            f"running statistics, but got: {c}."
        )
    warnings.warn(
        f"input's size at dim={x.ndim - dims[0]} ({c}) does not match num_features "
        f"({num_features}); normalizing all {c} channels since affine=False and "
        f"track_running_stats=False",
        UserWarning,
        stacklevel=3,
    )


def check_module_dtype(x_dtype: np.dtype, module_dtype: np.dtype) -> None:
    if x_dtype == module_dtype or (x_dtype == np.float16 and module_dtype == np.float32):
        return
    raise TypeError(
        f"input dtype {x_dtype} does not match the module's dtype {module_dtype} "
        f"(build the module with dtype={x_dtype}, or convert the input)"
    )


# Fused activations: name -> the kernels' code (CIN_ACT_* in src/cinstnorm_kernels.h).
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}
_ACTIVATION_NAMES = "None, 'relu', 'leaky_relu', 'silu', 'gelu' or 'gelu_tanh'"


def check_activation(activation, negative_slope=0.01) -> tuple:
    """(code, slope) for the kernels: activation None or a known name (TypeError for another
    type, ValueError listing the names for an unknown one); negative_slope a finite real."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or a str ({_ACTIVATION_NAMES}), got "
                        f"{type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use {_ACTIVATION_NAMES}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a finite real number, got {negative_slope!r}")
    slope = float(negative_slope)
    if not math.isfinite(slope):
        raise ValueError(f"negative_slope must be a finite real number, got {negative_slope!r}")
    return ACTIVATIONS[activation], slope


def check_residual(residual, x):
    """The residual added after the activation: None, or an array of x's shape (any layout,
    on x's device) of a floating dtype; it is used in the compute dtype, so any float precision
    is accepted (a float64 residual for float32 x is rounded to float32, float16 x computes in
    float32 anyway).  Integer, bool and complex residuals are a TypeError."""
    if residual is None:
        return None
    check_device(residual, x, "residual")
    r = residual if is_gpu_array(residual) else to_numpy(residual, "residual")
    if r.dtype.kind != "f" or r.dtype.itemsize > 8:
        raise TypeError(f"residual dtype {r.dtype} is not supported: use a floating dtype "
                        f"(it is added in the input's compute dtype)")
    if r.shape != x.shape:
        raise ValueError(f"residual must have the input's shape {x.shape}, got {r.shape}")
    if not is_gpu_array(r) and not r.dtype.isnative:
        r = r.astype(r.dtype.newbyteorder("="))
    return r
