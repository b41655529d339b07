"""Claim: batch norm reduces internal covariate shift (seeds 000, 001; the BN paper's
Figure 1).

Protocol (Ioffe & Szegedy 2015, §4.1): the MNIST MLP of three hidden layers of 100 sigmoid
units (``paper_mlp``), with and without BN before each sigmoid, batch 60, plain SGD. Along
training: test accuracy, and the 15th, 50th and 85th percentiles of the input to one fixed
sigmoid of the last hidden layer (unit 0 of ``hidden3``) over a fixed set of test images,
computed with the network in eval mode.

Every seed runs in torch; the first seed also runs in the from-scratch NumPy core
(``bnlab.core``'s Linear, BatchNorm1d, Sigmoid, softmax cross-entropy and SGD, end to end),
starting from the same initial weights (the torch model's state dict, loaded into the
core's layers) and drawing the same batches. The two curves should coincide.

Quick and full run the same protocol (steps, recordings); full has more seeds. The drift
depends on how long training runs and how often it is recorded, so a shorter quick run would
measure a different quantity, not a noisier estimate of the same one.

Metric: the drift of the sigmoid input's distribution, the mean absolute change of the
three percentiles between consecutive recordings, divided by the final 15–85 width (so a
distribution that is merely wider does not count as shifting more). The effect is
log2(drift without BN / drift with BN), per seed, on the torch runs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bnlab.experiments.analysis import acc_curve, final_acc, fmt_ms, select, table_row
from bnlab.experiments.base import (
    Analysis,
    Experiment,
    RunFunction,
    RunOutput,
    RunResult,
    RunSpec,
    TrainSettings,
    train_config,
)
from bnlab.experiments.verdict import PairedClaim
from bnlab.train import TrainConfig

if TYPE_CHECKING:
    from bnlab.data import DatasetSplits

PERCENTILES = (15, 50, 85)
UNIT = 0
PROBE_IMAGES = 1000
BACKENDS = ("torch", "numpy")
PAIRED = PairedClaim(
    "Per seed (torch runs), drift = mean |change| of the 15/50/85th percentiles of the "
    "sigmoid input between consecutive recordings ÷ the final 85−15 width; the difference "
    "is log2(drift without BN / drift with BN), so log2(1.5) means no-BN drifts 1.5× more",
    threshold=math.log2(1.5), key="log2_drift_ratio", suffix="log2", threshold_text="log2(1.5)",
    note="The NumPy runs must reproduce the torch curves (reported, not part of the verdict).",
)


@dataclass(frozen=True, kw_only=True)
class Config(TrainSettings):
    """The paper's MLP and SGD without momentum; percentiles every ``record_every`` steps."""

    model: str = "paper_mlp"
    lr: float = 0.5
    momentum: float = 0.0
    batch_size: int = 60
    record_every: int
    numpy_seeds: int = 1  # the first seeds, also run in the NumPy core



