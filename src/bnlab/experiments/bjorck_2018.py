"""Literature: BN's gain comes with the larger learning rates it allows (Bjorck et al. 2018).

Bjorck, Gomes, Selman & Weinberger ("Understanding Batch Normalization", NeurIPS 2018)
train a ResNet on CIFAR-10 with and without BN: at a small learning rate both reach about
the same accuracy; BN's advantage appears at the large learning rates that only the BN
network can use.

Protocol: a deep fully connected ReLU network (``deep_mlp``) with and without BN at a small
and a large learning rate, paired by seed (same init, same batches). Metric per seed: BN's
gain at the large rate (BN − no BN final test accuracy) minus its gain at the small rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bnlab.experiments.analysis import (
    acc_row,
    eval_set_text,
    final_acc,
    paired_diffs_pp,
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
from bnlab.experiments.verdict import PairedClaim, compare

NORMS = ("none", "bn")
PAIRED = PairedClaim(
    "Per seed: BN's gain in final test accuracy (BN − no BN) at the large learning rate "
    "minus its gain at the small learning rate", threshold=2.0, key="gain_diff_pp",
    note="Both gains are shown with their intervals; the paper's other half (at the small "
         "rate the gain is near zero) is read from the small rate's interval, not decided on.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Each run trains at ``small_lr`` or ``large_lr`` (the shared ``lr`` is not used)."""

    small_lr: float = 0.01
    large_lr: float = 0.3
    model: str = "deep_mlp"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"depth": 4, "width": 100})


def gains(cfg: Config, results: list[RunResult], lr: float) -> list[float]:
    """Per seed, BN's final test accuracy minus no-BN's at ``lr``, in points."""
    return paired_diffs_pp(select(results, norm="bn", lr=lr), select(results, norm="none", lr=lr))


class Bjorck2018(Experiment):
    name = "bjorck-2018"
    claim = ("BN's gain comes with the larger learning rates it allows: at a small learning "
             "rate BN and no BN reach about the same accuracy.")
    seeds = "000"
    quote = ("It does so by stabilizing the distribution of the inputs to the next layer, "
             "allowing for higher learning rates without the risk of divergence.")
    section = "literature"
    papers = ("Bjorck, Gomes, Selman & Weinberger, NeurIPS 2018, Understanding Batch "
              "Normalization")
    literature = (
        "Their abstract: \"BN primarily enables training with larger learning rates, which "
        "is the cause for faster convergence and better generalization.\" ResNet on "
        "CIFAR-10 (their Fig. 1, direction as described): at a small learning rate the "
        "networks with and without BN end at similar test accuracy; BN trains at much larger "
        "rates, where the network without BN diverges, and those rates give its higher "
        "accuracy. The lab compares the direction and size of BN's gain, not CIFAR "
        "accuracies."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "BN pays off mostly by letting you raise the learning rate: adding BN "
                     "without raising it buys much less.",
        "not supported": "Here BN's gain did not grow with the learning rate: its benefit "
                         "does not hinge on training at a larger rate.",
        "inconclusive": "The runs cannot tell whether BN's gain grows with the learning "
                        "rate; tune the rate with and without BN before comparing them.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=20, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} {cfg.model_kwargs} with norm=bn vs none, SGD momentum "
            f"{cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps at lr {cfg.small_lr} "
            f"(small) and {cfg.large_lr} (large), seeds {list(cfg.seeds)}; final accuracy "
            f"on {eval_set_text(cfg.eval_subset)}; a diverged run counts as chance."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "lr": lr}, seed,
                    train_config(cfg, dataset, seed, norm=norm, lr=lr, eval_every=cfg.steps))
            for norm in NORMS for lr in (cfg.small_lr, cfg.large_lr) for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = [acc_row({"norm": norm, "lr": lr}, select(results, norm=norm, lr=lr))
                 for norm in NORMS for lr in (cfg.small_lr, cfg.large_lr)]
        small, large = gains(cfg, results, cfg.small_lr), gains(cfg, results, cfg.large_lr)
        decision = PAIRED.decide([b - a for a, b in zip(small, large, strict=True)])
        at_small, at_large = compare(small, 0.0), compare(large, 0.0)
        bn_own = compare(paired_diffs_pp(select(results, norm="bn", lr=cfg.large_lr),
                                         select(results, norm="bn", lr=cfg.small_lr)), 0.0)
        headline = (
            f"BN's gain at lr {cfg.large_lr:g}: {at_large.pm(2)} points; at lr "
            f"{cfg.small_lr:g}: {at_small.pm(2)}; the difference {decision.pm(2)}."
        )
        notes = [f"BN itself at lr {cfg.large_lr:g} minus at lr {cfg.small_lr:g}: "
                 f"{bn_own.pm(2)} points (whether BN's own accuracy rises with the rate)."]
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, before={"gain_small_lr_pp": at_small.mean,
                              "gain_small_lr_ci_pp": [at_small.low, at_small.high],
                              "gain_large_lr_pp": at_large.mean,
                              "gain_large_lr_ci_pp": [at_large.low, at_large.high]},
            after={"bn_large_minus_small_lr_pp": bn_own.mean},
        ), table, notes)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        lrs = (cfg.small_lr, cfg.large_lr)
        for norm in NORMS:
            ys = []
            for lr in lrs:
                rs = select(results, norm=norm, lr=lr)
                ys.append(100 * sum(final_acc(r) for r in rs) / len(rs))
            ax.plot(lrs, ys, "o-", label="BN" if norm == "bn" else "no BN")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{cfg.model}: BN's gain at a small and a large learning rate")
        ax.legend()
        ax.grid(alpha=0.3)
        return [save(fig, out_dir / "bjorck_2018.png")]


EXPERIMENT = Bjorck2018()
