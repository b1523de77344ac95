"""cinstnorm against torch CPU, paired: backward, forward + backward, forward.

    python tools/torch_pairs.py [--shapes tiny,style] [--dtype float32] [--rounds 11]
                                [--threads 2]

The bench's inputs and torch closures (``cinstnorm._bench``), both libraries on --threads
threads; the six calls are timed in alternating samples of about 10 ms, and each ratio is the
median over the rounds of torch's sample time over cinstnorm's (> 1: cinstnorm is faster).
cinstnorm's backward uses saved statistics and the affine weight, torch's is autograd's
backward of a graph built once.
"""
from __future__ import annotations

import argparse
import statistics

import cinstnorm as cin
from cinstnorm._bench import SHAPES, interleaved_samples, make_inputs, torch_closures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    nt = args.threads
    print("| case | cin bwd ms | torch/cin bwd | cin fwd+bwd ms | torch/cin fwd+bwd | "
          "torch/cin fwd |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        for dt in args.dtype.split(","):
            x, dy, w, b = make_inputs(name, dt)
            _, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=nt)

            def cin_fb():
                _, m, r = cin.instance_norm_forward(x, w, b, n_threads=nt)
                cin.instance_norm_backward(dy, x, m, r, w, n_threads=nt)
            t = torch_closures(torch, *(torch.from_numpy(a) for a in (x, dy, w, b)))
            fns = {"cb": lambda: cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=nt),
                   "tb": t["torch_backward"], "cfb": cin_fb, "tfb": t["torch_forward_backward"],
                   "cf": lambda: cin.instance_norm_forward(x, w, b, n_threads=nt),
                   "tf": t["torch_forward"]}
            s = interleaved_samples(fns, args.rounds, min_seconds=10e-3)

            def ratio(a, c):
                return statistics.median(p / q for p, q in zip(s[a], s[c]))
            print(f"| {name} {dt} | {statistics.median(s['cb']) * 1e3:.3f} | "
                  f"{ratio('tb', 'cb'):.2f} | {statistics.median(s['cfb']) * 1e3:.3f} | "
                  f"{ratio('tfb', 'cfb'):.2f} | {ratio('tf', 'cf'):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
