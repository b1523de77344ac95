"""Fused activation and residual (issue 14): instance_norm_forward/backward with
``activation=`` (and ``residual=``) beside the plain call and the unfused chain (IN, then the
activation in NumPy; backward: np.where, then IN backward), on the style and dram shapes, plus
``track_*`` ratios of paired timings (fused over plain, chained over fused)."""
import time

import numpy as np

import cinstnorm as cin

from .common import EPS, affine_parameters, random_input, touched_empty_like, warm_up_once

SHAPES = ["style", "dram"]
ACTIVATIONS = ["none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"]


def _act(name):
    return None if name == "none" else name


class FusedActivation:
    """Forward and backward with each activation (none: the plain call), float32 and float64."""

    params = [SHAPES, ["float32", "float64"], ACTIVATIONS]
    param_names = ["shape", "dtype", "activation"]
    timeout = 180
    repeat = (3, 10, 2.0)

    def setup(self, shape, dtype, activation):
        self.x = random_input(shape, dtype)
        self.w, self.b = affine_parameters(shape, dtype)
        self.out = touched_empty_like(self.x)
        rng = np.random.default_rng(1)
        self.dy = rng.standard_normal(self.x.shape, dtype=dtype)
        self.residual = rng.standard_normal(self.x.shape, dtype=dtype)
        _, self.mean, self.rstd = cin.instance_norm_forward(self.x, self.w, self.b)
        warm_up_once("fused", lambda: self.time_forward(shape, dtype, activation))

    def time_forward(self, shape, dtype, activation):
        cin.instance_norm_forward(self.x, self.w, self.b, EPS, activation=_act(activation),
                                  out=self.out)

    def time_forward_residual(self, shape, dtype, activation):
        cin.instance_norm_forward(self.x, self.w, self.b, EPS, activation=_act(activation),
                                  residual=self.residual, out=self.out)

    def time_backward(self, shape, dtype, activation):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.w, self.b,
                                   activation=_act(activation), out=self.out)


def _best(fn, number=5, rounds=5):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


class FusedReluRatios:
    """Paired ratios for IN + ReLU (float32): fused/plain (target <= 1.15) and chained/fused
    (target >= 1.5), forward and backward, timed alternately in one process."""

    params = [SHAPES]
    param_names = ["shape"]
    timeout = 300
    number = 1
    repeat = 1

    def setup(self, shape):
        self.x = random_input(shape, "float32")
        self.w, self.b = affine_parameters(shape, "float32")
        self.y = touched_empty_like(self.x)
        self.dx = touched_empty_like(self.x)
        self.dy = np.random.default_rng(1).standard_normal(self.x.shape, dtype=np.float32)
        _, self.mean, self.rstd = cin.instance_norm_forward(self.x, self.w, self.b)
        self.pre = cin.instance_norm_forward(self.x, self.w, self.b)[0]

    def _plain(self):
        cin.instance_norm_forward(self.x, self.w, self.b, out=self.y)

    def _fused(self):
        cin.instance_norm_forward(self.x, self.w, self.b, activation="relu", out=self.y)

    def _chained(self):
        self._plain()
        np.maximum(self.y, 0, out=self.y)

    def _bwd_plain(self):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.w, out=self.dx)

    def _bwd_fused(self):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.w, self.b,
                                   activation="relu", out=self.dx)

    def _bwd_chained(self):
        g = np.where(self.pre > 0, self.dy, 0)
        cin.instance_norm_backward(g, self.x, self.mean, self.rstd, self.w, out=self.dx)

    def _pair(self, a, b):
        ta = tb = float("inf")
        for _ in range(5):
            ta = min(ta, _best(a, rounds=1))
            tb = min(tb, _best(b, rounds=1))
        return ta / tb

    def track_forward_fused_over_plain(self, shape):
        return self._pair(self._fused, self._plain)

    def track_forward_chained_over_fused(self, shape):
        return self._pair(self._chained, self._fused)

    def track_backward_fused_over_plain(self, shape):
        return self._pair(self._bwd_fused, self._bwd_plain)

    def track_backward_chained_over_fused(self, shape):
        return self._pair(self._bwd_chained, self._bwd_fused)

    track_forward_fused_over_plain.unit = "ratio"
    track_forward_chained_over_fused.unit = "ratio"
    track_backward_fused_over_plain.unit = "ratio"
    track_backward_chained_over_fused.unit = "ratio"
