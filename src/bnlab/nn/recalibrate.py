"""Recompute BN running statistics as exact population statistics (PreciseBN).

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3: the EMA running statistics lag
behind the weights; averaging over many batches after training fixes that.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._progress import progress as progress_iter
from bnlab.nn.frozen import _FrozenBatchNorm
from bnlab.nn.replace import batchnorm_layers


class _Moments:
    """Per-channel count, mean and M2 = Σ(x − mean)², merged batch by batch in float64.

    Chan, Golub & LeVeque's pairwise update: with δ = mean_b − mean_a and n = n_a + n_b,
    mean = mean_a + δ·n_b/n and M2 = M2_a + M2_b + δ²·n_a·n_b/n. Exact for any batch sizes,
    and free of the cancellation of the Σx² − n·mean² form.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().double()
        dims = [0, *range(2, x.dim())]
        n_b = x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0
        if n_b == 0:
            return
        mean_b = x.mean(dim=dims)
        m2_b = ((x - mean_b.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dim=dims)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "recalibrate_bn expected each batch to be an input tensor or an (input, target) "
        f"tuple/list, got {type(batch).__name__}"
    )


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Set every BN layer's running statistics to the exact statistics of the given data.

    For each batch-norm layer with running statistics (torch's and bnlab's; frozen layers are
    left alone), over all N values per channel that reach it across ``batches``::

        running_mean = (1/N) Σ x             running_var = 1/(N − 1) Σ (x − running_mean)²

    (unbiased, torch's convention for ``running_var``). Batches of different sizes are
    weighted by their number of values: the result depends only on the samples, not on how
    they were split. Numerics: per-layer count/mean/M2 in float64 via forward pre-hooks,
    merged with Chan's parallel formula.

    The model runs in eval mode under ``torch.no_grad()``: every layer, BN included, behaves
    as at inference (dropout off, BN normalising with the statistics it had when the call
    started), so each layer's input is a per-sample function of the data and the result is
    exactly split-invariant. The new statistics are written only after the last batch.
    Afterwards each module's train/eval mode and each BN layer's momentum are restored and
    the hooks removed, in ``finally`` (also when the loader raises; then no statistics
    change). ``num_batches_tracked`` is left as it was; nothing but ``running_mean`` and
    ``running_var`` is touched.

    Args:
        model: any module containing BN layers.
        batches: an iterable of input tensors, or of (input, target) tuples as a DataLoader
            yields; inputs are moved to the model's device.
        num_batches: use at most this many batches (default: all).
        progress: show a progress bar / lines (default True).

    Returns:
        ``model`` (changed in place).

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
    layers: list[tuple[str, Any]] = [
        (name or type(m).__name__, m)
        for name, m in batchnorm_layers(model)
        if not isinstance(m, _FrozenBatchNorm) and getattr(m, "running_mean", None) is not None
    ]
    if not layers:
        raise ValueError("model has no batch-norm layer with running statistics to recalibrate")
    device = next(itertools.chain(model.parameters(), model.buffers())).device

    moments = {id(m): _Moments() for _, m in layers}
    modes = {m: m.training for m in model.modules()}
    momenta = {id(m): getattr(m, "momentum", None) for _, m in layers}
    handles = []
    try:
        for _, layer in layers:
            acc = moments[id(layer)]
            handles.append(
                layer.register_forward_pre_hook(lambda mod, args, acc=acc: acc.add(args[0]))
            )
        model.eval()
        total = num_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        source = batches if num_batches is None else itertools.islice(batches, num_batches)
        seen = 0
        with torch.no_grad():
            for batch in progress_iter(
                source, "recalibrate BN", total=total, enabled=None if progress else False,
                unit="batch",
            ):
                model(_first_tensor(batch).to(device))
                seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches")
        for name, layer in layers:
            acc = moments[id(layer)]
            if acc.count < 2:
                raise ValueError(
                    f"layer {name} saw {acc.count} value(s) per channel; the population "
                    "variance needs at least 2 (give more data, or check the layer is used)"
                )
        with torch.no_grad():
            for _, layer in layers:
                acc = moments[id(layer)]
                if acc.mean is None or acc.m2 is None:  # pragma: no cover - checked above
                    continue
                layer.running_mean.copy_(acc.mean)
                layer.running_var.copy_(acc.m2 / (acc.count - 1))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for _, layer in layers:
            layer.momentum = momenta[id(layer)]
    return model


__all__ = ["recalibrate_bn"]
