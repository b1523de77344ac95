"""from_torch / to_torch, DLPack exchange, and the examples/torch_interop.py walk-through."""

import pathlib
import runpy

import numpy as np
import pytest

import cinstnorm as cin

CLASSES = {1: cin.InstanceNorm1d, 2: cin.InstanceNorm2d, 3: cin.InstanceNorm3d}
SHAPES = {1: (2, 3, 11), 2: (2, 3, 5, 6), 3: (2, 3, 3, 4, 5)}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine, bias, tracking", [(False, True, False), (True, True, True),
                                                    (True, False, True), (False, True, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_reproduces_torch(torch, rng, dim, affine, bias, tracking, dtype):
    tcls = getattr(torch.nn, f"InstanceNorm{dim}d")
    tm = tcls(3, affine=affine, bias=bias, track_running_stats=tracking, momentum=0.3,
              dtype=getattr(torch, dtype))
    x = rng.normal(2.0, 3.0, SHAPES[dim]).astype(dtype)
    with torch.no_grad():
        if affine:
            tm.weight.uniform_(0.5, 1.5)
            if bias:
                tm.bias.uniform_(-1, 1)
        tm(torch.from_numpy(x))  # move the running stats away from their defaults
    m = CLASSES[dim].from_torch(tm, dtype=None if affine or tracking else dtype)
    assert m.dtype == dtype
    assert repr(m) == repr(tm)
    for mode in ("train", "eval"):
        getattr(tm, mode)()
        getattr(m, mode)()
        with torch.no_grad():
            want = tm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)
    back = m.to_torch()
    assert type(back) is tcls and back.training == m.training and repr(back) == repr(m)
    mine = m.state_dict()
    assert list(back.state_dict()) == list(mine) == list(tm.state_dict())
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), mine[k], err_msg=k)
        if k != "num_batches_tracked":  # torch's InstanceNorm never counts (SPEC difference 1)
            # both libraries took the same training step: equal up to rounding
            np.testing.assert_allclose(v.numpy(), tm.state_dict()[k].numpy(), rtol=1e-5,
                                       err_msg=k)


def test_tensor_inputs_go_through_dlpack(torch, rng):
    x = torch.from_numpy(rng.normal(size=(2, 3, 4, 5)))
    x.requires_grad_(True)
    y = cin.instance_norm(x)  # requires_grad tensor: detached, no copy
    assert isinstance(y, np.ndarray)
    with torch.no_grad():
        want = torch.nn.functional.instance_norm(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


def test_example_script_runs(torch):
    path = pathlib.Path(__file__).parents[1] / "examples" / "torch_interop.py"
    ns = runpy.run_path(str(path))
    err, same = ns["main"]()
    assert err < 1e-4 and same
