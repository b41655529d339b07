"""Find batch-norm layers in a model and convert them between kinds, keeping their state.

"Batch norm" here means torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and bnlab's
``BatchRenorm*``, ``GhostBatchNorm*``, ``FrozenBatchNorm*`` and ``SyncBatchNorm``.
The state carried over is torch's: ``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``, plus ``eps``, ``momentum`` and ``affine``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bnlab.nn._base import GuardedBatchNorm
from bnlab.nn.frozen import _FrozenBatchNorm
from bnlab.nn.kinds import BN_KINDS, bn_kind
from bnlab.nn.renorm import _BatchRenorm
from bnlab.nn.rewrite import NormAct, RewriteReport, bn_form, rewrite_modules, warn


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's and bnlab's batch-norm layers (not GroupNorm/LayerNorm/InstanceNorm).

    Every bnlab BN module but the frozen one is a torch ``_BatchNorm``."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _FrozenBatchNorm))


def batchnorm_dim(module: nn.Module) -> int | None:
    """1, 2 or 3 for a rank-specific BN class; None for rank-agnostic ones (SyncBatchNorm)."""
    for dim, cls in BN_KINDS["bn"].classes.items():
        if isinstance(module, cls) and not isinstance(module, nn.SyncBatchNorm):
            return dim
    ranks = getattr(module, "_ranks", None)
    if ranks:
        return {(2, 3): 1, (4,): 2, (5,): 3}.get(tuple(ranks))
    return None


def batchnorm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every batch-norm layer, each module once."""
    for name, module in model.named_modules():
        if is_batchnorm(module):
            yield name, module


def name_bn_layers(model: nn.Module) -> nn.Module:
    """Give every bnlab BN layer its qualified name for warnings (``layer.layer_name``)."""
    for name, module in batchnorm_layers(model):
        if isinstance(module, GuardedBatchNorm):
            module.layer_name = name or type(module).__name__
    return model


