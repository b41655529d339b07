"""fix(): apply the remedies a report proposes, to a copy of the model."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.doctor._examine import (
    FROZEN_TYPES,
    bn_layers,
    recalibrated_copy,
)
from bnlab.doctor._report import Report, severity_rank
from bnlab.nn import fold_bn, freeze_bn, replace_norm
from bnlab.nn._base import eval_mode
from bnlab.nn._moments import Moments, merge_all

# In the order they are applied: structural changes first, recalibration after them (so it
# measures the final model), freezing after recalibration (so frozen statistics are fresh).
REMEDIES = ("bias", "track", "momentum", "renorm", "groupnorm", "recalibrate", "freeze", "fold")
_NEED_DATA = ("track", "recalibrate")
# Exact classes whose conversion keeps what the layer computes. A subclass may change forward
# (a BN that adds an activation): converting it to another class would drop that.
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fix(
    model: nn.Module,
    report: Report,
    which: str | Sequence[str] = "auto",
    *,
    batches: Iterable[Any] | None = None,
    num_batches: int | None = None,
) -> nn.Module:
    """A new model with the chosen remedies applied; ``model`` itself is never modified.

    ``which``: one remedy or a list of them (:data:`REMEDIES`), or ``"auto"``: the remedy of
    every finding at warning or error (``groupnorm`` and ``fold`` only when named, as they
    change the architecture; data-needing ones only when ``batches`` are given). Each
    applies to the layers its findings name:

    - ``bias``: a conv/linear bias that feeds only a BN is removed and folded into that BN's
      ``running_mean`` (``running_mean -= b``): exact in eval mode, and in train mode the bias
      was cancelled by the batch mean anyway (the result is checked on ``batches``);
    - ``track``: a ``track_running_stats=False`` layer gets running statistics, set to the
      population statistics of its input on ``batches`` (eval mode);
    - ``momentum``: momentum m >= 0.5 becomes 1 − m (Keras decay to torch momentum); 0
      becomes torch's default 0.1;
    - ``renorm``: :func:`bnlab.nn.replace_norm` to Batch Renorm (tiny batches; same state,
      same eval output);
    - ``groupnorm``: ``nn.GroupNorm`` (up to 32 groups) with BN's affine parameters; a new
      architecture: retrain it;
    - ``recalibrate``: :func:`bnlab.nn.recalibrate_bn` on ``batches`` (all BN layers);
    - ``freeze``: :func:`bnlab.nn.freeze_bn` on each named layer (a frozen layer ignores
      ``train()``);
    - ``fold``: :func:`bnlab.nn.fold_bn` (an eval-mode model; for float16 inference).

    ``freeze``, ``renorm`` and ``groupnorm`` convert only torch's plain BatchNorm1d/2d/3d: a
    subclass (which may add an activation) is left as it is, and said so. What was done
    and what was left is in the returned model's ``doctor_changes`` (a list of lines).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, Report):
        raise TypeError(f"report must be a bnlab.doctor.Report, got {type(report).__name__}")
    chosen = _choose(report, which, batches is not None)
    xs: list[Tensor] = []
    if batches is not None:
        from bnlab.doctor._examine import _collect

        xs = _collect(batches, num_batches, "batches")[0]
    missing = [r for r in chosen if r in _NEED_DATA and not xs]
    if missing:
        raise ValueError(f"remedies {', '.join(missing)} need batches= (the data to measure)")
    layers_of: dict[str, list[str]] = {r: [] for r in REMEDIES}
    for f in report.findings:
        if f.remedy in layers_of:
            layers_of[f.remedy] += [n for n in f.layers if n not in layers_of[f.remedy]]
    layers_of["groupnorm"] = layers_of["renorm"]  # the two remedies for tiny batches
    work = copy.deepcopy(model)
    changes: list[str] = []
    for remedy in REMEDIES:
        if remedy not in chosen:
            continue
        names = layers_of[remedy]
        if remedy == "bias":
            _fix_bias(work, report, xs, changes)
        elif remedy == "track":
            _fix_track(work, names, xs, changes)
        elif remedy == "momentum":
            _fix_momentum(work, names, changes)
        elif remedy in ("renorm", "groupnorm", "freeze"):
            _convert(work, names, remedy, changes)
        elif remedy == "recalibrate":
            result = recalibrated_copy(work, xs, list(report.unreached))
            if isinstance(result, str):
                raise ValueError(f"cannot recalibrate: {result}")
            work = result
            changes.append(f"recalibrated every BN layer's running statistics on {len(xs)} "
                           "batch(es)")
        elif remedy == "fold":
            work = fold_bn(work)
            changes.append(f"folded {getattr(work, 'folded_pairs', 0)} Conv/Linear+BN pair(s)")
    work.doctor_changes = changes  # type: ignore[assignment]
    return work


def _choose(report: Report, which: str | Sequence[str], have_data: bool) -> list[str]:
    if which == "auto":
        picked = {f.remedy for f in report.findings
                  if f.remedy and severity_rank(f.severity) >= severity_rank("warning")}
        return [r for r in REMEDIES if r in picked and r not in ("groupnorm", "fold")
                and (have_data or r not in _NEED_DATA)]
    items = [which] if isinstance(which, str) else list(which)
    unknown = [r for r in items if r not in REMEDIES]
    if unknown:
        raise ValueError(f"unknown remedy {unknown[0]!r}; expected one of: "
                         f"{', '.join(REMEDIES)} or 'auto'")
    return [r for r in REMEDIES if r in items]


