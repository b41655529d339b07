"""SyncBatchNorm: batch norm whose statistics span every process of a torch.distributed group.

``torch.nn.SyncBatchNorm`` only accepts CUDA/XPU tensors: its statistics kernels
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``) have no CPU version. This one
is written with plain tensor ops and torch.distributed collectives, so it runs wherever
torch.distributed does: gloo on CPU, nccl on GPU.

Training forward, with ``R`` ranks, rank ``r`` holding ``n_r`` values per channel (batch
times spatial size; ``n_r = 0`` for an empty batch) and ``n = Σ_r n_r``::

    local:   μ_r = mean(x_r),  M2_r = Σ (x_r − μ_r)²                 (two-pass)
    merge:   μ  = Σ_r n_r μ_r / n                                    (float64,
             M2 = Σ_r M2_r + Σ_r n_r (μ_r − μ)²                       Chan et al., exact)
    y = (x − μ) / sqrt(M2/n + eps) · γ + β
    running_mean ← (1 − m)·running_mean + m·μ
    running_var  ← (1 − m)·running_var  + m·M2/(n − 1)             (unbiased)

``momentum=None`` makes ``m = 1/num_batches_tracked`` (a cumulative average), as in torch.
Eval mode uses the running statistics and never communicates. The result is the same as
``torch.nn.BatchNorm*`` applied to the concatenation of every rank's batch.

Communication: forward does ONE ``all_gather`` of the packed ``(n_r, μ_r, M2_r)`` (2C + 1
float64 values per rank); backward does ONE ``all_reduce`` of the packed ``(Σ dy, Σ dy·x̂)``
(2C float64 values). A rank with an empty batch still joins both collectives (contributing
``n_r = 0``), so nobody waits for it forever. Parameter gradients stay local: DDP (or the
caller) reduces them like any other parameter gradient.

Higher derivatives: under ``create_graph=True`` backward differentiates the training
forward written with differentiable ops, whose two global sums go through a differentiable
all-reduce, so second derivatives (gradient penalties, MAML) equal torch BN's on the
concatenated batch. Forward-mode AD all-reduces the two tangent sums it needs. Both need
every rank to take part, as backward does. A float16/bfloat16 input (CPU autocast) is
normalised in float32 and rounded once, as torch's BN does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn._base import (
    accumulation_dtype,
    channel_view,
    check_input,
    check_options,
    check_training_eps,
    differentiable_grads,
    reduce_dims,
    update_running_stats,
)

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _active_group(process_group: Any) -> Any | None:
    """The group to synchronise over, or None when there is nobody to talk to.

    None when torch.distributed is unavailable or uninitialised, or the group has one
    member (or this rank is not a member): then the layer is plain batch norm.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _global_stats(x: Tensor, group: Any | None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and M2 (centred sum of squares) over all ranks, and the count n.

    Numerics: each rank computes its mean and M2 two-pass (centre first, then square: no
    E[x²] − E[x]² cancellation) in the input's dtype (float32 for half types); torch's CPU
    sums are cascaded, so their error grows like log n, not n. The per-rank results are then
    merged with Chan et al.'s parallel formula in float64. The merge is exact algebra for any
    split, including uneven and empty batches, so the result equals the statistics of the
    concatenated batch up to rounding.
    """
    channels = x.shape[1]
    count = x.numel() // channels
    if count > 0:
        xa = x.detach().to(accumulation_dtype(x.dtype))
        dims = reduce_dims(x)
        mean_local = xa.mean(dim=dims)
        centred = xa - channel_view(mean_local, x.dim())
        mean = mean_local.to(torch.float64)
        m2 = (centred * centred).sum(dim=dims).to(torch.float64)
    else:  # an empty batch: contributes n_r = 0 (its μ_r, M2_r are multiplied away)
        mean = m2 = torch.zeros(channels, dtype=torch.float64, device=x.device)
    packed = torch.cat([mean.new_full((1,), float(count)), mean, m2])
    if group is None:
        table = packed.unsqueeze(0)
    else:
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        table = torch.stack(gathered)
    counts, means, m2s = table[:, :1], table[:, 1 : channels + 1], table[:, channels + 1 :]
    n = round(float(counts.sum()))
    if n == 0:
        return means[0], m2s[0], 0
    g_mean = (counts * means).sum(0) / n
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
    return g_mean, g_m2, n


class _AllReduceSum(torch.autograd.Function):
    """A differentiable sum over the ranks: every rank gets Σ_r t_r.

    Its gradient is again the sum over the ranks of the incoming gradients (each rank's
    output depends on every rank's input), taken through this Function, so derivatives of
    any order cross the ranks."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, group=group)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _sync_differentiable(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                         count: int, group: Any | None) -> Tensor:
    """The training forward written with differentiable ops, for double backward.

    Without a group it is torch's BN; with one, the two-pass statistics of the global batch
    through :class:`_AllReduceSum` (float64 sums, as in :func:`_global_stats`)."""
    if group is None:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    dims, nd, acc = reduce_dims(x), x.dim(), accumulation_dtype(x.dtype)
    xa = x.to(acc)
    mean = _AllReduceSum.apply(xa.sum(dims).to(torch.float64), group) / count
    centred = xa - channel_view(mean.to(acc), nd)
    m2 = _AllReduceSum.apply(centred.square().sum(dims).to(torch.float64), group)
    y = centred * channel_view((m2 / count + eps).rsqrt().to(acc), nd)
    if weight is not None:
        y = y * channel_view(weight.to(acc), nd)
    if bias is not None:
        y = y + channel_view(bias.to(acc), nd)
    return y.to(x.dtype)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalise with given global statistics; backward all-reduces the two sums dx needs.

    With x̂ = (x − μ)·invstd and n the global count, the input gradient is::

        dx = γ·invstd · (dy − Σ_all dy / n − x̂ · Σ_all (dy·x̂) / n)

    where Σ_all sums over every rank's batch (one all_reduce). dγ = Σ_local dy·x̂ and
    dβ = Σ_local dy are returned per rank. Under ``create_graph=True`` the gradients are
    taken through :func:`_sync_differentiable` instead, so second derivatives are exact
    (the statistics' dependence on x included, across the ranks). Forward-mode AD
    (:meth:`jvp`) all-reduces the two tangent sums it needs the same way.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        group: Any | None,
        eps: float,
    ) -> Tensor:
        # Half-precision input is normalised in float32 (like torch's BN), then rounded once.
        acc, nd = accumulation_dtype(x.dtype), x.dim()
        scale = invstd if weight is None else invstd * weight.to(torch.float64)
        # (x − μ)·scale + β rather than x·scale + (β − μ·scale): subtracting first keeps
        # full precision when |μ| is large against the standard deviation.
        y = (x.to(acc) - channel_view(mean.to(acc), nd)) * channel_view(scale.to(acc), nd)
        if bias is not None:
            y = y + channel_view(bias.to(acc), nd)
        return y.to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, mean, invstd, count, group, eps = inputs
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.save_for_forward(x, weight, bias, mean, invstd)
        ctx.count, ctx.group, ctx.eps = count, group, eps

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (dy,) = grad_outputs
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite form
            first = differentiable_grads(
                lambda: _sync_differentiable(x, weight, bias, ctx.eps, ctx.count, ctx.group),
                (x, weight, bias), ctx.needs_input_grad[:3], dy)
            return (*first, None, None, None, None, None)
        dims = reduce_dims(x)
        acc, nd = accumulation_dtype(x.dtype), x.dim()
        centred = x.to(acc) - channel_view(mean.to(acc), nd)
        dy_acc = dy.to(acc)
        # Local per-channel sums in the input's dtype (cascaded sums, as in _global_stats),
        # carried to float64 for the all_reduce; an empty local batch gives exact zeros.
        sum_dy = dy_acc.sum(dim=dims).to(torch.float64)
        sum_dy_xhat = (dy_acc * centred).sum(dim=dims).to(torch.float64) * invstd
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if needs_w and weight is not None:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if needs_b and bias is not None:
            grad_b = sum_dy.to(bias.dtype)
        if needs_x:
            total = torch.cat([sum_dy, sum_dy_xhat])
            if ctx.group is not None:
                dist.all_reduce(total, group=ctx.group)
            channels = x.shape[1]
            mean_dy = total[:channels] / ctx.count
            # x̂ · mean(dy·x̂) = (x − μ) · invstd · mean(dy·x̂): one per-channel factor
            coef = invstd * total[channels:] / ctx.count
            k = invstd if weight is None else invstd * weight.to(torch.float64)
            grad = dy_acc - channel_view(mean_dy.to(acc), nd)
            grad.addcmul_(centred, channel_view(coef.to(acc), nd), value=-1.0)
            grad_x = grad.mul_(channel_view(k.to(acc), nd)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *_constant_tangents: Any) -> Tensor:
        """Forward-mode AD, with x̂ = (x − μ)·invstd and E the mean over the global batch::

            x̂' = invstd·(x' − E[x'] − x̂·E[x̂·x']),    y' = γ·x̂' + γ'·x̂ + β'

        E[x'] and E[x̂·x'] take one all_reduce of two per-channel sums (every rank must
        push tangents through the layer together, as for backward)."""
        x, weight, _bias, mean, invstd = ctx.saved_tensors
        dims, nd, acc = reduce_dims(x), x.dim(), accumulation_dtype(x.dtype)
        xhat = (x.to(acc) - channel_view(mean.to(acc), nd)) * channel_view(invstd.to(acc), nd)
        out = torch.zeros_like(xhat)
        if x_t is not None:
            xt = x_t.to(acc)
            sums = torch.cat([xt.sum(dims), (xhat * xt).sum(dims)]).to(torch.float64)
            if ctx.group is not None:
                dist.all_reduce(sums, group=ctx.group)
            channels = x.shape[1]
            mean_t = channel_view((sums[:channels] / ctx.count).to(acc), nd)
            mean_xhat_t = channel_view((sums[channels:] / ctx.count).to(acc), nd)
            gain = invstd if weight is None else invstd * weight.to(torch.float64)
            out = out + (xt - mean_t - xhat * mean_xhat_t) * channel_view(gain.to(acc), nd)
        if weight_t is not None:
            out = out + xhat * channel_view(weight_t.to(acc), nd)
        if bias_t is not None:
            out = out + channel_view(bias_t.to(acc), nd)
        return out.to(x.dtype)


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm over the concatenation of every rank's batch (any input rank ≥ 2).

    Channels are on axis 1: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W). The math is
    in this module's docstring (:mod:`bnlab.nn.sync`); in short, training mode normalises
    with the biased variance of the global batch and feeds the unbiased one to
    ``running_var``, exactly as ``torch.nn.BatchNorm*`` on the concatenated batch.

    Args:
        num_features: C.
        eps: added to the variance before the square root. Default 1e-5.
        momentum: running-statistics momentum (PyTorch's convention,
            ``new = (1 − m)·old + m·batch``); ``None`` = cumulative average. Default 0.1.
        affine: learnable γ (``weight``) and β (``bias``). Default True.
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``.
            Without them, eval mode normalises with the local batch (no communication).
        process_group: the group to synchronise over; ``None`` = the default (WORLD) group.
            With no initialised process group, or a group of one, this is plain batch norm.

    State-dict keys are torch's BatchNorm keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so checkpoints move freely between the two.
    Global count 1 per channel in training raises torch's "Expected more than 1 value per
    channel" ``ValueError``; a global count of 0 (every rank empty) returns the empty
    output and leaves the running statistics unchanged, like torch.

    Example::

        >>> import torch
        >>> from bnlab.nn import SyncBatchNorm
        >>> bn = SyncBatchNorm(3)   # no process group: plain batch norm
        >>> bn(torch.randn(4, 3, 5, 5)).shape
        torch.Size([4, 3, 5, 5])

    Ioffe & Szegedy, "Batch Normalization", ICML 2015; Chan, Golub & LeVeque, "Updating
    formulae and a pairwise algorithm for computing sample variances", 1979.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_options(num_features, eps, momentum)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, (), "(N, C, *)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:  # eval with running statistics: local, no communication
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )
        check_training_eps(self)
        # Only training synchronises; eval without running stats uses the local batch,
        # as torch.nn.SyncBatchNorm does.
        group = _active_group(self.process_group) if self.training else None
        mean, m2, count = _global_stats(input, group)
        if count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} (1 value per channel over all ranks together)"
            )
        if self.training:
            # Every check has passed: count the batch (statistics unchanged when empty).
            update_running_stats(self, (mean, m2 / (count - 1)) if count else None)
        if count == 0:
            # Every rank is empty: an empty output and zero parameter gradients, as torch.
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        invstd = torch.rsqrt(m2 / count + self.eps)
        out: Tensor = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, mean, invstd, count, group, self.eps
        )
        return out


