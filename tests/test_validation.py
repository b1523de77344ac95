"""Every rule of SPEC.md's "Validation" section, with the messages it gives verbatim, and a
check that nothing (input, buffers, out, parameters, counters) was modified by a call that raised.
"""

import re
import warnings

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import Snapshot, assert_close, make_x

CLASSES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
RANKS = {1: (2, 3), 2: (3, 4), 3: (4, 5)}


class ModuleSnapshot:
    """Everything a failed call must leave as it was."""

    def __init__(self, m):
        self.m = m
        self.arrays = Snapshot(m.weight, m.bias, m.running_mean, m.running_var,
                               m.weight_grad, m.bias_grad)
        self.nbt = m.num_batches_tracked
        self.training = m.training

    def assert_unchanged(self):
        self.arrays.assert_unchanged()
        assert self.m.num_batches_tracked == self.nbt
        assert self.m.training == self.training


def _tracked_module(dim, c, rng):
    """A module with non-trivial parameters, buffers and gradients."""
    m = CLASSES[dim](c, affine=True, track_running_stats=True, dtype=np.float64)
    x = make_x(rng, (2, c) + (4,) * dim)
    m(x)
    m.backward(rng.standard_normal(x.shape))
    return m


# ---------------------------------------------------------------- rank

@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wrong_rank(rng, dim):
    lo, hi = RANKS[dim]
    m = _tracked_module(dim, 3, rng)
    snap = ModuleSnapshot(m)
    for bad in (lo - 1, hi + 1):
        x = make_x(rng, (3,) * bad)
        xs = Snapshot(x)
        msg = f"expected {lo}D or {hi}D input (got {bad}D input)"
        with pytest.raises(ValueError, match=re.escape(msg)):
            m(x)
        xs.assert_unchanged()
    m.eval()
    snap.training = False
    with pytest.raises(ValueError, match=re.escape(f"(got {lo - 1}D input)")):
        m(make_x(rng, (3,) * (lo - 1)))
    snap.assert_unchanged()


@pytest.mark.parametrize("fn", ["instance_norm", "instance_norm_forward"])
@pytest.mark.parametrize("shape", [(), (6,), (2, 3)])
def test_functional_needs_a_spatial_axis(rng, fn, shape):
    x = make_x(rng, shape) if shape else np.array(1.0)
    with pytest.raises(ValueError):
        getattr(cin, fn)(x)


# ---------------------------------------------------------------- channels

@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_channel_mismatch_affine(rng, dim, track):
    m = CLASSES[dim](5, affine=True, track_running_stats=track, dtype=np.float64)
    snap = ModuleSnapshot(m)
    x = make_x(rng, (2, 3) + (4,) * dim)
    xs = Snapshot(x)
    msg = "expected input's size at dim=1 to match num_features (5), but got: 3."
    with pytest.raises(ValueError, match=re.escape(msg)):
        m(x)
    with pytest.raises(ValueError, match=re.escape("num_features (5), but got: 3.")):
        m(x[0])  # unbatched
    snap.assert_unchanged()
    xs.assert_unchanged()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_channel_mismatch_without_affine_or_tracking_warns_and_normalizes(rng, dim):
    m = CLASSES[dim](5, dtype=np.float64)
    x = make_x(rng, (2, 3) + (4,) * dim)
    with pytest.warns(UserWarning):
        y = m(x)
    assert_close(y, ref.forward(x)[0])
    with pytest.warns(UserWarning):
        y1 = m(x[1])
    assert_close(y1, ref.forward(x[1:])[0][0])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_channel_mismatch_with_tracking(rng, dim):
    m = CLASSES[dim](5, track_running_stats=True, dtype=np.float64)
    m(make_x(rng, (2, 5) + (4,) * dim))
    snap = ModuleSnapshot(m)
    x = make_x(rng, (2, 3) + (4,) * dim)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        snap.training = m.training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError) as info:
                m(x)
        assert "5" in str(info.value) and "3" in str(info.value), str(info.value)
        snap.assert_unchanged()


