"""``python -m cinstnorm bench --device``: option parsing, the no-GPU paths, the GPU table, and
the GPU timing code driven by a stand-in for CuPy on NumPy arrays (no device needed).

Nothing here needs CuPy or a GPU; the stand-in checks the wiring (which functions are timed, the
case records, JSON), not device timings.
"""
import json
import math
import sys
import types

import numpy as np
import pytest

import cinstnorm
from cinstnorm import _bench, _bench_gpu, _gpu

UNIT_SHAPE = (2, 3, 8, 8)  # small enough that every measurement takes microseconds


@pytest.fixture
def unit_shape(monkeypatch):
    """A tiny shape named "unit" that --shapes accepts, and no torch (its import is slow)."""
    monkeypatch.setitem(_bench.SHAPES, "unit", UNIT_SHAPE)
    monkeypatch.setattr(_bench, "_import_torch", lambda: None)
    return "unit"


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy cannot be imported, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)


class _Clock:
    """Simulated device time, advanced by the timed functions."""

    def __init__(self):
        self.now = 0.0


def fake_cupy(clock=None):
    """A stand-in for the part of CuPy that _bench_gpu uses, on NumPy arrays.  Events read
    ``clock`` when given, else ``time.perf_counter``."""
    import time

    read = (lambda: clock.now) if clock is not None else time.perf_counter

    class Event:
        def record(self):
            self.t = read()

        def synchronize(self):
            pass

    def elementwise_kernel(in_params, out_params, operation, name):
        assert operation == "y = a * x + b"

        def kernel(x, a, b, out):
            np.multiply(x, a, out=out)
            out += b
            return out

        return kernel

    cuda = types.SimpleNamespace(
        Event=Event,
        get_elapsed_time=lambda start, stop: (stop.t - start.t) * 1e3,
        Device=lambda: types.SimpleNamespace(id=0),
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU"}),
    )
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    return types.SimpleNamespace(
        cuda=cuda, ndarray=np.ndarray, asarray=np.asarray, asnumpy=np.asarray,
        empty_like=np.empty_like, ElementwiseKernel=elementwise_kernel,
        get_default_memory_pool=lambda: pool,
    )


# ---- command line -------------------------------------------------------------------------

def test_device_option_parses():
    assert _bench._parse_args([]).device == "cpu"
    for device in ("cpu", "cuda", "all"):
        assert _bench._parse_args(["--device", device]).device == device


