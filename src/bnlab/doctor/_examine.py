"""examine(): the static and dynamic checks behind ``bnlab doctor``."""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from bnlab.doctor._report import GAP_WARN, Finding, LayerStats, Report
from bnlab.errors import BnlabError
from bnlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SyncBatchNorm,
    recalibrate_bn,
)
from bnlab.nn._base import eval_mode
from bnlab.nn._moments import Moments, merge_all

BN_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
    GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, FrozenBatchNorm1d,
    FrozenBatchNorm2d, FrozenBatchNorm3d, SyncBatchNorm,
)
FROZEN_TYPES = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)
WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)

FP16_MAX = 65504.0
MOMENTUM_HIGH = 0.5
KERAS_EPS = 1e-3
TINY_BATCH = 16
"""Values per channel per BN call below which batch statistics are too noisy."""
DROPOUT_SHIFT = 1.05
"""BN input variance ratio (dropout on / off) above which dropout shifts the variance."""
STAGES = ("eval pass", "dropout variance", "train pass", "batch composition",
          "statistics gap and recalibration")
LOSS_GAIN = 0.10
ACCURACY_GAIN = 0.01
"""Recalibration gains (relative loss, absolute accuracy) that make stale statistics a
warning even below the gap threshold."""
PROBE_BATCHES = 4
"""Batches the per-sample checks (train mode, batch composition) use."""
EVAL_DEPENDENCE = 1e-4
"""Relative change of a sample's eval output, across batchings, that counts as dependence."""

CODES = {
    "bias_before_bn": "a conv/linear bias right before BN (BN's mean subtraction cancels it)",
    "dropout_feeds_bn": "dropout upstream of BN (variance shift between train and eval)",
    "momentum_keras": "momentum >= 0.5: a Keras/TF decay used as torch momentum",
    "momentum_zero": "momentum 0: the running statistics never update",
    "eps_keras": "eps = 1e-3, Keras/TF's default (torch's is 1e-5)",
    "fake_freeze": "BN parameters frozen (requires_grad=False) but the statistics are not",
    "bn_reused": "one BN module called more than once per forward",
    "untracked_stats": "track_running_stats=False: eval normalises with the batch",
    "nonfinite_stats": "NaN/Inf in the running statistics",
    "fp16_overflow": "running statistics beyond float16's range (65504)",
    "bn_train_in_eval": "a BN still in training mode after model.eval()",
    "stats_change_in_eval": "running statistics change during evaluation",
    "stale_stats": "running statistics do not describe the data",
    "tiny_batch": "too few values per channel per BN call",
    "eval_batch_dependence": "a sample's eval output depends on its batch-mates",
    "train_eval_divergence": "train-mode (batch statistics) vs eval-mode output",
    "batch_composition": "a sample's train-mode output depends on its batch-mates",
    "unreached_in_eval": "a BN layer that eval mode never reaches",
}


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, BN_TYPES)


def bn_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [(name or type(m).__name__, m) for name, m in model.named_modules() if is_bn(m)]


def _tracks(m: Any) -> bool:
    return getattr(m, "running_mean", None) is not None and \
        getattr(m, "running_var", None) is not None


# --------------------------------------------------------------------------- state


class _Snapshot:
    """Every parameter, buffer, requires_grad flag and module mode; restored bit for bit."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.modes = [m.training for m in self.modules]
        self.slots: list[tuple[dict[str, Any], str, Any]] = []
        self.values: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        for m in self.modules:
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    self.slots.append((store, key, t))
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        self.values.append((t, t.detach().clone()))
        self.grad_flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for store, key, t in self.slots:
            if store.get(key) is not t:
                store[key] = t
        with torch.no_grad():
            for t, saved in self.values:
                t.copy_(saved)
        for p, flag in self.grad_flags:
            p.requires_grad_(flag)
        for m, mode in zip(self.modules, self.modes, strict=True):
            m.training = mode


# --------------------------------------------------------------------------- static


class _Tracer(fx.Tracer):
    """Keeps BN, conv, linear and dropout modules (subclasses too) as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*BN_TYPES, *WEIGHT_TYPES, *DROPOUT_TYPES)) or \
            super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Graph:
    traced: bool
    bn_calls: dict[int, int] = field(default_factory=dict)
    bias_pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)
    dropout_feeds: dict[str, list[str]] = field(default_factory=dict)  # bn -> dropouts
    error: str = ""


def _dropout_p(node: fx.Node, modules: dict[str, nn.Module]) -> float:
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return float(m.p) if isinstance(m, DROPOUT_TYPES) else 0.0
    if node.op == "call_function" and node.target in (F.dropout, F.dropout1d, F.dropout2d,
                                                      F.dropout3d, torch.dropout):
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return float(p) if isinstance(p, (int, float)) else 0.5
    return 0.0


