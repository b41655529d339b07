"""Running-stat guards: non-finite batches and batches with one value per channel."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bnlab.models.norms import make_norm
from bnlab.nn import BatchRenorm1d, BatchRenorm2d, GhostBatchNorm2d, name_bn_layers

LAYERS = [
    ("renorm", lambda: BatchRenorm2d(3)),
    ("ghost", lambda: GhostBatchNorm2d(3, 2)),
    ("ghost-one-chunk", lambda: GhostBatchNorm2d(3, 64)),
]


@pytest.mark.parametrize("make", [f for _, f in LAYERS], ids=[n for n, _ in LAYERS])
def test_nan_batch_leaves_running_stats_unchanged_and_warns_once_with_layer_name(make):
    model = name_bn_layers(nn.Sequential(nn.Identity(), make()))
    model(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.randn(4, 3, 2, 2)
    bad[2, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite batch statistics in layer 1"):
        y = model(bad)
    assert torch.isnan(y).any()  # the NaN still propagates, as with torch
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    bad[0, 0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second bad batch: no second warning
        model(bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_without_the_guard_a_nan_batch_poisons_the_stats_like_torch():
    m = BatchRenorm1d(2, skip_nonfinite=False)
    m(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert torch.isnan(m.running_mean[1]) and torch.isfinite(m.running_mean[0])


@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_batch_of_one_raises_torchs_message_with_a_hint_by_default(kind):
    m = make_norm(kind, 3, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as info:
        m(torch.randn(1, 3))
    assert "drop_last=True" in str(info.value) and "small_batch='skip'" in str(info.value)


@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_batch_of_one_trains_under_small_batch_skip(kind):
    torch.manual_seed(0)
    m = make_norm(kind, 3, 1, small_batch="skip")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 3) * 2 + 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 3)
    y = m(x)
    y.sum().backward()  # trains without error
    opt.step()
    expected = (x - before["running_mean"]) / torch.sqrt(before["running_var"] + m.eps) \
        * before["weight"] + before["bias"]
    torch.testing.assert_close(y, expected)  # normalised with the running statistics
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(m.state_dict()[key], before[key])  # and no update


def test_small_batch_skip_needs_running_stats():
    m = GhostBatchNorm2d(3, 4, track_running_stats=False, small_batch="skip")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        m(torch.randn(1, 3, 1, 1))
