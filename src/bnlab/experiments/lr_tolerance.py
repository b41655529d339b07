"""Claim: batch norm tolerates higher learning rates (seeds 000, 001, 003).

Protocol: a ReLU MLP (``deep_mlp``, 4 hidden layers of 100) with and without BN, SGD with
momentum 0.9 at each learning rate of a half-decade grid; final test accuracy and whether
the run diverged. The MLP, not the seed CNN: the claim is generic, and a grid of rates ×
two variants × five seeds on the seed CNN would cost about 30 times as much.

Metric: per seed and variant, the *reach*: the grid position (1 = the smallest rate) of
the largest learning rate whose run ends at or above the dataset's target accuracy without
diverging, 0 when none does. The effect is BN's reach minus no-BN's, in grid steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

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

LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # half-decade steps (×3 or ×3.3)
TARGETS = {"mnist": 0.95, "fashion-mnist": 0.82}
# BN's largest good learning rate at least one grid step (about 3×) above no-BN's
PAIRED = PairedClaim(
    "Per seed, reach = the grid position (1 = smallest) of the largest learning rate whose "
    "run ends at or above the target test accuracy without diverging (0 if none); the "
    "difference is BN's reach minus no-BN's, in steps of the half-decade grid",
    threshold=1.0, key="reach_diff_steps", unit="grid step", suffix="steps",
    note="Inconclusive also when the grid does not bracket the limit: on every seed, "
         "neither variant reaches the target at any rate, or both reach it at the largest.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Each run trains at one rate of ``lrs`` (the shared ``lr`` is not used); ``targets``:
    dataset -> the final test accuracy a run must reach."""

    model: str = "deep_mlp"
    lrs: tuple[float, ...] = LRS
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))


def reach(cfg: Config, runs: list[RunResult], target: float) -> int:
    """The grid position (1-based) of the largest rate of ``cfg.lrs`` among ``runs`` (one
    seed, one variant) that ends at or above ``target`` without diverging; 0 if none."""
    good = [i + 1 for i, lr in enumerate(cfg.lrs) for r in runs
            if r.spec.group["lr"] == lr and not r.summary.get("diverged")
            and final_acc(r) >= target]
    return max(good, default=0)


class LrTolerance(Experiment):
    name = "lr-tolerance"
    claim = "Batch norm lets a network train at higher learning rates without diverging."
    seeds = "000, 001, 003"
    quote = ("It does so by stabilizing the distribution of the inputs to the next layer, "
             "allowing for higher learning rates without the risk of divergence.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift; Bjorck et al., NeurIPS 2018, "
              "Understanding Batch Normalization")
    literature = (
        "Inception on ImageNet (Ioffe & Szegedy): with BN the initial learning rate could be "
        "raised 5× and 30× (BN-x5, BN-x30) and the network still trained, BN-x30 to a higher "
        "final accuracy than the original. ResNets on CIFAR-10 (Bjorck et al.): the network "
        "without BN diverges at learning rates that the BN network trains at, and at small "
        "learning rates the two reach about the same accuracy: BN's gain comes with the "
        "larger rates it allows (described from their figures, no number given here)."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With BN you can raise the learning rate at least about 3× beyond what "
                     "the plain network tolerates and still reach the target accuracy.",
        "not supported": "BN does not widen the usable learning-rate range by a grid step "
                         "here; tune the learning rate as you would without it.",
        "inconclusive": "The seeds disagree on how far BN extends the usable learning rates; "
                        "do not count on a wider range without more seeds.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, lrs=(0.01, 3.0), eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=500),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=500),
    }

    def protocol(self, cfg: Config) -> str:
        targets = ", ".join(f"{d} {100 * t:g} %" for d, t in cfg.targets.items())
        return (
            f"{model_text(cfg.model, cfg.model_kwargs)} with norm=bn vs norm=none, SGD momentum "
            f"{cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps at each lr in "
            f"{list(cfg.lrs)}, seeds {list(cfg.seeds)}; target final test accuracy "
            f"({targets}) on the full test set; a run whose loss becomes NaN/Inf stops and "
            f"counts as diverged (chance accuracy). An MLP, not the seed CNN: the claim is "
            f"generic and a learning-rate grid on the CNN does not fit the lab's budget."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "lr": lr}, seed,
                    train_config(cfg, dataset, seed, norm=norm, lr=lr, eval_every=cfg.steps))
            for norm in ("none", "bn")
            for lr in cfg.lrs
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        target = dataset_target(cfg.targets, results)
        table = [acc_row({"norm": norm, "lr": lr}, select(results, norm=norm, lr=lr))
                 for norm in ("none", "bn") for lr in cfg.lrs]
        reaches = {n: [reach(cfg, [r for r in select(results, norm=n) if r.spec.seed == s],
                             target) for s in cfg.seeds]
                   for n in ("none", "bn")}
        decision = PAIRED.decide([float(b - a) for a, b in
                                  zip(reaches["none"], reaches["bn"], strict=True)])
        top_of_grid = len(cfg.lrs)
        if all(a == b and a in (0, top_of_grid)
               for a, b in zip(reaches["none"], reaches["bn"], strict=True)):
            decision = replace(decision, verdict="inconclusive")
        top = {n: _lr_at(cfg, min(rs)) for n, rs in reaches.items()}
        headline = (
            f"Largest learning rate reaching {100 * target:g} % on every seed: BN {top['bn']}, "
            f"no BN {top['none']}; BN reaches {decision.pm(1)} grid steps (×3 each) higher."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, before={
            "reach_bn": fmt_ms(reaches["bn"], scale=1.0, unit=""),
            "reach_none": fmt_ms(reaches["none"], scale=1.0, unit=""),
            "max_good_lr_bn": top["bn"], "max_good_lr_none": top["none"], "target": target,
        }), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        groups = {n: [select(results, norm=n, lr=lr) for lr in cfg.lrs] for n in ("bn", "none")}
        return [sweep_plot(out_dir / "lr_tolerance.png", cfg.lrs, groups, "learning rate",
                           f"{cfg.model}: final accuracy vs learning rate ({cfg.steps} steps)")]


def _lr_at(cfg: Config, position: int) -> float | None:
    """The learning rate at a reach (1-based grid position); None for reach 0."""
    return cfg.lrs[position - 1] if position > 0 else None


EXPERIMENT = LrTolerance()
