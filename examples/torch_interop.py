"""Run a small torch model's instance-norm layers through cinstnorm and compare.

A torch model (conv -> InstanceNorm2d -> ReLU -> conv -> InstanceNorm2d(affine, tracking))
runs once in training mode and once in eval mode; forward hooks capture what enters and leaves
each norm layer, and the same inputs go through cinstnorm modules made with ``from_torch``.
Arrays cross between the libraries through DLPack (no copies for CPU tensors).

    pip install torch && python examples/torch_interop.py
"""
import numpy as np
import torch

import cinstnorm as cin


def build_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.InstanceNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    )
    with torch.no_grad():  # a non-trivial affine layer
        model[4].weight.uniform_(0.5, 1.5)
        model[4].bias.uniform_(-1.0, 1.0)
    return model


def compare(model, x):
    """Largest |torch - cinstnorm| over the model's norm layers for input x."""
    captured = []
    norms = [m for m in model if isinstance(m, torch.nn.InstanceNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(
        (mod, inp[0].detach().clone(), out.detach().clone()))) for m in norms]
    twins = {id(m): cin.InstanceNorm2d.from_torch(m) for m in norms}  # state before the call
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    worst = 0.0
    for mod, inp, out in captured:
        mine = twins[id(mod)](inp)  # a torch tensor in: read through DLPack
        worst = max(worst, float(np.abs(mine - out.numpy()).max()))
        if mod.track_running_stats and mod.training:
            rm_err = np.abs(twins[id(mod)].running_mean - mod.running_mean.numpy()).max()
            worst = max(worst, float(rm_err))
    return worst


def main():
    model = build_model()
    x = torch.randn(2, 3, 32, 32) * 4 + 2
    train_err = compare(model.train(), x)
    eval_err = compare(model.eval(), x)
    print(f"max |torch - cinstnorm| train: {train_err:.2e}  eval: {eval_err:.2e}")
    back = cin.InstanceNorm2d.from_torch(model[4]).to_torch()
    same = all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 model[4].state_dict().values()))
    print(f"round trip from_torch -> to_torch keeps the state: {same}")
    return max(train_err, eval_err), same


if __name__ == "__main__":
    err, same = main()
    raise SystemExit(0 if err < 1e-4 and same else 1)
