"""Every compiled path against the float64 reference: each SIMD level this CPU runs, with and
without streaming (non-temporal) stores, whole-plane and chunked work splits, and outputs that
are not aligned to a vector boundary (the streaming loops peel to alignment)."""

import numpy as np
import pytest

import cinstnorm as cin
from cinstnorm import _cpu

import reference as ref
from helpers import assert_close, assert_sums_close, make_affine, make_x

SHAPES = [
    (3, 5, 7, 9),          # odd plane: scalar tails everywhere
    (2, 4, 40, 33),        # several statistics blocks per plane, whole planes
    (1, 1, 300, 301),      # one plane, chunked across threads
    (1, 3, 160, 163),      # fewer planes than chunks
]


def _misaligned_like(x):
    """A C-contiguous array of x's shape and dtype whose data starts one element past a
    vector boundary."""
    buf = np.empty(x.size + 16, x.dtype)
    offset = (-buf.ctypes.data // x.itemsize) % 16 + 1
    out = buf[offset:offset + x.size].reshape(x.shape)
    assert out.ctypes.data % 64 != 0 and out.flags.c_contiguous
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_backward_every_path(rng, simd, streaming, shape, dtype):
    x = make_x(rng, shape, dtype)
    w, b = make_affine(rng, shape[1], dtype)
    dy = make_x(rng, shape, dtype)
    y_ref, mean_ref, rstd_ref = ref.forward(x, w, b)
    for out in (None, _misaligned_like(x)):
        y, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=2, out=out)
        assert_close(y, y_ref)
        assert_close(mean, mean_ref)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=2)
    for got, want in zip((dx, dw, db), ref.backward(dy, x, mean, rstd, w)):
        assert_close(got, want, grad=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_running_stats_paths(rng, simd, streaming, shape):
    x = make_x(rng, shape, np.float32)
    w, b = make_affine(rng, shape[1], np.float32)
    rm = rng.normal(size=shape[1]).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    out = _misaligned_like(x)
    y = cin.instance_norm(x, rm, rv, w, b, use_input_stats=False, n_threads=2, out=out)
    y_ref, mean, rstd = ref.forward(x, w, b, running_mean=rm, running_var=rv,
                                    use_input_stats=False)
    assert y is out
    assert_close(y, y_ref)
    dy = make_x(rng, shape, np.float32)
    got = cin.instance_norm_backward(dy, x, rm, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5), w,
                                     use_input_stats=False, n_threads=2)
    for g, want in zip(got, ref.backward(dy, x, mean, rstd, w, use_input_stats=False)):
        assert_close(g, want, grad=True)


def test_unknown_simd_path_is_rejected():
    with pytest.raises(ValueError, match="unknown SIMD path"):
        _cpu.select_simd("sse9")


def test_simd_env_forces_baseline():
    import subprocess
    import sys
    code = "import cinstnorm, cinstnorm._cpu as c; print(c.simd_path())"
    env = dict(__import__("os").environ, CINSTNORM_SIMD="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("baseline")


# C = 5, 3: folded into 16-lane super-rows (plus leftover rows); 20: not a whole number of
# vectors; 16, 64: whole vectors.  Few samples: row blocks shared out with barriers; many small
# samples ((4, 64, ...) on one thread, the last two on two): whole samples per thread.
CL_SHAPES = [(3, 5, 7, 9), (2, 16, 40, 33), (1, 3, 300, 301), (4, 64, 9, 9), (2, 20, 13, 11),
             (8, 32, 16, 16), (8, 3, 40, 41)]


def _channels_last(a):
    perm = (0, 2, 3, 1)
    return a.transpose(perm).copy().transpose(np.argsort(perm))


@pytest.mark.parametrize("shape", CL_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_every_path(rng, simd, streaming, shape, dtype):
    x = _channels_last(make_x(rng, shape, dtype))
    dy = _channels_last(make_x(rng, shape, dtype))
    assert np.moveaxis(x, 1, -1).flags.c_contiguous and not x.flags.c_contiguous
    w, b = make_affine(rng, shape[1], dtype)
    y_ref, _, _ = ref.forward(x, w, b)
    y, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=2)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    assert_close(y, y_ref)
    # an output one element past a vector boundary: the streaming loops peel to alignment
    out = np.moveaxis(_misaligned_like(np.moveaxis(x, 1, -1)), -1, 1)
    assert cin.instance_norm_forward(x, w, b, n_threads=2, out=out)[0] is out
    assert_close(out, y_ref)
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=2)
    assert np.moveaxis(dx, 1, -1).flags.c_contiguous
    for got, want in zip((dx, dw, db), ref.backward(dy, x, mean, rstd, w)):
        assert_close(got, want, grad=True)
    assert cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=2, out=out)[0] is out
    assert_close(out, dx, grad=True)
    rm = rng.normal(size=shape[1])
    rv = rng.uniform(0.5, 2.0, shape[1])
    y = cin.instance_norm(x, rm.astype(dtype), rv.astype(dtype), w, b, use_input_stats=False)
    assert_close(y, ref.forward(x, w, b, running_mean=rm, running_var=rv,
                                use_input_stats=False)[0])
    rstd_fixed = 1.0 / np.sqrt(rv + 1e-5)
    got = cin.instance_norm_backward(dy, x, rm, rstd_fixed, w, use_input_stats=False)
    for g, want in zip(got, ref.backward(dy, x, np.broadcast_to(rm, shape[:2]),
                                         np.broadcast_to(rstd_fixed, shape[:2]), w,
                                         use_input_stats=False)):
        assert_close(g, want, grad=True)