def _carry_state(old: Any, new: nn.Module) -> None:
    """Copy weight, bias, running stats and the batch counter from ``old`` into ``new``."""
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src = getattr(old, key, None)
            dst = getattr(new, key, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                dst.copy_(src)
    if isinstance(new, _BatchRenorm) and old.num_batches_tracked is not None:
        with torch.no_grad():
            new.warmup_step.fill_(min(int(old.num_batches_tracked), new.warmup_steps))
    new.train(old.training)


def _tensor_like(module: nn.Module) -> dict[str, Any]:
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def convert_layer(module: nn.Module, kind: str, **kwargs: Any) -> nn.Module:
    """A new ``kind`` layer (not ``"sync"``) with ``module``'s configuration and state."""
    if kind == "sync":
        raise ValueError("convert_layer makes one layer; use convert_sync_batchnorm for 'sync'")
    spec = bn_kind(kind)
    if not is_batchnorm(module):
        raise TypeError(f"expected a batch-norm layer, got {type(module).__name__}")
    cls = spec.class_for(batchnorm_dim(module))
    if cls is None:
        raise ValueError(
            f"cannot convert {type(module).__name__} (rank-agnostic) to {kind!r}: pick a "
            "rank-specific source layer"
        )
    tracks = getattr(module, "running_mean", None) is not None
    if kind == "frozen" and not tracks:
        raise ValueError(
            f"{type(module).__name__} has no running statistics (track_running_stats=False); "
            "there is nothing to freeze"
        )
    options: dict[str, Any] = {
        "eps": module.eps, "affine": module.affine, "momentum": getattr(module, "momentum", 0.1),
    }
    if spec.takes_track_running_stats:
        options["track_running_stats"] = tracks
    options.update(_tensor_like(module))
    options.update(kwargs)
    new = cls(module.num_features, **options)
    _carry_state(module, new)
    return new


def _rewrite_bn(model: nn.Module, function: str, pick: Any, convert: Any,
                action: str) -> tuple[nn.Module, RewriteReport]:
    """Replace each picked BN layer by ``convert(layer)``, keeping a subclass's tail.

    ``plain`` layers are converted; a ``tail`` subclass becomes NormAct(converted, its drop,
    its act); an ``unproven`` one is left, reported and warned about (see
    :mod:`bnlab.nn.rewrite`). A conversion that raises ``ValueError`` for one layer
    raises, naming the layer.
    """
    report = RewriteReport(function)

    def make(name: str, layer: nn.Module) -> nn.Module | None:
        form = bn_form(layer)
        if form.kind == "unproven":
            report.add(name, "left", form.reason)
            warn(function, name, form.reason)
            return None
        try:
            new = form.wrap(convert(layer))
        except ValueError as exc:
            raise ValueError(f"{function}: layer {name!r}: {exc}") from None
        norm = new.norm if isinstance(new, NormAct) else new
        kept = f" + {', '.join(n for n, _ in form.tail)} kept" if form.tail else ""
        if getattr(layer, "running_mean", None) is None and norm.running_mean is not None:
            # e.g. renorm needs running statistics: they start at mean 0, variance 1
            kept += " (it had no running statistics: the new ones start at 0 and 1)"
        report.add(name, action, f"{type(layer).__name__} -> {type(norm).__name__}{kept}")
        return new

    return rewrite_modules(model, pick, make), report


def replace_norm(model: nn.Module, kind: str, *, report: bool = False, **kwargs: Any) -> Any:
    """Convert every batch-norm layer of ``model`` to ``kind``, in place, keeping its state.

    ``kind``: ``"bn"`` (torch's BatchNorm1d/2d/3d), ``"renorm"`` (:class:`BatchRenorm2d` …),
    ``"ghost"`` (:class:`GhostBatchNorm2d` …, needs ``virtual_batch_size=``), ``"frozen"``
    (:class:`FrozenBatchNorm2d` …) or ``"sync"`` (``bnlab.nn.SyncBatchNorm``; every BN
    layer, bnlab's included, becomes synchronised plain BN; ``process_group=`` is the only
    kwarg). ``kwargs`` go to each new layer's constructor (``r_max=``, ``small_batch=`` …).
    Weight, bias, running statistics, ``num_batches_tracked``, eps, momentum, affine and the
    train/eval mode are carried over. Returns the model (a new module if ``model`` itself is
    a BN layer); with ``report=True``, ``(model, RewriteReport)``. bnlab's layers get their
    qualified name for warnings.

    BN subclasses (:mod:`bnlab.nn.rewrite`): one proven to be BN followed by its own
    drop/activation (timm's ``BatchNormAct2d``) becomes ``NormAct(new layer, drop, act)``,
    the same drop and activation modules after the new normalisation; one that cannot be
    proven safe is left unchanged with a ``RewriteWarning`` naming it.

    Example::

        >>> from torch import nn
        >>> from bnlab.nn import replace_norm
        >>> net = replace_norm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), "renorm")
    """
    bn_kind(kind)  # a known kind, or a ValueError listing them
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind == "sync":
        from bnlab.nn.sync import convert_sync_batchnorm

        # convert_sync_batchnorm converts torch's BatchNorm only: bring every other BN layer
        # there first (renorm/ghost/frozen behaviour is dropped: all become synchronised).
        model, rep = _rewrite_bn(
            model, "replace_norm",
            lambda m: isinstance(m, (GuardedBatchNorm, _FrozenBatchNorm))
            and batchnorm_dim(m) is not None,
            lambda m: convert_layer(m, "bn"), "replaced",
        )
        model, sync_rep = convert_sync_batchnorm(model, report=True, **kwargs)
        rep.entries += sync_rep.entries
        model = name_bn_layers(model)
        return (model, rep) if report else model
    if kind == "ghost" and "virtual_batch_size" not in kwargs:
        raise ValueError("replace_norm(model, 'ghost', ...) needs virtual_batch_size=<int>")
    model, rep = _rewrite_bn(model, "replace_norm", is_batchnorm,
                             lambda m: convert_layer(m, kind, **kwargs), "replaced")
    model = name_bn_layers(model)
    return (model, rep) if report else model


def freeze_bn(model: nn.Module, *, report: bool = False) -> Any:
    """Replace every batch-norm layer by a :class:`FrozenBatchNorm2d` (etc.), in place.

    The frozen layers compute ``y = (x − running_mean)/sqrt(running_var + eps)·weight +
    bias`` in train and eval mode alike and hold no parameters. Returns the model (a new
    module if ``model`` itself is a BN layer); with ``report=True``, ``(model,
    RewriteReport)``. A layer without running statistics raises ``ValueError``. BN
    subclasses are handled as in :func:`replace_norm` (a BN+activation layer becomes
    ``NormAct(frozen, drop, act)``; an unproven one is left with a warning).
    """
    return replace_norm(model, "frozen", report=report)


def unfreeze_bn(model: nn.Module, *, report: bool = False) -> Any:
    """Turn every frozen BN layer back into torch's ``BatchNorm1d/2d/3d``, in place.

    Weight and bias become trainable parameters again; running statistics, eps, affine,
    ``num_batches_tracked`` and the momentum recorded when it was frozen are kept. A
    ``NormAct`` made by :func:`freeze_bn` keeps its drop and activation (its ``norm``
    becomes the BN); the original fused subclass is not rebuilt. With ``report=True``,
    ``(model, RewriteReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model, rep = _rewrite_bn(model, "unfreeze_bn", lambda m: isinstance(m, _FrozenBatchNorm),
                             lambda m: convert_layer(m, "bn"), "replaced")
    return (model, rep) if report else model


__all__ = [
    "batchnorm_layers",
    "freeze_bn",
    "is_batchnorm",
    "name_bn_layers",
    "replace_norm",
    "unfreeze_bn",
]
