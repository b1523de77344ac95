"""``python -m cinstnorm bench --fused``: fused IN + activation (+ residual) against the chain.

For each shape, in one process and interleaved (``_bench.measure_interleaved``), so that the
ratios hold on a loaded machine:

- forward: ``in`` (instance_norm_forward into ``out=``), ``fused`` (the same with
  ``activation``), ``chained`` (``in`` then ``np.maximum(y, 0, out=y)``, or the activation in
  NumPy), and torch's ``F.instance_norm`` then the activation (same thread count);
- forward with a residual: ``fused`` with ``residual=`` against ``chained`` then ``y += r``;
- backward: ``in`` (instance_norm_backward into ``out=``), ``fused`` (through the activation,
  recomputing the pre-activation) and ``chained`` (``np.where(y > 0, dy, 0)``, the activation's
  gradient in NumPy, then ``in``), and torch's autograd backward of the graph built once.

Columns: ``fused/in`` (what the activation costs; 1.0 = free), ``chained/fused`` (> 1: the
fused call is faster) and ``torch/fused``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional, Sequence

import numpy as np

from ._bench import SHAPES, _import_torch, available_cores, measure_interleaved

FUSED_SHAPES = ("style", "dram")
ACTS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh")


def _numpy_act(y, act):
    """The activation in NumPy, in place (the chained baseline)."""
    if act == "relu":
        np.maximum(y, 0, out=y)
    elif act == "leaky_relu":
        np.multiply(y, np.where(y > 0, 1.0, 0.01).astype(y.dtype), out=y)
    else:
        raise ValueError(f"no NumPy chain for {act!r}: only relu and leaky_relu are timed chained")
    return y


def _case(shape_name, dtype, act, threads, repeat, torch):
    import cinstnorm as cin

    rng = np.random.default_rng(0)
    shape = SHAPES[shape_name]
    x = rng.standard_normal(shape, dtype=dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    res = rng.standard_normal(shape, dtype=dtype)
    C = shape[1]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    _, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=threads)
    chain = act in ("relu", "leaky_relu")
    kw = dict(n_threads=threads)

    fwd = {
        "in": lambda: cin.instance_norm_forward(x, w, b, out=y, **kw),
        "fused": lambda: cin.instance_norm_forward(x, w, b, activation=act, out=y, **kw),
        "fused+res": lambda: cin.instance_norm_forward(x, w, b, activation=act, residual=res,
                                                       out=y, **kw),
    }
    bwd = {
        "in": lambda: cin.instance_norm_backward(dy, x, mean, rstd, w, out=dx, **kw),
        "fused": lambda: cin.instance_norm_backward(dy, x, mean, rstd, w, b, activation=act,
                                                    out=dx, **kw),
    }
    if chain:
        def chained():
            cin.instance_norm_forward(x, w, b, out=y, **kw)
            _numpy_act(y, act)

        def chained_res():
            chained()
            np.add(y, res, out=y)

        y_pre = cin.instance_norm_forward(x, w, b, **kw)[0]

        def chained_bwd():
            g = np.where(y_pre > 0, dy, 0 if act == "relu" else dy * 0.01)
            cin.instance_norm_backward(g, x, mean, rstd, w, out=dx, **kw)

        fwd["chained"], fwd["chained+res"], bwd["chained"] = chained, chained_res, chained_bwd
    if torch is not None:
        F = torch.nn.functional
        tact = {"relu": F.relu, "leaky_relu": F.leaky_relu, "silu": F.silu, "gelu": F.gelu,
                "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
        xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

        def torch_fwd():
            with torch.no_grad():
                tact(F.instance_norm(xt, weight=wt, bias=bt))

        xg = xt.clone().requires_grad_(True)
        graph = tact(F.instance_norm(xg, weight=wt, bias=bt))
        dyt = torch.from_numpy(dy)

        def torch_bwd():
            xg.grad = None
            graph.backward(dyt, retain_graph=True)

        fwd["torch"], bwd["torch"] = torch_fwd, torch_bwd
    tf = {k: v.best for k, v in measure_interleaved(fwd, repeat).items()}
    tb = {k: v.best for k, v in measure_interleaved(bwd, repeat).items()}
    return dict(shape=shape_name, dtype=dtype, activation=act, forward=tf, backward=tb)


def _ratio(times, num, den) -> Optional[float]:
    return times[num] / times[den] if num in times and den in times else None


def ratios(case: dict) -> dict:
    f, b = case["forward"], case["backward"]
    return {
        "fwd fused/in": _ratio(f, "fused", "in"),
        "fwd chained/fused": _ratio(f, "chained", "fused"),
        "fwd+res chained/fused": _ratio(f, "chained+res", "fused+res"),
        "fwd torch/fused": _ratio(f, "torch", "fused"),
        "bwd fused/in": _ratio(b, "fused", "in"),
        "bwd chained/fused": _ratio(b, "chained", "fused"),
        "bwd torch/fused": _ratio(b, "torch", "fused"),
    }


def format_table(cases: Sequence[dict]) -> str:
    cols = list(ratios(cases[0])) if cases else []
    head = f"{'shape':<8} {'dtype':<8} {'act':<11} {'fused fwd ms':>12} " + " ".join(
        f"{c:>21}" for c in cols)
    lines = [head, "-" * len(head)]
    for case in cases:
        r = ratios(case)
        cells = " ".join(f"{'-' if r[c] is None else f'{r[c]:.2f}':>21}" for c in cols)
        lines.append(f"{case['shape']:<8} {case['dtype']:<8} {case['activation']:<11} "
                     f"{case['forward']['fused'] * 1e3:>12.3f} {cells}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cinstnorm bench --fused",
        description="Fused instance norm + activation (+ residual) against IN alone, against "
                    "the chain IN then the activation in NumPy (backward: np.where then IN "
                    "backward), and against torch (same threads); ratios from interleaved "
                    "timings in one process.")
    parser.add_argument("--shapes", default=",".join(FUSED_SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--activations", default="relu",
                        help="comma-separated from " + ", ".join(ACTS) + " (default: relu)")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    acts = [a for a in args.activations.split(",") if a]
    bad = [s for s in shapes if s not in SHAPES] + [a for a in acts if a not in ACTS]
    if bad:
        parser.error(f"unknown shape(s) or activation(s): {bad}")
    torch = _import_torch()
    if torch is not None:
        torch.set_num_threads(args.threads)
    cases = [_case(s, d, a, args.threads, args.repeat, torch)
             for s in shapes for d in args.dtype.split(",") for a in acts]
    print(f"fused activation, {args.threads} threads, best of {args.repeat} "
          f"(ratios: > 1 in chained/fused and torch/fused means the fused call is faster)")
    print(format_table(cases))
    geo = {}
    for key in ratios(cases[0]):
        vals = [ratios(c)[key] for c in cases if ratios(c)[key]]
        if vals:
            geo[key] = math.exp(sum(map(math.log, vals)) / len(vals))
    print("geomean: " + ", ".join(f"{k} {v:.2f}" for k, v in geo.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases, "geomean": geo, "threads": args.threads}, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
