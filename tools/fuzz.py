#!/usr/bin/env python
"""Fuzz campaign for cinstnorm: random calls in worker subprocesses, crashes come back as scripts.

    python tools/fuzz.py --seconds N [--seed S] [--max-calls M] [--out DIR] [--jobs J]

The parent process starts worker subprocesses (``--worker``). A worker draws random *cases*
from a seeded generator: functional calls (``instance_norm``, ``instance_norm_forward``,
``instance_norm_backward``), module sessions (construction, forward, backward, train/eval,
zero_grad, state_dict / load_state_dict) and groups of calls made from several Python threads
at once. Inputs vary in shape (zero-size axes, one-element planes, planes large enough to be
split across threads), dtype (float16/32/64, byte-swapped, integers, bool, complex, object),
layout (sliced, transposed, negative strides, zero-stride broadcasts, read-only, memory-mapped,
unaligned, nested lists), NaN/Inf placement, eps, momentum, n_threads, ``out`` and parameter or
buffer shapes.

Before running a case the worker writes it, as JSON, to its state file. A worker that dies by a
signal (or stops making progress) leaves the case that killed it there: the parent writes a
standalone reproducer script for it to ``--out``, counts a crash (or a hang) and starts a new
worker. Inside the worker every call is checked: an exception of a documented type (TypeError,
ValueError, KeyError, RuntimeError) is expected; any other exception, a result that disagrees
with a float64 reference, an input modified by a call, or state changed by a call that raised
is a failure, written to ``--out`` as a reproducer too.

The last line printed is ``fuzz: N calls, K crashes, E expected exceptions``; the exit status is
1 on any crash, hang, unexpected exception or wrong result, else 0.

The functions between the two ``REPRODUCER`` markers below are copied verbatim into every
reproducer script, which therefore needs only numpy and cinstnorm.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings

import numpy as np

import cinstnorm as cin

# ==== REPRODUCER: everything from here to the end marker is copied into reproducer scripts ====

EXPECTED = (TypeError, ValueError, KeyError, RuntimeError)


class Failure(AssertionError):
    """A wrong result, a modified input, or state changed by a call that raised."""


class Skip(Exception):
    """An op names a result that an earlier op did not produce (it raised)."""


def build_array(spec, tmpdir):
    """The array that ``spec`` describes (values from its seed, then its memory layout)."""
    rng = np.random.default_rng(spec["seed"])
    shape = tuple(spec["shape"])
    dt = np.dtype(spec["dtype"])
    fill = spec.get("fill", "normal")
    if dt.kind == "f":
        if fill == "constant":
            vals = np.full(shape, rng.uniform(-3, 3))
        elif fill == "ones":
            vals = np.ones(shape)
        else:
            vals = rng.standard_normal(shape)
            if len(shape) >= 3 and 0 not in shape:
                lead = shape[:2] + (1,) * (len(shape) - 2)
                vals = vals * rng.uniform(0.5, 2.0, lead) + rng.uniform(-3, 3, lead)
        for index, value in spec.get("specials", []):
            if vals.size:
                vals.reshape(-1)[index % vals.size] = float(value)
        base = np.asarray(vals).astype(dt.newbyteorder("="))
    elif dt.kind in "iu":
        base = rng.integers(0, 5, shape).astype(dt)
    elif dt.kind == "b":
        base = rng.random(shape) < 0.5
    elif dt.kind == "c":
        base = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    else:
        base = np.asarray(rng.standard_normal(shape)).astype(dt)
    return with_layout(base, spec.get("layout", "C"), dt, rng, tmpdir)


def with_layout(base, layout, dt, rng, tmpdir):
    """``base``'s values in the memory layout named ``layout``."""
    nd = base.ndim
    if nd == 0:
        return base
    if layout == "F":
        return np.asfortranarray(base)
    if layout == "channels_last" and nd >= 3:
        order = (0,) + tuple(range(2, nd)) + (1,)
        return np.ascontiguousarray(base.transpose(order)).transpose(np.argsort(order))
    if layout == "transposed":
        perm = tuple(reversed(range(nd)))
        return np.ascontiguousarray(base.transpose(perm)).transpose(perm)
    if layout == "sliced":
        big = np.full(tuple(2 * s + 1 for s in base.shape), np.nan, dtype=base.dtype)
        view = big[tuple(slice(1, None, 2) for _ in base.shape)]
        view[...] = base
        return view
    if layout == "negative":
        rev = tuple(slice(None, None, -1) for _ in base.shape)
        return np.ascontiguousarray(base[rev])[rev]
    if layout in ("broadcast", "broadcast_writable") and nd >= 1:
        axis = int(rng.integers(nd))
        small = np.ascontiguousarray(np.take(base, [0], axis=axis) if base.shape[axis] else base)
        if layout == "broadcast":
            return np.broadcast_to(small, base.shape)
        strides = list(small.strides)
        strides[axis] = 0
        return np.lib.stride_tricks.as_strided(small, base.shape, strides, writeable=True)
    if layout == "readonly":
        a = base.copy()
        a.flags.writeable = False
        return a
    if layout in ("memmap_r", "memmap_c", "memmap_rw") and dt.kind != "O" and base.size:
        path = os.path.join(tmpdir, "mm_%d.bin" % rng.integers(1 << 62))
        mm = np.memmap(path, dtype=base.dtype, mode="w+", shape=base.shape)
        mm[...] = base
        mm.flush()
        del mm
        mode = {"memmap_r": "r", "memmap_c": "c", "memmap_rw": "r+"}[layout]
        return np.memmap(path, dtype=base.dtype, mode=mode, shape=base.shape)
    if layout == "byteswap" and dt.kind in "fiuc" and dt.itemsize > 1:
        return base.astype(base.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
    if layout == "unaligned" and dt.kind != "O" and base.itemsize > 1:
        raw = bytearray(base.nbytes + 1)
        a = np.frombuffer(raw, dtype=base.dtype, count=base.size, offset=1).reshape(base.shape)
        a[...] = base
        return a
    if layout == "list":
        return base.tolist()
    return base


def build(value, env, tmpdir):
    """A JSON value of a case as the Python object it stands for."""
    if isinstance(value, dict):
        if "@a" in value:
            return build_array(value["@a"], tmpdir)
        if "@ref" in value:
            if value["@ref"] not in env:
                raise Skip(value["@ref"])
            return env[value["@ref"]]
        return {k: build(v, env, tmpdir) for k, v in value.items()}
    if isinstance(value, list):
        return [build(v, env, tmpdir) for v in value]
    return value


# ---- float64 reference (SPEC.md formulas, written out again on purpose) ----

def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _param(a, x):
    """A (C,) or per-sample (N, C) parameter shaped to broadcast against x."""
    a = _f64(a)
    lead = a.shape if a.ndim == 2 else (1,) + a.shape
    return a.reshape(lead + (1,) * (x.ndim - 2))


def ref_stats(x):
    x = _f64(x)
    p = x.reshape(x.shape[0], x.shape[1], -1)
    mean = p.mean(axis=-1)
    var = ((p - mean[..., None]) ** 2).mean(axis=-1)
    return mean, var


def ref_forward(x, w, b, eps, rm=None, rv=None, use_input_stats=True):
    """y and the (N, C) mean and rstd it used."""
    x = _f64(x)
    if use_input_stats:
        mean, var = ref_stats(x)
        rstd = 1.0 / np.sqrt(var + eps)
    else:
        mean = np.broadcast_to(_f64(rm), x.shape[:2])
        rstd = np.broadcast_to(1.0 / np.sqrt(_f64(rv) + eps), x.shape[:2])
    ex = mean.shape + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(ex)) * rstd.reshape(ex)
    if w is not None:
        y = y * _param(w, x)
    if b is not None:
        y = y + _param(b, x)
    return y, mean, rstd


