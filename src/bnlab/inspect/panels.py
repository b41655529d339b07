"""The four diagnostic panels of Karpathy's "makemore part 3" lecture, for any PyTorch model.

:func:`inspect` trains ``model`` for ``steps`` optimizer steps on ``batches`` with forward
hooks (and tensor hooks on the activations) and measures:

1. **activations**: per nonlinearity, mean, std and a histogram of its output; for tanh the
   saturated fraction ``|t| > 0.97``, for sigmoid the same point, ``|2s − 1| > 0.97``
   (sigmoid(z) = (1 + tanh(z/2)) / 2), for ReLU-like layers the fraction of exact zeros and
   the dead units (zero for every sample of the batch);
2. **activation gradients**: the same statistics of the loss gradient at each output;
3. **weight gradients**: per weight (parameters with ≥ 2 dimensions), the gradient's mean,
   std, histogram and the **grad:data ratio** ``std(grad) / std(weight)``;
4. **update:data**: per weight and step, ``log10(std(update) / std(weight))`` with the
   update the optimizer actually applied (``new − old``), to compare with ``log10(1e-3)``.

Panels 1-3 describe the first step (the model as it was given); panel 4 covers every step.
Only hooks touch the model, and everything it had is put back in ``finally``: parameter
and buffer values, gradients, ``requires_grad``, each module's train/eval mode, and torch's
global random state (so dropout draws do not shift the caller's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

SATURATION = 0.97  # Karpathy's threshold on |tanh|
HIST_BINS = 60

_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.CELU,
              nn.SELU, nn.Softplus, nn.Hardswish)
ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, *_RELU_LIKE)


@dataclass
class Histogram:
    """``counts`` of values in ``HIST_BINS`` equal bins from ``lo`` to ``hi``, as densities."""

    lo: float
    hi: float
    density: list[float]

    @classmethod
    def of(cls, t: torch.Tensor) -> Histogram:
        """The finite values of ``t`` (a diverged layer's NaN/inf are left out)."""
        v = t.detach().double().flatten()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return cls(0.0, 1.0, [0.0] * HIST_BINS)
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1e-12
        counts = torch.histc(v, bins=HIST_BINS, min=lo, max=hi)
        width = (hi - lo) / HIST_BINS
        return cls(lo, hi, (counts / (counts.sum() * width)).tolist())

    def centres(self) -> list[float]:
        width = (self.hi - self.lo) / len(self.density)
        return [self.lo + (i + 0.5) * width for i in range(len(self.density))]


@dataclass
class ActivationStats:
    """Panel 1 (or 2, for the gradients) for one nonlinearity's output."""

    name: str
    kind: str  # the module's class, e.g. "Tanh"
    mean: float
    std: float
    saturated: float | None  # tanh / sigmoid: fraction past the saturation point
    zero: float | None  # ReLU-like: fraction of exact zeros
    dead: float | None  # ReLU-like: fraction of units zero for the whole batch
    hist: Histogram


@dataclass
class GradStats:
    """Panel 2: the loss gradient at one nonlinearity's output."""

    name: str
    kind: str
    mean: float
    std: float
    hist: Histogram


@dataclass
class WeightStats:
    """Panel 3: one weight's gradient."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    grad_data: float  # std(grad) / std(weight)
    hist: Histogram


@dataclass
class InspectResult:
    """What :func:`inspect` measured; ``updates[name][k]`` is log10 update:data at step k."""

    label: str
    steps: int
    activations: list[ActivationStats]
    gradients: list[GradStats]
    weights: list[WeightStats]
    updates: dict[str, list[float]]
    losses: list[float]
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every number, as plain dicts and lists (what ``stats.json`` holds)."""
        return asdict(self)

    def mean_saturation(self) -> float | None:
        """Mean saturated share over the tanh/sigmoid layers; None when there are none."""
        vals = [a.saturated for a in self.activations if a.saturated is not None]
        return sum(vals) / len(vals) if vals else None

    def median_update_ratio(self, last: int = 10) -> float:
        """Median over weights of the mean log10 update:data of the last ``last`` steps."""
        per = sorted(sum(r[-last:]) / len(r[-last:]) for r in self.updates.values() if r)
        if not per:
            return float("nan")
        mid = len(per) // 2
        return per[mid] if len(per) % 2 else (per[mid - 1] + per[mid]) / 2


def _activation_stats(name: str, module: nn.Module, y: torch.Tensor) -> ActivationStats:
    v = y.detach().double()
    saturated = zero = dead = None
    if isinstance(module, nn.Tanh):
        saturated = float((v.abs() > SATURATION).double().mean())
    elif isinstance(module, nn.Sigmoid):
        saturated = float(((2 * v - 1).abs() > SATURATION).double().mean())
    elif isinstance(module, _RELU_LIKE):
        zero = float((v == 0).double().mean())
        units = v.transpose(0, 1).reshape(v.shape[1], -1) if v.ndim > 1 else v.reshape(1, -1)
        dead = float((units == 0).all(dim=1).double().mean())
    return ActivationStats(name, type(module).__name__, float(v.mean()), float(v.std()),
                           saturated, zero, dead, Histogram.of(v))


def _grad_stats(name: str, module: nn.Module, g: torch.Tensor) -> GradStats:
    v = g.detach().double()
    return GradStats(name, type(module).__name__, float(v.mean()), float(v.std()),
                     Histogram.of(v))


def _batches(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches again and again (a DataLoader is re-iterated when it runs out)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("inspect: batches is empty; expected (input, target) pairs")


@dataclass
class _Saved:
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    requires_grad: dict[str, bool]
    modes: dict[str, bool]
    rng: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> _Saved:
        named = dict(model.named_parameters())
        return cls(
            {k: p.detach().clone() for k, p in named.items()},
            {k: b.detach().clone() for k, b in model.named_buffers()},
            {k: None if p.grad is None else p.grad.detach().clone() for k, p in named.items()},
            {k: p.requires_grad for k, p in named.items()},
            {k: m.training for k, m in model.named_modules()},
            torch.get_rng_state(),
        )

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.params[k])
                p.grad = self.grads[k]
                p.requires_grad_(self.requires_grad[k])
            for k, b in model.named_buffers():
                b.copy_(self.buffers[k])
        for k, m in model.named_modules():
            m.training = self.modes[k]
        torch.set_rng_state(self.rng)


def inspect(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int = 50,
    lr: float = 0.1,
    momentum: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    label: str = "model",
    progress: bool | None = False,
) -> InspectResult:
    """Measure the four panels on ``model`` over ``steps`` training steps; restore it after.

    ``batches``: an iterable of ``(input, target)`` (a DataLoader, a list), cycled if it is
    shorter than ``steps``. The model runs in training mode. ``loss_fn`` defaults to
    cross-entropy, ``optimizer`` to ``torch.optim.SGD(params, lr, momentum)``. Nothing about
    ``model`` changes: see the module docstring for what is saved and put back.
    """
    from bnlab._progress import Progress

    if int(steps) < 1:
        raise ValueError(f"inspect: steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"inspect: lr must be > 0, got {lr}")
    if not momentum >= 0:
        raise ValueError(f"inspect: momentum must be >= 0, got {momentum}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
    weights = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    if not weights:
        raise ValueError("inspect: the model has no trainable weight with >= 2 dimensions")
    saved = _Saved.of(model)
    handles: list[Any] = []
    act_stats: list[ActivationStats] = []
    grad_at: dict[int, GradStats] = {}  # by the index of the activation it belongs to
    updates: dict[str, list[float]] = {n: [] for n, _ in weights}
    losses: list[float] = []
    recording = True

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not recording or not isinstance(output, torch.Tensor):
                return
            index = len(act_stats)
            act_stats.append(_activation_stats(name, module, output))
            if output.requires_grad:
                output.register_hook(
                    lambda g: grad_at.__setitem__(index, _grad_stats(name, module, g)))

        return forward_hook

    try:
        for n, m in acts:
            handles.append(m.register_forward_hook(hook(n)))
        model.train()
        opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)))(
            [p for p in model.parameters() if p.requires_grad])
        first_weights: list[WeightStats] = []
        stream = _batches(batches)
        with Progress(int(steps), f"inspect {label}", enabled=progress, unit="step") as bar:
            for step in range(int(steps)):
                x, y = next(stream)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                losses.append(float(loss.detach()))
                if step == 0:
                    first_weights = [_weight_stats(n, p) for n, p in weights]
                    recording = False
                before = [p.detach().clone() for _, p in weights]
                opt.step()
                for (n, p), old in zip(weights, before, strict=True):
                    updates[n].append(_log10_ratio(p.detach() - old, old))
                bar.update()
    finally:
        for h in handles:
            h.remove()
        saved.restore(model)
    grad_stats = [grad_at[i] for i in sorted(grad_at)]
    return InspectResult(label, int(steps), act_stats, grad_stats, first_weights, updates,
                         losses, {"lr": lr, "momentum": momentum})


def _weight_stats(name: str, p: nn.Parameter) -> WeightStats:
    if p.grad is None:
        raise ValueError(f"inspect: weight {name!r} got no gradient (is it used by forward?)")
    g = p.grad.detach().double()
    return WeightStats(name, tuple(p.shape), float(g.mean()), float(g.std()),
                       float(g.std() / p.detach().double().std()), Histogram.of(g))


def _log10_ratio(update: torch.Tensor, data: torch.Tensor) -> float:
    num, den = float(update.double().std()), float(data.double().std())
    if num == 0 or den == 0 or not math.isfinite(num / den):
        return float("-inf") if num == 0 else float("nan")
    return math.log10(num / den)
