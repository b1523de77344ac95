"""Plain float64 NumPy reference for instance normalization, written from SPEC.md.

Everything here is computed in float64 from the values of the arrays it is given, with the
obvious formulas and no attempt at speed. The tests compare cinstnorm against these functions
(and against finite differences and torch), never against cinstnorm's own output.

Shapes: ``x`` is (N, C, *spatial); ``mean``/``rstd`` are (N, C); ``weight``, ``bias``,
``running_mean`` and ``running_var`` are (C,).
"""

import math

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _planes(x):
    """View ``x`` as (N, C, M) in float64."""
    x = _f64(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _expand(a, ndim):
    """(N, C) -> (N, C, 1, ..., 1) so it broadcasts against an ndim-dimensional input."""
    return a.reshape(a.shape + (1,) * (ndim - 2))


def _channel(a, ndim):
    """(C,) -> (1, C, 1, ..., 1)."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def plane_mean_var(x):
    """Per-plane mean and biased variance (divide by M), each (N, C)."""
    p = _planes(x)
    mean = p.mean(axis=-1)
    var = ((p - mean[..., None]) ** 2).mean(axis=-1)
    return mean, var


def instance_stats(x, eps=1e-5):
    """mean and rstd = 1/sqrt(var + eps) of every plane, each (N, C)."""
    mean, var = plane_mean_var(x)
    return mean, 1.0 / np.sqrt(var + eps)


def running_as_plane_stats(running_mean, running_var, n, eps=1e-5):
    """Running statistics broadcast to (N, C) mean and rstd, as eval mode uses them."""
    rm, rv = _f64(running_mean), _f64(running_var)
    mean = np.broadcast_to(rm, (n, rm.shape[0])).copy()
    rstd = np.broadcast_to(1.0 / np.sqrt(rv + eps), (n, rv.shape[0])).copy()
    return mean, rstd


def normalize(x, mean, rstd, weight=None, bias=None):
    """y = (x - mean) * rstd * w + b with (N, C) mean/rstd and optional (C,) weight/bias."""
    x = _f64(x)
    y = (x - _expand(_f64(mean), x.ndim)) * _expand(_f64(rstd), x.ndim)
    if weight is not None:
        y = y * _channel(_f64(weight), x.ndim)
    if bias is not None:
        y = y + _channel(_f64(bias), x.ndim)
    return y


def forward(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None,
            use_input_stats=True):
    """Forward pass; returns (y, mean, rstd), all float64.

    With ``use_input_stats`` the statistics of each plane are used, otherwise the running
    statistics (which must then be given).
    """
    x = _f64(x)
    if use_input_stats:
        mean, rstd = instance_stats(x, eps)
    else:
        mean, rstd = running_as_plane_stats(running_mean, running_var, x.shape[0], eps)
    return normalize(x, mean, rstd, weight, bias), mean, rstd


def update_running_stats(x, running_mean, running_var, momentum, num_batches_tracked=None):
    """New (running_mean, running_var) after one training step on ``x``, as float64.

    ``momentum=None`` is the cumulative moving average: the factor is
    ``1 / num_batches_tracked`` where ``num_batches_tracked`` is the count *after* this
    step's increment.
    """
    p = _planes(x)
    m = p.shape[-1]
    mean = p.mean(axis=-1)
    var_unbiased = ((p - mean[..., None]) ** 2).sum(axis=-1) / (m - 1)
    if momentum is None:
        factor = 1.0 / num_batches_tracked
    else:
        factor = float(momentum)
    rm = (1.0 - factor) * _f64(running_mean) + factor * mean.mean(axis=0)
    rv = (1.0 - factor) * _f64(running_var) + factor * var_unbiased.mean(axis=0)
    return rm, rv


def _sum_nc(a):
    """Sum of an (N, C, M) array over n and the plane: (C,)."""
    return a.sum(axis=(0, 2))


def backward_instance_stats(dy, x, mean, rstd, weight=None):
    """Gradients when the statistics are the planes' own: (dx, dweight, dbias).

    dx = w*rstd*(dy - mean(dy) - xhat*mean(dy*xhat)); dweight/dbias are None without weight.
    """
    shape = np.shape(x)
    g, p = _planes(dy), _planes(x)
    mean, rstd = _f64(mean)[..., None], _f64(rstd)[..., None]
    xhat = (p - mean) * rstd
    w = np.ones(p.shape[1]) if weight is None else _f64(weight)
    dx = w[None, :, None] * rstd * (g - g.mean(axis=-1, keepdims=True)
                                    - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    if weight is None:
        return dx.reshape(shape), None, None
    return dx.reshape(shape), _sum_nc(g * xhat), _sum_nc(g)


def backward_fixed_stats(dy, x, mean, rstd, weight=None):
    """Gradients when mean/rstd are constants (eval with running stats): (dx, dweight, dbias).

    dx = dy*w*rstd; dweight = sum dy*(x-mean)*rstd; dbias = sum dy.
    """
    shape = np.shape(x)
    g, p = _planes(dy), _planes(x)
    mean, rstd = _f64(mean)[..., None], _f64(rstd)[..., None]
    w = np.ones(p.shape[1]) if weight is None else _f64(weight)
    dx = g * w[None, :, None] * rstd
    if weight is None:
        return dx.reshape(shape), None, None
    return dx.reshape(shape), _sum_nc(g * (p - mean) * rstd), _sum_nc(g)


def backward(dy, x, mean, rstd, weight=None, use_input_stats=True):
    """Dispatch to the instance-stats or fixed-stats backward."""
    if use_input_stats:
        return backward_instance_stats(dy, x, mean, rstd, weight)
    return backward_fixed_stats(dy, x, mean, rstd, weight)


class ModuleModel:
    """What an InstanceNorm module should do, step by step, in float64.

    Tracks weight/bias, running stats, num_batches_tracked and accumulated gradients, with the
    same train/eval semantics as SPEC.md. Unbatched inputs are given to it already batched.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, bias=True):
        c = num_features
        self.eps, self.momentum = eps, momentum
        self.affine, self.track = affine, track_running_stats
        self.weight = np.ones(c) if affine else None
        self.bias = np.zeros(c) if (affine and bias) else None
        self.running_mean = np.zeros(c) if track_running_stats else None
        self.running_var = np.ones(c) if track_running_stats else None
        self.num_batches_tracked = 0 if track_running_stats else None
        self.training = True
        self.weight_grad = self.bias_grad = None
        self._saved = None

    def uses_input_stats(self):
        return self.training or not self.track

    def forward(self, x):
        x = _f64(x)
        if self.uses_input_stats():
            mean, rstd = instance_stats(x, self.eps)
            if self.training and self.track:
                self.num_batches_tracked += 1
                self.running_mean, self.running_var = update_running_stats(
                    x, self.running_mean, self.running_var, self.momentum,
                    self.num_batches_tracked)
        else:
            mean, rstd = running_as_plane_stats(self.running_mean, self.running_var,
                                                x.shape[0], self.eps)
        self._saved = (x, mean, rstd, self.uses_input_stats())
        return normalize(x, mean, rstd, self.weight, self.bias)

    def backward(self, dy):
        x, mean, rstd, use_input_stats = self._saved
        dx, dw, db = backward(dy, x, mean, rstd, self.weight, use_input_stats)
        if self.weight is not None:
            self.weight_grad = dw if self.weight_grad is None else self.weight_grad + dw
        if self.bias is not None:
            self.bias_grad = db if self.bias_grad is None else self.bias_grad + db
        return dx


