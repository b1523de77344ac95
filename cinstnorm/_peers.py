"""Other CPU implementations of instance norm for ``python -m cinstnorm bench``: the peers.

- onnxruntime: the ONNX ``InstanceNormalization`` op in a one-node model built in memory with
  the ``onnx`` helper API, run with io binding (inputs and output bound to preallocated NumPy
  arrays, no copies), ``intra_op_num_threads`` = the bench's thread count, one inter-op thread,
  sequential execution. Its CPU provider has no float64 kernel for the op: those cells are n/a.
- OpenVINO: the same ONNX model compiled for the ``CPU`` plugin with ``INFERENCE_NUM_THREADS``
  = the thread count, one stream, the latency hint, float32 inference precision (no bf16 on
  CPUs that have it) and no thread pinning (cinstnorm's and torch's threads are not pinned
  either); an infer request on tensors that share the NumPy arrays' memory. The plugin has no
  float64 inference precision: it computes float64 models in float32.
- numba: a plain two-pass reference forward (``@njit(parallel=False)``, float64 sums), compiled
  before it is timed; in the small-call latency table only.

Neither peer has a backward; they are timed on the forward only, always affine. Every peer is
imported only when a benchmark asks for it (``load_peers``); this module imports none of them.

The small-call latency table is here too: per-call times of the forward (and cinstnorm's
backward) on two small shapes, where per-call overhead, not bandwidth, decides.

Examples
--------
>>> from cinstnorm._peers import instance_norm_model
>>> model = instance_norm_model((2, 3, 8, 8), "float32")  # doctest: +SKIP
>>> [node.op_type for node in model.graph.node]  # doctest: +SKIP
['InstanceNormalization']
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ._bench import EPS, PEERS, Progress, Timing, _fmt_ratio, case_row

INSTALL_HINT = 'pip install "cinstnorm[peers]"'
# The modules each peer needs (the ONNX model is built with the onnx package for both).
REQUIRES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"),
            "numba": ("numba",)}
SHORT = {"onnxruntime": "ort", "openvino": "ov"}  # column labels
# opset 17 (InstanceNormalization-6) and IR 8 load in onnxruntime >= 1.17 and OpenVINO >= 2024.0
OPSET, IR_VERSION = 17, 8


class Unsupported(Exception):
    """The peer cannot run this case (e.g. no kernel for the dtype); the message says why."""


def import_peer(name: str) -> Optional[str]:
    """None when the peer's modules import, else the one line that says it is skipped."""
    for module in REQUIRES[name]:
        try:
            importlib.import_module(module)
        except ImportError:
            what = name if module == name else f"{name}: {module}"
            return f"{what} not installed ({INSTALL_HINT}): skipped"
        except Exception as exc:  # a broken install (OSError from a shared library, ...)
            return f"{name}: importing {module} failed ({type(exc).__name__}: {exc}): skipped"
    return None


