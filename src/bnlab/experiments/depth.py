"""Claim: batch norm makes deep networks trainable (seeds 000, 002: "over 100 layers").

Protocol: ``deep_mlp`` (fully connected, ReLU) at depths {2, 4, 8, 16, 32, 64, 100}, with
and without BN, the same fixed budget of SGD steps for every depth; final test accuracy,
and the norm of the first layer's weight gradient at initialisation (one batch of the first
256 training images), which shows vanishing or exploding gradients before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunResult,
    RunSpec,
    acc_row,
    compare,
    final_acc,
    fmt_ms,
    get_data,
    mean_std,
    paired_diffs_pp,
    pm,
    select,
    write_run_files,
)
from bnlab.train import TrainConfig

DEPTHS = (2, 4, 8, 16, 32, 64, 100)
THRESHOLD_PP = 10.0
GRAD_BATCH = 256


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...]
    steps: int
    depths: tuple[int, ...] = DEPTHS
    width: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64


class Depth(Experiment):
    name = "depth"
    claim = "Batch norm makes very deep networks (up to 100 layers) trainable."
    seeds = "000, 002"
    rule = (
        f"Per seed, final test accuracy with BN minus without at the largest depth. "
        f"supported if the mean difference is at least {THRESHOLD_PP:g} percentage points "
        f"and more than 2 standard errors above zero; not supported if mean + 2 SE is below "
        f"{THRESHOLD_PP:g} points; inconclusive otherwise."
    )
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=10, depths=(2, 8), width=16),
        "quick": Config(seeds=(0, 1), steps=400),
        "full": Config(seeds=(0, 1, 2), steps=1500),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"deep_mlp width {cfg.width}, depth in {list(cfg.depths)}, norm=bn vs none, SGD lr "
            f"{cfg.lr} momentum {cfg.momentum}, batch {cfg.batch_size}, {cfg.steps} steps for "
            f"every depth, seeds {list(cfg.seeds)}; first-layer weight-gradient norm at init "
            f"on the first {GRAD_BATCH} training images."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "depth": depth}, seed, TrainConfig(
                model="deep_mlp", norm=norm, dataset=dataset, steps=cfg.steps,
                batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                eval_every=cfg.steps, seed=seed,
                model_kwargs={"depth": depth, "width": cfg.width},
            ), kind="train+grad")
            for norm in ("none", "bn")
            for depth in cfg.depths
            for seed in cfg.seeds
        ]

    def execute(self, spec: RunSpec, run_dir: Path, progress: bool | None) -> None:
        from bnlab.train import train

        grad = first_layer_grad_norm(spec.config)
        result = train(spec.config, out_dir=None, progress=progress,
                       data=get_data(spec.config.dataset))
        write_run_files(run_dir, result.metrics, result.summary, {"grad_norm_init": grad})

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
        diffs = paired_diffs_pp(bn, none)
        verdict, d, se = compare(diffs, THRESHOLD_PP)
        headline = (
            f"At depth {deepest}: BN {fmt_ms([final_acc(r) for r in bn])} vs no BN "
            f"{fmt_ms([final_acc(r) for r in none])} test accuracy "
            f"({pm(d, se, len(diffs), 1)} points)."
        )
        return Analysis(verdict, headline, {
            "depth": deepest, "diff_pp": d, "se_pp": se, "threshold_pp": THRESHOLD_PP,
            "seeds": len(diffs),
        }, table, notes=[
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
                       f"deep_mlp: final accuracy vs depth ({cfg.steps} steps)"),
            sweep_plot(out_dir / "depth_grad_norm.png", cfg.depths, groups, "depth (layers)",
                       "first-layer gradient norm at init",
                       value=lambda r: max(r.summary["grad_norm_init"], 1e-30),
                       ylabel="‖∂loss/∂W₁‖ at init", scale=1.0, logy=True),
        ]


def _sci(values: list[float]) -> str:
    m, s, n = mean_std(values)
    return f"{m:.3g}" if n == 1 else f"{m:.3g} ± {s:.2g}"


def first_layer_grad_norm(config: TrainConfig) -> float:
    """‖∂loss/∂W‖ of the first Linear/Conv layer at init, on the first training images.

    The model is the one a training run of ``config`` starts from
    (:func:`bnlab.train.build`), put in train mode and used once; it is thrown away
    afterwards.
    """
    import torch.nn.functional as F
    from torch import nn

    from bnlab.train import build

    data = get_data(config.dataset)
    model = build(config, data.in_shape, data.num_classes)
    x, y = data.train.tensors[0][:GRAD_BATCH], data.train.tensors[1][:GRAD_BATCH]
    model.train()
    F.cross_entropy(model(x), y).backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if first.weight.grad is None:
        raise RuntimeError("the first layer got no gradient")
    return float(first.weight.grad.norm())


EXPERIMENT = Depth()
