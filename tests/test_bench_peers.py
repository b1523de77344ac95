"""``python -m cinstnorm bench``'s peers (onnxruntime, OpenVINO, numba) and its small-call
latency table: the ONNX model, each installed peer's output against the NumPy reference, the
skip lines, the n/a cells, the tables and the JSON keys. No assertion is on a timing.

End-to-end runs use stand-in peers (NumPy behind the peers' interface) so that they test the
wiring whatever is installed; the real peers are checked on their own (importorskip).
"""
import gc
import json
import sys
import weakref

import numpy as np
import pytest

from cinstnorm import _bench, _peers
from helpers import load_tool, make_affine, make_x
from reference import forward as reference_forward

SKIP_HINT = 'pip install "cinstnorm[peers]"'


def _inputs(rng, dtype, shape=(2, 3, 5, 7)):
    x = make_x(rng, shape, dtype)
    weight, bias = make_affine(rng, shape[1], dtype)
    return x, weight, bias


# ---- the ONNX model and the real peers ----------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_is_one_valid_instance_norm_node(dtype):
    onnx = pytest.importorskip("onnx")
    model = _peers.instance_norm_model((2, 3, 5, 7), dtype, eps=1e-3)
    onnx.checker.check_model(model, full_check=True)  # shapes and types inferred too
    (node,) = model.graph.node
    assert node.op_type == "InstanceNormalization"
    assert list(node.input) == ["x", "scale", "B"] and list(node.output) == ["y"]
    assert onnx.helper.get_attribute_value(node.attribute[0]) == pytest.approx(1e-3)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims == {"x": [2, 3, 5, 7], "scale": [3], "B": [3], "y": [2, 3, 5, 7]}
    assert all(v.type.tensor_type.elem_type == elem for v in model.graph.input)


def _check_peer(peer, x, weight, bias, tol):
    peer.run()
    expected, _, _ = reference_forward(x, weight, bias)
    assert peer.out.shape == x.shape and peer.out.dtype == x.dtype
    np.testing.assert_allclose(peer.out.astype(np.float64), expected, rtol=0, atol=tol)
    x_before = x.copy()
    peer.run()  # runs again on the same arrays, and reads them without writing
    np.testing.assert_array_equal(x, x_before)


def test_onnxruntime_matches_the_reference(rng):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    x, weight, bias = _inputs(rng, "float32")
    peer = _peers.onnxruntime_forward(x, weight, bias, threads=1)
    assert peer.compute_dtype == "float32"
    _check_peer(peer, x, weight, bias, 1e-5)


