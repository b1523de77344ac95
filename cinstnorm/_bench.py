"""Engine behind ``python -m cinstnorm bench``: cinstnorm against torch, NumPy and a memory copy.

For each benchmark shape (docs/design.md) and dtype it times, in one process and on the same
arrays, cinstnorm's forward, backward (from saved statistics, affine weight) and forward +
backward; the same three with torch CPU (when torch imports) and with a vectorised NumPy reference written here; and
``np.copyto`` of the input's bytes, the practical floor of a memory-bound kernel. Every timing is
reported as a ratio measured in the same run, because absolute times hold only on one machine;
the calls of one case are timed side by side, one sample of each per round
(:func:`measure_interleaved`), so that the ratios do not take the machine's drifts with them.

A channels-last table follows (``--no-channels-last`` skips it): the same arrays with
(N, *spatial, C) memory, cinstnorm's forward and backward into ``out=`` arrays of that layout
each timed as a pair in alternating samples with the NCHW one (ratio cl/nchw), and torch's
forward on the channels-last tensor (paired with cinstnorm's allocating one).

A peers table follows (``--no-peers`` skips it): onnxruntime and OpenVINO running the ONNX
``InstanceNormalization`` op on the same arrays (forward only, affine, same thread count; see
``cinstnorm._peers``), timed in the same loop as cinstnorm and checked against its output. Then
a small-call latency table (``--latency-only`` prints only it, ``--no-latency`` skips it):
per-call times on two small shapes, with numba's compiled reference too.

Neither cinstnorm's compiled extension nor torch nor a peer is imported before a benchmark runs.
``--device cuda|all`` adds GPU rows from ``cinstnorm._bench_gpu``, imported (with CuPy) only then.

Examples
--------
>>> from cinstnorm._bench import main
>>> main(["--shapes", "tiny", "--dtype", "float32", "--repeat", "3"])  # doctest: +SKIP
0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

SHAPES: dict[str, tuple[int, ...]] = {
    "small-planes": (32, 64, 32, 32),
    "style": (8, 128, 64, 64),
    "few-big": (1, 3, 1024, 1024),
    "dram": (16, 64, 128, 128),
    "tiny": (64, 256, 8, 8),
    "one-plane": (1, 1, 2048, 2048),
    "volume": (2, 32, 32, 64, 64),
}
DTYPES = ("float32", "float64")
EPS = 1e-5

# Each sample runs the function often enough to last this long, so that sub-millisecond
# kernels are not measured at the resolution of the clock and the call overhead.
MIN_SAMPLE_SECONDS = 2e-3

# The samples of the main tables' side-by-side timings last this long: each sample's first call
# finds the caches as the calls timed before it left them, and in samples of 2 ms that first
# call of a sub-millisecond kernel weighed on its time.
SIDE_BY_SIDE_SAMPLE_SECONDS = 10e-3

# What each op's "cin/copy" ratio divides; forward uses out= so both sides write mapped pages.
OPS = ("forward", "backward", "forward_backward")
OP_TITLES = {"forward": "forward", "backward": "backward", "forward_backward": "forward+backward"}
CIN_NUMPY_KEYS = ("cin_forward", "cin_forward_out", "cin_backward", "cin_backward_out",
                  "cin_forward_backward", "cin_forward_backward_out", "copyto",
                  "numpy_forward", "numpy_backward", "numpy_forward_backward")
TORCH_KEYS = ("torch_forward", "torch_backward", "torch_forward_backward")
# Forward-only peers (cinstnorm._peers); their time keys are f"{name}_forward", their ratios
# "forward:{name}/cin" over cinstnorm's forward into out= (peers write into preallocated arrays).
PEERS = ("onnxruntime", "openvino")
# Against the copy floor (which writes into a preallocated array) cinstnorm also writes into
# preallocated arrays (out=), so the ratio compares kernels, not the allocator's page faults.
FLOOR_NUMERATOR = {
    "forward": "cin_forward_out",
    "backward": "cin_backward_out",
    "forward_backward": "cin_forward_backward_out",
}


def available_cores() -> int:
    """Number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the best and the median of the samples."""

    best: float
    median: float


def calls_per_sample(fn: Callable[[], object], min_seconds: float) -> int:
    """How many calls of ``fn`` fill ``min_seconds`` (1 to 10 000), from the time of its second
    call: the first, a warm-up, pays one-off costs (the page faults of an output written for
    the first time, torch's lazy initialisation) that would make the samples of a
    sub-millisecond call one call long, and so its best the luckiest single call.

    Examples
    --------
    >>> calls_per_sample(lambda: None, 2e-3) > 1
    True
    """
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(10_000, math.ceil(min_seconds / max(once, 1e-9))))


def measure(fn: Callable[[], object], repeat: int = 7) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: a warm-up call and a call that sizes the samples
    (:func:`calls_per_sample`), then ``repeat`` samples.

    A sample averages as many calls as fit in ``MIN_SAMPLE_SECONDS`` (at least one).

    Examples
    --------
    >>> t = measure(lambda: sum(range(100)), repeat=3)
    >>> 0 < t.best <= t.median
    True
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    number = calls_per_sample(fn, MIN_SAMPLE_SECONDS)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return Timing(min(samples), statistics.median(samples))


def best_time(fn: Callable[[], object], repeat: int = 7) -> float:
    """Best seconds per call of ``fn`` over ``repeat`` samples (see :func:`measure`).

    Examples
    --------
    >>> best_time(lambda: None, repeat=3) > 0
    True
    """
    return measure(fn, repeat).best


# ---------------------------------------------------------------------------------------------
# NumPy reference: vectorised, in the input's dtype throughout (no float64 for float32 input).

def _planes(a: np.ndarray) -> np.ndarray:
    """(N, C, M) view of an (N, C, *spatial) C-contiguous array."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def numpy_forward(x, weight, bias, eps=EPS):
    """Instance norm forward in NumPy; returns (y, mean, rstd) like ``instance_norm_forward``."""
    x3 = _planes(x)
    size = x3.shape[-1]
    mean = x3.mean(axis=-1, keepdims=True)
    y = x3 - mean
    var = np.einsum("ncm,ncm->nc", y, y)[..., None] / size  # sum of squares, no temporary
    rstd = 1 / np.sqrt(var + eps)
    y *= rstd * weight[:, None]
    y += bias[:, None]
    return y.reshape(x.shape), mean[..., 0], rstd[..., 0]


def numpy_backward(dy, x, mean, rstd, weight):
    """Instance norm backward in NumPy from saved statistics; returns (dx, dweight, dbias)."""
    x3, dy3 = _planes(x), _planes(dy)
    size = x3.shape[-1]
    rstd3 = rstd[..., None]
    xhat = x3 - mean[..., None]
    xhat *= rstd3
    sum_dy = dy3.sum(axis=-1)
    sum_dy_xhat = np.einsum("ncm,ncm->nc", dy3, xhat)
    # dx = w*rstd*(dy - mean(dy) - xhat*mean(dy*xhat)), built in xhat's buffer
    xhat *= -(sum_dy_xhat / size)[..., None]
    xhat += dy3
    xhat -= (sum_dy / size)[..., None]
    xhat *= weight[:, None] * rstd3
    return xhat.reshape(x.shape), sum_dy_xhat.sum(axis=0), sum_dy.sum(axis=0)


# ---------------------------------------------------------------------------------------------

def _import_torch():
    """torch, or None when it is not installed (or fails to import)."""
    try:
        import torch
    except Exception:  # ImportError, or a broken install (OSError from a shared library)
        return None
    return torch


def _import_peers(names: Sequence[str]) -> tuple[dict, list]:
    """({name: version} of the peers in ``names`` that import, [one skip line per other])."""
    from ._peers import load_peers

    return load_peers(names)


class Progress:
    """A one-line text progress bar on stderr (no-op when disabled)."""

    def __init__(self, total: int, enabled: bool, stream=None, width: int = 24):
        self.total, self.enabled, self.width = total, enabled, width
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self._last_len = 0

    def show(self, label: str) -> None:
        """Draw the bar with ``label`` as the step now running."""
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        self.stream.write("\r" + line.ljust(self._last_len))
        self.stream.flush()
        self._last_len = len(line)

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()


def _touched_empty_like(a: np.ndarray) -> np.ndarray:
    """An output array for ``out=`` timings: ``a``'s shape, dtype and memory layout (as
    ``np.empty_like``), its pages written once, so that no timed call pays their faults.
    (The asv suite has its own, ``benchmarks.common.touched_empty_like``: asv also runs it
    against builds older than this module.)"""
    out = np.empty_like(a)
    out.fill(0)
    return out


def _case_functions(x, dy, weight, bias, threads, torch):
    """name -> zero-argument function to time, for one input."""
    import cinstnorm as cin

    out, dx_out, copy_out = (_touched_empty_like(x) for _ in range(3))
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)
    _, np_mean, np_rstd = numpy_forward(x, weight, bias)

    def cin_forward_backward():
        _, m, r = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)
        cin.instance_norm_backward(dy, x, m, r, weight, n_threads=threads)

    def cin_forward_backward_out():
        _, m, r = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads, out=out)
        cin.instance_norm_backward(dy, x, m, r, weight, n_threads=threads, out=dx_out)

    def numpy_forward_backward():
        _, m, r = numpy_forward(x, weight, bias)
        numpy_backward(dy, x, m, r, weight)

    fns = {  # keys: CIN_NUMPY_KEYS
        "cin_forward": lambda: cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads),
        "cin_forward_out": lambda: cin.instance_norm_forward(
            x, weight, bias, EPS, n_threads=threads, out=out
        ),
        "cin_backward": lambda: cin.instance_norm_backward(
            dy, x, mean, rstd, weight, n_threads=threads
        ),
        "cin_backward_out": lambda: cin.instance_norm_backward(
            dy, x, mean, rstd, weight, n_threads=threads, out=dx_out
        ),
        "cin_forward_backward": cin_forward_backward,
        "cin_forward_backward_out": cin_forward_backward_out,
        "copyto": lambda: np.copyto(copy_out, x),
        "numpy_forward": lambda: numpy_forward(x, weight, bias),
        "numpy_backward": lambda: numpy_backward(dy, x, np_mean, np_rstd, weight),
        "numpy_forward_backward": numpy_forward_backward,
    }
    if torch is not None:
        fns.update(_torch_functions(torch, x, dy, weight, bias))
    return fns