def _analyse_graph(model: nn.Module, names: dict[int, str]) -> _Graph:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for Python control flow it cannot trace
        return _Graph(traced=False, error=_one_line(exc))
    modules = dict(model.named_modules(remove_duplicate=False))
    result = _Graph(traced=True)
    calls: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = modules[str(node.target)]
            calls[id(m)] = calls.get(id(m), 0) + 1
    bn_ids = {id(m) for m in modules.values() if is_bn(m)}
    result.bn_calls = {k: v for k, v in calls.items() if k in bn_ids}
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(modules[str(node.target)]):
            continue
        bn = modules[str(node.target)]
        bn_name = names[id(bn)]
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
            layer = modules[str(src.target)]
            if isinstance(layer, WEIGHT_TYPES) and getattr(layer, "bias", None) is not None \
                    and calls.get(id(layer)) == 1 and _out_features(layer) == bn.num_features:
                result.bias_pairs.append((names[id(layer)], bn_name))
        # Walk back from the BN's input to the graph inputs, stopping at other BN layers.
        stack = [a for a in node.all_input_nodes]
        visited: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in visited:
                continue
            visited.add(n)
            if n.op == "call_module" and is_bn(modules[str(n.target)]):
                continue
            if _dropout_p(n, modules) > 0:
                label = names.get(id(modules[str(n.target)])) if n.op == "call_module" \
                    else f"{n.name} ({getattr(n.target, '__name__', n.target)})"
                result.dropout_feeds.setdefault(bn_name, []).append(str(label))
            stack.extend(n.all_input_nodes)
    return result


def _out_features(layer: Any) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _sequential_fallback(model: nn.Module, names: dict[int, str]) -> _Graph:
    """Adjacent pairs inside nn.Sequential, for models torch.fx cannot trace."""
    result = _Graph(traced=False)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        items: list[Any] = list(seq)
        for i in range(1, len(items)):
            if not is_bn(items[i]):
                continue
            prev = items[i - 1]
            if isinstance(prev, WEIGHT_TYPES) and getattr(prev, "bias", None) is not None \
                    and _out_features(prev) == items[i].num_features:
                result.bias_pairs.append((names[id(prev)], names[id(items[i])]))
            for j in (i - 1, i - 2):
                if j >= 0 and isinstance(items[j], DROPOUT_TYPES) and items[j].p > 0:
                    result.dropout_feeds.setdefault(names[id(items[i])], []).append(
                        names[id(items[j])])
    return result


