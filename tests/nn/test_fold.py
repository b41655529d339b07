"""fold_bn: folded == unfolded in eval mode (float32, 1e-5) on every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlab.models import build_model
from bnlab.nn import BatchRenorm2d, GhostBatchNorm2d, fold_bn
from bnlab.nn.replace import is_batchnorm


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _check(model, x, pairs):
    model = _randomise_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model)
    assert folded.folded_pairs == pairs
    assert not folded.training
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    return folded


def _bn_count(model):
    return sum(is_batchnorm(m) for m in model.modules())


@pytest.mark.parametrize(("name", "pairs"), [("seed_cnn", 3), ("mnist_net", 3)])
def test_fold_seed_cnns(name, pairs):
    torch.manual_seed(0)
    folded = _check(build_model(name, norm="bn"), torch.randn(4, 1, 28, 28), pairs)
    assert _bn_count(folded) == 0


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = BatchRenorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.b2 = GhostBatchNorm2d(8, 4)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.bdown = nn.BatchNorm2d(16, affine=False)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.bfc = nn.BatchNorm1d(10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))  # skip connection
        x = F.relu(self.bdown(self.down(x)) + self.b3(self.c3(x)))
        return self.bfc(self.fc(x.mean((2, 3))))


def test_fold_residual_net_with_grouped_dilated_biasless_and_affine_false():
    torch.manual_seed(1)
    folded = _check(ResNet(), torch.randn(3, 3, 12, 12), 6)
    assert _bn_count(folded) == 0
    assert folded.stem.bias is not None  # bias=False conv gained the BN's shift


class Reused(nn.Module):
    """One conv module called twice: once into BN, once without."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class TwoUsers(nn.Module):
    """A conv output that feeds BN *and* a skip: must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_conv_reused_with_and_without_bn_clones_the_folded_use():
    torch.manual_seed(2)
    folded = _check(Reused(), torch.randn(2, 4, 6, 6), 1)
    assert _bn_count(folded) == 0
    model = _randomise_bn(Reused())
    again = fold_bn(model)
    # The shared module keeps its own weights; the folded use got a clone of its own.
    assert torch.equal(again.conv.weight, model.conv.weight)
    assert not hasattr(again, "bn")


def test_fold_leaves_a_conv_with_two_users_alone():
    torch.manual_seed(3)
    folded = _check(TwoUsers(), torch.randn(2, 4, 7), 0)
    assert _bn_count(folded) == 1


class WeightReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


def test_fold_changed_a_conv_whose_weight_is_read_elsewhere():
    # Regression: a conv called once but whose weight is also read directly (a get_attr node)
    # was folded in place, so the other use silently got the folded weight.
    torch.manual_seed(6)
    folded = _check(WeightReadElsewhere(), torch.randn(2, 3, 5, 5), 1)
    assert _bn_count(folded) == 0


def test_fold_conv3d_and_bn_without_running_stats():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4, track_running_stats=False),
    )
    folded = _check(model, torch.randn(3, 2, 5, 5, 5), 1)
    assert _bn_count(folded) == 1  # the BN that normalises with batch stats in eval stays


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.body(x)
        return -self.body(x)


def test_fold_untraceable_model_falls_back_to_sequential_pairs():
    torch.manual_seed(5)
    model = _randomise_bn(Untraceable())
    with pytest.warns(RuntimeWarning, match="could not trace"):
        folded = fold_bn(model)
    assert folded.folded_pairs == 1
    for sign in (1, -1):
        x = torch.rand(2, 1, 6, 6) * sign
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_rejects_non_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fold_bn(lambda x: x)
