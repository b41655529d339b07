"""Claim: with batch norm, dropout works better (seed 003), read against Li et al. 2019.

Protocol: a deep MLP (``deep_mlp``: Linear → norm → ReLU blocks, dropout after each block,
so every BN layer but the first receives dropped-out inputs through its linear layer:
dropout *before* BN) on a training subset, with and without BN, at dropout rates 0 and
``dropouts``. After training, for each BN layer, the variance shift: the per-channel
variance of its input at inference (eval mode, dropout off, over the training subset)
divided by the running variance it learnt in training mode (dropout on), averaged over
channels. Then the statistics are re-estimated with dropout off
(:func:`bnlab.nn.recalibrate_bn` on the training subset) and the test accuracy measured
again. The verdict: does BN with dropout beat both BN alone and dropout alone?
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.analysis import eval_set_text, final_acc, fmt_ms, select, table_row
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
    train_run,
)
from bnlab.experiments.verdict import PairedClaim, interval, mean_std, pm

NORMS = ("none", "bn")
PAIRED = PairedClaim(
    "Per seed, at the claim's dropout rate: test accuracy of BN with dropout minus the "
    "better of BN without dropout and dropout without BN", threshold=0.5,
    key="combined_gain_pp",
    note="The variance shift, the accuracy cost of dropout before BN and the repair by "
         "recalibration are reported with their intervals; they do not enter the verdict.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Dropout rates ``dropouts`` (and 0), the verdict at ``claim_dropout``; the first
    ``train_subset`` training images."""

    train_subset: int = 10000
    dropouts: tuple[float, ...] = (0.2, 0.5)
    claim_dropout: float = 0.2


def variance_shift(model: Any, x: Any, batch: int = 1000) -> dict[str, float]:
    """For each BN layer of ``model`` (by qualified name): the mean over channels of its
    input's variance at inference over ``x`` (eval mode: dropout off, every BN normalising
    with its running statistics; unbiased, as ``running_var``) divided by its
    ``running_var``. 1 means the training-mode statistics describe what the layer sees at
    inference. The model's modes are put back."""
    import torch

    from bnlab.nn._base import eval_mode
    from bnlab.nn._moments import Moments
    from bnlab.nn.replace import batchnorm_layers

    layers = dict(batchnorm_layers(model))
    totals: dict[str, Moments] = {}

    def hook(name: str) -> Any:
        def pre(_module: Any, args: tuple[Any, ...]) -> None:
            part = Moments.measure(args[0])
            totals[name] = totals[name].merge(part) if name in totals else part
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in layers.items():
        running = m.running_var
        if not isinstance(running, torch.Tensor):
            raise ValueError(f"variance_shift: BN layer {name} keeps no running variance")
        t = totals[name]
        out[name] = float((t.m2 / (t.n - 1) / running.double()).mean())
    return out