def _static_findings(model: nn.Module, layers: list[tuple[str, Any]],
                     graph: _Graph, half: bool) -> list[Finding]:
    out: list[Finding] = []
    by_name = dict(layers)
    high = [(n, m) for n, m in layers if not isinstance(m, FROZEN_TYPES) and _tracks(m)
            and getattr(m, "momentum", None) is not None and m.momentum >= MOMENTUM_HIGH]
    if high:
        values = sorted({float(m.momentum) for _, m in high})
        conv = ", ".join(f"{v:g} -> {1 - v:.4g}" for v in values)
        out.append(Finding(
            "momentum_keras", "warning", tuple(n for n, _ in high),
            "momentum is a Keras/TF decay: torch weights the NEW batch by momentum",
            f"momentum={', '.join(f'{v:g}' for v in values)}: each step keeps only "
            f"{1 - values[0]:.3g} of the old statistics; converted value: {conv}",
            "bnlab.doctor.fix(model, report, which='momentum')", "momentum",
            values[-1]))
    zero = [n for n, m in layers if not isinstance(m, FROZEN_TYPES) and _tracks(m)
            and getattr(m, "momentum", None) == 0]
    if zero:
        out.append(Finding(
            "momentum_zero", "warning", tuple(zero),
            "momentum 0: the running statistics never update",
            "momentum=0: running_mean/var stay at their initial values whatever the data",
            "bnlab.doctor.fix(model, report, which=['momentum', 'recalibrate'])", "momentum",
            0.0))
    keras_eps = [n for n, m in layers if math.isclose(float(m.eps), KERAS_EPS)]
    if keras_eps:
        out.append(Finding(
            "eps_keras", "info", tuple(keras_eps),
            "eps=1e-3 is Keras/TF's default: a likely port",
            "eps=0.001 (torch: 1e-5); both add eps to the variance, so the converted value "
            "is 1e-3 itself: keep it for ported weights, and convert the momentum "
            "(Keras 0.99 -> torch 0.01)",
            "keep eps; bnlab.doctor.fix(model, report, which='momentum') if momentum >= 0.5",
            None, KERAS_EPS))
    fake = []
    for n, m in layers:
        params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                  if isinstance(p, nn.Parameter)]
        if params and not any(p.requires_grad for p in params) and _tracks(m):
            fake.append((n, m))
    moving = [(n, m) for n, m in fake if m.training]
    if moving:
        out.append(Finding(
            "fake_freeze", "warning", tuple(n for n, _ in moving),
            "frozen parameters, but the statistics still move",
            "weight/bias have requires_grad=False while the layer is in training mode: it "
            "normalises with batch statistics and updates running_mean/var (momentum "
            f"{moving[0][1].momentum})",
            "bnlab.doctor.fix(model, report, which='freeze')  # bnlab.nn.freeze_bn per layer",
            "freeze"))
    resting = [n for n, m in fake if not m.training]
    if resting:
        out.append(Finding(
            "fake_freeze", "info", tuple(resting),
            "frozen by eval(): the next model.train() unfreezes the statistics",
            "weight/bias have requires_grad=False and the layer is in eval mode now; "
            "model.train() will put it back in training mode",
            "bnlab.doctor.fix(model, report, which='freeze')", "freeze"))
    untracked = [n for n, m in layers if not _tracks(m)]
    if untracked:
        out.append(Finding(
            "untracked_stats", "warning", tuple(untracked),
            "no running statistics: eval normalises with each batch's own",
            "track_running_stats=False: model.eval() still uses batch statistics, so eval "
            "outputs depend on the batch (and fail for a batch of one)",
            "bnlab.doctor.fix(model, report, which='track', batches=batches)", "track"))
    nonfinite, overflow = [], []
    worst_bad, worst_big = 0, 0.0
    for n, m in layers:
        if not _tracks(m):
            continue
        rm, rv = m.running_mean.detach(), m.running_var.detach()
        bad = int((~torch.isfinite(rm)).sum() + (~torch.isfinite(rv)).sum())
        if bad:
            nonfinite.append(n)
            worst_bad = max(worst_bad, bad)
            continue
        big = max(float(rv.abs().max()), float(rm.abs().max())) if rm.numel() else 0.0
        if big > FP16_MAX:
            overflow.append(n)
            worst_big = max(worst_big, big)
    if nonfinite:
        out.append(Finding(
            "nonfinite_stats", "error", tuple(nonfinite),
            "NaN/Inf in running statistics: every eval output is NaN/Inf",
            f"{worst_bad} non-finite value(s) in running_mean/running_var",
            "bnlab.doctor.fix(model, report, which='recalibrate', batches=batches)",
            "recalibrate", float(worst_bad)))
    if overflow:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        sev = "error" if half or dtype == torch.float16 else "warning"
        out.append(Finding(
            "fp16_overflow", sev, tuple(overflow),
            "running statistics overflow float16",
            f"max |running stat| {worst_big:.4g} > 65504: .half() turns it into inf",
            "bnlab.nn.fold_bn(model) before .half() (the folded weights hold "
            "weight/sqrt(var)); or keep BN in float32", "fold", worst_big))
    reused = [n for n, m in layers if graph.bn_calls.get(id(m), 0) > 1]
    if reused:
        calls = max(graph.bn_calls[id(by_name[n])] for n in reused)
        out.append(_bn_reused(reused, calls, "in the traced graph"))
    if graph.bias_pairs:
        wasted = sum(_out_features(model.get_submodule(c)) for c, _ in graph.bias_pairs)
        out.append(Finding(
            "bias_before_bn", "info", tuple(c for c, _ in graph.bias_pairs),
            "bias right before BN: cancelled by BN's mean subtraction",
            f"{len(graph.bias_pairs)} conv/linear bias vector(s), {wasted} wasted "
            f"parameters, feed only BN ({', '.join(b for _, b in graph.bias_pairs)})",
            "bnlab.doctor.fix(model, report, which='bias')  # folds b into running_mean",
            "bias", float(wasted)))
    feeds = {bn: d for bn, d in graph.dropout_feeds.items() if bn in by_name}
    if feeds:
        drops = sorted({d for ds in feeds.values() for d in ds})
        out.append(Finding(
            "dropout_feeds_bn", "warning", tuple(feeds),
            "dropout upstream of BN: variance shift between train and eval",
            f"{', '.join(drops)} reach(es) {', '.join(feeds)} without a BN in between",
            "bnlab.doctor.fix(model, report, which='recalibrate', batches=batches); or move "
            "dropout after the last BN", "recalibrate"))
    return out


def _bn_reused(layers: list[str], calls: int, counted: str) -> Finding:
    """The finding for BN modules called ``calls`` times (``counted``: how we know)."""
    return Finding(
        "bn_reused", "warning", tuple(layers), CODES["bn_reused"],
        f"called {calls} times {counted}: its statistics mix the calls' inputs and it gets "
        f"{calls} updates per step",
        "give each call its own BN layer (copy.deepcopy(layer))", None, float(calls))


def _eval_mode_findings(model: nn.Module, layers: list[tuple[str, Any]]) -> list[str]:
    """Names of BN layers still in training mode after ``model.eval()`` (modes restored)."""
    with eval_mode(model):
        return [n for n, m in layers if m.training]


# --------------------------------------------------------------------------- dynamic


def _split_batch(batch: Any, index: int) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    else:
        raise BnlabError(f"batch {index}: expected an input tensor or an (input, target) "
                         f"tuple, got {type(batch).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise BnlabError(f"batch {index}: expected a floating-point input of shape (N, ...), "
                         f"got {tuple(x.shape)} {x.dtype}")
    if y is not None and len(y) != len(x):
        raise BnlabError(f"batch {index}: {len(x)} inputs but {len(y)} targets")
    return x, y


def _first_tensor_out(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, Tensor):
                return o
    raise BnlabError(f"the model returned {type(out).__name__}; expected a tensor")


