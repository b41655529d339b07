"""FrozenBatchNorm1d/2d/3d, freeze_bn and unfreeze_bn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import (
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    freeze_bn,
    unfreeze_bn,
)

TOL = {"atol": 1e-10, "rtol": 1e-10}

CASES = [
    (FrozenBatchNorm1d, nn.BatchNorm1d, (6, 3), "1d-NC"),
    (FrozenBatchNorm1d, nn.BatchNorm1d, (6, 3, 4), "1d-NCL"),
    (FrozenBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5), "2d"),
    (FrozenBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 4), "3d"),
]


def _trained_bn(cls, shape, affine=True):
    torch.manual_seed(0)
    bn = cls(3, affine=affine).double()
    for _ in range(4):
        bn(torch.randn(shape, dtype=torch.float64) * 3 + 2)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return bn.eval()


@pytest.mark.parametrize(("ours", "theirs", "shape"), [c[:3] for c in CASES],
                         ids=[c[3] for c in CASES])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_equals_bn_eval_also_after_model_train(ours, theirs, shape, affine):
    bn = _trained_bn(theirs, shape, affine)
    frozen = ours(3, affine=affine).double()
    frozen.load_state_dict(bn.state_dict())  # torch's keys, strict
    assert set(frozen.state_dict()) == set(bn.state_dict())
    assert list(frozen.parameters()) == []
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    for mode in (False, True):
        frozen.train(mode)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(x)
        y, ref = frozen(x), bn(x)
        torch.testing.assert_close(y, ref, **TOL)
        (gx,) = torch.autograd.grad(y, x, g)
        (gr,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, gr, **TOL)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])  # forward in train mode changed nothing


def test_freeze_bn_converts_in_place_keeps_state_and_survives_train():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), BatchRenorm2d(3), nn.Flatten(),
        nn.Linear(3 * 36, 4), GhostBatchNorm1d(4, 2),
    ).double()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    model(x)
    ref = model.eval()(x)
    frozen = freeze_bn(model)
    assert frozen is model
    kinds = [type(m) for m in model]
    assert kinds[1] is FrozenBatchNorm2d and kinds[3] is FrozenBatchNorm2d
    assert kinds[6] is FrozenBatchNorm1d
    model.train()  # a hand-made .eval() freeze would be undone here; this one is not
    torch.testing.assert_close(model(x), ref, **TOL)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    unfrozen = unfreeze_bn(model)
    assert type(unfrozen[1]) is nn.BatchNorm2d and type(unfrozen[6]) is nn.BatchNorm1d
    assert unfrozen[1].weight.requires_grad
    torch.testing.assert_close(unfrozen.eval()(x), ref, **TOL)


def test_freeze_bn_without_running_stats_raises():
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_bn(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))


def test_frozen_rejects_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm2d(0)
