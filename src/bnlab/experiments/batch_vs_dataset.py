"""Claim: BN normalises with each batch's statistics inside the network, which does more
than normalising the inputs once with the dataset's statistics (seed 002).

Protocol: the same network trained four ways, paired by seed: raw inputs (pixels in
[0, 1]) or inputs standardised once with the training set's mean and standard deviation
(what the lab's data loader does: one scalar each), each without and with BN inside the
network, each at every learning rate of a small grid (a variant without BN may need another
rate than one with BN). Metric per seed: the best final test accuracy over the grid of BN
inside on raw inputs minus that of dataset normalisation alone (standardised inputs, no
BN).

A BN layer right after the first linear layer removes any affine map of the inputs by a
scalar (``BN(W(a·x + b)) = BN(a·Wx + b·W1)``, and ``b·W1`` is a per-feature constant):
"both" is then the same network as BN on raw inputs up to BN's eps, and the table shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import acc_row, eval_set_text, final_acc, fmt_ms, select, table_row
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
from bnlab.experiments.input_scale import scaled_inputs
from bnlab.experiments.verdict import PairedClaim, compare

INPUTS = ("raw", "standardised")
NORMS = ("none", "bn")
LRS = (0.01, 0.1, 0.3)
PAIRED = PairedClaim(
    "Per seed, each variant at its best learning rate of the grid: final test accuracy "
    "with BN inside the network on raw inputs minus with the inputs standardised once from "
    "the training set's statistics and no BN",
    threshold=1.0,
    note="Dataset normalisation's own gain (no BN: standardised − raw inputs) and the gain of "
         "both together are shown with their intervals, not decided on.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Raw or standardised inputs × norm none or bn × each rate of ``lrs`` (the shared
    ``lr`` is not used)."""

    lrs: tuple[float, ...] = LRS
    model: str = "paper_mlp"


def best(cells: list[list[RunResult]]) -> list[float]:
    """Per seed, the best final test accuracy over ``cells`` (one list of runs, sorted by
    seed, per learning rate)."""
    return [max(final_acc(r) for r in runs) for runs in zip(*cells, strict=True)]


def train_inputs(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Plain training on raw inputs (``spec.params["inputs"] == "raw"``: the lab's
    standardisation undone, pixels in [0, 1]) or on the lab's standardised inputs."""
    from bnlab.train import train

    data = ctx.data
    if spec.params["inputs"] == "raw":
        data = scaled_inputs(data, data.std, data.mean)
    result = train(spec.config, out_dir=None, progress=ctx.progress, data=data)
    return RunOutput(result.metrics, result.summary)


class BatchVsDataset(Experiment):
    name = "batch-vs-dataset"
    claim = ("Normalising with batch statistics inside the network (BN) does more than "
             "normalising the inputs once with the dataset's statistics.")
    seeds = "002"
    quote = ("layer calculates the mean and standard deviation with respect to the batch at "
             "the time normalization is applied. This is **BatchNorm****opposed to the entire "
             "dataset with dataset normalization**.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift; LeCun, Bottou, Orr & Müller, "
              "1998, Efficient BackProp")
    literature = (
        "LeCun et al. (1998, Efficient BackProp, §4.3) recommend inputs shifted to zero mean "
        "and scaled to similar variances, for faster convergence. Ioffe & Szegedy (2015) "
        "extend that normalisation to every layer's inputs, with mini-batch statistics; on "
        "their MNIST MLP (Fig. 1a), the BN network reaches higher test accuracy sooner than "
        "the same network without BN on the same inputs (a curve, no single number)."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Normalising the inputs once is not a substitute for BN: BN inside the "
                     "network trains to a clearly better accuracy in the same steps.",
        "not supported": "Here standardising the inputs once from the dataset did as well as "
                         "BN inside the network: for a network like this one, input "
                         "normalisation may be enough.",
        "inconclusive": "The runs cannot tell whether BN inside the network beats "
                        "normalising the inputs once; try both on your own model.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=20, eval_subset=200, lrs=(0.1,)),
        "quick": Config(seeds=(0, 1, 2), steps=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model}, inputs raw (pixels in [0, 1]) or standardised once with the "
            f"training set's mean and std (one scalar each) × norm=none vs bn × SGD lr in "
            f"{list(cfg.lrs)}, momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} "
            f"steps, seeds {list(cfg.seeds)}; final accuracy on "
            f"{eval_set_text(cfg.eval_subset)}, per seed the best over the rates; a "
            f"diverged run counts as chance."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"inputs": inputs, "norm": norm, "lr": lr}, seed,
                    train_config(cfg, dataset, seed, norm=norm, lr=lr, eval_every=cfg.steps),
                    kind="train-inputs", params={"inputs": inputs})
            for inputs in INPUTS for norm in NORMS for lr in cfg.lrs for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"train-inputs": train_inputs}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = [acc_row({"inputs": i, "norm": n, "lr": lr},
                         select(results, inputs=i, norm=n, lr=lr))
                 for i in INPUTS for n in NORMS for lr in cfg.lrs]
        cell = {(i, n): best([select(results, inputs=i, norm=n, lr=lr) for lr in cfg.lrs])
                for i in INPUTS for n in NORMS}
        table += [table_row({"inputs": i, "norm": n, "lr": "best"},
                            final_acc=fmt_ms(cell[i, n]), seeds=len(cell[i, n]))
                  for i in INPUTS for n in NORMS]
        dataset_only = cell["standardised", "none"]

        def diffs(a: list[float], b: list[float]) -> list[float]:
            return [100 * (x - y) for x, y in zip(a, b, strict=True)]

        decision = PAIRED.decide(diffs(cell["raw", "bn"], dataset_only))
        input_gain = compare(diffs(dataset_only, cell["raw", "none"]), 0.0)
        both_gain = compare(diffs(cell["standardised", "bn"], dataset_only), 0.0)
        headline = (
            f"Best over the rates, BN inside on raw inputs vs inputs standardised once "
            f"without BN: "
            f"{decision.pm(2)} points; standardising the inputs alone gains "
            f"{input_gain.pm(2)} over raw inputs."
        )
        notes = [
            f"Both (standardised inputs and BN) vs dataset normalisation alone: "
            f"{both_gain.pm(2)} points. BN right after the first layer removes a scalar "
            f"affine map of the inputs, so 'both' trains as BN on raw inputs up to BN's eps.",
        ]
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"input_gain_pp": input_gain.mean,
                             "input_gain_ci_pp": [input_gain.low, input_gain.high],
                             "both_gain_pp": both_gain.mean},
        ), table, notes)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i in INPUTS:
            for n in NORMS:
                ys = []
                for lr in cfg.lrs:
                    rs = select(results, inputs=i, norm=n, lr=lr)
                    ys.append(100 * sum(final_acc(r) for r in rs) / len(rs))
                ax.plot(list(cfg.lrs), ys, "o-" if n == "bn" else "s--",
                        label=f"{i} inputs, {'BN' if n == 'bn' else 'no BN'}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{cfg.model}: dataset normalisation vs BN")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return [save(fig, out_dir / "batch_vs_dataset.png")]


EXPERIMENT = BatchVsDataset()
