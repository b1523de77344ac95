"""Instance normalization of Dask arrays with cinstnorm's compiled kernels, block by block.

Every (n, c) plane must sit inside one block, so the spatial axes are rechunked to whole planes
(a no-op when they already are); blocks along N and C run the CPU kernels independently.
Running statistics reduce the per-plane statistics of all blocks (computed eagerly, since the
buffers are NumPy arrays updated in place); the normalized output stays lazy.

Requires the ``dask`` extra: ``pip install "cinstnorm[dask]"``.

Examples
--------
>>> import dask.array as da, numpy as np
>>> import cinstnorm.dask as cind
>>> x = da.random.default_rng(0).normal(3, 2, (8, 16, 64, 64), chunks=(2, 8, 64, 64))
>>> y = cind.instance_norm(x.astype(np.float32))
>>> bool(abs(float(y.mean().compute())) < 1e-4)
True
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _validation as V
from .functional import _apply, _forward, _plane_stats, _running_update

__all__ = ["instance_norm"]


def _require_dask():
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - exercised only without dask
        raise ImportError('cinstnorm.dask needs Dask: pip install "cinstnorm[dask]" '
                          '(or pip install "dask[array]")') from exc
    return da


def _channel_slice(a, block_info):
    """The part of a per-channel array that belongs to this block's channels."""
    if a is None:
        return None
    c0, c1 = block_info[0]["array-location"][1]
    return a[c0:c1]


def _normalize_block(xb, rb, weight, bias, eps, n_threads, act, slope, block_info=None):
    y, _, _, _ = _forward(xb, _channel_slice(weight, block_info),
                          _channel_slice(bias, block_info), eps, n_threads, None, rb, act,
                          slope)
    return y


def _fixed_block(xb, rb, mean, rstd, weight, bias, n_threads, act, slope, block_info=None):
    return _apply(xb, _channel_slice(mean, block_info), _channel_slice(rstd, block_info),
                  _channel_slice(weight, block_info), _channel_slice(bias, block_info), n_threads,
                  None, rb, act, slope)


def _without_residual(block_fn):
    """block_fn with rb = None (no residual array among the blocks)."""
    def fn(xb, *args, block_info=None):
        return block_fn(xb, None, *args, block_info=block_info)
    return fn


def _stats_block(xb, n_threads):
    """(n, c, 2): each plane's mean and biased variance."""
    mean, var = _plane_stats(xb, n_threads)
    return np.stack([mean, var], axis=-1).reshape(xb.shape[0], xb.shape[1], 2)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: Optional[float] = 0.1,
                  eps: float = 1e-5, *, activation: Optional[str] = None,
                  negative_slope: float = 0.01, residual=None, n_threads: Optional[int] = 1):
    """:func:`cinstnorm.instance_norm` on a Dask array, returning a Dask array.

    Parameters are those of :func:`cinstnorm.instance_norm`; ``x`` is a Dask array (or
    anything ``dask.array.asarray`` takes) of shape (N, C, *spatial), chunked along N and C
    as you like. ``n_threads`` is per block and defaults to 1: Dask's scheduler already runs
    blocks in parallel (raise it for few, large blocks).

    ``activation``/``negative_slope`` are fused as in the in-memory call; ``residual`` is a
    Dask array (or array-like) of x's shape, rechunked like x (a no-op when it already is).

    With running buffers and ``use_input_stats=True`` the per-plane statistics are computed
    now (one pass over x) and the buffers updated in place; the returned array is lazy.
    """
    da = _require_dask()
    x = da.asarray(x)
    V.check_float_dtype(x.dtype)
    V.check_batched(x)
    eps = V.check_eps(eps)
    momentum = V.check_momentum(momentum)
    N, C = x.shape[:2]
    weight = None if weight is None else np.asarray(V.check_per_channel(weight, C, "weight"))
    bias = None if bias is None else np.asarray(V.check_per_channel(bias, C, "bias"))
    tracking = V.check_running_buffers(running_mean, running_var, C, use_input_stats, momentum)
    V.check_spatial(x.shape, use_input_stats)
    act, slope = V.check_activation(activation, negative_slope)
    if residual is not None:
        residual = da.asarray(residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the input's shape {x.shape}, "
                             f"got {residual.shape}")
        if residual.dtype.kind != "f" or residual.dtype.itemsize > 8:
            raise TypeError(f"residual dtype {residual.dtype} is not supported: use a "
                            f"floating dtype")
    if x.size == 0:
        return x.copy()
    x = x.rechunk({ax: -1 for ax in range(2, x.ndim)})  # whole planes in every block
    rest = () if residual is None else (residual.rechunk(x.chunks),)
    out_dtype = x.dtype
    if not use_input_stats:
        rstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
        fixed = _fixed_block if rest else _without_residual(_fixed_block)
        return da.map_blocks(fixed, x, *rest, np.asarray(running_mean, dtype=np.float64), rstd,
                             weight, bias, n_threads, act, slope, dtype=out_dtype)
    norm = _normalize_block if rest else _without_residual(_normalize_block)
    y = da.map_blocks(norm, x, *rest, weight, bias, eps, n_threads, act, slope,
                      dtype=out_dtype)
    if tracking:
        stats = x.map_blocks(_stats_block, n_threads, drop_axis=list(range(2, x.ndim)),
                             new_axis=2, chunks=x.chunks[:2] + ((2,),),
                             dtype=np.float64).compute()
        _running_update(running_mean, running_var, stats[..., 0].ravel(), stats[..., 1].ravel(),
                        x.shape, momentum)
    return y
