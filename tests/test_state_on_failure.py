"""A call that raises leaves everything as it was (issue #5, item 3).

Every failing path of the public API is taken once, and afterwards parameters, running
statistics, num_batches_tracked, accumulated gradients, inputs and ``out`` must be exactly
(bit for bit) what they were; the module must also go on working as if the failed call never
happened (its next backward uses the last *successful* forward). load_state_dict is all or
nothing: a bad value anywhere in the dict changes nothing, whatever the order of the keys.
"""

from collections import OrderedDict

import numpy as np
import pytest

import cinstnorm as cin
import reference as ref
from helpers import Snapshot, assert_close, make_affine, make_x

MODULES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
SPATIAL = {1: (6,), 2: (4, 5), 3: (3, 4, 2)}


def module_state(m):
    """Copies of everything a failing call must not change."""
    arrays = {k: None if getattr(m, k) is None else np.array(getattr(m, k), copy=True)
              for k in ("weight", "bias", "running_mean", "running_var", "weight_grad",
                        "bias_grad")}
    return arrays, m.num_batches_tracked, m.training


def assert_same_state(m, before):
    arrays, nbt, training = before
    for k, v in arrays.items():
        now = getattr(m, k)
        assert (v is None) == (now is None), k
        if v is not None:
            assert now.dtype == v.dtype and now.shape == v.shape, k
            assert np.array_equal(now, v, equal_nan=True), f"{k} changed"
    assert m.num_batches_tracked == nbt and type(m.num_batches_tracked) is type(nbt)
    assert m.training == training


def trained_module(rng, dim=2, C=3, dtype=np.float32, **kw):
    """A module after two training steps with gradients (non-trivial state everywhere)."""
    kw = {"affine": True, "track_running_stats": True, **kw}
    m = MODULES[dim](C, dtype=dtype, **kw)
    if m.weight is not None:
        w, b = make_affine(rng, C, dtype)
        m.weight[...] = w
        if m.bias is not None:
            m.bias[...] = b
    for _ in range(2):
        x = make_x(rng, (2, C) + SPATIAL[dim], dtype)
        y = m(x)
        m.backward(make_x(rng, y.shape, dtype))
    return m


