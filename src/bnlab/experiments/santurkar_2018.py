"""Literature: Santurkar, Tsipras, Ilyas & Madry (NeurIPS 2018), "How Does Batch
Normalization Help Optimization?", their three tests of "BN helps because it reduces
internal covariate shift", on the BN paper's MLP.

Protocol: ``paper_mlp`` (3 hidden layers of 100 sigmoids) with norm = none, bn and
noisy_bn (:mod:`bnlab.nn.noisy`: BN followed, in training, by a random per-channel scale and
shift drawn every step from a distribution whose mean and variance change every step), the
same seeds, inits (where the parameters exist in both) and batches. Along training:

- the lab's drift metric (:func:`bnlab.experiments.covariate_shift.drift`) of the input to
  one last-layer sigmoid, the probe images normalised as a training batch (so noisy BN's
  noise is in what is measured, as it is in what the next layer sees while training);
- at every ``probe_every`` steps, on a fixed training batch, for BN and no BN:
  their gradient-based ICS (:func:`gradient_ics`: ‖G − G′‖ / ‖G‖ and cos(G, G′), G the
  gradient of a layer's weights, G′ the same after the layers before it took their SGD
  step on the same batch) and the loss landscape along the gradient
  (:func:`smoothness`: the range of the loss, the largest change of the gradient and the
  effective β-smoothness over a few step sizes).

Verdict (pre-registered): on the claim "BN helps because it reduces ICS", per seed, final
test accuracy with BN minus with noisy BN; the claim predicts that noisy BN, whose inputs
shift more, loses at least 1 point. Santurkar et al.'s result predicts "not supported".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bnlab.experiments.analysis import final_acc, fmt_ms, select, table_row
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunContext,
    RunFunction,
    RunOutput,
    RunResult,
    RunSpec,
    train_config,
)
from bnlab.experiments.covariate_shift import PERCENTILES, drift, train_with_percentiles
from bnlab.experiments.covariate_shift import Config as ShiftConfig
from bnlab.experiments.verdict import PairedClaim, interval, mean_std, pm

if TYPE_CHECKING:
    import torch
    from torch import nn

NORMS = ("none", "bn", "noisy_bn")
PROBED = ("none", "bn")  # the gradient probes compare BN with no BN, as in their Fig. 4/5
LAYERS = ("hidden2", "hidden3", "out")  # the layers that have layers before them
SMOOTHNESS = ("loss_range", "grad_change", "beta")
PAIRED = PairedClaim(
    "Per seed, final test accuracy with BN minus with noisy BN (BN followed by random "
    "per-step scales and shifts, so that its layers' inputs shift more); the claim 'BN "
    "helps because it reduces internal covariate shift' predicts a loss of at least 1 "
    "percentage point with noisy BN",
    threshold=1.0,
    note="The drift of all three, the gradient-based ICS and the smoothness along the "
         "gradient (BN vs no BN) are reported with their intervals, not part of the verdict.",
)


@dataclass(frozen=True, kw_only=True)
class Config(ShiftConfig):
    """covariate-shift's settings, plus the noise and the gradient probes."""

    noise_mean: float = 0.5
    noise_var: float = 0.5
    probe_every: int
    step_multiples: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # × lr, along −gradient