# These classes and their plain-form subclasses are converted (a BN+activation subclass keeps
# its tail). bnlab's Batch Renorm, Ghost BN and frozen BN are left as they are: their
# statistics are not the plain batch statistics that this layer synchronises.
_CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


def convert_sync_batchnorm(model: nn.Module, process_group: Any | None = None, *,
                           report: bool = False) -> Any:
    """Replace every plain batch-norm layer in ``model`` by :class:`SyncBatchNorm`.

    Converted: ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``, and their
    subclasses that override nothing of theirs (a custom ``__init__`` is fine). A subclass
    proven to be BN followed by its own drop/activation (timm's ``BatchNormAct2d``, see
    :mod:`bnlab.nn.rewrite`) becomes ``NormAct(SyncBatchNorm, drop, act)``: synchronised,
    the same drop and activation after it. Left untouched, and reported: bnlab's Batch
    Renorm, Ghost BN and frozen BN (their statistics are per virtual batch, corrected, or
    fixed, so synchronising plain batch statistics would change what they compute; a frozen
    layer stays frozen), lazy BN modules, and subclasses that cannot be proven safe. When
    any layer is left, a ``RewriteWarning`` says how many of the model's BN layers were
    converted and names the others with the reason, so a network that ends up without
    synchronisation never does so silently.

    The new layer *shares* the old one's parameter and buffer tensors (so an optimizer
    built before the conversion still updates the right tensors) and keeps ``eps``,
    ``momentum``, ``requires_grad`` and train/eval mode. A layer with forward hooks is left
    as it is (the new layer would not run them). Children
    are replaced in place; a layer that occurs several times in the model is converted once
    and stays shared. Returns the model, or the new layer when ``model`` itself is a
    batch-norm layer; with ``report=True``, ``(model, RewriteReport)``.
    """
    from bnlab.nn.replace import is_batchnorm
    from bnlab.nn.rewrite import RewriteReport, RewriteWarning, bn_form, rewrite_modules

    rep = RewriteReport("convert_sync_batchnorm")

    def make(name: str, layer: nn.Module) -> nn.Module | None:
        bn: Any = layer
        if isinstance(bn, SyncBatchNorm):
            rep.add(name, "left", "already bnlab's SyncBatchNorm")
            return None
        if not isinstance(bn, _CONVERTIBLE) or isinstance(bn, nn.modules.lazy.LazyModuleMixin):
            rep.add(name, "left", f"{type(bn).__name__} is not plain batch norm: its "
                    "statistics are not the batch statistics SyncBatchNorm synchronises")
            return None
        form = bn_form(bn)
        if form.kind == "unproven":
            rep.add(name, "left", form.reason)
            return None
        src: Any = layer  # a _BatchNorm: its configuration attributes
        new = SyncBatchNorm(
            src.num_features, src.eps, src.momentum, src.affine, src.track_running_stats,
            process_group,
        )
        with torch.no_grad():
            for key in ("weight", "bias"):
                new.register_parameter(key, getattr(bn, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                new.register_buffer(key, getattr(bn, key))
        new.train(bn.training)
        kept = f" + {', '.join(n for n, _ in form.tail)} kept" if form.tail else ""
        rep.add(name, "converted", f"{type(bn).__name__} -> SyncBatchNorm{kept}")
        return form.wrap(new)

    model = rewrite_modules(model, is_batchnorm, make)
    left = [e for e in rep.entries if e.action == "left" and e.detail !=
            "already bnlab's SyncBatchNorm"]
    if left:
        import warnings

        warnings.warn(
            f"convert_sync_batchnorm converted {rep.count('converted')} of {len(rep.entries)} "
            "batch-norm layer(s); not synchronised: "
            + "; ".join(f"{e.layer} ({e.detail})" for e in left),
            RewriteWarning,
            stacklevel=2,
        )
    return (model, rep) if report else model
