"""Claim: batch norm computes its statistics on each mini-batch, so it degrades at small
batch sizes, unlike GroupNorm and LayerNorm (seed 001's premise; Wu & He 2018).

Protocol: the BN paper's MNIST MLP (``paper_mlp``, cheap enough for five seeds at batch
2) with BN, GroupNorm and LayerNorm (torch's built-ins through the norm registry; the
toolkit's Batch Renorm and Ghost BN join when the registry has them, for scale), batch
size in {2, 8, 32, 128}, at an equal number of training samples seen (steps = samples /
batch), same SGD settings. Metric: final test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.analysis import acc_row, eval_set_text, final_acc, fmt_ms, select
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim

BATCHES = (2, 8, 32, 128)
BASE_NORMS = ("bn", "gn", "ln")
EXTRA_NORMS = ("renorm", "ghost")
PAIRED = PairedClaim(
    "Per seed, gap(b) = best of GroupNorm/LayerNorm minus BN final test accuracy at batch b; "
    "the difference is gap(smallest batch) − gap(largest batch)",
    threshold=2.0, key="gap_growth_pp",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Each batch size of ``batches`` sees the samples of the shared schedule
    (``steps`` × ``batch_size``): ``samples // batch`` steps."""

    batches: tuple[int, ...] = BATCHES

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size


def available_norms() -> list[str]:
    """bn, gn, ln, plus the toolkit's renorm and ghost (defaults) when registered."""
    from bnlab.models.norms import norm_names

    have = norm_names()
    return [*BASE_NORMS, *(n for n in EXTRA_NORMS if n in have)]


class BatchSize(Experiment):
    name = "batch-size"
    claim = ("Batch norm computes its statistics on each mini-batch, so it degrades at small "
             "batch sizes, unlike GroupNorm and LayerNorm.")
    seeds = "001"
    quote = "For each mini-batch of inputs, the mean and variance are computed."
    section = "claim"
    papers = "Wu & He, ECCV 2018, Group Normalization"
    literature = (
        "Wu & He (ResNet-50 on ImageNet, batch size per GPU from 32 down to 2): BN's error "
        "rises steeply as the batch per GPU falls below 8, while GroupNorm's stays about "
        "flat (their abstract: at batch 2, GN's error is 10.6 % lower than BN's); at 32 "
        "images per GPU BN is slightly better than GN."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With only a few samples per batch (per device), prefer GroupNorm or "
                     "LayerNorm (or BN variants built for small batches) over plain BN.",
        "not supported": "BN held up at small batches here as well as GroupNorm and "
                         "LayerNorm: small batches alone are no reason to drop BN.",
        "inconclusive": "The runs cannot tell whether BN suffers more than GN/LN at small "
                        "batches: check your batch size per device before choosing.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=2, batches=(2, 64), eval_subset=200,
                        model="paper_mlp"),
        "quick": Config(seeds=(0, 1, 2), steps=100, model="paper_mlp"),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=100, model="paper_mlp"),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm in {available_norms()} (renorm and ghost with their "
            f"registry defaults, when present), batch in {list(cfg.batches)}, "
            f"{cfg.samples} training samples seen at every batch size (steps = samples / "
            f"batch), SGD lr {cfg.lr} momentum {cfg.momentum}, seeds {list(cfg.seeds)}; "
            f"accuracy on {eval_set_text(cfg.eval_subset)}. The same protocol on every "
            f"dataset."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        out = []
        for norm in available_norms():
            for b in cfg.batches:
                steps = max(1, cfg.samples // b)
                for seed in cfg.seeds:
                    out.append(RunSpec({"norm": norm, "batch": b}, seed, train_config(
                        cfg, dataset, seed, norm=norm, steps=steps, batch_size=b,
                        eval_every=steps,
                    )))
        return out

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        norms = list(dict.fromkeys(r.spec.group["norm"] for r in results))
        table = [acc_row({"norm": norm, "batch": b}, select(results, norm=norm, batch=b))
                 for norm in norms for b in cfg.batches]

        def gap(b: int, seed: int) -> float:
            def acc(n: str) -> float:
                return next(final_acc(r) for r in select(results, norm=n, batch=b)
                            if r.spec.seed == seed)
            return max(acc("gn"), acc("ln")) - acc("bn")

        lo, hi = min(cfg.batches), max(cfg.batches)
        decision = PAIRED.decide([100 * (gap(lo, s) - gap(hi, s)) for s in cfg.seeds])
        bn_lo = fmt_ms([final_acc(r) for r in select(results, norm="bn", batch=lo)])
        bn_hi = fmt_ms([final_acc(r) for r in select(results, norm="bn", batch=hi)])
        headline = (
            f"BN at batch {lo}: {bn_lo}, at batch {hi}: {bn_hi}; its deficit against the best "
            f"of GN/LN grows by {decision.pm(1)} points from batch {hi} to {lo}."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={
                "gap_small_pp": 100 * sum(gap(lo, s) for s in cfg.seeds) / len(cfg.seeds),
                "gap_large_pp": 100 * sum(gap(hi, s) for s in cfg.seeds) / len(cfg.seeds),
                "norms": norms,
            },
        ), table)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        norms = list(dict.fromkeys(r.spec.group["norm"] for r in results))
        groups = {n: [select(results, norm=n, batch=b) for b in cfg.batches] for n in norms}
        return [sweep_plot(out_dir / "batch_size.png", cfg.batches, groups, "batch size",
                           f"{cfg.model}: final accuracy vs batch ({cfg.samples} samples seen)")]


EXPERIMENT = BatchSize()
