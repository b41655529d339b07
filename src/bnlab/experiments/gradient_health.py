"""Claim: batch norm prevents vanishing/exploding gradients in deep networks (seed 001).

Protocol: ``deep_mlp`` of depth 50, width 64, plain (Linear → norm → ReLU) and residual
(pre-activation blocks ``x + Linear(ReLU(norm(x)))``, see
:class:`bnlab.models.mlp.DeepMLP`), each with and without BN. For each run, the norm of
every hidden layer's weight gradient ‖∂loss/∂W_l‖ on one fixed batch (the first
:data:`GRAD_BATCH` training images, the model in train mode, computed in float64 so that
vanishing gradients do not underflow), at initialisation and again after a short training
run; the final test accuracy. Metric: the spread of the per-layer norms at init,
``log10(max_l / min_l)`` over the width × width hidden layers (the input layer, whose
fan-in is the image, is left out): 0 when every layer gets a gradient of the same size,
``k`` when they span ``k`` decades.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bnlab.experiments.analysis import (
    eval_set_text,
    final_acc,
    fmt_ms,
    select,
    table_row,
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
from bnlab.experiments.verdict import PairedClaim, compare

if TYPE_CHECKING:
    from torch import Tensor, nn

    from bnlab.data import DatasetSplits

GRAD_BATCH = 256
ARCHS = ("plain", "residual")
PAIRED = PairedClaim(
    "Per seed, for each architecture (plain and residual deep_mlp): the spread "
    "log10(max/min) of the hidden layers' weight-gradient norms at init without BN minus "
    "with BN (decades); the seed's difference is the smaller of the two architectures', "
    "since the seed makes the claim of deep networks in general",
    threshold=1.0, key="spread_diff_dec", unit="decade", suffix="dec",
    note="Gradient norms after training, and the accuracy, are shown beside it and "
         "decide nothing.",
)


def probe_batch(data: DatasetSplits, n: int = GRAD_BATCH) -> tuple[Tensor, Tensor]:
    """The first ``n`` training images and labels: the fixed batch every probe uses."""
    return data.train.tensors[0][:n], data.train.tensors[1][:n]


def layer_grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """‖∂loss/∂W‖ (Frobenius) of every Linear and Conv layer of ``model``, in module order,
    for the mean cross-entropy on ``(x, y)``, in float64.

    The gradient is taken on a float64 copy of ``model`` in train mode (batch statistics,
    as in a training step); ``model`` itself, its mode and its gradients are untouched.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from torch import nn

    probe = copy.deepcopy(model).double().train()
    probe.zero_grad(set_to_none=True)
    F.cross_entropy(probe(x.double()), y).backward()
    norms = []
    for m in probe.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            if m.weight.grad is None:
                raise RuntimeError(f"layer {m} got no gradient")
            norms.append(float(torch.linalg.vector_norm(m.weight.grad)))
    return norms


def hidden_norms(norms: Sequence[float]) -> list[float]:
    """The width × width hidden layers' norms of a ``deep_mlp``'s :func:`layer_grad_norms`:
    all but the input layer (first) and the head (last)."""
    return list(norms[1:-1])


def spread(norms: Sequence[float]) -> float:
    """``log10(max / min)`` of positive ``norms`` (decades); ``inf`` if one is 0 and
    ``nan`` if one is not finite or there are none."""
    xs = [float(v) for v in norms]
    if not xs or not all(math.isfinite(v) for v in xs):
        return math.nan
    if min(xs) <= 0.0:
        return math.inf
    return math.log10(max(xs) / min(xs))


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """``deep_mlp`` of ``depth`` hidden layers of ``width`` units, plain and residual."""

    model: str = "deep_mlp"
    depth: int = 50
    width: int = 64


def _arch_kwargs(cfg: Config, arch: str) -> dict[str, object]:
    return {**cfg.model_kwargs, "depth": cfg.depth, "width": cfg.width,
            "residual": arch == "residual"}