def load_peers(names: Sequence[str] = PEERS + ("numba",)) -> tuple[dict[str, str], list[str]]:
    """({name: version} of the peers that import, [skip line of each one that does not])."""
    loaded, skipped = {}, []
    for name in names:
        reason = import_peer(name)
        if reason is None:
            try:  # the release ("2026.4.1"), not a build string
                loaded[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                loaded[name] = getattr(importlib.import_module(name), "__version__", "?")
        else:
            skipped.append(reason)
    return loaded, skipped


# ---------------------------------------------------------------------------------------------
# The peers' forwards: each returns a PeerForward on fixed arrays, or raises Unsupported.

@dataclass
class PeerForward:
    """One peer's forward on fixed inputs: each ``run()`` writes y into ``out``.

    ``compute_dtype``: the precision the peer computes in (OpenVINO: float32 for float64).
    ``run`` owns the arrays the peer reads and writes by pointer (see :func:`_owning`), so it
    may outlive this object.
    """

    run: Callable[[], object]
    out: np.ndarray
    compute_dtype: str


def _owning(call: Callable[[], object], *arrays) -> Callable[[], object]:
    """``call`` wrapped so that ``arrays`` live as long as the wrapper: a peer bound to NumPy
    memory by pointer must never write into an array that was freed."""
    def run():
        return call()

    run.arrays = arrays
    return run


def instance_norm_model(shape: Sequence[int], dtype, eps: float = EPS):
    """A one-node ONNX model ``y = InstanceNormalization(x, scale, B)`` of a fixed shape.

    Inputs ``x`` (the shape), ``scale`` and ``B`` (C,), output ``y``; all of ``dtype``.
    """
    import onnx
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    channels = [shape[1]]
    node = helper.make_node("InstanceNormalization", ["x", "scale", "B"], ["y"], epsilon=eps)
    graph = helper.make_graph(
        [node], "instance_norm",
        [helper.make_tensor_value_info("x", elem, list(shape)),
         helper.make_tensor_value_info("scale", elem, channels),
         helper.make_tensor_value_info("B", elem, channels)],
        [helper.make_tensor_value_info("y", elem, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cinstnorm")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _c_arrays(*arrays):
    return tuple(np.ascontiguousarray(a) for a in arrays)


def onnxruntime_forward(x, weight, bias, threads: int, eps: float = EPS) -> PeerForward:
    """onnxruntime's forward with io binding; Unsupported for a dtype without a CPU kernel."""
    import onnxruntime as ort

    x, weight, bias = _c_arrays(x, weight, bias)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = instance_norm_model(x.shape, x.dtype, eps).SerializeToString()
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if "NOT_IMPLEMENTED" in str(exc):  # e.g. float64: no kernel registered
            raise Unsupported(f"no {x.dtype} InstanceNormalization kernel on CPU") from exc
        raise
    out = np.empty_like(x)
    binding = session.io_binding()
    for name, a in (("x", x), ("scale", weight), ("B", bias)):
        binding.bind_cpu_input(name, a)  # by pointer, no copy
    out_value = ort.OrtValue.ortvalue_from_numpy(out)  # shares out's memory
    binding.bind_ortvalue_output("y", out_value)
    run = _owning(lambda: session.run_with_iobinding(binding), x, weight, bias, out, out_value)
    return PeerForward(run, out, str(x.dtype))


@functools.lru_cache(maxsize=1)
def _openvino_core():
    import openvino as ov

    return ov.Core()


def openvino_forward(x, weight, bias, threads: int, eps: float = EPS) -> PeerForward:
    """OpenVINO's forward: an infer request on tensors sharing the arrays' memory."""
    import openvino as ov

    x, weight, bias = _c_arrays(x, weight, bias)
    core = _openvino_core()
    model = core.read_model(instance_norm_model(x.shape, x.dtype, eps).SerializeToString())
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
    request = compiled.create_infer_request()
    out = np.empty_like(x)
    for i, a in enumerate((x, weight, bias)):
        request.set_input_tensor(i, ov.Tensor(a, shared_memory=True))
    request.set_output_tensor(0, ov.Tensor(out, shared_memory=True))
    # f32 for float64 models too: the CPU plugin has no f64 inference precision
    compute = np.dtype(compiled.get_property("INFERENCE_PRECISION_HINT").to_dtype()).name
    run = _owning(lambda: request.infer(share_outputs=True), x, weight, bias, out)
    return PeerForward(run, out, compute)


@functools.lru_cache(maxsize=1)
def numba_instance_norm():
    """A reference forward compiled by numba: ``f(x3, weight, bias, eps, out3)`` on (N, C, M)
    arrays, two passes per plane with float64 sums, written into ``out3``."""
    import numba

    @numba.njit(parallel=False, cache=False)
    def forward(x, weight, bias, eps, out):
        planes_n, channels, size = x.shape
        for n in range(planes_n):
            for c in range(channels):
                total = 0.0
                for i in range(size):
                    total += x[n, c, i]
                mean = total / size
                squares = 0.0
                for i in range(size):
                    d = x[n, c, i] - mean
                    squares += d * d
                alpha = weight[c] / np.sqrt(squares / size + eps)
                for i in range(size):
                    out[n, c, i] = (x[n, c, i] - mean) * alpha + bias[c]

    return forward


def numba_forward(x, weight, bias, threads: int = 1, eps: float = EPS) -> PeerForward:
    """numba's reference forward (one thread whatever ``threads`` says), compiled on the first
    call: call ``run()`` once before timing it."""
    forward = numba_instance_norm()
    x, weight, bias = _c_arrays(x, weight, bias)
    out = np.empty_like(x)
    x3, out3 = x.reshape(x.shape[0], x.shape[1], -1), out.reshape(x.shape[0], x.shape[1], -1)
    return PeerForward(lambda: forward(x3, weight, bias, eps, out3), out, str(x.dtype))


FORWARDS = {"onnxruntime": onnxruntime_forward, "openvino": openvino_forward,
            "numba": numba_forward}


def peer_forwards(names, x, weight, bias, threads: int):
    """({name: PeerForward}, {name: reason it cannot run}) for the peers ``names``."""
    runs, unsupported = {}, {}
    for name in names:
        try:
            runs[name] = FORWARDS[name](x, weight, bias, threads)
        except Unsupported as exc:
            unsupported[name] = str(exc)
    return runs, unsupported


def peer_checks(runs: dict, unsupported: dict, x, weight, bias, threads: int, torch=None):
    """Each peer's (and torch's) largest |y - cinstnorm's y| on this case, for the case's
    "peers" entry: {name: {"status": "ok", "max_abs_err", "compute_dtype"} or
    {"status": "n/a", "reason"}}."""
    import cinstnorm as cin

    y, _, _ = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)
    y64 = y.astype(np.float64)

    def err(a):
        return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - y64)))

    checks = {}
    if torch is not None:
        with torch.no_grad():
            yt = torch.nn.functional.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(
                weight), bias=torch.from_numpy(bias), eps=EPS).numpy()
        checks["torch"] = {"status": "ok", "max_abs_err": err(yt), "compute_dtype": str(x.dtype)}
    for name, peer in runs.items():
        peer.run()
        checks[name] = {"status": "ok", "max_abs_err": err(peer.out),
                        "compute_dtype": peer.compute_dtype}
    for name, reason in unsupported.items():
        checks[name] = {"status": "n/a", "reason": reason}
    return checks


