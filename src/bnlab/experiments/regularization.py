"""Claim: batch norm regularises (seeds 000, 001).

Protocol: a small training subset trained for many epochs, so the network can overfit;
the seed CNN with and without BN, each with and without dropout (for scale: dropout is the
regulariser BN is compared to). Metric: the generalisation gap, final training accuracy
(on the subset) minus test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    compare,
    eval_set_text,
    final_acc,
    fmt_ms,
    paired_diffs_pp,
    pm,
    select,
    table_row,
    train_config,
)

THRESHOLD_PP = 0.5
DROPOUTS = (0.0, 0.5)


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...]
    steps: int
    train_subset: int = 5000
    dropouts: tuple[float, ...] = DROPOUTS
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    eval_subset: int | None = None
    model: str = "seed_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def train_acc(r: RunResult) -> float:
    """Final accuracy on the training subset (from the last evaluation that has it)."""
    for m in reversed(r.metrics):
        if m.get("train_acc") is not None:
            v = float(m["train_acc"])
            return v if math.isfinite(v) else 0.1
    last = r.summary.get("train_acc")
    return float(last) if last is not None else math.nan


def gap(r: RunResult) -> float:
    return train_acc(r) - final_acc(r)


class Regularization(Experiment):
    name = "regularization"
    claim = "Batch norm has a regularising effect: it reduces overfitting."
    seeds = "000, 001"
    rule = (
        f"Per seed, without dropout: generalisation gap (train − test accuracy) without BN "
        f"minus with BN. supported if the mean is at least {THRESHOLD_PP:g} percentage "
        f"point and more than 2 standard errors above zero; not supported if mean + 2 SE is "
        f"below {THRESHOLD_PP:g}; inconclusive otherwise. Dropout runs are shown for scale."
    )
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, train_subset=200, eval_subset=200),
        "quick": Config(seeds=(0,), steps=800, eval_subset=5000),
        "full": Config(seeds=(0, 1, 2), steps=3000),
    }

    def protocol(self, cfg: Config) -> str:
        epochs = cfg.steps * cfg.batch_size / cfg.train_subset
        return (
            f"{cfg.model} on the first {cfg.train_subset} training images, norm=bn vs none × "
            f"dropout in {list(cfg.dropouts)}, SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps (≈ {epochs:.0f} epochs), seeds "
            f"{list(cfg.seeds)}; gap = accuracy on the training subset − accuracy on "
            f"{eval_set_text(cfg.eval_subset)}."
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
        diffs = paired_diffs_pp(none, bn, gap)
        verdict, d, se = compare(diffs, THRESHOLD_PP)
        headline = (
            f"Train − test gap without dropout: BN {fmt_ms([gap(r) for r in bn], unit='')} vs "
            f"no BN {fmt_ms([gap(r) for r in none], unit='')} points ({pm(d, se, len(diffs), 2)} "
            f"smaller with BN)."
        )
        return Analysis(verdict, headline, {
            "gap_diff_pp": d, "se_pp": se, "threshold_pp": THRESHOLD_PP, "seeds": len(diffs),
        }, table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import _pyplot, save

        plt = _pyplot()
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
