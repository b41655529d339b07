"""Claim: batch norm regularises (seeds 000, 001).

Protocol: a small training subset trained for many epochs, so the network can overfit;
a deep MLP (``deep_mlp``, 4 hidden ReLU blocks of width 100) with and without BN, each
with and without dropout (for scale: dropout is the regulariser BN is compared to).
Metric: the generalisation gap, final training accuracy (on the subset) minus test
accuracy. The MLP, not the seed CNN, so that five seeds fit the lab's budget; the claim
is about BN in general.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    Experiment,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim

DROPOUTS = (0.0, 0.5)
PAIRED = PairedClaim(
    "Per seed, without dropout: generalisation gap (train − test accuracy) without BN "
    "minus with BN", threshold=0.5, key="gap_diff_pp",
    note="Dropout runs are shown for scale.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """The first ``train_subset`` training images, each dropout rate of ``dropouts``."""

    train_subset: int = 5000
    dropouts: tuple[float, ...] = DROPOUTS


def train_acc(r: RunResult) -> float:
    """Final accuracy on the training subset (from the last evaluation that has it)."""
    for m in reversed(r.metrics):
        if m.get("train_acc") is not None:
            v = float(m["train_acc"])
            return v if math.isfinite(v) else r.chance
    last = r.summary.get("train_acc")
    return float(last) if last is not None else math.nan


def gap(r: RunResult) -> float:
    return train_acc(r) - final_acc(r)


class Regularization(Experiment):
    name = "regularization"
    claim = "Batch norm has a regularising effect: it reduces overfitting."
    seeds = "000, 001"
    quote = ("Batch Normalization has a slight regularization effect. This is because the "
             "normalization is done over a mini-batch, introducing some noise to the input "
             "of the next layer, which can help in reducing overfitting. (000) … Batch "
             "Normalization has a slight regularizing effect, similar to **Dropout**. (001)")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift; Luo, Wang, Shao & Peng, ICLR "
              "2019, Towards Understanding Regularization in Batch Normalization")
    literature = (
        "Ioffe & Szegedy (Inception on ImageNet): BN 'also acts as a regularizer, in some "
        "cases eliminating the need for Dropout'; they removed dropout from their BN "
        "network without more overfitting. Luo et al. (theory, with CNN experiments): BN's "
        "regularisation comes from the noise of the batch statistics (a decay on BN's "
        "scale), so it weakens as the batch grows."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "BN narrows the train − test gap by itself: with BN, start with less "
                     "dropout or other regularisation and add it back only if the model "
                     "overfits.",
        "not supported": "BN does not reduce overfitting here: keep dropout, weight decay "
                         "or data augmentation as if BN were absent.",
        "inconclusive": "The runs cannot tell whether BN reduces overfitting by the claimed "
                        "size: do not count on BN as a regulariser.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, train_subset=200, eval_subset=200,
                        model="deep_mlp"),
        "quick": Config(seeds=(0, 1, 2), steps=2000, model="deep_mlp"),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=2000, model="deep_mlp"),
    }

    def protocol(self, cfg: Config) -> str:
        epochs = cfg.steps * cfg.batch_size / cfg.train_subset
        return (
            f"{cfg.model} (4 hidden blocks Linear → norm → ReLU of width 100, dropout after "
            f"each) on the first {cfg.train_subset} training images, norm=bn vs none × "
            f"dropout in {list(cfg.dropouts)}, SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps (≈ {epochs:.0f} epochs), seeds "
            f"{list(cfg.seeds)}; gap = accuracy on the training subset − accuracy on "
            f"{eval_set_text(cfg.eval_subset)}. The same protocol on every dataset."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "dropout": p}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=max(1, cfg.steps // 2),
                train_subset=cfg.train_subset, eval_train=True,
                model_kwargs={**cfg.model_kwargs, "dropout": p},
            ))
            for norm in ("none", "bn")
            for p in cfg.dropouts
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in ("none", "bn"):
            for p in cfg.dropouts:
                rs = select(results, norm=norm, dropout=p)
                table.append(table_row(
                    {"norm": norm, "dropout": p},
                    train_acc=fmt_ms([train_acc(r) for r in rs]),
                    test_acc=fmt_ms([final_acc(r) for r in rs]),
                    gap_pp=fmt_ms([gap(r) for r in rs], unit=""), seeds=len(rs),
                ))
        none = select(results, norm="none", dropout=0.0)
        bn = select(results, norm="bn", dropout=0.0)
        decision = PAIRED.decide(paired_diffs_pp(none, bn, gap))
        headline = (
            f"Train − test gap without dropout: BN {fmt_ms([gap(r) for r in bn], unit='')} vs "
            f"no BN {fmt_ms([gap(r) for r in none], unit='')} points ({decision.pm(2)} "
            f"smaller with BN)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        labels, trains, tests = [], [], []
        for norm in ("none", "bn"):
            for p in cfg.dropouts:
                rs = select(results, norm=norm, dropout=p)
                labels.append(f"{norm}\ndropout {p:g}")
                trains.append(100 * sum(train_acc(r) for r in rs) / len(rs))
                tests.append(100 * sum(final_acc(r) for r in rs) / len(rs))
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], trains, 0.4, label="train subset")
        ax.bar([x + 0.2 for x in xs], tests, 0.4, label="test")
        ax.set_xticks(list(xs), labels)
        ax.set_ylim(max(0.0, min(tests + trains) - 5), 100.5)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{cfg.model}, {cfg.train_subset} training images: train vs test")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        return [save(fig, out_dir / "regularization.png")]


EXPERIMENT = Regularization()