# ---------------------------------------------------------------------------------------------
# The peers' table in bench (cases from cinstnorm._bench.run_benchmarks with peers).

def _fmt_err(check: Optional[dict], dtype: str) -> str:
    if check is None:
        return "-"
    if check["status"] != "ok":
        return "n/a"
    mark = "*" if check["compute_dtype"] != dtype else ""
    return f"{check['max_abs_err']:.1e}{mark}"


def _fmt_peer_ms(timing: Optional[dict], check: Optional[dict] = None) -> str:
    if check is not None and check["status"] != "ok":
        return "n/a"
    return "-" if timing is None else f"{timing['best'] * 1e3:.3f}"


def peers_legend(versions: dict, threads: int) -> str:
    """What the peers' table shows."""
    names = {"onnxruntime": "onnxruntime", "openvino": "OpenVINO"}
    parts = [f"{SHORT[p]} = {names[p]} {versions[p]}" for p in PEERS if p in versions]
    return (
        f"peers: forward only (onnxruntime and OpenVINO have no backward), affine, {threads} "
        f"thread(s) each; {', '.join(parts)}.\nBoth run a one-node ONNX InstanceNormalization "
        "model on preallocated arrays (io binding; an infer request on shared tensors), so\n"
        "their ratios divide by cinstnorm's forward into out= (cin ms); > 1: cinstnorm is "
        "faster. torch ms allocates y (its ratio\nis in the forward table). err: max |y - "
        "cinstnorm's y|; *: computed in float32 (OpenVINO's CPU plugin has no float64\n"
        "precision); n/a: no kernel for the dtype (onnxruntime has no float64 "
        "InstanceNormalization on CPU). At a plane\nmean of 1e5 (std 1) torch and the float32 "
        "peers err by 2e-3 to 4e-2, cinstnorm by 4e-7: python tools/peer_accuracy.py."
    )