# The channels-last sample groups: sized to the team's L2 (a group of one or two samples, several
# row blocks each, so several groups per call), to the LLC (l2 = 0: an eighth of the profile's
# LLC per group), the whole batch in one L2-sized group, and the profile's own cache sizes.
@pytest.fixture(params=["l2-one-sample", "l2-two-samples", "llc", "l2-everything", "profile"])
def cl_groups(request):
    before = _cpu.l2_bytes()
    yield request.param
    _cpu.set_l2_bytes(before)


GROUP_SHAPES = [(3, 16, 40, 33), (3, 3, 300, 301), (3, 20, 53, 51)]
# Samples per group, [forward (one array read), backward (two)], with the profile's own L2 and
# LLC, worked out by hand from the rule in _cpu._samples_per_group: a sample of s bytes (all
# arrays) that fits in the team's L2 (2 threads x L2) takes (L2 x 2 / 2) // s per group, a larger
# one (LLC / 8) // s; at least 1, at most N = 3.  Sample sizes (one array): 84,480 / 168,960 B
# (shape 0), 1,083,600 / 2,167,200 B (shape 1), 216,240 / 432,480 B (shape 2), float32 / float64.
PROFILE_GROUPS = {
    "epyc-zen3": {(0, "float32"): [3, 3], (0, "float64"): [3, 1],
                  (1, "float32"): [3, 1], (1, "float64"): [1, 1],
                  (2, "float32"): [2, 1], (2, "float64"): [1, 1]},
    "xeon-avx512": {(0, "float32"): [3, 3], (0, "float64"): [3, 3],
                    (1, "float32"): [1, 1], (1, "float64"): [1, 3],
                    (2, "float32"): [3, 3], (2, "float64"): [3, 2]},
    "small-sse2": {(0, "float32"): [3, 3], (0, "float64"): [3, 3],
                   (1, "float32"): [1, 1], (1, "float64"): [1, 1],
                   (2, "float32"): [3, 2], (2, "float64"): [2, 1]},
}
# With l2 = 0 every sample takes the LLC rule: (LLC / 8) // s.
LLC_GROUPS = {
    "epyc-zen3": {(0, "float32"): [3, 3], (0, "float64"): [3, 3],
                  (1, "float32"): [3, 1], (1, "float64"): [1, 1],
                  (2, "float32"): [3, 3], (2, "float64"): [3, 3]},
    "xeon-avx512": {key: [3, 3] for key in PROFILE_GROUPS["epyc-zen3"]},
    "small-sse2": {(0, "float32"): [3, 3], (0, "float64"): [3, 3],
                   (1, "float32"): [1, 1], (1, "float64"): [1, 1],
                   (2, "float32"): [3, 2], (2, "float64"): [2, 1]},
}


