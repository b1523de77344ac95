"""``python -m cinstnorm scaling``: the OpenMP thread-scaling experiment.

For each chosen shape, dtype and thread count, time the forward pass and the backward pass
(from saved statistics) and report time, speedup over the smallest thread count, parallel
efficiency (speedup / thread ratio) and effective bandwidth (forward moves 2 arrays, backward 3).
Writes a CSV and, when matplotlib is installed, a PNG plot.

Thread pinning: the OpenMP runtime reads OMP_PROC_BIND and OMP_PLACES at start-up, e.g.
``OMP_PROC_BIND=close OMP_PLACES=cores python -m cinstnorm scaling``; without pinning the OS
may move threads between cores during a run.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ._bench import DTYPES, SHAPES, available_cores, make_inputs, measure

DEFAULT_SHAPES = ("style", "dram", "one-plane", "tiny")
FIELDS = ("shape", "dims", "dtype", "op", "threads", "best_ms", "median_ms", "speedup",
          "efficiency", "gb_per_s")


def _int_list(text: str) -> list:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints: {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1: {text!r}")
    return sorted(set(values))


def _name_list(text: str, known: Sequence[str], what: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from "
                                         f"{', '.join(known)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    from .__main__ import _prog

    cores = available_cores()
    p = argparse.ArgumentParser(
        prog=f"{_prog()} scaling",
        description="OpenMP thread scaling of cinstnorm's forward and backward kernels. "
                    "Pin threads with OMP_PROC_BIND=close OMP_PLACES=cores.",
    )
    p.add_argument("--shapes", type=lambda t: _name_list(t, list(SHAPES), "shape"),
                   default=list(DEFAULT_SHAPES),
                   help=f"comma list of {', '.join(SHAPES)} (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--threads", type=_int_list, default=list(range(1, cores + 1)),
                   help=f"comma list of thread counts (default: 1..{cores}, this process's "
                        "cores; e.g. 1,2,4,8,16 on a bigger machine)")
    p.add_argument("--dtype", type=lambda t: _name_list(t, DTYPES, "dtype"),
                   default=["float32"], help="float32, float64 or both (default float32)")
    p.add_argument("--repeat", type=int, default=7, help="timed samples per point (default 7)")
    p.add_argument("--csv", default="scaling.csv", help="CSV output path (default scaling.csv)")
    p.add_argument("--plot", default="scaling.png", help="PNG output path (default scaling.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def run(shapes, dtypes, threads, repeat: int, echo=print) -> list:
    """Measure every point; returns one dict per (shape, dtype, op, threads)."""
    import cinstnorm as cin

    rows = []
    for name in shapes:
        for dtype in dtypes:
            x, dy, w, b = make_inputs(name, dtype)
            out = np.empty_like(x)
            _, mean, rstd = cin.instance_norm_forward(x, w, b)
            ops = {
                "forward": (lambda n: cin.instance_norm_forward(x, w, b, n_threads=n, out=out),
                            2 * x.nbytes),
                "backward": (lambda n: cin.instance_norm_backward(dy, x, mean, rstd, w,
                                                                  n_threads=n),
                             3 * x.nbytes),
            }
            for op, (fn, nbytes) in ops.items():
                base = None
                for n in threads:
                    t = measure(lambda: fn(n), repeat)
                    base = base or (t.best, n)
                    speedup = base[0] / t.best
                    row = dict(shape=name, dims="x".join(map(str, x.shape)), dtype=dtype, op=op,
                               threads=n, best_ms=t.best * 1e3, median_ms=t.median * 1e3,
                               speedup=speedup, efficiency=speedup / (n / base[1]),
                               gb_per_s=nbytes / t.best / 1e9)
                    rows.append(row)
                    echo(format_row(row))
    return rows


def format_row(r: dict) -> str:
    return (f"{r['shape']:<13} {r['dtype']:<8} {r['op']:<9} {r['threads']:>3} thr "
            f"{r['best_ms']:9.3f} ms  speedup {r['speedup']:5.2f}  "
            f"efficiency {r['efficiency']:5.2f}  {r['gb_per_s']:6.1f} GB/s")


def write_csv(rows, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows, path: str) -> Optional[str]:
    """Speedup against threads, one line per shape/dtype, forward and backward side by side.
    Returns None on success, else why no plot was made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: no plot written. Install the plot extra, "
                "pip install \"cinstnorm[plot]\" (or pip install matplotlib)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    threads = sorted({r["threads"] for r in rows})
    for ax, op in zip(axes, ("forward", "backward")):
        series = {}
        for r in rows:
            if r["op"] == op:
                series.setdefault(f"{r['shape']} {r['dtype']}", []).append(
                    (r["threads"], r["speedup"]))
        for label, pts in series.items():
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.plot(threads, [t / threads[0] for t in threads], "k--", lw=1, label="ideal")
        ax.set_title(f"{op}")
        ax.set_xlabel("OpenMP threads")
        ax.set_xticks(threads)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"speedup over {threads[0]} thread(s)")
    axes[1].legend(fontsize=8)
    fig.suptitle("cinstnorm thread scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"cinstnorm scaling: threads {args.threads}, cores {available_cores()}, "
          f"OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND')}, "
          f"OMP_PLACES={os.environ.get('OMP_PLACES')}", flush=True)
    rows = run(args.shapes, args.dtype, args.threads, args.repeat,
               echo=lambda s: print(s, flush=True))
    write_csv(rows, args.csv)
    print(f"wrote {args.csv}")
    if not args.no_plot:
        problem = plot(rows, args.plot)
        print(problem if problem else f"wrote {args.plot}", file=sys.stderr if problem else
              sys.stdout)
    return 0
