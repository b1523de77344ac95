"""The fast paths of the public calls (``_cpu.fast_forward``, ``fast_instance_norm``,
``fast_backward``): checked in C, they take dense arrays with plain arguments and must give
bit for bit what the full Python path gives; on anything else they decline (return None) and
the full path runs, with its own results or errors, changing nothing when it raises.

Every case runs twice on fresh copies of the same arguments: as the library runs it, and with
the fast paths switched off (monkeypatched to decline), so the second run is the full path.
"""

import numpy as np
import pytest

import cinstnorm as cin
from cinstnorm import _cpu

FAST_NAMES = ("fast_forward", "fast_instance_norm", "fast_backward")
# small planes in batches, whole planes, planes cut into chunks (one plane on two threads; planes
# larger than the chunk size), 1-D and 3-D spatial shapes
SHAPES = [(2, 3, 8, 8), (1, 64, 16, 16), (3, 5, 7), (2, 4, 3, 4, 5), (1, 1, 200, 200),
          (1, 2, 300, 300), (2, 3, 40, 41), (64, 2, 2)]


@pytest.fixture
def full_path(monkeypatch):
    """A function that runs a call with the fast paths declining everything."""
    def run(fn):
        with monkeypatch.context() as m:
            for name in FAST_NAMES:
                m.setattr(_cpu, name, lambda *a, **k: None)
            return fn()
    return run


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # the error itself is what is compared
        return ("raised", type(exc), str(exc))