def _expected_groups(case, profile, shape_index, dtype):
    if case == "profile":
        return PROFILE_GROUPS[profile][shape_index, np.dtype(dtype).name]
    if case == "llc":
        return LLC_GROUPS[profile][shape_index, np.dtype(dtype).name]
    return {"l2-one-sample": [1, 1], "l2-two-samples": [2, 1], "l2-everything": [3, 3]}[case]


@pytest.mark.parametrize("shape_index", range(len(GROUP_SHAPES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_sample_groups(rng, machine, cl_groups, shape_index, dtype):
    shape = GROUP_SHAPES[shape_index]
    x = _channels_last(make_x(rng, shape, dtype))
    dy = _channels_last(make_x(rng, shape, dtype))
    N, C, L = shape[0], shape[1], shape[2] * shape[3]
    sample = x[0].nbytes
    if cl_groups != "profile":
        _cpu.set_l2_bytes({"l2-one-sample": sample, "l2-two-samples": 2 * sample, "llc": 0,
                           "l2-everything": 1 << 40}[cl_groups])
    # samples per group of the forward (one array read) and the backward (two): fewer samples
    # than 2 threads could take whole, so row blocks of each sample are shared out; a group's
    # share per thread takes half of that thread's L2 at most
    groups = [_cpu._ClPlan(N, L, C, x.itemsize, arrays, 2, dtype) for arrays in (1, 2)]
    assert not any(p.fused for p in groups) and all(p.n_threads == 2 for p in groups)
    assert [p.G for p in groups] == _expected_groups(cl_groups, machine["name"], shape_index,
                                                     dtype)
    assert _cpu.simd_path().startswith(machine["simd_pinned"].replace("avx512", "avx512f"))
    w, b = make_affine(rng, shape[1], dtype)
    y, mean, rstd = cin.instance_norm_forward(x, w, b, n_threads=2)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    assert_close(y, ref.forward(x, w, b)[0])
    dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, w, n_threads=2)
    want_dx, want_dw, want_db = ref.backward(dy, x, mean, rstd, w)
    assert_close(dx, want_dx, grad=True)
    # sums over 3 x 90,300 elements in shape 1: checked against the size of their terms
    dy64 = dy.astype(np.float64)
    xhat = (x - mean[..., None, None].astype(np.float64)) * rstd[..., None, None]
    assert_sums_close(dw, want_dw, np.abs(dy64 * xhat).sum(axis=(0, 2, 3)))
    assert_sums_close(db, want_db, np.abs(dy64).sum(axis=(0, 2, 3)))


# Plans that read the cache sizes, for each machine profile: whole small samples per thread
# (fused), the row-block split, and streaming stores only for outputs larger than the LLC.
@pytest.mark.parametrize("shape, dtype, fused", [
    ((64, 256, 8, 8), np.float32, True),      # tiny: 64 KiB samples, 32 per thread
    ((8, 128, 64, 64), np.float32, False),    # style: 2 MiB samples, row blocks
    ((16, 64, 128, 128), np.float32, False),  # dram: 64 MiB
    ((1, 3, 1024, 1024), np.float64, False),  # few-big: one sample, fewer than the threads
])
def test_channels_last_plans_per_profile(machine, shape, dtype, fused):
    N, C, L = shape[0], shape[1], int(np.prod(shape[2:]))
    itemsize = np.dtype(dtype).itemsize
    for arrays in (1, 2):
        plan = _cpu._ClPlan(N, L, C, itemsize, arrays, 2, dtype)
        sample = arrays * L * C * itemsize
        assert plan.n_threads == 2 and plan.fused == fused
        assert plan.stream == (N * L * C * itemsize > machine["llc"])
        assert plan.R == (1 if C >= 16 else 16 // np.gcd(C, 16))
        if fused:
            assert (plan.G, plan.k) == (N, 1)
            continue
        # the documented rule, restated: samples per group, then 2 row blocks per thread
        team_l2 = 2 * machine["l2"]
        g = (team_l2 // 2 if sample <= team_l2 else machine["llc"] // 8) // sample
        assert plan.G == min(max(g, 1), N)
        assert plan.k == min(max(-(-4 // plan.G), 1), L)


def test_compiler_flags_keep_ieee_arithmetic():
    """The kernels are built without -ffast-math or any flag that reassociates or flushes
    denormals (DESIGN.md), and with -fno-math-errno on gcc and clang: sqrt then has no errno
    branch, which kept the small-plane forward's per-plane rstd loop scalar; it changes no
    result (nothing reads errno), which the statistics below of a plane with a negative
    rounding of its variance, a NaN and an infinity check."""
    flags = _cpu.build_flags().split()
    for bad in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations",
                "-fassociative-math", "-ffinite-math-only"):
        assert bad not in flags
    if not any(f.startswith("/") for f in flags):  # not MSVC
        assert "-fno-math-errno" in flags
    x = np.full((1, 3, 4, 4), 0.1, np.float32)  # a constant plane: var 0 (m2 clamped at 0)
    x[0, 1, 0, 0] = np.nan
    x[0, 2, 0, 0] = np.inf
    y, mean, rstd = cin.instance_norm_forward(x, n_threads=1)
    assert np.all(y[0, 0] == 0) and rstd[0, 0] == np.float32(1 / np.sqrt(1e-5))
    assert np.isnan(y[0, 1]).all() and np.isnan(rstd[0, 1])
    assert np.isnan(y[0, 2]).all()


@pytest.mark.parametrize("L", [16, 64, 100, 256, 3000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_signed_zero_planes(simd, L, dtype):
    """Planes of zeros, all -0.0 or mixing signs (every other element, a half, one lane in 16):
    the sums start from their first vectors (not from 0 + x, which is x but for -0), yet mean
    and y come out +0 and rstd 1/sqrt(eps) whatever the signs, and the backward's dx,
    dweight and dbias are zeros with dweight and dbias +0, in small planes and in blocks of
    large ones, on one thread and two."""
    x = np.zeros((2, 5, L), dtype)
    x[0, 0] = -0.0
    x[0, 1, ::2] = -0.0
    x[0, 2, :L // 2] = -0.0
    x[0, 3, 1::16] = -0.0
    x[1] = -0.0
    dy = np.negative(x)  # +0 where x is -0 and -0 where it is +0
    dy[1, 2] = -0.0
    for nt in (1, 2):
        y, mean, rstd = cin.instance_norm_forward(x, n_threads=nt)
        for a in (y, mean):
            assert np.all(a == 0) and not np.any(np.signbit(a))
        np.testing.assert_array_equal(rstd, np.full_like(rstd, 1 / np.sqrt(1e-5)))
        dx, dw, db = cin.instance_norm_backward(dy, x, mean, rstd, np.ones(5, dtype),
                                                n_threads=nt)
        assert np.all(dx == 0)
        for a in (dw, db):
            assert np.all(a == 0) and not np.any(np.signbit(a))


@pytest.mark.parametrize("L", [16, 37, 64, 100, 1024])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_plane_statistics_do_not_depend_on_the_batch(rng, simd, L, dtype):
    """Small planes go through the forward in batches of CIN_SMALL_BATCH whose lane sums are
    reduced together (cin_hsum_batch, float): a plane's statistics and y are the same bits
    whichever batch it falls in, at whichever position, beside whichever planes, in a full
    batch, a short last batch or alone, and with a vector tail or not."""
    P = 21  # two full batches and a short one
    x = ((rng.standard_normal((P, L)) * rng.uniform(0.1, 10, (P, 1)))
         + rng.uniform(-1e3, 1e3, (P, 1))).astype(dtype)
    whole = cin.instance_norm_forward(x[None], n_threads=1)
    shifted = cin.instance_norm_forward(x[None, 3:], n_threads=1)  # other batch positions
    for a, b in zip(whole, shifted):
        assert np.array_equal(a[0, 3:], b[0])
    for p in (0, 7, 8, 20):
        alone = cin.instance_norm_forward(x[None, p:p + 1], n_threads=1)
        for a, b in zip(whole, alone):
            assert np.array_equal(a[0, p], b[0, 0])
    y, mean, rstd = whole  # and the statistics are the plane's own
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean[0], x64.mean(axis=1), rtol=1e-6, atol=1e-6 * 1e3)
    np.testing.assert_allclose(rstd[0], 1 / np.sqrt(x64.var(axis=1) + 1e-5), rtol=1e-4)
