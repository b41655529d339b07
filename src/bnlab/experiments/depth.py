"""Claim: batch norm makes deep networks trainable (seeds 000, 002: "over 100 layers").

Protocol: ``deep_mlp`` (fully connected, ReLU) at depths {2, 4, 8, 16, 32, 64, 100}, with
and without BN, the same fixed budget of SGD steps for every depth; final test accuracy,
and the norm of the first layer's weight gradient at initialisation (one batch of the first
256 training images), which shows vanishing or exploding gradients before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bnlab.experiments.analysis import acc_row, final_acc, fmt_ms, paired_diffs_pp, select
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
from bnlab.experiments.verdict import PairedClaim, mean_std
from bnlab.train import TrainConfig

if TYPE_CHECKING:
    from bnlab.data import DatasetSplits

DEPTHS = (2, 4, 8, 16, 32, 64, 100)
GRAD_BATCH = 256
PAIRED = PairedClaim(
    "Per seed, final test accuracy with BN minus without at the largest depth",
    threshold=10.0,
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """``deep_mlp`` at each depth of ``depths``, ``width`` units per layer."""

    model: str = "deep_mlp"
    depths: tuple[int, ...] = DEPTHS
    width: int = 64


class Depth(Experiment):
    name = "depth"
    claim = "Batch norm makes very deep networks (up to 100 layers) trainable."
    seeds = "000, 002"
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, depths=(2, 8), width=16),
        "quick": Config(seeds=(0, 1), steps=400),
        "full": Config(seeds=(0, 1, 2), steps=1500),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} width {cfg.width}, depth in {list(cfg.depths)}, norm=bn vs none, SGD lr "
            f"{cfg.lr} momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps for "
            f"every depth, seeds {list(cfg.seeds)}; first-layer weight-gradient norm at init "
            f"on the first {GRAD_BATCH} training images."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "depth": depth}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
                model_kwargs={**cfg.model_kwargs, "depth": depth, "width": cfg.width},
            ), kind="train+grad")
            for norm in ("none", "bn")
            for depth in cfg.depths
            for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"train+grad": train_with_init_grad}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in ("none", "bn"):
            for depth in cfg.depths:
                rs = select(results, norm=norm, depth=depth)
                grad = _sci([r.summary["grad_norm_init"] for r in rs])
                table.append(acc_row({"norm": norm, "depth": depth}, rs, grad_norm_init=grad))
        deepest = max(cfg.depths)
        bn = select(results, norm="bn", depth=deepest)
        none = select(results, norm="none", depth=deepest)
        decision = PAIRED.decide(paired_diffs_pp(bn, none))
        headline = (
            f"At depth {deepest}: BN {fmt_ms([final_acc(r) for r in bn])} vs no BN "
            f"{fmt_ms([final_acc(r) for r in none])} test accuracy "
            f"({decision.pm(1)} points)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, before={"depth": deepest},
        ), table, notes=[
            "These are plain networks without skip connections. Mean-field analyses (Yang et "
            "al., 2019) predict that BN makes the gradients of such networks explode with "
            "depth at initialisation; the 'over 100 layers' networks the seeds have in mind "
            "are residual networks.",
        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        groups = {n: [select(results, norm=n, depth=d) for d in cfg.depths]
                  for n in ("bn", "none")}
        return [
            sweep_plot(out_dir / "depth_accuracy.png", cfg.depths, groups, "depth (layers)",
                       f"{cfg.model}: final accuracy vs depth ({cfg.steps} steps)"),
            sweep_plot(out_dir / "depth_grad_norm.png", cfg.depths, groups, "depth (layers)",
                       "first-layer gradient norm at init",
                       value=lambda r: max(r.summary["grad_norm_init"], 1e-30),
                       ylabel="‖∂loss/∂W₁‖ at init", scale=1.0, logy=True),
        ]


def _sci(values: list[float]) -> str:
    m, s, n = mean_std(values)
    return f"{m:.3g}" if n == 1 else f"{m:.3g} ± {s:.2g}"


def train_with_init_grad(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """The plain training run, its summary with ``grad_norm_init`` (measured first)."""
    from bnlab.train import train

    grad = first_layer_grad_norm(spec.config, ctx.data)
    result = train(spec.config, out_dir=None, progress=ctx.progress, data=ctx.data)
    return RunOutput(result.metrics, {**result.summary, "grad_norm_init": grad})


def first_layer_grad_norm(config: TrainConfig, data: DatasetSplits) -> float:
    """‖∂loss/∂W‖ of the first Linear/Conv layer at init, on the first training images.

    The model is the one a training run of ``config`` starts from
    (:func:`bnlab.train.build`), put in train mode and used once; it is thrown away
    afterwards.
    """
    import torch.nn.functional as F
    from torch import nn

    from bnlab.train import build

    model = build(config, data.in_shape, data.num_classes)
    x, y = data.train.tensors[0][:GRAD_BATCH], data.train.tensors[1][:GRAD_BATCH]
    model.train()
    F.cross_entropy(model(x), y).backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if first.weight.grad is None:
        raise RuntimeError("the first layer got no gradient")
    return float(first.weight.grad.norm())


EXPERIMENT = Depth()
