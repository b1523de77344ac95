"""InstanceNorm2d/3d modules (affine, tracking running statistics): training step and eval."""
import numpy as np

import cinstnorm as cin

from .common import (
    EPS,
    SHAPES,
    ShapeDtypeThreads,
    backward_inputs,
    module_class,
    random_input,
    warm_up_once,
)


class _ModuleBenchmark(ShapeDtypeThreads):
    """Builds the module for the shape; the thread count is set library-wide for the module."""

    def setup(self, shape, dtype, n_threads):
        self.saved_threads = cin.get_num_threads()
        cin.set_num_threads(n_threads)
        self.module = module_class(shape)(
            SHAPES[shape][1], eps=EPS, affine=True, track_running_stats=True, dtype=dtype
        )

    def teardown(self, shape, dtype, n_threads):
        cin.set_num_threads(self.saved_threads)


class ModuleTrainStep(_ModuleBenchmark):
    """One training step: zero_grad, forward (running statistics updated), backward."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        self.x, self.dy, _, _ = backward_inputs(shape, dtype)
        warm_up_once("train step", lambda: self.time_train_step(shape, dtype, n_threads))

    def time_train_step(self, shape, dtype, n_threads):
        self.module.zero_grad()
        self.module(self.x)
        self.module.backward(self.dy)


class ModuleEval(_ModuleBenchmark):
    """Eval-mode forward, normalized with (non-trivial) running statistics."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        self.x = random_input(shape, dtype)
        rng = np.random.default_rng(3)
        channels = SHAPES[shape][1]
        self.module.running_mean[...] = 0.1 * rng.standard_normal(channels)
        self.module.running_var[...] = rng.uniform(0.5, 2.0, channels)
        self.module.eval()
        warm_up_once("eval", lambda: self.time_eval(shape, dtype, n_threads))

    def time_eval(self, shape, dtype, n_threads):
        self.module(self.x)