def test_device_option_rejects_unknown(capsys):
    with pytest.raises(SystemExit) as info:
        _bench._parse_args(["--device", "gpu"])
    assert info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_cuda_without_cupy_exits_2(no_cupy, unit_shape, capsys):
    status = _bench.main(["--device", "cuda", "--shapes", unit_shape, "--repeat", "1",
                          "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""  # no CPU table either
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "no usable GPU" in lines[0] and _gpu.gpu_status() in lines[0]
    assert "CuPy is not installed" in lines[0]


def test_cuda_without_cupy_exit_status_from_module_entry(no_cupy, capsys):
    from cinstnorm.__main__ import main

    assert main(["bench", "--device", "cuda"]) == 2
    assert "no usable GPU" in capsys.readouterr().err


def test_all_without_cupy_skips_gpu_and_runs_cpu(no_cupy, unit_shape, capsys, tmp_path):
    path = tmp_path / "bench.json"
    status = _bench.main(["--device", "all", "--shapes", unit_shape, "--dtype", "float32",
                          "--repeat", "1", "--no-progress", "--json", str(path)])
    out, _ = capsys.readouterr()
    assert status == 0
    assert "forward+backward" in out and "unit" in out  # the CPU tables ran
    skip = [line for line in out.splitlines() if line.startswith("GPU rows skipped: ")]
    assert len(skip) == 1 and _gpu.gpu_status() in skip[0]
    assert "GPU (" not in out
    result = json.loads(path.read_text())
    assert len(result["cases"]) == 1
    assert result["gpu_cases"] == []
    assert result["environment"]["gpu"] == _gpu.gpu_status()


def test_cpu_device_never_imports_the_gpu_bench(unit_shape, monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "cinstnorm._bench_gpu", raising=False)
    monkeypatch.delattr(cinstnorm, "_bench_gpu", raising=False)
    path = tmp_path / "bench.json"
    assert _bench.main(["--shapes", unit_shape, "--dtype", "float32", "--repeat", "1",
                        "--no-progress", "--json", str(path)]) == 0
    assert "cinstnorm._bench_gpu" not in sys.modules
    out = capsys.readouterr().out
    assert "GPU" not in out
    result = json.loads(path.read_text())
    assert "gpu_cases" not in result and "gpu" not in result["environment"]


# ---- timing and the case records, on the stand-in ------------------------------------------

def test_device_measure_means_over_calls_and_takes_the_best():
    clock = _Clock()
    calls = []

    def fn():  # 0.5 ms of simulated device time per call
        calls.append(1)
        clock.now += 0.5e-3

    t = _bench_gpu.device_measure(fake_cupy(clock), fn, repeat=3, min_sample_seconds=2e-3)
    assert t.best == pytest.approx(0.5e-3) and t.median == pytest.approx(0.5e-3)
    assert len(calls) == 1 + 1 + 3 * 4  # warm-up, sizing call, 3 samples of 2 ms / 0.5 ms
    with pytest.raises(ValueError):
        _bench_gpu.device_measure(fake_cupy(clock), fn, repeat=0)


def test_device_measure_bounds_the_calls_per_sample():
    clock = _Clock()
    calls = []

    def slow():  # longer than a sample: still MIN_CALLS per sample
        calls.append(1)
        clock.now += 1.0

    _bench_gpu.device_measure(fake_cupy(clock), slow, repeat=2)
    assert len(calls) == 2 + 2 * _bench_gpu.MIN_CALLS


def test_cuda_run_on_a_stand_in(unit_shape, monkeypatch, capsys, tmp_path):
    """--device cuda end to end with the stand-in: cinstnorm runs its CPU path on the NumPy
    arrays, so this checks the wiring, the records and the JSON, not a device."""
    fake = fake_cupy()
    monkeypatch.setattr(_bench_gpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_gpu, "require_cupy", lambda: fake)
    monkeypatch.setattr(_gpu, "gpu_status", lambda: "cupy 0.0, device Fake GPU (sm_00)")
    path = tmp_path / "bench.json"
    status = _bench.main(["--device", "cuda", "--shapes", unit_shape, "--repeat", "2",
                          "--no-progress", "--json", str(path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "GPU (Fake GPU)" in out
    assert "cin/copy" not in out  # CPU tables skipped
    assert "warning" not in err
    result = json.loads(path.read_text())
    assert result["cases"] == []
    assert result["environment"]["gpu"] == "cupy 0.0, device Fake GPU (sm_00)"
    cases = result["gpu_cases"]
    assert [(c["shape"], c["dtype"]) for c in cases] == [("unit", "float32"),
                                                          ("unit", "float64")]
    for c in cases:
        assert set(c["times"]) == set(_bench_gpu.CIN_KEYS)  # no torch: no torch rows
        assert c["ratios"]["forward:torch/cin"] is None
        ratio = c["times"]["floor"]["best"] / c["times"]["cin_forward"]["best"]
        assert c["ratios"]["forward:floor/cin"] == pytest.approx(ratio)
        nbytes = math.prod(UNIT_SHAPE) * np.dtype(c["dtype"]).itemsize
        assert c["nbytes"] == nbytes
        assert c["forward_gb_per_s"] == pytest.approx(
            2 * nbytes / c["times"]["cin_forward"]["best"] / 1e9)
        assert c["max_abs_err"]["y"] < 1e-5 and c["max_abs_err"]["dx"] < 1e-4
        assert c["forward_launches"] is None  # no device to ask for its SM count
    assert set(result["gpu_geomean"]) == set(cases[0]["ratios"])


def test_forward_launches_follows_the_plan(monkeypatch):
    monkeypatch.setattr(_gpu, "_sm_count", lambda device_id: 132)

    class Array:  # what forward_launches reads of a CuPy array
        def __init__(self, shape, itemsize):
            self.shape, self.itemsize = shape, itemsize
            self.size = math.prod(shape)
            self.device = types.SimpleNamespace(id=0)

    for shape in [(64, 256, 8, 8), (1, 1, 2048, 2048), (1, 3, 1024, 1024)]:
        x = Array(shape, 4)
        P = shape[0] * shape[1]
        plan = _gpu.choose_plan("forward", P, x.size // P, 4, 0, 132)
        assert _bench_gpu.forward_launches(x) == plan.launches("forward")
    assert _bench_gpu.forward_launches(object()) is None


# ---- the table ----------------------------------------------------------------------------

def _case(shape, dtype, ms, ratios, gbs, launches, y_err):
    keys = [k for _, k in _bench_gpu.TIME_COLUMNS]
    times = {k: {"best": v / 1e3, "median": v / 1e3} for k, v in zip(keys, ms) if v is not None}
    return {"shape": shape, "dtype": dtype, "times": times, "ratios": ratios,
            "forward_gb_per_s": gbs, "forward_launches": launches,
            "max_abs_err": {"y": y_err, "dx": y_err}}


def test_gpu_table_format_and_geomean():
    cases = [
        _case("few-big", "float32", [0.02, 0.03, 0.05, 0.016, 0.08, 0.2],
              {"forward:floor/cin": 0.8, "backward:floor/cin": 0.8, "forward:torch/cin": 4.0,
               "forward_backward:torch/cin": 4.0}, 629.1, 2, 2.4e-7),
        _case("one-plane", "float64", [0.1, 0.2, 0.3, 0.05, None, None],
              {"forward:floor/cin": 0.5, "backward:floor/cin": 0.375,
               "forward:torch/cin": None, "forward_backward:torch/cin": None}, 671.0, None,
              1e-15),
        _case("tiny", "float32", [0.01, 0.02, 0.03, 0.008, 0.01, 0.04],
              {"forward:floor/cin": 0.8, "backward:floor/cin": 0.6, "forward:torch/cin": 1.0,
               "forward_backward:torch/cin": 1.0}, 838.9, 1, 3e-7),
    ]
    geomean = _bench.geometric_means(cases)
    assert geomean["forward:floor/cin"] == pytest.approx((0.8 * 0.5 * 0.8) ** (1 / 3))
    assert geomean["forward:torch/cin"] == pytest.approx(2.0)  # the None row is left out
    text = _bench_gpu.format_gpu_table(cases, geomean, "NVIDIA H100 80GB HBM3")
    lines = text.rstrip("\n").splitlines()
    assert lines[0] == "GPU (NVIDIA H100 80GB HBM3)"
    header = lines[1].split()
    assert header[:2] == ["shape", "dtype"]
    for head in ("fwd floor/cin", "fwd torch/cin", "f+b torch/cin", "fwd GB/s", "launches",
                 "y err", "cin fwd", "floor", "torch f+b"):
        assert head in lines[1]
    assert len({len(line) for line in lines[1:-1]}) == 1  # columns line up
    few_big = lines[2].split()
    assert few_big[:2] == ["few-big", "float32"]
    assert few_big[2:] == ["0.020", "0.030", "0.050", "0.016", "0.080", "0.200",
                           "0.80", "4.00", "4.00", "629", "2", "2.4e-07"]
    one_plane = lines[3].split()
    assert one_plane[2:] == ["0.100", "0.200", "0.300", "0.050", "-", "-",
                             "0.50", "-", "-", "671", "-", "1.0e-15"]
    assert lines[-1].split() == ["geomean", f"{geomean['forward:floor/cin']:.2f}", "2.00",
                                 "2.00"]
    # the geomean's ratios sit under their columns
    col = lines[1].index("fwd torch/cin") + len("fwd torch/cin")
    assert lines[-1][:col].rstrip().endswith("2.00")
    assert lines[2][:col].rstrip().endswith("4.00")


def test_gpu_table_of_no_cases():
    text = _bench_gpu.format_gpu_table([], {}, "Fake GPU")
    assert text.splitlines()[0] == "GPU (Fake GPU)"
    assert text.splitlines()[-1].split() == ["geomean", "-", "-", "-"]


def test_warn_errors_flags_wrong_results(capsys):
    ok = _case("a", "float32", [1] * 6, {}, 1.0, 1, 1e-6)
    bad = _case("b", "float64", [1] * 6, {}, 1.0, 1, 1e-6)
    _bench_gpu.warn_errors([ok, bad])
    err = capsys.readouterr().err
    assert "gpu b float64" in err and "gpu a" not in err


def test_legend_names_the_torch_that_ran():
    torch = types.SimpleNamespace(__version__="9.9")
    assert "torch 9.9 on CUDA" in _bench_gpu.legend(torch, torch)
    assert "no CUDA device" in _bench_gpu.legend(None, torch)
    assert "torch not installed" in _bench_gpu.legend(None, None)
    assert "fwd floor/cin" in _bench_gpu.legend(None, None)
