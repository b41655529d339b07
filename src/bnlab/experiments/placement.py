"""Claim: BN before the activation (the paper's and the seeds' default) vs after it
(seeds 002, 003; 002 calls the placement an open question to experiment with).

Protocol: a ReLU MLP (``deep_mlp``, 4 hidden layers of 100) with BN placed before the ReLU
(Linear → BN → ReLU) and after it (Linear → ReLU → BN), same everything else. Metric: final
test accuracy, before minus after, per seed. The MLP, not the seed CNN: seed 003 states the
rule for dense layers too, and five seeds of both placements on the seed CNN, long enough
for a 0.3-point difference to show, would not fit the lab's budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import (
    eval_set_text,
    final_acc,
    fmt_ms,
    model_text,
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


@dataclass(frozen=True, kw_only=True)
class Config(CurveConfig):
    """Both placements of BN in a ReLU MLP."""

    model: str = "deep_mlp"


class Placement(Experiment):
    name = "placement"
    claim = "BN placed before the activation (the usual default) trains better than after it."
    seeds = "002, 003"
    quote = ("The BatchNorm layer is usually added before ReLU as mentioned in the Batch "
             "Normalization paper.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift")
    literature = (
        "Ioffe & Szegedy add BN immediately before the nonlinearity, normalising x = Wu + b, "
        "and argue that this input is more likely to have a symmetric, non-sparse "
        "distribution than the layer's input; they do not compare it with BN after the "
        "nonlinearity. Practitioners' comparisons (blog posts, forum threads, small "
        "benchmarks) report mixed results, several finding BN after the ReLU as good or "
        "slightly better; we know of no peer-reviewed study that settles it."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Put BN between the linear layer and the ReLU, as the paper does: it "
                     "trains measurably better than after the ReLU.",
        "not supported": "BN before the ReLU is not better than after it here; either "
                         "placement is fine, pick the one your framework or model uses.",
        "inconclusive": "The seeds cannot tell the two placements apart at the claimed size; "
                        "the choice matters little here.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, eval_every=5, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=1000, eval_every=200),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=1000, eval_every=200),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{model_text(cfg.model, cfg.model_kwargs)} with norm=bn, placement before vs "
            f"after the ReLU, SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps, test accuracy every {cfg.eval_every} steps "
            f"on {eval_set_text(cfg.eval_subset)}, seeds {list(cfg.seeds)}. An MLP, not the "
            f"seed CNN, to fit the lab's budget (seed 003 states the rule for dense layers "
            f"too)."
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
