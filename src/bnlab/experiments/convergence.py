"""Claim: batch norm trains faster (seeds 000, 001).

Protocol: the seed CNN with and without BN, same optimizer (SGD, momentum 0.9) and learning
rate, test accuracy evaluated along training on a fixed subset of the test set; steps to
reach the dataset's target accuracy (declared per dataset in the config).

Metric: the mean test accuracy over all evaluations (the normalised area under the accuracy
curve: a network that gets there sooner scores higher), BN minus no BN, per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import (
    acc_curve,
    dataset_target,
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

# the accuracy a seed CNN "has trained" at, per dataset (reported as steps to reach it)
TARGETS = {"mnist": 0.97, "fashion-mnist": 0.85}
# BN's curve must lie at least 1 percentage point higher on average
PAIRED = PairedClaim(
    "Per seed, the mean test accuracy over all evaluations (area under the accuracy curve) "
    "with BN minus without", threshold=1.0, key="curve_diff_pp",
)


@dataclass(frozen=True, kw_only=True)
class Config(CurveConfig):
    """``targets``: dataset -> the accuracy whose first step is reported (not the verdict's
    metric, which is the whole curve)."""

    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))


class Convergence(Experiment):
    name = "convergence"
    claim = "Batch norm makes training converge faster."
    seeds = "000, 001"
    quote = ("Batch Normalization helps in faster convergence of the training process by "
             "reducing the number of epochs needed to train.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift")
    literature = (
        "Inception on ImageNet: with BN (and the higher learning rate it allows) the network "
        "matched the original's accuracy in 14 times fewer training steps (the paper's "
        "abstract and its Inception results). MNIST, a 3-layer sigmoid MLP: the BN "
        "network's test accuracy is higher than the plain network's throughout training "
        "(their Fig. 1a)."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Adding BN after each conv/linear layer gets a network of this kind to a "
                     "given accuracy in fewer steps at the same learning rate.",
        "not supported": "At this learning rate BN does not speed training up by a point of "
                         "accuracy on average; do not add it for speed alone.",
        "inconclusive": "The seeds disagree too much to say whether BN speeds this training "
                        "up; run more seeds before relying on it.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, eval_every=5, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=300, eval_every=30, eval_subset=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=300, eval_every=30, eval_subset=1000),
    }

    def protocol(self, cfg: Config) -> str:
        targets = ", ".join(f"{d} {100 * t:g} %" for d, t in cfg.targets.items())
        return (
            f"{cfg.model} with norm=bn vs norm=none, SGD lr {cfg.lr} momentum {cfg.momentum}, "
            f"batch {cfg.batch_size}, {cfg.steps} steps, test accuracy every "
            f"{cfg.eval_every} steps on {eval_set_text(cfg.eval_subset)} (a fixed subset: the "
            f"curve's mean is what the verdict needs), seeds {list(cfg.seeds)}; steps to "
            f"reach the target ({targets}) reported beside it."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm}, seed,
                    train_config(cfg, dataset, seed, norm=norm, eval_every=cfg.eval_every))
            for norm in ("none", "bn")
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        target = dataset_target(cfg.targets, results)

        def auc(r: RunResult) -> float:
            _, accs = acc_curve(r)
            return sum(accs) / len(accs) if accs else r.chance

        table = []
        for norm in ("none", "bn"):
            rs = select(results, norm=norm)
            m = mean_std(steps_to(r, target) for r in rs)[0]
            table.append(table_row(
                {"norm": norm}, final_acc=fmt_ms([final_acc(r) for r in rs]),
                curve_mean_acc=fmt_ms([auc(r) for r in rs]),
                steps_to_target=_steps(m), seeds=len(rs)))
        bn, none = select(results, norm="bn"), select(results, norm="none")
        decision = PAIRED.decide(paired_diffs_pp(bn, none, auc))
        reach = {n: mean_std(steps_to(r, target) for r in select(results, norm=n))[0]
                 for n in ("bn", "none")}
        headline = (
            f"Accuracy curve {decision.pm(2)} points higher with BN (mean over the run); "
            f"steps to {100 * target:g} %: BN {_steps(reach['bn'])}, no BN "
            f"{_steps(reach['none'])}."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"target": target, "steps_to_target_bn": reach["bn"],
                             "steps_to_target_none": reach["none"]},
        ), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import curves_plot

        groups = {"bn": select(results, norm="bn"), "none": select(results, norm="none")}
        return [curves_plot(out_dir / "convergence.png", groups,
                            f"{cfg.model}: test accuracy vs step (lr {cfg.lr})",
                            colors={"bn": "tab:blue", "none": "tab:red"})]


def _steps(x: float) -> str:
    """Mean steps to the target; ``never`` when a seed never reached it (an infinite
    mean)."""
    return "never" if math.isinf(x) else f"{x:.0f}"


EXPERIMENT = Convergence()