def test_onnxruntime_float64_is_unsupported_or_right(rng):
    """onnxruntime (up to 1.32 at least) has no float64 kernel: Unsupported, saying so."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    x, weight, bias = _inputs(rng, "float64")
    try:
        peer = _peers.onnxruntime_forward(x, weight, bias, threads=1)
    except _peers.Unsupported as exc:
        assert "float64" in str(exc)
    else:  # a later release with the kernel
        _check_peer(peer, x, weight, bias, 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_openvino_matches_the_reference(rng, dtype):
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    x, weight, bias = _inputs(rng, dtype)
    peer = _peers.openvino_forward(x, weight, bias, threads=1)
    assert peer.compute_dtype == "float32"  # also for float64: no f64 precision on CPU
    _check_peer(peer, x, weight, bias, 1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_matches_the_reference(rng, dtype):
    pytest.importorskip("numba")
    x, weight, bias = _inputs(rng, dtype, shape=(2, 3, 40))
    _check_peer(_peers.numba_forward(x, weight, bias), x, weight, bias,
                1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "numba"])
def test_run_keeps_the_arrays_the_peer_writes_alive(rng, name):
    """The peers read and write the arrays by pointer: the run function must own them (a
    freed output array was written into, corrupting the heap)."""
    for module in _peers.REQUIRES[name]:
        pytest.importorskip(module)
    x, weight, bias = _inputs(rng, "float32")
    peer = _peers.FORWARDS[name](x, weight, bias, 1)
    run, out = peer.run, weakref.ref(peer.out)
    del peer
    gc.collect()
    assert out() is not None
    run()


# ---- skip lines and loading ---------------------------------------------------------------

def test_load_peers_reports_missing_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "numba", None)
    loaded, skipped = _peers.load_peers(("onnxruntime", "numba"))
    assert loaded == {}
    assert skipped == [f"onnxruntime not installed ({SKIP_HINT}): skipped",
                       f"numba not installed ({SKIP_HINT}): skipped"]
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert _peers.import_peer("openvino") == f"openvino: onnx not installed ({SKIP_HINT}): skipped"


def _tiny_run(monkeypatch, capsys, args, tmp_path=None):
    """bench on a (2, 3, 8, 8) shape, float32, one sample, no torch, few latency calls."""
    monkeypatch.setitem(_bench.SHAPES, "unit", (2, 3, 8, 8))
    monkeypatch.setattr(_bench, "_import_torch", lambda: None)
    monkeypatch.setattr(_peers, "LATENCY_CALLS_PER_REPEAT", 3)
    argv = ["--shapes", "unit", "--dtype", "float32", "--repeat", "1", "--no-progress",
            "--no-channels-last"] + args
    if tmp_path is not None:
        argv += ["--json", str(tmp_path / "bench.json")]
    assert _bench.main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads((tmp_path / "bench.json").read_text()) if tmp_path else None
    return out, err, result


def test_missing_peer_prints_one_skip_line_and_the_bench_goes_on(monkeypatch, capsys, tmp_path):
    for module in ("onnxruntime", "openvino", "numba"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(_bench.SHAPES, "unit2", (1, 2, 4, 4))
    out, err, result = _tiny_run(monkeypatch, capsys, ["--shapes", "unit,unit2", "--dtype",
                                                       "float32,float64"], tmp_path)
    for name in ("onnxruntime", "openvino", "numba"):
        line = f"{name} not installed ({SKIP_HINT}): skipped"
        assert out.splitlines().count(line) == 1, out  # once per run, not per case
    assert "\npeers\n" not in out  # no peer table without peers
    assert "\nforward\n" in out and "small-call latency" in out
    assert "warning" not in err
    assert result["environment"]["peers"] == {}
    assert all(c["ratios"]["forward:onnxruntime/cin"] is None for c in result["cases"])
    assert all("peers" not in c for c in result["cases"])


def test_no_peers_imports_none(monkeypatch, capsys):
    def refuse(names):
        raise AssertionError("peers imported")

    monkeypatch.setattr(_bench, "_import_peers", refuse)
    out, _, _ = _tiny_run(monkeypatch, capsys, ["--no-peers"])
    assert "skipped" not in out and "\npeers\n" not in out


# ---- the peers' table, with stand-ins -----------------------------------------------------

def _stand_in(compute_dtype=None, unsupported_dtype=None, offset=0.0):
    """A peer forward on NumPy behind the peers' interface (``offset`` added to y)."""
    def make(x, weight, bias, threads, eps=_bench.EPS):
        if x.dtype == np.dtype(unsupported_dtype or "V1"):
            raise _peers.Unsupported(f"no {x.dtype} kernel here")
        out = np.empty_like(x)

        def run():
            y, _, _ = _bench.numpy_forward(x, weight, bias, eps)
            np.copyto(out, y + offset)

        return _peers.PeerForward(run, out, compute_dtype or str(x.dtype))
    return make


@pytest.fixture
def stand_in_peers(monkeypatch):
    """onnxruntime without float64, OpenVINO computing in float32, numba; all NumPy."""
    monkeypatch.setattr(_bench, "_import_peers", lambda names: (
        {name: "0.test" for name in names}, []))
    monkeypatch.setitem(_peers.FORWARDS, "onnxruntime", _stand_in(unsupported_dtype="float64"))
    monkeypatch.setitem(_peers.FORWARDS, "openvino", _stand_in(compute_dtype="float32"))
    monkeypatch.setitem(_peers.FORWARDS, "numba", _stand_in())


