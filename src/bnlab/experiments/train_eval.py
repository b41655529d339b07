"""Claim: at inference BN uses its running statistics, not the batch's (seeds 001, 003).

Protocol: the seed CNN with BN, trained with BN momentum 0.1 (the default, the verdict's)
and None (cumulative average). After training, test accuracy on a fixed test subset with the
running statistics (``model.eval()``), and with the batch's own statistics (BN layers in
train mode) for eval batches of several sizes, down to 2 images: what a model that forgot
``model.eval()`` does. The batch-statistics evaluation runs on a copy of the model with BN
momentum 0, so the trained model and its running statistics are never changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.analysis import eval_set_text, fmt_ms, select, table_row
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunContext,
    RunFunction,
    RunOutput,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim

MOMENTA: tuple[float | None, ...] = (0.1, None)
EVAL_BATCHES = (1000, 32, 8, 2)
PAIRED = PairedClaim(
    "Per seed, with the default BN momentum 0.1: test accuracy with running statistics "
    "minus accuracy with batch statistics at the smallest eval batch", threshold=1.0,
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """BN momentum in ``momenta``; then eval with running statistics and with the batch's
    own at each size of ``eval_batches``, on the ``eval_subset`` test images."""

    momenta: tuple[float | None, ...] = MOMENTA
    eval_batches: tuple[int, ...] = EVAL_BATCHES


class TrainEval(Experiment):
    name = "train-eval"
    claim = "At inference, BN must use its running statistics rather than batch statistics."
    seeds = "001, 003"
    quote = ("During inference (testing or evaluation), the batch statistics (mean and "
             "variance) computed during training are used instead of recalculating them for "
             "each mini-batch. (001) … During **inference**, **running mean and running "
             "variance** are used for stable predictions. (003)")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift")
    literature = (
        "Ioffe & Szegedy (their Algorithm 2): at inference each BN layer normalises with "
        "population statistics, the mean over training mini-batches of the batch means and "
        "the unbiased mean of the batch variances (in practice moving averages), so the "
        "output depends on the input alone and not on the rest of the batch."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Always call model.eval() before inference: with batch statistics "
                     "from small batches the accuracy drops.",
        "not supported": "Running and batch statistics gave about the same accuracy here, "
                         "even for small eval batches; still call model.eval() so that a "
                         "prediction does not depend on the rest of the batch.",
        "inconclusive": "The runs cannot tell how much batch statistics at inference cost: "
                        "call model.eval() anyway.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, eval_subset=200, eval_batches=(100, 2)),
        "quick": Config(seeds=(0, 1, 2), steps=300, eval_subset=2000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=300, eval_subset=2000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn, BN momentum in {list(cfg.momenta)}, SGD lr {cfg.lr} "
            f"momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps, seeds "
            f"{list(cfg.seeds)}; then accuracy on {eval_set_text(cfg.eval_subset)} "
            f"with running statistics and with batch statistics at eval batch sizes "
            f"{list(cfg.eval_batches)}. The same protocol on every dataset."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"bn_momentum": m}, seed, train_config(
                cfg, dataset, seed, norm="bn", eval_every=cfg.steps, norm_kwargs={"momentum": m},
            ), kind="train+eval-variants",
                params={"eval_subset": cfg.eval_subset, "eval_batches": list(cfg.eval_batches)})
            for m in cfg.momenta
            for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"train+eval-variants": train_then_eval_variants}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for m in cfg.momenta:
            rs = select(results, bn_momentum=m)
            cols = {"running_stats": fmt_ms([r.summary["eval_variants"]["running"] for r in rs])}
            for b in cfg.eval_batches:
                cols[f"batch_stats_{b}"] = fmt_ms(
                    [r.summary["eval_variants"][f"batch_{b}"] for r in rs])
            table.append(table_row({"bn_momentum": m}, **cols, seeds=len(rs)))
        small = f"batch_{min(cfg.eval_batches)}"
        rs = select(results, bn_momentum=0.1)
        decision = PAIRED.decide([
            100 * (r.summary["eval_variants"]["running"] - r.summary["eval_variants"][small])
            for r in rs])
        headline = (
            f"Momentum 0.1: running statistics "
            f"{fmt_ms([r.summary['eval_variants']['running'] for r in rs])} vs batch statistics "
            f"of {min(cfg.eval_batches)} images "
            f"{fmt_ms([r.summary['eval_variants'][small] for r in rs])} "
            f"({decision.pm(1)} points)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"smallest_eval_batch": min(cfg.eval_batches)},
        ), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        variants = ["running", *(f"batch_{b}" for b in cfg.eval_batches)]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            ys = []
            for m in cfg.momenta:
                rs = select(results, bn_momentum=m)
                ys.append(100 * sum(r.summary["eval_variants"][v] for r in rs) / len(rs))
            label = "running stats" if v == "running" else f"batch stats, {v[6:]} per batch"
            ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(ys))], ys,
                   width, label=label)
        ax.set_xticks(range(len(cfg.momenta)), [f"momentum {m}" for m in cfg.momenta])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{cfg.model}: eval with running vs batch statistics")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        return [save(fig, out_dir / "train_eval.png")]


def train_then_eval_variants(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Train, then the summary's ``eval_variants``: test accuracy with the running
    statistics and with batch statistics at each of ``spec.params["eval_batches"]``."""
    from bnlab.train import train

    result = train(spec.config, out_dir=None, progress=ctx.progress, data=ctx.data)
    n = spec.params["eval_subset"]
    x, y = ctx.data.test.tensors[0][:n], ctx.data.test.tensors[1][:n]
    evals = {"running": accuracy(result.model, x, y, 1000, batch_stats=False)}
    for b in spec.params["eval_batches"]:
        evals[f"batch_{b}"] = accuracy(result.model, x, y, b, batch_stats=True)
    return RunOutput(result.metrics, {**result.summary, "eval_variants": evals})


def accuracy(model: Any, x: Any, y: Any, batch: int, *, batch_stats: bool) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode; with ``batch_stats`` the BN layers of
    a throwaway copy are put in train mode with momentum 0, so each batch is normalised with
    its own statistics and no running statistic changes (dropout stays off)."""
    import torch
    from torch import nn

    net = copy.deepcopy(model)
    net.eval()
    if batch_stats:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            if batch_stats and len(xb) < 2:
                xb = x[i - 1:i + 1]  # a leftover single image is normalised with its neighbour
                correct += int((net(xb).argmax(1)[-1:] == y[i:i + 1]).sum())
                continue
            correct += int((net(xb).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


EXPERIMENT = TrainEval()
