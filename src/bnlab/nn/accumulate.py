"""Gradient accumulation that keeps batch norm honest: one running-statistics update per
optimizer step, from the merged statistics of all its micro-batches.

With gradient accumulation (k micro-batches of b samples per optimizer step), torch's
BatchNorm updates its running statistics k times per step, each time from b samples, and
normalises each micro-batch by its own b samples: the running statistics then describe
batch-b statistics, decay k times faster than intended, and every forward differs from the
batch-(k·b) forward the step is meant to approximate (pytorch/pytorch#46516).

:func:`accumulate_bn` offers two modes:

``mode="one-update"``
    Each micro-batch is normalised by its own statistics (as without the context), but the
    running statistics are not touched during the forwards; the per-channel count, mean and
    M2 = Σ(x − mean)² of every micro-batch a layer receives are merged exactly (Chan, Golub &
    LeVeque) in float64, and :meth:`BNAccumulator.step` (or leaving the context) applies
    *one* update, with torch's formula and momentum, from the merged statistics::

        running_mean ← (1 − m)·running_mean + m·mean_kb
        running_var  ← (1 − m)·running_var  + m·var_kb·n/(n − 1)        (n = k·b·spatial)

    ``num_batches_tracked`` grows by one per step. For the first BN layer that is exactly the
    update a batch-(k·b) BN makes; deeper layers get the batch-(k·b) update *of the inputs
    they received*, which were normalised per micro-batch upstream.

``mode="two-pass"``
    :meth:`BNAccumulator.gather` first runs the step's micro-batches without gradients, one
    pass per BN layer in forward order, and merges each layer's statistics, upstream layers
    already normalising with the merged statistics. The training forwards that follow then
    normalise micro-batch j at every layer with the statistics of the whole accumulated batch,
    in which the micro-batch's own contribution stays differentiable::

        mean = (n_o·mean_o + Σ_j x)/n
        var  = (M2_o + n_o·(mean_o − mean)² + Σ_j (x − mean)²)/n

    (o: the other micro-batches, constants from the gather pass). What equals the batch-(k·b)
    forward: every layer's output, hence the model's output and the loss (sum of the k
    micro-batch losses, each weighted by its share), and the running statistics after
    :meth:`~BNAccumulator.step` at *every* layer. What does not: the gradient. In a large
    batch each sample's gradient also flows through the statistics into the loss of every
    other sample; here it reaches only the losses of its own micro-batch, so the
    cross-micro-batch terms of BN's backward are missing. The parameter gradient's cosine to
    the large-batch gradient is below 1 (measure it for your model: ``benchmarks/
    accumulate_cosine.py`` prints it for the seed CNN and MLP).

    ``stats_grad`` chooses how the statistics pass gradients back (the forward is the same):
    ``"own"`` (default) is the exact derivative of the batch-(k·b) loss of this micro-batch
    with the other micro-batches held fixed: every statistic's gradient is its micro-batch
    share n_j/n of micro-batch BN's, so BN's centring and decorrelation of the gradient
    are k times too weak. ``"micro"`` gives the statistics micro-batch BN's gradient (the
    values stay the whole batch's), as if the other micro-batches moved like this one; it is
    an estimate, usually the closer one (see the benchmark).

Supported layers: torch's ``BatchNorm1d/2d/3d`` and their subclasses (e.g. a BN that adds an
activation after ``super().forward``), each called once per forward, in training mode with
running statistics. Anything else raises ``ValueError`` naming the layer. Everything the
context changes (``track_running_stats``, and in two-pass mode for the length of each
layer's forward its mode, ``eps`` and running-statistics buffers) is restored in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.nn._base import eval_mode, first_tensor
from bnlab.nn._moments import Moments, StopForward, merge_all

MODES = ("one-update", "two-pass")
STATS_GRADS = ("own", "micro")


class BNAccumulator:
    """The object :func:`accumulate_bn` returns; use it as a context manager."""

    def __init__(self, model: nn.Module, mode: str = "one-update", *,
                 stats_grad: str = "own") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if stats_grad not in STATS_GRADS:
            raise ValueError(f"stats_grad must be one of {', '.join(STATS_GRADS)}; "
                             f"got {stats_grad!r}")
        self.model = model
        self.mode = mode
        self.stats_grad = stats_grad
        self.layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]] = []
        from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
        from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
        from bnlab.nn.sync import SyncBatchNorm

        unsupported = (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, BatchRenorm1d,
                       BatchRenorm2d, BatchRenorm3d, SyncBatchNorm, nn.SyncBatchNorm)
        for name, m in model.named_modules():
            if isinstance(m, unsupported):
                raise ValueError(
                    f"layer {name or type(m).__name__} ({type(m).__name__}): accumulate_bn "
                    "supports torch.nn.BatchNorm1d/2d/3d and their subclasses (not ghost, "
                    "renorm or synchronised BN, whose statistics work differently)"
                )
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is None or m.running_var is None:
                    raise ValueError(
                        f"layer {name or type(m).__name__} has no running statistics "
                        "(track_running_stats=False): accumulate_bn has nothing to update"
                    )
                self.layers.append((name or type(m).__name__, m))
        if not self.layers:
            raise ValueError("model has no torch BatchNorm layer")
        self._names = {id(m): name for name, m in self.layers}
        self._pending: dict[int, list[Moments]] = {}  # one-update: micro-batch moments
        self._gathered: dict[int, list[Moments]] = {}  # two-pass: per micro-batch, per layer
        self._merged: dict[int, Moments] = {}
        self._micro = 0  # two-pass: index of the current training micro-batch
        self._calls: dict[int, int] = {}
        self._handles: list[Any] = []
        self._saved: dict[int, tuple[bool, float, Tensor, Tensor, bool]] = {}
        self._active = False
        self._standardised = False
        self._gathering: tuple[nn.Module, list[Moments]] | None = None

    # ------------------------------------------------------------------ context

    def __enter__(self) -> BNAccumulator:
        for _, m in self.layers:
            rm, rv = m.running_mean, m.running_var
            if rm is None or rv is None:
                raise ValueError(f"layer {self._names[id(m)]} lost its running statistics")
            self._saved[id(m)] = (m.training, m.eps, rm, rv, m.track_running_stats)
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
            self._handles.append(self.model.register_forward_hook(self._forward_done))
            for _, m in self.layers:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook))
                self._handles.append(m.register_forward_hook(self._post_hook))
                # Training forwards use batch statistics and leave the running ones alone.
                m.track_running_stats = False
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and self._has_pending():
                self.step()
        finally:
            self._restore()

    def _restore(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        for _, m in self.layers:
            saved = self._saved.get(id(m))
            if saved is None:
                continue
            training, eps, rm, rv, tracks = saved
            m.training, m.eps, m.track_running_stats = training, eps, tracks
            m.running_mean, m.running_var = rm, rv
        self._active = False

    def _has_pending(self) -> bool:
        return bool(self._merged) if self.mode == "two-pass" else bool(self._pending)

    # ------------------------------------------------------------------ hooks

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self._calls.clear()
        self._standardised = False

    def _forward_done(self, module: nn.Module, args: Any, output: Any) -> None:
        # Two-pass: a training forward that used the gathered statistics is one micro-batch.
        if self._standardised:
            self._micro += 1

    def _count_call(self, m: nn.Module) -> None:
        self._calls[id(m)] = self._calls.get(id(m), 0) + 1
        if self._calls[id(m)] > 1:
            raise ValueError(
                f"layer {self._names[id(m)]} is called more than once per forward; "
                "accumulate_bn needs one call per layer per forward"
            )

    def _pre_hook(self, m: nn.Module, args: Any) -> Any:
        if not m.training:
            return None
        self._count_call(m)
        x = args[0]
        if self.mode == "one-update":
            self._pending.setdefault(id(m), []).append(Moments.of(x.detach()))
            return None
        return self._two_pass_input(m, x, args)

    def _post_hook(self, m: Any, args: Any, output: Any) -> None:
        saved = self._saved[id(m)]
        if m.running_mean is not saved[2]:  # the two-pass swap: put the module back
            m.training, m.eps = saved[0], saved[1]
            m.running_mean, m.running_var = saved[2], saved[3]

    # ------------------------------------------------------------------ two-pass

    def _standardise_as(self, m: Any, x: Tensor, args: Any) -> Any:
        """Make ``m`` compute weight·x + bias (eval, mean 0, var 1, eps 0) on the given x."""
        rm, rv = self._saved[id(m)][2], self._saved[id(m)][3]
        m.training = False
        m.eps = 0.0
        m.running_mean = torch.zeros_like(rm)
        m.running_var = torch.ones_like(rv)
        return (x, *args[1:])

    def _two_pass_input(self, m: nn.Module, x: Tensor, args: Any) -> Any:
        if id(m) not in self._merged:
            if self._gathering is not None and self._gathering[0] is m:
                self._gathering[1].append(Moments.of(x.detach()))
                raise StopForward
            raise ValueError(
                f"layer {self._names[id(m)]}: no gathered statistics; call gather() with "
                "this step's micro-batches before the training forwards"
            )
        eps = self._saved[id(m)][1]
        dims = [0, *range(2, x.dim())]
        view = (1, -1, *([1] * (x.dim() - 2)))
        if self._gathering is not None:  # upstream of the layer being gathered: constants
            total = self._merged[id(m)]
            mean, var = total.mean, total.var
        else:
            parts = self._gathered[id(m)]
            j = self._micro
            if j >= len(parts):
                raise ValueError(
                    f"{j + 1} training forwards, but gather() saw {len(parts)} micro-batches"
                )
            own = parts[j]
            n_j = x.numel() // x.shape[1]
            if n_j != own.n:
                raise ValueError(
                    f"layer {self._names[id(m)]}: micro-batch {j} has {n_j} values per "
                    f"channel, gather() saw {own.n}: feed the gathered micro-batches in order"
                )
            xd = x.double()
            self._standardised = True
            if self.stats_grad == "micro":
                # Values of the whole batch, gradients of this micro-batch's own statistics.
                total = self._merged[id(m)]
                own_mean = xd.mean(dim=dims)
                mean = total.mean + (own_mean - own_mean.detach())
                own_var = ((xd - mean.view(view)) ** 2).mean(dim=dims)
                var = total.var + (own_var - own_var.detach())
            else:
                others = [p for i, p in enumerate(parts) if i != j]
                o = merge_all(others) if others else Moments(0, own.mean * 0, own.m2 * 0)
                n = o.n + n_j
                mean = (o.mean * o.n + xd.sum(dim=dims)) / n
                var = (o.m2 + o.n * (o.mean - mean) ** 2
                       + ((xd - mean.view(view)) ** 2).sum(dim=dims)) / n
        z = (x.double() - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
        return self._standardise_as(m, z.to(x.dtype), args)

    def gather(self, micro_batches: Iterable[Any]) -> None:
        """Two-pass mode: merge every layer's statistics over this step's micro-batches.

        One pass per BN layer (in the order the forward reaches them), without gradients,
        each ending at its layer; upstream layers normalise with their merged statistics.
        ``micro_batches``: input tensors or (input, target) tuples, the same ones, in the
        same order, that the training forwards will then receive.
        """
        if self.mode != "two-pass":
            raise ValueError("gather() is for mode='two-pass'")
        if not self._active:
            raise ValueError("use gather() inside the accumulate_bn context")
        inputs = [first_tensor(b, "expected an input tensor or an (input, target) tuple")
                  for b in micro_batches]
        if not inputs:
            raise ValueError("gather() got no micro-batches")
        self._merged, self._gathered, self._micro = {}, {}, 0
        order = self._forward_order(inputs[0])
        with torch.no_grad():
            for m in order:
                parts: list[Moments] = []
                self._gathering = (m, parts)
                try:
                    for x in inputs:
                        with contextlib.suppress(StopForward):
                            self.model(x)
                finally:
                    self._gathering = None
                if len(parts) != len(inputs):
                    raise ValueError(f"layer {self._names[id(m)]} was not reached by every "
                                     "micro-batch")
                self._gathered[id(m)] = parts
                self._merged[id(m)] = merge_all(parts)
        for name, m in self.layers:
            if id(m) not in self._merged and m.training:
                raise ValueError(f"layer {name} is not reached by the forward; gather() "
                                 "cannot give it statistics")

    def _forward_order(self, x: Tensor) -> list[nn.Module]:
        """The BN layers in the order one forward (eval mode, no gradients) reaches them."""
        seen: dict[int, nn.Module] = {}
        handles = [m.register_forward_pre_hook(
            lambda mod, args: seen.setdefault(id(mod), mod) and None, prepend=True)
            for _, m in self.layers if m.training]
        try:
            with eval_mode(self.model), torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return list(seen.values())

    # ------------------------------------------------------------------ the update

    def step(self) -> None:
        """Update every layer's running statistics once, from the step's merged statistics."""
        if self.mode == "two-pass":
            merged = dict(self._merged)
            self._merged, self._gathered, self._micro = {}, {}, 0
        else:
            merged = {k: merge_all(v) for k, v in self._pending.items()}
            self._pending = {}
        with torch.no_grad():
            for name, m in self.layers:
                total = merged.get(id(m))
                if total is None:
                    continue
                if total.n < 2:
                    raise ValueError(f"layer {name}: {total.n} value per channel in the whole "
                                     "accumulated batch; the unbiased variance needs 2")
                rm, rv = self._saved[id(m)][2], self._saved[id(m)][3]
                tracked = m.num_batches_tracked
                if tracked is not None:
                    tracked.add_(1)
                if m.momentum is None:  # torch: a cumulative average over the steps
                    factor = 1.0 / float(tracked) if tracked is not None else 0.0
                else:
                    factor = float(m.momentum)
                unbiased = total.m2 / (total.n - 1)
                rm.copy_((1 - factor) * rm.double() + factor * total.mean)
                rv.copy_((1 - factor) * rv.double() + factor * unbiased)


def accumulate_bn(model: nn.Module, mode: str = "one-update", *,
                  stats_grad: str = "own") -> BNAccumulator:
    """A context for gradient accumulation with BN (see the module docstring for the math).

    ``mode``: ``"one-update"`` or ``"two-pass"``; ``stats_grad`` (two-pass): ``"own"`` or
    ``"micro"``. One optimizer step is one ``with`` block (or call ``acc.step()`` between
    steps). Example (k micro-batches; ``mode="two-pass"`` adds the ``gather`` line and then
    normalises every micro-batch with the whole batch's statistics)::

        >>> import torch
        >>> from torch import nn
        >>> from bnlab.nn import accumulate_bn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
        >>> micro = [torch.randn(8, 3) for _ in range(4)]
        >>> with accumulate_bn(net, mode="two-pass") as acc:
        ...     acc.gather(micro)
        ...     for x in micro:
        ...         (net(x).pow(2).mean() / len(micro)).backward()
        >>> int(net[1].num_batches_tracked)
        1
    """
    return BNAccumulator(model, mode, stats_grad=stats_grad)


__all__ = ["MODES", "STATS_GRADS", "BNAccumulator", "Moments", "accumulate_bn", "merge_all"]
