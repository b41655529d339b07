"""The minimal layers, loss and SGD against torch, and the MLP twin trained side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.core as core


def _to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def test_mlp_twin_trains_like_torch_for_20_sgd_steps() -> None:
    """784-100-100-10 with BatchNorm1d, same init and batches: losses agree to 1e-9."""
    torch.manual_seed(0)
    theirs = nn.Sequential(
        nn.Linear(784, 100), nn.BatchNorm1d(100), nn.ReLU(),
        nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(),
        nn.Linear(100, 10),
    ).double()
    ours = core.Sequential(
        core.Linear(784, 100, dtype=np.float64), core.BatchNorm1d(100, dtype=np.float64),
        core.ReLU(),
        core.Linear(100, 100, dtype=np.float64), core.BatchNorm1d(100, dtype=np.float64),
        core.ReLU(),
        core.Linear(100, 10, dtype=np.float64),
    )
    ours.load_state_dict(theirs.state_dict())
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_o = core.SGD(ours, lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.random((32, 784))
        labels = rng.integers(0, 10, 32)
        opt_t.zero_grad()
        loss_t = loss_fn(theirs(torch.from_numpy(x)), torch.from_numpy(labels))
        loss_t.backward()
        opt_t.step()
        opt_o.zero_grad()
        loss_o, dlogits = core.softmax_cross_entropy(ours(x), labels)
        ours.backward(dlogits)
        opt_o.step()
        assert abs(loss_o - loss_t.item()) <= 1e-9
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), rtol=1e-9, atol=1e-12)
    theirs.eval()
    ours.eval()
    x = rng.random((16, 784))
    np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-9, atol=1e-12)


def test_paper_mlp_sigmoid_inputs_are_recorded() -> None:
    model = core.Sequential(core.Linear(6, 4, rng=0), core.BatchNorm1d(4), core.Sigmoid(),
                            core.Linear(4, 2, rng=1))
    x = np.random.default_rng(0).random((8, 6)).astype(np.float32)
    y = model(x, record=True)
    assert len(model.outputs) == 4
    np.testing.assert_array_equal(model.outputs[-1], y)
    pre = model.outputs[1]  # the sigmoid's input, normalised over the batch
    np.testing.assert_allclose(pre.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_array_equal(model.outputs[2], core.Sigmoid()(pre))


@pytest.mark.parametrize("layer_name", ["ReLU", "Sigmoid"])
def test_activations_match_torch(layer_name: str) -> None:
    x = np.random.default_rng(0).normal(0, 20, (7, 5))
    x[0, 0] = 0.0
    dy = np.random.default_rng(1).normal(size=x.shape)
    ours = getattr(core, layer_name)()
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = getattr(nn, layer_name)()(tx)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(ours(x), ty.detach().numpy(), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=1e-14, atol=1e-300)


def test_linear_matches_torch_and_its_init_bounds() -> None:
    torch.manual_seed(0)
    theirs = nn.Linear(5, 3).double()
    ours = core.Linear(5, 3, dtype=np.float64)
    ours.load_state_dict(theirs.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 4, 5))
    dy = np.random.default_rng(1).normal(size=(2, 4, 3))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = theirs(tx)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(ours(x), ty.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=1e-13)
    np.testing.assert_allclose(ours.grads["weight"], theirs.weight.grad.numpy(), rtol=1e-13)
    np.testing.assert_allclose(ours.grads["bias"], theirs.bias.grad.numpy(), rtol=1e-13)
    # torch's init: both weight and bias uniform in ±1/sqrt(fan_in), spread over the range.
    big = core.Linear(400, 300, rng=0)
    bound = 1 / np.sqrt(400)
    assert np.abs(big.weight).max() <= bound
    assert np.abs(big.weight).max() > 0.99 * bound
    assert abs(big.weight.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert np.abs(big.bias).max() <= bound
    np.testing.assert_array_equal(core.Linear(4, 2, rng=7).weight, core.Linear(4, 2, rng=7).weight)


def test_dropout_is_seeded_scaled_and_identity_in_eval() -> None:
    x = np.ones((200, 50))
    a, b = core.Dropout(0.3, rng=5), core.Dropout(0.3, rng=5)
    ya = a(x)
    np.testing.assert_array_equal(ya, b(x))
    assert set(np.unique(ya)) == {0.0, 1 / 0.7}
    assert abs((ya == 0).mean() - 0.3) < 0.02
    np.testing.assert_array_equal(a.backward(np.full_like(x, 2.0)), 2.0 * ya)
    a.eval()
    np.testing.assert_array_equal(a(x), x)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        core.Dropout(1.5, rng=0)


def test_softmax_cross_entropy_matches_torch() -> None:
    logits = np.random.default_rng(0).normal(0, 30, (9, 4))
    labels = np.random.default_rng(1).integers(0, 4, 9)
    tl = torch.from_numpy(logits).requires_grad_(True)
    loss_t = nn.functional.cross_entropy(tl, torch.from_numpy(labels))
    loss_t.backward()
    loss, dlogits = core.softmax_cross_entropy(logits, labels)
    assert abs(loss - loss_t.item()) <= 1e-12 * abs(loss_t.item())
    np.testing.assert_allclose(dlogits, tl.grad.numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        core.softmax_cross_entropy(logits, labels + 1)
    with pytest.raises(TypeError, match="labels must be integers"):
        core.softmax_cross_entropy(logits, labels.astype(float))


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)])
def test_sgd_matches_torch(momentum: float, weight_decay: float) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4))
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt_t = torch.optim.SGD([tp], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    layer = core.Linear(4, 3, bias=False, dtype=np.float64)
    layer.weight[...] = p0
    opt = core.SGD([layer], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for _ in range(4):
        g = rng.normal(size=(3, 4))
        tp.grad = torch.from_numpy(g.copy())
        opt_t.step()
        layer.grads = {"weight": g}
        opt.step()
    np.testing.assert_allclose(layer.weight, tp.detach().numpy(), rtol=1e-14, atol=1e-15)
    opt.zero_grad()
    assert layer.grads == {}


def test_sequential_state_dict_keys_and_all_or_nothing_load() -> None:
    model = core.Sequential(core.Linear(3, 2, rng=0), core.BatchNorm1d(2), core.ReLU())
    assert list(model.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked",
    ]
    before = model.state_dict()
    bad = {k: np.full_like(v, 3) for k, v in before.items()}
    bad["1.running_var"] = np.ones(5)
    with pytest.raises(ValueError, match=r"'1.running_var' has shape \(5,\)"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert model.eval().layers[1].training is False


def test_layers_refuse_bad_input() -> None:
    lin = core.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match="expected input with 3 features"):
        lin(np.ones((4, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        lin(np.ones((4, 3), dtype=np.int32))
    with pytest.raises(RuntimeError, match="before forward"):
        core.ReLU().backward(np.ones(3))
    with pytest.raises(ValueError, match="positive int"):
        core.Linear(0, 2)
    relu = core.ReLU()
    relu(np.ones((2, 2)))
    with pytest.raises(ValueError, match="dy has shape"):
        relu.backward(np.ones((2, 3)))
