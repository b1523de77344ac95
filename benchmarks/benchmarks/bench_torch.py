"""torch CPU comparisons (skipped when torch is not installed).

torch is imported in ``setup``, not at module level, so the cinstnorm benchmarks never run in a
process that has torch's OpenMP runtime loaded.
"""
from .common import (
    EPS,
    ShapeDtypeThreads,
    affine_parameters,
    backward_inputs,
    import_torch,
    random_input,
    warm_up_once,
)


class _TorchBenchmark(ShapeDtypeThreads):
    """Loads torch and sets its intra-op thread count for the benchmark."""

    def setup(self, shape, dtype, n_threads):
        self.torch = import_torch()
        self.saved_threads = self.torch.get_num_threads()
        self.torch.set_num_threads(n_threads)
        weight, bias = affine_parameters(shape, dtype)
        self.weight = self.torch.from_numpy(weight)
        self.bias = self.torch.from_numpy(bias)

    def teardown(self, shape, dtype, n_threads):
        self.torch.set_num_threads(self.saved_threads)


class TorchForward(_TorchBenchmark):
    """``torch.nn.functional.instance_norm`` forward under ``no_grad``."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        self.x = self.torch.from_numpy(random_input(shape, dtype))
        warm_up_once("torch forward", lambda: self.time_forward(shape, dtype, n_threads))

    def time_forward(self, shape, dtype, n_threads):
        with self.torch.no_grad():
            self.torch.nn.functional.instance_norm(
                self.x, weight=self.weight, bias=self.bias, eps=EPS
            )


class TorchForwardBackward(_TorchBenchmark):
    """Forward plus autograd backward to x, weight and bias."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        x, dy, _, _ = backward_inputs(shape, dtype)
        self.x = self.torch.from_numpy(x).requires_grad_()
        self.dy = self.torch.from_numpy(dy)
        self.weight.requires_grad_()
        self.bias.requires_grad_()
        warm_up_once(
            "torch forward_backward", lambda: self.time_forward_backward(shape, dtype, n_threads)
        )

    def time_forward_backward(self, shape, dtype, n_threads):
        y = self.torch.nn.functional.instance_norm(
            self.x, weight=self.weight, bias=self.bias, eps=EPS
        )
        self.torch.autograd.grad(y, (self.x, self.weight, self.bias), self.dy)