def test_no_warning_when_channels_match(rng):
    m = cin.InstanceNorm2d(3, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(make_x(rng, (2, 3, 4, 4)))
        m(make_x(rng, (3, 4, 4)))


# ---------------------------------------------------------------- one spatial element

@pytest.mark.parametrize("dim", [1, 2, 3])
def test_single_spatial_element_module(rng, dim):
    m = _tracked_module(dim, 3, rng)
    snap = ModuleSnapshot(m)
    shape = (2, 3) + (1,) * dim
    x = make_x(rng, shape)
    msg = f"Expected more than 1 spatial element when training, got input size {shape}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        m(x)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        m(x[0])
    snap.assert_unchanged()
    # eval with running stats accepts it
    m.eval()
    y = m(x)
    assert_close(y, ref.forward(x, m.weight, m.bias, 1e-5, m.running_mean, m.running_var,
                                use_input_stats=False)[0])
    # eval without tracking still uses the input's statistics
    m2 = CLASSES[dim](3, dtype=np.float64).eval()
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        m2(x)


def test_single_spatial_element_functional(rng):
    x = make_x(rng, (2, 3, 1, 1))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    out = np.full_like(x, 42.0)
    snap = Snapshot(x, rm, rv, out)
    msg = "Expected more than 1 spatial element when training, got input size (2, 3, 1, 1)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        cin.instance_norm(x, out=out)
    with pytest.raises(ValueError, match=re.escape(msg)):
        cin.instance_norm(x, rm, rv, use_input_stats=True, out=out)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        cin.instance_norm_forward(x[:, :, 0], out=out[:, :, 0])
    snap.assert_unchanged()


# ---------------------------------------------------------------- functional arguments

def test_use_input_stats_false_needs_buffers(rng):
    x = make_x(rng, (2, 3, 4))
    snap = Snapshot(x)
    msg = "Expected running_mean and running_var to be defined when use_input_stats is false"
    with pytest.raises(ValueError, match=re.escape(msg)):
        cin.instance_norm(x, use_input_stats=False)
    snap.assert_unchanged()


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_only_one_buffer(rng, given, use_input_stats):
    x = make_x(rng, (2, 3, 4))
    buf = np.full(3, 0.5)
    snap = Snapshot(x, buf)
    with pytest.raises(ValueError):
        cin.instance_norm(x, **{given: buf}, use_input_stats=use_input_stats)
    snap.assert_unchanged()


@pytest.mark.parametrize("length", [2, 4])
@pytest.mark.parametrize("bad", ["weight", "bias", "running_mean", "running_var"])
def test_wrong_length_vectors_instance_norm(rng, bad, length):
    x = make_x(rng, (2, 3, 4, 4))
    args = {"running_mean": np.zeros(3), "running_var": np.ones(3),
            "weight": np.ones(3), "bias": np.zeros(3)}
    args[bad] = np.full(length, 0.5)
    out = np.full_like(x, 42.0)
    snap = Snapshot(x, out, *args.values())
    for use_input_stats in (True, False):
        with pytest.raises(ValueError, match="3"):
            cin.instance_norm(x, **args, use_input_stats=use_input_stats, out=out)
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", ["weight", "bias"])
def test_wrong_length_vectors_forward(rng, bad):
    x = make_x(rng, (2, 3, 4))
    args = {"weight": np.ones(3), "bias": np.zeros(3)}
    args[bad] = np.ones(5)
    with pytest.raises(ValueError, match="3"):
        cin.instance_norm_forward(x, **args)


def test_wrong_shapes_backward(rng):
    x = make_x(rng, (2, 3, 5))
    dy = rng.standard_normal(x.shape)
    mean, rstd = ref.instance_stats(x)
    w = np.ones(3)
    snap = Snapshot(x, dy, mean, rstd, w)
    with pytest.raises(ValueError, match="3"):
        cin.instance_norm_backward(dy, x, mean, rstd, np.ones(4))
    with pytest.raises(ValueError):
        cin.instance_norm_backward(dy[:, :, :4], x, mean, rstd, w)
    with pytest.raises(ValueError):
        cin.instance_norm_backward(dy, x, mean[:, :2], rstd, w)
    with pytest.raises(ValueError):
        cin.instance_norm_backward(dy, x, mean, rstd[:1], w)
    snap.assert_unchanged()


# ---------------------------------------------------------------- dtypes

BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128,
              object]


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_non_float_input_is_type_error(dtype):
    x = (np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) % 5).astype(dtype)
    name = np.dtype(dtype).name
    snap = Snapshot(x)
    with pytest.raises(TypeError, match=name):
        cin.instance_norm(x)
    with pytest.raises(TypeError, match=name):
        cin.instance_norm_forward(x)
    mean = np.zeros((2, 3))
    rstd = np.ones((2, 3))
    with pytest.raises(TypeError, match=name):
        cin.instance_norm_backward(np.ones((2, 3, 4, 4)), x, mean, rstd)
    with pytest.raises(TypeError, match=name):
        cin.instance_norm_backward(x, np.ones((2, 3, 4, 4)), mean, rstd)
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    msnap = ModuleSnapshot(m)
    with pytest.raises(TypeError, match=name):
        m(x)
    msnap.assert_unchanged()
    snap.assert_unchanged()