class CovariateShift(Experiment):
    name = "covariate-shift"
    claim = ("Batch norm reduces internal covariate shift: the distribution of a layer's "
             "inputs changes less during training.")
    seeds = "000, 001"
    quote = ("By normalizing the inputs, Batch Normalization helps in reducing this shift, "
             "making the training process more stable.")
    section = "claim"
    papers = ("Ioffe & Szegedy, ICML 2015, Batch Normalization: Accelerating Deep Network "
              "Training by Reducing Internal Covariate Shift; Santurkar, Tsipras, Ilyas & "
              "Madry, NeurIPS 2018, How Does Batch Normalization Help Optimization?")
    literature = (
        "MNIST, a 3-layer MLP of 100 sigmoids (Ioffe & Szegedy, Fig. 1b, c): without BN the "
        "15th/50th/85th percentiles of a last-layer sigmoid's input move a lot over training, "
        "with BN they stay nearly constant (shown as curves; no drift number is given). "
        "Santurkar et al. (VGG on CIFAR-10, their Fig. 2 and 5) find that BN's benefit "
        "survives noise that makes the distributions shift more, and that by a gradient-based "
        "measure BN does not reduce the shift (see santurkar-2018)."
    )
    practice: ClassVar[dict[str, str]] = {
        "supported": "In this sigmoid MLP, BN keeps a layer's input distribution clearly "
                     "steadier during training than the same network without it.",
        "not supported": "BN does not make a layer's input distribution steadier here by the "
                         "claimed factor: do not count on it to stabilise activations.",
        "inconclusive": "The seeds disagree too much to say whether BN steadies a layer's "
                        "input distribution by the claimed factor.",
    }
    rule = PAIRED.rule
    profiles: ClassVar[dict[str, Config]] = {
        "smoke": Config(seeds=(0,), steps=30, record_every=10),
        "quick": Config(seeds=(0, 1, 2), steps=4000, record_every=100),
        "full": Config(seeds=(0, 1, 2, 3, 4), steps=4000, record_every=100),
    }

    def protocol(self, cfg: Config) -> str:
        momentum = "(no momentum)" if cfg.momentum == 0 else f"momentum {cfg.momentum}"
        return (
            f"{cfg.model} (784-100-100-100-10, sigmoid) with norm=bn vs none, batch "
            f"{cfg.batch_size}, SGD lr {cfg.lr} {momentum}, {cfg.steps} steps, recorded "
            f"every {cfg.record_every} steps: test accuracy (10k images) and the "
            f"{'/'.join(map(str, PERCENTILES))}th percentiles of the input to sigmoid unit "
            f"{UNIT} of the last hidden layer over the first {PROBE_IMAGES} test images "
            f"(eval mode); in torch for seeds {list(cfg.seeds)}, and in the NumPy core from "
            f"the same init and batches for seed(s) {list(cfg.seeds[:cfg.numpy_seeds])}."
        )

    def runs(self, cfg: Config, dataset: str) -> list[RunSpec]:
        return [
            RunSpec({"norm": norm, "backend": backend}, seed, train_config(
                cfg, dataset, seed, norm=norm, eval_every=cfg.record_every,
            ), kind=f"percentiles-{backend}")
            for norm in ("none", "bn")
            for backend in BACKENDS
            for seed in (cfg.seeds if backend == "torch" else cfg.seeds[:cfg.numpy_seeds])
        ]

    def runners(self) -> dict[str, RunFunction]:
        def run(backend: str) -> RunFunction:
            return lambda spec, ctx: train_with_percentiles(spec.config, backend, ctx.data)

        return {f"percentiles-{backend}": run(backend) for backend in BACKENDS}

    def analyse(self, cfg: Config, results: list[RunResult]) -> Analysis:
        table = []
        for norm in ("none", "bn"):
            for backend in BACKENDS:
                rs = select(results, norm=norm, backend=backend)
                table.append(table_row(
                    {"norm": norm, "backend": backend},
                    final_acc=fmt_ms([final_acc(r) for r in rs]),
                    drift=fmt_ms([drift(r) for r in rs], 1.0, ""),
                    final_p15_p50_p85=", ".join(
                        f"{np.mean([r.metrics[-1][f'p{q}'] for r in rs]):.2f}"
                        for q in PERCENTILES),
                    seeds=len(rs),
                ))
        none = select(results, norm="none", backend="torch")
        bn = select(results, norm="bn", backend="torch")
        decision = PAIRED.decide([math.log2(drift(n) / drift(b)) if drift(b) > 0 else math.inf
                                  for n, b in zip(none, bn, strict=True)])
        agree = numpy_torch_agreement(results)
        headline = (
            f"Drift of the sigmoid input: no BN {fmt_ms([drift(r) for r in none], 1.0, '')} vs "
            f"BN {fmt_ms([drift(r) for r in bn], 1.0, '')}, log2 ratio {decision.pm(2)} "
            f"({2 ** decision.mean:.2f}× more without BN; claimed: 1.5×); "
            f"NumPy core vs torch: accuracy curves within "
            f"{agree['max_acc_diff_pp']:.2f} points."
        )
        return Analysis(decision.verdict, headline, PAIRED.effect(
            decision, after={"drift_ratio": 2 ** decision.mean, **agree},
        ), table, notes=[
            "Santurkar et al. (2018) argue that BN's benefit does not come from reducing "
            "internal covariate shift; this experiment only measures the shift itself.",
        ])

    def plot(self, cfg: Config, results: list[RunResult], out_dir: Path) -> list[str]:
        from bnlab._plot import pyplot
        from bnlab.experiments.plots import COLORS, curves_plot, save

        files = [curves_plot(
            out_dir / "covariate_shift_accuracy.png",
            {f"{n} ({b})": select(results, norm=n, backend=b) for n in ("bn", "none")
             for b in BACKENDS},
            "paper_mlp: test accuracy vs step (torch and NumPy core)",
            colors={"bn (torch)": COLORS["bn"], "none (torch)": COLORS["none"],
                    "bn (numpy)": "tab:cyan", "none (numpy)": "tab:pink"},
        )]
        plt = pyplot()
        fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
        for row, norm in enumerate(("none", "bn")):
            for col, backend in enumerate(BACKENDS):
                ax = axes[row][col]
                rs = select(results, norm=norm, backend=backend)
                if not rs:
                    continue
                r = rs[0]  # the first seed, as in the paper's figure
                steps = [m["step"] for m in r.metrics]
                for q, style in zip(PERCENTILES, ("--", "-", "--"), strict=True):
                    ax.plot(steps, [m[f"p{q}"] for m in r.metrics], style,
                            color=COLORS[norm], label=f"{q}th percentile")
                ax.set_title(f"{'with' if norm == 'bn' else 'without'} BN — {backend} "
                             f"(seed {r.spec.seed})", fontsize=10)
                ax.grid(alpha=0.3)
                if col == 0:
                    ax.set_ylabel("input to a last-layer sigmoid")
                if row == 1:
                    ax.set_xlabel("training step")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Sigmoid input distribution over training (cf. Ioffe & Szegedy, Fig. 1b,c)")
        files.append(save(fig, out_dir / "covariate_shift_percentiles.png"))
        return files


