"""GPU benchmarks on CuPy arrays: cinstnorm's CUDA kernels, the CuPy ``y = a*x + b`` floor over
the same bytes, and torch CUDA's ``instance_norm``.

Every benchmark skips itself (``NotImplementedError`` in ``setup``) without CuPy, without a
visible device, or at a commit whose cinstnorm has no GPU path (torch CUDA ones also without
torch or its CUDA).  Each timed call ends with a device synchronization, so asv times the
kernels, not their launch.  The ``track_*_vs_floor`` benchmarks report, from CUDA events in one
process, the fraction of the floor's bandwidth that cinstnorm reaches (1.0 = as fast as
``y = a*x + b``; the issue's target is >= 0.8 for tensors of 64 MiB and more).
"""
import functools

from .common import EPS, ShapeDtype, affine_parameters, backward_inputs, warm_up_once


def import_cupy():
    """CuPy with a visible device, or NotImplementedError (asv's "skip this benchmark")."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:  # ImportError, CUDARuntimeError
        raise NotImplementedError(f"no CuPy device: {exc}") from None
    return cupy


def import_torch_cuda():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    if not torch.cuda.is_available():
        raise NotImplementedError("torch has no CUDA device")
    return torch


@functools.lru_cache(maxsize=4)
def device_arrays(shape_name, dtype):
    """(x, weight, bias, dy, mean, rstd) on the device, from the CPU suite's inputs."""
    cupy = import_cupy()
    x, dy, mean, rstd = backward_inputs(shape_name, dtype)
    weight, bias = affine_parameters(shape_name, dtype)
    return tuple(cupy.asarray(a) for a in (x, weight, bias, dy, mean, rstd))


@functools.lru_cache(maxsize=1)
def affine_kernel():
    """The floor: one fused elementwise ``y = a*x + b`` kernel (1 read + 1 write per element)."""
    cupy = import_cupy()
    return cupy.ElementwiseKernel("T x, T a, T b", "T y", "y = a * x + b", "cin_bench_affine")


def require_gpu_path(cupy):
    """NotImplementedError unless this commit's cinstnorm runs CuPy arrays on the device."""
    import cinstnorm as cin

    probe = cupy.ones((1, 2, 4), dtype=cupy.float32)
    try:
        y = cin.instance_norm(probe)
    except Exception as exc:  # TypeError from a CPU-only cinstnorm
        raise NotImplementedError(f"cinstnorm has no GPU path here: {exc}") from None
    if not isinstance(y, cupy.ndarray):
        raise NotImplementedError("cinstnorm returned a host array for a CuPy input")
    return cin


def device_seconds(cupy, fn, repeat=20):
    """Mean seconds per call of fn on the device, from CUDA events (after one warm-up call)."""
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeat


class _Gpu(ShapeDtype):
    """Device copies of the CPU suite's inputs, and a synchronizing helper.  Subclasses that
    time only CuPy or torch set ``needs_cinstnorm = False``."""

    needs_cinstnorm = True

    def setup(self, shape, dtype):
        self.cp = import_cupy()
        if self.needs_cinstnorm:
            self.cin = require_gpu_path(self.cp)
        self.x, self.weight, self.bias, self.dy, self.mean, self.rstd = \
            device_arrays(shape, dtype)
        self.out = self.cp.empty_like(self.x)
        self.a, self.b = self.x.dtype.type(1.5), self.x.dtype.type(0.25)

    def sync(self):
        self.cp.cuda.Device().synchronize()

    def forward(self):
        self.cin.instance_norm_forward(self.x, self.weight, self.bias, EPS)

    def backward(self):
        self.cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.weight)

    def floor(self):
        affine_kernel()(self.x, self.a, self.b, self.out)

    def setup_torch(self):
        self.torch = import_torch_cuda()
        t = self.torch.as_tensor  # the same device memory (__cuda_array_interface__)
        self.xt, self.wt, self.bt, self.dyt = t(self.x), t(self.weight), t(self.bias), t(self.dy)

    def torch_forward(self):
        with self.torch.no_grad():
            self.torch.nn.functional.instance_norm(self.xt, weight=self.wt, bias=self.bt,
                                                   eps=EPS)


class GpuForward(_Gpu):
    """``instance_norm_forward`` on the device (the first call compiles; setup pays it)."""

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        warm_up_once(("gpu forward", shape, dtype), self.forward)
        self.sync()

    def time_forward(self, shape, dtype):
        self.forward()
        self.sync()

    def track_forward_vs_floor(self, shape, dtype):
        return device_seconds(self.cp, self.floor) / device_seconds(self.cp, self.forward)

    track_forward_vs_floor.unit = "fraction of the floor's bandwidth"


class GpuBackward(_Gpu):
    """``instance_norm_backward`` from saved statistics, and forward + backward."""

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        warm_up_once(("gpu backward", shape, dtype), self.backward)
        warm_up_once(("gpu forward", shape, dtype), self.forward)
        self.sync()

    def time_backward(self, shape, dtype):
        self.backward()
        self.sync()

    def time_forward_backward(self, shape, dtype):
        _, mean, rstd = self.cin.instance_norm_forward(self.x, self.weight, self.bias, EPS)
        self.cin.instance_norm_backward(self.dy, self.x, mean, rstd, self.weight)
        self.sync()

    def track_backward_vs_floor(self, shape, dtype):
        # backward moves three arrays (dy, x in; dx out), the floor two
        return 1.5 * device_seconds(self.cp, self.floor) / device_seconds(self.cp, self.backward)

    track_backward_vs_floor.unit = "fraction of the floor's bandwidth"


class GpuAffineFloor(_Gpu):
    """CuPy ``y = a*x + b`` into an allocated output: the device's practical floor."""

    needs_cinstnorm = False

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        self.floor()
        self.sync()

    def time_affine(self, shape, dtype):
        self.floor()
        self.sync()


class TorchCudaForward(_Gpu):
    """torch CUDA ``instance_norm`` forward under ``no_grad``, on the same device memory."""

    needs_cinstnorm = False

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        self.setup_torch()
        self.torch_forward()
        self.sync()

    def time_torch_forward(self, shape, dtype):
        self.torch_forward()
        self.sync()


class TorchCudaForwardBackward(_Gpu):
    """torch CUDA forward plus autograd backward to x, weight and bias."""

    needs_cinstnorm = False

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        self.setup_torch()
        self.xt = self.xt.clone().requires_grad_()
        self.wt = self.wt.clone().requires_grad_()
        self.bt = self.bt.clone().requires_grad_()
        self.time_torch_forward_backward(shape, dtype)

    def time_torch_forward_backward(self, shape, dtype):
        y = self.torch.nn.functional.instance_norm(self.xt, weight=self.wt, bias=self.bt,
                                                   eps=EPS)
        self.torch.autograd.grad(y, (self.xt, self.wt, self.bt), self.dyt)
        self.sync()


class GpuSpeedupOverTorch(_Gpu):
    """cinstnorm's forward speed-up over torch CUDA's, from CUDA events in one process (the
    issue's target: >= 2 on the few-big and one-plane shapes)."""

    def setup(self, shape, dtype):
        super().setup(shape, dtype)
        self.setup_torch()
        warm_up_once(("gpu forward", shape, dtype), self.forward)

    def track_forward_speedup(self, shape, dtype):
        return device_seconds(self.cp, self.torch_forward) / device_seconds(self.cp, self.forward)

    track_forward_speedup.unit = "x torch CUDA"