def bad_forward_inputs(rng, dim, C, dtype):
    shape = (2, C) + SPATIAL[dim]
    good = make_x(rng, shape, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    return {
        "rank": (good[0, 0], ValueError),
        "rank_high": (good[None], ValueError),
        "channels": (make_x(rng, (2, C + 1) + SPATIAL[dim], dtype), ValueError),
        "dtype_int": (good.astype(np.int32), TypeError),
        "dtype_bool": (good > 0, TypeError),
        "dtype_complex": (good.astype(np.complex64), TypeError),
        "dtype_object": (good.astype(object), TypeError),
        "dtype_module": (good.astype(other), TypeError),
        "one_element_planes": (make_x(rng, (2, C) + (1,) * dim, dtype), ValueError),
        "string": ("not an array", TypeError),
    }


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("case", ["rank", "rank_high", "channels", "dtype_int", "dtype_bool",
                                  "dtype_complex", "dtype_object", "dtype_module",
                                  "one_element_planes", "string"])
def test_failing_forward_changes_nothing(rng, dim, case):
    C = 3
    m = trained_module(rng, dim, C)
    x_last = make_x(rng, (2, C) + SPATIAL[dim], np.float32)
    m(x_last)
    before = module_state(m)
    bad, exc = bad_forward_inputs(rng, dim, C, np.float32)[case]
    snap = Snapshot(bad if isinstance(bad, np.ndarray) else None)
    with pytest.raises(exc):
        m(bad)
    assert_same_state(m, before)
    snap.assert_unchanged()
    # the next backward still belongs to the last successful forward
    dy = make_x(rng, x_last.shape, np.float32)
    mean, rstd = ref.instance_stats(x_last, m.eps)
    dx_ref, dw_ref, db_ref = ref.backward_instance_stats(dy, x_last, mean, rstd,
                                                         before[0]["weight"])
    dx = m.backward(dy)
    assert_close(dx, dx_ref, grad=True)
    assert_close(m.weight_grad, before[0]["weight_grad"] + dw_ref, grad=True)
    assert_close(m.bias_grad, before[0]["bias_grad"] + db_ref, grad=True)


@pytest.mark.parametrize("n_threads, exc", [(0, ValueError), (-1000, ValueError),
                                            ("2", TypeError), (2.5, TypeError),
                                            (True, TypeError)])
def test_bad_n_threads_in_training_changes_nothing(rng, n_threads, exc):
    m = trained_module(rng)
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    before = module_state(m)
    with pytest.raises(exc):
        m(x, n_threads=n_threads)
    assert_same_state(m, before)
    m(x)
    before = module_state(m)
    with pytest.raises(exc):
        m.backward(np.ones_like(x), n_threads=n_threads)
    assert_same_state(m, before)


def test_failing_eval_forward_changes_nothing(rng):
    m = trained_module(rng).eval()
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    before = module_state(m)
    for bad in (x.astype(np.float64), x[:, :2], x[0, 0], x.astype(np.int64)):
        with pytest.raises((TypeError, ValueError)):
            m(bad)
        assert_same_state(m, before)


@pytest.mark.parametrize("case", ["shape", "batch", "dtype", "dtype_int", "rank", "string"])
def test_failing_backward_changes_nothing(rng, case):
    m = trained_module(rng)
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    m(x)
    dy = make_x(rng, x.shape, np.float32)
    bad = {"shape": dy[..., :-1], "batch": dy[:1], "dtype": dy.astype(np.float64),
           "dtype_int": dy.astype(np.int32), "rank": dy[0, 0], "string": "dy"}[case]
    before = module_state(m)
    with pytest.raises((TypeError, ValueError)):
        m.backward(bad)
    assert_same_state(m, before)
    # and a good backward afterwards accumulates on top of the unchanged gradients
    mean, rstd = ref.instance_stats(x, m.eps)
    _, dw, db = ref.backward_instance_stats(dy, x, mean, rstd, m.weight)
    m.backward(dy)
    assert_close(m.weight_grad, before[0]["weight_grad"] + dw, grad=True)
    assert_close(m.bias_grad, before[0]["bias_grad"] + db, grad=True)


def test_backward_before_forward_changes_nothing(rng):
    m = cin.InstanceNorm2d(3, affine=True, track_running_stats=True)
    before = module_state(m)
    with pytest.raises(RuntimeError):
        m.backward(np.ones((1, 3, 2, 2), np.float32))
    assert_same_state(m, before)


# ---- functional: nothing modified when a check fails --------------------------------------

def _functional_failures(rng):
    """(name, kwargs overrides, exception) for instance_norm with buffers and out."""
    return [
        ("out_shape", {"out": np.zeros((2, 3, 4, 6), np.float32)}, ValueError),
        ("out_dtype", {"out": np.zeros((2, 3, 4, 5), np.float64)}, ValueError),
        ("out_list", {"out": [[0.0]]}, TypeError),
        ("out_readonly", {"out": "readonly"}, ValueError),
        ("weight_len", {"weight": np.ones(4, np.float32)}, ValueError),
        ("weight_complex", {"weight": np.ones(3, np.complex64)}, TypeError),
        ("bias_2d", {"bias": np.zeros((1, 3), np.float32)}, ValueError),
        ("eps_negative", {"eps": -1.0}, ValueError),
        ("eps_nan", {"eps": float("nan")}, ValueError),
        ("momentum_inf", {"momentum": float("inf")}, ValueError),
        ("momentum_none", {"momentum": None}, ValueError),
        ("n_threads_zero", {"n_threads": 0}, ValueError),
        ("buffer_len", {"running_var": np.ones(4, np.float32)}, ValueError),
        ("buffer_list", {"running_var": [1.0, 1.0, 1.0]}, TypeError),
        ("buffer_int", {"running_var": np.ones(3, np.int64)}, TypeError),
        ("buffer_readonly", {"running_var": "readonly"}, ValueError),
        ("one_buffer", {"running_var": None}, ValueError),
        ("input_int", {"input": "int"}, TypeError),
        ("input_planes_of_one", {"input": "ones"}, ValueError),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _functional_failures(np.random.default_rng())])
def test_failing_instance_norm_changes_nothing(rng, name):
    override, exc = {c[0]: (c[1], c[2]) for c in _functional_failures(rng)}[name]
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    w, b = make_affine(rng, 3, np.float32)
    rm = rng.uniform(-1, 1, 3).astype(np.float32)
    rv = rng.uniform(0.5, 2, 3).astype(np.float32)
    kw = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, momentum=0.1,
              out=np.full(x.shape, 7.0, np.float32))
    for k, v in override.items():
        if isinstance(v, str) and v == "readonly":
            v = np.array(kw[k], copy=True)
            v.flags.writeable = False
        elif k == "input" and v == "int":
            v = (x * 10).astype(np.int32)
        elif k == "input" and v == "ones":
            v = x[:, :, :1, :1].copy()
        kw[k] = v
    arrays = [v for v in kw.values() if isinstance(v, np.ndarray)]
    snap = Snapshot(*arrays)
    ids = {k: id(v) for k, v in kw.items()}
    with pytest.raises(exc):
        cin.instance_norm(**kw)
    snap.assert_unchanged()
    assert {k: id(v) for k, v in kw.items()} == ids


