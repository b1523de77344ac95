"""GPU rows of ``python -m cinstnorm bench --device cuda|all``.

For each shape and dtype it times on the device, from CUDA events: cinstnorm's forward, its
backward (from saved statistics, affine weight) and forward + backward on CuPy arrays; the
floor, one CuPy ``ElementwiseKernel`` ``y = a*x + b`` over the same bytes (one read and one
write per element, as the forward's minimum); and, when torch has CUDA, torch's
``F.instance_norm`` forward (``no_grad``) and forward + autograd backward on the same device
memory (``torch.as_tensor`` on the CuPy arrays).  The approach is the asv suite's
(``benchmarks/benchmarks/bench_gpu.py``).

CuPy is imported only by the functions here that need it, and this module only when the
command line asks for a device; the CPU benchmark never imports either.

Ratios, from best times of one process:

- ``forward:floor/cin``: floor time / cinstnorm forward time, the fraction of the floor's
  bandwidth that the forward reaches (1.0 = as fast as ``y = a*x + b``);
- ``backward:floor/cin``: 1.5 x floor time / backward time (backward moves three arrays);
- ``forward:torch/cin`` and ``forward_backward:torch/cin``: speed-ups over torch CUDA.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import numpy as np

from ._bench import (EPS, MIN_SAMPLE_SECONDS, SHAPES, Progress, Timing, case_row, make_inputs,
                     numpy_backward, numpy_forward, torch_closures)
from ._bench import warn_errors as bench_warn_errors

# Calls per timed sample: enough to last MIN_SAMPLE_SECONDS, within these bounds.
MIN_CALLS, MAX_CALLS = 3, 1000

CIN_KEYS = ("cin_forward", "cin_backward", "cin_forward_backward", "floor")
TORCH_KEYS = ("torch_forward", "torch_forward_backward")

# (header, key in the case's "times") of the table's time columns, in milliseconds
TIME_COLUMNS = (("cin fwd", "cin_forward"), ("cin bwd", "cin_backward"),
                ("cin f+b", "cin_forward_backward"), ("floor", "floor"),
                ("torch fwd", "torch_forward"), ("torch f+b", "torch_forward_backward"))
RATIO_COLUMNS = (("fwd floor/cin", "forward:floor/cin"), ("fwd torch/cin", "forward:torch/cin"),
                 ("f+b torch/cin", "forward_backward:torch/cin"))


def unavailable_reason() -> Optional[str]:
    """None when cinstnorm can run on a CUDA device here, else one line saying why not (with
    ``cinstnorm._gpu.gpu_status()``'s text)."""
    from . import _gpu

    if not _gpu.gpu_available():
        return _gpu.gpu_status()
    try:
        cupy = _gpu.require_cupy()
        import cinstnorm as cin

        probe = cupy.ones((1, 2, 4), dtype=cupy.float32)
        y, _, _ = cin.instance_norm_forward(probe, None, None, EPS)
        if not isinstance(y, cupy.ndarray):
            raise TypeError(f"returned {type(y).__name__} for a CuPy input")
    except Exception as exc:  # a cinstnorm without the GPU path, a failed kernel compile, ...
        return (f"{_gpu.gpu_status()}; but cinstnorm's GPU forward failed on a probe: "
                f"{type(exc).__name__}: {exc}")
    return None


def torch_cuda(torch):
    """``torch`` when it has a usable CUDA device, else None."""
    try:
        return torch if torch is not None and torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install
        return None


def steps_per_case(torch) -> int:
    """Progress-bar steps of one GPU case (``torch``: the result of :func:`torch_cuda`)."""
    return len(CIN_KEYS) + (len(TORCH_KEYS) if torch is not None else 0)


def device_name(cupy=None) -> str:
    """The current device's name, e.g. 'NVIDIA H100 80GB HBM3'."""
    if cupy is None:
        from . import _gpu

        cupy = _gpu.require_cupy()
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def device_measure(cupy, fn: Callable[[], object], repeat: int = 7,
                   min_sample_seconds: float = MIN_SAMPLE_SECONDS) -> Timing:
    """Seconds per call of ``fn`` on the device, from CUDA events on the current stream.

    One warm-up call (kernel compilation, memory pool), one timed call to size the samples,
    then ``repeat`` samples, each the mean over as many back-to-back calls as fill
    ``min_sample_seconds`` (``MIN_CALLS`` to ``MAX_CALLS``).  Returns the best and the median
    sample.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()

    def sample(number: int) -> float:
        start.record()
        for _ in range(number):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / number

    once = sample(1)
    number = max(MIN_CALLS, min(MAX_CALLS, math.ceil(min_sample_seconds / max(once, 1e-9))))
    samples = [sample(number) for _ in range(repeat)]
    return Timing(min(samples), statistics.median(samples))


def forward_launches(x) -> Optional[int]:
    """Kernel launches of the plan ``cinstnorm._gpu.choose_plan`` picks for a forward on
    the CuPy array ``x`` (C-contiguous, pool-allocated, so 16-byte aligned), or None when
    that cannot be worked out.  Counts the normalization kernels only, not a dtype conversion
    of weight or bias."""
    try:
        from . import _gpu

        P = x.shape[0] * x.shape[1]
        L = x.size // P
        itemsize = x.itemsize
        head = 0 if (L * itemsize) % _gpu.VEC_BYTES == 0 else _gpu.VEC_BYTES // itemsize - 1
        plan = _gpu.choose_plan("forward", P, L, itemsize, head, _gpu._sm_count(x.device.id))
        return int(plan.launches("forward"))
    except Exception:
        return None


def _case_functions(cupy, cin, x, dy, weight, bias, torch):
    """name -> zero-argument function to time, on device arrays."""
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS)
    out = cupy.empty_like(x)
    a, b = x.dtype.type(1.5), x.dtype.type(0.25)
    affine = cupy.ElementwiseKernel("T x, T a, T b", "T y", "y = a * x + b", "cin_bench_affine")

    def cin_forward_backward():
        _, m, r = cin.instance_norm_forward(x, weight, bias, EPS)
        cin.instance_norm_backward(dy, x, m, r, weight)

    fns = {  # keys: CIN_KEYS
        "cin_forward": lambda: cin.instance_norm_forward(x, weight, bias, EPS),
        "cin_backward": lambda: cin.instance_norm_backward(dy, x, mean, rstd, weight),
        "cin_forward_backward": cin_forward_backward,
        "floor": lambda: affine(x, a, b, out),
    }
    if torch is not None:
        fns.update(_torch_functions(torch, x, dy, weight, bias))
    return fns


def _torch_functions(torch, x, dy, weight, bias):
    """torch CUDA forward (no_grad) and forward + autograd backward, on x's device memory."""
    fns = torch_closures(torch, *(torch.as_tensor(a) for a in (x, dy, weight, bias)))  # no copy
    return {k: fns[k] for k in ("torch_forward", "torch_forward_backward")}  # TORCH_KEYS


def _max_errors(cupy, cin, host, device):
    """Largest |cinstnorm on the device - NumPy reference in float64 on the host| of y and dx;
    ``host`` and ``device``: (x, dy, weight, bias) on each side."""
    x, dy, weight, bias = device
    y, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS)
    dx, _, _ = cin.instance_norm_backward(dy, x, mean, rstd, weight)
    x64, dy64, w64, b64 = (a.astype(np.float64) for a in host)
    y_ref, mean_ref, rstd_ref = numpy_forward(x64, w64, b64)
    dx_ref, _, _ = numpy_backward(dy64, x64, mean_ref, rstd_ref, w64)
    return (float(np.max(np.abs(cupy.asnumpy(y) - y_ref))),
            float(np.max(np.abs(cupy.asnumpy(dx) - dx_ref))))


