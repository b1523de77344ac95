"""cinstnorm.dask: block-wise kernels on Dask arrays equal the in-memory result."""

import numpy as np
import pytest

import cinstnorm as cin

da = pytest.importorskip("dask.array")
import cinstnorm.dask as cind  # noqa: E402

from helpers import assert_close, make_affine, make_x  # noqa: E402


@pytest.mark.parametrize("chunks", [(2, 3, 5, 6), (1, 1, 3, 2), (4, 6, 5, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_scheduler_matches_in_memory(rng, chunks, dtype):
    x = make_x(rng, (4, 6, 5, 6), dtype)
    w, b = make_affine(rng, 6, dtype)
    rm, rv = rng.normal(size=6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    want = cin.instance_norm(x, rm2, rv2, w, b, momentum=0.2)
    xd = da.from_array(x, chunks=chunks)
    y = cind.instance_norm(xd, rm, rv, w, b, momentum=0.2)
    assert isinstance(y, da.Array)
    got = y.compute(scheduler="threads")
    assert_close(got, want)
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    ev = cind.instance_norm(xd, rm, rv, w, b, use_input_stats=False).compute(scheduler="threads")
    assert_close(ev, cin.instance_norm(x, rm, rv, w, b, use_input_stats=False))


def test_spatially_split_chunks_are_rechunked(rng):
    x = make_x(rng, (2, 3, 40, 50), np.float32)
    y = cind.instance_norm(da.from_array(x, chunks=(1, 1, 7, 9)))
    assert_close(y.compute(scheduler="threads"), cin.instance_norm(x))


def test_validation_before_any_compute(rng):
    xd = da.from_array(make_x(rng, (2, 3, 4, 4)), chunks=1)
    with pytest.raises(ValueError, match="Expected running_mean and running_var"):
        cind.instance_norm(xd, use_input_stats=False)
    with pytest.raises(TypeError, match="int64"):
        cind.instance_norm(da.zeros((2, 3, 4, 4), dtype=np.int64))


def test_distributed_local_cluster(rng):
    distributed = pytest.importorskip("distributed")
    x = make_x(rng, (6, 4, 16, 16), np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    want = cin.instance_norm(x, rm2, rv2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None, processes=True) as cluster, \
            distributed.Client(cluster):
        y = cind.instance_norm(da.from_array(x, chunks=(2, 2, 16, 16)), rm, rv)
        got = y.compute()
    assert_close(got, want)
    assert_close(rm, rm2)
    assert_close(rv, rv2)


@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_activation_and_residual(rng, act):
    x = make_x(rng, (4, 6, 5, 6))
    r = make_x(rng, x.shape)
    w, b = make_affine(rng, 6)
    rm, rv = rng.normal(size=6), rng.uniform(0.5, 2, 6)
    xd = da.from_array(x, chunks=(2, 3, 5, 6))
    rd = da.from_array(r, chunks=(1, 6, 5, 6))  # chunked differently: rechunked like x
    got = cind.instance_norm(xd, weight=w, bias=b, activation=act, residual=rd).compute()
    assert_close(got, cin.instance_norm(x, weight=w, bias=b, activation=act, residual=r))
    got = cind.instance_norm(xd, rm, rv, w, b, use_input_stats=False, activation=act,
                             negative_slope=0.3).compute()
    assert_close(got, cin.instance_norm(x, rm, rv, w, b, use_input_stats=False,
                                        activation=act, negative_slope=0.3))
    with pytest.raises(ValueError, match="residual"):
        cind.instance_norm(xd, residual=da.zeros((4, 6, 5)))