def train_shift_recalibrate(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Train, then the summary's ``variance_shift`` (per BN layer, see
    :func:`variance_shift`, over the training subset) and ``recalibrated_acc``: test
    accuracy after :func:`bnlab.nn.recalibrate_bn` on the training subset (dropout off),
    on a copy (the trained model is left as it is)."""
    from bnlab.nn import recalibrate_bn
    from bnlab.train import train
    from bnlab.train.loop import evaluate

    cfg = spec.config
    result = train(cfg, out_dir=None, progress=ctx.progress, data=ctx.data)
    x = ctx.data.train.tensors[0][:cfg.train_subset]
    shift = variance_shift(result.model, x)
    fixed = recalibrate_bn(copy.deepcopy(result.model), [x[i:i + 1000] for i in
                                                          range(0, len(x), 1000)],
                           progress=False)
    _, acc = evaluate(fixed, ctx.data.test, limit=cfg.eval_subset)
    return RunOutput(result.metrics, {**result.summary, "variance_shift": shift,
                                      "recalibrated_acc": acc,
                                      "shift_after_recalibration": variance_shift(fixed, x)})


def shift_of(r: RunResult) -> float:
    """The run's variance shift averaged over its BN layers that receive dropped-out inputs
    (every layer but the first); nan for a run without BN."""
    shifts = list(r.summary.get("variance_shift", {}).values())[1:]
    return sum(shifts) / len(shifts) if shifts else math.nan


class Dropout(Experiment):
    name = "dropout"
    claim = "With batch norm, dropout and other regularisation work better."
    seeds = "003"
    quote = ("Prepares for Dropout / Regularization … Inputs are more stable, so dropout "
             "and other regularization methods work better.")
    section = "claim"
    papers = ("Li, Chen, Hu & Yang, CVPR 2019, Understanding the Disharmony between Dropout "
              "and Batch Normalization by Variance Shift")
    literature = (
        "Li et al. (analysis, and ResNet/DenseNet-style networks on CIFAR-10/100 and "
        "ImageNet): dropout placed before BN makes a BN layer's input variance at inference "
        "differ from the running variance it learnt in training (the 'variance shift'); "
        "the combination then often performs worse than either alone. Their remedies: "
        "dropout after the last BN layer only, or a variance-stable form of dropout. The "
        "lab also re-estimates BN's statistics with dropout off, which removes the shift "
        "by construction, and measures what that repairs."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Dropout before BN helped beyond what either gives alone here: "
                     "combining them is worth trying.",
        "not supported": "Dropout before BN did not beat the better of the two alone: put "
                         "dropout after the last BN layer, or recalibrate BN with dropout "
                         "off, rather than stacking them.",
        "inconclusive": "The runs cannot tell whether combining dropout with BN helps: "
                        "measure it on your own model before relying on it.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, train_subset=500, eval_subset=200,
                        model="deep_mlp", dropouts=(0.2,)),
        "quick": Config(seeds=(0, 1, 2), steps=2000, model="deep_mlp"),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=2000, model="deep_mlp"),
    }

    def protocol(self, cfg: Config) -> str:
        epochs = cfg.steps * cfg.batch_size / cfg.train_subset
        return (
            f"{cfg.model} (4 hidden blocks Linear → norm → ReLU of width 100, dropout after "
            f"each block, so before the next block's BN) on the first {cfg.train_subset} "
            f"training images, norm=bn vs none × dropout in {[0.0, *cfg.dropouts]} (the "
            f"verdict at {cfg.claim_dropout:g}), SGD lr {cfg.lr} momentum {cfg.momentum}, "
            f"batch {cfg.batch_size}, {cfg.steps} steps (≈ {epochs:.0f} epochs), seeds "
            f"{list(cfg.seeds)}; accuracy on {eval_set_text(cfg.eval_subset)}. BN runs: "
            f"variance shift per BN layer (input variance at inference / running variance, "
            f"over the training subset, mean over channels; the summary shift averages the "
            f"layers after a dropout), then recalibrate_bn on the training subset with "
            f"dropout off and the accuracy again. The same protocol on every dataset."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "dropout": p}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
                train_subset=cfg.train_subset, model_kwargs={**cfg.model_kwargs, "dropout": p},
            ), kind="train+variance-shift" if norm == "bn" else "train")
            for norm in NORMS
            for p in (0.0, *cfg.dropouts)
            for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"train": train_run, "train+variance-shift": train_shift_recalibrate}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in NORMS:
            for p in (0.0, *cfg.dropouts):
                rs = select(results, norm=norm, dropout=p)
                cols: dict[str, Any] = {"test_acc": fmt_ms([final_acc(r) for r in rs])}
                if norm == "bn":
                    cols["recalibrated_acc"] = fmt_ms([r.summary["recalibrated_acc"]
                                                       for r in rs])
                    for layer in rs[0].summary["variance_shift"]:
                        cols[f"shift_{layer}"] = fmt_ms(
                            [r.summary["variance_shift"][layer] for r in rs], 1.0, "")
                table.append(table_row({"norm": norm, "dropout": p}, **cols, seeds=len(rs)))
        p = cfg.claim_dropout
        both = select(results, norm="bn", dropout=p)
        bn_only = select(results, norm="bn", dropout=0.0)
        drop_only = select(results, norm="none", dropout=p)
        decision = PAIRED.decide([
            100 * (final_acc(c) - max(final_acc(b), final_acc(d)))
            for c, b, d in zip(both, bn_only, drop_only, strict=True)])
        cost = [100 * (final_acc(c) - final_acc(b)) for c, b in zip(both, bn_only, strict=True)]
        repair = [100 * (c.summary["recalibrated_acc"] - final_acc(c)) for c in both]
        shift = [shift_of(c) for c in both]
        effect: dict[str, Any] = {}
        text: dict[str, str] = {}
        for key, values in (("dropout_cost_pp", cost), ("repair_gain_pp", repair),
                            ("variance_shift", shift),
                            ("variance_shift_no_dropout", [shift_of(b) for b in bn_only])):
            m, _, n = mean_std(values)
            low, high = interval(values)
            effect |= {key: m, f"{key}_ci_low": low, f"{key}_ci_high": high}
            text[key] = pm(m, low, high, n, 2)
        headline = (
            f"BN with dropout {p:g} minus the better of BN alone and dropout alone: "
            f"{decision.pm(2)} points; dropout before BN changes BN's test accuracy by "
            f"{text['dropout_cost_pp']} points; the BN layers after a dropout see at "
            f"inference {text['variance_shift'].replace('+', '')} times the variance they "
            f"learnt; recalibrating with dropout off adds {text['repair_gain_pp']} points."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={**effect, "claim_dropout": p}), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 4.0))
        rates = (0.0, *cfg.dropouts)
        series = [("no BN", "none", final_acc), ("BN", "bn", final_acc),
                  ("BN, recalibrated", "bn", lambda r: float(r.summary["recalibrated_acc"]))]
        width = 0.8 / len(series)
        for i, (label, norm, metric) in enumerate(series):
            ys = [100 * sum(metric(r) for r in rs) / len(rs)
                  for rs in (select(results, norm=norm, dropout=p) for p in rates)]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rates))], ys,
                   width, label=label)
        ax.set_xticks(range(len(rates)), [f"dropout {p:g}" for p in rates])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        for p in rates:
            rs = select(results, norm="bn", dropout=p)
            layers = list(rs[0].summary["variance_shift"])
            ys = [sum(r.summary["variance_shift"][n] for r in rs) / len(rs) for n in layers]
            bx.plot(range(len(layers)), ys, marker="o", label=f"dropout {p:g}")
        bx.axhline(1.0, color="grey", lw=0.8)
        bx.set_xlabel("BN layer (forward order)")
        bx.set_ylabel("inference variance / running variance")
        bx.set_title("variance shift")
        bx.legend(fontsize=8)
        bx.grid(alpha=0.3)
        fig.suptitle(f"{cfg.model}, {cfg.train_subset} training images: dropout before BN")
        return [save(fig, out_dir / "dropout.png")]


EXPERIMENT = Dropout()
