"""torch's BatchNorm semantics in the core's corners, torch 2.13 the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.core import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.core.functional import batch_norm_backward, batch_norm_forward

C = 3


@pytest.mark.parametrize("shape", [(0, C, 4, 4), (4, C, 0, 2)], ids=["N0", "H0"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch_gives_empty_output_and_zero_grads_like_torch(shape, channels_last):
    ours, ref = BatchNorm2d(C, dtype=np.float64), nn.BatchNorm2d(C).double()
    ours.running_mean[...] = 0.5
    ref.running_mean.fill_(0.5)
    x = np.zeros(shape)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
    y = ours(x)
    dx = ours.backward(np.zeros_like(y))
    xt = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.zeros_like(yt))
    assert y.shape == dx.shape == tuple(yt.shape)
    assert ref.weight.grad is not None and ref.bias.grad is not None
    np.testing.assert_array_equal(ours.grads["weight"], ref.weight.grad.numpy())
    np.testing.assert_array_equal(ours.grads["bias"], ref.bias.grad.numpy())
    np.testing.assert_array_equal(ours.running_mean, ref.running_mean.numpy())
    np.testing.assert_array_equal(ours.running_var, ref.running_var.numpy())
    assert ours.num_batches_tracked == int(ref.num_batches_tracked) == 1
    assert ours.eval()(x).shape == ref.eval()(xt).shape


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_not_positive_in_training_raises_like_torch(eps):
    x = np.random.default_rng(0).normal(size=(4, C))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be"):  # "> 0 in training" or ">= 0"
        batch_norm_forward(x, None, None, eps=eps, training=True)
    if eps == 0.0:  # the layer is built with eps = 0, as torch allows, and refuses to train
        layer = BatchNorm1d(C, eps=eps, dtype=np.float64)
        with pytest.raises(ValueError, match="eps must be > 0 in training"):
            layer(x)
        assert layer.num_batches_tracked == 0
        # eval with running statistics accepts eps = 0, as torch's does
        ref = nn.BatchNorm1d(C, eps=eps).double().eval()
        np.testing.assert_allclose(layer.eval()(x), ref(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("ours", "theirs", "shape"), [
    (BatchNorm1d, nn.BatchNorm1d, (6, C)),
    (BatchNorm2d, nn.BatchNorm2d, (4, C, 3, 3)),
    (BatchNorm3d, nn.BatchNorm3d, (2, C, 2, 3, 3)),
], ids=["1d", "2d", "3d"])
def test_reset_running_stats_like_torch(ours, theirs, shape):
    a, b = ours(C, dtype=np.float64), theirs(C).double()
    x = np.random.default_rng(1).normal(2.0, 3.0, size=shape)
    for _ in range(2):
        a(x)
        b(torch.from_numpy(x))
    running_mean = a.running_mean
    a.reset_running_stats()
    b.reset_running_stats()
    assert a.running_mean is running_mean, "reset in place (references stay valid)"
    np.testing.assert_array_equal(a.running_mean, b.running_mean.numpy())
    np.testing.assert_array_equal(a.running_var, b.running_var.numpy())
    assert a.num_batches_tracked == int(b.num_batches_tracked) == 0
    untracked = ours(C, track_running_stats=False)
    untracked.reset_running_stats()  # nothing to reset, as torch
    assert untracked.running_mean is None


def test_functional_empty_batch_backward_gives_zero_weight_grads():
    x = np.zeros((0, C, 5))
    w, b = np.ones(C), np.zeros(C)
    y, cache = batch_norm_forward(x, w, b, eps=1e-5, training=True)
    dx, dw, db = batch_norm_backward(np.zeros_like(y), cache)
    assert y.shape == dx.shape == (0, C, 5) and cache.count == 0
    assert dw is not None and db is not None
    np.testing.assert_array_equal(dw, np.zeros(C))
    np.testing.assert_array_equal(db, np.zeros(C))