def _torch_functions(torch, x, dy, weight, bias):
    """torch forward (no_grad), autograd backward alone, and forward + backward."""
    return torch_closures(torch, *(torch.from_numpy(a) for a in (x, dy, weight, bias)))


def torch_closures(torch, xt, dyt, wt, bt):
    """Timed torch calls on tensors xt, dyt, wt, bt (any device): forward (no_grad), autograd
    backward alone (of a graph built once) and forward + backward."""
    F = torch.nn.functional
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (xt, wt, bt))
    y_graph = F.instance_norm(xg, weight=wg, bias=bg, eps=EPS)  # kept for backward alone

    def forward():
        with torch.no_grad():
            F.instance_norm(xt, weight=wt, bias=bt, eps=EPS)

    def forward_backward():
        y = F.instance_norm(xg, weight=wg, bias=bg, eps=EPS)
        torch.autograd.grad(y, (xg, wg, bg), dyt)

    return {  # keys: TORCH_KEYS
        "torch_forward": forward,
        "torch_backward": lambda: torch.autograd.grad(
            y_graph, (xg, wg, bg), dyt, retain_graph=True
        ),
        "torch_forward_backward": forward_backward,
    }


def _max_errors(x, dy, weight, bias, threads):
    """Largest |cinstnorm - NumPy reference| of y and dx: a benchmark of wrong results is void."""
    import cinstnorm as cin

    y, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)
    dx, _, _ = cin.instance_norm_backward(dy, x, mean, rstd, weight, n_threads=threads)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64, b64 = weight.astype(np.float64), bias.astype(np.float64)
    y_ref, mean_ref, rstd_ref = numpy_forward(x64, w64, b64)
    dx_ref, _, _ = numpy_backward(dy64, x64, mean_ref, rstd_ref, w64)
    return float(np.max(np.abs(y - y_ref))), float(np.max(np.abs(dx - dx_ref)))


