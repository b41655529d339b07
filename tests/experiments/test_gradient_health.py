"""The gradient-health claim: per-layer gradient norms checked by hand on a tiny net, the
spread, and the verdict rule on synthetic results."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunContext, RunResult, RunSpec
from bnlab.experiments.gradient_health import (
    grads_train_run,
    hidden_norms,
    layer_grad_norms,
    probe_batch,
    spread,
)
from bnlab.models.mlp import DeepMLP
from bnlab.train import TrainConfig, build


def test_layer_grad_norms_match_backprop_by_hand() -> None:
    """A depth-2 ReLU MLP without norm: the weight gradients of the mean cross-entropy,
    written out in NumPy (float64), against the probe's norms."""
    torch.manual_seed(0)
    model = DeepMLP(norm="none", in_shape=(1, 2, 3), depth=2, width=4, num_classes=3)
    x = torch.randn(5, 1, 2, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    (W1, b1), (W2, b2), (W3, b3) = (
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears)
    a0 = x.double().numpy().reshape(5, 6)
    h1 = a0 @ W1.T + b1
    a1 = np.maximum(h1, 0)
    h2 = a1 @ W2.T + b2
    a2 = np.maximum(h2, 0)
    z = a2 @ W3.T + b3
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(3)[y.numpy()]) / 5
    dW3 = dz.T @ a2
    dh2 = (dz @ W3) * (h2 > 0)
    dW2 = dh2.T @ a1
    dh1 = (dh2 @ W2) * (h1 > 0)
    dW1 = dh1.T @ a0
    expected = [float(np.linalg.norm(g)) for g in (dW1, dW2, dW3)]
    model.eval()
    norms = layer_grad_norms(model, x, y)
    assert norms == pytest.approx(expected, rel=1e-10, abs=0)
    # the model is left as it was: no gradients, its mode kept
    assert all(q.grad is None for q in model.parameters()) and not model.training


def test_layer_grad_norms_with_bn_use_batch_statistics() -> None:
    """With BN in train mode the gradient passes through the batch statistics: the probe
    agrees with autograd on the same model in float64 train mode."""
    torch.manual_seed(1)
    model = DeepMLP(norm="bn", in_shape=(1, 2, 3), depth=3, width=4, num_classes=3)
    x, y = torch.randn(8, 1, 2, 3), torch.randint(0, 3, (8,))
    ref = DeepMLP(norm="bn", in_shape=(1, 2, 3), depth=3, width=4, num_classes=3).double()
    ref.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(ref(x.double()), y).backward()
    expected = [float(torch.linalg.vector_norm(m.weight.grad)) for m in ref.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.grad is not None]
    assert len(expected) == 3 + 1
    assert layer_grad_norms(model, x, y) == pytest.approx(expected, rel=1e-12)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 3 and all(m.num_batches_tracked == 0 for m in bns)  # untouched


def test_spread_and_hidden_layers() -> None:
    assert spread([1.0, 10.0, 1000.0]) == pytest.approx(3.0)
    assert spread([2.0, 2.0]) == 0.0
    assert spread([1.0, 0.0]) == math.inf
    assert math.isnan(spread([1.0, math.nan])) and math.isnan(spread([]))
    assert hidden_norms([9.0, 1.0, 2.0, 3.0, 7.0]) == [1.0, 2.0, 3.0]


Spreads = Callable[[str, str, int], float]


def results(spreads: Spreads) -> list[RunResult]:
    """Every planned full run; the init norms of a run span ``spreads(arch, norm, seed)``
    decades over the hidden layers (input layer and head far off, to show they are left
    out)."""
    exp = get_experiment("gradient-health")
    cfg = exp.config("full")
    out = []
    for spec in exp.runs(cfg, "mnist"):
        s = spreads(spec.group["arch"], spec.group["norm"], spec.seed)
        hidden = [10.0 ** (s * i / (cfg.depth - 2)) for i in range(cfg.depth - 1)]
        norms = [1e30, *hidden, 1e-30]
        summary: dict[str, Any] = {"test_acc": 0.9, "grad_norms_init": norms,
                                   "grad_norms_trained": [1.0] * (cfg.depth + 1)}
        out.append(RunResult(spec, spec.run_id("gradient-health"), summary, [{"step": 1}]))
    return out


def analyse(spreads: Spreads) -> Any:
    exp = get_experiment("gradient-health")
    return exp.analyse(exp.config("full"), results(spreads))


def test_rule_needs_bn_to_narrow_the_spread_in_both_architectures() -> None:
    def both(arch: str, norm: str, seed: int) -> float:
        return (4.0 + 0.1 * seed) if norm == "none" else 0.5

    a = analyse(both)
    assert a.verdict == "supported"
    assert a.effect["spread_diff_dec"] == pytest.approx(3.7)
    assert a.effect["plain_diff_dec"] == pytest.approx(3.7)

    def plain_only(arch: str, norm: str, seed: int) -> float:
        if arch == "plain":
            return 18.0 if norm == "none" else 4.0
        return 0.4 + (0.05 * seed if norm == "bn" else 0.0)

    a = analyse(plain_only)
    assert a.verdict == "not supported"
    assert a.effect["plain_diff_dec"] == pytest.approx(14.0)
    assert a.effect["spread_diff_dec"] == pytest.approx(-0.1)
    assert "95 % CI" in a.headline

    def noisy(arch: str, norm: str, seed: int) -> float:
        return (0.0, 3.0, -1.0, 4.0, 1.5)[seed] if norm == "none" else 0.0

    assert analyse(noisy).verdict == "inconclusive"


def test_grads_train_run_measures_init_and_trained_model_on_the_probe_batch() -> None:
    from bnlab.data import load_dataset

    data = load_dataset("digits")
    config = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", seed=2, steps=3,
                         eval_every=3, eval_subset=50,
                         model_kwargs={"depth": 3, "width": 8, "residual": True})
    spec = RunSpec({"arch": "residual", "norm": "bn"}, 2, config, kind="grads+train")
    out = grads_train_run(spec, RunContext(data))
    x, y = probe_batch(data)
    assert out.summary["grad_norms_init"] == layer_grad_norms(
        build(config, data.in_shape, data.num_classes), x, y)
    assert len(out.summary["grad_norms_trained"]) == 3 + 1
    assert out.summary["grad_norms_trained"] != out.summary["grad_norms_init"]
    assert 0.0 <= out.summary["test_acc"] <= 1.0
