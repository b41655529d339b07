"""Claim: batch norm trains faster (seeds 000, 001).

Protocol: the seed CNN with and without BN, same optimizer (SGD, momentum 0.9) and learning
rate, test accuracy evaluated along training; steps to reach 97 / 98 / 99 %.

Metric: the mean test accuracy over all evaluations (the normalised area under the accuracy
curve: a network that gets there sooner scores higher), BN minus no BN, per seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import (
    acc_curve,
    eval_set_text,
    final_acc,
    fmt_ms,
    paired_diffs_pp,
    select,
    steps_to,
    table_row,
)
from bnlab.experiments.base import (
    Analysis,
    CurveConfig,
    Experiment,
    RunResult,
    RunSpec,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim, mean_std

TARGETS = (0.97, 0.98, 0.99)
# BN's curve must lie at least 1 percentage point higher on average
PAIRED = PairedClaim(
    "Per seed, the mean test accuracy over all evaluations (area under the accuracy curve) "
    "with BN minus without", threshold=1.0, key="curve_diff_pp",
)

Config = CurveConfig


class Convergence(Experiment):
    name = "convergence"
    claim = "Batch norm makes training converge faster."
    seeds = "000, 001"
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, eval_every=5, eval_subset=200),
        "quick": Config(seeds=(0, 1), steps=300, eval_every=30, eval_subset=2000),
        "full": Config(seeds=(0, 1, 2), steps=1000, eval_every=100),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn vs norm=none, SGD lr {cfg.lr} momentum {cfg.momentum}, "
            f"batch {cfg.batch_size}, {cfg.steps} steps, test accuracy every "
            f"{cfg.eval_every} steps on {eval_set_text(cfg.eval_subset)}, seeds {list(cfg.seeds)}; "
            f"steps to reach "
            f"{', '.join(f'{100 * t:g} %' for t in TARGETS)}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm}, seed,
                    train_config(cfg, dataset, seed, norm=norm, eval_every=cfg.eval_every))
            for norm in ("none", "bn")
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        def auc(r: RunResult) -> float:
            _, accs = acc_curve(r)
            return sum(accs) / len(accs) if accs else r.chance

        table = []
        for norm in ("none", "bn"):
            rs = select(results, norm=norm)
            row = table_row({"norm": norm}, final_acc=fmt_ms([final_acc(r) for r in rs]),
                            curve_mean_acc=fmt_ms([auc(r) for r in rs]), seeds=len(rs))
            for t in TARGETS:
                m = mean_std(steps_to(r, t) for r in rs)[0]
                row[f"steps_to_{100 * t:g}"] = "never" if math.isinf(m) else f"{m:.0f}"
            table.append(row)
        bn, none = select(results, norm="bn"), select(results, norm="none")
        decision = PAIRED.decide(paired_diffs_pp(bn, none, auc))
        s97 = {n: mean_std(steps_to(r, TARGETS[0]) for r in select(results, norm=n))[0]
               for n in ("bn", "none")}
        headline = (
            f"Accuracy curve {decision.pm(2)} points higher with BN (mean over the run); "
            f"steps to 97 %: BN {_steps(s97['bn'])}, no BN {_steps(s97['none'])}."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"steps_to_97_bn": s97["bn"], "steps_to_97_none": s97["none"]},
        ), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import curves_plot

        groups = {"bn": select(results, norm="bn"), "none": select(results, norm="none")}
        return [curves_plot(out_dir / "convergence.png", groups,
                            f"{cfg.model}: test accuracy vs step (lr {cfg.lr})",
                            colors={"bn": "tab:blue", "none": "tab:red"})]


def _steps(x: float) -> str:
    return "never" if math.isinf(x) else f"{x:.0f}"


EXPERIMENT = Convergence()