@pytest.mark.parametrize("bad", ["out_shape", "out_dtype", "out_readonly", "weight", "eps",
                                 "n_threads"])
def test_failing_forward_backward_pair_changes_nothing(rng, bad):
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    dy = make_x(rng, x.shape, np.float32)
    w = np.ones(3, np.float32)
    out = np.full(x.shape, 3.0, np.float32)
    if bad == "out_shape":
        out = out[..., :-1]
    elif bad == "out_dtype":
        out = out.astype(np.float64)
    elif bad == "out_readonly":
        out.flags.writeable = False
    fkw = dict(weight=w, out=out)
    bkw = dict(weight=w, out=out)
    if bad == "weight":
        fkw["weight"] = bkw["weight"] = np.ones(5, np.float32)
    elif bad == "eps":
        fkw["eps"] = -1.0
    elif bad == "n_threads":
        fkw["n_threads"] = bkw["n_threads"] = 0
    mean, rstd = (a.astype(np.float32) for a in ref.instance_stats(x))
    snap = Snapshot(x, dy, w, out, mean, rstd)
    with pytest.raises((TypeError, ValueError)):
        cin.instance_norm_forward(x, **fkw)
    snap.assert_unchanged()
    if bad == "eps":
        return
    with pytest.raises((TypeError, ValueError)):
        cin.instance_norm_backward(dy, x, mean, rstd, **bkw)
    snap.assert_unchanged()


# ---- load_state_dict: all or nothing ----------------------------------------------------

def _good_state(m, rng):
    d = OrderedDict()
    for k in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, k) is not None:
            d[k] = rng.uniform(0.5, 2.0, m.num_features).astype(np.float64)
    if m.track_running_stats:
        d["num_batches_tracked"] = np.array(17, dtype=np.int64)
    return d


BAD_VALUES = {
    "shape_long": lambda c: np.ones(c + 1),
    "shape_2d": lambda c: np.ones((1, c)),
    "shape_scalar": lambda c: np.float64(1.0),
    "complex": lambda c: np.ones(c, np.complex64),
    "bool": lambda c: np.ones(c, bool),
    "object": lambda c: np.array([object()] * c, dtype=object),
    "string": lambda c: "abc",
    "ragged": lambda c: [[1.0, 2.0], [3.0]],
}
BAD_COUNTS = {"float": np.array(1.5), "vector": np.array([1, 2]), "bool": np.array(True),
              "string": "seven", "empty": np.array([], np.int64)}


@pytest.mark.parametrize("bad_key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_bad_value_loads_nothing(rng, bad_key, bad, strict):
    m = trained_module(rng)
    d = _good_state(m, rng)
    d[bad_key] = BAD_VALUES[bad](m.num_features)
    # the bad entry last, so that every good entry has been seen before it fails
    d.move_to_end(bad_key)
    before = module_state(m)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        m.load_state_dict(d, strict=strict)
    assert_same_state(m, before)


@pytest.mark.parametrize("bad", sorted(BAD_COUNTS))
def test_load_state_dict_bad_count_loads_nothing(rng, bad):
    m = trained_module(rng)
    d = _good_state(m, rng)
    d["num_batches_tracked"] = BAD_COUNTS[bad]
    before = module_state(m)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        m.load_state_dict(d)
    assert_same_state(m, before)


@pytest.mark.parametrize("change", ["missing", "unexpected", "both"])
def test_load_state_dict_strict_keys_load_nothing(rng, change):
    m = trained_module(rng)
    d = _good_state(m, rng)
    if change in ("missing", "both"):
        del d["running_var"]
    if change in ("unexpected", "both"):
        d["running_std"] = np.ones(3)
    before = module_state(m)
    with pytest.raises(KeyError) as info:
        m.load_state_dict(d, strict=True)
    assert isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert ("running_var" in text) == (change != "unexpected")
    assert ("running_std" in text) == (change != "missing")
    assert_same_state(m, before)


def test_load_state_dict_not_a_mapping_loads_nothing(rng):
    m = trained_module(rng)
    before = module_state(m)
    with pytest.raises((TypeError, KeyError, RuntimeError)):
        m.load_state_dict([("weight", np.ones(3))])
    with pytest.raises((TypeError, KeyError, RuntimeError)):
        m.load_state_dict(None)
    assert_same_state(m, before)


def test_load_state_dict_success_after_failure(rng):
    m = trained_module(rng)
    d = _good_state(m, rng)
    bad = OrderedDict(d)
    bad["running_var"] = np.ones(4)
    with pytest.raises(ValueError):
        m.load_state_dict(bad)
    m.load_state_dict(d)
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert np.array_equal(getattr(m, k), d[k].astype(np.float32))
    assert m.num_batches_tracked == 17
