"""dropout: the verdict rule on synthetic results; the variance-shift measurement by hand on
a tiny model; dropout before BN in deep_mlp shifts the variance, recalibration removes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.experiments.dropout import variance_shift
from bnlab.models.mlp import DeepMLP
from bnlab.nn import recalibrate_bn

Results = Callable[..., list[RunResult]]


def outcome_with(acc: dict[tuple[str, bool], float], jitter: float = 0.0
                 ) -> Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Accuracy ``acc[(norm, dropout > 0)]`` (the combined one ± ``jitter`` by seed); BN
    runs recalibrate to 1 point more and report a shift of 0.8 after the first layer."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        norm, dropped = spec.group["norm"], spec.group["dropout"] > 0
        a = acc[(norm, dropped)] + (jitter * (-1) ** spec.seed if norm == "bn" and dropped
                                    else 0.0)
        summary: dict[str, Any] = {"test_acc": a}
        if norm == "bn":
            shift = 0.8 if dropped else 1.0
            summary |= {"recalibrated_acc": a + 0.01,
                        "variance_shift": {"blocks.0.norm": 1.0, "blocks.1.norm": shift,
                                           "blocks.2.norm": shift}}
        return summary, [{"step": 1, "test_acc": a}]
    return outcome


@pytest.mark.parametrize(
    ("acc", "jitter", "expected"),
    [({("bn", True): 0.98, ("bn", False): 0.96, ("none", True): 0.95, ("none", False): 0.94},
      0.001, "supported"),
     ({("bn", True): 0.95, ("bn", False): 0.97, ("none", True): 0.96, ("none", False): 0.94},
      0.001, "not supported"),  # Li et al.: the combination is worse than either alone
     ({("bn", True): 0.9635, ("bn", False): 0.96, ("none", True): 0.95, ("none", False): 0.94},
      0.005, "inconclusive")],
)
def test_dropout_rule(synthetic_results: Results, acc: dict[tuple[str, bool], float],
                      jitter: float, expected: str) -> None:
    exp = get_experiment("dropout")
    cfg = exp.config("full")
    a = exp.analyse(cfg, synthetic_results("dropout", outcome_with(acc, jitter)))
    assert a.verdict == expected
    best_single = max(acc[("bn", False)], acc[("none", True)])
    assert a.effect["combined_gain_pp"] == pytest.approx(
        100 * (acc[("bn", True)] - best_single) + 100 * jitter / 5)  # 5 seeds: + − + − +
    assert a.effect["repair_gain_pp"] == pytest.approx(1.0)
    assert a.effect["variance_shift"] == pytest.approx(0.8)  # layers after a dropout only
    assert a.effect["variance_shift_no_dropout"] == pytest.approx(1.0)
    assert a.effect["variance_shift_ci_low"] == pytest.approx(0.8)  # no spread: a point
    assert "95 % CI" in a.headline


def test_dropout_quick_is_fulls_protocol_on_three_seeds() -> None:
    exp = get_experiment("dropout")
    quick, full = exp.config("quick"), exp.config("full")
    assert quick.seeds == full.seeds[:3] and quick.steps == full.steps
    assert quick.claim_dropout in quick.dropouts
    kinds = {(r.group["norm"], r.kind) for r in exp.runs(full, "mnist")}
    assert kinds == {("none", "train"), ("bn", "train+variance-shift")}


def test_variance_shift_by_hand_on_a_tiny_model() -> None:
    """Dropout → Linear → BN: at inference dropout is off, so the BN input is x Wᵀ + b; its
    unbiased per-channel variance over the data divided by running_var, averaged."""
    torch.manual_seed(0)
    linear, bn = nn.Linear(3, 4), nn.BatchNorm1d(4)
    net = nn.Sequential(nn.Dropout(0.5), linear, bn)
    running_var = torch.tensor([0.5, 1.0, 2.0, 4.0])
    bn.running_var.copy_(running_var)
    x = torch.randn(50, 3, dtype=torch.float32)
    with torch.no_grad():
        h = x.double() @ linear.weight.double().T + linear.bias.double()
    by_hand = (h.var(dim=0, unbiased=True) / running_var.double()).mean()
    net.train()
    shift = variance_shift(net, x, batch=7)  # batches of 7: merged exactly
    assert list(shift) == ["2"]
    assert shift["2"] == pytest.approx(float(by_hand), rel=1e-6)
    assert net.training and net[0].training  # modes put back


def _train_mode_statistics(net: nn.Module, x: torch.Tensor) -> None:
    """Running statistics from training-mode forwards (dropout on) with frozen weights:
    the cumulative average (momentum None) over many batches."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
            m.reset_running_stats()
    gen = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(300):
            net(x[torch.randperm(len(x), generator=gen)[:64]])


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_before_bn_in_deep_mlp_shifts_the_variance_and_recalibration_removes_it(
    p: float,
) -> None:
    """In deep_mlp, dropout follows each block, so every BN but the first receives
    dropped-out inputs through its linear layer. Running statistics learnt with dropout on
    overstate the inference variance of those layers (ratio < 1); the first layer, and
    every layer without dropout, match (≈ 1); after recalibrate_bn every ratio is 1."""
    torch.manual_seed(0)
    net = DeepMLP(norm="bn", depth=3, width=32, dropout=p, in_shape=(1, 4, 4))
    x = torch.randn(512, 1, 4, 4)
    _train_mode_statistics(net, x)
    shift = variance_shift(net, x)
    assert list(shift) == ["blocks.0.norm", "blocks.1.norm", "blocks.2.norm"]
    assert shift["blocks.0.norm"] == pytest.approx(1.0, abs=0.05)
    for layer in ("blocks.1.norm", "blocks.2.norm"):
        if p:
            assert shift[layer] < 0.9, (layer, shift)
        else:
            assert shift[layer] == pytest.approx(1.0, abs=0.05), (layer, shift)
    recalibrate_bn(net, [x[i:i + 100] for i in range(0, len(x), 100)], progress=False)
    for layer, ratio in variance_shift(net, x).items():
        assert ratio == pytest.approx(1.0, abs=1e-6), layer
