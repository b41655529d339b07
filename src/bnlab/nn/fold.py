"""Fold inference-mode batch norm into the preceding Conv1d/2d/3d or Linear."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any, Literal, overload

import torch
from torch import Tensor, fx, nn

from bnlab.nn.frozen import _FrozenBatchNorm
from bnlab.nn.replace import convert_layer, is_batchnorm
from bnlab.nn.rewrite import (
    FOLDABLE,
    Entry,
    NormAct,
    RewriteReport,
    RewriteWarning,
    bn_form,
    conv_fold_check,
    has_hooks,
    rewrite_modules,
    warn,
)


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


def _fold_problem(layer: Any, bn: Any) -> str:
    """'' when ``bn`` (a plain-form BN) can be folded into ``layer``; else why not."""
    reason = conv_fold_check(layer)
    if reason:
        return reason
    if bn_affine(bn) is None:
        return "it has no running statistics (eval normalises with the batch)"
    if _out_features(layer) != bn.num_features:
        return (f"{type(layer).__name__} has {_out_features(layer)} outputs, the BN "
                f"{bn.num_features} channels")
    return ""


def fold_pair(layer: Any, bn: Any) -> nn.Module:
    """A new Conv/Linear equal to ``bn.eval()(layer(x))``; neither input is modified.

    ``W' = W·scale`` (per output channel, axis 0 of the weight for every Conv groups/dilation
    setting and for Linear), ``b' = b·scale + shift`` (b = 0 without bias), computed in
    float64 and cast back to the weight's dtype. New Parameter objects, so a weight shared
    with another module is never changed. ``layer`` may be a Conv/Linear subclass that
    :func:`bnlab.nn.rewrite.conv_fold_check` accepts; ``bn`` must be plain batch norm.
    """
    affine = bn_affine(bn)
    if not is_batchnorm(bn) or bn_form(bn).kind != "plain":
        raise ValueError(f"cannot fold {type(bn).__name__}: not a plain batch-norm layer")
    problem = _fold_problem(layer, bn)
    if affine is None or problem:
        raise ValueError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}: "
                         f"{problem}")
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
    """torch.fx tracer that keeps every BN layer (ours too) and every Conv/Linear, subclasses
    included, as one call_module node (a subclass's padding arithmetic need not trace)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_batchnorm(m) or isinstance(m, FOLDABLE)
                or super().is_leaf_module(m, module_qualified_name))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _unfuse(work: nn.Module, report: RewriteReport) -> tuple[dict[str, str], set[int]]:
    """Split each ``tail``-form BN subclass of ``work`` into NormAct(frozen BN, drop, act).

    The frozen layer is the BN's eval map, so ``work``'s eval output is unchanged and the
    folding below sees a plain BN. Unproven subclasses (and subclasses without running
    statistics) are reported and left; unproven ones are warned about. Returns
    {new BN path: original layer name} and the ids of the BN layers left.
    """
    renamed: dict[str, str] = {}
    skip: set[int] = set()

    def make(name: str, bn: nn.Module) -> nn.Module | None:
        form = bn_form(bn)
        if form.kind == "plain":
            return None  # folded or made affine with the graph
        skip.add(id(bn))
        if form.kind == "unproven":
            report.add(name, "left", form.reason)
            warn("fold_bn", name, form.reason)
            return None
        if bn_affine(bn) is None:
            report.add(name, "left", "no running statistics (eval normalises with the batch)")
            return None
        skip.discard(id(bn))
        new = form.wrap(convert_layer(bn, "frozen").eval())
        if isinstance(new, NormAct):
            renamed[f"{name}.norm"] = name
        return new

    rewrite_modules(work, is_batchnorm, make)
    return renamed, skip


def _bn_name(target: str, renamed: dict[str, str]) -> str:
    return renamed.get(target, target)