class GradientHealth(Experiment):
    name = "gradient-health"
    claim = "Batch norm prevents vanishing and exploding gradients in deep networks."
    seeds = "001"
    quote = ("It helps prevent issues like vanishing/exploding gradients, particularly in "
             "deep networks, by ensuring the activations are within a stable range.")
    section = "claim"
    papers = ("Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, ICLR 2019, A Mean Field "
              "Theory of Batch Normalization")
    literature = (
        "Wide fully connected BN networks at initialisation (mean-field theory, checked on "
        "MNIST and CIFAR-10 MLPs): gradient signals grow exponentially with depth, BN itself "
        "is the cause, and neither the initial weight variance nor the nonlinearity removes "
        "it; after a single optimisation step the per-layer gradients have a much smaller "
        "dynamic range. Skip connections are what avoid the explosion."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Adding BN to a deep network, plain or residual, evens out the gradient "
                     "sizes across its layers at init by at least a factor of ten.",
        "not supported": "Do not count on BN to keep a deep network's gradients even across "
                         "layers; the architecture (skip connections) and the init decide "
                         "that.",
        "inconclusive": "The seeds disagree on whether BN evens out gradient sizes across "
                        "layers; measure the per-layer gradient norms of your own network.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=5, depth=6, width=16, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=150, eval_subset=2000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=150, eval_subset=2000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} depth {cfg.depth} width {cfg.width}, plain vs residual (pre-"
            f"activation x + Linear(ReLU(norm(x))) blocks, PyTorch's default init), norm=bn vs "
            f"none, SGD lr {cfg.lr} momentum {cfg.momentum}, batch {cfg.batch_size}, "
            f"{cfg.steps} steps, seeds {list(cfg.seeds)}. Per-layer weight-gradient norms on "
            f"the first {GRAD_BATCH} training images (train mode, float64) at init and after "
            f"training; spread = log10(max/min) over the {cfg.depth - 1} width × width hidden "
            f"layers; accuracy on {eval_set_text(cfg.eval_subset)}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"arch": arch, "norm": norm}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
                model_kwargs=_arch_kwargs(cfg, arch),
            ), kind="grads+train")
            for arch in ARCHS
            for norm in ("none", "bn")
            for seed in cfg.seeds
        ]

    def runners(self) -> dict[str, RunFunction]:
        return {"grads+train": grads_train_run}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for arch in ARCHS:
            for norm in ("none", "bn"):
                rs = select(results, arch=arch, norm=norm)
                table.append(table_row(
                    {"arch": arch, "norm": norm},
                    spread_init_dec=fmt_ms([init_spread(r) for r in rs], 1.0, ""),
                    spread_trained_dec=fmt_ms([trained_spread(r) for r in rs], 1.0, ""),
                    final_acc=fmt_ms([final_acc(r) for r in rs]), seeds=len(rs),
                ))
        per_arch = {arch: arch_diffs(results, arch) for arch in ARCHS}
        diffs = [min(pair) for pair in zip(*per_arch.values(), strict=True)]
        decision = PAIRED.decide(diffs)
        arch_decisions = {arch: compare(d, PAIRED.threshold) for arch, d in per_arch.items()}
        headline = (
            f"Depth {cfg.depth}: BN narrows the spread of per-layer gradient norms at init by "
            f"{arch_decisions['plain'].pm(2)} decades in the plain net and by "
            f"{arch_decisions['residual'].pm(2)} in the residual net (the smaller, per seed: "
            f"{decision.pm(2)})."
        )
        after = {f"{a}_diff_dec": d.mean for a, d in arch_decisions.items()}
        after |= {f"{a}_ci_low_dec": d.low for a, d in arch_decisions.items()}
        after |= {f"{a}_ci_high_dec": d.high for a, d in arch_decisions.items()}
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, after=after),
                        table, notes=[
            "A no-BN plain ReLU net at PyTorch's default init shrinks the backward signal "
            "at every layer, so its gradients vanish towards the input; BN replaces that by "
            "a growth towards the input (Yang et al., 2019). The residual nets' skip path "
            "carries the gradient either way.",
        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        return [layer_norms_plot(out_dir / "gradient_health.png", cfg, results)]


def init_spread(r: RunResult) -> float:
    return spread(hidden_norms(r.summary["grad_norms_init"]))


def trained_spread(r: RunResult) -> float:
    return spread(hidden_norms(r.summary["grad_norms_trained"]))


def arch_diffs(results: list[RunResult], arch: str) -> list[float]:
    """Per seed, the init spread without BN minus with BN, in architecture ``arch``."""
    none = select(results, arch=arch, norm="none")
    bn = select(results, arch=arch, norm="bn")
    return [init_spread(a) - init_spread(b) for a, b in zip(none, bn, strict=True)]


def layer_norms_plot(path: Path, cfg: Config, results: list[RunResult]) -> str:
    """Per-layer gradient norm (mean of log10 over seeds) vs layer, at init (solid) and
    after training (dashed), one colour per architecture × norm."""
    from bnlab._plot import pyplot
    from bnlab.experiments.plots import save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    for ax, arch in zip(axes, ARCHS, strict=True):
        for norm, color in (("none", "tab:red"), ("bn", "tab:blue")):
            rs = select(results, arch=arch, norm=norm)
            for key, style in (("grad_norms_init", "-"), ("grad_norms_trained", "--")):
                curves = [[math.log10(max(v, 1e-300)) for v in r.summary[key]] for r in rs]
                if not curves:
                    continue
                mean = [sum(c) / len(c) for c in zip(*curves, strict=True)]
                when = "init" if key.endswith("init") else f"after {cfg.steps} steps"
                ax.plot(range(1, len(mean) + 1), mean, style, color=color,
                        label=f"{norm}, {when}")
        ax.set_title(f"{arch} deep_mlp, depth {cfg.depth}")
        ax.set_xlabel("layer (1 = input layer, last = head)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 ‖∂loss/∂W_l‖")
    axes[1].legend(fontsize=8)
    return save(fig, path)


def grads_train_run(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Per-layer gradient norms at init, the plain training run, the norms again on the
    trained model (same batch); the summary gets ``grad_norms_init`` and
    ``grad_norms_trained``."""
    from bnlab.train import build, train

    x, y = probe_batch(ctx.data)
    at_init = layer_grad_norms(build(spec.config, ctx.data.in_shape, ctx.data.num_classes),
                               x, y)
    result = train(spec.config, out_dir=None, progress=ctx.progress, data=ctx.data)
    trained = layer_grad_norms(result.model, x, y)
    return RunOutput(result.metrics, {**result.summary, "grad_norms_init": at_init,
                                      "grad_norms_trained": trained})


EXPERIMENT = GradientHealth()
