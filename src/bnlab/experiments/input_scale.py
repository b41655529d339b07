"""Claim: batch norm makes the features independent of the input's scale (seed 003).

The identity: a BN layer normalises its input with the batch's own mean and variance, so
multiplying what comes before it by a factor ``c`` (the inputs, or the weights of the layer
feeding it) changes nothing after it, and the gradient with respect to those weights is
unchanged too (so SGD follows the same path). With BN's ``eps`` it is exact in a shifted
form, ``BN_eps(c·z) = BN_{eps/c²}(z)``: the output changes by the order of eps / variance,
float-level where the variance is far above eps; for a tiny ``c`` the first layer's
variance times c² meets eps and the output shrinks. Without BN nothing removes ``c``.

Protocol, two run kinds: a probe at init (per layer, the relative change of each block's
output, and of the logits, when the inputs or the pre-BN weights are multiplied by each
factor; batch statistics, as in training), and training with the inputs multiplied by each
factor (the training and test images both), with and without BN, at one learning rate.
Metric per seed: the spread of final test accuracy over the factors (best − worst) without
BN minus the spread with BN.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bnlab.experiments.analysis import eval_set_text, final_acc, fmt_ms, select, table_row
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

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bnlab.data import DatasetSplits

SCALES = (0.01, 1.0, 100.0)
NORMS = ("none", "bn")
PROBE_BATCH = 256  # training images the probe forwards (the first ones)
PAIRED = PairedClaim(
    "Per seed: the spread of final test accuracy over the input scales (best − worst) "
    "without BN minus the spread with BN", threshold=5.0, key="spread_diff_pp",
    note="The probe at init (BN's output unchanged by the input's or the pre-BN weights' "
         "scale, no-BN's changed) is shown, not decided on.",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """Inputs (train and test) multiplied by each factor of ``scales``, with and without
    BN; the probe multiplies the inputs and the pre-BN weights by the same factors."""

    scales: tuple[float, ...] = SCALES
    lr: float = 0.1
    model: str = "paper_mlp"


def scaled_inputs(data: DatasetSplits, scale: float, shift: float = 0.0) -> DatasetSplits:
    """``data`` with every image (train and test) mapped to ``scale · x + shift``; labels
    and everything else as they are. Only the copies are changed."""
    from torch.utils.data import TensorDataset

    def mapped(split: TensorDataset) -> TensorDataset:
        x, y = split.tensors
        return TensorDataset(x * scale + shift if shift else x * scale, y)

    return replace(data, train=mapped(data.train), test=mapped(data.test))


def train_scaled(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """Plain training on the inputs mapped by ``spec.params`` (``input_scale``,
    ``input_shift``): see :func:`scaled_inputs`."""
    from bnlab.train import train

    data = scaled_inputs(ctx.data, float(spec.params["input_scale"]),
                         float(spec.params.get("input_shift", 0.0)))
    result = train(spec.config, out_dir=None, progress=ctx.progress, data=data)
    return RunOutput(result.metrics, result.summary)


def pre_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers (conv/linear) that feed a block's norm, in the model's order: the
    "pre-BN weights" of a BN model, the same layers of its no-BN twin."""
    from bnlab.models.layers import Block

    return [m.layer for m in model.modules() if isinstance(m, Block)]


def block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of each block (after its norm and activation), then the model's output,
    for the batch ``x``; no gradient, BN with the batch's statistics if in train mode."""
    import torch

    from bnlab.models.layers import Block

    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: outs.append(out.detach()))
               for m in model.modules() if isinstance(m, Block)]
    try:
        with torch.no_grad():
            final = model(x)
    finally:
        for h in handles:
            h.remove()
    return [*outs, final.detach()]


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|``: how much ``a`` differs from the reference ``b``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def scale_probe(model: nn.Module, x: torch.Tensor, scales: tuple[float, ...]
                ) -> dict[str, dict[str, list[float]]]:
    """Per factor ``c`` of ``scales``: the relative change (:func:`relative_change`) of each
    block's output and of the logits when ``x`` is replaced by ``c·x`` (``"input"``), and
    when the weights of every pre-norm layer are multiplied by ``c`` (``"weights"``; biases
    kept). The model runs in its current mode on throwaway copies; it is not changed."""
    import torch

    net = copy.deepcopy(model)
    ref = block_outputs(net, x)
    probe: dict[str, dict[str, list[float]]] = {"input": {}, "weights": {}}
    for c in scales:
        probe["input"][f"{c:g}"] = [relative_change(a, b) for a, b in
                                    zip(block_outputs(net, c * x), ref, strict=True)]
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for layer in pre_norm_layers(scaled):
                layer.get_parameter("weight").mul_(c)
        probe["weights"][f"{c:g}"] = [relative_change(a, b) for a, b in
                                      zip(block_outputs(scaled, x), ref, strict=True)]
    return probe


