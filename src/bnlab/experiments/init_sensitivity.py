"""Claim: batch norm reduces the sensitivity to the weight initialisation (seed 001).

Protocol: the seed CNN with and without BN, every conv/linear weight multiplied by
``init_scale`` in {0.01, 0.1, 1, 10} after the default init; final test accuracy.

Metric: per seed, the range (max − min) of final accuracy across the init scales: the
sensitivity to the init. The effect is no-BN's range minus BN's range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    acc_row,
    compare,
    eval_set_text,
    final_acc,
    fmt_ms,
    pm,
    select,
    train_config,
)

SCALES = (0.01, 0.1, 1.0, 10.0)
THRESHOLD_PP = 5.0


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...]
    steps: int
    scales: tuple[float, ...] = SCALES
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    eval_subset: int | None = None
    model: str = "seed_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class InitSensitivity(Experiment):
    name = "init-sensitivity"
    claim = "Batch norm makes training much less sensitive to the weight initialisation."
    seeds = "001"
    rule = (
        f"Per seed, sensitivity = max − min final test accuracy over the init scales (a "
        f"diverged run counts as chance). supported if no-BN's sensitivity minus BN's is at "
        f"least {THRESHOLD_PP:g} percentage points and more than 2 standard errors above "
        f"zero; not supported if mean + 2 SE is below {THRESHOLD_PP:g} points; inconclusive "
        f"otherwise."
    )
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
        diffs = [100 * (a - b) for a, b in zip(ranges["none"], ranges["bn"], strict=True)]
        verdict, d, se = compare(diffs, THRESHOLD_PP)
        headline = (
            f"Accuracy range over init scales: BN {fmt_ms(ranges['bn'], unit='')} vs no BN "
            f"{fmt_ms(ranges['none'], unit='')} points ({pm(d, se, len(diffs), 1)} points less "
            f"sensitive with BN)."
        )
        return Analysis(verdict, headline, {
            "range_bn_pp": 100 * sum(ranges["bn"]) / len(ranges["bn"]),
            "range_none_pp": 100 * sum(ranges["none"]) / len(ranges["none"]),
            "diff_pp": d, "se_pp": se, "threshold_pp": THRESHOLD_PP, "seeds": len(diffs),
        }, table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        groups = {n: [select(results, norm=n, init_scale=s) for s in cfg.scales]
                  for n in ("bn", "none")}
        return [sweep_plot(out_dir / "init_sensitivity.png", cfg.scales, groups,
                           "init scale (× default weights)",
                           f"{cfg.model}: final accuracy vs init scale ({cfg.steps} steps)")]


EXPERIMENT = InitSensitivity()
