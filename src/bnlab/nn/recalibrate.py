"""Recompute BN running statistics as exact population statistics (PreciseBN).

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3: the EMA running statistics lag
behind the weights; averaging over many batches after training fixes that.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._progress import progress as progress_iter
from bnlab.nn._base import first_tensor
from bnlab.nn._moments import Moments, StopForward
from bnlab.nn.frozen import _FrozenBatchNorm
from bnlab.nn.replace import batchnorm_layers
from bnlab.nn.rewrite import Entry, RewriteReport, RewriteWarning, bn_form


def _add(totals: dict[int, Moments], key: int, x: Tensor) -> None:
    """Merge the moments of ``x`` (if it holds any value) into ``totals[key]``."""
    if not (x.dim() >= 2 and x.shape[1] and x.numel() // x.shape[1]):
        return
    part = Moments.measure(x)
    totals[key] = totals[key].merge(part) if key in totals else part


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    *,
    layerwise: bool = True,
    report: bool = False,
) -> Any:
    """Set every BN layer's running statistics to the exact statistics of the given data.

    For each batch-norm layer with running statistics (torch's and bnlab's; frozen layers are
    left alone), over all N values per channel that reach it across ``batches``::

        running_mean = (1/N) Σ x             running_var = 1/(N − 1) Σ (x − running_mean)²

    (unbiased, torch's convention for ``running_var``). Batches of different sizes are
    weighted by their number of values: the result depends only on the samples, not on how
    they were split. Numerics: each batch's per-channel mean and M2 (torch's BN statistics
    kernel for contiguous float32/float64 inputs, else two float64 passes), merged in float64
    with Chan's parallel formula, via forward pre-hooks.

    The model runs in eval mode under ``torch.no_grad()``: every layer behaves as at
    inference (dropout off, BN normalising with running statistics), so each layer's input
    is a per-sample function of the data and the result is exactly split-invariant.

    ``layerwise=True`` (the default): the layers are recalibrated one after another, in the
    order the forward pass reaches them, one pass over the data each. A layer's statistics
    are therefore computed from inputs that the *new* statistics of the layers before it
    produce: after the call, every layer's running statistics are exactly the population
    statistics of what it receives at inference. This costs one pass per BN layer, and each
    pass after the first stops at its layer (unless the forward calls that layer more than
    once); the inputs are kept in memory after the first pass (bound it with
    ``num_batches``), so a generator or a shuffling DataLoader is read only once.

    ``layerwise=False``: one pass for all layers. Deeper layers then see inputs normalised
    with the upstream layers' *old* statistics: cheaper, and the same when those were
    already close, but not inference-consistent when they were stale (after weight
    averaging, say).

    Layers the forward never reaches in eval mode (a branch used only in training, such as
    an auxiliary classifier head) are skipped: their statistics stay exactly as they were,
    and a ``RewriteWarning`` names them. If no layer at all is reached, ``ValueError``. A BN
    subclass that cannot be proven to normalise its input as plain BN does
    (:func:`bnlab.nn.rewrite.bn_form`: it is neither plain nor BN followed by an
    activation) is skipped the same way, since its input's statistics need not be what it
    normalises.

    Each module's train/eval mode is restored and the hooks removed, in ``finally``. If
    anything raises (the loader, or the model), every running statistic is put back as it
    was. The statistics are computed directly, so momentum is never changed (nor needed);
    ``num_batches_tracked`` is left as it was; nothing but ``running_mean`` and
    ``running_var`` is touched.

    Args:
        model: any module containing BN layers.
        batches: an iterable of input tensors, or of (input, target) tuples as a DataLoader
            yields; inputs are moved to the model's device.
        num_batches: use at most this many batches (default: all).
        progress: show a progress bar / lines (default True).
        layerwise: one pass per layer, inference-consistent (default); False: one pass.
        report: also return a :class:`~bnlab.nn.rewrite.RewriteReport` (every layer
            ``"recalibrated"`` or ``"skipped"``, with the reason).

    Returns:
        ``model`` (changed in place); ``(model, report)`` with ``report=True``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bnlab.nn import recalibrate_bn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> _ = recalibrate_bn(net, [torch.randn(8, 3) for _ in range(5)], progress=False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    candidates: list[tuple[str, Any]] = [
        (name or type(m).__name__, m)
        for name, m in batchnorm_layers(model)
        if not isinstance(m, _FrozenBatchNorm) and getattr(m, "running_mean", None) is not None
    ]
    if not candidates:
        raise ValueError("model has no batch-norm layer with running statistics to recalibrate")
    rep = RewriteReport("recalibrate_bn")
    layers: list[tuple[str, Any]] = []
    for name, m in candidates:
        form = bn_form(m)
        if form.kind == "unproven":
            rep.add(name, "skipped", form.reason)
        else:
            layers.append((name, m))
    if not layers:
        raise ValueError(
            "recalibrate_bn: no batch-norm layer it can recalibrate: "
            + "; ".join(f"{e.layer}: {e.detail}" for e in rep.entries)
        )
    device = next(itertools.chain(model.parameters(), model.buffers())).device

    modes = {m: m.training for m in model.modules()}
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for _, layer in layers]
    reached: dict[int, tuple[str, Any]] = {}  # id -> layer, in the order the forward reaches
    calls: dict[int, int] = {}  # id -> calls in the current forward of pass 1
    most_calls: dict[int, int] = {}  # id -> most calls in any one forward of pass 1
    handles: list[Any] = []
    done = False
    try:
        model.eval()
        # Pass 1 reads the batches (keeping the inputs if more passes follow). One pass: every
        # layer's statistics. Layerwise: those of the first layer reached, the others later.
        kept: list[Tensor] | None = [] if layerwise and len(layers) > 1 else None
        moments: dict[int, Moments] = {}
        for entry in layers:

            def first_pass_hook(mod: nn.Module, args: Any, entry: tuple[str, Any] = entry) -> None:
                reached.setdefault(id(mod), entry)
                calls[id(mod)] = calls.get(id(mod), 0) + 1
                most_calls[id(mod)] = max(most_calls.get(id(mod), 0), calls[id(mod)])
                if kept is None or next(iter(reached)) == id(mod):
                    _add(moments, id(mod), args[0])

            handles.append(entry[1].register_forward_pre_hook(first_pass_hook))
        total = num_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        source = batches if num_batches is None else itertools.islice(batches, num_batches)
        passes = "" if kept is None else f" (pass 1 of {len(layers)})"
        handles.append(model.register_forward_pre_hook(lambda mod, args: calls.clear()))
        if _run(model, _inputs(source, kept), device, passes, total, progress) == 0:
            raise ValueError("recalibrate_bn got no batches")
        _remove(handles)
        if not reached:
            raise ValueError(
                "recalibrate_bn: the model's forward in eval mode reached none of its "
                f"{len(layers)} batch-norm layer(s); nothing to recalibrate"
            )
        order = list(reached.values())
        for name, layer in layers:
            if id(layer) not in reached:
                rep.add(name, "skipped", "never reached by the forward in eval mode (a "
                        "training-only branch?); statistics unchanged")
        if kept is None:
            for name, layer in order:
                _write(name, layer, moments.get(id(layer)))
        else:
            _write(*order[0], moments.get(id(order[0][1])))
            for i, (name, layer) in enumerate(order[1:], start=2):
                # A layer called at most once per forward ends the forward there: what
                # follows it is not needed (a deep network costs half the passes' compute).
                # A layer called more often (a shared module) needs every call.
                stop = most_calls.get(id(layer), 0) == 1

                def hook(mod: nn.Module, args: Any, stop: bool = stop) -> None:
                    _add(moments, id(mod), args[0])
                    if stop:
                        raise StopForward

                handles.append(layer.register_forward_pre_hook(hook))
                _run(model, kept, device, f" (pass {i} of {len(order)})", len(kept), progress)
                _remove(handles)
                _write(name, layer, moments.get(id(layer)))
        rep.entries[:0] = [Entry(name, "recalibrated", "") for name, _ in order]
        done = True
    finally:
        _remove(handles)
        for module, training in modes.items():
            module.training = training
        if not done:
            with torch.no_grad():
                for (_, layer), (mean, var) in zip(layers, saved, strict=True):
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)
    skipped = [e for e in rep.entries if e.action == "skipped"]
    if skipped:
        warnings.warn(
            f"recalibrate_bn: recalibrated {rep.count('recalibrated')} batch-norm layer(s), "
            f"left {len(skipped)} unchanged: "
            + "; ".join(f"{e.layer} ({e.detail})" for e in skipped),
            RewriteWarning,
            stacklevel=2,
        )
    return (model, rep) if report else model