def test_peers_table_and_json(stand_in_peers, monkeypatch, capsys, tmp_path):
    out, err, result = _tiny_run(monkeypatch, capsys, ["--dtype", "float32,float64",
                                                       "--no-latency"], tmp_path)
    assert "warning" not in err
    lines = out[out.index("\npeers\n") + 1:].splitlines()
    assert lines[1].split() == ["shape", "dtype", "cin", "ms", "torch", "ms", "ort", "ms", "ov",
                                "ms", "ort/cin", "ov/cin", "torch", "err", "ort", "err", "ov",
                                "err"]
    f32, f64 = lines[2].split(), lines[3].split()
    assert f32[:2] == ["unit", "float32"] and f64[:2] == ["unit", "float64"]
    assert f32[4] != "n/a" and f32[-3] == "-"  # torch's cells without torch
    assert f64[4] == "n/a" and f64[6] == "n/a" and f64[-2] == "n/a"  # ort float64
    assert f64[-1].endswith("*") and not f32[-1].endswith("*")  # ov float64 in float32
    assert lines[4].split()[0] == "geomean"
    assert len({len(line) for line in lines[1:4]}) == 1  # columns line up
    for c in result["cases"]:
        assert set(c["times"]) >= {"onnxruntime_forward", "openvino_forward"} - (
            {"onnxruntime_forward"} if c["dtype"] == "float64" else set())
        peers = c["peers"]
        assert peers["openvino"]["status"] == "ok"
        assert peers["openvino"]["compute_dtype"] == "float32"
        assert peers["openvino"]["max_abs_err"] < 1e-5
        ratio = c["ratios"]["forward:openvino/cin"]
        assert ratio is not None and ratio > 0
    f64_case = result["cases"][1]
    assert f64_case["peers"]["onnxruntime"] == {"status": "n/a",
                                                 "reason": "no float64 kernel here"}
    assert f64_case["ratios"]["forward:onnxruntime/cin"] is None
    assert result["environment"]["peers"] == {"onnxruntime": "0.test", "openvino": "0.test"}
    assert set(result["geomean"]) >= {"forward:onnxruntime/cin", "forward:openvino/cin"}


def test_a_peer_far_from_cinstnorm_is_warned(stand_in_peers, monkeypatch, capsys):
    monkeypatch.setitem(_peers.FORWARDS, "openvino", _stand_in(offset=0.1))
    _, err, _ = _tiny_run(monkeypatch, capsys, ["--no-latency"])
    (line,) = err.splitlines()
    assert line.startswith("warning: openvino unit float32: y differs from cinstnorm's by 0.1")


def test_peer_checks_include_torch(rng, torch):
    x, weight, bias = _inputs(rng, "float32")
    checks = _peers.peer_checks({}, {"onnxruntime": "why"}, x, weight, bias, 1, torch)
    assert checks["torch"]["status"] == "ok" and checks["torch"]["max_abs_err"] < 1e-5
    assert checks["onnxruntime"] == {"status": "n/a", "reason": "why"}


# ---- the latency table --------------------------------------------------------------------

