"""wu-johnson-2021: the verdict rule on synthetic results, and the precise-statistics path
against BN's running statistics recomputed by hand on a tiny model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult
from bnlab.experiments.wu_johnson_2021 import PAIRED, precise_copy

torch.set_num_threads(1)


def results(variants: Any) -> list[RunResult]:
    exp = get_experiment("wu-johnson-2021")
    return [RunResult(spec, spec.run_id("wu-johnson-2021"),
                      {"test_acc": 0.9, "eval_variants": variants(spec)}, [])
            for spec in exp.runs(exp.config("full"), "mnist")]


def precise_ahead(spec: Any) -> dict[str, float]:
    lag = 0.1 if spec.group["step"] <= 100 else 0.01  # large early, small later
    return {"ema": 0.9 - lag - 0.001 * spec.seed, "precise": 0.9, "batch": 0.91}


def same(spec: Any) -> dict[str, float]:
    return {"ema": 0.9 + 0.001 * spec.seed, "precise": 0.9, "batch": 0.9}


def swinging(spec: Any) -> dict[str, float]:
    return {"ema": 0.9 + (0.05 if spec.seed % 2 else -0.06), "precise": 0.9, "batch": 0.9}


@pytest.mark.parametrize(("variants", "expected"),
                         [(precise_ahead, "supported"), (same, "not supported"),
                          (swinging, "inconclusive")])
def test_rule(variants: Any, expected: str) -> None:
    exp = get_experiment("wu-johnson-2021")
    cfg = exp.config("full")
    a = exp.analyse(cfg, results(variants))
    assert a.verdict == expected
    assert a.effect["threshold_pp"] == PAIRED.threshold
    if expected == "supported":
        lags = [10.0 if s <= 100 else 1.0 for s in cfg.checkpoints]
        assert a.effect["precise_gain_pp"] == pytest.approx(sum(lags) / len(lags) + 0.2)
        assert a.effect["first_checkpoint_gain_pp"] == pytest.approx(10.2)
        assert a.effect["batch_minus_ema_pp"] == pytest.approx(
            sum(lags) / len(lags) + 0.2 + 1.0)
    assert "95 % CI" in a.headline


def test_checkpoint_runs_train_to_each_step() -> None:
    exp = get_experiment("wu-johnson-2021")
    cfg = exp.config("quick")
    runs = exp.runs(cfg, "mnist")
    assert sorted({(r.config.steps, r.group["step"]) for r in runs}) == [
        (s, s) for s in sorted(cfg.checkpoints)]
    assert all(r.config.norm == "bn" and r.config.lr == cfg.lr for r in runs)
    assert cfg.steps == max(cfg.checkpoints)


def test_precise_statistics_are_the_population_statistics_by_hand() -> None:
    """Linear → BN → ReLU → Linear → BN, with stale running statistics: the precise copy's
    statistics are the mean and unbiased variance of what each BN receives at inference
    over all the images, the second computed with the first's new statistics (float64)."""
    g = torch.Generator().manual_seed(0)
    model: Any = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-2, 2, generator=g)
            bn.running_var.uniform_(0.5, 3, generator=g)
            bn.weight.uniform_(0.5, 2, generator=g)
            bn.bias.uniform_(-1, 1, generator=g)
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(70, 5, generator=g, dtype=torch.float64) * 3 + 1
    precise: Any = precise_copy(model, x, 16)  # batches of 16, 16, 16, 16 and 6

    with torch.no_grad():
        z1 = model[0](x)
        mean1, var1 = z1.mean(0), z1.var(0, unbiased=True)
        bn1 = model[1]
        h = torch.relu((z1 - mean1) / torch.sqrt(var1 + bn1.eps) * bn1.weight + bn1.bias)
        z2 = model[3](h)
        mean2, var2 = z2.mean(0), z2.var(0, unbiased=True)
    for bn, m, v in ((precise[1], mean1, var1), (precise[4], mean2, var2)):
        assert torch.allclose(bn.running_mean, m, rtol=0, atol=1e-12)
        assert torch.allclose(bn.running_var, v, rtol=0, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # the trained model is left as it was
