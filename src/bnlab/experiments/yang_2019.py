"""Literature: Yang et al. (ICLR 2019), "A Mean Field Theory of Batch Normalization".

Three measurements on ``deep_mlp`` (ReLU):

(a) the growth rate of the weight gradients with depth at init in plain BN MLPs: per
    layer norms ‖∂loss/∂W_l‖ on one fixed batch (the first training images, train mode,
    float64), and minus the slope of the least-squares line through ``log10 ‖∂loss/∂W_l‖``
    against ``l`` over the width × width hidden layers: decades per layer by which the
    gradient grows towards the input. Depth 50, at each width × probe batch size (and the
    same nets without BN, for comparison);
(b) a depth × batch-size trainability map: plain BN MLPs (width 64) of depth 8 to 64
    trained for the same number of steps at each depth and batch size, final test
    accuracy per cell (depth 100 plain is in the ``depth`` experiment);
(c) the residual BN MLP (pre-activation blocks, :class:`bnlab.models.mlp.DeepMLP`) at depth
    100 at the same batch sizes, next to the map.

The verdict is (a)'s, at the largest width and batch (the theory's wide, large-batch
limit); (b) and (c) are the report's table and figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

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
    train_run,
)
from bnlab.experiments.gradient_health import hidden_norms, layer_grad_norms, probe_batch
from bnlab.experiments.verdict import PairedClaim, mean_std

PAIRED = PairedClaim(
    "Per seed, in the plain BN deep_mlp at the largest width and probe batch: the growth "
    "rate of the weight-gradient norm towards the input, minus the least-squares slope of "
    "log10 ‖∂loss/∂W_l‖ against the layer index l over the width × width hidden layers (a "
    "contrast of each layer with the next, within one network)",
    threshold=0.02, key="growth_dec_per_layer", suffix="dec",
    threshold_text="0.02 decades per layer (one decade over 50 layers)",
    note="The trainability map and the residual nets are shown beside it and decide "
         "nothing.",
)


def growth_rate(norms: Sequence[float]) -> float:
    """Minus the least-squares slope of ``log10(norms[i])`` against ``i``: the decades per
    layer by which the norms grow towards index 0; ``nan`` with fewer than two norms or a
    non-positive or non-finite one."""
    ys = [float(v) for v in norms]
    if len(ys) < 2 or not all(math.isfinite(v) and v > 0 for v in ys):
        return math.nan
    logs = [math.log10(v) for v in ys]
    n = len(logs)
    x_mean, y_mean = (n - 1) / 2.0, sum(logs) / n
    sxy = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(logs))
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    return -sxy / sxx


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """(a) at ``probe_depth`` for each of ``widths`` × ``probe_batches``; (b) the map over
    ``depths`` × ``batches`` at ``width``; (c) the residual net at ``residual_depth``."""

    model: str = "deep_mlp"
    probe_depth: int = 50
    widths: tuple[int, ...] = (64, 256)
    probe_batches: tuple[int, ...] = (64, 256)
    depths: tuple[int, ...] = (8, 16, 32, 64)
    batches: tuple[int, ...] = (16, 64, 256)
    residual_depth: int = 100
    width: int = 64


def _fmt_rate(values: Sequence[float]) -> str:
    """``mean ± std`` of growth rates with three decimals (they are ~0.01-0.1)."""
    m, s, n = mean_std(values)
    if n == 0 or not math.isfinite(m):
        return "n/a"
    return f"{m:+.3f}" if n == 1 else f"{m:+.3f} ± {s:.3f}"


def _cell(width: int, batch: int) -> str:
    return f"{width}x{batch}"


class Yang2019(Experiment):
    name = "yang-2019"
    claim = ("Plain BN networks' gradients explode exponentially with depth at "
             "initialisation (Yang et al. 2019); residual BN networks train at over 100 "
             "layers.")
    seeds = "002"
    quote = ("Using batch normalization, you can consistently accelerate and converge very "
             "deep networks possible to train networks with over 100 layers.")
    section = "literature"
    papers = ("Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, ICLR 2019, A Mean Field "
              "Theory of Batch Normalization")
    literature = (
        "Fully connected BN networks at init (mean-field theory, checked on MNIST and "
        "CIFAR-10): gradient signals grow exponentially with depth, at a rate set by the "
        "nonlinearity and, for wide networks and large batches, not by the width or the "
        "batch size; BN itself causes it, and no initial weight variance or nonlinearity "
        "removes it. Their Fig. 3a (MNIST, as reported): BN MLPs deeper than about 50 "
        "layers fail to train at any batch size. Nets with skip connections avoid it."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "A plain BN network's gradients grow by a fixed factor per layer at "
                     "init; past a few tens of layers add skip connections rather than "
                     "relying on BN alone.",
        "not supported": "Here plain BN networks' gradients do not grow measurably with "
                         "depth at init; a depth limit, if any, comes from elsewhere.",
        "inconclusive": "The gradient growth with depth in plain BN networks varies with the "
                        "seed here; measure it on your own network before stacking many "
                        "plain layers.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=5, probe_depth=6, widths=(16,),
                        probe_batches=(32,), depths=(2, 6), batches=(16,), residual_depth=6,
                        width=16, eval_subset=200),
        "quick": Config(seeds=(0, 1, 2), steps=100, eval_subset=1000),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=100, eval_subset=1000),
    }

    def protocol(self, cfg: Config) -> str:
        return (
            f"(a) {cfg.model} depth {cfg.probe_depth} at init, width in {list(cfg.widths)} × "
            f"probe batch in {list(cfg.probe_batches)} (the first training images, train "
            f"mode, float64), norm=bn and none; growth rate = minus the least-squares slope "
            f"of log10 ‖∂loss/∂W_l‖ over the width × width hidden layers. (b) plain BN "
            f"{cfg.model} width {cfg.width}, depth in {list(cfg.depths)} × batch in "
            f"{list(cfg.batches)}; (c) residual BN {cfg.model} (pre-activation blocks) depth "
            f"{cfg.residual_depth} at each batch; SGD lr {cfg.lr} momentum {cfg.momentum}, "
            f"{cfg.steps} steps in every cell, accuracy on {eval_set_text(cfg.eval_subset)}; "
            f"seeds {list(cfg.seeds)}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        def trained(arch: str, depth: int, batch: int, seed: int) -> RunSpec:
            return RunSpec({"part": "map", "arch": arch, "depth": depth, "batch": batch},
                           seed, train_config(
                cfg, dataset, seed, norm="bn", batch_size=batch, eval_every=cfg.steps,
                model_kwargs={**cfg.model_kwargs, "depth": depth, "width": cfg.width,
                              "residual": arch == "residual"}))

        probes = [
            RunSpec({"part": "growth", "norm": norm}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.steps,
                model_kwargs={**cfg.model_kwargs, "depth": cfg.probe_depth,
                              "width": max(cfg.widths)}),
                kind="grad-growth",
                params={"widths": list(cfg.widths), "batches": list(cfg.probe_batches)})
            for norm in ("bn", "none")
            for seed in cfg.seeds
        ]
        plain = [trained("plain", d, b, s) for d in cfg.depths for b in cfg.batches
                 for s in cfg.seeds]
        residual = [trained("residual", cfg.residual_depth, b, s) for b in cfg.batches
                    for s in cfg.seeds]
        return probes + plain + residual

    def runners(self) -> dict[str, RunFunction]:
        return {"train": train_run, "grad-growth": grad_growth_run}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in ("bn", "none"):
            ps = select(results, part="growth", norm=norm)
            for w in cfg.widths:
                for b in cfg.probe_batches:
                    rates = [p.summary["growth"][_cell(w, b)] for p in ps]
                    table.append(table_row(
                        {"part": "growth", "arch": "plain", "norm": norm, "depth":
                         cfg.probe_depth, "width": w, "batch": b},
                        growth_dec_per_layer=_fmt_rate(rates), seeds=len(ps)))
        cells = [("plain", d) for d in cfg.depths] + [("residual", cfg.residual_depth)]
        for arch, depth in cells:
            for b in cfg.batches:
                rs = select(results, part="map", arch=arch, depth=depth, batch=b)
                table.append(table_row(
                    {"part": "map", "arch": arch, "norm": "bn", "depth": depth,
                     "width": cfg.width, "batch": b},
                    final_acc=fmt_ms([final_acc(r) for r in rs]),
                    diverged=sum(bool(r.summary.get("diverged")) for r in rs),
                    seeds=len(rs)))
        top = _cell(max(cfg.widths), max(cfg.probe_batches))
        bn = select(results, part="growth", norm="bn")
        none = select(results, part="growth", norm="none")
        decision = PAIRED.decide([p.summary["growth"][top] for p in bn])
        none_rate = mean_std(p.summary["growth"][top] for p in none)[0]
        deepest = max(cfg.depths)

        def best(arch: str, depth: int) -> tuple[float, int]:
            accs = {b: mean_std(final_acc(r) for r in select(
                results, part="map", arch=arch, depth=depth, batch=b))[0]
                for b in cfg.batches}
            b = max(accs, key=lambda k: accs[k])
            return accs[b], b

        plain_acc, plain_b = best("plain", deepest)
        res_acc, res_b = best("residual", cfg.residual_depth)
        headline = (
            f"At init, the gradients of a plain BN MLP of depth {cfg.probe_depth} grow "
            f"towards the input by {decision.pm(3)} decades per layer (without BN: "
            f"{none_rate:+.3f}); after {cfg.steps} steps the best plain BN MLP of depth "
            f"{deepest} reaches {100 * plain_acc:.1f} % (batch {plain_b}), the residual one "
            f"of depth {cfg.residual_depth} {100 * res_acc:.1f} % (batch {res_b})."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(decision, after={
            "growth_none_dec_per_layer": none_rate,
            f"best_acc_plain_depth_{deepest}": plain_acc,
            f"best_acc_residual_depth_{cfg.residual_depth}": res_acc,
        }), table, notes=[
            "deep_mlp has ReLU only, so the theory's dependence of the rate on the "
            "nonlinearity is not measured here.",
            "Every cell of the map trains for the same number of steps, so a small batch "
            "sees fewer examples.",
        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        return [map_plot(out_dir / "yang_2019_map.png", cfg, results),
                growth_plot(out_dir / "yang_2019_growth.png", cfg, results)]


def map_plot(path: Path, cfg: Config, results: list[RunResult]) -> str:
    """The trainability map: mean final accuracy per depth × batch cell (plain BN rows),
    the residual BN net's row on top."""
    from bnlab._plot import pyplot
    from bnlab.experiments.plots import save

    rows = [("plain", d) for d in cfg.depths] + [("residual", cfg.residual_depth)]
    grid = [[100 * mean_std(final_acc(r) for r in select(
        results, part="map", arch=a, depth=d, batch=b))[0] for b in cfg.batches]
        for a, d in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0.0, vmax=100.0,
                      aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.0f}", ha="center",
                    va="center", color="white" if value < 60 else "black")
    ax.set_xticks(range(len(cfg.batches)), [str(b) for b in cfg.batches])
    ax.set_yticks(range(len(rows)), [f"{a} {d}" for a, d in rows])
    ax.set_xlabel("batch size")
    ax.set_ylabel("architecture, depth")
    ax.set_title(f"BN {cfg.model}: test accuracy (%) after {cfg.steps} steps")
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    return save(fig, path)