@dataclass
class _Pass:
    """What the hooks saw in one pass over the batches."""

    outputs: list[Tensor] = field(default_factory=list)
    moments: dict[int, list[Moments]] = field(default_factory=dict)
    max_calls: dict[int, int] = field(default_factory=dict)
    min_values: dict[int, int] = field(default_factory=dict)
    error: str = ""


def _run_pass(model: nn.Module, xs: list[Tensor], layers: list[tuple[str, Any]],
              *, moments: bool = False, tolerate: bool = False) -> _Pass:
    """One forward per batch in inference mode, with counting hooks on every BN layer.

    ``tolerate``: a forward that raises ValueError ends the pass, recorded in ``error``; what
    the hooks saw until then is kept (a batch of one raises inside BN after its pre-hook ran).
    """
    result = _Pass()
    calls: dict[int, int] = {}

    def pre(mod: nn.Module, args: Any) -> None:
        x = args[0]
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        result.max_calls[id(mod)] = max(result.max_calls.get(id(mod), 0), calls[id(mod)])
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1]:
            n = x.shape[0]
            vbs = getattr(mod, "virtual_batch_size", None)
            if isinstance(vbs, int) and vbs > 0:
                n = min(n, vbs)
            per = n * (x.numel() // (x.shape[0] * x.shape[1]) if x.shape[0] else 0)
            result.min_values[id(mod)] = min(result.min_values.get(id(mod), per), per)
            if moments:
                result.moments.setdefault(id(mod), []).append(Moments.of(x.detach()))

    handles = [model.register_forward_pre_hook(lambda mod, args: calls.clear())]
    try:
        handles += [m.register_forward_pre_hook(pre) for _, m in layers]
        with torch.inference_mode():
            for x in xs:
                try:
                    out = model(x)
                except ValueError as exc:  # torch's "Expected more than 1 value per channel"
                    if not tolerate:
                        raise
                    result.error = _one_line(exc)
                    break
                result.outputs.append(_first_tensor_out(out).detach())
    finally:
        for h in handles:
            h.remove()
    return result


def _rebatched(xs: list[Tensor], seed: int) -> tuple[list[Tensor], Tensor]:
    """The same samples in new batches of the same sizes (and the permutation used)."""
    pooled = torch.cat(xs)
    perm = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))
    sizes = [len(x) for x in xs]
    return list(torch.split(pooled[perm], sizes)), perm


def _per_sample_change(a: list[Tensor], b: list[Tensor], perm: Tensor
                       ) -> tuple[float, float, float | None]:
    """(median, max) relative change of each sample's output; share of changed argmax."""
    ya = torch.cat(a).double().flatten(1)
    yb = torch.empty_like(ya)
    yb[perm] = torch.cat(b).double().flatten(1)
    finite = torch.isfinite(ya).all(dim=1) & torch.isfinite(yb).all(dim=1)
    if not bool(finite.any()):
        return math.nan, math.nan, None
    ya, yb = ya[finite], yb[finite]
    rel = (ya - yb).norm(dim=1) / ya.norm(dim=1).clamp_min(1e-12)
    flips = None
    if ya.shape[1] > 1:
        flips = float((ya.argmax(1) != yb.argmax(1)).double().mean())
    return float(rel.median()), float(rel.max()), flips


def _loss_and_accuracy(outputs: list[Tensor], ys: list[Tensor | None],
                       loss_fn: Callable[[Tensor, Tensor], Tensor] | None
                       ) -> dict[str, float]:
    if any(y is None for y in ys) or not outputs:
        return {}
    out = torch.cat(outputs)
    y = torch.cat([t for t in ys if t is not None])
    metrics: dict[str, float] = {}
    classes = out.dim() == 2 and not y.is_floating_point() and y.dim() == 1
    with torch.no_grad():
        if loss_fn is not None:
            metrics["loss"] = float(loss_fn(out, y))
        elif classes:
            metrics["loss"] = float(F.cross_entropy(out.double(), y))
    if classes:
        metrics["accuracy"] = float((out.argmax(1) == y).double().mean())
    return metrics


def _effect(before: dict[str, float], after: dict[str, float]) -> dict[str, list[float]] | None:
    effect: dict[str, list[float]] = {
        k: [before[k], after[k]] for k in ("accuracy", "loss") if k in before and k in after}
    return effect or None


def _gap(rm: Tensor, rv: Tensor, pm: Tensor, pv: Tensor, eps: float) -> tuple[float, float]:
    """Mean and max over channels of W2(N(rm, rv), N(pm, pv)) / sqrt(pv + eps)."""
    rm, rv, pm, pv = (t.detach().double() for t in (rm, rv, pm, pv))
    w2 = ((rm - pm) ** 2 + (rv.clamp_min(0).sqrt() - pv.clamp_min(0).sqrt()) ** 2).sqrt()
    g = w2 / (pv + eps).sqrt()
    g = torch.where(torch.isfinite(g), g, torch.full_like(g, math.inf))
    return float(g.mean()), float(g.max())


