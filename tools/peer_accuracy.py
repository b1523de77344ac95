"""float32 forward accuracy of cinstnorm and its peers at a large plane mean.

    python tools/peer_accuracy.py                       # shape (2,4,64,64), mean 1e5, std 1
    python tools/peer_accuracy.py --mean 1e4 --shape 8,16,32,32

Every implementation normalizes the same float32 input (each plane: mean ``--mean``, standard
deviation ``--std``) with a random affine weight and bias; the error is the largest
|y - reference|, the reference computed in float64 by NumPy from the float32 input cast to
float64 (two passes per plane). cinstnorm, torch (``F.instance_norm``), onnxruntime and
OpenVINO (the ONNX ``InstanceNormalization`` op, as ``python -m cinstnorm bench`` runs them:
``cinstnorm._peers``) and JAX (``jnp.mean``/``jnp.var`` under ``jit``, the usual way to write it;
CPU); a peer that does not import is skipped with a line. Peers: ``pip install
"cinstnorm[peers]" torch jax jaxlib``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
from typing import Callable, Optional, Sequence

import numpy as np

EPS = 1e-5


def make_inputs(shape, mean: float, std: float, seed: int = 0):
    """(x, weight, bias), float32: x ~ N(mean, std) per element, weight in [0.5, 1.5],
    bias ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    return x, weight, bias


def reference(x, weight, bias, eps: float = EPS) -> np.ndarray:
    """float64 instance norm of ``x`` cast to float64 (two passes per plane)."""
    x64 = x.astype(np.float64)
    axes = tuple(range(2, x.ndim))
    centred = x64 - x64.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return centred * rstd * weight.astype(np.float64).reshape(shape) + bias.reshape(shape)


def cinstnorm_forward(x, weight, bias):
    import cinstnorm as cin

    return cin.instance_norm_forward(x, weight, bias, EPS)[0]


def torch_forward(x, weight, bias):
    import torch

    with torch.no_grad():
        return torch.nn.functional.instance_norm(
            torch.from_numpy(x), weight=torch.from_numpy(weight), bias=torch.from_numpy(bias),
            eps=EPS).numpy()


def _peer_forward(name):
    def forward(x, weight, bias):
        from cinstnorm import _peers

        peer = _peers.FORWARDS[name](x, weight, bias, 1, EPS)
        peer.run()
        return peer.out
    return forward


def jax_forward(x, weight, bias):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def forward(x, weight, bias):
        axes = tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.var(x, axis=axes, keepdims=True)
        return ((x - mean) * jax.lax.rsqrt(var + EPS) * weight.reshape(shape)
                + bias.reshape(shape))

    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(forward(x, weight, bias))


# (label, distribution whose version is shown, modules it needs, forward)
IMPLEMENTATIONS: tuple[tuple[str, str, tuple, Callable], ...] = (
    ("cinstnorm", "cinstnorm", ("cinstnorm",), cinstnorm_forward),
    ("torch", "torch", ("torch",), torch_forward),
    ("onnxruntime", "onnxruntime", ("onnx", "onnxruntime"), _peer_forward("onnxruntime")),
    ("OpenVINO", "openvino", ("onnx", "openvino"), _peer_forward("openvino")),
    ("JAX", "jax", ("jax", "jaxlib"), jax_forward),
)


def missing_module(modules: Sequence[str]) -> Optional[str]:
    """The first of ``modules`` that does not import, or None."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def measure(shape, mean: float, std: float, seed: int = 0) -> tuple[dict, list]:
    """({label: (version, max abs error)}, [skip line of each implementation missing])."""
    x, weight, bias = make_inputs(shape, mean, std, seed)
    expected = reference(x, weight, bias)
    errors, skipped = {}, []
    for label, dist, modules, forward in IMPLEMENTATIONS:
        missing = missing_module(modules)
        if missing is not None:
            skipped.append(f"{label}: {missing} not installed: skipped")
            continue
        y = np.asarray(forward(x, weight, bias), dtype=np.float64)
        errors[label] = (_version(dist), float(np.max(np.abs(y - expected))))
    return errors, skipped


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2,4,64,64", help="N,C,*spatial (default %(default)s)")
    parser.add_argument("--mean", type=float, default=1e5, help="plane mean (default %(default)g)")
    parser.add_argument("--std", type=float, default=1.0, help="standard deviation (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    errors, skipped = measure(shape, args.mean, args.std, args.seed)
    print(f"float32 forward, shape {shape}, plane mean {args.mean:g}, std {args.std:g}, random "
          "affine weight and bias;\nmax |y - float64 NumPy reference of the same float32 input|")
    for line in skipped:
        print(line)
    width = max([len(f"{label} {v}") for label, (v, _) in errors.items()] + [10])
    for label, (version, err) in errors.items():
        print(f"{label + ' ' + version:<{width}}  {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
