"""InstanceNorm1d/2d/3d against the step-by-step float64 model in tests/reference.py.

Every mode (affine x tracking x train/eval x momentum 0.1/None), 1d/2d/3d, batched and
unbatched, float32 and float64, 1 and 2 OpenMP threads; then parameters, buffers, gradients,
state_dict, repr and reset.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cinstnorm as cin
import reference as ref
from helpers import MODULE_NAMES, SPATIAL, assert_close, make_affine, make_x

CLASSES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
SEQUENCE = ["train", "train", "eval", "train", "eval", "eval", "train"]


def _assert_state(m, model, dtype):
    for name in ("weight", "bias", "running_mean", "running_var"):
        got, exp = getattr(m, name), getattr(model, name)
        if exp is None:
            assert got is None, name
        else:
            assert isinstance(got, np.ndarray) and got.shape == exp.shape, name
            assert got.dtype == dtype, name
            assert_close(got, exp, dtype=dtype, err_msg=name)
    assert m.num_batches_tracked == model.num_batches_tracked
    for name in ("weight_grad", "bias_grad"):
        got, exp = getattr(m, name), getattr(model, name)
        if exp is None:
            assert got is None, name
        else:
            assert_close(got, exp, dtype=dtype, grad=True, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_module_modes_sequence(rng, dim, batched, dtype, affine, track, momentum, threads):
    c = 3
    m = CLASSES[dim](c, eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track,
                     dtype=dtype)
    model = ref.ModuleModel(c, eps=1e-4, momentum=momentum, affine=affine,
                            track_running_stats=track)
    if affine:
        w, b = make_affine(rng, c, dtype)
        m.weight[...] = w
        m.bias[...] = b
        model.weight, model.bias = w.astype(np.float64), b.astype(np.float64)
    assert m.training is True
    _assert_state(m, model, dtype)

    with threadpool_limits(limits=threads, user_api="openmp"):
        for step, mode in enumerate(SEQUENCE):
            _sequence_step(rng, m, model, step, mode, (c,) + SPATIAL[dim], batched, dtype)


def _sequence_step(rng, m, model, step, mode, shape, batched, dtype):
    assert (m.train() if mode == "train" else m.eval()) is m
    model.training = mode == "train"
    assert m.training is model.training
    if batched:
        shape = (2 + step % 2,) + shape
    x = make_x(rng, shape, dtype)
    dy = make_x(rng, shape, dtype, spread=1.0)
    x_copy, dy_copy = x.copy(), dy.copy()
    xb, dyb = (x, dy) if batched else (x[None], dy[None])
    y = m(x)
    dx = m.backward(dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    y_ref = model.forward(xb)
    dx_ref = model.backward(dyb)
    if not batched:
        y_ref, dx_ref = y_ref[0], dx_ref[0]
    assert_close(y, y_ref, err_msg=f"y at step {step} ({mode})")
    assert_close(dx, dx_ref, grad=True, err_msg=f"dx at step {step} ({mode})")
    _assert_state(m, model, dtype)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(dy, dy_copy)


def test_forward_is_call(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=np.float64)
    x = make_x(rng, (2, 3, 4, 4))
    model = ref.ModuleModel(3, affine=True, track_running_stats=True)
    assert_close(m.forward(x), model.forward(x))
    assert_close(m(x), model.forward(x))
    assert m.num_batches_tracked == 2


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_defaults(dim):
    m = CLASSES[dim](4)
    assert m.training is True
    assert m.weight is None and m.bias is None
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    assert m.weight_grad is None and m.bias_grad is None
    assert list(m.state_dict().keys()) == []


@pytest.mark.parametrize("dtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_parameters_and_buffers(dim, dtype):
    m = CLASSES[dim](4, affine=True, track_running_stats=True, dtype=dtype)
    expected = np.dtype(np.float32 if dtype is None else dtype)
    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0)):
        a = getattr(m, name)
        assert isinstance(a, np.ndarray) and a.shape == (4,) and a.dtype == expected, name
        assert np.all(a == value), name
    assert m.num_batches_tracked == 0
    assert isinstance(m.num_batches_tracked, (int, np.integer))


def test_bias_false_is_scale_only(rng):
    m = cin.InstanceNorm2d(3, affine=True, bias=False, dtype=np.float64)
    assert m.bias is None and np.all(m.weight == 1.0)
    assert list(m.state_dict().keys()) == ["weight"]
    w = make_affine(rng, 3)[0]
    m.weight[...] = w
    x = make_x(rng, (2, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    model = ref.ModuleModel(3, affine=True, bias=False)
    model.weight = w.copy()
    assert_close(m(x), model.forward(x))
    assert_close(m.backward(dy), model.backward(dy), grad=True)
    assert m.bias_grad is None
    assert_close(m.weight_grad, model.weight_grad, grad=True)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_device_cpu(rng, device):
    m = cin.InstanceNorm1d(2, affine=True, device=device, dtype=np.float64)
    x = make_x(rng, (2, 2, 6))
    assert isinstance(m.weight, np.ndarray)
    assert_close(m(x), ref.forward(x, m.weight, m.bias)[0])


def test_buffers_updated_in_place(rng):
    m = cin.InstanceNorm2d(3, track_running_stats=True, dtype=np.float64)
    rm, rv = m.running_mean, m.running_var
    m(make_x(rng, (2, 3, 4, 4)))
    assert m.running_mean is rm and m.running_var is rv
    assert not np.all(rm == 0.0)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_num_batches_tracked_counts_training_forwards(rng, momentum):
    m = cin.InstanceNorm1d(2, track_running_stats=True, momentum=momentum, dtype=np.float64)
    for _ in range(3):
        m(make_x(rng, (2, 2, 5)))
    m(make_x(rng, (2, 5)))  # unbatched counts once
    assert m.num_batches_tracked == 4
    m.eval()
    m(make_x(rng, (2, 2, 5)))
    assert m.num_batches_tracked == 4
    assert m.state_dict()["num_batches_tracked"] == 4
    m.train()
    m(make_x(rng, (2, 2, 5)))
    assert m.num_batches_tracked == 5


def test_momentum_none_is_cumulative_average(rng):
    # written out without reference.update_running_stats: the running stats after k training
    # steps are the plain averages of the k batch statistics
    m = cin.InstanceNorm2d(3, track_running_stats=True, momentum=None, dtype=np.float64)
    batch_means, batch_vars = [], []
    for k in range(1, 5):
        x = make_x(rng, (k, 3, 3, 4))  # different batch sizes
        planes = x.reshape(k, 3, -1)
        batch_means.append(planes.mean(axis=2).mean(axis=0))
        batch_vars.append(planes.var(axis=2, ddof=1).mean(axis=0))
        m(x)
        assert m.num_batches_tracked == k
        np.testing.assert_allclose(m.running_mean, np.mean(batch_means, axis=0), rtol=1e-12)
        np.testing.assert_allclose(m.running_var, np.mean(batch_vars, axis=0), rtol=1e-12)
    # eval uses them and changes nothing
    m.eval()
    before = m.running_mean.copy(), m.running_var.copy()
    x = make_x(rng, (2, 3, 3, 4))
    assert_close(m(x), ref.forward(x, None, None, 1e-5, *before, use_input_stats=False)[0])
    np.testing.assert_array_equal(m.running_mean, before[0])
    np.testing.assert_array_equal(m.running_var, before[1])


def test_backward_accumulates_and_zero_grad(rng):
    m = cin.InstanceNorm3d(2, affine=True, dtype=np.float64)
    w, b = make_affine(rng, 2)
    m.weight[...] = w
    m.bias[...] = b
    assert m.weight_grad is None and m.bias_grad is None
    x1, x2 = make_x(rng, (2, 2, 2, 3, 3)), make_x(rng, (3, 2, 2, 3, 3))
    g1, g2 = rng.standard_normal(x1.shape), rng.standard_normal(x2.shape)

    m(x1)
    dx1 = m.backward(g1)
    _, mean1, rstd1 = ref.forward(x1, w, b)
    e1 = ref.backward_instance_stats(g1, x1, mean1, rstd1, w)
    assert_close(dx1, e1[0], grad=True)
    assert_close(m.weight_grad, e1[1], grad=True)
    assert_close(m.bias_grad, e1[2], grad=True)

    m(x2)
    dx2 = m.backward(g2)  # the gradient of the last forward's input
    _, mean2, rstd2 = ref.forward(x2, w, b)
    e2 = ref.backward_instance_stats(g2, x2, mean2, rstd2, w)
    assert dx2.shape == x2.shape
    assert_close(dx2, e2[0], grad=True)
    assert_close(m.weight_grad, e1[1] + e2[1], grad=True)
    assert_close(m.bias_grad, e1[2] + e2[2], grad=True)

    m.backward(g2)  # a second backward of the same forward accumulates again
    assert_close(m.weight_grad, e1[1] + 2 * e2[1], grad=True)

    m.zero_grad()
    assert m.weight_grad is None and m.bias_grad is None
    m(x1)
    m.backward(g1)
    assert_close(m.weight_grad, e1[1], grad=True)


def test_no_affine_has_no_grads(rng):
    m = cin.InstanceNorm2d(3, track_running_stats=True, dtype=np.float64)
    x = make_x(rng, (2, 3, 4, 4))
    m(x)
    m.backward(rng.standard_normal(x.shape))
    assert m.weight_grad is None and m.bias_grad is None


def test_train_eval_flags():
    m = cin.InstanceNorm2d(3)
    assert m.training is True
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and m.training is False
    assert m.train(mode=True) is m and m.training is True


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_state_dict_keys_and_values(rng, affine, track):
    m = cin.InstanceNorm2d(4, affine=affine, track_running_stats=track)
    expected = (["weight", "bias"] if affine else []) + (
        ["running_mean", "running_var", "num_batches_tracked"] if track else [])
    if track:
        m(make_x(rng, (2, 4, 3, 3), np.float32))
        m(make_x(rng, (2, 4, 3, 3), np.float32))
    sd = m.state_dict()
    assert list(sd.keys()) == expected
    for k in expected:
        v = sd[k]
        assert isinstance(v, np.ndarray), k
        if k == "num_batches_tracked":
            assert v.shape == () and v.dtype == np.int64 and int(v) == 2
        else:
            assert v.shape == (4,) and v.dtype == np.float32
            np.testing.assert_array_equal(v, getattr(m, k))


def _random_state(rng, c, dtype=np.float64):
    return {
        "weight": rng.uniform(0.5, 1.5, c).astype(dtype),
        "bias": rng.uniform(-1, 1, c).astype(dtype),
        "running_mean": rng.normal(size=c).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, c).astype(dtype),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    }


@pytest.mark.parametrize("source_dtype", [np.float32, np.float64, "list"])
def test_load_state_dict_values(rng, source_dtype):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)  # float32
    sd = _random_state(rng, 3, np.float64 if source_dtype == "list" else source_dtype)
    src = {k: (v.tolist() if source_dtype == "list" else v) for k, v in sd.items()}
    keep = {k: np.array(v, copy=True) for k, v in sd.items()}
    m.load_state_dict(src)
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(m, k).dtype == np.float32 and getattr(m, k).shape == (3,)
        np.testing.assert_allclose(getattr(m, k), sd[k], rtol=1e-7)
    assert m.num_batches_tracked == 7
    # the loaded module works in float32 and gives the reference numbers
    x = make_x(rng, (2, 3, 4, 4), np.float32)
    m.eval()
    assert_close(m(x), ref.forward(x, m.weight, m.bias, 1e-5, m.running_mean, m.running_var,
                                   use_input_stats=False)[0])
    m.train()
    m(x)  # training updates the module's buffers, never the caller's arrays
    assert m.num_batches_tracked == 8
    for k, v in keep.items():
        if source_dtype != "list":
            np.testing.assert_array_equal(sd[k], v)


def test_load_state_dict_missing_keys_strict(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    sd = _random_state(rng, 3)
    del sd["running_var"]
    with pytest.raises((KeyError, RuntimeError), match="running_var"):
        m.load_state_dict(sd)
    sd = _random_state(rng, 3)
    del sd["weight"]
    with pytest.raises((KeyError, RuntimeError), match="weight"):
        m.load_state_dict(sd, strict=True)


def test_load_state_dict_unexpected_keys_strict(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    sd = _random_state(rng, 3)
    sd["something_else"] = np.zeros(3)
    with pytest.raises((KeyError, RuntimeError), match="something_else"):
        m.load_state_dict(sd)
    # running stats given to a module that does not track them are unexpected
    m2 = cin.InstanceNorm2d(3, affine=True)
    with pytest.raises((KeyError, RuntimeError), match="running_mean"):
        m2.load_state_dict(_random_state(rng, 3))


def test_load_state_dict_not_strict(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=np.float64)
    sd = _random_state(rng, 3)
    del sd["running_var"]
    sd["extra"] = np.ones(2)
    m.load_state_dict(sd, strict=False)
    np.testing.assert_array_equal(m.weight, sd["weight"])
    np.testing.assert_array_equal(m.running_mean, sd["running_mean"])
    np.testing.assert_array_equal(m.running_var, np.ones(3))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_shape_mismatch_always_raises(rng, key, strict):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    sd = _random_state(rng, 3)
    sd[key] = np.ones(4)
    with pytest.raises((ValueError, RuntimeError)):
        m.load_state_dict(sd, strict=strict)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_repr_like_torch(dim):
    # the strings torch 2.13 prints (_NormBase.extra_repr, which includes bias=)
    name = MODULE_NAMES[dim]
    cls = CLASSES[dim]
    assert repr(cls(3)) == (f"{name}(3, eps=1e-05, momentum=0.1, affine=False, bias=False, "
                            "track_running_stats=False)")
    assert repr(cls(8, eps=1e-3, momentum=None, affine=True, track_running_stats=True)) == (
        f"{name}(8, eps=0.001, momentum=None, affine=True, bias=True, "
        "track_running_stats=True)")
    assert repr(cls(5, momentum=0.5, affine=True, bias=False)) == (
        f"{name}(5, eps=1e-05, momentum=0.5, affine=True, bias=False, "
        "track_running_stats=False)")


def test_reset_running_stats_and_parameters(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=np.float64)
    m.weight[...] = 2.0
    m.bias[...] = 3.0
    m(make_x(rng, (2, 3, 4, 4)))
    m(make_x(rng, (2, 3, 4, 4)))
    m.reset_running_stats()
    np.testing.assert_array_equal(m.running_mean, np.zeros(3))
    np.testing.assert_array_equal(m.running_var, np.ones(3))
    assert m.num_batches_tracked == 0
    np.testing.assert_array_equal(m.weight, np.full(3, 2.0))  # parameters untouched
    m(make_x(rng, (2, 3, 4, 4)))
    m.reset_parameters()  # like torch: resets the running stats too
    np.testing.assert_array_equal(m.weight, np.ones(3))
    np.testing.assert_array_equal(m.bias, np.zeros(3))
    np.testing.assert_array_equal(m.running_mean, np.zeros(3))
    np.testing.assert_array_equal(m.running_var, np.ones(3))
    assert m.num_batches_tracked == 0


def test_reset_without_parameters_or_buffers():
    m = cin.InstanceNorm1d(3)
    m.reset_parameters()
    m.reset_running_stats()
    assert m.weight is None and m.running_mean is None


def test_float16_input_to_float32_module(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    w, b = make_affine(rng, 3, np.float32)
    m.weight[...] = w
    m.bias[...] = b
    x = make_x(rng, (2, 3, 5, 5), np.float16)
    model = ref.ModuleModel(3, affine=True, track_running_stats=True)
    model.weight, model.bias = w.astype(np.float64), b.astype(np.float64)
    y = m(x)
    assert y.dtype == np.float16
    assert_close(y, model.forward(x))
    assert m.running_mean.dtype == np.float32
    assert_close(m.running_mean, model.running_mean, dtype=np.float32)
    assert_close(m.running_var, model.running_var, dtype=np.float32)
    dy = make_x(rng, x.shape, np.float16, spread=1.0)
    dx = m.backward(dy)
    assert dx.dtype == np.float16
    assert_close(dx, model.backward(dy), grad=True)
    m.eval()
    model.training = False
    x2 = make_x(rng, (3, 5, 5), np.float16)
    y2 = m(x2)
    assert y2.dtype == np.float16 and y2.shape == x2.shape
    assert_close(y2, model.forward(x2[None])[0])
