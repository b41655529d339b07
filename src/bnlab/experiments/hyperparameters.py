"""Claim: batch norm makes a network more robust to the choice of hyperparameters (seed 000).

Protocol: a ReLU MLP (``deep_mlp``, 4 hidden layers of 100) with and without BN, trained at
every cell of a grid of learning rate × init scale (every linear weight × the scale after
the default init) × batch size, the same number of SGD steps in every cell; final test
accuracy. The MLP, not the seed CNN: the claim is generic, and the grid × two variants ×
five seeds on the seed CNN would cost about 30 times as much.

Metric: per seed and variant, the fraction of the grid's cells whose run ends at or above
the dataset's target accuracy without diverging; the effect is BN's fraction minus
no-BN's, in percentage points of the grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.analysis import (
    acc_row,
    dataset_target,
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

LRS = (0.01, 0.1, 1.0)
SCALES = (0.1, 1.0, 10.0)
BATCHES = (16, 128)
TARGETS = {"mnist": 0.93, "fashion-mnist": 0.80}
# BN's good share of the grid at least 10 points (about 2 cells of 18) larger
PAIRED = PairedClaim(
    "Per seed, the fraction of the grid's cells (learning rate × init scale × batch size) "
    "whose run ends at or above the target test accuracy without diverging, with BN minus "
    "without, in percentage points of the grid",
    threshold=10.0, key="grid_diff_pp",
    note="Inconclusive also when the grid does not separate the variants: on every seed, "
         "no cell of either variant is good, or every cell of both is.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """The grid ``lrs`` × ``scales`` × ``batches`` (the shared ``lr`` and ``batch_size``
    are not used); ``targets``: dataset -> the final test accuracy a cell must reach."""

    model: str = "deep_mlp"
    lrs: tuple[float, ...] = LRS
    scales: tuple[float, ...] = SCALES
    batches: tuple[int, ...] = BATCHES
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))

    def cells(self) -> list[dict[str, Any]]:
        """The grid's cells as run groups (without the norm), in a fixed order."""
        return [{"lr": lr, "init_scale": s, "batch": b}
                for lr, s, b in itertools.product(self.lrs, self.scales, self.batches)]


def good(run: RunResult, target: float) -> bool:
    """Whether a run ends at or above ``target`` test accuracy without diverging."""
    return not run.summary.get("diverged") and final_acc(run) >= target


def good_fraction(cfg: Config, runs: list[RunResult], target: float) -> float:
    """The fraction of ``cfg``'s cells whose run among ``runs`` (one seed, one variant) is
    good; a cell without a run counts as not good."""
    cells = cfg.cells()
    hits = sum(any(good(r, target) for r in runs
                   if all(r.spec.group[k] == v for k, v in cell.items()))
               for cell in cells)
    return hits / len(cells)


