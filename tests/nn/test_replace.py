"""replace_norm: every BN to another kind, state carried over."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
    SyncBatchNorm,
    replace_norm,
)


def _model():
    torch.manual_seed(0)
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), shared, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), shared,
        nn.Flatten(), nn.Linear(4 * 36, 5), nn.BatchNorm1d(5, momentum=0.3),
    )
    model(torch.randn(8, 1, 8, 8))
    with torch.no_grad():
        for m in (shared, model[7]):
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize(
    ("kind", "kwargs", "cls2d"),
    [("renorm", {"r_max": 2.0}, BatchRenorm2d), ("ghost", {"virtual_batch_size": 4},
     GhostBatchNorm2d), ("frozen", {}, FrozenBatchNorm2d), ("sync", {}, SyncBatchNorm)],
)
def test_replace_norm_carries_state_and_eval_output(kind, kwargs, cls2d):
    model = _model().eval()
    x = torch.randn(3, 1, 8, 8)
    ref = model(x)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    out = replace_norm(model, kind, **kwargs)
    assert out is model
    assert type(model[1]) is cls2d
    assert model[1] is model[4]  # a shared layer stays shared
    assert not model[1].training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, old[k], atol=0, rtol=0)
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)
    if kind == "renorm":
        assert model[1].r_max == 2.0 and model[7].momentum == 0.3
        assert model[1].layer_name == "1"  # named for warnings


def test_replace_norm_back_to_torch_and_top_level_layer():
    renorm = replace_norm(nn.BatchNorm1d(3), "renorm")
    assert type(renorm) is BatchRenorm1d
    back = replace_norm(nn.Sequential(renorm), "bn")
    assert type(back[0]) is nn.BatchNorm1d


def test_replace_norm_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        replace_norm(_model(), "layer")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        replace_norm(_model(), "ghost")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        replace_norm("model", "renorm")
