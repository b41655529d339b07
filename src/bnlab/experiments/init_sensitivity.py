"""Claim: batch norm reduces the sensitivity to the weight initialisation (seed 001).

Protocol: a ReLU MLP (``deep_mlp``, 4 hidden layers of 100) with and without BN, every
linear weight multiplied by ``init_scale`` in {0.01, 0.1, 1, 10} after the default init;
final test accuracy. The MLP, not the seed CNN: the claim is generic, and four scales × two
variants × five seeds on the seed CNN would not fit the lab's budget.

Metric: per seed, the range (max − min) of final accuracy across the init scales: the
sensitivity to the init. The effect is no-BN's range minus BN's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import (
    acc_row,
    eval_set_text,
    final_acc,
    fmt_ms,
    model_text,
    select,
)
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim

SCALES = (0.01, 0.1, 1.0, 10.0)
PAIRED = PairedClaim(
    "Per seed, sensitivity = max − min final test accuracy over the init scales (a diverged "
    "run counts as chance); the difference is no-BN's sensitivity minus BN's",
    threshold=5.0,
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Every conv/linear weight × each of ``scales`` after the default init."""

    model: str = "deep_mlp"
    scales: tuple[float, ...] = SCALES


class InitSensitivity(Experiment):
    name = "init-sensitivity"
    claim = "Batch norm makes training much less sensitive to the weight initialisation."
    seeds = "001"
    quote = ("Batch Normalization reduces the sensitivity of the model to the initial "
             "weights, making it easier to train deep networks.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift")
    literature = (
        "Ioffe & Szegedy (the section on higher learning rates) show that a BN layer's "
        "output does not change when the weights feeding it are scaled, BN(aWu) = BN(Wu), so "
        "back-propagation through the layer does not depend on their scale; their abstract "
        "says BN lets one be \"less careful about initialization\". They report no measured "
        "sensitivity to the init scale. The invariance is exact only for the layers "
        "followed by BN, not for the output layer."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With BN a badly scaled initialisation (10× or more off) "
                     "costs little accuracy, where the plain network fails.",
        "not supported": "BN does not protect this network from a badly scaled "
                         "initialisation any better than no BN; keep a careful init.",
        "inconclusive": "The seeds disagree on how much BN protects against a badly scaled "
                        "initialisation; keep a careful init until more seeds decide.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0, 1), steps=10, scales=(0.1, 10.0), eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=500),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=500),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{model_text(cfg.model, cfg.model_kwargs)} with norm=bn vs none, weights × "
            f"init_scale in {list(cfg.scales)} after the default init, SGD lr {cfg.lr} "
            f"momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps, seeds "
            f"{list(cfg.seeds)}; accuracy on {eval_set_text(cfg.eval_subset)}; a diverged "
            f"run counts as chance. An MLP, not the seed CNN: the claim is generic and a "
            f"grid of init scales on the CNN does not fit the lab's budget."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "init_scale": s}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps, init_scale=s,
            ))
            for norm in ("none", "bn")
            for s in cfg.scales
            for seed in cfg.seeds
        ]

    def _range(self, cfg: Config, results: list[RunResult], norm: str, seed: int) -> float:
        accs = [final_acc(r) for s in cfg.scales
                for r in select(results, norm=norm, init_scale=s) if r.spec.seed == seed]
        return max(accs) - min(accs)

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = [acc_row({"norm": norm, "init_scale": s}, select(results, norm=norm, init_scale=s))
                 for norm in ("none", "bn") for s in cfg.scales]
        ranges = {n: [self._range(cfg, results, n, s) for s in cfg.seeds] for n in ("none", "bn")}
        decision = PAIRED.decide(
            [100 * (a - b) for a, b in zip(ranges["none"], ranges["bn"], strict=True)])
        headline = (
            f"Accuracy range over init scales: BN {fmt_ms(ranges['bn'], unit='')} vs no BN "
            f"{fmt_ms(ranges['none'], unit='')} points ({decision.pm(1)} points less "
            f"sensitive with BN)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, before={
            "range_bn_pp": 100 * sum(ranges["bn"]) / len(ranges["bn"]),
            "range_none_pp": 100 * sum(ranges["none"]) / len(ranges["none"]),
        }), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        groups = {n: [select(results, norm=n, init_scale=s) for s in cfg.scales]
                  for n in ("bn", "none")}
        return [sweep_plot(out_dir / "init_sensitivity.png", cfg.scales, groups,
                           "init scale (× default weights)",
                           f"{cfg.model}: final accuracy vs init scale ({cfg.steps} steps)")]


EXPERIMENT = InitSensitivity()