def test_latency_only_table_and_json(stand_in_peers, monkeypatch, capsys, tmp_path):
    out, err, result = _tiny_run(monkeypatch, capsys, ["--latency-only", "--dtype",
                                                       "float32,float64"], tmp_path)
    assert "\nforward\n" not in out and "\npeers\n" not in out  # only the latency table
    table = out[out.index("small-call latency"):].splitlines()
    assert f"{_bench.available_cores()} thread(s) (--threads)" in table[0]
    assert table[2].split() == ["(2,3,8,8)", "f32", "(2,3,8,8)", "f64", "(1,64,16,16)", "f32",
                                "(1,64,16,16)", "f64"]
    labels = [label for _, label in _peers.LATENCY_ROWS]
    rows = {}
    for line in filter(None, table[3:]):
        label = max((lb for lb in labels if line.startswith(lb)), key=len)
        rows[label] = line[len(label):].split()
    assert list(rows) == ["cinstnorm forward", "cinstnorm forward out=", "cinstnorm backward",
                          "onnxruntime (io binding)", "OpenVINO infer", "numba @njit (1 thread)"]
    assert rows["onnxruntime (io binding)"][1::2] == ["n/a", "n/a"]  # float64
    latency = result["latency"]
    assert latency["calls"] == 3 and latency["threads"] == result["environment"]["threads"]
    cases = latency["cases"]
    assert [(c["dims"], c["dtype"]) for c in cases] == [
        (list(s), d) for s in _peers.LATENCY_SHAPES for d in ("float32", "float64")]
    for c in cases:
        expected = {"cin_forward", "cin_forward_out", "cin_backward", "openvino", "numba"}
        if c["dtype"] == "float32":
            expected.add("onnxruntime")
        assert set(c["times"]) == expected
        assert all(set(t) == {"best", "median"} and 0 < t["best"] <= t["median"]
                   for t in c["times"].values())
        assert c["na"] == ({} if c["dtype"] == "float32"
                           else {"onnxruntime": "no float64 kernel here"})
    assert result["cases"] == []


def test_latency_with_torch_has_its_row(torch, monkeypatch):
    monkeypatch.setattr(_peers, "LATENCY_SHAPES", ((2, 3, 4, 4),))
    progress = _bench.Progress(0, enabled=False)
    (case,) = _peers.run_latency(["float32"], 1, 1, progress, torch, ())
    assert set(case["times"]) == {"cin_forward", "cin_forward_out", "cin_backward", "torch"}
    assert progress.done == _peers.latency_steps(torch, ())
    text = _peers.format_latency_table([case], 1, 300)
    assert "torch F.instance_norm" in text and "median of 300 calls" in text


def test_call_latency_times_each_call(monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(_peers.time, "perf_counter", lambda: next(clock))
    calls = []
    timing = _peers.call_latency(lambda: calls.append(1), 5)
    assert len(calls) == _peers.LATENCY_WARMUP_CALLS + 5
    assert timing == _bench.Timing(1.0, 1.0)


# ---- command line -------------------------------------------------------------------------

def test_options():
    args = _bench._parse_args([])
    assert args.peers and args.latency and not args.latency_only
    args = _bench._parse_args(["--no-peers", "--no-latency"])
    assert not args.peers and not args.latency
    assert _bench._parse_args(["--latency-only"]).latency_only
    for bad in (["--latency-only", "--no-latency"], ["--latency-only", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            _bench._parse_args(bad)


# ---- tools/peer_accuracy.py ---------------------------------------------------------------

@pytest.fixture(scope="module")
def accuracy_tool():
    return load_tool("peer_accuracy")


def test_accuracy_reference_is_instance_norm(accuracy_tool, rng):
    x, weight, bias = _inputs(rng, "float64", shape=(2, 3, 6, 5))
    expected, _, _ = reference_forward(x, weight, bias)
    np.testing.assert_allclose(accuracy_tool.reference(x, weight, bias), expected, atol=1e-12)


def test_accuracy_tool_skips_missing_peers(accuracy_tool, monkeypatch, capsys):
    for module in ("torch", "onnxruntime", "openvino", "jax"):
        monkeypatch.setitem(sys.modules, module, None)
    assert accuracy_tool.main(["--shape", "1,2,16,16", "--mean", "1e5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("float32 forward, shape (1, 2, 16, 16), plane mean 100000, std 1")
    for label, module in (("torch", "torch"), ("onnxruntime", "onnxruntime"),
                          ("OpenVINO", "openvino"), ("JAX", "jax")):
        assert f"{label}: {module} not installed: skipped" in lines
    (row,) = [line for line in lines if line.startswith("cinstnorm ")]
    assert float(row.split()[-1]) < 1e-5  # shifted statistics: exact x - K at a mean of 1e5