def _inputs(batches: Iterable[Any], kept: list[Tensor] | None) -> Iterator[Tensor]:
    """The input tensor of each batch, also appended to ``kept`` (unless None)."""
    for batch in batches:
        x = first_tensor(batch, "recalibrate_bn expected each batch to be an input tensor "
                         "or an (input, target) tuple/list")
        if kept is not None:
            kept.append(x)
        yield x


def _run(model: nn.Module, inputs: Iterable[Tensor], device: torch.device, passes: str,
         total: int | None, progress: bool) -> int:
    """One forward of ``model`` per input, without gradients; returns how many ran."""
    count = 0
    with torch.no_grad():
        for x in progress_iter(inputs, "recalibrate BN" + passes, total=total,
                               enabled=None if progress else False, unit="batch"):
            with contextlib.suppress(StopForward):
                model(x.to(device))
            count += 1
    return count


def _remove(handles: list[Any]) -> None:
    while handles:
        handles.pop().remove()


def _write(name: str, layer: Any, total: Moments | None) -> None:
    """Set ``layer``'s running statistics from ``total`` (at least 2 values per channel)."""
    count = 0 if total is None else total.n
    if total is None or count < 2:
        raise ValueError(
            f"layer {name} saw {count} value(s) per channel; the population "
            "variance needs at least 2 (give more data, or check the layer is used)"
        )
    with torch.no_grad():
        layer.running_mean.copy_(total.mean)
        layer.running_var.copy_(total.m2 / (total.n - 1))


__all__ = ["recalibrate_bn"]