def format_peers_table(cases: Sequence[dict], geomean: dict, names: Sequence[str]) -> str:
    """Best times (ms) of cinstnorm (out=), torch and each peer in ``names``, the peers'
    ratios over cinstnorm and the largest differences from cinstnorm's y."""
    names = [n for n in PEERS if n in names]
    heads = (["cin ms", "torch ms"] + [f"{SHORT[n]} ms" for n in names]
             + [f"{SHORT[n]}/cin" for n in names] + ["torch err"]
             + [f"{SHORT[n]} err" for n in names])
    row = case_row(heads, cases)

    lines = ["peers", row("shape", "dtype", heads)]
    for c in cases:
        t, checks = c["times"], c["peers"]
        cells = [_fmt_peer_ms(t.get("cin_forward_out")), _fmt_peer_ms(t.get("torch_forward"))]
        cells += [_fmt_peer_ms(t.get(f"{n}_forward"), checks.get(n)) for n in names]
        cells += ["n/a" if checks.get(n, {}).get("status") == "n/a"
                  else _fmt_ratio(c["ratios"].get(f"forward:{n}/cin")) for n in names]
        cells += [_fmt_err(checks.get(n), c["dtype"]) for n in ["torch"] + names]
        lines.append(row(c["shape"], c["dtype"], cells))
    cells = [""] * (2 + len(names)) + [_fmt_ratio(geomean.get(f"forward:{n}/cin")) for n in names]
    lines.append(row("geomean", "", cells))
    return "\n".join(lines) + "\n"


def warn_peers(cases: Sequence[dict], stream=None) -> None:
    """A warning line on stderr for each peer result far from cinstnorm's (tolerance by the
    precision the peer computes in; the bench inputs have moderate means)."""
    import sys

    stream = sys.stderr if stream is None else stream
    for c in cases:
        for name, check in c.get("peers", {}).items():
            if check["status"] != "ok":
                continue
            tol = 1e-3 if check["compute_dtype"] == "float32" else 1e-9
            if not check["max_abs_err"] <= tol:  # also NaN
                print(f"warning: {name} {c['shape']} {c['dtype']}: y differs from cinstnorm's "
                      f"by {check['max_abs_err']:.3g}", file=stream)


# ---------------------------------------------------------------------------------------------
# Small-call latency: per-call times where overhead, not bandwidth, decides.

LATENCY_SHAPES = ((2, 3, 8, 8), (1, 64, 16, 16))
# (key, row label); the peers' keys are their names
LATENCY_ROWS = (("cin_forward", "cinstnorm forward"),
                ("cin_forward_out", "cinstnorm forward out="),
                ("cin_backward", "cinstnorm backward"),
                ("onnxruntime", "onnxruntime (io binding)"),
                ("openvino", "OpenVINO infer"),
                ("torch", "torch F.instance_norm"),
                ("numba", "numba @njit (1 thread)"))
LATENCY_CALLS_PER_REPEAT = 300  # individually timed calls per --repeat
LATENCY_WARMUP_CALLS = 20


def call_latency(fn: Callable[[], object], calls: int) -> Timing:
    """Seconds per call of ``fn``: the fastest and the median of ``calls`` calls, each timed on
    its own after a few warm-up calls (thread pools started, JIT compiled, caches warm).

    Examples
    --------
    >>> t = call_latency(lambda: None, 50)
    >>> 0 < t.best <= t.median
    True
    """
    for _ in range(LATENCY_WARMUP_CALLS):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times))


