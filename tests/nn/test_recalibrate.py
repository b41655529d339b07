"""recalibrate_bn: exact population statistics, split-invariant, state restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import FrozenBatchNorm1d, GhostBatchNorm1d, recalibrate_bn

TOL = {"atol": 1e-10, "rtol": 1e-10}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 4),
        GhostBatchNorm1d(4, 8, momentum=0.3), nn.Tanh(), nn.Linear(4, 3), FrozenBatchNorm1d(3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[8].running_mean.fill_(0.25)
    return model


def _bn_inputs(model, data):
    """The input of each BN layer (1 and 5) when the whole data goes through in eval mode."""
    seen = {}
    hooks = [model[i].register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach())) for i in (1, 5)]
    model.eval()
    with torch.no_grad():
        model(data)
    for h in hooks:
        h.remove()
    return seen


def _population_stats(model, data, layerwise=True):
    """Reference, from the whole data in one batch (no merging formula).

    layerwise: each layer's statistics are set before the next layer's are measured, so
    they describe what the layer receives at inference afterwards. Otherwise every layer
    is measured in one pass with the old statistics upstream.
    """
    stats = {}
    for i in (1, 5):
        x = _bn_inputs(model, data)[i]
        stats[i] = (x.mean(0), x.var(0, unbiased=True))
        if layerwise:
            with torch.no_grad():
                model[i].running_mean.copy_(stats[i][0])
                model[i].running_var.copy_(stats[i][1])
    return stats


@pytest.mark.parametrize("batch_size", [2, 3, 7, 64])
def test_recalibration_gives_population_stats_for_any_split(batch_size):
    data = torch.randn(84, 5, dtype=torch.float64) * 3 + 1
    model = _model()
    expected = _population_stats(_model(), data)
    frozen_before = model[8].running_mean.clone()
    model.train()
    batches = [(x, torch.zeros(len(x))) for x in torch.split(data, batch_size)]
    assert recalibrate_bn(model, batches, progress=False) is model
    for i, (mean, var) in expected.items():
        torch.testing.assert_close(model[i].running_mean, mean, **TOL)
        torch.testing.assert_close(model[i].running_var, var, **TOL)
    assert torch.equal(model[8].running_mean, frozen_before)  # frozen layers are left alone
    assert all(m.training for m in model.modules())  # modes restored
    assert model[5].momentum == 0.3 and model[1].momentum == 0.1


def test_num_batches_limits_the_data():
    data = torch.randn(40, 5, dtype=torch.float64)
    model = _model()
    expected = _population_stats(_model(), data[:20])
    recalibrate_bn(model, iter(torch.split(data, 10)), num_batches=2, progress=False)
    for i, (mean, var) in expected.items():  # a generator is read once, then replayed
        torch.testing.assert_close(model[i].running_mean, mean, **TOL)
        torch.testing.assert_close(model[i].running_var, var, **TOL)


def test_layerwise_statistics_are_what_inference_sees():
    """After the default recalibration each layer's running stats equal the statistics of
    its own input at inference; the one-pass variant differs when upstream stats were stale."""
    data = torch.randn(60, 5, dtype=torch.float64) * 3 + 1
    model = recalibrate_bn(_model(), torch.split(data, 7), progress=False)
    inputs = _bn_inputs(model, data)
    for i in (1, 5):
        torch.testing.assert_close(model[i].running_mean, inputs[i].mean(0), **TOL)
        torch.testing.assert_close(model[i].running_var, inputs[i].var(0), **TOL)

    one_pass = recalibrate_bn(_model(), torch.split(data, 7), progress=False, layerwise=False)
    expected = _population_stats(_model(), data, layerwise=False)
    for i, (mean, var) in expected.items():
        torch.testing.assert_close(one_pass[i].running_mean, mean, **TOL)
        torch.testing.assert_close(one_pass[i].running_var, var, **TOL)
    stale = _bn_inputs(one_pass, data)[5]  # layer 1's stats changed after layer 5 was measured
    assert (one_pass[5].running_mean - stale.mean(0)).abs().max() > 1e-2


def test_loader_that_raises_restores_everything_and_changes_no_stats():
    model = _model()
    model.train()
    model[4].eval()  # a mix of modes must come back exactly
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loader():
        yield torch.randn(4, 5, dtype=torch.float64)
        yield torch.randn(4, 5, dtype=torch.float64)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        recalibrate_bn(model, loader(), progress=False)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.1 and model[5].momentum == 0.3
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model[1]._forward_pre_hooks and not model[5]._forward_pre_hooks


def test_model_that_raises_in_a_later_pass_puts_every_statistic_back():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fail_in_pass_two(mod, args):
        calls.append(1)
        if len(calls) > 3:  # pass 1 is three batches; pass 2 (layer 5) fails
            raise RuntimeError("out of memory")

    model[4].register_forward_pre_hook(fail_in_pass_two)
    with pytest.raises(RuntimeError, match="out of memory"):
        recalibrate_bn(model, [torch.randn(4, 5, dtype=torch.float64)] * 3, progress=False)
    for k, v in model.state_dict().items():  # layer 1, already written, is restored too
        assert torch.equal(v, state[k]), k


def test_bad_input_raises():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate_bn(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(_model(), [], progress=False)
    with pytest.raises(TypeError, match="input tensor"):
        recalibrate_bn(_model(), [{"x": 1}], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(_model(), [torch.randn(3, 5)], num_batches=0, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate_bn(_model(), [torch.randn(1, 5, dtype=torch.float64)], progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_input_layout_and_dtype_gives_the_population_stats(dtype, layout):
    """Contiguous float32/float64 inputs take torch's BN statistics kernel; channels-last
    (and other dtypes) the float64 two-pass path. Both give the population statistics: to
    1e-10 in float64, to float32 rounding in float32, on data far from zero mean."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(3)).to(dtype)
    data = torch.randn(50, 2, 9, 9, dtype=dtype) * 0.5 + 3
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        data = data.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = conv(data)
    assert feats.is_contiguous() == (layout == "contiguous")
    ref = feats.double().permute(1, 0, 2, 3).reshape(3, -1)
    recalibrate_bn(model, torch.split(data, 7), progress=False)
    tol = TOL if dtype == torch.float64 else {"atol": 0.0, "rtol": 1e-6}
    torch.testing.assert_close(model[1].running_mean.double(), ref.mean(1), **tol)
    torch.testing.assert_close(model[1].running_var.double(), ref.var(1), **tol)


