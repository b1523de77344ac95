"""Command line: ``cinstnorm {demo,info,bench,scaling}`` (the console script that ``pip install``
creates), or the same as ``python -m cinstnorm {demo,info,bench,scaling}``."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def demo() -> None:
    """The classic InstanceNorm2d example, on NumPy: statistics before and after."""
    import cinstnorm as cin

    rng = np.random.default_rng(0)
    x = rng.normal(loc=5.0, scale=10.0, size=(2, 3, 4, 4)).astype(np.float32)
    m = cin.InstanceNorm2d(3, affine=True)
    y = m(x)
    print(f"input  shape {x.shape}, dtype {x.dtype}; module: {m!r}")
    print(f"{'n':>2} {'c':>2} | {'mean before':>11} {'std before':>10} | "
          f"{'mean after':>10} {'std after':>9}")
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            before, after = x[n, c].astype(np.float64), y[n, c].astype(np.float64)
            # biased std, the statistic instance norm divides by (eps aside);
            # round then add 0.0 so a mean of -1e-8 prints as 0.000, not -0.000
            print(f"{n:>2} {c:>2} | {before.mean():11.3f} {before.std():10.3f} | "
                  f"{round(after.mean(), 3) + 0.0:10.3f} {after.std():9.3f}")
    print(f"weight shape {m.weight.shape}: {m.weight}")
    print(f"bias   shape {m.bias.shape}: {m.bias}")


def _prog() -> str:
    """How the user called us: ``python -m cinstnorm`` or the ``cinstnorm`` script."""
    return ("python -m cinstnorm" if os.path.basename(sys.argv[0]) == "__main__.py"
            else "cinstnorm")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="cinstnorm: instance normalization on NumPy arrays from compiled kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("demo", help="normalize a (2, 3, 4, 4) batch with InstanceNorm2d(3, "
                   "affine=True) and print each plane's mean/std before and after")
    sub.add_parser("info", help="print show_config(): version, OpenMP, threads, SIMD path, flags")
    sub.add_parser("bench", help="benchmark against NumPy, torch (if installed) and np.copyto",
                   add_help=False)
    sub.add_parser("scaling", help="OpenMP thread-scaling experiment (CSV and PNG)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        demo()
    elif args.command == "info":
        import cinstnorm as cin
        cin.show_config()
    elif args.command == "bench":
        from ._bench import main as bench_main
        return bench_main(rest) or 0
    elif args.command == "scaling":
        from ._scaling import main as scaling_main
        return scaling_main(rest) or 0
    else:
        parser.print_help()
        return 0 if argv is not None or len(sys.argv) > 1 else 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
