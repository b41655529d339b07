"""Claim: batch norm reduces the sensitivity to the weight initialisation (seed 001).

Protocol: the seed CNN with and without BN, every conv/linear weight multiplied by
``init_scale`` in {0.01, 0.1, 1, 10} after the default init; final test accuracy.

Metric: per seed, the range (max − min) of final accuracy across the init scales: the
sensitivity to the init. The effect is no-BN's range minus BN's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import acc_row, eval_set_text, final_acc, fmt_ms, select
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

    scales: tuple[float, ...] = SCALES


class InitSensitivity(Experiment):
    name = "init-sensitivity"
    claim = "Batch norm makes training much less sensitive to the weight initialisation."
    seeds = "001"
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, scales=(0.1, 10.0), eval_subset=200),
        "quick": Config(seeds=(0,), steps=300, eval_subset=5000),
        "full": Config(seeds=(0, 1, 2), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn vs none, weights × init_scale in {list(cfg.scales)} "
            f"after the default init, SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps, seeds {list(cfg.seeds)}; accuracy on "
            f"{eval_set_text(cfg.eval_subset)}."
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