class Santurkar2018(Experiment):
    name = "santurkar-2018"
    claim = ("Batch norm helps training because it reduces internal covariate shift "
             "(tested as Santurkar et al. 2018 test it).")
    seeds = "000, 001"
    quote = ("By normalizing the inputs, Batch Normalization helps in reducing this shift, "
             "making the training process more stable.")
    section = "literature"
    papers = ("Santurkar, Tsipras, Ilyas & Madry, NeurIPS 2018, How Does Batch Normalization "
              "Help Optimization?")
    literature = (
        "VGG on CIFAR-10: a network with noisy BN (noise after each BN layer, its mean and "
        "variance changing every step) trains about as well as with standard BN and clearly "
        "better than without BN, although its layers' input distributions are visibly less "
        "stable (Fig. 2); by their gradient-based measure (‖G − G′‖ and cos(G, G′)) BN does "
        "not reduce internal covariate shift and can increase it (Fig. 5, VGG and a deep "
        "linear network); with BN the loss changes less and the gradient changes less along "
        "the gradient direction, i.e. a smoother landscape (Fig. 4, VGG on CIFAR-10). "
        "Described in words: the lab compares direction and size, not accuracy."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "Extra shift of the layers' inputs costs accuracy here, so keeping "
                     "activations' distributions steady is part of what BN buys you.",
        "not supported": "Noise that makes the layers' inputs shift more does not cost BN its "
                         "accuracy here: look to BN's effect on optimisation, not to steadier "
                         "activations, for why it helps.",
        "inconclusive": "The seeds disagree too much to say whether extra input shift after "
                        "BN costs accuracy.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=20, record_every=10, probe_every=20),
        "quick": Config(seeds=(0, 1, 2), steps=4000, record_every=100, probe_every=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=4000, record_every=100, probe_every=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} (784-100-100-100-10, sigmoid) with norm = none, bn, noisy_bn "
            f"(per step: scale means ~ U(1 ± {cfg.noise_mean:g}), shift means ~ "
            f"U(±{cfg.noise_mean:g}), variances ~ U(0, {cfg.noise_var:g}); per channel "
            f"γ ~ N, β ~ N), batch {cfg.batch_size}, SGD lr {cfg.lr} (no momentum), "
            f"{cfg.steps} steps; every {cfg.record_every} steps: test accuracy (10k images, "
            f"eval mode) and the {'/'.join(map(str, PERCENTILES))}th percentiles of a "
            f"last-layer sigmoid's input over 1000 test images normalised as a training "
            f"batch (drift as in covariate-shift); every {cfg.probe_every} steps, on a fixed "
            f"batch of {cfg.batch_size} training images, for none and bn: ‖G − G′‖/‖G‖ and "
            f"cos(G, G′) of layers {', '.join(LAYERS)} (G′ after the layers before took "
            f"their SGD step), and along −gradient with step sizes "
            f"{[m * cfg.lr for m in cfg.step_multiples]}: loss range, largest gradient "
            f"change, effective β; seeds {list(cfg.seeds)}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        specs = []
        for norm in NORMS:
            kwargs = ({"noise_mean": cfg.noise_mean, "noise_var": cfg.noise_var}
                      if norm == "noisy_bn" else {})
            for seed in cfg.seeds:
                specs.append(RunSpec({"norm": norm}, seed, train_config(
                    cfg, dataset, seed, norm=norm, norm_kwargs=kwargs,
                    eval_every=cfg.record_every,
                ), kind="santurkar", params={
                    "probe_every": cfg.probe_every if norm in PROBED else 0,
                    "step_sizes": [m * cfg.lr for m in cfg.step_multiples],
                }))
        return specs

    def runners(self) -> dict[str, RunFunction]:
        return {"santurkar": train_with_probes}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        runs = {norm: select(results, norm=norm) for norm in NORMS}
        table = []
        for norm in NORMS:
            rs = runs[norm]
            cols: dict[str, Any] = {
                "final_acc": fmt_ms([final_acc(r) for r in rs]),
                "drift": fmt_ms([drift(r) for r in rs], 1.0, ""),
            }
            for key in ("ics_rel", "ics_cos", *SMOOTHNESS):
                cols[key] = (fmt_ms([probe_mean(r, key) for r in rs], 1.0, "")
                             if norm in PROBED else "")
            table.append(table_row({"norm": norm}, **cols, seeds=len(rs)))
        bn, noisy, none = runs["bn"], runs["noisy_bn"], runs["none"]
        decision = PAIRED.decide([100 * (final_acc(b) - final_acc(n))
                                  for b, n in zip(bn, noisy, strict=True)])
        after: dict[str, Any] = {
            **{f"acc_{norm}": mean_std([final_acc(r) for r in runs[norm]])[0]
               for norm in NORMS},
            **paired("bn_gain_pp", bn, none, lambda r: 100 * final_acc(r)),
            **paired("noisy_vs_bn_drift_log2", noisy, bn, lambda r: math.log2(drift(r))),
            **paired("none_vs_bn_drift_log2", none, bn, lambda r: math.log2(drift(r))),
        }
        for key in ("ics_rel", "ics_cos", *SMOOTHNESS):
            after.update(paired(f"{key}_bn_minus_none", bn, none,
                                lambda r, key=key: probe_mean(r, key)))
        headline = (
            f"Final test accuracy, BN minus noisy BN: {decision.pm(2)} points, although noisy "
            f"BN's sigmoid input drifts {2 ** after['noisy_vs_bn_drift_log2']:.1f}× BN's; "
            f"gradient-based ICS ‖G − G′‖/‖G‖, BN minus no BN: "
            f"{pm_of(after, 'ics_rel_bn_minus_none', 3)}; loss range along the gradient, BN "
            f"minus no BN: {pm_of(after, 'loss_range_bn_minus_none', 3)}."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, after=after), table,
                        notes=[
                            "Positive drift log2 ratios: the first variant's sigmoid input "
                            "shifts more than BN's. ics_rel, ics_cos, loss_range, grad_change, "
                            "beta: mean over the probed steps (and over layers for ICS).",
                        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import COLORS, curves_plot, save

        colors = {**COLORS, "noisy_bn": "tab:orange"}
        files = [curves_plot(out_dir / "santurkar_2018_accuracy.png",
                             {n: select(results, norm=n) for n in NORMS},
                             "paper_mlp: test accuracy vs step (none, bn, noisy_bn)",
                             colors=colors)]
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for norm in ("bn", "noisy_bn"):
            rs = select(results, norm=norm)
            if rs:
                steps = [m["step"] for m in rs[0].metrics]
                for q, style in zip(PERCENTILES, ("--", "-", "--"), strict=True):
                    axes[0].plot(steps, [m[f"p{q}"] for m in rs[0].metrics], style,
                                 color=colors[norm], label=f"{norm} p{q}" if q == 50 else None)
        axes[0].set_title("sigmoid input, 15/50/85th pct (seed 0)", fontsize=10)
        for ax, key, title in ((axes[1], "ics_rel", "‖G − G′‖ / ‖G‖ (mean over layers)"),
                               (axes[2], "loss_range", "loss range along −gradient")):
            for norm in PROBED:
                for i, r in enumerate(select(results, norm=norm)):
                    rows = [m for m in r.metrics if "loss_range" in m]
                    ax.plot([m["step"] for m in rows], [row_value(m, key) for m in rows],
                            "o-", color=colors[norm], alpha=0.6,
                            label=norm if i == 0 else None)
            ax.set_title(title, fontsize=10)
            ax.set_yscale("log")
        for ax in axes:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Santurkar et al. 2018 on paper_mlp: noisy BN's shift (cf. Fig. 2), "
                     "gradient ICS (cf. Fig. 5), smoothness (cf. Fig. 4)", fontsize=10)
        files.append(save(fig, out_dir / "santurkar_2018_probes.png"))
        return files


def row_value(m: dict[str, Any], key: str) -> float:
    """``key`` of one probed row; for ``ics_rel``/``ics_cos`` the mean over :data:`LAYERS`."""
    if key in ("ics_rel", "ics_cos"):
        return float(np.mean([m[f"{key}_{layer}"] for layer in LAYERS]))
    return float(m[key])


def probe_mean(r: RunResult, key: str) -> float:
    """The mean of ``key`` (:func:`row_value`) over a run's probed steps; nan without any."""
    values = [row_value(m, key) for m in r.metrics if "loss_range" in m]
    return float(np.mean(values)) if values else math.nan


def paired(key: str, a: Sequence[RunResult], b: Sequence[RunResult],
           metric: Any) -> dict[str, float]:
    """Per seed ``metric(a) − metric(b)``: the mean, and its 95 % interval (t, n − 1)."""
    diffs = [metric(x) - metric(y) for x, y in zip(a, b, strict=True)]
    low, high = interval(diffs)
    return {key: mean_std(diffs)[0], f"{key}_ci_low": low, f"{key}_ci_high": high,
            f"{key}_seeds": len(diffs)}


def pm_of(effect: dict[str, Any], key: str, digits: int) -> str:
    """A :func:`paired` difference of ``effect`` for a headline, with its interval."""
    return pm(effect[key], effect[f"{key}_ci_low"], effect[f"{key}_ci_high"],
              int(effect[f"{key}_seeds"]), digits)


# --------------------------------------------------------------------------- the probes


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    params: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x), y)
    return float(loss.detach()), list(torch.autograd.grad(loss, list(params)))