def make_inputs(shape_name: str, dtype: str):
    """(x, dy, weight, bias) from fixed seeds: x ~ N(0, 1), weight near 1, bias near 0."""
    rng = np.random.default_rng(0)
    shape = SHAPES[shape_name]
    x = rng.standard_normal(shape, dtype=dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    weight = (1.0 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
    bias = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
    return x, dy, weight, bias


def _ratio(numerator: Optional[Timing], denominator: Optional[Timing]) -> Optional[float]:
    if numerator is None or denominator is None:
        return None
    return numerator.best / denominator.best


def case_ratios(times: dict[str, Timing]) -> dict[str, Optional[float]]:
    """"{op}:torch/cin", "{op}:cin/copy", "{op}:numpy/cin" and "forward:{peer}/cin" from best
    times (None if absent)."""
    ratios = {}
    for op in OPS:
        cin_time = times[f"cin_{op}"]
        ratios[f"{op}:torch/cin"] = _ratio(times.get(f"torch_{op}"), cin_time)
        ratios[f"{op}:cin/copy"] = _ratio(times[FLOOR_NUMERATOR[op]], times["copyto"])
        ratios[f"{op}:numpy/cin"] = _ratio(times[f"numpy_{op}"], cin_time)
    for name in PEERS:
        ratios[f"forward:{name}/cin"] = _ratio(times.get(f"{name}_forward"),
                                               times["cin_forward_out"])
    return ratios


def geometric_means(cases: Sequence[dict]) -> dict[str, Optional[float]]:
    """Geometric mean of each ratio over the cases that have it."""
    means = {}
    for key in cases[0]["ratios"] if cases else ():
        values = [c["ratios"][key] for c in cases if c["ratios"][key] is not None]
        means[key] = math.exp(sum(map(math.log, values)) / len(values)) if values else None
    return means


def run_benchmarks(shapes, dtypes, threads: int, repeat: int, progress: Progress,
                   torch=None, peers: Sequence[str] = ()) -> list[dict]:
    """Time every (shape, dtype) case; returns one dict per case (times in seconds). With
    ``peers`` (names from PEERS), each case also has "peers": their (and torch's) differences
    from cinstnorm's y, or why a peer cannot run it (see ``cinstnorm._peers.peer_checks``)."""
    from . import _peers  # imports no peer itself

    cases = []
    for name in shapes:
        for dtype in dtypes:
            label = f"{name} {dtype}"
            progress.show(f"{label}: making inputs")
            x, dy, weight, bias = make_inputs(name, dtype)
            fns = _case_functions(x, dy, weight, bias, threads, torch)
            peer_runs, unsupported = _peers.peer_forwards(peers, x, weight, bias, threads)
            fns.update({f"{p}_forward": peer.run for p, peer in peer_runs.items()})
            for _ in unsupported:  # steps counted for every peer
                progress.advance()
            # side by side (measure_interleaved): the VM's speed drifts over seconds, and
            # ratios of calls timed one after another took the drift with them
            progress.show(f"{label}: {len(fns)} calls side by side")
            times = measure_interleaved(fns, repeat, SIDE_BY_SIDE_SAMPLE_SECONDS)
            for _ in fns:
                progress.advance()
            y_err, dx_err = _max_errors(x, dy, weight, bias, threads)
            case = {
                "shape": name, "dims": list(SHAPES[name]), "dtype": dtype,
                "times": {k: asdict(t) for k, t in times.items()},
                "ratios": case_ratios(times),
                "max_abs_err": {"y": y_err, "dx": dx_err},
            }
            if peers:
                case["peers"] = _peers.peer_checks(peer_runs, unsupported, x, weight, bias,
                                                   threads, torch)
            del fns, peer_runs, x, dy
            cases.append(case)
    return cases


def _fmt_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _fmt_ratio(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


# ---------------------------------------------------------------------------------------------
# Channels-last: the same logical (N, C, *spatial) arrays with (N, *spatial, C) memory.

# Time keys of a channels-last case: cinstnorm into out= arrays of the input's layout, NCHW
# (C-contiguous) and channels-last; the allocating CL forward and torch's forward on the CL
# input (no_grad, when torch imports).  CL_GROUPS below says which are timed together.
CL_FORWARD_KEYS = ("cin_forward_out", "cin_forward_out_cl", "cin_forward_cl")
CL_BACKWARD_KEYS = ("cin_backward_out", "cin_backward_out_cl")
CL_TORCH_KEYS = ("torch_forward_cl",)
# (header, key in the case's "times") of the channels-last table's time columns, in ms
CL_TIME_COLUMNS = (("fwd ms", "cin_forward_out"), ("fwd cl ms", "cin_forward_out_cl"),
                   ("bwd ms", "cin_backward_out"), ("bwd cl ms", "cin_backward_out_cl"),
                   ("cl alloc ms", "cin_forward_cl"), ("torch cl ms", "torch_forward_cl"))
CL_RATIO_COLUMNS = (("fwd cl/nchw", "forward:cl/nchw"), ("bwd cl/nchw", "backward:cl/nchw"),
                    ("torch cl/cin cl", "forward:torch_cl/cin_cl"))


def channels_last(a: np.ndarray) -> np.ndarray:
    """The same values as ``a`` (N, C, *spatial) with channels-last memory: axis 1 moved last,
    made contiguous, moved back (an (N, C, *spatial) view of (N, *spatial, C) memory).

    Examples
    --------
    >>> x = np.arange(24.0).reshape(2, 3, 4)
    >>> y = channels_last(x)
    >>> bool(np.array_equal(x, y)), is_channels_last(y), bool(y.flags.c_contiguous)
    (True, True, False)
    """
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def is_channels_last(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is (N, *spatial, C) C-contiguous."""
    return bool(np.moveaxis(a, 1, -1).flags.c_contiguous)


def measure_interleaved(fns: dict, repeat: int = 7, min_seconds: float = None) -> dict:
    """Time several functions side by side: ``{name: Timing}``.

    Each function gets a warm-up call and a call that sizes its samples (as many calls as fill
    ``min_seconds``, default ``MIN_SAMPLE_SECONDS``: :func:`calls_per_sample`, as in
    :func:`measure`); then ``repeat`` rounds take one sample of every function in turn, the
    order reversed every other round, so that drifts of the machine (other load, clock speed)
    fall on all of them alike.

    Examples
    --------
    >>> t = measure_interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, repeat=3)
    >>> sorted(t), 0 < t["a"].best <= t["a"].median
    (['a', 'b'], True)
    """
    return {key: Timing(min(s), statistics.median(s))
            for key, s in interleaved_samples(fns, repeat, min_seconds).items()}


def interleaved_samples(fns: dict, repeat: int = 7,
                        min_seconds: float = None) -> dict:
    """The samples behind :func:`measure_interleaved`: ``{name: [seconds per call, one per
    round]}``, sample i of every function taken in the same round (for paired ratios).  A
    sample lasts at least ``min_seconds`` (default ``MIN_SAMPLE_SECONDS``): its first call
    finds the caches as the other functions left them, so short samples of millisecond calls
    weigh that call heavily."""
    if min_seconds is None:
        min_seconds = MIN_SAMPLE_SECONDS
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    numbers = {key: calls_per_sample(fn, min_seconds) for key, fn in fns.items()}
    samples: dict[str, list] = {key: [] for key in fns}
    order = list(fns)
    for round_ in range(repeat):
        for key in (order if round_ % 2 == 0 else order[::-1]):
            fn, number = fns[key], numbers[key]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[key].append((time.perf_counter() - start) / number)
    return samples


def _channels_last_functions(x, dy, weight, bias, threads, torch):
    """(forward group, backward group, check): the functions to time of one channels-last
    case (name -> zero-argument function; keys ``CL_FORWARD_KEYS`` + ``CL_TORCH_KEYS`` and
    ``CL_BACKWARD_KEYS``), and a function returning the case's sanity check (see
    :func:`_channels_last_check`)."""
    import cinstnorm as cin

    x_cl, dy_cl = channels_last(x), channels_last(dy)
    out, dx_out = _touched_empty_like(x), _touched_empty_like(x)
    out_cl, dx_cl = _touched_empty_like(x_cl), _touched_empty_like(x_cl)
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads)

    forward = {  # keys: CL_FORWARD_KEYS (+ CL_TORCH_KEYS)
        "cin_forward_out": lambda: cin.instance_norm_forward(
            x, weight, bias, EPS, n_threads=threads, out=out),
        "cin_forward_out_cl": lambda: cin.instance_norm_forward(
            x_cl, weight, bias, EPS, n_threads=threads, out=out_cl),
        "cin_forward_cl": lambda: cin.instance_norm_forward(
            x_cl, weight, bias, EPS, n_threads=threads),
    }
    if torch is not None:
        F = torch.nn.functional
        xt = torch.from_numpy(x_cl)  # keeps the strides: a channels-last tensor
        wt, bt = torch.from_numpy(weight), torch.from_numpy(bias)

        def torch_forward_cl():
            with torch.no_grad():
                F.instance_norm(xt, weight=wt, bias=bt, eps=EPS)

        forward["torch_forward_cl"] = torch_forward_cl
    backward = {  # keys: CL_BACKWARD_KEYS
        "cin_backward_out": lambda: cin.instance_norm_backward(
            dy, x, mean, rstd, weight, n_threads=threads, out=dx_out),
        "cin_backward_out_cl": lambda: cin.instance_norm_backward(
            dy_cl, x_cl, mean, rstd, weight, n_threads=threads, out=dx_cl),
    }

    def check():
        return _channels_last_check(cin, (x, dy), (x_cl, dy_cl), (out, dx_out),
                                    (out_cl, dx_cl), weight, bias, threads)

    return forward, backward, check


def _channels_last_check(cin, nchw, cl, nchw_out, cl_out, weight, bias, threads) -> dict:
    """Run each path once and compare: {"layout": ..., "max_abs_diff": ...}.

    ``layout``: "cl" when the channels-last forward and backward outputs (into ``out=`` and
    allocated) have channels-last memory and not NCHW memory; "cl=nchw" when the two layouts
    are the same memory (C == 1 or a single spatial element); "wrong: ..." otherwise.
    ``max_abs_diff``: largest |CL result - NCHW result| of y, dx and the statistics.
    """
    (x, dy), (x_cl, dy_cl) = nchw, cl
    y, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS, n_threads=threads,
                                              out=nchw_out[0])
    dx, _, _ = cin.instance_norm_backward(dy, x, mean, rstd, weight, n_threads=threads,
                                          out=nchw_out[1])
    y_cl, mean_cl, rstd_cl = cin.instance_norm_forward(x_cl, weight, bias, EPS,
                                                       n_threads=threads, out=cl_out[0])
    dx_cl, _, _ = cin.instance_norm_backward(dy_cl, x_cl, mean, rstd, weight,
                                             n_threads=threads, out=cl_out[1])
    y_alloc, _, _ = cin.instance_norm_forward(x_cl, weight, bias, EPS, n_threads=threads)
    dx_alloc, _, _ = cin.instance_norm_backward(dy_cl, x_cl, mean, rstd, weight,
                                                n_threads=threads)
    outputs = {"y out=": y_cl, "dx out=": dx_cl, "y": y_alloc, "dx": dx_alloc}
    not_cl = [name for name, a in outputs.items() if not is_channels_last(a)]
    same_memory = bool(x_cl.flags.c_contiguous)
    if not_cl:
        layout = "wrong: " + ", ".join(not_cl)
    else:
        layout = "cl=nchw" if same_memory else "cl"

    def diff(a, b):
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))

    return {"layout": layout,
            "max_abs_diff": {"y": max(diff(y_cl, y), diff(y_alloc, y)),
                             "dx": max(diff(dx_cl, dx), diff(dx_alloc, dx)),
                             "stats": max(diff(mean_cl, mean), diff(rstd_cl, rstd))}}


def channels_last_ratios(best: dict) -> dict:
    """"forward:cl/nchw", "backward:cl/nchw" (CL time over NCHW time, both with out=; lower is
    better, 1.0 = as fast as NCHW) and "forward:torch_cl/cin_cl" (torch's forward on the CL
    input over cinstnorm's allocating CL forward: the speed-up over torch, None without it),
    from best seconds per call."""
    def ratio(num, den):
        return None if best.get(num) is None or best.get(den) is None else best[num] / best[den]

    return {"forward:cl/nchw": ratio("cin_forward_out_cl", "cin_forward_out"),
            "backward:cl/nchw": ratio("cin_backward_out_cl", "cin_backward_out"),
            "forward:torch_cl/cin_cl": ratio("torch_forward_cl", "cin_forward_cl")}


# The groups timed together, in alternating samples: each ratio's two functions on their own
# (a third function between them, an allocating one or torch's, slowed the channels-last
# forward more than the NCHW one on a Xeon VM: style float32 1.3 to 1.6x against 1.0 to 1.2x
# as a pair), then the allocating forward with torch's.
CL_GROUPS = (("forward", ("cin_forward_out", "cin_forward_out_cl")),
             ("forward against torch", ("cin_forward_cl",) + CL_TORCH_KEYS),
             ("backward", CL_BACKWARD_KEYS))
CL_STEPS_PER_CASE = len(CL_GROUPS)  # progress-bar steps: one per group


def run_channels_last_benchmarks(shapes, dtypes, threads: int, repeat: int, progress: Progress,
                                 torch=None) -> list[dict]:
    """Time every (shape, dtype) case on channels-last memory beside NCHW; one dict per case
    (times in seconds, ratios from :func:`channels_last_ratios`)."""
    cases = []
    for name in shapes:
        for dtype in dtypes:
            label = f"channels-last {name} {dtype}"
            progress.show(f"{label}: making inputs")
            x, dy, weight, bias = make_inputs(name, dtype)
            forward, backward, check = _channels_last_functions(x, dy, weight, bias, threads,
                                                                torch)
            functions, times = {**forward, **backward}, {}
            for group_name, keys in CL_GROUPS:
                progress.show(f"{label}: {group_name}")
                times.update(measure_interleaved({k: functions[k] for k in keys
                                                  if k in functions}, repeat))
                progress.advance()
            sanity = check()
            del forward, backward, functions, check, x, dy
            cases.append({
                "shape": name, "dims": list(SHAPES[name]), "dtype": dtype,
                "times": {k: asdict(t) for k, t in times.items()},
                "ratios": channels_last_ratios({k: t.best for k, t in times.items()}),
                **sanity,
            })
    return cases


CL_LEGEND = (
    "channels-last: the same arrays with (N, *spatial, C) memory against NCHW (C-contiguous); "
    "both write into out= arrays\nof their own layout and are timed as a pair, in alternating "
    "samples (cl alloc and torch cl: another pair; the NCHW\ntimes here are not those of the "
    "tables above). cl/nchw: CL time over NCHW time, lower is better (1.0 = as fast as NCHW).\n"
    "cl alloc: CL forward allocating y, the denominator of torch cl/cin cl (> 1: cinstnorm is "
    "faster than torch on the CL\ninput). max|cl-nchw|: largest difference of y, dx and "
    "statistics from NCHW; layout: cl when every output is channels-last\n(cl=nchw: same "
    "memory)."
)


def case_row(heads: Sequence[str], cases: Sequence[dict]) -> Callable[..., str]:
    """The row formatter of a per-case table: row(shape, dtype, cells), the shape column as wide
    as the longest shape name (or "geomean"), each cell right-aligned under its heading."""
    widths = [max(9, len(h) + 2) for h in heads]
    name_w = max([len("geomean")] + [len(c["shape"]) for c in cases])

    def row(name: str, dtype: str, cells: Sequence[str]) -> str:
        return f"{name:<{name_w}}  {dtype:<7}" + "".join(f"{s:>{w}}" for s, w in zip(cells, widths))
    return row


def format_channels_last_table(cases: Sequence[dict], geomean: dict) -> str:
    """The "channels-last" table: best times (ms), the ratios, the largest difference from
    the NCHW results and the output layout, then the geometric means of the ratios."""
    heads = ([h for h, _ in CL_TIME_COLUMNS] + [h for h, _ in CL_RATIO_COLUMNS]
             + ["max|cl-nchw|", "layout"])
    row = case_row(heads, cases)

    lines = ["channels-last", row("shape", "dtype", heads)]
    for c in cases:
        t = c["times"]
        cells = [_fmt_ms(t[k]["best"] if k in t else None) for _, k in CL_TIME_COLUMNS]
        cells += [_fmt_ratio(c["ratios"].get(k)) for _, k in CL_RATIO_COLUMNS]
        cells += [f"{max(c['max_abs_diff'].values()):.1e}", c["layout"]]
        lines.append(row(c["shape"], c["dtype"], cells))
    cells = [""] * len(CL_TIME_COLUMNS) + [_fmt_ratio(geomean.get(k)) for _, k in CL_RATIO_COLUMNS]
    lines.append(row("geomean", "", cells))
    return "\n".join(lines) + "\n"


def warn_channels_last(cases: Sequence[dict], stream=None) -> None:
    """A warning line on stderr for each case whose CL outputs are not channels-last or whose
    results differ from the NCHW path's by more than the reference tolerance."""
    stream = sys.stderr if stream is None else stream
    for c in cases:
        tol = 1e-3 if c["dtype"] == "float32" else 1e-9
        worst = max(c["max_abs_diff"].values())
        if c["layout"].startswith("wrong"):
            print(f"warning: channels-last {c['shape']} {c['dtype']}: outputs not channels-last "
                  f"({c['layout']})", file=stream)
        if not worst <= tol:  # also NaN
            print(f"warning: channels-last {c['shape']} {c['dtype']}: results differ from the "
                  f"NCHW path by {worst:.3g}", file=stream)


def format_table(cases: Sequence[dict], geomean: dict) -> str:
    """One block per op: best times (ms) and the three ratios, then the geometric-mean row."""
    lines = []
    name_w = max([len("geomean")] + [len(c["shape"]) for c in cases])
    for op in OPS:
        time_cols = [f"cin_{op}", FLOOR_NUMERATOR[op], f"torch_{op}", f"numpy_{op}", "copyto"]
        heads = ["cin ms", "out= ms", "torch ms", "numpy ms", "copy ms", "torch/cin", "cin/copy",
                 "numpy/cin"]
        ratio_keys = [f"{op}:torch/cin", f"{op}:cin/copy", f"{op}:numpy/cin"]
        lines.append(f"{OP_TITLES[op]}")
        lines.append(f"{'shape':<{name_w}}  {'dtype':<7}" + "".join(f"{h:>11}" for h in heads))
        for c in cases:
            t = c["times"]
            cells = [_fmt_ms(t[k]["best"] if k in t else None) for k in time_cols]
            cells += [_fmt_ratio(c["ratios"][k]) for k in ratio_keys]
            lines.append(f"{c['shape']:<{name_w}}  {c['dtype']:<7}"
                         + "".join(f"{s:>11}" for s in cells))
        blank = "".join(f"{'':>11}" for _ in time_cols)
        lines.append(f"{'geomean':<{name_w}}  {'':<7}" + blank
                     + "".join(f"{_fmt_ratio(geomean.get(k)):>11}" for k in ratio_keys))
        lines.append("")
    return "\n".join(lines)


def warn_errors(cases: Sequence[dict], label: str = "", stream=None) -> None:
    """A warning line (on stderr) for each case whose results are off the NumPy reference: a
    benchmark of wrong results is void."""
    stream = sys.stderr if stream is None else stream
    for c in cases:
        tol = 1e-3 if c["dtype"] == "float32" else 1e-9
        worst = max(c["max_abs_err"].values())
        if worst > tol:
            print(f"warning: {label}{c['shape']} {c['dtype']}: cinstnorm differs from the NumPy "
                  f"reference by {worst:.3g} (y {c['max_abs_err']['y']:.3g}, "
                  f"dx {c['max_abs_err']['dx']:.3g})", file=stream)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_args(argv):
    from .__main__ import _prog

    parser = argparse.ArgumentParser(
        prog=f"{_prog()} bench",
        description="Time cinstnorm against torch CPU, a NumPy reference and np.copyto of the "
                    "same bytes, on the docs/design.md shapes. Ratios > 1 in torch/cin and "
                    "numpy/cin mean cinstnorm is faster; cin/copy is the distance from the copy floor.",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated shape names (default: all): " + ", ".join(
                            f"{k} {v}" for k, v in SHAPES.items()))
    parser.add_argument("--dtype", default=",".join(DTYPES),
                        help="comma-separated dtypes from float32,float64 (default: both)")
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="threads for cinstnorm and torch (default: all cores, %(default)s)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="timed samples per measurement; the table shows the best "
                             "(default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu",
                        help="cpu: the CPU tables; cuda: only GPU rows on CuPy arrays (CUDA "
                             "events, against a CuPy y = a*x + b floor and torch CUDA; needs "
                             "CuPy and a device); all: both (default: %(default)s)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="skip the channels-last table (the same arrays with (N, *spatial, "
                             "C) memory, forward and backward timed beside the NCHW path; on "
                             "by default, CPU only)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip onnxruntime, OpenVINO and numba (timed when installed: "
                             'pip install "cinstnorm[peers]")')
    latency = parser.add_mutually_exclusive_group()
    latency.add_argument("--latency-only", action="store_true",
                         help="print only the small-call latency table (per-call µs on "
                              "(2,3,8,8) and (1,64,16,16); --shapes is ignored)")
    latency.add_argument("--no-latency", dest="latency", action="store_false",
                         help="skip the small-call latency table (CPU only)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr")
    args = parser.parse_args(argv)
    args.shapes = _comma_list(args.shapes)
    args.dtype = _comma_list(args.dtype)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad or not args.dtype:
        parser.error(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.latency_only and args.device != "cpu":
        parser.error("--latency-only times the CPU only (drop --device)")
    return args


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's model name (from ``cpuinfo`` on Linux, else what ``platform`` knows), or None."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _environment(threads: int, repeat: int, torch, peers: Optional[dict] = None) -> dict:
    import cinstnorm as cin
    from . import _cpu
    from ._config import l2_cache_bytes, last_level_cache_bytes

    return {
        "threads": threads, "repeat": repeat, "cores": available_cores(),
        "cinstnorm": getattr(cin, "__version__", None), "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "peers": peers or {},
        "python": platform.python_version(), "machine": platform.machine(),
        "processor": cpu_model(), "simd_path": _cpu.simd_path(),
        "llc_bytes": last_level_cache_bytes(), "l2_bytes": l2_cache_bytes(),
        "output_cache_bytes": _cpu.output_cache_info()[2],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and print the table; ``argv`` excludes the ``bench`` word.

    Returns the process exit status: 0, or 2 for ``--device cuda`` without a usable GPU.
    ``--fused`` runs the fused-activation table instead (:mod:`cinstnorm._bench_fused`).
    """
    if argv is not None and "--fused" in argv:
        from . import _bench_fused
        return _bench_fused.main([a for a in argv if a != "--fused"])
    from . import _peers  # imports no peer: load_peers does, when one is wanted

    args = _parse_args(argv)
    gpu_bench = gpu_torch = gpu_skipped = None
    if args.device != "cpu":
        from . import _bench_gpu as gpu_bench  # imports CuPy only when it runs
        gpu_skipped = gpu_bench.unavailable_reason()
        if gpu_skipped is not None and args.device == "cuda":
            print(f"cinstnorm bench --device cuda: no usable GPU: {gpu_skipped}", file=sys.stderr)
            return 2
        if gpu_skipped is not None:
            gpu_bench = None
    run_cpu = args.device != "cuda" and not args.latency_only  # the CPU tables
    run_latency = args.device != "cuda" and args.latency
    torch = _import_torch()
    saved_torch_threads = None
    if torch is not None:
        saved_torch_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
    wanted = (PEERS if run_cpu or run_latency else ()) + (("numba",) if run_latency else ())
    peer_versions, peer_skips = _import_peers(wanted) if args.peers and wanted else ({}, [])
    table_peers = [p for p in PEERS if p in peer_versions and run_cpu]
    latency_peers = [p for p in PEERS + ("numba",) if p in peer_versions]
    run_cl = run_cpu and args.channels_last
    per_case = (len(CIN_NUMPY_KEYS) + (len(TORCH_KEYS) if torch is not None else 0)
                + len(table_peers)) * run_cpu
    per_case += CL_STEPS_PER_CASE * run_cl
    if gpu_bench is not None:
        gpu_torch = gpu_bench.torch_cuda(torch)
        per_case += gpu_bench.steps_per_case(gpu_torch)
    steps = len(args.shapes) * len(args.dtype) * per_case
    latency_calls = _peers.LATENCY_CALLS_PER_REPEAT * args.repeat
    if run_latency:
        steps += len(args.dtype) * _peers.latency_steps(torch, latency_peers)
    progress = Progress(steps, enabled=not args.no_progress and sys.stderr.isatty())
    cases, cl_cases, gpu_cases, latency_cases = [], [], [], []
    try:
        if run_cpu:
            cases = run_benchmarks(args.shapes, args.dtype, args.threads, args.repeat, progress,
                                   torch, table_peers)
        if run_cl:
            cl_cases = run_channels_last_benchmarks(args.shapes, args.dtype, args.threads,
                                                    args.repeat, progress, torch)
        if run_latency:
            latency_cases = _peers.run_latency(args.dtype, args.threads, args.repeat, progress,
                                               torch, latency_peers)
        if gpu_bench is not None:
            gpu_cases = gpu_bench.run_gpu_benchmarks(args.shapes, args.dtype, args.repeat,
                                                     progress, gpu_torch)
    finally:
        progress.close()
        if saved_torch_threads is not None:
            torch.set_num_threads(saved_torch_threads)
    geomean = geometric_means(cases)
    env = _environment(args.threads, args.repeat, torch, peer_versions)
    if args.device != "cpu":
        from ._gpu import gpu_status
        env["gpu"] = gpu_status()

    torch_note = (f"torch {env['torch']} ({args.threads} threads)" if torch is not None
                  else "torch not installed")
    print(f"cinstnorm bench: {args.threads} thread(s), best of {args.repeat}; "
          f"numpy {env['numpy']}, {torch_note}\n{env['processor'] or 'unknown CPU'}, "
          f"SIMD path {env['simd_path']}, L2 {env['l2_bytes'] >> 10} KiB per core, "
          f"last-level cache {env['llc_bytes'] >> 20} MiB")
    for line in peer_skips:
        print(line)
    if run_cpu:
        print("ratios > 1 in torch/cin and numpy/cin: cinstnorm is faster. cin/copy: time over "
              "np.copyto(out, x) of the same bytes;\nforward's uses out= (no page faults for "
              "y), backward allocates dx as the API does\n(from the output cache: "
              f"{env.get('output_cache_bytes', 0) >> 20} MiB, see README; "
              "CINSTNORM_OUTPUT_CACHE_BYTES=0 times fresh buffers).\n")
        print(format_table(cases, geomean))
    if table_peers:
        print(_peers.peers_legend(peer_versions, args.threads))
        print(_peers.format_peers_table(cases, geomean, table_peers))
    cl_geomean = geometric_means(cl_cases)
    if run_cl:
        print(CL_LEGEND)
        print(format_channels_last_table(cl_cases, cl_geomean))
        warn_channels_last(cl_cases)
    if run_latency:
        print(_peers.format_latency_table(latency_cases, args.threads, latency_calls))
    gpu_geomean = geometric_means(gpu_cases)
    if gpu_bench is not None:
        print(gpu_bench.legend(gpu_torch, torch))
        print(gpu_bench.format_gpu_table(gpu_cases, gpu_geomean, gpu_bench.device_name()))
        gpu_bench.warn_errors(gpu_cases)
    elif gpu_skipped is not None:
        print(f"GPU rows skipped: {gpu_skipped}")
    warn_errors(cases)
    if table_peers:
        _peers.warn_peers(cases)
    if args.json:
        with open(args.json, "w") as f:
            result = {"environment": env, "cases": cases, "geomean": geomean}
            if run_latency:
                result["latency"] = {"threads": args.threads, "calls": latency_calls,
                                     "cases": latency_cases}
            if run_cl:
                result.update(channels_last_cases=cl_cases, channels_last_geomean=cl_geomean)
            if args.device != "cpu":
                result.update(gpu_cases=gpu_cases, gpu_geomean=gpu_geomean)
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