@pytest.mark.parametrize("module_dtype, input_dtype", [
    (np.float32, np.float64), (np.float64, np.float32), (np.float64, np.float16)])
@pytest.mark.parametrize("mode", ["affine", "tracking"])
def test_module_dtype_mismatch(rng, module_dtype, input_dtype, mode):
    m = cin.InstanceNorm2d(3, affine=mode == "affine", track_running_stats=mode == "tracking",
                           dtype=module_dtype)
    snap = ModuleSnapshot(m)
    x = make_x(rng, (2, 3, 4, 4), input_dtype)
    with pytest.raises(TypeError):
        m(x)
    m.eval()
    snap.training = False
    with pytest.raises(TypeError):
        m(x)
    snap.assert_unchanged()


# ---------------------------------------------------------------- out=

@pytest.mark.parametrize("fn", ["instance_norm", "instance_norm_forward"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "transposed_shape"])
def test_out_must_match(rng, fn, bad):
    x = make_x(rng, (2, 3, 4, 5))
    out = {"shape": np.full((2, 3, 4, 6), 42.0),
           "dtype": np.full((2, 3, 4, 5), 42.0, dtype=np.float32),
           "transposed_shape": np.full((2, 3, 5, 4), 42.0)}[bad]
    snap = Snapshot(x, out)
    with pytest.raises(ValueError):
        getattr(cin, fn)(x, out=out)
    snap.assert_unchanged()


# ---------------------------------------------------------------- eps, momentum, n_threads

BAD_EPS = [-1e-5, float("nan"), float("inf"), float("-inf")]
BAD_MOMENTUM = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("eps", BAD_EPS)
def test_bad_eps_functional(rng, eps):
    x = make_x(rng, (2, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    snap = Snapshot(x, rm, rv)
    with pytest.raises(ValueError):
        cin.instance_norm(x, rm, rv, eps=eps)
    with pytest.raises(ValueError):
        cin.instance_norm(x, rm, rv, use_input_stats=False, eps=eps)
    with pytest.raises(ValueError):
        cin.instance_norm_forward(x, eps=eps)
    snap.assert_unchanged()


@pytest.mark.parametrize("momentum", BAD_MOMENTUM)
def test_bad_momentum_functional(rng, momentum):
    x = make_x(rng, (2, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    snap = Snapshot(x, rm, rv)
    with pytest.raises(ValueError):
        cin.instance_norm(x, rm, rv, momentum=momentum)
    snap.assert_unchanged()


@pytest.mark.parametrize("kw", [{"eps": e} for e in BAD_EPS] + [{"momentum": m} for m in
                                                                BAD_MOMENTUM])
def test_bad_eps_momentum_module(rng, kw):
    # the check may happen in the constructor or at the call; either way a ValueError and
    # no kernel run
    x = make_x(rng, (2, 3, 4, 4))
    with pytest.raises(ValueError):
        m = cin.InstanceNorm2d(3, track_running_stats=True, dtype=np.float64, **kw)
        m(x)


def test_eps_zero_and_momentum_none_are_valid(rng):
    m = cin.InstanceNorm2d(3, eps=0.0, momentum=None, track_running_stats=True,
                           dtype=np.float64)
    x = make_x(rng, (2, 3, 4, 4))
    assert_close(m(x), ref.forward(x, eps=0.0)[0])


def test_n_threads_zero(rng):
    x = make_x(rng, (2, 3, 4, 4))
    rm, rv = np.zeros(3), np.ones(3)
    out = np.full_like(x, 42.0)
    snap = Snapshot(x, rm, rv, out)
    with pytest.raises(ValueError):
        cin.instance_norm(x, rm, rv, n_threads=0, out=out)
    with pytest.raises(ValueError):
        cin.instance_norm_forward(x, n_threads=0, out=out)
    mean, rstd = ref.instance_stats(x)
    with pytest.raises(ValueError):
        cin.instance_norm_backward(np.ones_like(x), x, mean, rstd, n_threads=0)
    snap.assert_unchanged()
