"""``python -m cinstnorm bench``'s channels-last table: the option, the layout helpers, the
interleaved timing, the sanity checks, the table and one tiny end-to-end run (no torch: its
import takes seconds; a stand-in checks the torch column's wiring).
"""
import contextlib
import json
import math
import types

import numpy as np
import pytest

import cinstnorm as cin
from cinstnorm import _bench
from cinstnorm._config import l2_cache_bytes, last_level_cache_bytes

TINY = {"unit1d": (2, 3, 16), "unit": (2, 3, 8, 8), "unit3d": (2, 3, 4, 4, 4)}


@pytest.fixture
def tiny_shapes(monkeypatch):
    """Tiny 1d, 2d and 3d shapes that --shapes accepts, and no torch."""
    for name, shape in TINY.items():
        monkeypatch.setitem(_bench.SHAPES, name, shape)
    monkeypatch.setattr(_bench, "_import_torch", lambda: None)
    return list(TINY)


# ---- command line -------------------------------------------------------------------------

def test_channels_last_is_on_by_default_and_can_be_skipped():
    assert _bench._parse_args([]).channels_last is True
    assert _bench._parse_args(["--no-channels-last"]).channels_last is False


# ---- layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(TINY.values()))
def test_channels_last_helper_keeps_values_and_moves_channels_last(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    x_cl = _bench.channels_last(x)
    assert x_cl.shape == x.shape and np.array_equal(x_cl, x)
    assert _bench.is_channels_last(x_cl) and not x_cl.flags.c_contiguous
    assert not _bench.is_channels_last(x)
    assert _bench.is_channels_last(np.empty_like(x_cl))  # out= arrays keep the layout


def test_one_channel_is_the_same_memory():
    x = np.zeros((2, 1, 4, 4))
    assert _bench.is_channels_last(_bench.channels_last(x)) and x.flags.c_contiguous


# ---- timing -------------------------------------------------------------------------------

def test_measure_interleaved_alternates_and_takes_the_best(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(_bench, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(_bench, "MIN_SAMPLE_SECONDS", 0.0)  # one call per sample
    calls = []
    cost = {"a": iter([9.0, 1.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 4.0, 6.0, 5.0])}

    def timed(name):
        def fn():
            calls.append(name)
            clock.now += next(cost[name])
        return fn

    t = _bench.measure_interleaved({"a": timed("a"), "b": timed("b")}, repeat=3)
    # a warm-up and a sizing call each, then a b / b a / a b
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    assert t["a"] == _bench.Timing(1.0, 2.0) and t["b"] == _bench.Timing(4.0, 5.0)
    with pytest.raises(ValueError):
        _bench.measure_interleaved({"a": lambda: None}, repeat=0)


def test_samples_are_sized_by_the_call_after_the_warm_up(monkeypatch):
    """A first call that pays one-off costs (page faults of a fresh output) does not shrink the
    samples to one call each: the second call sizes them."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(_bench, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    cost = iter([2.0 ** -7] + [2.0 ** -11] * 100)  # exact in binary
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(cost)

    assert _bench.calls_per_sample(fn, 2.0 ** -9) == 4 and len(calls) == 2
    monkeypatch.setattr(_bench, "MIN_SAMPLE_SECONDS", 2.0 ** -9)
    t = _bench.measure(fn, repeat=3)
    assert len(calls) == 2 + 2 + 3 * 4 and t == _bench.Timing(2.0 ** -11, 2.0 ** -11)


def test_ratios():
    best = {"cin_forward_out": 2.0, "cin_forward_out_cl": 3.0, "cin_forward_cl": 4.0,
            "cin_backward_out": 4.0, "cin_backward_out_cl": 5.0}
    assert _bench.channels_last_ratios(best) == {
        "forward:cl/nchw": 1.5, "backward:cl/nchw": 1.25, "forward:torch_cl/cin_cl": None}
    best["torch_forward_cl"] = 10.0
    assert _bench.channels_last_ratios(best)["forward:torch_cl/cin_cl"] == 2.5


# ---- sanity checks ------------------------------------------------------------------------

def _check(shape, cin_module=cin, dtype="float64"):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape, dtype=dtype), rng.standard_normal(shape, dtype=dtype)
    w, b = np.full(shape[1], 1.5, dtype), np.full(shape[1], 0.5, dtype)
    x_cl, dy_cl = _bench.channels_last(x), _bench.channels_last(dy)
    outs = tuple(np.empty_like(a) for a in (x, x))
    outs_cl = tuple(np.empty_like(a) for a in (x_cl, x_cl))
    return _bench._channels_last_check(cin_module, (x, dy), (x_cl, dy_cl), outs, outs_cl, w, b, 1)


def test_check_of_a_channels_last_case():
    sanity = _check((2, 3, 5, 6))
    assert sanity["layout"] == "cl"
    assert set(sanity["max_abs_diff"]) == {"y", "dx", "stats"}
    assert max(sanity["max_abs_diff"].values()) < 1e-12
    assert _check((2, 1, 5, 6))["layout"] == "cl=nchw"


def test_check_flags_outputs_that_are_not_channels_last():
    def forward(x, *args, out=None, **kwargs):
        y, mean, rstd = cin.instance_norm_forward(x, *args, out=out, **kwargs)
        return (y if out is not None else np.ascontiguousarray(y)), mean, rstd

    fake = types.SimpleNamespace(instance_norm_forward=forward,
                                 instance_norm_backward=cin.instance_norm_backward)
    assert _check((2, 3, 5, 6), fake)["layout"] == "wrong: y"


def _case(shape, dtype, ms, ratios, diff=1e-7, layout="cl"):
    keys = [k for _, k in _bench.CL_TIME_COLUMNS]
    times = {k: {"best": v / 1e3, "median": v / 1e3} for k, v in zip(keys, ms) if v is not None}
    return {"shape": shape, "dtype": dtype, "times": times, "ratios": ratios, "layout": layout,
            "max_abs_diff": {"y": diff, "dx": diff / 2, "stats": 0.0}}


def test_warnings(capsys):
    ok = _case("a", "float32", [1] * 6, {})
    wrong = _case("b", "float32", [1] * 6, {}, layout="wrong: y")
    off = _case("c", "float64", [1] * 6, {}, diff=1e-6)
    nan = _case("d", "float32", [1] * 6, {}, diff=float("nan"))
    _bench.warn_channels_last([ok, wrong, off, nan])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "channels-last b float32" in err[0] and "not channels-last" in err[0]
    assert "channels-last c float64" in err[1] and "1e-06" in err[1]
    assert "channels-last d float32" in err[2]


# ---- the table ----------------------------------------------------------------------------

def test_table_format_and_geomean():
    cases = [
        _case("style", "float32", [1.0, 1.2, 2.0, 2.4, 1.5, 6.0],
              {"forward:cl/nchw": 1.2, "backward:cl/nchw": 1.2,
               "forward:torch_cl/cin_cl": 4.0}),
        _case("one-plane", "float64", [3.0, 3.0, 4.0, 4.4, 5.0, None],
              {"forward:cl/nchw": 1.0, "backward:cl/nchw": 1.1,
               "forward:torch_cl/cin_cl": None}, diff=0.0, layout="cl=nchw"),
    ]
    geomean = _bench.geometric_means(cases)
    assert geomean["forward:cl/nchw"] == pytest.approx(math.sqrt(1.2))
    assert geomean["forward:torch_cl/cin_cl"] == pytest.approx(4.0)  # the None row left out
    text = _bench.format_channels_last_table(cases, geomean)
    lines = text.rstrip("\n").splitlines()
    assert lines[0] == "channels-last"
    for head in ("fwd ms", "fwd cl ms", "bwd ms", "bwd cl ms", "cl alloc ms", "torch cl ms",
                 "fwd cl/nchw", "bwd cl/nchw", "torch cl/cin cl", "max|cl-nchw|", "layout"):
        assert head in lines[1]
    assert len({len(line) for line in lines[1:-1]}) == 1  # columns line up
    assert lines[2].split() == ["style", "float32", "1.000", "1.200", "2.000", "2.400", "1.500",
                                "6.000", "1.20", "1.20", "4.00", "1.0e-07", "cl"]
    assert lines[3].split() == ["one-plane", "float64", "3.000", "3.000", "4.000", "4.400",
                                "5.000", "-", "1.00", "1.10", "-", "0.0e+00", "cl=nchw"]
    assert lines[-1].split() == ["geomean", f"{math.sqrt(1.2):.2f}",
                                 f"{math.sqrt(1.2 * 1.1):.2f}", "4.00"]
    col = lines[1].index("torch cl/cin cl") + len("torch cl/cin cl")
    assert lines[-1][:col].rstrip().endswith("4.00")  # under its column


def test_table_of_no_cases():
    lines = _bench.format_channels_last_table([], {}).splitlines()
    assert lines[0] == "channels-last" and lines[-1].split() == ["geomean", "-", "-", "-"]


# ---- runs ---------------------------------------------------------------------------------

def test_end_to_end_json(tiny_shapes, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert _bench.main(["--shapes", ",".join(tiny_shapes), "--dtype", "float32", "--repeat",
                        "1", "--no-progress", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    table = out[out.index("\nchannels-last\n"):].splitlines()
    assert [line.split()[0] for line in table[3:6]] == tiny_shapes
    result = json.loads(path.read_text())
    cases = result["channels_last_cases"]
    assert [(c["shape"], c["dims"], c["dtype"]) for c in cases] == [
        (name, list(shape), "float32") for name, shape in TINY.items()]
    for c in cases:
        assert set(c["times"]) == set(_bench.CL_FORWARD_KEYS + _bench.CL_BACKWARD_KEYS)
        for key in ("forward:cl/nchw", "backward:cl/nchw"):
            assert math.isfinite(c["ratios"][key]) and c["ratios"][key] > 0
        assert c["ratios"]["forward:torch_cl/cin_cl"] is None  # no torch
        assert c["layout"] == "cl"
        assert max(c["max_abs_diff"].values()) < 1e-5
    geomean = result["channels_last_geomean"]
    assert set(geomean) == set(cases[0]["ratios"])
    assert math.isfinite(geomean["forward:cl/nchw"]) and geomean["forward:cl/nchw"] > 0
    # the machine facts that make results of different machines comparable
    env = result["environment"]
    assert env["simd_path"] == cin._cpu.simd_path()
    assert env["llc_bytes"] == last_level_cache_bytes() > 0
    assert env["l2_bytes"] == l2_cache_bytes() > 0
    assert env["processor"] == _bench.cpu_model()
    assert f"SIMD path {env['simd_path']}" in out.splitlines()[1]


def test_cpu_model_reads_the_model_name(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\n")
    assert _bench.cpu_model(str(cpuinfo)) == "Example CPU @ 2.0GHz"
    monkeypatch.setattr(_bench.platform, "processor", lambda: "")
    assert _bench.cpu_model(str(tmp_path / "missing")) is None


def test_no_channels_last_skips_the_table(tiny_shapes, capsys, tmp_path):
    path = tmp_path / "bench.json"
    assert _bench.main(["--shapes", "unit", "--dtype", "float32", "--repeat", "1",
                        "--no-progress", "--no-channels-last", "--json", str(path)]) == 0
    assert "channels-last" not in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert "channels_last_cases" not in result and "channels_last_geomean" not in result
    assert len(result["cases"]) == 1


def fake_torch(seen):
    """The part of torch the channels-last forward uses, on NumPy arrays; records inputs."""
    def instance_norm(x, weight, bias, eps):
        seen.append((x, no_grad.active))
        return cin.instance_norm(x, weight=weight, bias=bias, eps=eps)

    class no_grad(contextlib.ContextDecorator):
        active = False

        def __enter__(self):
            no_grad.active = True

        def __exit__(self, *exc):
            no_grad.active = False

    functional = types.SimpleNamespace(instance_norm=instance_norm)
    return types.SimpleNamespace(from_numpy=lambda a: a, no_grad=no_grad,
                                 nn=types.SimpleNamespace(functional=functional))


def test_torch_column_runs_on_the_channels_last_input(tiny_shapes):
    seen = []
    progress = _bench.Progress(0, enabled=False)
    cases = _bench.run_channels_last_benchmarks(["unit"], ["float64"], 1, 1, progress,
                                                fake_torch(seen))
    assert progress.done == _bench.CL_STEPS_PER_CASE
    assert seen and all(_bench.is_channels_last(x) and not x.flags.c_contiguous and grad_off
                        for x, grad_off in seen)
    (case,) = cases
    assert "torch_forward_cl" in case["times"]
    ratio = case["ratios"]["forward:torch_cl/cin_cl"]
    assert math.isfinite(ratio) and ratio > 0


def test_main_tables_time_each_case_side_by_side(tiny_shapes, monkeypatch):
    """The forward/backward tables time all of a case's calls together, in rounds of one
    sample each (the VM's speed drifts over seconds: ratios of calls timed one after another
    took the drift with them), with samples of SIDE_BY_SIDE_SAMPLE_SECONDS."""
    groups = []
    real = _bench.measure_interleaved

    def spy(fns, repeat=7, min_seconds=None):
        groups.append((tuple(fns), min_seconds))
        return real(fns, repeat, 0.0)

    monkeypatch.setattr(_bench, "measure_interleaved", spy)
    monkeypatch.setattr(_bench, "measure", None)  # not timed one function at a time
    progress = _bench.Progress(0, enabled=False)
    (case,) = _bench.run_benchmarks(["unit"], ["float64"], 1, 1, progress)
    ((keys, seconds),) = groups
    assert seconds == _bench.SIDE_BY_SIDE_SAMPLE_SECONDS
    assert set(keys) == set(case["times"]) and "cin_forward" in keys and "copyto" in keys


def test_each_ratio_is_timed_as_a_pair(tiny_shapes, monkeypatch):
    """Every ratio's two functions are timed together and alone (a third function between
    them biased the ratio), and every function is timed once."""
    groups = []
    real = _bench.measure_interleaved

    def spy(fns, repeat=7):
        groups.append(tuple(fns))
        return real(fns, repeat)

    monkeypatch.setattr(_bench, "measure_interleaved", spy)
    progress = _bench.Progress(0, enabled=False)
    _bench.run_channels_last_benchmarks(["unit"], ["float64"], 1, 1, progress,
                                        fake_torch([]))
    pairs = [("cin_forward_out_cl", "cin_forward_out"),
             ("cin_backward_out_cl", "cin_backward_out"),
             ("torch_forward_cl", "cin_forward_cl")]
    for a, b in pairs:
        (group,) = [g for g in groups if a in g]
        assert set(group) == {a, b}
    timed = [k for g in groups for k in g]
    assert sorted(timed) == sorted(set(_bench.CL_FORWARD_KEYS + _bench.CL_TORCH_KEYS
                                       + _bench.CL_BACKWARD_KEYS))
