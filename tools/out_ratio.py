"""out= against the allocating call, paired, on the bench shapes.

    python tools/out_ratio.py [--shapes tiny,style] [--dtype float32] [--rounds 21]
                              [--threads 2] [--baseline NAME]

For each shape and dtype, ``instance_norm_forward`` and ``instance_norm_backward`` (affine
weight and bias, the bench's inputs) are timed allocating their output and writing into a
preallocated ``out=`` array, in alternating samples of about 10 ms each; the table gives the
median time of the allocating call and the median ratio out/alloc.  --baseline NAME times an
older build too (see tools/small_calls.py for how to make one importable).
"""
from __future__ import annotations

import argparse
import importlib
import statistics

import numpy as np

import cinstnorm as cin
from cinstnorm._bench import SHAPES, interleaved_samples, make_inputs


def calls(lib, x, dy, w, b, threads):
    # One buffer for both out= calls, as the allocating calls reuse one freed block for both:
    # two buffers would make the out= side's working set an array larger, which on a machine
    # whose cache share holds a few arrays times the cache, not out=.
    out = dx_out = np.empty_like(x)
    _, mean, rstd = lib.instance_norm_forward(x, w, b, n_threads=threads)
    return {
        "fwd": lambda: lib.instance_norm_forward(x, w, b, n_threads=threads),
        "fwd out": lambda: lib.instance_norm_forward(x, w, b, n_threads=threads, out=out),
        "bwd": lambda: lib.instance_norm_backward(dy, x, mean, rstd, w, n_threads=threads),
        "bwd out": lambda: lib.instance_norm_backward(dy, x, mean, rstd, w, n_threads=threads,
                                                      out=dx_out),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", metavar="NAME")
    args = ap.parse_args(argv)
    libs = {"": cin}
    if args.baseline:
        libs["before "] = importlib.import_module(args.baseline)
    print("| case | " + " | ".join(f"{tag}fwd ms | {tag}fwd out/alloc | {tag}bwd ms | "
                                   f"{tag}bwd out/alloc" for tag in libs) + " |")
    print("|---" * (1 + 4 * len(libs)) + "|")
    for name in args.shapes.split(","):
        for dtype in args.dtype.split(","):
            x, dy, w, b = make_inputs(name, dtype)
            fns = {}
            for tag, lib in libs.items():
                fns.update({tag + k: f for k, f in calls(lib, x, dy, w, b, args.threads).items()})
            samples = interleaved_samples(fns, args.rounds, min_seconds=10e-3)
            cells = []
            for tag in libs:
                for op in ("fwd", "bwd"):
                    alloc, into = samples[tag + op], samples[tag + op + " out"]
                    ratio = statistics.median(o / a for o, a in zip(into, alloc))
                    cells += [f"{statistics.median(alloc) * 1e3:.3f}", f"{ratio:.3f}"]
            print(f"| {name} {dtype} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
