"""The batch-norm family: shared checks, the one running update, the one table of kinds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bnlab.models.norms import make_norm, norm_names
from bnlab.nn import (
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
    SyncBatchNorm,
    replace_norm,
)
from bnlab.nn.kinds import BN_KINDS

MODULES: list[tuple[str, Callable[[], nn.Module]]] = [
    ("renorm", lambda: BatchRenorm2d(3)),
    ("ghost", lambda: GhostBatchNorm2d(3, 2)),
    ("sync", lambda: SyncBatchNorm(3)),
]


def _one_step(m: nn.Module) -> None:
    m(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("make", [f for _, f in MODULES], ids=[n for n, _ in MODULES])
def test_sync_leaves_num_batches_tracked_unchanged_when_a_check_raises(make):
    m = make()
    _one_step(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="channels on axis 1"):
        m(torch.randn(4, 5, 2, 2))
    m.eps = 0.0  # changed after construction: the training forward refuses it, as torch
    with pytest.raises(ValueError, match="eps must be > 0 in training"):
        m(torch.randn(4, 3, 2, 2))
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kind", list(BN_KINDS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_every_kind_of_the_table_is_a_model_norm_and_a_replace_norm_kind(kind, dim):
    spec = BN_KINDS[kind]
    cls = spec.classes[dim]
    assert kind in norm_names()
    assert type(make_norm(kind, 4, dim)) is cls
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](4)
    options = {"virtual_batch_size": 2} if kind == "ghost" else {}
    assert type(replace_norm(nn.Sequential(bn), kind, **options)[0]) is cls


def test_replace_norm_sync_converts_bnlabs_own_layers_too():
    model = replace_norm(nn.Sequential(BatchRenorm2d(3), GhostBatchNorm2d(3, 2),
                                       FrozenBatchNorm2d(3)), "sync")
    assert [type(m) for m in model] == [SyncBatchNorm] * 3


def test_ghost_model_default_comes_from_the_table():
    assert make_norm("ghost", 4, 2).virtual_batch_size == BN_KINDS["ghost"].model_defaults[
        "virtual_batch_size"]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_is_torchs_momentum_convention(momentum):
    torch.manual_seed(0)
    ours, ref = BatchRenorm2d(3, momentum=momentum, r_max=1.0, d_max=0.0), nn.BatchNorm2d(
        3, momentum=momentum)
    for step in range(3):
        x = torch.randn(5, 3, 4, 4) * (step + 1) + step
        ours(x), ref(x)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, key), getattr(ref, key), rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize(
    "make", [lambda **kw: SyncBatchNorm(**kw), lambda **kw: BatchRenorm2d(**kw),
             lambda **kw: GhostBatchNorm2d(virtual_batch_size=2, **kw),
             lambda **kw: FrozenBatchNorm2d(**kw)],
    ids=["sync", "renorm", "ghost", "frozen"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_features": 0}, "num_features must be a positive int"),
     ({"num_features": -1}, "num_features must be a positive int"),
     ({"num_features": 3, "eps": -1.0}, "eps must be > 0"),
     ({"num_features": 3, "eps": 0.0}, "eps must be > 0")],
    ids=["C0", "C-1", "eps-1", "eps0"])
def test_constructors_refuse_bad_options_with_a_clear_value_error(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize("make", [SyncBatchNorm, BatchRenorm2d,
                                  lambda c, **kw: GhostBatchNorm2d(c, 2, **kw)],
                         ids=["sync", "renorm", "ghost"])
def test_momentum_outside_0_1_is_refused(make):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        make(3, momentum=2.0)
