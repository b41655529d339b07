"""Fold inference-mode batch norm into the preceding Conv1d/2d/3d or Linear."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor, fx, nn

from bnlab.nn.replace import is_batchnorm

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bn_affine(bn: Any) -> tuple[Tensor, Tensor] | None:
    """The eval-mode map of a BN layer as float64 (scale, shift), or None without running stats.

    ``y = (z − running_mean)/sqrt(running_var + eps)·weight + bias = z·scale + shift``.
    """
    rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if rm is None or rv is None:
        return None  # eval without running statistics normalises with the batch: not foldable
    scale = torch.rsqrt(rv.double() + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.double()
    shift = -rm.double() * scale
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _out_features(layer: Any) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _can_fold(layer: Any, bn: Any) -> bool:
    return (
        type(layer) in FOLDABLE  # subclasses may change forward: leave them alone
        and is_batchnorm(bn)
        and bn_affine(bn) is not None
        and _out_features(layer) == bn.num_features
    )


def fold_pair(layer: Any, bn: Any) -> nn.Module:
    """A new Conv/Linear equal to ``bn.eval()(layer(x))``; neither input is modified.

    ``W' = W·scale`` (per output channel, axis 0 of the weight for every Conv groups/dilation
    setting and for Linear), ``b' = b·scale + shift`` (b = 0 without bias), computed in
    float64 and cast back to the weight's dtype. New Parameter objects, so a weight shared
    with another module is never changed.
    """
    affine = bn_affine(bn)
    if affine is None or not _can_fold(layer, bn):
        raise ValueError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}")
    scale, shift = affine
    weight = layer.weight
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        view = (-1,) + (1,) * (weight.dim() - 1)
        new_w = weight.double() * scale.to(weight.device).view(view)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        new_b = bias * scale.to(weight.device) + shift.to(weight.device)
    folded.weight = nn.Parameter(new_w.to(weight.dtype), requires_grad=weight.requires_grad)
    folded.bias = nn.Parameter(new_b.to(weight.dtype), requires_grad=weight.requires_grad)
    return folded


class _BNLeafTracer(fx.Tracer):
    """torch.fx tracer that keeps every BN layer (ours too) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _fold_graph(model: nn.Module) -> tuple[nn.Module, int]:
    graph = _BNLeafTracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    modules = dict(gm.named_modules(remove_duplicate=False))
    calls = Counter(
        id(modules[str(n.target)]) for n in gm.graph.nodes if n.op == "call_module"
    )
    # A parameter read directly (``F.conv2d(x, self.conv.weight)``) is a get_attr node of the
    # module's weight: that module is used elsewhere too, so it must not be changed.
    for n in gm.graph.nodes:
        owner = str(n.target).rpartition(".")[0] if n.op == "get_attr" else None
        if owner is not None and owner in modules:
            calls[id(modules[owner])] += 1
    folded_count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = modules[str(node.target)]
        src = node.args[0]
        if not is_batchnorm(bn) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        # The conv's output must feed only this BN, else the other user needs the raw output.
        if len(src.users) != 1 or src.kwargs:
            continue
        layer = modules[str(src.target)]
        if not _can_fold(layer, bn):
            continue
        folded = fold_pair(layer, bn)
        if calls[id(layer)] == 1:
            _set_submodule(gm, str(src.target), folded)
        else:
            # The same conv module is called (or its weight read) elsewhere, possibly without
            # BN: fold into a clone used only here, so the other uses keep the original weights.
            base = str(src.target).replace(".", "_") + "_folded"
            name, i = base, 1
            while hasattr(gm, name):
                name, i = f"{base}{i}", i + 1
            gm.add_submodule(name, folded)
            src.target = name
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded_count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded_count


def _fold_sequentials(model: nn.Module) -> int:
    """Fallback: fold adjacent (Conv/Linear, BN) pairs inside every nn.Sequential."""
    count = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if _can_fold(seq[i], seq[i + 1]):
                seq[i] = fold_pair(seq[i], seq[i + 1])  # a new module: shared ones unchanged
                seq[i + 1] = nn.Identity()
                count += 1
    return count


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BN folded into the Conv/Linear before it.

    A Conv1d/2d/3d or Linear whose output feeds *only* a batch-norm layer with running
    statistics (torch's or bnlab's) gets the BN's eval map ``y = z·scale + shift`` folded in::

        scale = weight / sqrt(running_var + eps)       shift = bias − running_mean·scale
        W' = W·scale (per output channel)              b' = b·scale + shift

    and the BN is removed. Groups, dilation, ``bias=False`` and BN ``affine=False`` are
    handled; a BN without running statistics (eval uses batch statistics) is left alone, as
    is anything else. The graph is found with ``torch.fx`` (BN layers kept as leaves): a
    conv whose output also goes elsewhere is not folded, and a conv *module* called more
    than once (or whose weight is also read directly) is folded into a clone for the BN use
    only, so its other uses are unchanged.
    Models fx cannot trace fall back, with a warning, to adjacent pairs in ``nn.Sequential``.

    ``model`` itself is not changed. The result is an ``nn.Module`` (usually an
    ``fx.GraphModule``) in eval mode, with ``folded_pairs`` set to the number of pairs folded.
    A ``Linear`` → ``BatchNorm1d`` pair is folded on the assumption that the BN normalises the
    Linear's output features, i.e. 2-D (N, C) activations, the usual case.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bnlab.nn import fold_bn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> fast = fold_bn(net)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool(torch.allclose(fast(x), net(x), atol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    result: nn.Module
    try:
        result, count = _fold_graph(work)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        warnings.warn(
            f"fold_bn: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
            f"{exc}); folding only adjacent Conv/Linear -> BN pairs inside nn.Sequential",
            RuntimeWarning,
            stacklevel=2,
        )
        work = copy.deepcopy(model).eval()
        count = _fold_sequentials(work)
        result = work
    result.eval()
    result.folded_pairs = count  # type: ignore[assignment]
    return result


__all__ = ["bn_affine", "fold_bn", "fold_pair"]
