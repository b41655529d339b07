"""Claim: batch norm reduces the need for L2 weight decay (seed 001).

Protocol: a small training subset trained for many epochs, so that a regulariser has
something to do; a deep MLP with and without BN, each with and without L2 weight decay
on its linear weights only (``decay_weights_only``: BN's scale and shift and the biases
are never decayed, so the comparison is L2 on the weights the seed means). Metric: what
L2 adds to the final test accuracy without BN minus what it adds with BN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import eval_set_text, final_acc, fmt_ms, select, table_row
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim, interval, mean_std, pm

NORMS = ("none", "bn")
PAIRED = PairedClaim(
    "Per seed, gain(norm) = test accuracy with L2 weight decay minus without; the "
    "difference is gain(no BN) − gain(BN)", threshold=0.5, key="gain_diff_pp",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """The first ``train_subset`` training images; L2 ``weight_decay`` on the conv/linear
    weights against none."""

    train_subset: int = 5000
    weight_decay: float = 5e-3


def gains_pp(results: list[RunResult], norm: str, wd: float) -> list[float]:
    """Per seed, test accuracy with weight decay ``wd`` minus without, in points."""
    with_l2 = select(results, norm=norm, weight_decay=wd)
    without = select(results, norm=norm, weight_decay=0.0)
    return [100 * (final_acc(a) - final_acc(b)) for a, b in zip(with_l2, without, strict=True)]


class WeightDecay(Experiment):
    name = "weight-decay"
    claim = "Batch norm reduces the need for L2 weight decay."
    seeds = "001"
    quote = ("It reduces the need for other forms of regularization like L2 weight decay, "
             "especially in very deep networks")
    section = "claim"
    papers = ("van Laarhoven, 2017, L2 Regularization versus Batch and Weight Normalization; "
              "Zhang, Wang, Xu & Grosse, ICLR 2019, Three Mechanisms of Weight Decay "
              "Regularization")
    literature = (
        "van Laarhoven (analysis): a layer followed by BN computes the same function at any "
        "scale of its weights, so L2 on those weights does not regularise the function; it "
        "shrinks the weights and so raises the effective learning rate. Zhang et al. (VGG "
        "and ResNet on CIFAR-10 and CIFAR-100): weight decay still improves the test "
        "accuracy of BN networks, mainly through that effective learning rate; neither "
        "paper finds that BN makes L2 unnecessary."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With BN, L2 weight decay adds clearly less than without it: tuning it "
                     "matters less once the network has BN.",
        "not supported": "BN does not make L2 weight decay less useful here: keep weight "
                         "decay in the search even with BN (it acts on the effective "
                         "learning rate).",
        "inconclusive": "The runs cannot tell whether BN changes what L2 weight decay adds: "
                        "tune weight decay as usual.",
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
            f"{cfg.model} (4 hidden blocks Linear → norm → ReLU of width 100) on the first "
            f"{cfg.train_subset} training images, norm=bn vs none × L2 weight decay "
            f"{cfg.weight_decay:g} vs 0 on the linear weights only (biases, BN scale and "
            f"shift never decayed), SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps (≈ {epochs:.0f} epochs), seeds "
            f"{list(cfg.seeds)}; accuracy on {eval_set_text(cfg.eval_subset)}. The same "
            f"protocol on every dataset (no dataset-dependent number)."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "weight_decay": wd}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
                train_subset=cfg.train_subset, weight_decay=wd, decay_weights_only=True,
            ))
            for norm in NORMS
            for wd in (0.0, cfg.weight_decay)
            for seed in cfg.seeds
        ]

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        wd = cfg.weight_decay
        table = [
            table_row({"norm": norm, "weight_decay": w},
                      test_acc=fmt_ms([final_acc(r) for r in select(results, norm=norm,
                                                                     weight_decay=w)]),
                      seeds=len(select(results, norm=norm, weight_decay=w)))
            for norm in NORMS for w in (0.0, wd)
        ]
        gain_none, gain_bn = gains_pp(results, "none", wd), gains_pp(results, "bn", wd)
        decision = PAIRED.decide([a - b for a, b in zip(gain_none, gain_bn, strict=True)])
        effect: dict[str, float] = {}
        text: dict[str, str] = {}
        for norm, gains in (("none", gain_none), ("bn", gain_bn)):
            m, _, n = mean_std(gains)
            low, high = interval(gains)
            effect |= {f"gain_{norm}_pp": m, f"gain_{norm}_ci_low_pp": low,
                       f"gain_{norm}_ci_high_pp": high}
            text[norm] = pm(m, low, high, n, 2)
        headline = (
            f"L2 weight decay {wd:g} changes the test accuracy by {text['none']} points "
            f"without BN and by {text['bn']} with BN; BN reduces what it adds by "
            f"{decision.pm(2)} points."
        )
        notes = []
        if not effect["gain_none_ci_low_pp"] > 0:
            notes.append(
                "Without BN, L2 does not help here (its gain's interval is not above zero): "
                "a positive difference then comes from L2 costing accuracy with BN, not from "
                "BN removing a need for L2 that this protocol shows. Read the verdict with "
                "both gains."
            )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={**effect, "weight_decay": wd}), table, notes)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, w in enumerate((0.0, cfg.weight_decay)):
            ys = [100 * sum(final_acc(r) for r in rs) / len(rs)
                  for rs in (select(results, norm=n, weight_decay=w) for n in NORMS)]
            ax.bar([j + (i - 0.5) * 0.4 for j in range(len(NORMS))], ys, 0.4,
                   label=f"weight decay {w:g}")
        ax.set_xticks(range(len(NORMS)), [f"norm={n}" for n in NORMS])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{cfg.model}, {cfg.train_subset} training images: L2 with and without BN")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        return [save(fig, out_dir / "weight_decay.png")]


EXPERIMENT = WeightDecay()