def examine(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    eval_batches: Iterable[Any] | None = None,
    num_batches: int | None = None,
    half: bool = False,
    seed: int = 0,
    name: str | None = None,
    data_name: str | None = None,
    progress: bool = False,
) -> Report:
    """Find batch-norm mistakes in ``model`` (and, given ``batches``, measure them).

    Static checks (no data): bias right before BN, dropout upstream of BN, momentum >= 0.5
    or 0, eps = 1e-3, a "freeze" by requires_grad=False that leaves the statistics moving,
    a BN module called more than once per forward, track_running_stats=False, NaN/Inf or
    float16-overflowing running statistics, a BN still training after ``model.eval()``.
    The graph comes from torch.fx (BN, conv, linear and dropout kept as leaves, subclasses
    too); a model fx cannot trace falls back to ``nn.Sequential`` adjacency and hooks.

    Dynamic checks (``batches``: input tensors or (input, target) tuples, e.g. the first
    batches of a DataLoader; ``num_batches`` caps them), all without gradients:

    - eval pass: BN calls per forward, running statistics that change in eval;
    - dropout on, everything else eval: the variance-shift ratio Var_train/Var_eval of every
      BN input (Li et al., CVPR 2019), mean over channels;
    - train pass (dropout off): values per channel per BN call (tiny batches), and the
      train-vs-eval output divergence;
    - batch composition: the same samples re-batched at random (same batch sizes) in train
      mode and in eval mode: how much a sample's output changes with its batch-mates;
    - statistics gap: on a deep copy, :func:`bnlab.nn.recalibrate_bn` sets the population
      statistics; per channel the gap is W2(N(running), N(population))/σ_population, and the
      loss/accuracy before and after recalibration are measured on ``eval_batches``
      (default: ``batches``; targets are needed for them). ``loss_fn(output, target)``
      defaults to cross-entropy for class targets.

    Nothing of ``model`` changes: every parameter, buffer, requires_grad flag and module
    mode is put back bit for bit in ``finally`` (also when the model or a hook raises), and
    torch's global RNG state is restored too. ``half=True`` says the model will be run in
    float16 (float16 overflow becomes an error). ``progress=True`` shows the checks' progress
    on stderr. Unusable batches raise BnlabError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    layers = bn_layers(model)
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
    graph = _analyse_graph(model, names)
    if not graph.traced:
        fallback = _sequential_fallback(model, names)
        fallback.error = graph.error
        graph = fallback
    report = Report(model=name or type(model).__name__, findings=[], layers=[],
                    data=data_name)
    report.metrics["fx_traced"] = graph.traced
    report.metrics["bias_pairs"] = [list(p) for p in graph.bias_pairs]
    if graph.error:
        report.metrics["fx_error"] = graph.error
    snapshot = _Snapshot(model)
    try:
        findings = _static_findings(model, layers, graph, half)
        stubborn = _eval_mode_findings(model, layers)
        if stubborn:
            findings.append(Finding(
                "bn_train_in_eval", "error", tuple(stubborn),
                "BN stays in training mode after model.eval()",
                "after model.eval() these layers report training=True (a train() override): "
                "evaluation uses batch statistics and updates the running ones",
                "bnlab.doctor.fix(model, report, which='freeze')", "freeze"))
        stats = {id(m): LayerStats(
            name=n, kind=type(m).__name__, num_features=int(getattr(m, "num_features", 0)),
            momentum=getattr(m, "momentum", None), eps=float(m.eps), tracked=_tracks(m),
            training=m.training, calls_per_forward=graph.bn_calls.get(id(m)))
            for n, m in layers}
        if batches is not None and layers:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                from bnlab._progress import Progress

                with Progress(len(STAGES), "bnlab doctor", unit="check",
                              enabled=None if progress else False) as bar:
                    _dynamic(model, layers, snapshot, stats, report, batches, eval_batches,
                             num_batches, loss_fn, seed, graph, stubborn, findings, bar)
        report.findings = findings
        report.layers = list(stats.values())
    finally:
        snapshot.restore()
    report.seconds = time.perf_counter() - start
    return report


def _collect(batches: Iterable[Any], num_batches: int | None, what: str
             ) -> tuple[list[Tensor], list[Tensor | None]]:
    source = batches if num_batches is None else itertools.islice(batches, num_batches)
    xs, ys = [], []
    for i, b in enumerate(source):
        x, y = _split_batch(b, i)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise BnlabError(f"no {what} given")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise BnlabError(f"{what} have different sample shapes: {sorted(shapes)}")
    return xs, ys


def _dynamic(model: nn.Module, layers: list[tuple[str, Any]], snapshot: _Snapshot,
             stats: dict[int, LayerStats], report: Report, batches: Iterable[Any],
             eval_batches: Iterable[Any] | None, num_batches: int | None,
             loss_fn: Any, seed: int, graph: _Graph, stubborn: list[str],
             findings: list[Finding], bar: Any) -> None:
    """The dynamic checks; appends to (and adds measurements to) ``findings``."""

    def done(stage: str) -> None:
        bar.set_postfix(done=stage)
        bar.update()

    if num_batches is not None and (isinstance(num_batches, bool) or num_batches <= 0):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    xs, ys = _collect(batches, num_batches, "batches")
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    xs = [x.to(device) for x in xs]
    ys = [y.to(device) if y is not None else None for y in ys]
    report.data = report.data or f"{len(xs)} batch(es) of {tuple(xs[0].shape)}"
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]

    # Eval pass. The per-sample checks use the first PROBE_BATCHES batches; the eval outputs
    # of all batches are needed only when they are also where loss/accuracy are measured.
    probe = xs[:PROBE_BATCHES]
    model.eval()
    try:
        eval_pass = _run_pass(model, xs[:1], layers, moments=bool(dropouts))
    except Exception as exc:
        raise BnlabError(
            f"the model cannot run on the data (batch 0 of shape {tuple(xs[0].shape)}, "
            f"{xs[0].dtype}): {_one_line(exc)}"
        ) from None
    rest = _run_pass(model, (xs if eval_batches is None else probe)[1:], layers,
                     moments=bool(dropouts))
    eval_pass.outputs += rest.outputs
    for layer_id, parts in rest.moments.items():
        eval_pass.moments.setdefault(layer_id, []).extend(parts)
    for layer_id, count in rest.max_calls.items():
        eval_pass.max_calls[layer_id] = max(eval_pass.max_calls.get(layer_id, 0), count)
    changed = []
    saved = {id(t): s for t, s in snapshot.values}
    worst_change = 0.0
    for n, m in layers:
        if not _tracks(m):
            continue
        for key in ("running_mean", "running_var"):
            t = getattr(m, key)
            before = saved[id(t)]
            same = (t == before) | (torch.isnan(t) & torch.isnan(before))
            if not bool(same.all()):
                diff = (t.double() - before.double()).abs()[~same].nan_to_num(nan=math.inf)
                worst_change = max(worst_change, float(diff.max()))
                if n not in changed:
                    changed.append(n)
    if changed:
        findings.append(Finding(
            "stats_change_in_eval", "error", tuple(changed),
            "running statistics change during evaluation",
            f"{len(xs)} eval-mode forward(s) under no_grad moved running statistics by up to "
            f"{worst_change:.4g}",
            "bnlab.doctor.fix(model, report, which='freeze')", "freeze", worst_change))
    reached = [(n, m) for n, m in layers if id(m) in eval_pass.max_calls]
    unreached = [n for n, m in layers if id(m) not in eval_pass.max_calls]
    report.unreached = unreached
    if unreached:
        findings.append(Finding(
            "unreached_in_eval", "info", tuple(unreached),
            "not used in eval mode (a training-only branch?)",
            "eval forwards never call these layers; their statistics are not checked",
            "none needed if the branch is training-only", None))
    for _, m in layers:
        s = stats[id(m)]
        if id(m) in eval_pass.max_calls:
            s.calls_per_forward = max(s.calls_per_forward or 0, eval_pass.max_calls[id(m)])
    reused = [n for n, m in reached if eval_pass.max_calls[id(m)] > 1 and
              graph.bn_calls.get(id(m), 0) <= 1]
    if reused:
        calls = max(eval_pass.max_calls[id(dict(layers)[n])] for n in reused)
        findings.append(_bn_reused(reused, calls, "per forward (counted by hooks)"))
    snapshot.restore()
    done(STAGES[0])

    # Dropout on, everything else in eval: the variance shift of each BN input.
    if dropouts:
        model.eval()
        for d in dropouts:
            d.train()
        drop_pass = _run_pass(model, xs[:len(eval_pass.outputs)], layers, moments=True)
        snapshot.restore()
        ratios: dict[str, float] = {}
        for n, m in reached:
            a, b = eval_pass.moments.get(id(m)), drop_pass.moments.get(id(m))
            if not a or not b:
                continue
            va, vb = merge_all(a).var, merge_all(b).var
            ok = va > 0
            if bool(ok.any()):
                ratios[n] = float((vb[ok] / va[ok]).mean())
                stats[id(m)].dropout_var_ratio = ratios[n]
        report.metrics["dropout_var_ratio"] = ratios
        found = [f for f in findings if f.code == "dropout_feeds_bn"]
        static_layers = found[0].layers if found else ()
        if not graph.traced:
            shifted = tuple(n for n, r in ratios.items() if r > DROPOUT_SHIFT
                            and n not in static_layers)
            if shifted:
                findings.append(Finding(
                    "dropout_feeds_bn", "warning", shifted,
                    "dropout upstream of BN: variance shift between train and eval",
                    "measured only (the graph could not be traced)",
                    "bnlab.doctor.fix(model, report, which='recalibrate', batches=batches)",
                    "recalibrate"))
                found = [f for f in findings if f.code == "dropout_feeds_bn"]
        for i, f in enumerate(findings):
            if f.code == "dropout_feeds_bn":
                shown = [f"{n}: {ratios[n]:.3f}" for n in f.layers if n in ratios]
                if shown:
                    worst = max(ratios[n] for n in f.layers if n in ratios)
                    findings[i] = _replace(f, evidence=f.evidence + "; BN input variance "
                                           "ratio dropout on/off " + ", ".join(shown),
                                           value=worst)

    done(STAGES[1])

    # Train mode (dropout off): values per channel, train-vs-eval divergence.
    model.train()
    for d in dropouts:
        d.eval()
    tried = _run_pass(model, probe, layers, tolerate=True)
    snapshot.restore()
    train_pass = tried if not tried.error else None
    if tried.error:
        report.metrics["train_mode_error"] = tried.error
    min_values = tried.min_values
    for _, m in layers:
        if id(m) in min_values:
            stats[id(m)].values_per_channel = min_values[id(m)]
    tiny = [(n, min_values[id(m)]) for n, m in layers
            if id(m) in min_values and min_values[id(m)] < TINY_BATCH
            and not isinstance(m, FROZEN_TYPES)]
    if tiny:
        k = min(v for _, v in tiny)
        noise = 1 / math.sqrt(2 * (k - 1)) if k > 1 else math.inf
        findings.append(Finding(
            "tiny_batch", "warning", tuple(n for n, _ in tiny),
            "too few values per channel per BN call for batch statistics",
            f"{k} value(s) per channel per call (threshold {TINY_BATCH}); the batch std "
            f"estimate's relative noise is about {noise:.0%}",
            "bnlab.doctor.fix(model, report, which='renorm')  # or 'groupnorm'; or "
            "bnlab.nn.accumulate_bn(model, 'two-pass') for micro-batches", "renorm",
            float(k)))
    if train_pass is not None:
        med, worst, flips = _per_sample_change(eval_pass.outputs[:len(probe)],
                                               train_pass.outputs,
                                               torch.arange(sum(len(x) for x in probe)))
        report.metrics["train_eval_rel_change_median"] = med
        if flips is not None:
            report.metrics["train_eval_prediction_disagreement"] = flips
        agree = f"; predictions differ for {flips:.1%} of samples" if flips is not None else ""
        if math.isfinite(med):  # not when the eval outputs are NaN (see nonfinite_stats)
            findings.append(Finding(
                "train_eval_divergence", "info", (),
                "train-mode vs eval-mode output (what evaluating in train mode would do)",
                f"relative output change median {med:.3g}, max {worst:.3g}{agree}",
                "evaluate with model.eval()", None, med))

    done(STAGES[2])

    # Batch composition: the same samples, other batch-mates.
    composition = probe
    if sum(len(x) for x in composition) > 1:
        shuffled, perm = _rebatched(composition, seed)
        if train_pass is not None:
            model.train()
            for d in dropouts:
                d.eval()
            again = _run_pass(model, shuffled, layers)
            snapshot.restore()
            med, worst, flips = _per_sample_change(train_pass.outputs[:len(composition)],
                                                   again.outputs, perm)
            report.metrics["train_composition_rel_change_median"] = med
            agree = f"; predictions change for {flips:.1%}" if flips is not None else ""
            findings.append(Finding(
                "batch_composition", "info", (),
                "in train mode a sample's output depends on its batch-mates",
                f"re-batching the same samples changes a sample's train-mode output by "
                f"{med:.3g} (median relative), max {worst:.3g}{agree}",
                "evaluate with model.eval(); report accuracy from eval mode only", None, med))
        model.eval()
        again = _run_pass(model, shuffled, layers)
        snapshot.restore()
        med, worst, flips = _per_sample_change(eval_pass.outputs[:len(composition)],
                                               again.outputs, perm)
        report.metrics["eval_composition_rel_change_max"] = worst
        if worst > EVAL_DEPENDENCE:
            culprits = tuple(dict.fromkeys(
                [*stubborn, *(n for n, m in reached if not _tracks(m))]))
            agree = f"; predictions change for {flips:.1%}" if flips is not None else ""
            findings.append(Finding(
                "eval_batch_dependence", "warning", culprits,
                "in eval mode a sample's output depends on its batch-mates",
                f"re-batching the same samples changes a sample's eval output by up to "
                f"{worst:.3g} (relative; median {med:.3g}){agree}: scores depend on the "
                "batching",
                "bnlab.doctor.fix(model, report, which=['track', 'freeze'], "
                "batches=batches)", "track" if not stubborn else "freeze", worst))

    done(STAGES[3])

    # Statistics gap and the measured effect of recalibration, on a deep copy.
    findings += _gap_findings(model, reached, stats, report, xs, ys, eval_pass,
                              eval_batches, loss_fn, findings)
    done(STAGES[4])


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _replace(f: Finding, **changes: Any) -> Finding:
    import dataclasses

    return dataclasses.replace(f, **changes)


def _gap_findings(model: nn.Module, reached: list[tuple[str, Any]],
                  stats: dict[int, LayerStats], report: Report, xs: list[Tensor],
                  ys: list[Tensor | None], eval_pass: _Pass,
                  eval_batches: Iterable[Any] | None, loss_fn: Any,
                  findings: list[Finding]) -> list[Finding]:
    out: list[Finding] = []
    checkable = [(n, m) for n, m in reached if _tracks(m) and not isinstance(m, FROZEN_TYPES)]
    if not checkable:
        return out
    fixed = recalibrated_copy(model, xs, report.unreached)
    if isinstance(fixed, str):
        report.metrics["recalibrate_error"] = fixed
        return out
    fixed_layers = dict(bn_layers(fixed))
    for n, m in checkable:
        f = fixed_layers[n]
        g_mean, g_max = _gap(m.running_mean, m.running_var, f.running_mean, f.running_var,
                             float(m.eps))
        stats[id(m)].gap_mean, stats[id(m)].gap_max = g_mean, g_max
    # Loss and accuracy before/after recalibration.
    if eval_batches is not None:
        ex, ey = _collect(eval_batches, None, "eval_batches")
        device = xs[0].device
        ex = [x.to(device) for x in ex]
        ey = [y.to(device) if y is not None else None for y in ey]
        with eval_mode(model):
            before_out = _run_pass(model, ex, []).outputs
    else:
        ex, ey, before_out = xs, ys, eval_pass.outputs
    fixed.eval()
    after_out = _run_pass(fixed, ex, []).outputs
    before = _loss_and_accuracy(before_out, ey, loss_fn)
    after = _loss_and_accuracy(after_out, ey, loss_fn)
    for k, v in before.items():
        report.metrics[f"{k}_before_recalibration"] = v
    for k, v in after.items():
        report.metrics[f"{k}_after_recalibration"] = v
    effect = _effect(before, after)
    stale = [(n, stats[id(m)]) for n, m in checkable
             if not (stats[id(m)].gap_mean or 0.0) <= GAP_WARN]
    helps = _recalibration_helps(before, after)
    worst_name, worst = max(((n, stats[id(m)]) for n, m in checkable),
                            key=lambda t: _order(t[1].gap_mean))
    if stale:
        shown = ", ".join(f"{n}: {s.gap_mean:.3g}" for n, s in stale[:6])
        out.append(Finding(
            "stale_stats", "warning", tuple(n for n, _ in stale),
            "running statistics do not describe the data",
            f"mean gap (population std) {shown}{' ...' if len(stale) > 6 else ''} "
            f"(threshold {GAP_WARN})",
            "bnlab.nn.recalibrate_bn(model, batches)  # or fix(..., which='recalibrate')",
            "recalibrate", worst.gap_mean, effect))
    elif helps:
        out.append(Finding(
            "stale_stats", "warning", (worst_name,),
            "running statistics lag behind the weights: recalibration helps",
            f"largest mean gap {worst.gap_mean:.3g} population std (below the threshold "
            f"{GAP_WARN}), but recalibrating improves {helps}",
            "bnlab.nn.recalibrate_bn(model, batches)  # or fix(..., which='recalibrate')",
            "recalibrate", worst.gap_mean, effect))
    else:
        out.append(Finding(
            "stale_stats", "info", (worst_name,),
            "running statistics match the data",
            f"largest mean gap {worst.gap_mean:.3g} population std (threshold {GAP_WARN})",
            "nothing to do (bnlab.nn.recalibrate_bn(model, batches) would change little)",
            "recalibrate", worst.gap_mean, effect))
    for i, other in enumerate(findings):
        if other.remedy == "recalibrate" and other.code != "stale_stats" and effect:
            findings[i] = _replace(other, effect=effect)
    return out


def _recalibration_helps(before: dict[str, float], after: dict[str, float]) -> str:
    """What recalibration measurably improves ('' if nothing): loss by >= 10 % (relative)
    or accuracy by >= 1 point, the other not getting worse."""
    loss_gain = "loss" in before and "loss" in after and \
        after["loss"] <= (1 - LOSS_GAIN) * before["loss"]
    acc_gain = "accuracy" in before and "accuracy" in after and \
        after["accuracy"] >= before["accuracy"] + ACCURACY_GAIN
    worse = ("loss" in before and "loss" in after and after["loss"] > before["loss"]) or \
        ("accuracy" in before and "accuracy" in after and after["accuracy"] < before["accuracy"])
    if worse or not (loss_gain or acc_gain):
        return ""
    return "the loss" if loss_gain and not acc_gain else \
        "the accuracy" if acc_gain and not loss_gain else "the loss and the accuracy"


def _order(v: float | None) -> float:
    if v is None:
        return -1.0
    return math.inf if not math.isfinite(v) else v


def recalibrated_copy(model: nn.Module, xs: list[Tensor], unreached: list[str]
                      ) -> nn.Module | str:
    """A deep copy with :func:`bnlab.nn.recalibrate_bn` applied (or the reason it failed).

    Layers that eval mode never reaches keep their statistics (recalibrate_bn would refuse
    them: no values to measure).
    """
    fixed = copy.deepcopy(model)
    hidden = []
    for n in unreached:
        m = fixed.get_submodule(n)
        if _tracks(m):
            hidden.append((m, m.running_mean, m.running_var))
            m.running_mean = None  # type: ignore[assignment]
            m.running_var = None  # type: ignore[assignment]
    try:
        recalibrate_bn(fixed, xs, progress=False)
    except ValueError as exc:
        return str(exc)
    finally:
        for m, rm, rv in hidden:
            m.running_mean, m.running_var = rm, rv
    return fixed