def probe_run(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """The model of ``spec.config`` at init (train mode: batch statistics), probed on the
    first ``params["batch"]`` training images (:func:`scale_probe`); its test accuracy at
    init (running statistics at their initial values) goes with it."""
    import time

    from bnlab.train import build, evaluate

    t0 = time.perf_counter()
    model = build(spec.config, ctx.data.in_shape, ctx.data.num_classes)
    model.train()
    x = ctx.data.train.tensors[0][:int(spec.params["batch"])]
    probe = scale_probe(model, x, tuple(spec.params["scales"]))
    _, acc = evaluate(model, ctx.data.test, limit=spec.config.eval_subset)
    return RunOutput([{"step": 0, "test_acc": acc}],
                     {"probe": probe, "test_acc": acc, "wall_time_s": time.perf_counter() - t0})


def spread(results: list[RunResult]) -> float:
    """Best minus worst final test accuracy over ``results`` (one seed, every scale)."""
    accs = [final_acc(r) for r in results]
    return max(accs) - min(accs)


def worst_change(results: list[RunResult], what: str, scale: float) -> float:
    """The largest relative change over the layers and the seeds' probes."""
    return max(max(r.summary["probe"][what][f"{scale:g}"]) for r in results)


class InputScale(Experiment):
    name = "input-scale"
    claim = "With batch norm the network learns features independent of the input's scale."
    seeds = "003"
    quote = "Normalized batch ensures the model learns features independent of input scale."
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift")
    literature = (
        "Ioffe & Szegedy (2015, §3.3) state the identity BN(a·W·u) = BN(W·u) for a scalar a, "
        "so the layer's output and the gradient with respect to its input are unaffected by "
        "the scale of its parameters; the scale of the input to a BN layer drops out the "
        "same way. It is an algebraic property, not a measured number (their experiments: "
        "MNIST MLP, ImageNet Inception)."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "With BN the scale of the inputs (e.g. pixels in [0, 255] or [0, 1]) "
                     "barely matters at a fixed learning rate; without BN it must be set "
                     "with care.",
        "not supported": "Here BN did not make training noticeably less sensitive to the "
                         "input scale than no BN: keep normalising the inputs either way.",
        "inconclusive": "The runs cannot tell whether BN makes training less sensitive to "
                        "the input scale; normalise the inputs regardless.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=20, eval_subset=200, scales=(0.01, 100.0)),
        "quick": Config(seeds=(0, 1, 2), steps=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"{cfg.model} with norm=bn vs none; probe at init on the first {PROBE_BATCH} "
            f"training images (train mode, batch statistics): per block, max |Δ| / max |out| "
            f"of its output when the inputs, or the weights of every layer feeding a norm, "
            f"are multiplied by each factor of {list(cfg.scales)}. Training: inputs (train "
            f"and test) multiplied by each factor, SGD lr {cfg.lr} momentum {cfg.momentum}, "
            f"batch {cfg.batch_size}, {cfg.steps} steps, seeds {list(cfg.seeds)}, final "
            f"accuracy on {eval_set_text(cfg.eval_subset)}. With BN's eps (1e-5) a BN layer "
            f"fed c·z computes exactly BN with eps/c² on z: the change is of the order of "
            f"eps / variance, float-level where the variance is far above eps, not for a "
            f"tiny c (the first layer's variance times c² meets eps)."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        probes = [
            RunSpec({"run": "probe", "norm": norm}, seed,
                    train_config(cfg, dataset, seed, norm=norm, steps=1, eval_every=1),
                    kind="probe-scale",
                    params={"scales": list(cfg.scales), "batch": PROBE_BATCH})
            for norm in NORMS for seed in cfg.seeds
        ]
        trains = [
            RunSpec({"run": "train", "norm": norm, "scale": c}, seed,
                    train_config(cfg, dataset, seed, norm=norm, eval_every=cfg.steps),
                    kind="train-scaled-inputs", params={"input_scale": c})
            for norm in NORMS for c in cfg.scales for seed in cfg.seeds
        ]
        return probes + trains

    def runners(self) -> dict[str, RunFunction]:
        return {"probe-scale": probe_run, "train-scaled-inputs": train_scaled}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in NORMS:
            probes = select(results, run="probe", norm=norm)
            for c in cfg.scales:
                rs = select(results, run="train", norm=norm, scale=c)
                table.append(table_row(
                    {"norm": norm, "scale": c},
                    final_acc=fmt_ms([final_acc(r) for r in rs]),
                    probe_input_change=f"{worst_change(probes, 'input', c):.2e}",
                    probe_weight_change=f"{worst_change(probes, 'weights', c):.2e}",
                    seeds=len(rs),
                ))
        spreads = {}
        for norm in NORMS:
            by_seed = [select(results, run="train", norm=norm, scale=c) for c in cfg.scales]
            spreads[norm] = [spread(list(runs)) for runs in zip(*by_seed, strict=True)]
        decision = PAIRED.decide([100 * (a - b) for a, b in
                                  zip(spreads["none"], spreads["bn"], strict=True)])
        bn_probes = select(results, run="probe", norm="bn")
        none_probes = select(results, run="probe", norm="none")
        large = [c for c in cfg.scales if c >= 1.0 and c != 1.0]
        worst_large_bn = max((worst_change(bn_probes, "input", c) for c in large),
                             default=math.nan)
        worst_large_none = min((worst_change(none_probes, "input", c) for c in large),
                               default=math.nan)
        small = min(cfg.scales)
        headline = (
            f"Accuracy spread over input scales {list(cfg.scales)}: no BN "
            f"{fmt_ms(spreads['none'], unit='')} vs BN {fmt_ms(spreads['bn'], unit='')} "
            f"points ({decision.pm(1)} larger without BN); at init BN's outputs change by at "
            f"most {worst_large_bn:.1e} (relative) for inputs × {large}, no-BN's by at least "
            f"{worst_large_none:.1e}."
        )
        notes = [
            f"BN's eps: with inputs × {small:g} the BN model's outputs at init change by up "
            f"to {worst_change(bn_probes, 'input', small):.1e} (relative), with every pre-BN "
            f"layer's weights × {small:g} by up to "
            f"{worst_change(bn_probes, 'weights', small):.1e}: a layer's batch variance "
            f"times {small:g}² is no longer large next to eps (1e-5), the hidden layers' "
            f"least of all.",
        ]
        mean_bn, _, _ = mean_std(spreads["bn"])
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision,
            before={"spread_none_pp": 100 * mean_std(spreads["none"])[0],
                    "spread_bn_pp": 100 * mean_bn},
            after={"probe_bn_max_change_large_scales": worst_large_bn,
                   "probe_none_min_change_large_scales": worst_large_none,
                   "probe_bn_max_change_smallest_scale": worst_change(bn_probes, "input", small)},
        ), table, notes)

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import save

        plt = pyplot()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.0, 4.0))
        for norm in NORMS:
            ys = []
            for c in cfg.scales:
                rs = select(results, run="train", norm=norm, scale=c)
                ys.append(100 * sum(final_acc(r) for r in rs) / len(rs))
            ax.plot(list(cfg.scales), ys, "o-", label="BN" if norm == "bn" else "no BN")
            probes = select(results, run="probe", norm=norm)
            bx.plot(list(cfg.scales),
                    [max(1e-12, worst_change(probes, "input", c)) for c in cfg.scales],
                    "o-", label="BN" if norm == "bn" else "no BN")
        ax.set_xscale("log")
        ax.set_xlabel("input scale")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{cfg.model}: trained on inputs × scale")
        bx.set_xscale("log")
        bx.set_yscale("log")
        bx.set_xlabel("input scale")
        bx.set_ylabel("largest relative change of a layer's output")
        bx.set_title("at init: outputs with inputs × scale")
        for a in (ax, bx):
            a.legend()
            a.grid(alpha=0.3)
        return [save(fig, out_dir / "input_scale.png")]


EXPERIMENT = InputScale()