def _set_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of ``old`` under ``root`` by ``new``."""
    for parent in root.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def _convert(work: nn.Module, names: list[str], remedy: str, changes: list[str]) -> None:
    by_name = dict(bn_layers(work))
    for n in names:
        m = by_name.get(n)
        if m is None or isinstance(m, FROZEN_TYPES):
            continue
        if type(m) not in _CONVERTIBLE:
            changes.append(f"left {n}: {type(m).__name__} is not a plain torch BatchNorm "
                           f"(its forward may add to BN), so '{remedy}' would change it")
            continue
        if remedy == "freeze":
            new = freeze_bn(m)
        elif remedy == "renorm":
            new = replace_norm(m, "renorm")
        else:
            new = _group_norm(m)
        _set_module(work, m, new)
        what = {"freeze": "frozen (FrozenBatchNorm: fixed statistics in train and eval)",
                "renorm": "Batch Renorm (same state and eval output)",
                "groupnorm": f"GroupNorm({getattr(new, 'num_groups', '?')}) - retrain it"}
        changes.append(f"{n}: {what[remedy]}")


def _group_norm(m: Any) -> nn.Module:
    c = int(m.num_features)
    groups = min(32, c)
    while c % groups:
        groups -= 1
    gn = nn.GroupNorm(groups, c, eps=m.eps, affine=m.affine)
    if m.affine:
        with torch.no_grad():
            gn.weight.copy_(m.weight)
            gn.bias.copy_(m.bias)
    return gn.to(m.weight.device if m.affine else "cpu")


def _fix_momentum(work: nn.Module, names: list[str], changes: list[str]) -> None:
    by_name = dict(bn_layers(work))
    for n in names:
        m = by_name.get(n)
        if m is None or getattr(m, "momentum", None) is None:
            continue
        old = float(m.momentum)
        if old >= 0.5:
            m.momentum = round(1.0 - old, 12)
        elif old == 0:
            m.momentum = 0.1
        else:
            continue
        changes.append(f"{n}: momentum {old:g} -> {m.momentum:g}")


def _fix_bias(work: nn.Module, report: Report, xs: list[Tensor], changes: list[str]) -> None:
    for conv_name, bn_name in report.metrics.get("bias_pairs", []):
        conv: Any = work.get_submodule(conv_name)
        bn: Any = work.get_submodule(bn_name)
        if conv.bias is None or getattr(bn, "running_mean", None) is None:
            continue
        ref = _eval_outputs(work, xs[:1])
        saved_bias, saved_mean = conv.bias, bn.running_mean.clone()
        with torch.no_grad():
            bn.running_mean -= conv.bias.detach().to(bn.running_mean.dtype)
        conv.bias = None
        if xs:
            got = _eval_outputs(work, xs[:1])
            scale = max(float(ref[0].abs().max()), 1.0)
            if not torch.allclose(got[0], ref[0], rtol=0, atol=1e-4 * scale):
                conv.bias = saved_bias
                with torch.no_grad():
                    bn.running_mean.copy_(saved_mean)
                changes.append(f"left {conv_name}: removing its bias changed the output "
                               "(the conv output is used elsewhere too)")
                continue
        changes.append(f"{conv_name}: bias removed, folded into {bn_name}.running_mean")


def _eval_outputs(model: nn.Module, xs: list[Tensor]) -> list[Tensor]:
    with eval_mode(model), torch.no_grad():
        return [_first(model(x)) for x in xs]


def _first(out: Any) -> Tensor:
    from bnlab.doctor._examine import _first_tensor_out

    return _first_tensor_out(out).detach()


def _fix_track(work: nn.Module, names: list[str], xs: list[Tensor], changes: list[str]) -> None:
    by_name = dict(bn_layers(work))
    todo = [(n, by_name[n]) for n in names if n in by_name
            and getattr(by_name[n], "running_mean", None) is None]
    if not todo:
        return
    seen: dict[int, list[Moments]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: seen.setdefault(id(mod), []).append(Moments.of(args[0].detach())))
        for _, m in todo]
    try:
        _eval_outputs(work, xs)
    finally:
        for h in hooks:
            h.remove()
    for n, m in todo:
        parts = seen.get(id(m))
        if not parts:
            changes.append(f"left {n}: not reached in eval mode")
            continue
        total = merge_all(parts)
        if total.n < 2:
            changes.append(f"left {n}: 1 value per channel")
            continue
        like = m.weight if getattr(m, "weight", None) is not None else total.mean
        m.register_buffer("running_mean", total.mean.to(like.dtype).to(like.device))
        m.register_buffer("running_var", (total.m2 / (total.n - 1)).to(like.dtype)
                          .to(like.device))
        m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        m.track_running_stats = True
        changes.append(f"{n}: running statistics added, set to the data's population "
                       f"statistics ({total.n} values per channel)")