class Hyperparameters(Experiment):
    name = "hyperparameters"
    claim = "Batch norm makes a network more robust to the choice of hyperparameters."
    seeds = "000"
    quote = ("It makes the network more robust to the choice of hyperparameters and can lead "
             "to better generalization.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift; Santurkar et al., NeurIPS 2018, "
              "How Does Batch Normalization Help Optimization?; Bjorck et al., NeurIPS 2018, "
              "Understanding Batch Normalization")
    literature = (
        "None of these papers measures a grid of learning rate × initialisation × batch "
        "size. Ioffe & Szegedy (Inception, ImageNet) trained with 5× and 30× the learning "
        "rate and say BN lets one be \"less careful about initialization\". Santurkar et al. "
        "(VGG on CIFAR-10, their Fig. 1) show the BN network training well at learning rates "
        "where the plain one trains worse or not at all, and attribute it to a smoother loss "
        "landscape. Bjorck et al. (ResNets on CIFAR-10) find the usable learning-rate range "
        "wider with BN. Directions from their figures; no number is given here."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With BN, more of the usual learning-rate, init-scale and batch-size "
                     "choices work, so a rough first guess is more likely to train well.",
        "not supported": "BN does not make this network's hyperparameter choice noticeably "
                         "easier; tune as carefully as without it.",
        "inconclusive": "The seeds disagree on how much of the grid BN rescues; do not count "
                        "on BN to make tuning easier without more seeds.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, lrs=(0.1,), scales=(1.0,), batches=(16, 32),
                        eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=400),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=400),
    }

    def protocol(self, cfg: Config) -> str:
        targets = ", ".join(f"{d} {100 * t:g} %" for d, t in cfg.targets.items())
        return (
            f"{model_text(cfg.model, cfg.model_kwargs)} with norm=bn vs norm=none, SGD "
            f"momentum {cfg.momentum}, {cfg.steps} steps in every cell of the grid lr "
            f"{list(cfg.lrs)} × init scale {list(cfg.scales)} (every linear weight × it after "
            f"the default init) × batch {list(cfg.batches)} ({len(cfg.cells())} cells), seeds "
            f"{list(cfg.seeds)}; a cell is good when its run ends at or above the target "
            f"final test accuracy ({targets}) without diverging. An MLP, not the seed CNN: "
            f"the claim is generic and the grid on the CNN does not fit the lab's budget."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, **cell}, seed, train_config(
                cfg, dataset, seed, norm=norm, lr=cell["lr"], init_scale=cell["init_scale"],
                batch_size=cell["batch"], eval_every=cfg.steps,
            ))
            for norm in ("none", "bn")
            for cell in cfg.cells()
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        target = dataset_target(cfg.targets, results)
        table = []
        for norm in ("none", "bn"):
            for cell in cfg.cells():
                rs = select(results, norm=norm, **cell)
                table.append(acc_row({"norm": norm, **cell}, rs,
                                     good=sum(good(r, target) for r in rs)))
        fractions = {n: [good_fraction(cfg, [r for r in select(results, norm=n)
                                             if r.spec.seed == s], target)
                         for s in cfg.seeds]
                     for n in ("none", "bn")}
        decision = PAIRED.decide([100 * (b - a) for a, b in
                                  zip(fractions["none"], fractions["bn"], strict=True)])
        if all(a == b and a in (0.0, 1.0)
               for a, b in zip(fractions["none"], fractions["bn"], strict=True)):
            decision = replace(decision, verdict="inconclusive")
        headline = (
            f"Share of the {len(cfg.cells())}-cell grid (learning rate × init scale × batch "
            f"size) reaching {100 * target:g} %: BN {fmt_ms(fractions['bn'])}, no BN "
            f"{fmt_ms(fractions['none'])} ({decision.pm(1)} points of the grid with BN)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, before={
            "good_fraction_bn": sum(fractions["bn"]) / len(fractions["bn"]),
            "good_fraction_none": sum(fractions["none"]) / len(fractions["none"]),
            "cells": len(cfg.cells()), "target": target,
        }), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        target = dataset_target(cfg.targets, results)
        plt = pyplot()
        rows = [(lr, b) for lr in cfg.lrs for b in cfg.batches]
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 0.5 * len(rows) + 2.0), sharey=True)
        for ax, norm in zip(axes, ("bn", "none"), strict=True):
            grid = [[100 * sum(final_acc(r) for r in rs) / len(rs) if rs else float("nan")
                     for s in cfg.scales
                     for rs in [select(results, norm=norm, lr=lr, init_scale=s, batch=b)]]
                    for lr, b in rows]
            ax.imshow(grid, vmin=10, vmax=100, cmap="viridis", aspect="auto")
            for i, row in enumerate(grid):
                for j, acc in enumerate(row):
                    ax.text(j, i, f"{acc:.0f}", ha="center", va="center",
                            color="white" if acc < 100 * target else "black", fontsize=8)
            ax.set_xticks(range(len(cfg.scales)), [f"{s:g}" for s in cfg.scales])
            ax.set_xlabel("init scale")
            ax.set_title(f"{norm}: final test accuracy (%)")
        axes[0].set_yticks(range(len(rows)), [f"lr {lr:g}, batch {b}" for lr, b in rows])
        fig.suptitle(f"{cfg.model}, {cfg.steps} steps: black = at or above the target "
                     f"{100 * target:g} % (mean over seeds)")
        fig.tight_layout()
        return [save(fig, out_dir / "hyperparameters.png")]


EXPERIMENT = Hyperparameters()
