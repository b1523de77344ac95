"""Per-call latency of small cinstnorm calls against onnxruntime's io-binding path.

    python tools/small_calls.py [--threads 2] [--rounds 41] [--calls 300] [--baseline NAME]

For each shape and dtype: ``instance_norm_forward`` (weight and bias), ``instance_norm``
(weight and bias), ``instance_norm_backward`` (weight), an ``InstanceNorm2d(affine=True)``
forward + backward pair, and, for float32, a one-node ONNX ``InstanceNormalization`` model run
through ``sess.io_binding()`` with the input bound from NumPy and the output bound to a
preallocated OrtValue (onnxruntime's CPU provider has no float64 InstanceNormalization).
Each round times ``--calls`` calls of every variant back to back, in turn; the table shows the
median microseconds per call over the rounds, so every column met the same machine load.

--baseline NAME adds the same calls of another build of cinstnorm, importable as package NAME
(a copy of an older build's ``cinstnorm`` directory, .so included, renamed to NAME and put on
PYTHONPATH), as "before" columns timed in the same rounds.  This package is imported first:
both extensions call themselves ``cinstnorm._cpu``, and each package keeps the one it imported.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import numpy as np

import cinstnorm as cin

SHAPES = ((2, 3, 8, 8), (1, 64, 16, 16))
EPS = 1e-5


def ort_session(shape, threads: int):
    """(run, y): run() writes InstanceNormalization(x) into y through an io binding."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    C = shape[1]
    node = helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["y"], epsilon=EPS)
    graph = helper.make_graph(
        [node], "in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor("scale", TensorProto.FLOAT, [C], np.linspace(0.5, 1.5, C).tolist()),
         helper.make_tensor("bias", TensorProto.FLOAT, [C], np.linspace(-1, 1, C).tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = ort.OrtValue.ortvalue_from_numpy(np.empty(shape, np.float32))
    binding = sess.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_ortvalue_output("y", y)

    def run():
        sess.run_with_iobinding(binding)
    return run


def variants(shape, dtype, threads: int, cin=cin, tag=""):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = np.linspace(0.5, 1.5, C).astype(dtype)
    b = np.linspace(-1, 1, C).astype(dtype)
    out = np.empty_like(x)
    _, mean, rstd = cin.instance_norm_forward(x, w, b)
    m = cin.InstanceNorm2d(C, affine=True, dtype=dtype)
    fns = {
        tag + "forward": lambda: cin.instance_norm_forward(x, w, b, n_threads=threads),
        tag + "forward out=": lambda: cin.instance_norm_forward(x, w, b, n_threads=threads,
                                                                out=out),
        tag + "instance_norm": lambda: cin.instance_norm(x, weight=w, bias=b,
                                                         n_threads=threads),
        tag + "backward": lambda: cin.instance_norm_backward(dy, x, mean, rstd, w,
                                                             n_threads=threads),
        tag + "module fwd+bwd": lambda: (m(x, n_threads=threads),
                                         m.backward(dy, n_threads=threads)),
    }
    if dtype == "float32" and not tag:
        for t in sorted({1, threads}):
            fns[f"ort io-binding ({t}t)"] = ort_session(shape, t)
    return fns


def measure(fns: dict, rounds: int, calls: int) -> dict:
    samples = {k: [] for k in fns}
    for f in fns.values():  # warm up
        for _ in range(calls // 10 + 1):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            samples[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--baseline", metavar="NAME", help="another build, as package NAME")
    args = ap.parse_args(argv)
    base = importlib.import_module(args.baseline) if args.baseline else None
    print(f"median us per call over {args.rounds} rounds of {args.calls} calls, "
          f"n_threads={args.threads}")
    rows = []
    for shape in SHAPES:
        for dtype in ("float32", "float64"):
            fns = variants(shape, dtype, args.threads)
            if base is not None:
                fns.update(variants(shape, dtype, args.threads, base, "before "))
            us = measure(fns, args.rounds, args.calls)
            rows.append((f"{shape} {dtype}", us))
    keys = []
    for _, us in rows:
        keys += [k for k in us if k not in keys]
    print("| case | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for label, us in rows:
        print(f"| {label} | " + " | ".join(f"{us[k]:.1f}" if k in us else "-" for k in keys)
              + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
