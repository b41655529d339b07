"""The yang-2019 experiment: the growth-rate fit on exact exponentials, its probe run, and
the verdict rule on synthetic results."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunContext, RunResult, RunSpec
from bnlab.experiments.gradient_health import hidden_norms, layer_grad_norms, probe_batch
from bnlab.experiments.yang_2019 import grad_growth_run, growth_rate
from bnlab.train import TrainConfig, build


@pytest.mark.parametrize("rate", [0.08, 0.0, -0.39, 1.5])
def test_growth_rate_of_an_exact_exponential(rate: float) -> None:
    """norms[l] = c · 10^(−rate · l): the norm grows by ``rate`` decades per layer towards
    index 0, exactly."""
    norms = [3.7 * 10.0 ** (-rate * i) for i in range(49)]
    assert growth_rate(norms) == pytest.approx(rate, abs=1e-12)
    assert growth_rate([5.0 * v for v in norms]) == pytest.approx(rate, abs=1e-12)


def test_growth_rate_is_the_least_squares_slope() -> None:
    # log10 norms 0, 1, 0, 1: slope 0.2 (by hand: sxy = 1, sxx = 5), rate −0.2
    assert growth_rate([1.0, 10.0, 1.0, 10.0]) == pytest.approx(-0.2)
    assert math.isnan(growth_rate([1.0])) and math.isnan(growth_rate([1.0, 0.0]))
    assert math.isnan(growth_rate([1.0, math.inf]))


def test_grad_growth_run_probes_every_width_and_batch() -> None:
    from bnlab.data import load_dataset

    data = load_dataset("digits")
    config = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", seed=1,
                         model_kwargs={"depth": 6, "width": 16})
    spec = RunSpec({"part": "growth", "norm": "bn"}, 1, config, kind="grad-growth",
                   params={"widths": [8, 16], "batches": [16, 32]})
    out = grad_growth_run(spec, RunContext(data))
    assert set(out.summary["growth"]) == {"8x16", "8x32", "16x16", "16x32"}
    cfg8 = TrainConfig(model="deep_mlp", norm="bn", dataset="digits", seed=1,
                       model_kwargs={"depth": 6, "width": 8})
    x, y = probe_batch(data, 32)
    norms = hidden_norms(layer_grad_norms(build(cfg8, data.in_shape, data.num_classes), x, y))
    assert out.summary["norms"]["8x32"] == norms and len(norms) == 6 - 1
    assert out.summary["growth"]["8x32"] == growth_rate(norms)
    assert out.summary["test_acc"] is None and out.metrics[0]["step"] == 0


Rates = Callable[[str, int], float]


def results(rate: Rates, acc: float = 0.9) -> list[RunResult]:
    exp = get_experiment("yang-2019")
    cfg = exp.config("full")
    out = []
    for spec in exp.runs(cfg, "mnist"):
        summary: dict[str, Any]
        if spec.kind == "grad-growth":
            r = rate(spec.group["norm"], spec.seed)
            cells = [f"{w}x{b}" for w in cfg.widths for b in cfg.probe_batches]
            summary = {"test_acc": None, "growth": dict.fromkeys(cells, r),
                       "norms": {c: [10.0 ** (-r * i) for i in range(4)] for c in cells}}
        else:
            summary = {"test_acc": acc if spec.group["depth"] < 50 else 0.1}
        out.append(RunResult(spec, spec.run_id("yang-2019"), summary, [{"step": 1}]))
    return out


def analyse(rate: Rates) -> Any:
    exp = get_experiment("yang-2019")
    return exp.analyse(exp.config("full"), results(rate))


def test_yang_rule_on_synthetic_growth_rates() -> None:
    a = analyse(lambda norm, seed: 0.08 + 0.001 * seed if norm == "bn" else -0.4)
    assert a.verdict == "supported"
    assert a.effect["growth_dec_per_layer"] == pytest.approx(0.082)
    assert a.effect["growth_none_dec_per_layer"] == pytest.approx(-0.4)
    assert "95 % CI" in a.headline
    assert analyse(lambda norm, seed: 0.001 * seed).verdict == "not supported"
    noisy = (0.1, -0.05, 0.12, -0.04, 0.06)
    assert analyse(lambda norm, seed: noisy[seed]).verdict == "inconclusive"


def test_yang_table_has_every_map_cell_and_the_residual_row() -> None:
    exp = get_experiment("yang-2019")
    cfg = exp.config("full")
    table = analyse(lambda norm, seed: 0.08).table
    cells = {(r["arch"], r["depth"], r["batch"]) for r in table if r["part"] == "map"}
    assert cells == {("plain", d, b) for d in cfg.depths for b in cfg.batches} | {
        ("residual", cfg.residual_depth, b) for b in cfg.batches}
    assert cfg.residual_depth >= 100
    row = next(r for r in table if r["part"] == "map" and r["depth"] == 8)
    assert row["final_acc"] == "90.00 ± 0.00 %"