# ---- fused activation and residual -------------------------------------------------------------
# Written from the definitions (torch's F.relu, F.leaky_relu, F.silu, F.gelu exact and 'tanh'),
# in float64, with math.erf (exact to double rounding) for the GELU.

ACTIVATIONS = (None, "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(t, name, negative_slope=0.01):
    """act(t) in float64."""
    t = _f64(t)
    if name is None:
        return t
    if name == "relu":
        return np.where(t > 0, t, 0.0)
    if name == "leaky_relu":
        return np.where(t > 0, t, t * negative_slope)
    if name == "silu":
        return t / (1.0 + np.exp(-t))
    if name == "gelu":
        return 0.5 * t * (1.0 + _erf(t / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * t * (1.0 + np.tanh(_SQRT_2_OVER_PI * (t + 0.044715 * t ** 3)))
    raise ValueError(name)


def activation_derivative(t, name, negative_slope=0.01):
    """act'(t) in float64 (ReLU/LeakyReLU: torch's value at 0, the negative side's)."""
    t = _f64(t)
    if name is None:
        return np.ones_like(t)
    if name == "relu":
        return (t > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(t > 0, 1.0, negative_slope)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-t))
        return s * (1.0 + t * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(t / np.sqrt(2.0))) + t * np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    if name == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (t + 0.044715 * t ** 3)
        th = np.tanh(u)
        return 0.5 * (1.0 + th) + 0.5 * t * (1.0 - th * th) * _SQRT_2_OVER_PI * (
            1.0 + 3 * 0.044715 * t * t)
    raise ValueError(name)


def forward_act(x, weight=None, bias=None, eps=1e-5, activation_name=None, negative_slope=0.01,
                residual=None, running_mean=None, running_var=None, use_input_stats=True):
    """y = act(normalize(x)) + residual; returns (y, mean, rstd), float64."""
    t, mean, rstd = forward(x, weight, bias, eps, running_mean, running_var, use_input_stats)
    y = activation(t, activation_name, negative_slope)
    if residual is not None:
        y = y + _f64(residual)
    return y, mean, rstd


def backward_act(dy, x, mean, rstd, weight=None, bias=None, activation_name=None,
                 negative_slope=0.01, use_input_stats=True):
    """(dx, dweight, dbias) through the activation: g = dy * act'(t), t the pre-activation."""
    t = normalize(x, mean, rstd, weight, bias)
    g = _f64(dy) * activation_derivative(t, activation_name, negative_slope)
    return backward(g, x, mean, rstd, weight, use_input_stats)