def assert_identical(a, b, path="result"):
    """Same structure, types, shapes, dtypes, strides and bytes."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{path}[{i}]")
        return
    if a is None:
        assert b is None, path
        return
    assert type(a) is type(b), path
    assert a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides, path
    assert np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                          np.ascontiguousarray(b).view(np.uint8)), f"{path}: values differ"


def snapshot(args):
    return [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]


def assert_unchanged(before, args):
    for b, a in zip(before, args):
        if isinstance(a, np.ndarray) and a.dtype.hasobject:
            assert a.tolist() == b.tolist(), "an argument changed"
        elif isinstance(a, np.ndarray):
            assert a.tobytes() == b.tobytes(), "an argument changed"


def compare(call, make, full_path, fast_expected=None):
    """call(*args, **kw) on fresh (args, kw) = make() as the library runs it and on the full
    path: the same result (bitwise, with out returned as itself) or the same error, and
    nothing changed by a call that raised."""
    runs = []
    for runner in (lambda f: f(), full_path):
        args, kw = make()
        arrays = list(args) + list(kw.values())
        before = snapshot(arrays)
        got = runner(lambda: outcome(lambda: call(*args, **kw)))
        if got[0] == "raised":
            assert_unchanged(before, arrays)
        elif kw.get("out") is not None:
            res = got[1][0] if isinstance(got[1], tuple) else got[1]
            assert res is kw["out"]
        runs.append(got)
    fast, full = runs
    assert fast[0] == full[0], (fast, full)
    if fast[0] == "raised":
        assert fast[1:] == full[1:]
    else:
        assert_identical(fast[1], full[1])
    return fast


def data(rng, shape, dtype=np.float32, C=None):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    C = shape[1] if C is None else C
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    return x, w, b


# ---- the fast path is taken and agrees bitwise with the full path ----------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", ["none", "weight", "both", "float64", "per-sample"])
@pytest.mark.parametrize("n_threads", [None, 1, 2])
def test_forward_fast_equals_full(rng, full_path, shape, dtype, affine, n_threads):
    x, w, b = data(rng, shape, dtype)
    N, C = shape[:2]
    w, b = {"none": (None, None), "weight": (w, None), "both": (w, b),
            "float64": (w.astype(np.float64), b.astype(np.float64)),
            "per-sample": (np.tile(w, (N, 1)), np.tile(b, (N, 1)))}[affine]
    assert _cpu.fast_forward(x, w, b, 1e-5, n_threads, None) is not None
    compare(cin.instance_norm_forward,
            lambda: ((x, w, b), {"n_threads": n_threads}), full_path)
    compare(cin.instance_norm_forward,
            lambda: ((x, w, b, 0.25), {"n_threads": n_threads, "out": np.empty_like(x)}),
            full_path)
    if affine != "per-sample":
        assert _cpu.fast_instance_norm(x, None, None, w, b, True, 0.1, 1e-5, n_threads,
                                       None) is not None
        compare(cin.instance_norm,
                lambda: ((x,), {"weight": w, "bias": b, "n_threads": n_threads}), full_path)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stats", ["saved", "saved-float64", "fixed"])
@pytest.mark.parametrize("weight", [False, True, "per-sample"])
def test_backward_fast_equals_full(rng, full_path, shape, dtype, stats, weight):
    x, w, b = data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    N, C = shape[:2]
    _, mean, rstd = cin.instance_norm_forward(x, w, b)
    use = stats != "fixed"
    if stats == "saved-float64":
        mean, rstd = mean.astype(np.float64), rstd.astype(np.float64)
    elif stats == "fixed":
        mean, rstd = mean[0], rstd[0]
    w = {False: None, True: w, "per-sample": np.tile(w, (N, 1))}[weight]
    assert _cpu.fast_backward(dy, x, mean, rstd, w, use, None, None) is not None
    compare(cin.instance_norm_backward,
            lambda: ((dy, x, mean, rstd, w), {"use_input_stats": use}), full_path)
    compare(cin.instance_norm_backward,
            lambda: ((dy, x, mean, rstd, w), {"use_input_stats": use, "n_threads": 2,
                                              "out": np.empty_like(x)}), full_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["bias", "per-sample", "fixed", "bias wrong length",
                                  "bias without weight", "bias list"])
def test_backward_bias_without_activation(rng, full_path, monkeypatch, dtype, case):
    # the forward's bias passed back without an activation is only checked: the call stays on
    # the fast path (it used to drop to the full path: 20-40 % slower on tiny planes), and a
    # bias the full path rejects is declined, so the full path raises its own error
    shape = (4, 6, 8, 8)
    N, C = shape[:2]
    x, w, b = data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, rstd = cin.instance_norm_forward(x, w, b)
    use = case != "fixed"
    if case == "fixed":
        mean, rstd = mean[0], rstd[0]
    if case == "per-sample":
        w, b = np.tile(w, (N, 1)), np.tile(b, (N, 1))
    if case == "bias wrong length":
        b = b[:4]
    if case == "bias without weight":
        w = None
    if case == "bias list":
        b = b.tolist()
    fast = _cpu.fast_backward(dy, x, mean, rstd, w, use, None, None, False, b)
    assert (fast is not None) == (case in ("bias", "per-sample", "fixed"))
    compare(cin.instance_norm_backward,
            lambda: ((dy, x, mean, rstd, w, b), {"use_input_stats": use}), full_path)
    if fast is not None:  # the bias changes nothing without an activation
        for got, want in zip(fast, cin.instance_norm_backward(dy, x, mean, rstd, w,
                                                              use_input_stats=use)):
            assert np.array_equal(got, want) and got.dtype == want.dtype
        # and the public call takes that path
        taken = []
        real = _cpu.fast_backward

        def spy(*a, **k):  # (planes: the full path's internal call, a[8])
            taken.append((len(a) > 8 and a[8], real(*a, **k)))
            return taken[-1][1]
        monkeypatch.setattr(_cpu, "fast_backward", spy)
        cin.instance_norm_backward(dy, x, mean, rstd, w, b, use_input_stats=use)
        assert len(taken) == 1 and taken[0][0] is False and taken[0][1] is not None


FUSED_SHAPES = [(2, 3, 8, 8), (2, 3, 40, 41), (1, 2, 300, 300)]
ACTS = ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh"]


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", ["none", "both", "per-sample"])
@pytest.mark.parametrize("act", ACTS)
def test_fused_forward_fast_equals_full(rng, full_path, shape, dtype, affine, act):
    # an activation without a residual takes the fast path too (the kernels are the same)
    x, w, b = data(rng, shape, dtype)
    N = shape[0]
    w, b = {"none": (None, None), "both": (w, b),
            "per-sample": (np.tile(w, (N, 1)), np.tile(b, (N, 1)))}[affine]
    code = cin._validation.ACTIVATIONS[act]
    assert _cpu.fast_forward(x, w, b, 1e-5, 2, None, _cpu.FORWARD_Y_STATS, code, 0.2) is not None
    kw = {"activation": act, "negative_slope": 0.2, "n_threads": 2}
    compare(cin.instance_norm_forward, lambda: ((x, w, b), dict(kw)), full_path)
    compare(cin.instance_norm_forward,
            lambda: ((x, w, b), dict(kw, out=np.empty_like(x))), full_path)
    compare(cin.instance_norm, lambda: ((x,), dict(kw, weight=w, bias=b)), full_path)


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", ["weight", "both", "per-sample", "none"])
@pytest.mark.parametrize("act", ACTS)
def test_fused_backward_fast_equals_full(rng, full_path, shape, dtype, params, act):
    x, w, b = data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    N = shape[0]
    w, b = {"weight": (w, None), "both": (w, b), "none": (None, None),
            "per-sample": (np.tile(w, (N, 1)), np.tile(b, (N, 1)))}[params]
    _, mean, rstd = cin.instance_norm_forward(x, w, b, activation=act)
    code = cin._validation.ACTIVATIONS[act]
    assert _cpu.fast_backward(dy, x, mean, rstd, w, True, 2, None, False, b, code,
                              0.2) is not None
    for use in (True, False):
        kw = {"activation": act, "negative_slope": 0.2, "use_input_stats": use}
        compare(cin.instance_norm_backward, lambda: ((dy, x, mean, rstd, w, b), dict(kw)),
                full_path)
        compare(cin.instance_norm_backward,
                lambda: ((dy, x, mean, rstd, w, b), dict(kw, out=np.empty_like(x))), full_path)


@pytest.mark.parametrize("case", ["residual", "slope-numpy", "bad-name", "bad-slope",
                                  "bias-without-weight", "bias-other-shape"])
def test_fused_declines_and_full_path_decides(rng, full_path, case):
    # what the fused fast path does not take runs (or raises) as the full path decides
    x, w, b = data(rng, (2, 3, 8, 8))
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    _, mean, rstd = cin.instance_norm_forward(x, w, b)
    kw = {"activation": "silu"}
    bw, bb = w, b
    if case == "residual":
        kw["residual"] = rng.standard_normal(x.shape).astype(x.dtype)
    elif case == "slope-numpy":
        kw.update(activation="leaky_relu", negative_slope=np.float64(0.3))
    elif case == "bad-name":
        kw["activation"] = "swish"
    elif case == "bad-slope":
        kw["negative_slope"] = float("nan")
    elif case == "bias-without-weight":
        bw = None
    else:
        bb = np.tile(b, (2, 1))
    compare(cin.instance_norm_forward, lambda: ((x, w, b), dict(kw)), full_path)
    kw.pop("residual", None)
    compare(cin.instance_norm_backward, lambda: ((dy, x, mean, rstd, bw, bb), dict(kw)),
            full_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place(rng, full_path, dtype):
    x, w, b = data(rng, (2, 3, 9, 10), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, mean, rstd = cin.instance_norm_forward(x, w, b)

    def fwd_make():
        xc = x.copy()
        return (xc, w, b), {"out": xc}
    assert _cpu.fast_forward(x.copy(), w, b, 1e-5, None, x.copy()) is not None
    compare(cin.instance_norm_forward, fwd_make, full_path)
    compare(lambda xc, out: cin.instance_norm(xc, out=out),
            lambda: (lambda xc: ((xc, xc), {}))(x.copy()), full_path)
    for which in (0, 1):  # out is dy, out is x
        def bwd_make(which=which):
            d, xc = dy.copy(), x.copy()
            return (d, xc, mean, rstd, w), {"out": (d, xc)[which]}
        compare(cin.instance_norm_backward, bwd_make, full_path)


def test_read_only_input_is_fast_and_untouched(rng, full_path):
    x, w, b = data(rng, (2, 3, 8, 8))
    x.flags.writeable = False
    assert _cpu.fast_forward(x, w, b, 1e-5, None, None) is not None
    compare(cin.instance_norm_forward, lambda: ((x, w, b), {}), full_path)


def test_fast_path_follows_thread_settings(rng):
    x, w, b = data(rng, (4, 8, 64, 64))
    before = cin.get_num_threads()
    try:
        cin.set_num_threads(1)
        _cpu.fast_forward(x, w, b, 1e-5, None, None)
        assert _cpu.threads_used_last_call() == 1
    finally:
        cin.set_num_threads(None)
    assert cin.get_num_threads() == before
    if _cpu.openmp_enabled():
        _cpu.fast_forward(x, w, b, 1e-5, 2, None)
        assert _cpu.threads_used_last_call() == 2


def test_small_inputs_run_without_a_thread_team(rng):
    x, w, b = data(rng, (1, 64, 16, 16))
    dy = np.ones_like(x)
    _, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=2)
    assert _cpu.threads_used_last_call() == 1
    cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=2)
    assert _cpu.threads_used_last_call() == 1


# ---- anything unusual: the fast path declines, the full path decides ----------------------------

class Sub(np.ndarray):
    pass


def forward_variants(rng):
    """name -> (args, kwargs) factories of instance_norm_forward calls the fast path declines."""
    x, w, b = data(rng, (2, 3, 6, 5))
    return {
        "non-contiguous": lambda: ((x[..., ::2], w, b), {}),
        "fortran": lambda: ((np.asfortranarray(x), w, b), {}),
        "channels-last": lambda: ((np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                                               -1, 1), w, b), {}),
        "negative strides": lambda: ((x[:, :, ::-1], w, b), {}),
        "misaligned": lambda: ((misaligned(x), w, b), {}),
        "float16": lambda: ((x.astype(np.float16), w, b), {}),
        "int": lambda: ((x.astype(np.int32), w, b), {}),
        "bool": lambda: ((x > 0, w, b), {}),
        "complex": lambda: ((x.astype(np.complex64), w, b), {}),
        "object": lambda: ((x.astype(object), w, b), {}),
        "byte-swapped": lambda: ((x.astype(">f4"), w, b), {}),
        "subclass": lambda: ((x.view(Sub), w, b), {}),
        "list": lambda: ((x.tolist(), w, b), {}),
        "2-D": lambda: ((x[0, 0], None, None), {}),
        "one spatial element": lambda: ((x[..., :1, :1], w, b), {}),
        "N = 0": lambda: ((x[:0], w, b), {}),
        "C = 0": lambda: ((x[:, :0], None, None), {}),
        "weight wrong length": lambda: ((x, w[:2], b), {}),
        "bias wrong length": lambda: ((x, w, np.ones(4, np.float32)), {}),
        "weight 2-D wrong": lambda: ((x, np.ones((3, 2), np.float32), b), {}),
        "weight int": lambda: ((x, np.array([1, 2, 3]), b), {}),
        "weight float16": lambda: ((x, w.astype(np.float16), b), {}),
        "weight complex": lambda: ((x, w.astype(np.complex64), b), {}),
        "weight non-contiguous": lambda: ((x, np.repeat(w, 2)[::2], b), {}),
        "weight list": lambda: ((x, w.tolist(), b), {}),
        "weight byte-swapped": lambda: ((x, w.astype(">f4"), b), {}),
        "eps negative": lambda: ((x, w, b, -1e-5), {}),
        "eps nan": lambda: ((x, w, b, float("nan")), {}),
        "eps inf": lambda: ((x, w, b, float("inf")), {}),
        "eps int": lambda: ((x, w, b, 0), {}),
        "eps bool": lambda: ((x, w, b, True), {}),
        "eps numpy": lambda: ((x, w, b, np.float32(1e-3)), {}),
        "eps string": lambda: ((x, w, b, "1e-5"), {}),
        "n_threads 0": lambda: ((x, w, b), {"n_threads": 0}),
        "n_threads -1": lambda: ((x, w, b), {"n_threads": -1}),
        "n_threads bool": lambda: ((x, w, b), {"n_threads": True}),
        "n_threads float": lambda: ((x, w, b), {"n_threads": 2.0}),
        "n_threads numpy": lambda: ((x, w, b), {"n_threads": np.int64(2)}),
        "n_threads huge": lambda: ((x, w, b), {"n_threads": 10 ** 30}),
        "out wrong shape": lambda: ((x, w, b), {"out": np.empty((2, 3, 5, 6), np.float32)}),
        "out wrong dtype": lambda: ((x, w, b), {"out": np.empty(x.shape)}),
        "out read-only": lambda: ((x, w, b), {"out": read_only_out(x)}),
        "out non-contiguous": lambda: ((x, w, b), {"out": np.empty((2, 3, 6, 10),
                                                                   np.float32)[..., ::2]}),
        "out fortran": lambda: ((x, w, b), {"out": np.asfortranarray(np.zeros_like(x))}),
        "out byte-swapped": lambda: ((x, w, b), {"out": np.zeros(x.shape, ">f4")}),
        "out list": lambda: ((x, w, b), {"out": [0.0]}),
        "out overlapping x": lambda: (lambda a, o: ((a, w, b), {"out": o}))(
            *overlapping(x)),
    }


def misaligned(a):
    """A copy of `a` at an address that is not a multiple of its item size."""
    m = np.empty(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


def overlapping(a):
    """A copy of `a` and an array of its shape one element further on in the same buffer."""
    buf = np.empty(a.size + 1, a.dtype)
    buf[:a.size] = a.ravel()
    return buf[:a.size].reshape(a.shape), buf[1:].reshape(a.shape)


def read_only_out(x):
    out = np.zeros_like(x)
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("name", sorted(forward_variants(np.random.default_rng(0))))
def test_forward_declines_and_full_path_decides(rng, full_path, name):
    make = forward_variants(rng)[name]
    args, kw = make()
    padded = list(args) + [None] * (4 - len(args))
    assert _cpu.fast_forward(*padded[:3], 1e-5 if len(args) < 4 else args[3],
                             kw.get("n_threads"), kw.get("out")) is None
    compare(cin.instance_norm_forward, make, full_path)


def instance_norm_variants(rng):
    x, w, b = data(rng, (2, 3, 6, 5))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    return {
        "buffers": lambda: ((x, rm.copy(), rv.copy(), w, b), {}),
        "buffers eval": lambda: ((x, rm.copy(), rv.copy(), w, b, False), {}),
        "one buffer": lambda: ((x, rm.copy(), None, w, b), {}),
        "no buffers eval": lambda: ((x, None, None, w, b, False), {}),
        "use_input_stats 1": lambda: ((x, None, None, w, b, 1), {}),
        "momentum nan": lambda: ((x,), {"momentum": float("nan")}),
        "momentum inf": lambda: ((x,), {"momentum": float("inf")}),
        "momentum bool": lambda: ((x,), {"momentum": True}),
        "momentum string": lambda: ((x,), {"momentum": "0.1"}),
        "momentum int": lambda: ((x,), {"momentum": 1}),
        "per-sample weight": lambda: ((x,), {"weight": np.ones((2, 3), np.float32)}),
        "eps negative": lambda: ((x,), {"eps": -1.0}),
        "float16": lambda: ((x.astype(np.float16),), {"weight": w}),
        "one spatial element": lambda: ((x[..., :1, :1],), {}),
        "weight wrong length": lambda: ((x,), {"weight": w[:1]}),
        "out wrong dtype": lambda: ((x,), {"out": np.empty(x.shape)}),
    }


@pytest.mark.parametrize("name", sorted(instance_norm_variants(np.random.default_rng(0))))
def test_instance_norm_declines_and_full_path_decides(rng, full_path, name):
    make = instance_norm_variants(rng)[name]
    compare(cin.instance_norm, make, full_path)


def backward_variants(rng):
    x, w, b = data(rng, (2, 3, 6, 5))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, rstd = cin.instance_norm_forward(x, w, b)
    return {
        "dy float64": lambda: ((dy.astype(np.float64), x, mean, rstd, w), {}),
        "dy wrong shape": lambda: ((dy[:1], x, mean, rstd, w), {}),
        "dy non-contiguous": lambda: ((np.asfortranarray(dy), x, mean, rstd, w), {}),
        "x non-contiguous": lambda: ((dy, np.asfortranarray(x), mean, rstd, w), {}),
        "dy list": lambda: ((dy.tolist(), x, mean, rstd, w), {}),
        "x float16": lambda: ((dy.astype(np.float16), x.astype(np.float16), mean, rstd,
                               w), {}),
        "x int": lambda: ((dy.astype(np.int64), x.astype(np.int64), mean, rstd, w), {}),
        "x 2-D": lambda: ((dy[0, 0], x[0, 0], mean, rstd, w), {}),
        "one spatial element": lambda: ((dy[..., :1, :1].copy(), x[..., :1, :1].copy(), mean,
                                         rstd, w), {}),
        "one spatial element fixed": lambda: ((dy[..., :1, :1].copy(), x[..., :1, :1].copy(),
                                               mean[0], rstd[0], w),
                                              {"use_input_stats": False}),
        "N = 0": lambda: ((dy[:0], x[:0], mean[:0], rstd[:0], w), {}),
        "mean wrong shape": lambda: ((dy, x, mean[:, :2], rstd, w), {}),
        "mean flat": lambda: ((dy, x, mean.ravel(), rstd, w), {}),
        "mean int": lambda: ((dy, x, mean.astype(np.int32), rstd, w), {}),
        "mean float16": lambda: ((dy, x, mean.astype(np.float16), rstd, w), {}),
        "mean list": lambda: ((dy, x, mean.tolist(), rstd, w), {}),
        "rstd non-contiguous": lambda: ((dy, x, mean, np.asfortranarray(rstd), w), {}),
        "weight wrong length": lambda: ((dy, x, mean, rstd, w[:2]), {}),
        "weight float16": lambda: ((dy, x, mean, rstd, w.astype(np.float16)), {}),
        "weight list": lambda: ((dy, x, mean, rstd, w.tolist()), {}),
        "use_input_stats string": lambda: ((dy, x, mean, rstd, w), {"use_input_stats": "no"}),
        "use_input_stats numpy": lambda: ((dy, x, mean, rstd, w),
                                          {"use_input_stats": np.bool_(True)}),
        "n_threads 0": lambda: ((dy, x, mean, rstd, w), {"n_threads": 0}),
        "n_threads -1": lambda: ((dy, x, mean, rstd, w), {"n_threads": -1}),
        "out wrong shape": lambda: ((dy, x, mean, rstd, w), {"out": np.empty((1, 3, 6, 5),
                                                                            np.float32)}),
        "out wrong dtype": lambda: ((dy, x, mean, rstd, w), {"out": np.empty(x.shape)}),
        "out read-only": lambda: ((dy, x, mean, rstd, w), {"out": read_only_out(x)}),
        "out overlapping dy": lambda: (lambda d, o: ((d, x, mean, rstd, w), {"out": o}))(
            *overlapping(dy)),
        "out overlapping x": lambda: (lambda a, o: ((dy, a, mean, rstd, w), {"out": o}))(
            *overlapping(x)),
    }


@pytest.mark.parametrize("name", sorted(backward_variants(np.random.default_rng(0))))
def test_backward_declines_and_full_path_decides(rng, full_path, name):
    make = backward_variants(rng)[name]
    args, kw = make()
    if name not in ("one spatial element fixed",):
        assert _cpu.fast_backward(*args, kw.get("use_input_stats", True), kw.get("n_threads"),
                                  kw.get("out")) is None
    compare(cin.instance_norm_backward, make, full_path)


def test_channel_sums_add_in_order():
    s = np.array([1e16, 1.0, -1e16, 1.0, 3.0, 5.0])  # (N, C) = (3, 2)
    got = _cpu.channel_sums(s, 3, 2, np.float64)
    assert got.tolist() == [(1e16 + -1e16) + 3.0, (1.0 + 1.0) + 5.0]
    assert _cpu.channel_sums(s, 3, 2, np.float32).dtype == np.float32
    with pytest.raises(ValueError):
        _cpu.channel_sums(s, 2, 2, np.float64)


@pytest.mark.parametrize("N, C", [(1, 1), (5, 3), (64, 256), (7, 257), (3, 600)])
def test_channel_sums_bitwise_in_order_of_n(N, C):
    # summed a block of channels at a time, row by row: every channel's adds in order of n,
    # the bits of a plain loop over n (values over 20 decades, so any reordering shows)
    rng = np.random.default_rng(N * 1000 + C)
    s = rng.standard_normal(N * C) * 10.0 ** rng.uniform(-10, 10, N * C)
    want = []
    for c in range(C):
        acc = float(s[c])
        for n in range(1, N):
            acc = acc + float(s[n * C + c])
        want.append(acc)
    got = _cpu.channel_sums(s, N, C, np.float64)
    assert got.tolist() == want
    assert np.array_equal(_cpu.channel_sums(s, N, C, np.float32),
                          np.array(want).astype(np.float32))


@pytest.mark.parametrize("N, C", [(1, 5), (3, 63), (5, 64), (4, 65), (3, 200), (2, 129)])
@pytest.mark.parametrize("L", [9, 64, 1500])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_backward_converts_and_reduces_in_its_threads(rng, N, C, L, n_threads):
    # float32 (N, C) statistics and (N, C) weights are converted to float64 by the kernels'
    # threads, each for its own batches of planes, and the per-channel dweight and dbias are
    # summed over n in the parallel region, a block of channels per thread: the same bits as
    # float64 parameters given converted, and as in-order sums of the per-plane sums, at any
    # thread count and batch boundary (N * C planes not a multiple of the batch; L = 1500: the
    # whole-plane path, which converts up front)
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    _, mean, rstd = cin.instance_norm_forward(x, w)
    m64, r64 = mean.astype(np.float64), rstd.astype(np.float64)
    dx, dw, db = _cpu.fast_backward(dy, x, mean, rstd, w, True, n_threads, None)
    dx64, dw64, db64 = _cpu.fast_backward(dy, x, m64, r64, w.astype(np.float64), True, 1, None)
    assert_identical((dx, dw, db), (dx64, dw64, db64))
    _, sums = _cpu.fast_backward(dy, x, mean.ravel(), rstd.ravel(), np.tile(w, N), True,
                                 n_threads, None, True)
    for got, s in ((db, sums[0]), (dw, sums[1])):
        want = s.reshape(N, C)[0].copy()
        for n in range(1, N):
            want = want + s.reshape(N, C)[n]
        assert np.array_equal(got, want.astype(np.float32))
    wn = np.tile(w, (N, 1)) * np.float32(1.5)  # per sample: (N, C) float32, deferred too
    got = _cpu.fast_backward(dy, x, mean, rstd, wn, True, n_threads, None)
    want = _cpu.fast_backward(dy, x, m64, r64, wn.astype(np.float64), True, 1, None)
    assert_identical(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_sums_accumulate_in_float64(dtype):
    s = np.array([0.1, 0.2, 0.3, 0.4])  # (N, C) = (2, 2)
    acc = np.array([1e8, -3.0], dtype)
    got = _cpu.channel_sums(s, 2, 2, dtype, acc)
    want = (acc.astype(np.float64) + np.array([0.1 + 0.3, 0.2 + 0.4])).astype(dtype)
    assert got.dtype == dtype and np.array_equal(got, want)
    # anything but a dense (C,) float array: NumPy's addition, the same result
    assert np.array_equal(_cpu.channel_sums(s, 2, 2, dtype, acc.tolist()), want)


def test_module_gradients_accumulate(rng):
    x, w, b = data(rng, (3, 4, 5, 6))
    m = cin.InstanceNorm2d(4, affine=True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    m(x)
    m.backward(dy)
    first = m.weight_grad.copy(), m.bias_grad.copy()
    m.backward(dy)
    _, mean, rstd = cin.instance_norm_forward(x, m.weight, m.bias)
    _, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, m.weight)
    # the module backs up from its float64 statistics, the functional call from the float32
    # mean and rstd it returned: equal to float32 rounding (bitwise only by luck, e.g. at -O3)
    np.testing.assert_allclose(first[0], dw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(first[1], db, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.weight_grad, 2 * first[0], rtol=1e-6)
    np.testing.assert_allclose(m.bias_grad, 2 * first[1], rtol=1e-6, atol=1e-6)
    assert m.weight_grad.dtype == m.bias_grad.dtype == np.float32