def drift(r: RunResult) -> float:
    """Mean |Δ percentile| between consecutive recordings (after init) ÷ final 85−15 width."""
    ms = [m for m in r.metrics if m["step"] > 0]
    if len(ms) < 2:
        return math.nan
    moves = [abs(b[f"p{q}"] - a[f"p{q}"]) for a, b in itertools.pairwise(ms)
             for q in PERCENTILES]
    width = ms[-1][f"p{PERCENTILES[-1]}"] - ms[-1][f"p{PERCENTILES[0]}"]
    return float(np.mean(moves)) / max(width, 1e-12)


def numpy_torch_agreement(results: list[RunResult]) -> dict[str, float]:
    """Largest differences between the torch and the NumPy runs of the same config/seed."""
    acc_diff, p_diff = 0.0, 0.0
    for r in results:
        if r.spec.group["backend"] != "torch":
            continue
        twin = [t for t in select(results, norm=r.spec.group["norm"], backend="numpy")
                if t.spec.seed == r.spec.seed]
        if not twin:
            continue
        a, b = acc_curve(r)[1], acc_curve(twin[0])[1]
        acc_diff = max(acc_diff, *(abs(x - y) for x, y in zip(a, b, strict=True)))
        p_diff = max(p_diff, *(abs(m[f"p{q}"] - n[f"p{q}"]) for m, n in
                               zip(r.metrics, twin[0].metrics, strict=True) for q in PERCENTILES))
    return {"max_acc_diff_pp": 100 * acc_diff, "max_percentile_diff": p_diff}


# --------------------------------------------------------------------------- the runs


def train_with_percentiles(config: TrainConfig, backend: str, data: DatasetSplits, *,
                           probe_mode: str = "eval",
                           probe: Probe | None = None) -> RunOutput:
    """Train ``paper_mlp`` on ``data`` in ``backend`` ("torch" or "numpy"), recording test
    accuracy and the sigmoid-input percentiles every ``config.eval_every`` steps (and at
    step 0).

    Both backends start from the torch model built with ``config.seed`` and draw the same
    batch indices (``numpy.random.default_rng(config.seed)``, with replacement across
    batches, without within one). Test accuracy is always measured in eval mode; the
    percentiles in ``probe_mode``: ``"eval"`` (running statistics, as in the BN paper) or
    ``"train"`` (torch only: the probe images normalised as one training batch, with what a
    training forward adds, such as noisy BN's noise; the running statistics are restored).
    ``probe(model, step)`` (torch only), called at each recording, returns more columns for
    its row.
    """
    from bnlab import __version__
    from bnlab.train import build

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if probe_mode not in ("eval", "train"):
        raise ValueError(f"probe_mode must be 'eval' or 'train', got {probe_mode!r}")
    if backend == "numpy" and (probe_mode != "eval" or probe is not None):
        raise ValueError("the NumPy backend records in eval mode only, without a probe")
    t0 = time.monotonic()
    xtr = data.train.tensors[0].reshape(len(data.train), -1).numpy()
    ytr = data.train.tensors[1].numpy()
    xte = data.test.tensors[0].reshape(len(data.test), -1).numpy()
    yte = data.test.tensors[1].numpy()
    model = build(config, data.in_shape, data.num_classes)
    net: _TorchNet | _NumpyNet = (
        _TorchNet(model, config.lr, probe_mode) if backend == "torch"
        else _NumpyNet(model, config.lr)
    )

    def record(step: int, train_loss: float | None = None) -> dict[str, Any]:
        row = _record(net, step, xte, yte, t0, train_loss)
        return {**row, **probe(model, step)} if probe is not None else row

    rng = np.random.default_rng(config.seed)
    metrics = [record(0)]
    diverged = False
    steps = config.steps if config.steps is not None else 0
    for step in range(1, steps + 1):
        idx = rng.choice(len(xtr), size=config.batch_size, replace=False)
        loss = net.step(xtr[idx], ytr[idx])
        if not math.isfinite(loss):
            diverged = True
            break
        if step % config.eval_every == 0 or step == steps:
            metrics.append(record(step, loss))
    last = metrics[-1]
    summary = {
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "steps": last["step"], "diverged": diverged, "backend": backend,
        "wall_time_s": time.monotonic() - t0, "dataset_source": data.source,
        "config": asdict(config), "bnlab_version": __version__,
    }
    return RunOutput(metrics, summary)


