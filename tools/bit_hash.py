"""sha256 over the bits of many forward and backward outputs: a kernel change that claims the
same bits is checked by running this before and after it, on every SIMD path.

    python tools/bit_hash.py [--simd avx512,avx2,baseline] [--quick]

Plane lengths from 2 to 4096 (vector tails or none, small-plane batches and statistics blocks),
three (N, C) splits, float32 and float64, no activation / ReLU / LeakyReLU / SiLU / GELU, a
residual with two of them, 1 and 2 threads; the forward's y, mean and rstd, the backward's dx,
dweight and dbias with the affine weight, and dx without it.  Each path is forced with
CINSTNORM_SIMD in a process of its own; a path this CPU cannot run is reported, not hashed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

LENGTHS = (2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 48, 49, 63, 64, 65, 100, 128, 196, 255, 256,
           257, 512, 1000, 1024, 1025, 4096)
QUICK_LENGTHS = (3, 16, 64, 100)
ACTIVATIONS = (None, "relu", "leaky_relu", "silu", "gelu")


def digest(lengths) -> tuple[int, str]:
    """(outputs hashed, sha256 hex digest) on the SIMD path in use."""
    import numpy as np

    import cinstnorm as cin

    h = hashlib.sha256()
    count = 0
    rng = np.random.default_rng(1)
    for dt in ("float32", "float64"):
        for L in lengths:
            for N, C in ((1, 3), (2, 11), (3, 8)):
                x = (rng.standard_normal((N, C, L)) * 3 + 5).astype(dt)
                dy = rng.standard_normal((N, C, L)).astype(dt)
                w = (1 + 0.1 * rng.standard_normal(C)).astype(dt)
                b = (0.1 * rng.standard_normal(C)).astype(dt)
                res = rng.standard_normal((N, C, L)).astype(dt)
                for ai, act in enumerate(ACTIVATIONS):
                    for nt in (1, 2):
                        r = res if ai in (0, 2) else None
                        y, m, s = cin.instance_norm_forward(x, w, b, residual=r,
                                                            activation=act, n_threads=nt)
                        dx, dw, db = cin.instance_norm_backward(dy, x, m, s, w, b,
                                                                activation=act, n_threads=nt)
                        dx2, _, _ = cin.instance_norm_backward(dy, x, m, s, None, None,
                                                               activation=act, n_threads=nt)
                        for a in (y, m, s, dx, dw, db, dx2):
                            h.update(np.ascontiguousarray(a).tobytes())
                            count += 1
    return count, h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simd", default="avx512,avx2,baseline")
    ap.add_argument("--quick", action="store_true", help=f"plane lengths {QUICK_LENGTHS} only")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    if args.one:
        from cinstnorm import _cpu
        want = os.environ.get("CINSTNORM_SIMD", "auto")
        if want != "auto" and want not in _cpu.simd_supported():
            print(f"{want}: this CPU cannot run it")
            return 0
        count, hexdigest = digest(lengths)
        print(f"{want}: {count} outputs, sha256 {hexdigest}")
        return 0
    for path in args.simd.split(","):
        env = dict(os.environ, CINSTNORM_SIMD=path)
        cmd = [sys.executable, __file__, "--one"] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        print(out.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
