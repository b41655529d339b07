"""Claim: BN before the activation (the paper's and the seeds' default) vs after it
(seeds 002, 003; 002 calls the placement an open question to experiment with).

Protocol: the seed CNN with BN placed before the ReLU (Conv/Linear → BN → ReLU) and after
it (Conv/Linear → ReLU → BN), same everything else. Metric: final test accuracy, before
minus after, per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import (
    eval_set_text,
    final_acc,
    fmt_ms,
    paired_diffs_pp,
    select,
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
from bnlab.experiments.verdict import PairedClaim

PLACEMENTS = ("before", "after")
PAIRED = PairedClaim(
    "Per seed, final test accuracy with BN before the ReLU minus after it", threshold=0.3,
    note="Not supported means: after is as good or better.",
)


Config = CurveConfig


class Placement(Experiment):
    name = "placement"
    claim = "BN placed before the activation (the usual default) trains better than after it."
    seeds = "002, 003"
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, eval_every=5, eval_subset=200),
        "quick": Config(seeds=(0, 1), steps=300, eval_every=100, eval_subset=5000),
        "full": Config(seeds=(0, 1, 2), steps=1500, eval_every=300),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn, placement before vs after the ReLU, SGD lr {cfg.lr} "
            f"momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps, test "
            f"accuracy every {cfg.eval_every} steps on {eval_set_text(cfg.eval_subset)}, seeds "
            f"{list(cfg.seeds)}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"placement": pl}, seed, train_config(
                cfg, dataset, seed, norm="bn", placement=pl, eval_every=cfg.eval_every,
            ))
            for pl in PLACEMENTS
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = [
            table_row({"placement": pl},
                      final_acc=fmt_ms([final_acc(r) for r in select(results, placement=pl)]),
                      seeds=len(select(results, placement=pl)))
            for pl in PLACEMENTS
        ]
        before, after = select(results, placement="before"), select(results, placement="after")
        decision = PAIRED.decide(paired_diffs_pp(before, after))
        headline = (
            f"Final test accuracy: before {fmt_ms([final_acc(r) for r in before])}, after "
            f"{fmt_ms([final_acc(r) for r in after])} "
            f"({decision.pm(2)} points for before)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import curves_plot

        groups = {f"BN {pl} ReLU": select(results, placement=pl) for pl in PLACEMENTS}
        return [curves_plot(out_dir / "placement.png", groups,
                            f"{cfg.model}: BN before vs after the activation",
                            colors={"BN before ReLU": "tab:blue", "BN after ReLU": "tab:green"})]


EXPERIMENT = Placement()