def _fold_graph(model: nn.Module, report: RewriteReport, renamed: dict[str, str],
                skip: set[int]) -> tuple[nn.Module, int]:
    tracer = _BNLeafTracer()
    hooked = [name or "the model" for name, m in model.named_modules()
              if has_hooks(m) and not tracer.is_leaf_module(m, name)]
    if hooked:
        # fx inlines a non-leaf module's forward: its hooks would silently stop running.
        raise RuntimeError(f"forward hooks on {', '.join(hooked)} would be lost in an fx graph")
    graph = tracer.trace(model)
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
    called = {id(modules[str(n.target)]) for n in gm.graph.nodes if n.op == "call_module"}
    for name, m in model.named_modules():
        if is_batchnorm(m) and id(m) not in called and id(m) not in skip:
            report.add(_bn_name(name, renamed), "removed", "the traced eval forward never "
                       "calls it (a training-only branch?): it goes with that branch")
    folded_count = 0
    unfolded: list[tuple[fx.Node, str]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(modules[str(node.target)]):
            continue
        bn = modules[str(node.target)]
        name = _bn_name(str(node.target), renamed)
        if id(bn) in skip:
            continue  # reported by _unfuse
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            unfolded.append((node, "it is called with more than one argument"))
            continue
        if not isinstance(src, fx.Node) or src.op != "call_module":
            unfolded.append((node, f"no Conv/Linear directly before it (its input is "
                                   f"{_describe(src)})"))
            continue
        layer = modules[str(src.target)]
        problem = _fold_problem(layer, bn)
        if not problem and (len(src.users) != 1 or src.kwargs):
            # The conv's output must feed only this BN, else the other user needs the raw one.
            others = ", ".join(str(u.name) for u in src.users if u is not node)
            problem = f"the output of {src.target} also feeds {others or 'other uses'}"
        if problem:
            unfolded.append((node, problem))
            continue
        folded = fold_pair(layer, bn)
        if calls[id(layer)] == 1:
            _set_submodule(gm, str(src.target), folded)
            into = str(src.target)
        else:
            # The same conv module is called (or its weight read) elsewhere, possibly without
            # BN: fold into a clone used only here, so the other uses keep the original weights.
            base = str(src.target).replace(".", "_") + "_folded"
            into, i = base, 1
            while hasattr(gm, into):
                into, i = f"{base}{i}", i + 1
            gm.add_submodule(into, folded)
            src.target = into
        report.add(name, "folded", f"into {into} ({type(layer).__name__})")
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded_count += 1
    frozen: dict[int, nn.Module] = {}
    for node, reason in unfolded:
        bn = modules[str(node.target)]
        name = _bn_name(str(node.target), renamed)
        if bn_affine(bn) is None:
            report.add(name, "left", "no running statistics (eval normalises with the batch)")
            continue
        if id(bn) not in frozen:
            frozen[id(bn)] = _affine_layer(bn)
        _set_submodule(gm, str(node.target), frozen[id(bn)])
        report.add(name, "affine", reason)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded_count


def _describe(src: Any) -> str:
    """What feeds a BN node, in words."""
    if not isinstance(src, fx.Node):
        return "a constant"
    if src.op == "placeholder":
        return "the model's input"
    name = getattr(src.target, "__name__", str(src.target))
    return f"{src.op} {name}"


def _affine_layer(bn: nn.Module) -> nn.Module:
    """The eval map of a plain BN with running statistics as a fixed affine layer."""
    return bn if isinstance(bn, _FrozenBatchNorm) else convert_layer(bn, "frozen").eval()


def _fold_sequentials(model: nn.Module, report: RewriteReport, renamed: dict[str, str],
                      skip: set[int]) -> int:
    """Fallback: fold (Conv/Linear, BN) pairs adjacent inside an nn.Sequential's own forward.

    Inside ``nn.Sequential.forward`` each element's output feeds only the next element, so
    such a pair can be folded without a graph. Every other plain BN (with running statistics)
    becomes a fixed affine layer, which equals it in eval wherever it is called.
    """
    names = {id(m): n for n, m in model.named_modules()}
    seen: set[int] = set()
    count = 0
    for seq in [m for m in model.modules() if type(m).forward is nn.Sequential.forward
                and isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            # A BN, or the norm of a NormAct (a split BN+activation subclass).
            holder = seq[i + 1] if isinstance(seq[i + 1], NormAct) else None
            bn: Any = seq[i + 1] if holder is None else holder.norm
            if not is_batchnorm(bn) or id(bn) in skip or id(bn) in seen:
                continue
            if _fold_problem(seq[i], bn):
                continue
            layer_name = names.get(id(seq[i]), "?")
            bn_name = names.get(id(bn), "?")
            seq[i] = fold_pair(seq[i], bn)  # a new module: shared ones unchanged
            if holder is None:
                seq[i + 1] = nn.Identity()
            else:
                holder.norm = nn.Identity()
            seen.add(id(bn))
            report.add(_bn_name(bn_name, renamed), "folded",
                       f"into {layer_name} ({type(seq[i]).__name__}, nn.Sequential order)")
            count += 1

    def make(name: str, bn: nn.Module) -> nn.Module | None:
        if id(bn) in skip:
            return None  # reported by _unfuse
        if bn_affine(bn) is None:
            report.add(_bn_name(name, renamed), "left",
                       "no running statistics (eval normalises with the batch)")
            return None
        report.add(_bn_name(name, renamed), "affine",
                   "not directly after a Conv/Linear in an nn.Sequential (untraced model)")
        return _affine_layer(bn)

    rewrite_modules(model, lambda m: is_batchnorm(m) and id(m) not in seen, make)
    return count


@overload
def fold_bn(model: nn.Module, *, report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold_bn(model: nn.Module, *, report: Literal[True]) -> tuple[nn.Module, RewriteReport]: ...


def fold_bn(model: nn.Module, *, report: bool = False) -> Any:
    """An eval-mode copy of ``model`` with each BN folded into the Conv/Linear before it.

    A Conv1d/2d/3d or Linear whose output feeds *only* a batch-norm layer with running
    statistics (torch's or bnlab's) gets the BN's eval map ``y = z·scale + shift`` folded in::

        scale = weight / sqrt(running_var + eps)       shift = bias − running_mean·scale
        W' = W·scale (per output channel)              b' = b·scale + shift

    and the BN is removed. Groups, dilation, ``bias=False`` and BN ``affine=False`` are
    handled. The graph is found with ``torch.fx`` (BN and Conv/Linear layers kept as
    leaves): a conv whose output also goes elsewhere is not folded, and a conv *module*
    called more than once (or whose weight is also read directly) is folded into a clone for
    the BN use only, so its other uses are unchanged. Models fx cannot trace (or with forward
    hooks on a module fx would inline) fall back, with a warning, to adjacent pairs in
    ``nn.Sequential``.

    A BN that cannot be folded but has running statistics becomes a fixed per-channel affine
    (``FrozenBatchNorm*``), its eval map. A BN without running statistics (eval uses batch
    statistics) is left alone.

    Subclasses (see :mod:`bnlab.nn.rewrite`): a BN subclass proven to be BN followed by its
    own drop/activation (timm's ``BatchNormAct2d``) is folded and its drop and activation
    modules kept after the folded conv; a BN subclass that cannot be proven safe is left
    unchanged with a :class:`~bnlab.nn.rewrite.RewriteWarning` naming it. A Conv/Linear
    subclass is folded when it overrides nothing or its forward is affine in its weight and
    bias on probe inputs (a pad-then-conv ``Conv2dSame``).

    ``model`` itself is not changed. The result is an ``nn.Module`` (usually an
    ``fx.GraphModule``) in eval mode, with ``folded_pairs`` set to the number of pairs
    folded. With ``report=True`` the return value is ``(folded_model, RewriteReport)``:
    every BN layer, ``"folded"`` (into which conv), ``"affine"`` (and why it could not be
    folded), ``"left"`` (and why) or ``"removed"`` (the eval forward never calls it: a
    branch used only in training, which fx's eval trace drops; the result is for
    inference). A ``Linear`` → ``BatchNorm1d`` pair is folded on the assumption that the
    BN normalises the Linear's output features, i.e. 2-D (N, C) activations, the usual case.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bnlab.nn import fold_bn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> fast, rep = fold_bn(net, report=True)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool(torch.allclose(fast(x), net(x), atol=1e-5))
        True
        >>> rep.entries[0].action, rep.entries[0].detail
        ('folded', 'into 0 (Conv2d)')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rep = RewriteReport("fold_bn")
    work = copy.deepcopy(model).eval()
    renamed, skip = _unfuse(work, rep)
    result: nn.Module
    left = list(rep.entries)
    try:
        result, count = _fold_graph(work, rep, renamed, skip)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        note = (f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
                f"{exc}); folded only adjacent Conv/Linear -> BN pairs inside nn.Sequential")
        warnings.warn(f"fold_bn: {note}", RewriteWarning, stacklevel=2)
        rep = RewriteReport("fold_bn", entries=left, notes=[note])
        work = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RewriteWarning)  # already warned above
            renamed, skip = _unfuse(work, RewriteReport("fold_bn"))
        count = _fold_sequentials(work, rep, renamed, skip)
        result = work
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rep.entries.sort(key=lambda e: order.get(e.layer, len(order)))
    fused = set(renamed.values())  # BN + tail subclasses: say that the tail stays
    rep.entries = [
        Entry(e.layer, e.action, f"{e.detail}; its tail kept after it")
        if e.layer in fused and e.action in ("folded", "affine") else e
        for e in rep.entries
    ]
    result.eval()
    result.folded_pairs = count  # type: ignore[assignment]
    return (result, rep) if report else result


__all__ = ["bn_affine", "fold_bn", "fold_pair"]