class _Count(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_later_passes_stop_at_their_layer_unless_it_is_called_again():
    """Layerwise passes 2.. end the forward at their layer (nothing after it is needed),
    except for a layer the forward calls twice, which needs both calls' inputs."""
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn1 = nn.Linear(3, 4), nn.BatchNorm1d(4)
            self.b, self.bn2, self.after2 = nn.Linear(4, 4), nn.BatchNorm1d(4), _Count()
            self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4)
            self.shared, self.after3 = nn.BatchNorm1d(4), _Count()

        def forward(self, x):
            h = torch.relu(self.bn1(self.a(x)))
            h = self.after2(torch.relu(self.bn2(self.b(h))))
            return self.after3(self.shared(self.c(h)) + self.shared(self.d(h)))

    net = Net().double()
    data = torch.randn(30, 3, dtype=torch.float64) * 2 + 1
    recalibrate_bn(net, torch.split(data, 10), progress=False)
    # 3 batches: pass 1 (bn1) runs to the end, pass 2 (bn2) stops at bn2, pass 3 (shared)
    # runs to the end because the shared layer is called twice
    assert net.after2.calls == 3 + 0 + 3
    assert net.after3.calls == 3 + 0 + 3
    # every layer's statistics are its population statistics at inference, both calls of
    # the shared layer included
    seen: dict[str, list[torch.Tensor]] = {"bn1": [], "bn2": [], "shared": []}
    handles = [getattr(net, k).register_forward_pre_hook(
        lambda m, a, k=k: seen[k].append(a[0])) for k in seen]
    net.eval()
    with torch.no_grad():
        net(data)
    for h in handles:
        h.remove()
    for key, inputs in seen.items():
        x = torch.cat(inputs)
        torch.testing.assert_close(getattr(net, key).running_mean, x.mean(0), **TOL)
        torch.testing.assert_close(getattr(net, key).running_var, x.var(0), **TOL)


def test_a_layer_called_twice_in_only_some_forwards_is_never_cut_short():
    """Calls per forward, not calls per batch on average: here the layer runs twice on the
    first batch, not at all on the second and once on the third (3 calls in 3 batches), and
    every one of its inputs must count."""
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn1 = nn.Linear(3, 4), nn.BatchNorm1d(4)
            self.b, self.c, self.bn2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            h = torch.relu(self.bn1(self.a(x)))
            if len(x) == 4:  # the first batch
                return self.bn2(self.b(h)) + self.bn2(self.c(h))
            return self.bn2(self.b(h)) if len(x) == 6 else h

    net = Net().double()
    batches = [torch.randn(n, 3, dtype=torch.float64) * 2 + 1 for n in (4, 5, 6)]
    recalibrate_bn(net, batches, progress=False)
    seen: list[torch.Tensor] = []
    handle = net.bn2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net.eval()
    with torch.no_grad():
        for x in batches:
            net(x)
    handle.remove()
    assert len(seen) == 3
    inputs = torch.cat(seen)
    torch.testing.assert_close(net.bn2.running_mean, inputs.mean(0), **TOL)
    torch.testing.assert_close(net.bn2.running_var, inputs.var(0), **TOL)
