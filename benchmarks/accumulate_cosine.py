"""Gradient cosine of accumulate_bn's modes to the large-batch gradient (not a speed test).

For seed_cnn and deep_mlp on the bundled digits (float64), at init and after 100 SGD steps,
for k micro-batches of b samples: the cosine between the parameter gradient of one
accumulated step and that of one batch-(k·b) step, for plain accumulation (torch BN updated
per micro-batch; the gradient is the same as one-update mode's), ``two-pass`` with
``stats_grad="own"`` and with ``stats_grad="micro"``.
Run: ``python benchmarks/accumulate_cosine.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from bnlab.data import load_dataset
from bnlab.models import build_model
from bnlab.nn import accumulate_bn


def _grad(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def cosines(name: str, k: int, b: int, steps: int) -> list[float]:
    data = load_dataset("digits")
    x_all, y_all = data.train.tensors[0].double(), data.train.tensors[1]
    torch.manual_seed(0)
    base = build_model(name, in_shape=(1, 8, 8)).double()
    opt = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        i = torch.randint(0, len(x_all), (64,))
        opt.zero_grad()
        F.cross_entropy(base(x_all[i]), y_all[i]).backward()
        opt.step()
    base.train()
    base.zero_grad()
    x, y = x_all[: k * b], y_all[: k * b]
    big = copy.deepcopy(base)
    F.cross_entropy(big(x), y).backward()
    reference = _grad(big)
    out = []
    for mode, stats_grad in (("one-update", "own"), ("two-pass", "own"), ("two-pass", "micro")):
        net = copy.deepcopy(base)
        with accumulate_bn(net, mode, stats_grad=stats_grad) as acc:
            if mode == "two-pass":
                acc.gather(list(x.chunk(k)))
            for xi, yi in zip(x.chunk(k), y.chunk(k), strict=True):
                (F.cross_entropy(net(xi), yi) * (len(xi) / len(x))).backward()
        out.append(float(F.cosine_similarity(_grad(net), reference, dim=0)))
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'model':<9} {'k':>2} {'b':>3} {'steps':>5}  {'micro-BN':>8} {'2p own':>8} "
          f"{'2p micro':>8}")
    for name in ("seed_cnn", "deep_mlp"):
        for k, b in ((2, 16), (4, 8), (8, 4), (4, 32)):
            for steps in (0, 100):
                c = cosines(name, k, b, steps)
                print(f"{name:<9} {k:>2} {b:>3} {steps:>5}  {c[0]:>8.4f} {c[1]:>8.4f} "
                      f"{c[2]:>8.4f}")


if __name__ == "__main__":
    main()
