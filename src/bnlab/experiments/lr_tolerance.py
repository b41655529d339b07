"""Claim: batch norm tolerates higher learning rates (seeds 000, 001).

Protocol: the seed CNN with and without BN, plain SGD with momentum 0.9 at learning rates
{0.003, 0.01, 0.03, 0.1, 0.3, 1, 3}; final test accuracy and whether the run diverged.

Metric: the largest learning rate at which *every* seed reaches the target accuracy (97 %)
without diverging, for BN and for no BN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import acc_row, eval_set_text, final_acc, select
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import Verdict

LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
TARGET = 0.97


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Each run trains at one rate of ``lrs`` (the shared ``lr`` is not used)."""

    lrs: tuple[float, ...] = LRS
    target: float = TARGET


class LrTolerance(Experiment):
    name = "lr-tolerance"
    claim = "Batch norm lets a network train at higher learning rates without diverging."
    seeds = "000, 001"
    rule = (
        "A learning rate is good for a variant when every seed ends at or above the target "
        "test accuracy (97 %; the smoke profile uses 50 %) without diverging. supported if "
        "BN's largest good learning rate is higher than no-BN's (or no-BN has none and BN "
        "has one); not supported if it is equal or lower; inconclusive if neither variant "
        "has a good learning rate."
    )
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, lrs=(0.01, 3.0), target=0.5, eval_subset=200),
        "quick": Config(seeds=(0,), steps=300, eval_subset=5000),
        "full": Config(seeds=(0, 1, 2), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn vs norm=none, SGD momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps at each lr in {list(cfg.lrs)}, seeds "
            f"{list(cfg.seeds)}; target {100 * cfg.target:g} % final test accuracy on "
            f"{eval_set_text(cfg.eval_subset)}; a run "
            f"whose loss becomes NaN/Inf stops and counts as diverged (chance accuracy)."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "lr": lr}, seed,
                    train_config(cfg, dataset, seed, norm=norm, lr=lr, eval_every=cfg.steps))
            for norm in ("none", "bn")
            for lr in cfg.lrs
            for seed in cfg.seeds
        ]

    def _good(self, cfg: Config, results: list[RunResult], norm: str) -> list[float]:
        good = []
        for lr in cfg.lrs:
            rs = select(results, norm=norm, lr=lr)
            if rs and all(not r.summary.get("diverged") and final_acc(r) >= cfg.target
                          for r in rs):
                good.append(lr)
        return good

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = [acc_row({"norm": norm, "lr": lr}, select(results, norm=norm, lr=lr))
                 for norm in ("none", "bn") for lr in cfg.lrs]
        good = {n: self._good(cfg, results, n) for n in ("none", "bn")}
        top = {n: (max(g) if g else None) for n, g in good.items()}
        verdict: Verdict
        if top["bn"] is None and top["none"] is None:
            verdict = "inconclusive"
        elif top["bn"] is not None and (top["none"] is None or top["bn"] > top["none"]):
            verdict = "supported"
        else:
            verdict = "not supported"
        ratio = top["bn"] / top["none"] if top["bn"] and top["none"] else None

        def rng(g: list[float]) -> str:
            return f"{min(g):g}–{max(g):g}" if g else "none"

        headline = (
            f"Learning rates reaching {100 * cfg.target:g} %: BN {rng(good['bn'])}, no BN "
            f"{rng(good['none'])}"
            + (f" (BN's largest is {ratio:g}× no-BN's)." if ratio else ".")
        )
        return Analysis(verdict, headline, {
            "good_lrs_bn": good["bn"], "good_lrs_none": good["none"],
            "max_good_lr_bn": top["bn"], "max_good_lr_none": top["none"],
            "max_lr_ratio": ratio, "target": cfg.target, "seeds": len(cfg.seeds),
        }, table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        groups = {n: [select(results, norm=n, lr=lr) for lr in cfg.lrs] for n in ("bn", "none")}
        return [sweep_plot(out_dir / "lr_tolerance.png", cfg.lrs, groups, "learning rate",
                           f"{cfg.model}: final accuracy vs learning rate ({cfg.steps} steps)")]


EXPERIMENT = LrTolerance()