def ref_forward_mag(x, w, b, mean, rstd):
    """The size of the terms y is computed from: (|x| + |mean|) * rstd * |w| + |b|."""
    x = np.abs(_f64(x))
    ex = np.shape(mean) + (1,) * (x.ndim - 2)
    mag = (x + np.abs(np.reshape(mean, ex))) * np.abs(np.reshape(rstd, ex))
    if w is not None:
        mag = mag * np.abs(_param(w, x))
    if b is not None:
        mag = mag + np.abs(_param(b, x))
    return mag


def ref_running(x, rm, rv, factor):
    mean, var = ref_stats(x)
    m = int(np.prod(x.shape[2:]))
    return ((1 - factor) * _f64(rm) + factor * mean.mean(axis=0),
            (1 - factor) * _f64(rv) + factor * (var * m / (m - 1)).mean(axis=0))


def ref_backward(dy, x, mean, rstd, w, use_input_stats=True):
    """dx, dweight, dbias (float64) from (N, C) or (C,) mean and rstd; per-sample (N, C)
    gradients for an (N, C) weight."""
    x, dy = _f64(x), _f64(dy)
    n, c = x.shape[:2]
    g, p = dy.reshape(n, c, -1), x.reshape(n, c, -1)
    mean = np.broadcast_to(_f64(mean), (n, c))[..., None]
    rstd = np.broadcast_to(_f64(rstd), (n, c))[..., None]
    ww = np.broadcast_to(np.ones(c) if w is None else _f64(w), (n, c))[..., None]
    xhat = (p - mean) * rstd
    if use_input_stats:
        dx = ww * rstd * (g - g.mean(axis=-1, keepdims=True)
                          - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        dx_mag = np.abs(ww * rstd) * (np.abs(g) + np.abs(g).mean(axis=-1, keepdims=True)
                                      + np.abs(xhat) * np.abs(g * xhat).mean(axis=-1,
                                                                             keepdims=True))
    else:
        dx = g * ww * rstd
        dx_mag = np.abs(dx)
    per_sample = w is not None and np.ndim(w) == 2
    axes = 2 if per_sample else (0, 2)
    # sums of absolute values: the rounding error of a float32 sum scales with them.  For
    # sum(dy * xhat), xhat = (x - mean) * rstd is itself the rounded difference of terms as
    # large as |x| and |mean| (a constant plane: the exact xhat is 0, the reference's ~ulp), so
    # its terms count at that size.
    mags = ((np.abs(g) * (np.abs(p) + np.abs(mean)) * np.abs(rstd)).sum(axis=axes),
            np.abs(g).sum(axis=axes), dx_mag.reshape(x.shape))
    return dx.reshape(x.shape), (g * xhat).sum(axis=axes), g.sum(axis=axes), mags


def ref_adain(content, style, eps, dy=None):
    """adain's y, or with dy its (dcontent, dstyle)."""
    c, s = _f64(content), _f64(style)
    mc, vc = ref_stats(c)
    ms, vs = ref_stats(s)
    sig = np.sqrt(vs + eps)
    ex = mc.shape + (1,) * (c.ndim - 2)
    if dy is None:
        return ((c - mc.reshape(ex)) / np.sqrt(vc + eps).reshape(ex) * sig.reshape(ex)
                + ms.reshape(ex))
    dc, dsig, dmu, mags = ref_backward(dy, c, mc, 1 / np.sqrt(vc + eps), sig)
    m_s = s[0, 0].size
    exs = ms.shape + (1,) * (s.ndim - 2)
    ds = (dmu / m_s).reshape(exs) + (dsig / (m_s * sig)).reshape(exs) * (s - ms.reshape(exs))
    ds_mag = ((mags[1] / m_s).reshape(exs) + (mags[0] / (m_s * sig)).reshape(exs)
              * (np.abs(s) + np.abs(ms).reshape(exs)))
    return dc, ds, mags[2], ds_mag


TOLERANCE = {"e": (2e-3, 4e-3), "f": (1e-4, 1e-4), "d": (1e-9, 1e-9)}


def check_close(actual, expected, what, grad=False, like=(), mag=None):
    """actual ~ expected within the tolerance of the coarsest float dtype among actual and
    ``like`` (for a sum, also relative to ``mag``, the sum of the terms' absolute values);
    where expected is not finite, actual must not be finite either."""
    actual = np.asarray(actual)
    expected = np.broadcast_to(np.asarray(expected, dtype=np.float64), actual.shape)
    chars = {np.asarray(a).dtype.char for a in (actual,) + tuple(like) if a is not None}
    rtol, atol = TOLERANCE[next((c for c in "ef" if c in chars), "d")]
    if grad:
        rtol, atol = rtol * 10, atol * 10
    if mag is not None:  # rounding of the computation's own terms, whatever their size
        ulp = np.finfo({"e": np.float32, "f": np.float32}.get(
            next((c for c in "ef" if c in chars), "d"), np.float64)).eps
        atol = atol + 64 * ulp * np.nan_to_num(np.asarray(mag, dtype=np.float64), posinf=0.0)
    a = actual.astype(np.float64)
    # where the reference does not fit in the result's dtype (float16 overflow) it is +-inf too
    bad_expected = ~np.isfinite(expected.astype(actual.dtype).astype(np.float64))
    if np.any(np.isfinite(a[bad_expected])):
        raise Failure(f"{what}: finite value where the reference is NaN/Inf")
    ok = np.isclose(a, expected, rtol=rtol, atol=atol) | bad_expected
    if not ok.all():
        i = int(np.flatnonzero(~ok.reshape(-1))[0])
        raise Failure(f"{what}: element {i} is {a.reshape(-1)[i]!r}, "
                      f"reference {expected.reshape(-1)[i]!r} ({int((~ok).sum())} differ)")


def _is_float_array(a):
    if isinstance(a, list):
        a = np.asarray(a)
    return isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.dtype.itemsize <= 8


def _snap(a):
    if isinstance(a, np.ndarray) and a.dtype.kind != "O":
        return (a, a.copy())
    return None


def _unchanged(snaps, what):
    for s in snaps:
        if s is not None and not np.array_equal(s[0], s[1], equal_nan=s[1].dtype.kind in "fc"):
            raise Failure(f"{what}: an argument was modified")


def check_functional(name, args, kw, result):
    """Compare a successful functional call with the reference."""
    x = np.asarray(args[0] if name not in ("instance_norm_backward", "adain_backward")
                   else args[1])
    if x.dtype.kind != "f" or x.size == 0 or x.ndim < 3:
        return
    if name == "adain":
        ms, vs = ref_stats(args[1])
        sig = np.sqrt(vs + kw.get("eps", 1e-5))
        mc, vc = ref_stats(x)
        mag = ref_forward_mag(x, sig, np.abs(ms), mc, 1 / np.sqrt(vc + kw.get("eps", 1e-5)))
        check_close(result, ref_adain(x, args[1], kw.get("eps", 1e-5)), "adain y", like=(x,),
                    mag=mag)
        return
    if name == "adain_backward":
        dc, ds, dc_mag, ds_mag = ref_adain(x, args[2], kw.get("eps", 1e-5), dy=args[0])
        check_close(result[0], dc, "adain dcontent", grad=True, like=(x,), mag=dc_mag)
        check_close(result[1], ds, "adain dstyle", grad=True, like=(x,), mag=ds_mag)
        return
    mom = kw.get("momentum", 0.1)
    eps = kw.get("eps", 1e-5)
    w, b = kw.get("weight"), kw.get("bias")
    if name == "instance_norm":
        rm, rv = kw.get("running_mean"), kw.get("running_var")
        use = kw.get("use_input_stats", True)
        y, mean, rstd = ref_forward(x, w, b, eps, kw.get("_rm0"), kw.get("_rv0"), use)
        check_close(result, y, "instance_norm y", like=(x,),
                    mag=ref_forward_mag(x, w, b, mean, rstd))
        if rm is not None and use:
            erm, erv = ref_running(x, kw["_rm0"], kw["_rv0"], mom)
            check_close(rm, erm, "running_mean", like=(x,))
            check_close(rv, erv, "running_var", like=(x,))
    elif name == "instance_norm_forward":
        y, mean, rstd = ref_forward(x, w, b, eps)
        check_close(result[0], y, "forward y", like=(x,),
                    mag=ref_forward_mag(x, w, b, mean, rstd))
        check_close(result[1], mean, "forward mean", like=(x,))
        check_close(result[2], rstd, "forward rstd", grad=True, like=(x,))
    elif name == "instance_norm_backward":
        dy, _, mean, rstd = args[:4]
        use = kw.get("use_input_stats", True)
        dx, dw, db, mags = ref_backward(dy, x, mean, rstd, w, use)
        check_close(result[0], dx, "backward dx", grad=True, like=(x,), mag=mags[2])
        if w is not None:
            check_close(result[1], dw, "backward dweight", grad=True, like=(x,), mag=mags[0])
            check_close(result[2], db, "backward dbias", grad=True, like=(x,), mag=mags[1])


def call_functional(name, args, kw):
    """Make one functional call; check it against the reference and for side effects."""
    fn = getattr(cin, name)
    out = kw.get("out")
    rm, rv = (kw.get("running_mean"), kw.get("running_var")) if name == "instance_norm" \
        else (None, None)
    # arrays the call must leave alone: all but out and (when it succeeds) the buffers
    keep = [a for a in list(args) + [kw.get("weight"), kw.get("bias")] if a is not out]
    snaps_keep = [_snap(a) for a in keep]
    snaps_all = snaps_keep + [_snap(a) for a in (rm, rv, out)]
    rm0 = np.array(rm, dtype=np.float64) if _is_float_array(rm) else None
    rv0 = np.array(rv, dtype=np.float64) if _is_float_array(rv) else None
    # the reference sees the arguments as they were before the call (out may be one of them)
    before = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
    try:
        result = fn(*args, **kw)
    except EXPECTED:
        _unchanged(snaps_all, name + " (raised)")
        raise
    _unchanged(snaps_keep, name)
    real = dict(kw, _rm0=rm0, _rv0=rv0)
    if out is not None:
        got = result if name in ("instance_norm", "adain") else result[0]
        if got is not out:
            raise Failure(f"{name}: out= given but not returned")
    check_functional(name, before, real, result)
    return result


def module_state(m):
    """Copies of everything a failing call must leave alone."""
    arrs = {k: (None if getattr(m, k) is None else np.array(getattr(m, k), copy=True))
            for k in ("weight", "bias", "running_mean", "running_var", "weight_grad",
                      "bias_grad")}
    return arrs, m.num_batches_tracked, m.training


def check_module_state(m, before, what):
    arrs, nbt, training = before
    for k, v in arrs.items():
        now = getattr(m, k)
        if (v is None) != (now is None) or (v is not None and not np.array_equal(
                v, now, equal_nan=True)):
            raise Failure(f"{what}: {k} changed by a call that raised")
    if m.num_batches_tracked != nbt or m.training != training:
        raise Failure(f"{what}: num_batches_tracked/training changed by a call that raised")


def call_module(m, method, args, kw, saved):
    """One module method call with the module's failure and result checks."""
    before = module_state(m)
    snaps = [_snap(a) for a in args]
    try:
        result = getattr(m, method)(*args, **kw)
    except EXPECTED:
        check_module_state(m, before, f"{type(m).__name__}.{method}")
        _unchanged(snaps, method + " (raised)")
        raise
    _unchanged(snaps, method)
    if method == "forward":
        x = np.asarray(args[0])
        xb = x[None] if x.ndim == m._dims[0] else x
        saved["x"] = xb
        arrs = before[0]
        use = m.training or not m.track_running_stats
        saved["use"] = use
        if xb.size == 0:
            return result
        y, mean, rstd = ref_forward(xb, arrs["weight"], arrs["bias"], m.eps,
                                    arrs["running_mean"], arrs["running_var"], use)
        saved["mean"], saved["rstd"] = mean, rstd
        mag = ref_forward_mag(xb, arrs["weight"], arrs["bias"], mean, rstd)
        unb = x.ndim == m._dims[0]
        check_close(result, y[0] if unb else y, "module forward", like=(x,),
                    mag=mag[0] if unb else mag)
        if m.training and m.track_running_stats:
            count = before[1] + 1
            f = 1.0 / count if m.momentum is None else m.momentum
            erm, erv = ref_running(xb, arrs["running_mean"], arrs["running_var"], f)
            check_close(m.running_mean, erm, "module running_mean", like=(x,))
            check_close(m.running_var, erv, "module running_var", like=(x,))
            if m.num_batches_tracked != count:
                raise Failure("num_batches_tracked not incremented")
    elif method == "backward" and saved.get("x") is not None and saved["x"].size:
        dy = np.asarray(args[0])
        dyb = dy[None] if dy.ndim == m._dims[0] else dy
        dx, dw, db, mags = ref_backward(dyb, saved["x"], saved["mean"], saved["rstd"],
                                        before[0]["weight"], saved["use"])
        unb = dy.ndim == m._dims[0]
        check_close(result, dx[0] if unb else dx, "module dx", grad=True,
                    like=(saved["x"],), mag=mags[2][0] if unb else mags[2])
        for k, g, mag in (("weight_grad", dw, mags[0]), ("bias_grad", db, mags[1])):
            if getattr(m, k.replace("_grad", "")) is not None:
                prev = before[0][k]
                expect = g if prev is None else prev + g
                mag = mag if prev is None else mag + np.abs(prev)
                check_close(getattr(m, k), expect, k, grad=True, like=(saved["x"],), mag=mag)
    return result


def run_op(op, env, tmpdir):
    """Run one op of a case; returns (calls made, expected exceptions)."""
    kind = op["op"]
    if kind == "let":
        env[op["save"]] = build(op["value"], env, tmpdir)
        return 0, 0
    if kind == "seq":
        calls = expected = 0
        for sub in op["ops"]:
            c, e = run_op(sub, env, tmpdir)
            calls += c
            expected += e
        return calls, expected
    if kind == "threads":  # each thread runs its op with its own names
        results = [None] * len(op["ops"])

        def work(i, sub):
            try:
                results[i] = run_op(sub, {}, tmpdir)
            except BaseException as exc:  # re-raised in the calling thread
                results[i] = exc
        threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(op["ops"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return sum(r[0] for r in results), sum(r[1] for r in results)
    try:
        args = build(op.get("args", []), env, tmpdir)
        kw = build(op.get("kw", {}), env, tmpdir)
    except Skip:
        return 0, 0
    for name, target in op.get("same", {}).items():  # out=x and friends: the same object
        kw[name] = args[target] if isinstance(target, int) else kw[target]
    try:
        if kind == "new":
            result = getattr(cin, op["cls"])(*args, **kw)
            env["_saved_" + op["save"]] = {}
        elif kind == "method":
            if op["obj"] not in env:
                return 0, 0
            m = env[op["obj"]]
            if op["name"] in ("forward", "backward"):
                result = call_module(m, op["name"], args, kw, env["_saved_" + op["obj"]])
            else:
                before = module_state(m)
                try:
                    result = getattr(m, op["name"])(*args, **kw)
                except EXPECTED:
                    check_module_state(m, before, op["name"])
                    raise
        else:
            result = call_functional(kind, args, kw)
    except EXPECTED:
        return 1, 1
    if "save" in op:
        names = op["save"] if isinstance(op["save"], list) else [op["save"]]
        values = result if isinstance(op["save"], list) else [result]
        env.update(zip(names, values))
    return 1, 0


def run_case(case, tmpdir):
    """Run every op of a case in order; returns (calls, expected exceptions)."""
    env = {}
    calls = expected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            for op in case["ops"]:
                c, e = run_op(op, env, tmpdir)
                calls += c
                expected += e
    return calls, expected

# ==== REPRODUCER end ====


_REPRO_FUNCS = [Failure, Skip, build_array, with_layout, build, _f64, _param, ref_stats,
                ref_forward, ref_forward_mag, ref_running, ref_backward, ref_adain, check_close,
                _is_float_array,
                _snap, _unchanged,
                check_functional, call_functional, module_state, check_module_state,
                call_module, run_op, run_case]


def reproducer_script(case, note):
    """A standalone Python script that replays ``case`` (needs numpy and cinstnorm only)."""
    body = "\n\n".join(inspect.getsource(f) for f in _REPRO_FUNCS)
    header = textwrap.dedent('''\
        #!/usr/bin/env python
        """cinstnorm fuzz reproducer: {note}

        Run: python THIS_FILE   (a crash kills the interpreter; anything else raises)
        """
        import json
        import os
        import sys
        import tempfile
        import threading
        import warnings

        import numpy as np

        import cinstnorm as cin

        EXPECTED = (TypeError, ValueError, KeyError, RuntimeError)
        TOLERANCE = {tol!r}
        ''').format(note=note.replace('"""', "'''"), tol=TOLERANCE)
    case_json = json.dumps(case, indent=1)
    footer = textwrap.dedent('''

        CASE = json.loads(r"""{case}""")

        if __name__ == "__main__":
            cin.show_config()
            print(json.dumps(CASE))
            with tempfile.TemporaryDirectory() as tmp:
                print("calls, expected exceptions:", run_case(CASE, tmp))
            print("no crash, no failure")
        ''').replace("{case}", case_json)
    return header + "\n\n" + body + footer


# ---- random cases ----------------------------------------------------------------------------

FLOATS = ["float32", "float64", "float16"]
BAD_DTYPES = ["int32", "int64", "uint8", "bool", "complex64", "complex128", "object",
              "longdouble"]
LAYOUTS = ["C", "C", "C", "F", "channels_last", "transposed", "sliced", "negative",
           "broadcast", "broadcast_writable", "readonly", "memmap_r", "memmap_c", "memmap_rw",
           "byteswap", "unaligned", "list"]
THREADS = [None, None, 1, 2, 3, 4, -1]
BAD_THREADS = [0, -1000, 2.5, "2", True]
EPS = [1e-5, 1e-5, 0.0, 1e-3, 0.5, 10.0]
BAD_EPS = [-1.0, float("nan"), float("inf"), "x", True, None]
MOMENTUM = [0.1, 0.1, 0.0, 1.0, 0.5, -0.5, 2.0]
BAD_MOMENTUM = [float("nan"), float("inf"), "x", True]


class Gen:
    """Draws random cases (JSON-able dicts) from one seeded generator."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p):
        return bool(self.rng.random() < p)

    def seed(self):
        return int(self.rng.integers(1 << 31))

    def spatial(self, ndim):
        if ndim == 0:
            return []
        if self.chance(0.05):  # big enough to be split into chunks across threads
            return [int(self.rng.integers(8200, 20000))] + [1] * (ndim - 1)
        dims = [int(self.rng.integers(1, 7)) for _ in range(ndim)]
        r = self.rng.random()
        if r < 0.06:
            dims[int(self.rng.integers(ndim))] = 0
        elif r < 0.12:
            dims = [1] * ndim  # one-element planes
        return dims

    def shape(self, ndim=None):
        ndim = ndim if ndim is not None else self.pick([1, 2, 2, 3])
        n = self.pick([0, 1, 1, 2, 3, 4]) if self.chance(0.9) else int(self.rng.integers(5, 40))
        c = self.pick([0, 1, 2, 3, 3, 5])
        return [n, c] + self.spatial(ndim)

    def specials(self, size):
        if not self.chance(0.15) or size == 0:
            return []
        return [[int(self.rng.integers(size)), self.pick(["nan", "inf", "-inf", "1e4"])]
                for _ in range(int(self.rng.integers(1, 4)))]

    def array(self, shape, dtype=None, layout=None, fill=None):
        dtype = dtype or (self.pick(FLOATS) if self.chance(0.93) else self.pick(BAD_DTYPES))
        size = int(np.prod(shape))
        if size > 50000:
            layout = layout or self.pick(["C", "F", "sliced", "negative", "readonly"])
        return {"@a": {"shape": list(shape), "dtype": dtype, "seed": self.seed(),
                       "layout": layout or self.pick(LAYOUTS),
                       "fill": fill or ("constant" if self.chance(0.05) else "normal"),
                       "specials": self.specials(size)}}

    def per_channel(self, c, dtype=None, n=None):
        """A (C,) parameter; sometimes the wrong length, or (N, C) (per sample, valid when the
        call takes per-sample parameters and n is given)."""
        r = self.rng.random()
        if r < 0.75:
            n = c
        elif r < 0.85:
            n = c + 1
        else:
            return self.array([n if n is not None else 1, c], dtype=dtype or "float32",
                              layout=self.pick(["C", "F", "readonly"]), fill="normal")
        return self.array([n], dtype=dtype or self.pick(FLOATS + ["int64"] * 1),
                          layout=self.pick(["C", "C", "list", "negative", "readonly"]),
                          fill="normal")

    def buffer(self, c, dtype):
        r = self.rng.random()
        if r < 0.85:
            spec = self.array([c], dtype=dtype, layout="C")
        elif r < 0.9:
            spec = self.array([c + 1], dtype=dtype, layout="C")
        elif r < 0.95:
            spec = self.array([c], dtype=dtype, layout="readonly")
        else:
            spec = self.array([c], dtype=dtype, layout="list")
        spec["@a"]["specials"] = []
        return spec

    def common(self, kw, *inputs):
        if self.chance(0.9):
            kw["eps"] = self.pick(EPS)
        elif self.chance(0.5):
            kw["eps"] = self.pick(BAD_EPS)
        if self.chance(0.3):
            kw["n_threads"] = self.pick(THREADS) if self.chance(0.9) else self.pick(BAD_THREADS)
        if kw.get("eps") == 0.0:
            # eps = 0 and a constant plane is 0/0: NaN, which the float64 reference (whose mean
            # of equal values can be off by an ulp) would not reproduce
            for spec in inputs:
                spec["@a"]["fill"] = "normal"
                if spec["@a"]["layout"].startswith("broadcast"):
                    spec["@a"]["layout"] = "C"

    def out_for(self, shape, dtype, op, x_spec):
        r = self.rng.random()
        if r < 0.6:
            return
        if r < 0.75:
            target = 0 if op["op"] != "instance_norm_backward" else self.pick([0, 1])
            op["same"] = {"out": target}
            # writing in place into memory that overlaps itself has no defined result
            spec = x_spec if target == 0 and op["op"] != "instance_norm_backward" or \
                target == 1 else op["args"][0]
            if spec["@a"]["layout"] == "broadcast_writable":
                spec["@a"]["layout"] = "C"
        elif r < 0.93:
            op["kw"]["out"] = self.array(shape, dtype=dtype,
                                         layout=self.pick(["C", "C", "F", "sliced",
                                                           "unaligned", "memmap_rw"]))
        elif shape:
            bad = list(shape)
            bad[-1] += 1
            op["kw"]["out"] = self.pick([self.array(bad, dtype=dtype, layout="C"),
                                         self.array(shape, dtype="float64" if dtype !=
                                                    "float64" else "float32", layout="C"),
                                         self.array(shape, dtype=dtype, layout="readonly"),
                                         [0.0]])

    def functional(self):
        shape = self.shape() if self.chance(0.95) else self.shape(0)[:int(self.rng.integers(3))]
        x = self.array(shape)
        dtype = x["@a"]["dtype"]
        c = shape[1] if len(shape) > 1 else 1
        kw = {}
        if self.chance(0.5):
            kw["weight"] = self.per_channel(c)
        if self.chance(0.5):
            kw["bias"] = self.per_channel(c)
        r = self.rng.random()
        if r < 0.45:
            bdt = self.pick(["float32", "float64", "float64", "float16", "int64"])
            kw["running_mean"] = self.buffer(c, bdt)
            kw["running_var"] = self.buffer(c, bdt)
            kw["running_var"]["@a"]["fill"] = "ones"
        elif r < 0.5:
            kw["running_mean"] = self.buffer(c, "float32")
        if self.chance(0.3):
            kw["use_input_stats"] = False
        if self.chance(0.7):
            kw["momentum"] = (self.pick(MOMENTUM) if self.chance(0.85) else
                              self.pick(BAD_MOMENTUM + [None]))
        self.common(kw, x)
        op = {"op": "instance_norm", "args": [x], "kw": kw}
        self.out_for(shape, dtype, op, x)
        return {"ops": [op]}

    def forward_backward(self):
        shape = self.shape()
        dtype = self.pick(FLOATS) if self.chance(0.95) else self.pick(BAD_DTYPES)
        c = shape[1]
        fkw, bkw = {}, {}
        if self.chance(0.5):
            fkw["weight"] = self.per_channel(c, n=shape[0])
            bkw["weight"] = fkw["weight"] if self.chance(0.9) else self.per_channel(c)
        if self.chance(0.5):
            fkw["bias"] = self.per_channel(c, n=shape[0])
        x = self.array(shape, dtype=dtype)
        self.common(fkw, x)
        fwd = {"op": "instance_norm_forward", "args": [{"@ref": "x"}], "kw": fkw,
               "save": ["y", "mean", "rstd"]}
        self.out_for(shape, dtype, fwd, x)
        use = self.chance(0.8)
        if use:
            mean, rstd = {"@ref": "mean"}, {"@ref": "rstd"}
        else:
            stat_shape = [c] if self.chance(0.5) else shape[:2]
            mean = self.array(stat_shape, dtype=self.pick(["float32", "float64"]), layout="C")
            rstd = self.array(stat_shape, dtype=self.pick(["float32", "float64"]), layout="C",
                              fill="ones")
        dy_dtype = dtype if self.chance(0.95) else self.pick(FLOATS)
        dy_shape = shape if self.chance(0.95) else shape[:-1] + [shape[-1] + 1]
        bkw["use_input_stats"] = use
        self.common(bkw)
        bkw.pop("eps", None)
        bwd = {"op": "instance_norm_backward",
               "args": [self.array(dy_shape, dtype=dy_dtype), {"@ref": "x"}, mean, rstd],
               "kw": bkw}
        self.out_for(shape, dtype, bwd, x)
        # x is built once ("let") so that backward sees the forward's input object
        return {"ops": [{"op": "let", "value": x, "save": "x"},
                        fwd, bwd]}

    def module(self):
        dim = self.pick([1, 2, 3])
        cls = f"InstanceNorm{dim}d"
        c = self.pick([1, 2, 3, 4])
        kw = {"affine": self.chance(0.5), "track_running_stats": self.chance(0.5),
              "dtype": self.pick(["float32", "float64"])}
        if self.chance(0.3):
            kw["momentum"] = self.pick(MOMENTUM + [None])
        if self.chance(0.3):
            kw["eps"] = self.pick([1e-5, 1e-3, 0.5])
        if kw["affine"] and self.chance(0.3):
            kw["bias"] = False
        ops = [{"op": "new", "cls": cls, "args": [c], "kw": kw, "save": "m"}]
        last_shape = None
        for _ in range(int(self.rng.integers(1, 8))):
            r = self.rng.random()
            if r < 0.45:
                unbatched = self.chance(0.3)
                shape = self.shape(dim)
                if self.chance(0.85):
                    shape[1] = c
                if unbatched:
                    shape = shape[1:]
                dt = kw["dtype"] if self.chance(0.85) else self.pick(FLOATS + BAD_DTYPES[:3])
                if self.chance(0.03):
                    shape = shape[:-1]
                ops.append({"op": "method", "obj": "m", "name": "forward",
                            "args": [self.array(shape, dtype=dt)], "kw": {}})
                if self.chance(0.2):
                    ops[-1]["kw"]["n_threads"] = self.pick(THREADS + BAD_THREADS[:2])
                last_shape, last_dt = shape, dt
            elif r < 0.75:
                if last_shape is not None and self.chance(0.9):
                    shape, dt = list(last_shape), last_dt
                    if self.chance(0.1):
                        shape = [1] + shape if len(shape) == dim + 1 else shape
                else:
                    shape, dt = self.shape(dim), kw["dtype"]
                ops.append({"op": "method", "obj": "m", "name": "backward",
                            "args": [self.array(shape, dtype=dt)], "kw": {}})
            elif r < 0.82:
                ops.append({"op": "method", "obj": "m",
                            "name": self.pick(["train", "eval", "zero_grad",
                                               "reset_running_stats", "reset_parameters",
                                               "__repr__"])})
            elif r < 0.87:
                ops.append({"op": "method", "obj": "m", "name": "state_dict", "save": "sd"})
                ops.append({"op": "method", "obj": "m", "name": "load_state_dict",
                            "args": [{"@ref": "sd"}]})
            else:
                ops.append({"op": "method", "obj": "m", "name": "load_state_dict",
                            "args": [self.state_dict(c, kw)],
                            "kw": {"strict": self.chance(0.7)}})
        return {"ops": ops}

    def state_dict(self, c, kw):
        keys = []
        if kw["affine"]:
            keys.append("weight")
            if kw.get("bias", True):
                keys.append("bias")
        if kw["track_running_stats"]:
            keys += ["running_mean", "running_var"]
        sd = {}
        for k in keys:
            if self.chance(0.1):
                continue  # missing
            r = self.rng.random()
            if r < 0.8:
                sd[k] = self.array([c], dtype=self.pick(FLOATS + ["int64"]),
                                   layout=self.pick(["C", "list", "negative"]))
            elif r < 0.9:
                sd[k] = self.array([c + 1], dtype="float32", layout="C")
            else:
                sd[k] = self.array([c], dtype=self.pick(["complex64", "bool", "object"]),
                                   layout="C")
        if kw["track_running_stats"] and self.chance(0.8):
            sd["num_batches_tracked"] = self.pick([0, 3, 10**6, [1, 2], 1.5, "x",
                                                   {"@a": {"shape": [], "dtype": "int64",
                                                           "seed": 1, "layout": "C"}}])
        if self.chance(0.1):
            sd["unexpected"] = [1.0]
        return sd

    def adain(self):
        shape = self.shape()
        dtype = self.pick(FLOATS) if self.chance(0.95) else self.pick(BAD_DTYPES)
        style_shape = shape[:2] + self.spatial(len(shape) - 2)
        if self.chance(0.05):
            style_shape[1] += 1
        content = self.array(shape, dtype=dtype)
        style = self.array(style_shape, dtype=dtype if self.chance(0.95) else
                           self.pick(FLOATS))
        kw = {}
        self.common(kw, content, style)
        if self.chance(0.5):
            op = {"op": "adain", "args": [content, style], "kw": kw}
            self.out_for(shape, dtype, op, content)
            return {"ops": [op]}
        dy = self.array(shape if self.chance(0.95) else style_shape, dtype=dtype)
        return {"ops": [{"op": "adain_backward", "args": [dy, content, style], "kw": kw}]}

    def case(self):
        r = self.rng.random()
        if r < 0.4:
            return self.functional()
        if r < 0.6:
            return self.forward_backward()
        if r < 0.7:
            return self.adain()
        if r < 0.95:
            return self.module()
        subs = [self.pick([self.functional, self.forward_backward, self.adain])()["ops"]
                for _ in range(int(self.rng.integers(2, 5)))]
        # each thread gets its own functional op; forward_backward ops need their "let"
        return {"ops": [{"op": "threads", "ops": [{"op": "seq", "ops": s} for s in subs]}]}


# ---- worker ----------------------------------------------------------------------------------

def worker(args):
    """Run random cases until the deadline or the call budget; report on stdout."""
    gen = Gen(args.seed)
    state_path = args.state
    fd = os.open(state_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    problems_path = state_path + ".problems"
    calls = expected = 0
    deadline = time.monotonic() + args.seconds
    # beside the state file, in the parent's folder: the parent removes it however the
    # worker ends (a crashed or killed worker cannot)
    tmpdir = state_path + ".tmp"
    os.makedirs(tmpdir, exist_ok=True)
    cases = 0
    while time.monotonic() < deadline and calls < args.max_calls:
        case = gen.case()
        data = (json.dumps({"calls": calls, "expected": expected}) + "\n" +
                json.dumps(case) + "\n").encode()
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.ftruncate(fd, len(data))
        cases += 1
        if args.inject_crash_after is not None and cases > args.inject_crash_after:
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            c, e = run_case(case, tmpdir)
            calls += c
            expected += e
        except Exception as exc:  # an unexpected exception type or a failed check
            calls += 1
            kind = "wrong result" if isinstance(exc, Failure) else "unexpected exception"
            with open(problems_path, "a") as f:
                f.write(json.dumps({"kind": kind, "case": case,
                                    "message": "".join(traceback.format_exception_only(
                                        type(exc), exc)).strip(),
                                    "traceback": traceback.format_exc()}) + "\n")
        finally:
            for name in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, name))
    os.lseek(fd, 0, os.SEEK_SET)
    data = (json.dumps({"calls": calls, "expected": expected, "done": True}) + "\n").encode()
    os.write(fd, data)
    os.ftruncate(fd, len(data))
    os.close(fd)
    os.rmdir(tmpdir)


# ---- parent ----------------------------------------------------------------------------------

class Campaign:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.calls = self.expected = 0
        self.crashes = self.hangs = self.unexpected = self.wrong = 0
        self.reports = []
        self.seq = np.random.SeedSequence(args.seed)
        self.work = tempfile.mkdtemp(prefix="cinstnorm-fuzz-parent-")
        self.started = time.monotonic()

    def write_reproducer(self, kind, case, note):
        n = len(self.reports) + 1
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, f"repro_{n:03d}_{kind.replace(' ', '_')}.py")
        with open(path, "w") as f:
            f.write(reproducer_script(case, f"{kind}: {note}"))
        self.reports.append(path)
        print(f"fuzz: {kind}: {note}\n      reproducer: {path}", flush=True)

    def start_worker(self, seconds, max_calls):
        seed = int(self.seq.spawn(1)[0].generate_state(1)[0])
        state = os.path.join(self.work, f"worker_{seed}.state")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed),
               "--seconds", repr(seconds), "--max-calls", str(max_calls), "--state", state]
        if self.args.inject_crash_after is not None:
            cmd += ["--inject-crash-after", str(self.args.inject_crash_after)]
        # stderr to a file: a pipe nobody reads could fill up and stall the worker
        with open(state + ".stderr", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        return {"proc": proc, "state": state, "seed": seed, "progress": time.monotonic(),
                "size": None}

    @staticmethod
    def read_state(path):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return {}, None
        head = json.loads(lines[0]) if lines and lines[0].strip() else {}
        case = json.loads(lines[1]) if len(lines) > 1 and lines[1].strip() else None
        return head, case

    def finish_worker(self, w, hung=False):
        proc = w["proc"]
        proc.wait()
        with open(w["state"] + ".stderr", "rb") as f:
            err = f.read()
        os.unlink(w["state"] + ".stderr")
        head, case = self.read_state(w["state"])
        self.calls += head.get("calls", 0)
        self.expected += head.get("expected", 0)
        rc = proc.returncode
        if hung:
            self.hangs += 1
            self.calls += 1
            self.write_reproducer("hang", case, f"worker seed {w['seed']} made no progress "
                                  f"for {self.args.hang_seconds} s")
        elif rc is not None and rc < 0:
            self.crashes += 1
            self.calls += 1  # the call that crashed
            sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            self.write_reproducer("crash", case, f"worker seed {w['seed']} killed by {sig}")
        elif rc != 0 and b"Sanitizer" in err:
            # under AddressSanitizer/UBSan a fault is a sanitizer report and exit status 1
            self.crashes += 1
            self.calls += 1
            report = [line for line in err.decode(errors="replace").splitlines()
                      if "Sanitizer" in line or "runtime error" in line]
            self.write_reproducer("crash", case, f"worker seed {w['seed']}: {report[0]}")
        elif rc != 0 or not head.get("done"):
            self.unexpected += 1
            tail = err.decode(errors="replace")[-2000:]
            self.write_reproducer("worker error", case,
                                  f"worker seed {w['seed']} exited {rc}: {tail}")
        problems = w["state"] + ".problems"
        if os.path.exists(problems):
            with open(problems) as f:
                for line in f:
                    p = json.loads(line)
                    if p["kind"] == "wrong result":
                        self.wrong += 1
                    else:
                        self.unexpected += 1
                    self.write_reproducer(p["kind"], p["case"], p["message"])
                    print(textwrap.indent(p["traceback"], "      "), flush=True)
            os.unlink(problems)
        for path in (w["state"],):
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(w["state"] + ".tmp", ignore_errors=True)

    def run(self):
        args = self.args
        end = time.monotonic() + args.seconds
        running = []
        while True:
            left = end - time.monotonic()
            budget = args.max_calls - self.calls - sum(0 for _ in running)
            while len(running) < args.jobs and left > 0.5 and budget > 0:
                share = max(1, budget // args.jobs)
                running.append(self.start_worker(left, share))
            if not running:
                break
            time.sleep(0.05)
            for w in list(running):
                if w["proc"].poll() is not None:
                    running.remove(w)
                    self.finish_worker(w)
                    continue
                try:
                    st = os.stat(w["state"])
                    size = (st.st_mtime_ns, st.st_size)
                except OSError:
                    size = None
                now = time.monotonic()
                if size != w["size"]:
                    w["size"], w["progress"] = size, now
                elif now - w["progress"] > args.hang_seconds:
                    w["proc"].kill()
                    running.remove(w)
                    self.finish_worker(w, hung=True)
            if self.calls >= args.max_calls and not running:
                break
        os.rmdir(self.work) if not os.listdir(self.work) else None
        failed = self.crashes + self.hangs + self.unexpected + self.wrong
        print(f"fuzz: seed {args.seed}, {time.monotonic() - self.started:.0f} s, "
              f"{args.jobs} job(s): {self.hangs} hangs, {self.unexpected} unexpected exceptions, "
              f"{self.wrong} wrong results" +
              (f"; reproducers in {self.out}" if self.reports else ""))
        print(f"fuzz: {self.calls} calls, {self.crashes} crashes, "
              f"{self.expected} expected exceptions", flush=True)
        return 1 if failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="campaign length (default 60)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    p.add_argument("--max-calls", type=int, default=10**12, help="stop after this many calls")
    p.add_argument("--out", default="fuzz-out", help="folder for reproducers (default fuzz-out)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes at once (default 1)")
    p.add_argument("--hang-seconds", type=float, default=120.0,
                   help="a worker without progress for this long is a hang (default 120)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    # a self-test of the crash reporting: each worker kills itself (SIGSEGV) after K cases
    p.add_argument("--inject-crash-after", type=int, help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return Campaign(args).run()


if __name__ == "__main__":
    sys.exit(main())