def _ratio(numerator: Optional[float], denominator: Optional[float], scale: float = 1.0):
    if numerator is None or denominator is None:
        return None
    return scale * numerator / denominator


def case_ratios(best: dict) -> dict:
    """The ratios of one case from best seconds per call (None where torch is absent)."""
    return {
        "forward:floor/cin": _ratio(best["floor"], best["cin_forward"]),
        "backward:floor/cin": _ratio(best["floor"], best["cin_backward"], 1.5),
        "forward:torch/cin": _ratio(best.get("torch_forward"), best["cin_forward"]),
        "forward_backward:torch/cin": _ratio(best.get("torch_forward_backward"),
                                             best["cin_forward_backward"]),
    }


def run_gpu_benchmarks(shapes, dtypes, repeat: int, progress: Progress, torch=None,
                       cupy=None) -> list:
    """Time every (shape, dtype) case on the current device; one dict per case (seconds).

    ``torch``: torch with CUDA (see :func:`torch_cuda`) or None; ``cupy``: the CuPy module
    (default: ``cinstnorm._gpu.require_cupy()``).
    """
    import cinstnorm as cin

    if cupy is None:
        from . import _gpu

        cupy = _gpu.require_cupy()
    cases = []
    for name in shapes:
        for dtype in dtypes:
            label = f"gpu {name} {dtype}"
            progress.show(f"{label}: making inputs")
            host = make_inputs(name, dtype)
            x, dy, weight, bias = (cupy.asarray(a) for a in host)
            fns = _case_functions(cupy, cin, x, dy, weight, bias, torch)
            times = {}
            for key, fn in fns.items():
                progress.show(f"{label}: {key}")
                times[key] = device_measure(cupy, fn, repeat)
                progress.advance()
            y_err, dx_err = _max_errors(cupy, cin, host, (x, dy, weight, bias))
            best = {k: t.best for k, t in times.items()}
            cases.append({
                "shape": name, "dims": list(SHAPES[name]), "dtype": dtype,
                "nbytes": int(host[0].nbytes),
                "times": {k: asdict(t) for k, t in times.items()},
                "ratios": case_ratios(best),
                "forward_gb_per_s": 2 * host[0].nbytes / best["cin_forward"] / 1e9,
                "forward_launches": forward_launches(x),
                "max_abs_err": {"y": y_err, "dx": dx_err},
            })
            del fns, x, dy, weight, bias, host
            cupy.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
    return cases


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_gpu_table(cases: Sequence[dict], geomean: dict, device: str) -> str:
    """The "GPU (device)" table: best times (ms), ratios, forward GB/s, launches, y error,
    then the geometric means of the ratios."""
    heads = ([h for h, _ in TIME_COLUMNS] + [h for h, _ in RATIO_COLUMNS]
             + ["fwd GB/s", "launches", "y err"])
    row = case_row(heads, cases)

    lines = [f"GPU ({device})", row("shape", "dtype", heads)]
    for c in cases:
        t = c["times"]
        cells = [_fmt(t[k]["best"] * 1e3 if k in t else None, ".3f") for _, k in TIME_COLUMNS]
        cells += [_fmt(c["ratios"].get(k), ".2f") for _, k in RATIO_COLUMNS]
        launches = c.get("forward_launches")
        cells += [_fmt(c.get("forward_gb_per_s"), ".0f"),
                  "-" if launches is None else str(launches),
                  _fmt(c["max_abs_err"]["y"], ".1e")]
        lines.append(row(c["shape"], c["dtype"], cells))
    cells = [""] * len(TIME_COLUMNS) + [_fmt(geomean.get(k), ".2f") for _, k in RATIO_COLUMNS]
    lines.append(row("geomean", "", cells))
    return "\n".join(lines) + "\n"


GPU_LEGEND = (
    "GPU: times in ms from CUDA events (mean over back-to-back calls, best of the samples). "
    "floor: CuPy y = a*x + b over the same bytes;\n"
    "fwd floor/cin: fraction of the floor's bandwidth the forward reaches (1.0 = as fast); "
    "torch/cin > 1: cinstnorm is faster than torch CUDA;\n"
    "fwd GB/s: 2 x bytes of x / forward time; launches: kernels of the forward's plan; "
    "y err: max |y - NumPy float64 reference|."
)


def legend(torch_cuda_module, torch) -> str:
    """The lines printed above the GPU table: what the columns mean, and which torch ran."""
    if torch_cuda_module is not None:
        note = f"torch {torch_cuda_module.__version__} on CUDA"
    elif torch is not None:
        note = f"torch {torch.__version__} has no CUDA device: no torch columns"
    else:
        note = "torch not installed: no torch columns"
    return f"{GPU_LEGEND}\n{note}\n"


def warn_errors(cases: Sequence[dict], stream=None) -> None:
    """A warning line on stderr for each case whose device result is off the reference."""
    bench_warn_errors(cases, "gpu ", stream)
