"""Claim: batch norm makes very deep networks trainable (seeds 000, 002: "over 100 layers").

Protocol: ``deep_mlp`` (fully connected, ReLU, width 64) at depths {4, 16, 100}, plain
(Linear → norm → ReLU) and residual (pre-activation blocks ``x + Linear(ReLU(norm(x)))``,
:class:`bnlab.models.mlp.DeepMLP`), with and without BN, the same fixed budget of SGD steps
for every depth; final test accuracy. A probe run per architecture, norm and seed measures
the norm of the first layer's weight gradient at initialisation at every depth (one batch
of the first training images), which shows vanishing or exploding gradients before any
training.

The seeds' "over 100 layers" are residual networks (the ResNets that BN made trainable):
the verdict reads the claim in the residual net at the largest depth (100 hidden layers
plus the head: 101 weight layers). The plain net's difference at that depth is reported
beside it and decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bnlab.experiments.analysis import (
    acc_row,
    eval_set_text,
    final_acc,
    fmt_ms,
    paired_diffs_pp,
    select,
)
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
from bnlab.experiments.gradient_health import probe_batch
from bnlab.experiments.verdict import PairedClaim, compare, mean_std
from bnlab.train import TrainConfig

if TYPE_CHECKING:
    from bnlab.data import DatasetSplits

DEPTHS = (4, 16, 100)
GRAD_BATCH = 256
ARCHS = ("plain", "residual")
PAIRED = PairedClaim(
    "Per seed, in the residual deep_mlp at the largest depth: final test accuracy with BN "
    "minus without",
    threshold=10.0,
    note="The plain net's difference at the same depth is reported beside it and decides "
         "nothing.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """``deep_mlp`` at each depth of ``depths``, ``width`` units per layer."""

    model: str = "deep_mlp"
    depths: tuple[int, ...] = DEPTHS
    width: int = 64


class Depth(Experiment):
    name = "depth"
    claim = "Batch norm makes very deep networks (over 100 layers) trainable."
    seeds = "000, 002"
    quote = ("Using batch normalization, you can consistently accelerate and converge very "
             "deep networks possible to train networks with over 100 layers.")
    section = "claim"
    papers = ("Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, ICLR 2019, A Mean Field "
              "Theory of Batch Normalization; He, Zhang, Ren, Sun, ECCV 2016, Identity "
              "Mappings in Deep Residual Networks")
    literature = (
        "Yang et al.: plain BN MLPs on MNIST become untrainable beyond a few tens of layers "
        "at any batch size (their Fig. 3a, as reported: about 50 layers), because BN makes "
        "the gradients explode with depth at init. He et al.: residual networks with BN "
        "(pre-activation blocks) train at 110 and 1001 layers on CIFAR-10."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "In a 100-layer residual network, BN is what lets it train at this "
                     "learning rate and init; keep it (or replace it by an init that does "
                     "its job).",
        "not supported": "A 100-layer residual network here trains about as well without BN; "
                         "depth alone is no reason to add it.",
        "inconclusive": "Whether BN is what makes a 100-layer residual network trainable "
                        "varies with the seed here; try both.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=5, depths=(4,), width=16, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=120, eval_subset=2000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=120, eval_subset=2000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} width {cfg.width}, depth in {list(cfg.depths)}, plain vs residual "
            f"(pre-activation x + Linear(ReLU(norm(x))) blocks, PyTorch's default init), "
            f"norm=bn vs none, SGD lr {cfg.lr} momentum {cfg.momentum}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps for every depth, seeds {list(cfg.seeds)}; "
            f"accuracy on {eval_set_text(cfg.eval_subset)}; first-layer weight-gradient norm "
            f"at init on the first {GRAD_BATCH} training images."
        )

    def _config(self, cfg: Config, dataset: str, seed: int, norm: str, arch: str,
                depth: int) -> TrainConfig:
        return train_config(
            cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
            model_kwargs={**cfg.model_kwargs, "depth": depth, "width": cfg.width,
                          "residual": arch == "residual"},
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        train = [
            RunSpec({"arch": arch, "norm": norm, "depth": depth}, seed,
                    self._config(cfg, dataset, seed, norm, arch, depth))
            for arch in ARCHS
            for norm in ("none", "bn")
            for depth in cfg.depths
            for seed in cfg.seeds
        ]
        deepest = max(cfg.depths)
        probes = [
            RunSpec({"arch": arch, "norm": norm, "probe": "init-grads"}, seed,
                    self._config(cfg, dataset, seed, norm, arch, deepest),
                    kind="init-grads", params={"depths": list(cfg.depths)})
            for arch in ARCHS
            for norm in ("none", "bn")
            for seed in cfg.seeds
        ]
        return train + probes

    def runners(self) -> dict[str, RunFunction]:
        from bnlab.experiments.base import train_run

        return {"train": train_run, "init-grads": init_grads_run}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        trained = [r for r in results if r.spec.kind == "train"]
        probes = [r for r in results if r.spec.kind == "init-grads"]
        table = []
        for arch in ARCHS:
            for norm in ("none", "bn"):
                ps = select(probes, arch=arch, norm=norm)
                for depth in cfg.depths:
                    rs = select(trained, arch=arch, norm=norm, depth=depth)
                    grad = _sci([p.summary["grad_norm_init"][str(depth)] for p in ps])
                    table.append(acc_row({"arch": arch, "norm": norm, "depth": depth}, rs,
                                         grad_norm_init=grad))
        deepest = max(cfg.depths)

        def at(arch: str, norm: str) -> list[RunResult]:
            return select(trained, arch=arch, norm=norm, depth=deepest)

        decision = PAIRED.decide(paired_diffs_pp(at("residual", "bn"), at("residual", "none")))
        plain = compare(paired_diffs_pp(at("plain", "bn"), at("plain", "none")),
                        PAIRED.threshold)
        def acc(arch: str, norm: str) -> str:
            return fmt_ms([final_acc(r) for r in at(arch, norm)])

        headline = (
            f"At depth {deepest}, residual: BN {acc('residual', 'bn')} vs no BN "
            f"{acc('residual', 'none')} test accuracy ({decision.pm(1)} points); plain: BN "
            f"{acc('plain', 'bn')} vs no BN {acc('plain', 'none')} ({plain.pm(1)} points)."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, before={"depth": deepest},
            after={"plain_diff_pp": plain.mean, "plain_ci_low_pp": plain.low,
                   "plain_ci_high_pp": plain.high},
        ), table, notes=[
            "The verdict is the residual net's: the networks of over 100 layers that BN is "
            "credited with are residual networks. Mean-field analyses (Yang et al., 2019) "
            "predict that BN makes the gradients of plain networks explode with depth at "
            "initialisation; the plain rows show what BN alone does there.",
            "The residual branches keep PyTorch's default init (nothing rescales them with "
            "depth), so without BN the forward signal grows at every block.",
        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab.experiments.plots import sweep_plot

        trained = [r for r in results if r.spec.kind == "train"]
        groups = {f"{n} {a}": [select(trained, arch=a, norm=n, depth=d) for d in cfg.depths]
                  for a in ARCHS for n in ("bn", "none")}
        return [
            sweep_plot(out_dir / "depth_accuracy.png", cfg.depths, groups, "depth (layers)",
                       f"{cfg.model}: final accuracy vs depth ({cfg.steps} steps)"),
            grad_norm_plot(out_dir / "depth_grad_norm.png", cfg, results),
        ]


def grad_norm_plot(path: Path, cfg: Config, results: list[RunResult]) -> str:
    """The first layer's gradient norm at init vs depth (geometric mean over seeds), one
    line per architecture × norm."""
    import math

    from bnlab._plot import pyplot
    from bnlab.experiments.plots import COLORS, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arch, style in (("plain", "-o"), ("residual", "--s")):
        for norm in ("bn", "none"):
            ps = select(results, arch=arch, norm=norm, probe="init-grads")
            if not ps:
                continue
            ys = [10 ** (sum(math.log10(max(p.summary["grad_norm_init"][str(d)], 1e-45))
                             for p in ps) / len(ps)) for d in cfg.depths]
            ax.plot(cfg.depths, ys, style, color=COLORS[norm], markerfacecolor="none",
                    label=f"{norm} {arch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("‖∂loss/∂W₁‖ at init")
    ax.set_title("first-layer gradient norm at init (a norm of 0, an underflow, at 1e-45)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def _sci(values: list[float]) -> str:
    m, s, n = mean_std(values)
    return f"{m:.3g}" if n == 1 else f"{m:.3g} ± {s:.2g}"


def init_grads_run(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """For each depth of ``spec.params["depths"]``: :func:`first_layer_grad_norm` of
    ``spec.config`` at that depth. The summary's ``grad_norm_init`` maps each depth (as a
    string) to that norm."""
    import time
    from dataclasses import replace

    t0 = time.perf_counter()
    norms = {}
    for depth in spec.params["depths"]:
        config = replace(spec.config, model_kwargs={**spec.config.model_kwargs,
                                                    "depth": int(depth)})
        norms[str(depth)] = first_layer_grad_norm(config, ctx.data)
    return RunOutput([{"step": 0, **{f"grad_norm_init_{k}": v for k, v in norms.items()}}],
                     {"wall_time_s": time.perf_counter() - t0, "test_acc": None,
                      "grad_norm_init": norms})


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
    x, y = probe_batch(data, GRAD_BATCH)
    model.train()
    F.cross_entropy(model(x), y).backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if first.weight.grad is None:
        raise RuntimeError("the first layer got no gradient")
    return float(first.weight.grad.norm())


EXPERIMENT = Depth()
