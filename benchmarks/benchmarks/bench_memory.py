"""Peak memory of forward and backward; compare with ``peakmem_reference`` (setup alone)."""
import cinstnorm as cin

from .common import EPS, ShapeDtype, affine_parameters, backward_inputs


class PeakMemory(ShapeDtype):
    """Peak RSS: setup holds x, dy and the saved statistics, so forward - reference is the
    output plus workspace and backward - reference is dx plus workspace."""

    def setup(self, shape, dtype):
        self.x, self.dy, self.mean, self.rstd = backward_inputs(shape, dtype)
        self.weight, self.bias = affine_parameters(shape, dtype)

    def peakmem_reference(self, shape, dtype):
        pass

    def peakmem_forward(self, shape, dtype):
        cin.instance_norm_forward(self.x, self.weight, self.bias, EPS)

    def peakmem_backward(self, shape, dtype):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.weight)