def stage_weight(stage: nn.Module) -> torch.Tensor:
    """The weight of the first Linear or Conv layer in ``stage``: "the layer's weights"."""
    from torch import nn

    for m in stage.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.weight
    raise ValueError(f"{type(stage).__name__} has no Linear or Conv layer")


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def gradient_ics(model: nn.Module, stages: Sequence[nn.Module], x: torch.Tensor,
                 y: torch.Tensor, lr: float) -> list[tuple[float, float]]:
    """Santurkar et al.'s internal covariate shift of each stage after the first.

    ``model(x)`` applies ``stages`` in order (cross-entropy loss on ``y``, training mode).
    For stage i with weights W_i (:func:`stage_weight`): G = ∇_{W_i} L at the current
    parameters, G′ = ∇_{W_i} L after every parameter of stages 0 … i−1 has taken its own SGD
    step ``p − lr · ∇_p L`` (gradients of the same batch, at the current parameters); stage
    i and those after it unchanged. Returns, for i = 1 … k−1, ``(‖G − G′‖ / ‖G‖,
    cos(G, G′))``. The model's parameters, buffers and mode are restored.
    """
    import torch

    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    params = [list(s.parameters()) for s in stages]
    flat = [p for ps in params for p in ps]
    model.train()
    try:
        _, grads = _loss_and_grads(model, x, y, flat)
        grad_of = {id(p): g for p, g in zip(flat, grads, strict=True)}
        out = []
        for i in range(1, len(stages)):
            w = stage_weight(stages[i])
            before = [p for ps in params[:i] for p in ps]
            originals = [p.detach().clone() for p in before]
            with torch.no_grad():
                for p in before:
                    p.sub_(lr * grad_of[id(p)])
            try:
                _, (g2,) = _loss_and_grads(model, x, y, [w])
            finally:
                with torch.no_grad():
                    for p, p0 in zip(before, originals, strict=True):
                        p.copy_(p0)
            g = grad_of[id(w)].double()
            g2 = g2.double()
            gn, g2n = float(g.norm()), float(g2.norm())
            rel = float((g - g2).norm()) / gn if gn > 0 else math.nan
            cos = float((g * g2).sum()) / (gn * g2n) if gn > 0 and g2n > 0 else math.nan
            out.append((rel, cos))
        return out
    finally:
        model.load_state_dict(snapshot)
        model.train(was_training)


