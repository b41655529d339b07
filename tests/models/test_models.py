"""Model shapes, parameter counts, norm placement, the registry, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.errors import BnlabError
from bnlab.models import MODELS, build_model, count_params, scale_init

SHAPES = [((1, 28, 28), 10), ((1, 8, 8), 10), ((3, 12, 16), 7)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("in_shape,classes", SHAPES, ids=["mnist", "digits", "odd"])
@pytest.mark.parametrize("norm", ["bn", "none", "gn"])
def test_output_shape(name: str, in_shape: tuple, classes: int, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, norm=norm, in_shape=in_shape, num_classes=classes)
    out = model(torch.randn(4, *in_shape))
    assert out.shape == (4, classes)
    assert torch.isfinite(out).all()


def test_seed_cnn_param_count_and_flat_size() -> None:
    m = build_model("seed_cnn")
    assert m.flat_features == 64 * 7 * 7
    conv = (1 * 9 + 1) * 32 + (32 * 9 + 1) * 64
    fc = (64 * 7 * 7 + 1) * 128 + (128 + 1) * 10
    bn = 2 * (32 + 64 + 128)
    assert count_params(m) == conv + fc + bn == 422_090
    assert count_params(build_model("seed_cnn", norm="none")) == conv + fc
    assert build_model("seed_cnn", in_shape=(1, 8, 8)).flat_features == 64 * 2 * 2


def test_mnist_net_matches_seed_9216() -> None:
    m = build_model("mnist_net")
    assert m.flat_features == 9216
    assert count_params(m) == (9 + 1) * 32 + (288 + 1) * 64 + (9216 + 1) * 128 + 129 * 10 + 448


def test_paper_mlp_layers_and_hook_point() -> None:
    m = build_model("paper_mlp")
    for name in ("hidden1", "hidden2", "hidden3"):
        block = getattr(m, name)
        assert isinstance(block.norm, nn.BatchNorm1d) and isinstance(block.act, nn.Sigmoid)
        assert block.layer.out_features == 100
    seen = []
    m.hidden3.act.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(16, 1, 28, 28)
    m(x)
    h2 = m.hidden2(m.hidden1(torch.flatten(x, 1)))
    expected = m.hidden3.norm(m.hidden3.layer(h2))  # BN before the sigmoid
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_placement_order(placement: str) -> None:
    torch.manual_seed(0)
    m = build_model("deep_mlp", placement=placement, depth=1, width=8, in_shape=(1, 2, 2))
    block = m.blocks[0]
    x = torch.randn(32, 4)
    z = block.layer(x)
    expected = (torch.relu(block.norm(z)) if placement == "before"
                else block.norm(torch.relu(z)))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    if placement == "before":
        assert (block(x) >= 0).all()
    else:  # BN after ReLU re-centres: negative outputs appear
        assert (block(x) < 0).any()


def test_norm_none_has_no_norm_layers() -> None:
    for name in MODELS:
        m = build_model(name, norm="none")
        assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
        assert any(isinstance(x, nn.modules.batchnorm._BatchNorm)
                   for x in build_model(name).modules())


def test_norm_kwargs_reach_every_norm() -> None:
    m = build_model("seed_cnn", norm_kwargs={"momentum": 0.01})
    bns = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(b.momentum == 0.01 for b in bns)


def test_dropout_and_depth_options() -> None:
    assert build_model("seed_cnn", dropout=0.5).dropout.p == 0.5
    assert build_model("deep_mlp", dropout=0.3).dropout.p == 0.3
    assert len(build_model("deep_mlp", depth=16, width=32).blocks) == 16
    assert len(build_model("deep_cnn", depth=5, width=8).blocks) == 5


def test_scale_init_multiplies_weights_only() -> None:
    torch.manual_seed(0)
    a = build_model("seed_cnn")
    b = build_model("seed_cnn")
    b.load_state_dict(a.state_dict())
    scale_init(b, 10.0)
    torch.testing.assert_close(b.conv1.layer.weight, 10 * a.conv1.layer.weight)
    torch.testing.assert_close(b.fc2.weight, 10 * a.fc2.weight)
    torch.testing.assert_close(b.fc2.bias, a.fc2.bias)
    torch.testing.assert_close(b.conv1.norm.weight, a.conv1.norm.weight)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "resnet"}, "unknown model 'resnet'.*seed_cnn, mnist_net, paper_mlp"),
    ({"name": "seed_cnn", "norm": "xx"}, "unknown norm 'xx'.*none, bn"),
    ({"name": "seed_cnn", "placement": "middle"}, "placement 'middle'.*before, after"),
    ({"name": "seed_cnn", "depth": 3}, "does not take depth.*dropout=0.0"),
    ({"name": "seed_cnn", "in_shape": (1, 2, 2)}, "at least 4x4"),
    ({"name": "deep_mlp", "depth": 0}, "depth and width must be >= 1"),
])
def test_bad_input(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(BnlabError, match=match):
        build_model(name, **kwargs)


@pytest.mark.parametrize("groups", [0, -1])
def test_gn_groups_below_one_raised_zero_division(groups: int) -> None:
    """``groups=0`` divided by zero (a traceback); it is a clear error now."""
    with pytest.raises(BnlabError, match="groups must be a whole number >= 1"):
        build_model("seed_cnn", norm="gn", norm_kwargs={"groups": groups})
