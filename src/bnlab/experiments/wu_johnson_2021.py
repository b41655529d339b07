"""Literature: EMA running statistics against precise statistics (Wu & Johnson 2021).

Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021, §3) evaluate BN networks with the
EMA running statistics that training keeps and with "precise" statistics recomputed over
many training batches with the final weights (PreciseBN). With a high learning rate the
weights move fast and the EMA, which averages statistics of older weights, lags behind
them: precise statistics evaluate better, most visibly early in training or with a large
learning rate (ResNet-50 on ImageNet).

Protocol: ``deep_mlp`` with BN at a high learning rate, evaluated at a few checkpoints. The
run to checkpoint ``s`` trains ``s`` steps with the run's seed: with a constant learning
rate and seeded batches it is exactly the first ``s`` steps of the longest run. At each
checkpoint, test accuracy on a fixed test subset three ways: with the EMA running
statistics (``model.eval()``), with precise statistics (a copy recalibrated with
:func:`bnlab.nn.recalibrate_bn` over a fixed set of training images), and with the test
batch's own statistics at the training batch size (what training normalises with: the
train/inference gap). Metric per seed: precise minus EMA accuracy, averaged over the
checkpoints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bnlab.experiments.analysis import fmt_ms, select, table_row
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
from bnlab.experiments.train_eval import accuracy
from bnlab.experiments.verdict import PairedClaim, compare

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINTS = (50, 100, 200, 400, 1000)
VARIANTS = ("ema", "precise", "batch")
PAIRED = PairedClaim(
    "Per seed: test accuracy with precise statistics (recalibrated over training images) "
    "minus with the EMA running statistics, averaged over the checkpoints",
    threshold=0.5, key="precise_gain_pp",
    note="Each checkpoint's difference, and the gap to the batch statistics training uses, "
         "are shown with their intervals, not decided on.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """BN at ``lr``; evaluated at each step of ``checkpoints`` on the first
    ``eval_subset`` test images; precise statistics from the first ``recal_images``
    training images in batches of ``recal_batch``."""

    checkpoints: tuple[int, ...] = CHECKPOINTS
    recal_images: int = 10000
    recal_batch: int = 500
    lr: float = 0.3
    eval_subset: int | None = 2000
    model: str = "deep_mlp"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"depth": 8, "width": 100})


def precise_copy(model: nn.Module, x: torch.Tensor, batch: int) -> nn.Module:
    """A copy of ``model`` whose BN statistics are the precise ones: recalibrated with
    :func:`bnlab.nn.recalibrate_bn` (layer by layer) over ``x`` in batches of ``batch``.
    ``model`` itself is not changed."""
    from bnlab.nn import recalibrate_bn

    net = copy.deepcopy(model)
    recalibrate_bn(net, [x[i:i + batch] for i in range(0, len(x), batch)], progress=False)
    return net


def train_precise(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Train, then the summary's ``eval_variants``: accuracy on the first
    ``params["eval_subset"]`` test images with the EMA statistics, with precise statistics
    (:func:`precise_copy` over the first ``params["recal_images"]`` training images), and
    with batch statistics at the training batch size."""
    from bnlab.train import train

    result = train(spec.config, out_dir=None, progress=ctx.progress, data=ctx.data)
    n, p = spec.params["eval_subset"], spec.params
    x, y = ctx.data.test.tensors[0][:n], ctx.data.test.tensors[1][:n]
    precise = precise_copy(result.model, ctx.data.train.tensors[0][:p["recal_images"]],
                           p["recal_batch"])
    evals = {
        "ema": accuracy(result.model, x, y, 1000, batch_stats=False),
        "precise": accuracy(precise, x, y, 1000, batch_stats=False),
        "batch": accuracy(result.model, x, y, spec.config.batch_size, batch_stats=True),
    }
    if result.summary.get("diverged"):
        evals = {k: 1.0 / ctx.data.num_classes for k in evals}
    return RunOutput(result.metrics, {**result.summary, "eval_variants": evals})


def variant(r: RunResult, name: str) -> float:
    return float(r.summary["eval_variants"][name])