def shape_label(shape: Sequence[int]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def _latency_functions(x, dy, weight, bias, threads: int, torch, peers: Sequence[str]):
    """({key: function}, {key: reason it cannot run}) for one latency case."""
    import cinstnorm as cin

    out = np.empty_like(x)
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)
    fns = {
        "cin_forward": lambda: cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads),
        "cin_forward_out": lambda: cin.instance_norm_forward(x, weight, bias, EPS,
                                                             n_threads=threads, out=out),
        "cin_backward": lambda: cin.instance_norm_backward(dy, x, mean, rstd, weight,
                                                           n_threads=threads),
    }
    runs, unsupported = peer_forwards(peers, x, weight, bias, threads)
    fns.update({name: peer.run for name, peer in runs.items()})
    if torch is not None:
        F = torch.nn.functional
        xt, wt, bt = (torch.from_numpy(a) for a in (x, weight, bias))

        def torch_forward():
            with torch.no_grad():
                F.instance_norm(xt, weight=wt, bias=bt, eps=EPS)

        fns["torch"] = torch_forward
    order = [key for key, _ in LATENCY_ROWS]
    return dict(sorted(fns.items(), key=lambda kv: order.index(kv[0]))), unsupported


def latency_steps(torch, peers: Sequence[str]) -> int:
    """Progress-bar steps of run_latency: one per timed row and case."""
    return len(LATENCY_SHAPES) * (3 + (torch is not None) + len(peers))


def run_latency(dtypes, threads: int, repeat: int, progress: Progress, torch=None,
                peers: Sequence[str] = ()) -> list[dict]:
    """Per-call times of every LATENCY_ROWS row that runs, per shape and dtype: one dict per
    case, ``times`` in seconds ({best, median}), ``na`` {row: reason} for rows that cannot
    run (absent rows: not installed)."""
    cases = []
    calls = LATENCY_CALLS_PER_REPEAT * repeat
    for shape in LATENCY_SHAPES:
        for dtype in dtypes:
            rng = np.random.default_rng(0)
            x = rng.standard_normal(shape, dtype=dtype)
            dy = rng.standard_normal(shape, dtype=dtype)
            weight = (1.0 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
            bias = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
            fns, na = _latency_functions(x, dy, weight, bias, threads, torch, peers)
            times = {}
            for key, fn in fns.items():
                progress.show(f"latency {shape_label(shape)} {dtype}: {key}")
                times[key] = call_latency(fn, calls)
                progress.advance()
            for _ in na:
                progress.advance()
            cases.append({"shape": shape_label(shape), "dims": list(shape), "dtype": dtype,
                          "times": {k: asdict(t) for k, t in times.items()}, "na": na})
    return cases


def format_latency_table(cases: Sequence[dict], threads: int, calls: int) -> str:
    """Rows: the implementations; columns: shape and dtype; cells: median µs per call."""
    keys = [k for k, _ in LATENCY_ROWS if any(k in c["times"] or k in c["na"] for c in cases)]
    labels = dict(LATENCY_ROWS)
    heads = [f"{c['shape']} {c['dtype'].replace('float', 'f')}" for c in cases]
    widths = [max(10, len(h) + 2) for h in heads]
    label_w = max(len(labels[k]) for k in keys) if keys else 10
    lines = [f"small-call latency: µs per call, median of {calls} calls each timed alone; "
             f"{threads} thread(s) (--threads) for\ncinstnorm, torch, onnxruntime and OpenVINO, "
             "numba single-threaded. Forward affine; backward from saved statistics.",
             f"{'':<{label_w}}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for key in keys:
        cells = []
        for c in cases:
            if key in c["na"]:
                cells.append("n/a")
            elif key in c["times"]:
                cells.append(f"{c['times'][key]['median'] * 1e6:.1f}")
            else:
                cells.append("-")
        lines.append(f"{labels[key]:<{label_w}}" + "".join(f"{s:>{w}}" for s, w in
                                                            zip(cells, widths)))
    return "\n".join(lines) + "\n"