def smoothness(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               step_sizes: Sequence[float]) -> dict[str, float]:
    """The loss landscape along the gradient direction (Santurkar et al., Fig. 4).

    With g = ∇L(W) on ``(x, y)`` (cross-entropy, training mode) and, for each step size
    η of ``step_sizes``, L_η = L(W − η g) and g_η = ∇L(W − η g):

    - ``loss_range`` = max − min of {L(W)} ∪ {L_η};
    - ``grad_change`` = max_η ‖g_η − g‖ (their "gradient predictiveness");
    - ``beta`` = max_η ‖g_η − g‖ / ‖η g‖ (their "effective β-smoothness").

    The model's parameters, buffers and mode are restored.
    """
    import torch

    if not step_sizes or any(not eta > 0 for eta in step_sizes):
        raise ValueError(f"step_sizes must be positive numbers, got {list(step_sizes)}")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        loss0, g = _loss_and_grads(model, x, y, params)
        originals = [p.detach().clone() for p in params]
        gnorm = _norm(g)
        losses, changes, betas = [loss0], [], []
        for eta in step_sizes:
            with torch.no_grad():
                for p, p0, gi in zip(params, originals, g, strict=True):
                    p.copy_(p0 - eta * gi)
            loss, ge = _loss_and_grads(model, x, y, params)
            change = _norm([a - b for a, b in zip(ge, g, strict=True)])
            losses.append(loss)
            changes.append(change)
            betas.append(change / (eta * gnorm) if gnorm > 0 else math.nan)
        return {"loss_range": max(losses) - min(losses), "grad_change": max(changes),
                "beta": max(betas)}
    finally:
        model.load_state_dict(snapshot)
        model.train(was_training)


def train_with_probes(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """The ``"santurkar"`` kind: :func:`~bnlab.experiments.covariate_shift.
    train_with_percentiles` in torch with the percentiles taken in training mode and, every
    ``probe_every`` steps (0: never), :func:`gradient_ics` of paper_mlp's hidden2, hidden3
    and out and :func:`smoothness` on a fixed training batch (drawn with the run's seed)."""
    import torch

    cfg = spec.config
    every = int(spec.params["probe_every"])
    step_sizes = [float(s) for s in spec.params["step_sizes"]]
    xtr, ytr = ctx.data.train.tensors
    idx = np.random.default_rng([cfg.seed, 2018]).choice(len(xtr), cfg.batch_size,
                                                         replace=False)
    x, y = xtr[torch.from_numpy(idx)], ytr[torch.from_numpy(idx)]

    def probe(model: Any, step: int) -> dict[str, Any]:
        if every <= 0 or step % every:
            return {}
        stages = [model.hidden1, model.hidden2, model.hidden3, model.out]
        row: dict[str, Any] = {}
        for layer, (rel, cos) in zip(LAYERS, gradient_ics(model, stages, x, y, cfg.lr),
                                     strict=True):
            row[f"ics_rel_{layer}"], row[f"ics_cos_{layer}"] = rel, cos
        return {**row, **smoothness(model, x, y, step_sizes)}

    return train_with_percentiles(cfg, "torch", ctx.data, probe_mode="train", probe=probe)


EXPERIMENT = Santurkar2018()