def growth_plot(path: Path, cfg: Config, results: list[RunResult]) -> str:
    """log10 ‖∂loss/∂W_l‖ vs layer at init at the largest width and probe batch, one line
    per seed, BN and no BN."""
    from bnlab._plot import pyplot
    from bnlab.experiments.plots import COLORS, save

    top = _cell(max(cfg.widths), max(cfg.probe_batches))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for norm in ("bn", "none"):
        for i, r in enumerate(select(results, part="growth", norm=norm)):
            norms = r.summary["norms"][top]
            ax.plot(range(2, len(norms) + 2), [math.log10(max(v, 1e-300)) for v in norms],
                    color=COLORS[norm], alpha=0.7, label=norm if i == 0 else None)
    ax.set_xlabel("hidden layer l")
    ax.set_ylabel("log10 ‖∂loss/∂W_l‖ at init")
    ax.set_title(f"plain {cfg.model} depth {cfg.probe_depth}, width × batch {top}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def grad_growth_run(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """For each width × batch of ``spec.params``: the model a training run of
    ``spec.config`` at that width starts from, its hidden layers' weight-gradient norms on
    the first ``batch`` training images, and their :func:`growth_rate`. The summary holds
    ``norms`` and ``growth``, keyed ``"{width}x{batch}"``."""
    from bnlab.train import build

    t0 = time.perf_counter()
    norms: dict[str, list[float]] = {}
    growth: dict[str, float] = {}
    for width in spec.params["widths"]:
        config = replace(spec.config, model_kwargs={**spec.config.model_kwargs,
                                                    "width": int(width)})
        for batch in spec.params["batches"]:
            model = build(config, ctx.data.in_shape, ctx.data.num_classes)
            x, y = probe_batch(ctx.data, int(batch))
            cell = _cell(int(width), int(batch))
            norms[cell] = hidden_norms(layer_grad_norms(model, x, y))
            growth[cell] = growth_rate(norms[cell])
    return RunOutput([{"step": 0, **{f"growth_{k}": v for k, v in growth.items()}}],
                     {"wall_time_s": time.perf_counter() - t0, "test_acc": None,
                      "norms": norms, "growth": growth})


EXPERIMENT = Yang2019()
