"""santurkar-2018: noisy BN against torch's BN, the gradient-based ICS computed by hand,
the smoothness probe, and the verdict rule on synthetic results."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunContext, RunResult
from bnlab.experiments.santurkar_2018 import (
    LAYERS,
    PROBED,
    gradient_ics,
    smoothness,
    train_with_probes,
)
from bnlab.models.norms import make_norm
from bnlab.nn import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d, reseed_noise
from bnlab.nn.noisy import _NoisyBatchNorm
from bnlab.train import TrainConfig, build

CASES = [(NoisyBatchNorm1d, nn.BatchNorm1d, (8, 5)), (NoisyBatchNorm1d, nn.BatchNorm1d, (8, 5, 3)),
         (NoisyBatchNorm2d, nn.BatchNorm2d, (6, 5, 3, 4)),
         (NoisyBatchNorm3d, nn.BatchNorm3d, (4, 5, 2, 3, 2))]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pair(noisy_cls: type[_NoisyBatchNorm], bn_cls: type[_BatchNorm], shape: tuple[int, ...],
          **noise: float) -> tuple[_NoisyBatchNorm, _BatchNorm, torch.Tensor]:
    torch.manual_seed(0)
    bn = bn_cls(shape[1]).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    noisy = noisy_cls(shape[1], **noise).double()
    noisy.load_state_dict(bn.state_dict())
    return noisy, bn, torch.randn(*shape, dtype=torch.float64) * 3 + 1


@pytest.mark.parametrize(("noisy_cls", "bn_cls", "shape"), CASES)
def test_noisy_bn_without_noise_is_batchnorm_exactly(noisy_cls: type[_NoisyBatchNorm],
                                                     bn_cls: type[_BatchNorm],
                                                     shape: tuple[int, ...]) -> None:
    noisy, bn, x = _pair(noisy_cls, bn_cls, shape, noise_mean=0.0, noise_var=0.0)
    for _ in range(3):  # several steps: outputs, every gradient, every buffer
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = noisy(xa), bn(xb)
        assert torch.equal(ya, yb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        for a, b in ((xa, xb), (noisy.weight, bn.weight), (noisy.bias, bn.bias)):
            assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
        x = x * 1.1 + 0.2
    for (ka, va), (kb, vb) in zip(noisy.state_dict().items(), bn.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize(("noisy_cls", "bn_cls", "shape"), CASES)
def test_noisy_bn_in_eval_is_batchnorm_and_draws_nothing(noisy_cls: type[_NoisyBatchNorm],
                                                         bn_cls: type[_BatchNorm],
                                                         shape: tuple[int, ...]) -> None:
    noisy, bn, x = _pair(noisy_cls, bn_cls, shape)
    noisy(x)  # one training step with noise: the running statistics are BN's
    bn(x)
    noisy.eval()
    bn.eval()
    state = noisy.generator.get_state()
    assert torch.equal(noisy(x), bn(x))
    assert torch.equal(noisy.generator.get_state(), state)


def test_noisy_bn_adds_the_documented_noise_per_channel() -> None:
    noisy, bn, x = _pair(NoisyBatchNorm2d, nn.BatchNorm2d, (6, 5, 3, 4),
                         noise_mean=0.5, noise_var=0.5)
    assert isinstance(noisy, NoisyBatchNorm2d)
    replay = torch.Generator().manual_seed(0)
    scales = []
    for _ in range(4):
        u = torch.rand(4, generator=replay, dtype=torch.float64)
        z = torch.randn(2, 5, generator=replay, dtype=torch.float64)
        scale = 1 + 0.5 * (2 * u[0] - 1) + torch.sqrt(0.5 * u[2]) * z[0]
        shift = 0.5 * (2 * u[1] - 1) + torch.sqrt(0.5 * u[3]) * z[1]
        expected = bn(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(noisy(x), expected, rtol=0, atol=1e-12)
        scales.append(float(scale.mean()))
    assert len(set(scales)) == 4  # the noise changes every step


def test_noise_is_deterministic_per_seed_and_leaves_the_init_alone() -> None:
    def run(seed: int, norm: str = "noisy_bn") -> tuple[nn.Module, dict[str, Any],
                                                        torch.Tensor]:
        model = build(TrainConfig(dataset="digits", model="paper_mlp", norm=norm, seed=seed),
                      (1, 8, 8), 10)
        init = copy.deepcopy(model.state_dict())
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        return model, init, torch.cat([model(x), model(x)])

    (a, init, ya), (_, _, yb), (_, _, yc) = run(0), run(0), run(1)
    assert torch.equal(ya, yb) and not torch.allclose(ya, yc)
    _, bn_init, _ = run(0, "bn")  # same seed: the noise draws nothing from the global RNG
    for (k, v), (k2, v2) in zip(init.items(), bn_init.items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    layers = [m for m in a.modules() if isinstance(m, NoisyBatchNorm1d)]
    assert reseed_noise(a, 3) == len(layers) == 3
    draws = [layer.noise()[0] for layer in layers]  # each layer its own stream
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_noisy_bn_is_a_registered_norm_and_refuses_negative_noise() -> None:
    layer = make_norm("noisy_bn", 4, 2, noise_mean=0.1, momentum=0.2)
    assert isinstance(layer, NoisyBatchNorm2d) and layer.momentum == 0.2
    assert "noise_mean=0.1" in repr(layer)
    with pytest.raises(ValueError, match="noise_var must be a number >= 0"):
        NoisyBatchNorm1d(3, noise_var=-1.0)


# --------------------------------------------------------------------------- the probes


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _grads_by_hand(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                   x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Softmax cross-entropy of W2·σ(W1·x + b1) + b2, its gradients written out."""
    z = x @ w1.T + b1
    h = _sigmoid(z)
    logits = h @ w2.T + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dlogits = (p - np.eye(w2.shape[0])[y]) / len(y)
    dz = (dlogits @ w2) * h * (1 - h)
    return {"w1": dz.T @ x, "b1": dz.sum(0), "w2": dlogits.T @ h, "b2": dlogits.sum(0)}


