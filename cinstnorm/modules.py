"""InstanceNorm1d/2d/3d: parameters, running statistics, momentum, train/eval, state_dict.

A thin layer over :mod:`cinstnorm.functional`: it validates, calls the kernels, and only then
changes its own state, so a call that raises leaves the module exactly as it was.

Thread safety: calls on *different* module objects may run concurrently from several Python
threads (the kernels release the GIL). A single module object is not thread-safe for training:
``forward`` updates running statistics and saves tensors for ``backward``; guard it with a lock
or give each thread its own module.

Device: a module built with ``device="cuda"`` (or moved with ``.to("cuda")``) keeps its
parameters and buffers as CuPy arrays on that device and runs CuPy input there; the running
statistics are updated on the device.  A module holding arrays on one device refuses input
from the other with a TypeError (a module without parameters or buffers takes either).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from . import _cpu, _gpu
from . import _validation as V
from .functional import _backward, _forward, _forward_fixed, _running_update
from ._config import resolve_threads

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "StateDictKeyError"]


class StateDictKeyError(KeyError, RuntimeError):
    """Missing or unexpected keys in ``load_state_dict(strict=True)``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateDictShapeError(ValueError, RuntimeError):
    """A ``load_state_dict`` value whose shape does not match the module's."""


def _as_host_array(value) -> np.ndarray:
    """A state_dict value as an ndarray: NumPy, CuPy (copied to the host), lists, torch tensors
    (moved to the CPU)."""
    if _gpu.is_gpu_array(value):
        return value.get()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, maybe on a GPU
        value = value.detach().cpu()
    return V.to_numpy(value, "state_dict value")


def _parse_device(device):
    """None/'cpu' -> None; 'cuda', 'cuda:N' (or a cupy.cuda.Device) -> the device id N."""
    if device is None or device == "cpu":
        return None
    if hasattr(device, "id") and type(device).__name__ == "Device":  # cupy.cuda.Device
        return int(device.id)
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        index = device[5:] or None
        if index is None:
            return int(_gpu.require_cupy().cuda.Device().id)
        if index.isdigit():
            return int(index)
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _on_device(a, device_id):
    """A host or device array on the module's device (None: the host); a view when it is."""
    if device_id is None:
        return _as_host_array(a)
    cupy = _gpu.require_cupy()
    with cupy.cuda.Device(device_id):
        return cupy.asarray(a)


def _accumulate(grad, sums_p, N: int, C: int, dtype):
    """grad (None: nothing yet) plus the per-channel sums over n of per-plane sums_p, added in
    float64, as an array of dtype."""
    if type(sums_p) is np.ndarray and sums_p.size:
        return _cpu.channel_sums(np.ascontiguousarray(sums_p), N, C, dtype, grad)
    g = sums_p.reshape(N, C).sum(axis=0)  # CuPy sums, or none (N = 0)
    return (g if grad is None else grad + g).astype(dtype)


