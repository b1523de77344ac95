"""Functional kernels: forward, backward from saved statistics, and the np.copyto floor."""
import math
import time

import numpy as np

import cinstnorm as cin

from .common import (
    EPS,
    ShapeDtype,
    ShapeDtypeThreads,
    affine_parameters,
    backward_inputs,
    random_input,
    touched_empty_like,
    warm_up_once,
)


class Forward(ShapeDtypeThreads):
    """``instance_norm_forward`` with an affine weight and bias."""

    def setup(self, shape, dtype, n_threads):
        self.x = random_input(shape, dtype)
        self.weight, self.bias = affine_parameters(shape, dtype)
        self.out = touched_empty_like(self.x)
        warm_up_once("forward", lambda: self.time_forward_out(shape, dtype, n_threads))

    def time_forward(self, shape, dtype, n_threads):
        cin.instance_norm_forward(self.x, self.weight, self.bias, EPS, n_threads=n_threads)

    def time_forward_out(self, shape, dtype, n_threads):
        # into a mapped output: the like-for-like comparison with CopyFloor
        cin.instance_norm_forward(
            self.x, self.weight, self.bias, EPS, n_threads=n_threads, out=self.out
        )


class Backward(ShapeDtypeThreads):
    """``instance_norm_backward`` from saved statistics, and a functional forward + backward."""

    def setup(self, shape, dtype, n_threads):
        self.x, self.dy, self.mean, self.rstd = backward_inputs(shape, dtype)
        self.weight, self.bias = affine_parameters(shape, dtype)
        warm_up_once("backward", lambda: self.time_forward_backward(shape, dtype, n_threads))

    def time_backward(self, shape, dtype, n_threads):
        cin.instance_norm_backward(
            self.dy, self.x, self.mean, self.rstd, self.weight, n_threads=n_threads
        )

    def time_forward_backward(self, shape, dtype, n_threads):
        _, mean, rstd = cin.instance_norm_forward(
            self.x, self.weight, self.bias, EPS, n_threads=n_threads
        )
        cin.instance_norm_backward(self.dy, self.x, mean, rstd, self.weight, n_threads=n_threads)


class CopyFloor(ShapeDtype):
    """``np.copyto`` of the input's bytes into a mapped array: the machine's practical floor."""

    def setup(self, shape, dtype):
        self.x = random_input(shape, dtype)
        self.out = touched_empty_like(self.x)

    def time_copyto(self, shape, dtype):
        np.copyto(self.out, self.x)


class BackwardOut(ShapeDtypeThreads):
    """``instance_norm_backward`` into a mapped ``out``: the like-for-like comparison with
    CopyFloor (no page faults for dx)."""

    def setup(self, shape, dtype, n_threads):
        self.x, self.dy, self.mean, self.rstd = backward_inputs(shape, dtype)
        self.weight, _ = affine_parameters(shape, dtype)
        self.out = touched_empty_like(self.x)

    def time_backward_out(self, shape, dtype, n_threads):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.weight,
                                   n_threads=n_threads, out=self.out)


def _channels_last(a):
    """The same values with channels-last memory ((N, *spatial, C)), as an (N, C, ...) view."""
    perm = (0,) + tuple(range(2, a.ndim)) + (1,)
    return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))


def interleaved_best_seconds(fns, repeat=7, min_sample_seconds=0.02):
    """Best seconds per call of each of ``fns`` (a list of zero-argument functions), timed side
    by side: one warm-up call each, then ``repeat`` rounds of one sample per function (the
    order reversed every other round), each sample the mean over as many calls as fill
    ``min_sample_seconds``."""
    numbers = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        warm = time.perf_counter() - start
        numbers.append(max(1, min(1000, math.ceil(min_sample_seconds / max(warm, 1e-9)))))
    best = [math.inf] * len(fns)
    order = list(range(len(fns)))
    for round_ in range(repeat):
        for i in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for _ in range(numbers[i]):
                fns[i]()
            best[i] = min(best[i], (time.perf_counter() - start) / numbers[i])
    return best


class ChannelsLast(ShapeDtype):
    """Forward and backward on channels-last memory (read in place), 2 threads at most;
    compare with Forward.time_forward_out / BackwardOut for the NCHW path.

    The ``track_*_cl_vs_nchw`` benchmarks report, from one process, the channels-last time over
    the NCHW time of the same logical arrays (both into mapped ``out=`` arrays of their own
    layout, same thread count, samples alternated): lower is better, 1.0 = as fast as NCHW
    (the issue's target: <= 1.3)."""

    def setup(self, shape, dtype):
        x, dy, self.mean, self.rstd = backward_inputs(shape, dtype)
        self.x_nchw, self.dy_nchw = x, dy
        self.x, self.dy = _channels_last(x), _channels_last(dy)
        self.weight, self.bias = affine_parameters(shape, dtype)
        self.out = touched_empty_like(self.x)
        self.n_threads = min(2, cin.get_num_threads())

    def _forward(self, x, out):
        cin.instance_norm_forward(x, self.weight, self.bias, EPS, n_threads=self.n_threads,
                                  out=out)

    def _backward(self, dy, x, out):
        cin.instance_norm_backward(dy, x, self.mean, self.rstd, self.weight,
                                   n_threads=self.n_threads, out=out)

    def time_forward_channels_last(self, shape, dtype):
        cin.instance_norm_forward(self.x, self.weight, self.bias, EPS, n_threads=self.n_threads,
                                  out=self.out)

    def time_backward_channels_last(self, shape, dtype):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.weight,
                                   n_threads=self.n_threads, out=self.out)

    def track_forward_cl_vs_nchw(self, shape, dtype):
        out_nchw = touched_empty_like(self.x_nchw)
        nchw, cl = interleaved_best_seconds([lambda: self._forward(self.x_nchw, out_nchw),
                                             lambda: self._forward(self.x, self.out)])
        return cl / nchw

    track_forward_cl_vs_nchw.unit = "ratio"

    def track_backward_cl_vs_nchw(self, shape, dtype):
        out_nchw = touched_empty_like(self.x_nchw)
        nchw, cl = interleaved_best_seconds(
            [lambda: self._backward(self.dy_nchw, self.x_nchw, out_nchw),
             lambda: self._backward(self.dy, self.x, self.out)])
        return cl / nchw

    track_backward_cl_vs_nchw.unit = "ratio"