def test_gradient_ics_matches_a_computation_by_hand() -> None:
    torch.manual_seed(0)
    stage1 = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid()).double()
    stage2 = nn.Linear(4, 2).double()
    model = nn.Sequential(stage1, stage2)
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    lr = 0.7
    before = copy.deepcopy(model.state_dict())
    ((rel, cos),) = gradient_ics(model, [stage1, stage2], x, y, lr)

    first = stage1[0]
    assert isinstance(first, nn.Linear)
    w1, b1 = first.weight.detach().numpy(), first.bias.detach().numpy()
    w2, b2 = stage2.weight.detach().numpy(), stage2.bias.detach().numpy()
    xn, yn = x.numpy(), y.numpy()
    g = _grads_by_hand(w1, b1, w2, b2, xn, yn)
    # the layer before took its SGD step; layer 2 did not
    g2 = _grads_by_hand(w1 - lr * g["w1"], b1 - lr * g["b1"], w2, b2, xn, yn)["w2"]
    diff = np.linalg.norm(g["w2"] - g2) / np.linalg.norm(g["w2"])
    cosine = (g["w2"] * g2).sum() / (np.linalg.norm(g["w2"]) * np.linalg.norm(g2))
    assert rel == pytest.approx(diff, abs=1e-12) and cos == pytest.approx(cosine, abs=1e-12)
    assert 0.01 < rel < 1  # the update of layer 1 does move layer 2's gradient
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_smoothness_restores_the_model_and_measures_along_the_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Sigmoid(), nn.Linear(6, 3))
    model.eval()
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    before = copy.deepcopy(model.state_dict())
    etas = (0.1, 0.5)
    out = smoothness(model, x, y, etas)
    assert not model.training
    for k, v in model.state_dict().items():  # parameters and running statistics
        assert torch.equal(v, before[k]), k

    def loss_grad(m: nn.Module) -> tuple[float, list[torch.Tensor]]:
        loss = nn.functional.cross_entropy(m(x), y)
        return float(loss.detach()), list(torch.autograd.grad(loss, list(m.parameters())))

    ref = copy.deepcopy(model).train()
    loss0, g = loss_grad(ref)
    losses, changes = [loss0], []
    for eta in etas:
        moved = copy.deepcopy(ref)
        with torch.no_grad():
            for p, gi in zip(moved.parameters(), g, strict=True):
                p.sub_(eta * gi)
        loss, ge = loss_grad(moved)
        losses.append(loss)
        changes.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(ge, g,
                                                                                  strict=True))))
    gnorm = math.sqrt(sum(float((t ** 2).sum()) for t in g))
    assert out["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-5)
    assert out["grad_change"] == pytest.approx(max(changes), rel=1e-5)
    assert out["beta"] == pytest.approx(max(c / (e * gnorm) for c, e in zip(changes, etas,
                                                                            strict=True)),
                                        rel=1e-5)
    with pytest.raises(ValueError, match="step_sizes must be positive"):
        smoothness(model, x, y, (0.0,))


def test_the_santurkar_run_is_deterministic_and_probes_bn_and_no_bn() -> None:
    from bnlab.data.datasets import load_digits_splits

    exp = get_experiment("santurkar-2018")
    ctx = RunContext(load_digits_splits())
    specs = {s.group["norm"]: s for s in exp.runs(exp.config("smoke"), "digits")
             if s.seed == 0}
    outs = {norm: train_with_probes(spec, ctx) for norm, spec in specs.items()}
    again = train_with_probes(specs["noisy_bn"], ctx)
    assert again.metrics[-1]["p50"] == outs["noisy_bn"].metrics[-1]["p50"]
    for norm, out in outs.items():
        probed = [m for m in out.metrics if "loss_range" in m]
        assert [m["step"] for m in probed] == ([0, 20] if norm in PROBED else [])
        for m in probed:
            assert all(m[f"ics_rel_{la}"] >= 0 and -1 <= m[f"ics_cos_{la}"] <= 1
                       for la in LAYERS)


# --------------------------------------------------------------------------- the verdict


def _results(acc: dict[str, Any]) -> list[RunResult]:
    """Every planned full run: ``acc[norm](seed)`` final accuracy; noisy BN's percentiles
    jump between recordings, BN's barely move; probes with BN worse than without."""
    exp = get_experiment("santurkar-2018")
    out = []
    for spec in exp.runs(exp.config("full"), "mnist"):
        norm, seed = spec.group["norm"], spec.seed
        jump = {"none": 0.5, "bn": 0.01, "noisy_bn": 0.4}[norm]
        metrics: list[dict[str, Any]] = []
        for i in range(5):
            m: dict[str, Any] = {"step": 100 * i, "p15": -1 + jump * (i % 2), "p50": jump * (i % 2),
                                 "p85": 1 + jump * (i % 2)}
            if norm in PROBED:
                bad = 1.0 if norm == "bn" else 0.0
                m.update({f"ics_rel_{la}": 0.1 + 0.2 * bad + 0.01 * seed for la in LAYERS})
                m.update({f"ics_cos_{la}": 0.9 - 0.2 * bad for la in LAYERS})
                m.update({"loss_range": 1.0 - 0.5 * bad + 0.01 * seed, "grad_change": 1.0,
                          "beta": 1.0})
            metrics.append(m)
        out.append(RunResult(spec, spec.run_id(exp.name), {"test_acc": acc[norm](seed)},
                             metrics))
    return out


@pytest.mark.parametrize(("noisy_acc", "expected"), [
    (lambda s: 0.97 + 0.001 * s, "not supported"),  # noisy BN as good as BN (their finding)
    (lambda s: 0.95 - 0.001 * s, "supported"),  # noisy BN loses 2+ points
    (lambda s: 0.98 - 0.04 * (s % 2), "inconclusive"),  # seeds disagree
])
def test_verdict_rule(noisy_acc: Any, expected: str) -> None:
    exp = get_experiment("santurkar-2018")
    results = _results({"none": lambda s: 0.90, "bn": lambda s: 0.97, "noisy_bn": noisy_acc})
    a = exp.analyse(exp.config("full"), results)
    assert a.verdict == expected
    assert a.effect["seeds"] == 5
    assert a.effect["bn_gain_pp"] == pytest.approx(7.0)
    assert a.effect["noisy_vs_bn_drift_log2"] == pytest.approx(math.log2(40.0))
    assert a.effect["ics_rel_bn_minus_none"] == pytest.approx(0.2)
    assert a.effect["ics_cos_bn_minus_none"] == pytest.approx(-0.2)
    assert a.effect["loss_range_bn_minus_none"] == pytest.approx(-0.5)
    assert a.effect["loss_range_bn_minus_none_ci_low"] == pytest.approx(-0.5)
    assert "95 % CI" in a.headline
    assert [row["norm"] for row in a.table] == ["none", "bn", "noisy_bn"]