class _InstanceNorm:
    """Common body of InstanceNorm1d/2d/3d; subclasses set ``_dims`` (unbatched, batched)."""

    _dims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, *, bias: bool = True, activation: Optional[str] = None,
                 negative_slope: float = 0.01) -> None:
        self._act, self._slope = V.check_activation(activation, negative_slope)
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        device_id = _parse_device(device)
        self.num_features = int(num_features)
        self.eps = V.check_eps(eps)
        self.momentum = V.check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = np.dtype(np.float32 if dtype is None else dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype {self.dtype} is not supported: use float32 or float64")
        C = self.num_features
        self.weight = np.ones(C, self.dtype) if self.affine else None
        self.bias = np.zeros(C, self.dtype) if self.affine and bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.weight_grad = None
        self.bias_grad = None
        self.activation = activation
        self.negative_slope = self._slope
        self.training = True
        self._saved = None
        self._device_id = None
        if device_id is not None:
            self.to(device)

    # ---- device -------------------------------------------------------------------------------

    _ARRAYS = ("weight", "bias", "running_mean", "running_var", "weight_grad", "bias_grad")

    @property
    def device(self) -> str:
        """Where the parameters and buffers live: ``'cpu'`` or ``'cuda:N'``."""
        return "cpu" if self._device_id is None else f"cuda:{self._device_id}"

    def to(self, device):
        """Move parameters, buffers and accumulated gradients to ``device`` ('cpu', 'cuda',
        'cuda:N'); returns self.  Moving to another device forgets the saved forward (call
        forward again before backward).  All or nothing: a failed move changes nothing.

        Examples
        --------
        >>> import cinstnorm as cin
        >>> cin.InstanceNorm2d(3, affine=True).to("cpu").device
        'cpu'
        """
        device_id = _parse_device(device)
        moved = {k: _on_device(getattr(self, k), device_id) for k in self._ARRAYS
                 if getattr(self, k) is not None}
        for k, v in moved.items():
            setattr(self, k, v)
        if device_id != self._device_id:
            self._saved = None
        self._device_id = device_id
        return self

    def cpu(self):
        """``self.to("cpu")``."""
        return self.to("cpu")

    def cuda(self, device: Optional[int] = None):
        """``self.to("cuda")`` (or ``"cuda:N"``)."""
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def _has_arrays(self) -> bool:
        return self.weight is not None or self.bias is not None or self.track_running_stats

    def _check_input_device(self, x, what: str = "input") -> None:
        if (type(x) is np.ndarray and self._device_id is None) or not self._has_arrays():
            return  # host input, host module (the common case first)
        where = V.device_name(x)
        if where != self.device:
            fix = "module.to('cuda')" if where != "cpu" else "module.to('cpu')"
            raise TypeError(
                f"{what} is on {where} but this {type(self).__name__}'s parameters and buffers "
                f"are on {self.device}: move the module ({fix}) or the {what}"
            )

    # ---- mode and parameters --------------------------------------------------------------

    def train(self, mode: bool = True):
        """Set training mode (instance statistics; running statistics updated). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics when tracked). Returns self."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics reset; weight = 1 and bias = 0 (in place)."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def zero_grad(self) -> None:
        """Forget accumulated gradients (weight_grad and bias_grad become None)."""
        self.weight_grad = None
        self.bias_grad = None

    # ---- forward / backward -----------------------------------------------------------------

    def _batched(self, x: np.ndarray) -> np.ndarray:
        return x[np.newaxis] if x.ndim == self._dims[0] else x

    def forward(self, x, *, n_threads: Optional[int] = None) -> np.ndarray:
        """Normalize x ((C, *spatial) or (N, C, *spatial)); saves what backward needs.

        In training mode (or without running statistics) each plane is normalized by its own
        statistics, and tracked running statistics are updated with ``momentum`` (None: the
        cumulative average ``1/num_batches_tracked``). In eval mode with running statistics
        those are used and nothing is updated.
        """
        x = V.as_input(x)
        self._check_input_device(x)
        V.check_module_input(x, self._dims, self.num_features, self.affine,
                             self.track_running_stats)
        V.check_module_dtype(x.dtype, self.dtype)
        xb = self._batched(x)
        use_input_stats = self.training or not self.track_running_stats
        V.check_spatial(xb.shape, use_input_stats)
        nt = resolve_threads(n_threads)
        if use_input_stats:
            y, mean_p, var_p, rstd_p = _forward(xb, self.weight, self.bias, self.eps, nt,
                                                act=self._act, slope=self._slope)
            if self.training and self.track_running_stats and xb.size > 0:
                self._update_running(mean_p, var_p, xb.shape)
            self._saved = (xb, mean_p, rstd_p, True)
        else:
            rm = self.running_mean.astype(np.float64)
            rv = self.running_var.astype(np.float64)
            y = _forward_fixed(xb, rm, rv, self.weight, self.bias, self.eps, nt,
                               act=self._act, slope=self._slope)
            self._saved = (xb, rm, 1.0 / (rv + self.eps) ** 0.5, False)
        return y[0] if x.ndim == self._dims[0] else y

    __call__ = forward

    def _update_running(self, mean_p, var_p, shape) -> None:
        count = self.num_batches_tracked + 1
        factor = 1.0 / count if self.momentum is None else self.momentum
        _running_update(self.running_mean, self.running_var, mean_p, var_p, shape, factor)
        self.num_batches_tracked = count

    def backward(self, dy, *, n_threads: Optional[int] = None) -> np.ndarray:
        """Gradient with respect to the last forward's input.

        Accumulates ``weight_grad`` / ``bias_grad`` (when affine) like torch's ``.grad``.
        The last forward's input is referenced, not copied: modifying it in place before
        calling backward changes the result.
        """
        if self._saved is None:
            raise RuntimeError("backward called before forward")
        xb, mean_p, rstd_p, use_input_stats = self._saved
        dy = V.as_input(dy, "dy")
        V.check_device(dy, xb, "dy", "the last forward's input")
        unbatched = dy.ndim == self._dims[0]
        dyb = dy[np.newaxis] if unbatched else dy
        V.check_same(dyb, xb, "dy" + (" (unbatched)" if unbatched else ""))
        nt = resolve_threads(n_threads)
        dx, sum_dy, sum_dy_xhat = _backward(dyb, xb, mean_p, rstd_p, self.weight,
                                            use_input_stats, nt, bias=self.bias, act=self._act,
                                            slope=self._slope)
        N, C = xb.shape[:2]
        if self.weight is not None:
            self.weight_grad = _accumulate(self.weight_grad, sum_dy_xhat, N, C, self.dtype)
        if self.bias is not None:
            self.bias_grad = _accumulate(self.bias_grad, sum_dy, N, C, self.dtype)
        return dx[0] if unbatched else dx

    # ---- state ------------------------------------------------------------------------------

    def _state_items(self):
        items = []
        if self.weight is not None:
            items.append(("weight", self.weight))
        if self.bias is not None:
            items.append(("bias", self.bias))
        if self.track_running_stats:
            items += [("running_mean", self.running_mean), ("running_var", self.running_var)]
        return items

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of weight, bias, running_mean, running_var, num_batches_tracked (torch's keys).

        Arrays are on the module's device (CuPy arrays for a GPU module); num_batches_tracked
        is a 0-d int64 NumPy array either way.

        Examples
        --------
        >>> import cinstnorm as cin
        >>> list(cin.InstanceNorm2d(3, affine=True, track_running_stats=True).state_dict())
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        """
        d = OrderedDict((k, v.copy()) for k, v in self._state_items())
        if self.track_running_stats:
            d["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return d

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Load weight/bias/running statistics (NumPy or CuPy arrays, lists, torch tensors);
        values are copied to the module's device.

        All or nothing: every value is checked before anything is written. With ``strict``,
        missing or unexpected keys raise :class:`StateDictKeyError` (a KeyError and a
        RuntimeError); a shape mismatch always raises :class:`StateDictShapeError`.
        A missing ``num_batches_tracked`` keeps the current count (old torch checkpoints).
        """
        targets = dict(self._state_items())
        expected = list(targets) + (["num_batches_tracked"] if self.track_running_stats else [])
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise StateDictKeyError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys: {missing}, unexpected keys: {unexpected}"
            )
        staged = {}
        for k, dest in targets.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            if not _gpu.is_gpu_array(v):
                v = _as_host_array(v)
            if v.shape != dest.shape:
                raise StateDictShapeError(
                    f"size mismatch for {k}: copying a param with shape {v.shape} from "
                    f"checkpoint, the shape in current module is {dest.shape}."
                )
            if v.dtype.kind not in "fiu":
                raise TypeError(f"{k}: dtype {v.dtype} cannot be loaded into {dest.dtype}")
            staged[k] = v
        if self._device_id is not None:  # upload (and check the transfer) before writing
            staged = {k: _on_device(v, self._device_id) for k, v in staged.items()}
        else:
            staged = {k: _as_host_array(v) for k, v in staged.items()}
        count = None
        if self.track_running_stats and "num_batches_tracked" in state_dict:
            c = _as_host_array(state_dict["num_batches_tracked"])
            if c.size != 1 or c.dtype.kind not in "iu":
                raise StateDictShapeError(
                    f"num_batches_tracked must be a single integer, got {c.dtype} shape {c.shape}"
                )
            count = int(c.reshape(()))
        for k, v in staged.items():
            targets[k][...] = v
        if count is not None:
            self.num_batches_tracked = count

    # ---- torch interop (torch optional) -----------------------------------------------------

    @classmethod
    def from_torch(cls, module, dtype=None):
        """A cinstnorm module with the configuration and state of a torch norm module.

        Takes ``torch.nn.InstanceNorm{1,2,3}d`` (or a BatchNorm with the same keys); weight,
        bias and running statistics are copied (through DLPack), train/eval mode is kept.
        ``dtype`` defaults to that of the module's tensors; a module without any (no affine,
        no tracking) gives float32 unless ``dtype`` says otherwise.

        Examples
        --------
        >>> import torch, cinstnorm as cin  # doctest: +SKIP
        >>> m = cin.InstanceNorm2d.from_torch(torch.nn.InstanceNorm2d(3, affine=True))  # doctest: +SKIP
        """
        ref = module.weight if getattr(module, "weight", None) is not None else \
            getattr(module, "running_mean", None)
        if dtype is None and ref is not None:
            dtype = _as_host_array(ref).dtype
        affine = bool(getattr(module, "affine", False))
        m = cls(int(module.num_features), eps=float(module.eps), momentum=module.momentum,
                affine=affine, track_running_stats=bool(module.track_running_stats),
                dtype=dtype, bias=not affine or getattr(module, "bias", None) is not None)
        m.load_state_dict(module.state_dict())
        return m.train(bool(module.training))

    def to_torch(self):
        """The equivalent ``torch.nn.InstanceNorm{1,2,3}d`` with this module's state (copied).

        Examples
        --------
        >>> import cinstnorm as cin
        >>> tm = cin.InstanceNorm2d(3, affine=True).to_torch()  # doctest: +SKIP

        A module with a fused ``activation`` has no torch equivalent (torch's layer has none):
        ValueError.
        """
        if self.activation is not None:
            raise ValueError(f"to_torch: this module fuses activation={self.activation!r}, "
                             f"which torch.nn.{type(self).__name__} has no equivalent for; "
                             f"build it without activation and follow it with the torch "
                             f"activation module")
        import torch

        cls = getattr(torch.nn, type(self).__name__)
        tm = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 track_running_stats=self.track_running_stats,
                 bias=not self.affine or self.bias is not None,
                 dtype=getattr(torch, self.dtype.name))
        if self._device_id is not None:
            tm = tm.to(f"cuda:{self._device_id}")
        with torch.no_grad():  # DLPack: host arrays to CPU tensors, CuPy arrays to CUDA ones
            tm.load_state_dict({k: torch.from_dlpack(v if _gpu.is_gpu_array(v)
                                                     else np.ascontiguousarray(v))
                                for k, v in self.state_dict().items()})
        return tm.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}" + self._activation_repr())

    def _activation_repr(self) -> str:
        """The fused activation, shown only when set (the repr is torch's otherwise)."""
        if self.activation is None:
            return ""
        slope = f", negative_slope={self.negative_slope}" \
            if self.activation == "leaky_relu" else ""
        return f", activation={self.activation!r}{slope}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over (N, C, L) or (C, L) input, like ``torch.nn.InstanceNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance.
    momentum : float or None
        Running-statistics momentum; None for the cumulative moving average.
    affine : bool
        Learnable per-channel weight (ones) and bias (zeros).
    track_running_stats : bool
        Keep running mean/variance, used in eval mode.
    device : None, "cpu", "cuda" or "cuda:N"
        Where parameters and buffers live ("cuda": CuPy arrays on that GPU).
    dtype : float32 (default) or float64
    bias : bool, keyword only
        With ``affine``, False leaves out the bias (scale only).
    activation : {None, "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"}, keyword only
        Fused after the affine step in forward (train and eval) and backward (see
        :func:`cinstnorm.instance_norm_forward`); not part of the state_dict.
    negative_slope : float, keyword only
        LeakyReLU's slope.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> m = cin.InstanceNorm1d(4, affine=True)
    >>> m(np.random.default_rng(0).normal(size=(2, 4, 16)).astype(np.float32)).shape
    (2, 4, 16)
    """

    _dims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over (N, C, H, W) or (C, H, W), like ``torch.nn.InstanceNorm2d``.

    Parameters are those of :class:`InstanceNorm1d`.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    >>> x = np.random.default_rng(0).normal(5, 10, size=(2, 3, 8, 8)).astype(np.float32)
    >>> y = m(x)
    >>> dx = m.backward(np.ones_like(y))
    >>> m
    InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    >>> m.num_batches_tracked, m.bias_grad.tolist()
    (1, [128.0, 128.0, 128.0])
    """

    _dims = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization over (N, C, D, H, W) or (C, D, H, W), like
    ``torch.nn.InstanceNorm3d``.

    Parameters are those of :class:`InstanceNorm1d`.

    Examples
    --------
    >>> import numpy as np, cinstnorm as cin
    >>> m = cin.InstanceNorm3d(2, dtype=np.float64)
    >>> m(np.random.default_rng(0).normal(size=(2, 4, 4, 4))).shape
    (2, 4, 4, 4)
    """

    _dims = (4, 5)