class WuJohnson2021(Experiment):
    name = "wu-johnson-2021"
    claim = ("With a high learning rate the EMA running statistics lag behind the weights: "
             "precise statistics, recomputed with the current weights, evaluate better.")
    seeds = "003"
    quote = ("During **inference**, **running mean and running variance** are used for "
             "stable predictions.")
    section = "literature"
    papers = "Wu & Johnson, 2021, Rethinking \"Batch\" in BatchNorm"
    literature = (
        "ResNet-50 on ImageNet (their §3, figures of validation accuracy along training): "
        "evaluated with the EMA running statistics, accuracy is lower and noisier than with "
        "precise statistics (PreciseBN) at the same weights; the gap is large early in "
        "training and with a large learning rate, and small at the end of a "
        "standard schedule. The lab compares the direction, not ImageNet accuracies."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "When you evaluate a BN network trained at a high learning rate (or "
                     "mid-training), recompute its statistics over a few thousand training "
                     "images first (recalibrate_bn): the EMA's numbers understate it.",
        "not supported": "Here the EMA running statistics evaluated as well as precise ones: "
                         "recalibrating before evaluation buys little for a model like this.",
        "inconclusive": "The runs cannot tell whether precise statistics beat the EMA here; "
                        "recalibrating is cheap, so check it on your own checkpoints.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=20, checkpoints=(10, 20), eval_subset=200,
                        recal_images=400, recal_batch=200),
        "quick": Config(seeds=(0, 1, 2), steps=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} {cfg.model_kwargs} with norm=bn (momentum 0.1), SGD lr {cfg.lr} "
            f"momentum {cfg.momentum}, batch {cfg.batch_size}, seeds {list(cfg.seeds)}; at "
            f"steps {list(cfg.checkpoints)} (the run to a step is the first steps of the "
            f"longest: same seed, constant lr), accuracy on the first {cfg.eval_subset} test "
            f"images with the EMA running statistics, with precise statistics recomputed "
            f"(bnlab.nn.recalibrate_bn, layer by layer) over the first {cfg.recal_images} "
            f"training images in batches of {cfg.recal_batch}, and with each test batch's "
            f"own statistics at batch {cfg.batch_size}; a diverged run counts as chance."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        params = {"eval_subset": cfg.eval_subset, "recal_images": cfg.recal_images,
                  "recal_batch": cfg.recal_batch}
        return [
            RunSpec({"step": s}, seed,
                    train_config(cfg, dataset, seed, norm="bn", steps=s, eval_every=s),
                    kind="train+precise", params=params)
            for s in cfg.checkpoints for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"train+precise": train_precise}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        per_checkpoint = []
        for s in cfg.checkpoints:
            rs = select(results, step=s)
            diffs = [100 * (variant(r, "precise") - variant(r, "ema")) for r in rs]
            per_checkpoint.append(diffs)
            table.append(table_row(
                {"step": s}, **{f"{v}_acc": fmt_ms([variant(r, v) for r in rs])
                                for v in VARIANTS},
                precise_minus_ema_pp=compare(diffs, 0.0).pm(2), seeds=len(rs),
            ))
        per_seed = [sum(d) / len(d) for d in zip(*per_checkpoint, strict=True)]
        decision = PAIRED.decide(per_seed)
        first = compare(per_checkpoint[0], 0.0)
        gap_ema = compare([
            sum(100 * (variant(r, "batch") - variant(r, "ema")) for r in rs) / len(rs)
            for rs in zip(*(select(results, step=s) for s in cfg.checkpoints), strict=True)
        ], 0.0)
        headline = (
            f"Precise minus EMA statistics, mean over steps {list(cfg.checkpoints)}: "
            f"{decision.pm(2)} points; at step {cfg.checkpoints[0]}: {first.pm(2)}."
        )
        notes = [f"Train/inference gap (batch statistics at batch {cfg.batch_size} minus EMA "
                 f"statistics), mean over the checkpoints: {gap_ema.pm(2)} points."]
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"first_checkpoint_gain_pp": first.mean,
                             "batch_minus_ema_pp": gap_ema.mean},
        ), table, notes)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        labels = {"ema": "EMA running statistics", "precise": "precise statistics",
                  "batch": f"batch statistics ({cfg.batch_size})"}
        for v in VARIANTS:
            ys = []
            for s in cfg.checkpoints:
                rs = select(results, step=s)
                ys.append(100 * sum(variant(r, v) for r in rs) / len(rs))
            ax.plot(list(cfg.checkpoints), ys, "o-", label=labels[v])
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"test accuracy (%), first {cfg.eval_subset} images")
        ax.set_title(f"{cfg.model}, lr {cfg.lr}: EMA vs precise BN statistics")
        ax.legend()
        ax.grid(alpha=0.3)
        return [save(fig, out_dir / "wu_johnson_2021.png")]


EXPERIMENT = WuJohnson2021()
