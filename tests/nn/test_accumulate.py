"""accumulate_bn: one running-statistics update per step; two-pass forward = large batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlab.nn import accumulate_bn

K, B = 4, 6


class BNAct(nn.BatchNorm2d):
    """timm-style: a BN subclass that applies its activation after normalising."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _net(momentum=0.1):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), BNAct(5, momentum=momentum),
        nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6, momentum=momentum),
        nn.ReLU(), nn.Linear(6, 3),
    ).double().train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K * B, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    return x, torch.randint(0, 3, (K * B,), generator=g)


def _bns(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _grad(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _accumulate(net, x, y, mode, stats_grad="own"):
    outs, loss = [], 0.0
    with accumulate_bn(net, mode, stats_grad=stats_grad) as acc:
        if mode == "two-pass":
            acc.gather(list(x.chunk(K)))
        for xi, yi in zip(x.chunk(K), y.chunk(K), strict=True):
            out = net(xi)
            part = F.cross_entropy(out, yi) * (len(xi) / len(x))
            part.backward()
            outs.append(out.detach())
            loss += float(part.detach())
    return torch.cat(outs), loss


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_update_running_stats_equal_large_batch_bn_of_the_inputs(momentum):
    x, y = _data()
    big, net = _net(momentum), _net(momentum)
    # A batch-(k·b) BN fed, at each layer, the concatenation of what the layer received.
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: inputs.setdefault(i, []).append(
        a[0].detach())) for i, m in enumerate(_bns(net))]
    _accumulate(net, x, y, "one-update")
    for h in hooks:
        h.remove()
    for i, (ours, ref) in enumerate(zip(_bns(net), _bns(big), strict=True)):
        with torch.no_grad():
            nn.modules.batchnorm._BatchNorm.forward(ref, torch.cat(inputs[i]))
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ours, key), getattr(ref, key), atol=1e-12,
                                       rtol=0)
        assert int(ours.num_batches_tracked) == 1 == int(ref.num_batches_tracked)
    # The first BN layer receives the same inputs as in the large batch.
    big2 = _net(momentum)
    with torch.no_grad():
        big2(x)
    torch.testing.assert_close(_bns(net)[0].running_mean, _bns(big2)[0].running_mean,
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(_bns(net)[0].running_var, _bns(big2)[0].running_var,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("stats_grad", ["own", "micro"])
def test_two_pass_forward_loss_and_stats_equal_large_batch(stats_grad):
    x, y = _data()
    big, net = _net(), _net()
    out_big = big(x)
    loss_big = F.cross_entropy(out_big, y)
    loss_big.backward()
    out, loss = _accumulate(net, x, y, "two-pass", stats_grad)
    torch.testing.assert_close(out, out_big.detach(), atol=1e-9, rtol=0)
    assert abs(loss - float(loss_big.detach())) <= 1e-9
    for ours, ref in zip(_bns(net), _bns(big), strict=True):
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(ours, key), getattr(ref, key), atol=1e-12,
                                       rtol=0)
        assert int(ours.num_batches_tracked) == 1
    cos = float(F.cosine_similarity(_grad(net), _grad(big), dim=0))
    print(f"two-pass ({stats_grad}) gradient cosine to the large batch: {cos:.4f}")
    # Reported, not equal: the cross-micro-batch terms of BN's backward are missing.
    assert cos < 1 - 1e-6


def test_two_pass_own_gradient_is_the_partial_derivative_with_other_micro_batches_fixed():
    """With one micro-batch the 'own' gradient is the large batch's exactly."""
    x, y = _data()
    big, net = _net(), _net()
    F.cross_entropy(big(x), y).backward()
    with accumulate_bn(net, "two-pass") as acc:
        acc.gather([x])
        F.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(_grad(net), _grad(big), atol=1e-10, rtol=0)


def test_context_restores_module_state_and_eval_is_untouched():
    x, _ = _data()
    net = _net()
    before = copy.deepcopy(net.state_dict())
    flags = [(m.track_running_stats, m.eps, m.training) for m in _bns(net)]
    with accumulate_bn(net, "two-pass") as acc:
        acc.gather(list(x.chunk(K)))
        net.eval()
        with torch.no_grad():
            net(x)  # an eval forward inside the context is plain eval
        net.train()
        with pytest.raises(RuntimeError, match="boom"):
            h = net[3].register_forward_hook(lambda *a: (_ for _ in ()).throw(
                RuntimeError("boom")))
            try:
                net(x.chunk(K)[0])
            finally:
                h.remove()
        acc._merged = {}  # drop the step: nothing to update on exit
    assert [(m.track_running_stats, m.eps, m.training) for m in _bns(net)] == flags
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="mode must be"):
        accumulate_bn(_net(), "three-pass")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        accumulate_bn(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    from bnlab.nn import GhostBatchNorm1d

    with pytest.raises(ValueError, match="not ghost"):
        accumulate_bn(nn.Sequential(GhostBatchNorm1d(3, 4)))
    shared = nn.BatchNorm1d(3)
    twice = nn.Sequential(shared, shared).train()
    with pytest.raises(ValueError, match="more than once"), accumulate_bn(twice):
        twice(torch.randn(4, 3))
    net = _net()
    x, _ = _data()
    with pytest.raises(ValueError, match="in order"), accumulate_bn(net, "two-pass") as acc:
        acc.gather(list(x.chunk(K)))
        net(x[:3])