def _record(net: Any, step: int, x: np.ndarray, y: np.ndarray, t0: float,
            train_loss: float | None = None) -> dict[str, Any]:
    logits, probe = net.evaluate(x, PROBE_IMAGES)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    out: dict[str, Any] = {
        "step": step, "train_loss": train_loss,
        "test_loss": float(-logp[np.arange(len(y)), y].mean()),
        "test_acc": float((logits.argmax(axis=1) == y).mean()),
        "wall_time_s": time.monotonic() - t0,
    }
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(probe, q))
    return out


Probe = Callable[[Any, int], dict[str, Any]]  # (torch model, step) -> more columns


class _TorchNet:
    def __init__(self, model: Any, lr: float, probe_mode: str = "eval") -> None:
        import torch

        self.model = model
        self.probe_mode = probe_mode
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
        self._probe: Any = None
        model.hidden3.act.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self._probe = args[0][:, UNIT].detach()

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        import torch
        import torch.nn.functional as F

        self.model.train()
        loss = F.cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def evaluate(self, x: np.ndarray, n_probe: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        self.model.eval()
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x)).numpy()
            if self.probe_mode == "eval":
                self.model(torch.from_numpy(x[:n_probe]))
            else:
                buffers = {k: b.clone() for k, b in self.model.named_buffers()}
                self.model.train()
                try:
                    self.model(torch.from_numpy(x[:n_probe]))
                finally:
                    for k, b in self.model.named_buffers():
                        b.copy_(buffers[k])
                    self.model.eval()
        return logits, self._probe.numpy().copy()


class _NumpyNet:
    """The same MLP in :mod:`bnlab.core`, initialised from the torch model's weights."""

    def __init__(self, model: Any, lr: float) -> None:
        from bnlab import core

        layers: list[Any] = []
        self.probe_index = -1
        for block in (model.hidden1, model.hidden2, model.hidden3):
            lin = block.layer
            linear = core.Linear(lin.in_features, lin.out_features)
            linear.load_state_dict({k: v.detach().numpy() for k, v in lin.state_dict().items()})
            layers.append(linear)
            norm_state = block.norm.state_dict()
            if norm_state:
                bn = core.BatchNorm1d(lin.out_features)
                bn.load_state_dict({k: v.detach().numpy() for k, v in norm_state.items()})
                layers.append(bn)
            self.probe_index = len(layers) - 1  # the output feeding the sigmoid
            layers.append(core.Sigmoid())
        out = core.Linear(model.out.in_features, model.out.out_features)
        out.load_state_dict({k: v.detach().numpy() for k, v in model.out.state_dict().items()})
        layers.append(out)
        self.net = core.Sequential(*layers)
        self.opt = core.SGD(self.net, lr=lr)
        self.loss = core.softmax_cross_entropy

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.net.train()
        loss, dlogits = self.loss(self.net(x), y)
        self.opt.zero_grad()
        self.net.backward(dlogits)
        self.opt.step()
        return float(loss)

    def evaluate(self, x: np.ndarray, n_probe: int) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        logits = self.net(x)
        self.net(x[:n_probe], record=True)
        return logits, self.net.outputs[self.probe_index][:, UNIT].copy()


EXPERIMENT = CovariateShift()
