"""Parity with torch 2.13 (CPU) where torch can be imported.

Outputs, running statistics through train/eval sequences, gradients from autograd, state_dict in
both directions (torch checkpoints of InstanceNorm2d and BatchNorm2d), repr, error messages, and
torch's side of the deliberate differences. Every test takes the ``torch`` fixture, which skips
without torch (or fails with CINSTNORM_REQUIRE_TORCH=1).
"""

import warnings

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import SPATIAL, assert_close, make_affine, make_x

CLASSES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
DTYPES = [np.float32, np.float64]


def _t(torch, a, grad=False):
    t = torch.from_numpy(np.array(a, copy=True))
    return t.requires_grad_() if grad else t


def _n(t):
    return t.detach().numpy()


def _torch_cls(torch, dim):
    return {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d,
            3: torch.nn.InstanceNorm3d}[dim]


def _is_213(torch):
    return torch.__version__.startswith("2.13")


@pytest.mark.parametrize("buffers", ["none", "update", "running"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_outputs_and_buffers(torch, rng, dim, dtype, affine, buffers):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    w, b = make_affine(rng, 4, dtype)
    w = None if affine == "none" else w
    b = b if affine == "weight_bias" else None
    rm = rng.normal(size=4).astype(dtype) if buffers != "none" else None
    rv = rng.uniform(0.5, 2.0, 4).astype(dtype) if buffers != "none" else None
    use = buffers != "running"
    trm = None if rm is None else _t(torch, rm)
    trv = None if rv is None else _t(torch, rv)
    ty = torch.nn.functional.instance_norm(
        _t(torch, x), trm, trv, None if w is None else _t(torch, w),
        None if b is None else _t(torch, b), use_input_stats=use, momentum=0.3, eps=1e-4)
    y = cin.instance_norm(x, rm, rv, w, b, use_input_stats=use, momentum=0.3, eps=1e-4)
    assert_close(y, _n(ty).astype(np.float64))
    if rm is not None:
        assert_close(rm, _n(trm).astype(np.float64))
        assert_close(rv, _n(trv).astype(np.float64))


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functional_gradients_from_autograd(torch, rng, dim, dtype, use_input_stats):
    x = make_x(rng, (3, 4) + SPATIAL[dim], dtype)
    g = make_x(rng, x.shape, dtype, spread=1.0)
    w, b = make_affine(rng, 4, dtype)
    rm = rng.normal(size=4).astype(dtype)
    rv = rng.uniform(0.5, 2.0, 4).astype(dtype)
    tx, tw, tb = _t(torch, x, True), _t(torch, w, True), _t(torch, b, True)
    ty = torch.nn.functional.instance_norm(tx, _t(torch, rm), _t(torch, rv), tw, tb,
                                           use_input_stats=use_input_stats)
    ty.backward(_t(torch, g))
    if use_input_stats:
        _, mean, rstd = cin.instance_norm_forward(x, w, b)
    else:
        mean, rstd = ref.running_as_plane_stats(rm, rv, 3)
        mean, rstd = mean.astype(dtype), rstd.astype(dtype)
    dx, dw, db = cin.instance_norm_backward(g, x, mean, rstd, w,
                                            use_input_stats=use_input_stats)
    assert_close(dx, _n(tx.grad).astype(np.float64), grad=True)
    assert_close(dw, _n(tw.grad).astype(np.float64), dtype=dtype, grad=True)
    assert_close(db, _n(tb.grad).astype(np.float64), dtype=dtype, grad=True)


SEQUENCE = ["train", "train", "eval", "train", "eval", "train"]


@pytest.mark.parametrize("momentum", [0.1, 0.6])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_module_sequence(torch, rng, dim, dtype, batched, affine, track, momentum):
    c = 3
    kw = dict(eps=1e-4, momentum=momentum, affine=affine, track_running_stats=track)
    m = CLASSES[dim](c, dtype=dtype, **kw)
    tm = _torch_cls(torch, dim)(c, dtype=torch.float64 if dtype == np.float64 else
                                torch.float32, **kw)
    if affine:
        w, b = make_affine(rng, c, dtype)
        m.weight[...] = w
        m.bias[...] = b
        with torch.no_grad():
            tm.weight.copy_(_t(torch, w))
            tm.bias.copy_(_t(torch, b))
    for step, mode in enumerate(SEQUENCE):
        getattr(m, mode)()
        getattr(tm, mode)()
        shape = ((2 + step % 2, c) if batched else (c,)) + SPATIAL[dim]
        x = make_x(rng, shape, dtype)
        dy = make_x(rng, shape, dtype, spread=1.0)
        tx = _t(torch, x, True)
        ty = tm(tx)
        ty.backward(_t(torch, dy))
        y = m(x)
        dx = m.backward(dy)
        msg = f"step {step} ({mode})"
        assert_close(y, _n(ty).astype(np.float64), err_msg=msg)
        assert_close(dx, _n(tx.grad).astype(np.float64), grad=True, err_msg=msg)
        if track:
            assert_close(m.running_mean, _n(tm.running_mean).astype(np.float64), err_msg=msg)
            assert_close(m.running_var, _n(tm.running_var).astype(np.float64), err_msg=msg)
        if affine:  # both accumulate gradients over the steps
            assert_close(m.weight_grad, _n(tm.weight.grad).astype(np.float64), grad=True,
                         err_msg=msg)
            assert_close(m.bias_grad, _n(tm.bias.grad).astype(np.float64), grad=True,
                         err_msg=msg)


def _trained_torch_module(torch, rng, cls, c=4):
    tm = cls(c, affine=True, track_running_stats=True) if cls is not torch.nn.BatchNorm2d \
        else cls(c)
    with torch.no_grad():
        tm.weight.copy_(_t(torch, rng.uniform(0.5, 1.5, c).astype(np.float32)))
        tm.bias.copy_(_t(torch, rng.uniform(-1, 1, c).astype(np.float32)))
    tm.train()
    for _ in range(3):
        tm(_t(torch, make_x(rng, (2, c, 5, 6), np.float32)))
    return tm


@pytest.mark.parametrize("how", ["numpy", "tensors", "file"])
def test_torch_checkpoint_loads_and_reproduces(torch, rng, tmp_path, how):
    tm = _trained_torch_module(torch, rng, torch.nn.InstanceNorm2d)
    sd = tm.state_dict()
    if how == "numpy":
        sd = {k: v.numpy() for k, v in sd.items()}
    elif how == "file":
        torch.save(tm.state_dict(), tmp_path / "ckpt.pt")
        sd = torch.load(tmp_path / "ckpt.pt")
    m = cin.InstanceNorm2d(4, affine=True, track_running_stats=True)
    m.load_state_dict(sd)
    x = make_x(rng, (3, 4, 5, 6), np.float32)
    tm.eval()
    m.eval()
    assert_close(m(x), _n(tm(_t(torch, x))).astype(np.float64))
    tm.train()
    m.train()
    assert_close(m(x), _n(tm(_t(torch, x))).astype(np.float64))
    assert_close(m.running_mean, _n(tm.running_mean).astype(np.float64))
    assert_close(m.running_var, _n(tm.running_var).astype(np.float64))


def test_batchnorm2d_checkpoint(torch, rng, tmp_path):
    bn = _trained_torch_module(torch, rng, torch.nn.BatchNorm2d)
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    m = cin.InstanceNorm2d(4, affine=True, track_running_stats=True)
    m.load_state_dict(torch.load(tmp_path / "bn.pt"))
    assert m.num_batches_tracked == 3
    bn.eval()
    m.eval()
    x = make_x(rng, (3, 4, 5, 6), np.float32)
    assert_close(m(x), _n(bn(_t(torch, x))).astype(np.float64))


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_cinstnorm_state_dict_loads_into_torch(torch, rng, affine, track):
    m = cin.InstanceNorm2d(4, affine=affine, track_running_stats=track)
    if affine:
        m.weight[...] = rng.uniform(0.5, 1.5, 4)
        m.bias[...] = rng.uniform(-1, 1, 4)
    for _ in range(2):
        m(make_x(rng, (2, 4, 5, 5), np.float32))
    tm = torch.nn.InstanceNorm2d(4, affine=affine, track_running_stats=track)
    sd = m.state_dict()
    assert list(sd.keys()) == list(tm.state_dict().keys())
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    m.eval()
    tm.eval()
    x = make_x(rng, (3, 4, 5, 5), np.float32)
    assert_close(m(x), _n(tm(_t(torch, x))).astype(np.float64))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_repr(torch, dim):
    for kw in [dict(), dict(affine=True), dict(affine=True, bias=False),
               dict(track_running_stats=True, momentum=None, eps=1e-3),
               dict(affine=True, track_running_stats=True, momentum=0.25, eps=0.5)]:
        assert repr(CLASSES[dim](7, **kw)) == repr(_torch_cls(torch, dim)(7, **kw))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_error_messages(torch, dim):
    lo = dim + 1
    for shape in [(3,) * (lo - 1), (3,) * (lo + 2)]:
        with pytest.raises(ValueError) as theirs:
            _torch_cls(torch, dim)(3)(torch.zeros(shape))
        with pytest.raises(ValueError) as ours:
            CLASSES[dim](3)(np.zeros(shape, np.float32))
        assert str(ours.value) == str(theirs.value)
    shape = (2, 3) + (4,) * dim
    with pytest.raises(ValueError) as theirs:
        _torch_cls(torch, dim)(5, affine=True)(torch.zeros(shape))
    with pytest.raises(ValueError) as ours:
        CLASSES[dim](5, affine=True)(np.zeros(shape, np.float32))
    assert str(ours.value) == str(theirs.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _torch_cls(torch, dim)(5)(torch.zeros(shape) + torch.arange(4.0 ** dim).reshape(
            (4,) * dim))
        CLASSES[dim](5)(np.zeros(shape, np.float32) + np.arange(4.0 ** dim, dtype=np.float32)
                        .reshape((4,) * dim))
    assert [w.category for w in caught] == [UserWarning, UserWarning]


def test_channels_last_values(torch, rng):
    x = make_x(rng, (2, 5, 6, 3), np.float32).transpose(0, 3, 1, 2)
    tx = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)
    ty = torch.nn.functional.instance_norm(tx)
    y = cin.instance_norm(x)
    assert_close(y, _n(ty).astype(np.float64))
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous


# ---------------------------------------------------------------- torch's side of the differences

def test_difference_momentum_none(torch, rng):
    tm = torch.nn.InstanceNorm2d(3, track_running_stats=True, momentum=None)
    m = cin.InstanceNorm2d(3, track_running_stats=True, momentum=None)
    xs = [make_x(rng, (2, 3, 4, 4), np.float32) for _ in range(3)]
    for x in xs:
        tm(_t(torch, x))
        m(x)
    if _is_213(torch):
        assert np.all(_n(tm.running_mean) == 0) and int(tm.num_batches_tracked) == 0
    assert m.num_batches_tracked == 3
    expected = np.mean([x.astype(np.float64).mean(axis=(2, 3)).mean(axis=0) for x in xs], axis=0)
    assert_close(m.running_mean, expected)


def test_difference_empty_batch(torch):
    tm = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    if _is_213(torch):
        with pytest.raises(IndexError):
            tm(torch.zeros(0, 3, 4, 4))
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    assert m(np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    assert np.all(m.running_mean == 0) and np.all(m.running_var == 1)


def test_difference_float32_accuracy(torch, rng):
    x = (1e5 + rng.standard_normal((2, 4, 32, 32))).astype(np.float32)
    y_ref = ref.forward(x)[0]
    ours = np.abs(cin.instance_norm(x) - y_ref).max()
    theirs = np.abs(_n(torch.nn.functional.instance_norm(_t(torch, x))) - y_ref).max()
    assert ours <= 1e-5
    assert ours < theirs
    if _is_213(torch):
        assert theirs > 1e-3  # the loss SPEC.md documents for torch (about 5e-3)


def test_difference_layout(torch, rng):
    x = make_x(rng, (2, 5, 6, 3), np.float32).transpose(0, 3, 1, 2)
    ty = torch.nn.functional.instance_norm(torch.from_numpy(x))
    if _is_213(torch):
        assert ty.is_contiguous()  # torch returns NCHW-contiguous
    assert not cin.instance_norm(x).flags.c_contiguous


def test_difference_type_error(torch):
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.instance_norm(torch.ones(2, 3, 4, dtype=torch.int32))
    assert not isinstance(theirs.value, TypeError) or not _is_213(torch)
    with pytest.raises(TypeError):
        cin.instance_norm(np.ones((2, 3, 4), np.int32))
