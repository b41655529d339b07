"""Batch Renormalization (Ioffe 2017) for inputs of any rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bnlab.nn._base import (
    RANKS,
    GuardedBatchNorm,
    accumulation_dtype,
    bn_backward,
    channel_view,
    check_training_eps,
    differentiable_grads,
    rank_doc,
    reduce_dims,
)

_DOC = """Batch Renormalization over a {shape} input (Ioffe 2017, arXiv:1702.03275).

    Training (statistics over every axis except C; μ_B, σ_B² the biased batch statistics)::

        σ_B = sqrt(σ_B² + eps)            σ = sqrt(running_var + eps)
        r   = clip(σ_B / σ,               1/r_max_t, r_max_t)     (detached: no gradient)
        d   = clip((μ_B − running_mean)/σ, −d_max_t, d_max_t)      (detached: no gradient)
        y   = γ · ((x − μ_B)/σ_B · r + d) + β

    Eval: ``y = γ · (x − running_mean)/sqrt(running_var + eps) + β``, exactly BatchNorm.

    Running statistics follow torch's convention ``new = (1 − momentum)·old +
    momentum·batch`` with the *unbiased* batch variance (the paper averages σ; storing the
    variance keeps torch's state-dict keys, so a ``nn.BatchNorm{dim}d`` checkpoint loads
    directly, and back). ``momentum=None`` is a cumulative average.

    Warm-up, linear in the step counter ``t`` (training forwards taken so far, clamped in
    place at ``warmup_steps`` so it never passes it)::

        f = min(t, warmup_steps) / warmup_steps      (f = 1 when warmup_steps == 0)
        r_max_t = 1 + (r_max − 1)·f                  d_max_t = d_max·f

    so the first step is plain BatchNorm (r = 1, d = 0) and the limits are fully open after
    ``warmup_steps`` steps. The counter is the non-persistent buffer ``warmup_step``; loading
    a state dict sets it to ``min(num_batches_tracked, warmup_steps)`` (the two advance
    together), so the keys stay exactly torch's. With ``r_max=1, d_max=0`` the layer *is*
    BatchNorm: forward, backward and running statistics.

    Numerics and speed: μ_B and σ_B² come from one pass of torch's BN statistics kernel and
    serve r, d, the running update and the normalisation, which is BatchNorm with the
    per-channel affine ``γ·r`` and ``γ·d + β`` (torch's BN kernels forward and backward, so a
    step costs what a BatchNorm step costs). r and d are detached as in the paper: the
    gradient treats them as constants (dγ = r·Σdy·x̂ + d·Σdy). Double backward
    (``create_graph=True``) works: it differentiates the same maths written with
    differentiable ops; so does forward-mode AD (``torch.autograd.forward_ad``), with r and
    d constant. Under CPU autocast a float16/bfloat16 input takes float32 statistics and
    parameters, as torch's BN does.

    Args:
        num_features: C.
        eps: added to variances (default 1e-5).
        momentum: running-stat momentum (default 0.1), ``None`` for a cumulative average.
        affine: learnable γ, β (default True).
        r_max: final upper clip of r, ≥ 1 (default 3.0).
        d_max: final clip of |d|, ≥ 0 (default 5.0).
        warmup_steps: training steps of the linear warm-up (default 5000).
        small_batch: ``"error"`` (default) or ``"skip"``: see :mod:`bnlab.nn`.
        skip_nonfinite: skip the running update on a non-finite batch (default True).

    Shape: input and output {shape}.

    Example::

        >>> import torch
        >>> from bnlab.nn import {name}
        >>> m = {name}(4, r_max=3.0, d_max=5.0, warmup_steps=100)
        >>> y = m(torch.randn(*{example}))
    """

_EXAMPLES = {1: "(8, 4)", 2: "(8, 4, 5, 5)", 3: "(8, 4, 2, 5, 5)"}


class _BatchRenorm(GuardedBatchNorm):
    warmup_step: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        *,
        small_batch: str = "error",
        skip_nonfinite: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, True, small_batch=small_batch,
            skip_nonfinite=skip_nonfinite, device=device, dtype=dtype,
        )
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max!r}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
                or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.register_buffer(
            "warmup_step", torch.tensor(0, dtype=torch.long, device=device), persistent=False
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}"
        )

    def current_limits(self) -> tuple[float, float]:
        """(r_max_t, d_max_t) that the next training step will use."""
        if self.warmup_steps == 0:
            frac = 1.0
        else:
            frac = min(int(self.warmup_step), self.warmup_steps) / self.warmup_steps
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        nbt = state_dict.get(prefix + "num_batches_tracked")
        if nbt is not None:
            with torch.no_grad():
                self.warmup_step.fill_(min(int(nbt), self.warmup_steps))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        # _BatchNorm.__init__ resets the statistics before warmup_step is registered.
        if hasattr(self, "warmup_step"):
            self.warmup_step.zero_()

    def _counted(self) -> None:
        self.warmup_step.add_(1).clamp_(max=self.warmup_steps)

    def _train_forward(self, x: Tensor) -> Tensor:
        count = x.numel() // self.num_features
        if self._small_batch(x, count):
            return self._eval_forward(x)
        rm, rv = self.running_mean, self.running_var
        if rm is None or rv is None:
            raise ValueError(
                f"{type(self).__name__} needs running statistics in training (r and d compare "
                f"the batch with them), but layer {self.display_name()} has none"
            )
        check_training_eps(self)
        acc = accumulation_dtype(x.dtype)
        with torch.no_grad():
            # One fused pass for the per-channel mean and biased variance (torch's BN stats
            # kernel; no running buffers given, so it updates nothing). Half-precision input
            # is read in float32, as torch's BN keeps its statistics; detached, so forward-
            # mode AD sees μ_B, σ_B² only through _Renorm (no_grad leaves tangents on).
            xs = x.detach()
            mean, var = torch.batch_norm_update_stats(
                xs if xs.dtype == acc else xs.to(acc), None, None, 0.0)
            sigma = torch.sqrt(rv.to(acc) + self.eps)
            r_lim, d_lim = self.current_limits()
            r = torch.clamp(torch.sqrt(var + self.eps) / sigma, 1.0 / r_lim, r_lim)
            d = torch.clamp((mean - rm.to(acc)) / sigma, -d_lim, d_lim)
        # γ((x − μ_B)/σ_B · r + d) + β is BatchNorm with weight γ·r and bias γ·d + β.
        out = _Renorm.apply(x, self.weight, self.bias, mean, var, r, d, self.eps)
        self._update_running(mean, var * (count / (count - 1)))
        return out


def _renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """BatchNorm's per-channel affine that gives renorm: γ·r and γ·d + β (r, d without γ).

    In the parameters' dtype when there are parameters (float32 for a half-precision input
    under autocast, as torch's BN takes them), else in r's (the statistics' dtype)."""
    if weight is None or bias is None:
        return r, d
    return weight * r.to(weight.dtype), torch.addcmul(bias, weight, d.to(weight.dtype))


class _Renorm(torch.autograd.Function):
    """BatchNorm with affine (γ·r, γ·d + β), normalising with batch statistics computed once.

    ``F.batch_norm(x, None, None, γr, γd + β, training=True)`` would compute μ_B and σ_B²
    again, after the statistics pass that r and d need. Here the forward normalises with
    the given (μ_B, σ_B²) in torch's inference kernel, and the backward is torch's training
    backward given the same μ_B and 1/sqrt(σ_B² + eps): the gradient of training-mode BN.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                var: Tensor, r: Tensor, d: Tensor, eps: float) -> Tensor:
        w, b = _renorm_affine(weight, bias, r, d)
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        *tensors, eps = inputs  # x, weight, bias, mean, var, r, d
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        x, weight, bias, mean, var, r, d = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite form
            first = differentiable_grads(
                lambda: F.batch_norm(x, None, None, *_renorm_affine(weight, bias, r, d), True,
                                     0.0, ctx.eps),
                (x, weight, bias), ctx.needs_input_grad[:3], dy)
            return (*first, None, None, None, None, None)
        w, _ = _renorm_affine(weight, bias, r, d)
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        invstd = (var + ctx.eps).rsqrt()
        dx, g_w, g_b = bn_backward(
            dy, x, w, None, None, mean, invstd, True, ctx.eps,
            [needs_x, needs_w or needs_b, needs_w or needs_b])
        dweight = torch.addcmul(g_w * r, g_b, d).to(weight.dtype) if needs_w else None
        return dx, dweight, g_b if needs_b else None, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *_stat_tangents: Any) -> Tensor:
        """Forward-mode AD: with x̂ = (x − μ_B)·invstd and means E over every axis but C,

            x̂' = invstd·(x' − E[x']) − x̂·E[x̂·x']·invstd,   y' = γ·r·x̂' + γ'·(r·x̂ + d) + β'

        (μ_B and σ_B depend on x; r and d are constants, as in backward)."""
        x, weight, _bias, mean, var, r, d = ctx.saved_tensors
        nd, dims = x.dim(), reduce_dims(x)
        acc = mean.dtype
        invstd = (var + ctx.eps).rsqrt()
        xhat = (x.to(acc) - channel_view(mean, nd)) * channel_view(invstd, nd)
        out = torch.zeros_like(xhat)
        if x_t is not None:
            xt = x_t.to(acc)
            xhat_t = (xt - xt.mean(dims, keepdim=True)
                      - xhat * (xhat * xt).mean(dims, keepdim=True)) * channel_view(invstd, nd)
            gain = r if weight is None else weight.to(acc) * r
            out = out + xhat_t * channel_view(gain, nd)
        if weight_t is not None:
            affine_t = channel_view(weight_t.to(acc), nd)
            out = out + (xhat * channel_view(r, nd) + channel_view(d, nd)) * affine_t
        if bias_t is not None:
            out = out + channel_view(bias_t.to(acc), nd)
        return out.to(x.dtype)


def _doc(dim: int) -> str:
    return rank_doc(_DOC, dim, f"BatchRenorm{dim}d", example=_EXAMPLES[dim])


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _doc(1)
    _ranks, _shape_text = RANKS[1]


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _doc(2)
    _ranks, _shape_text = RANKS[2]


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _doc(3)
    _ranks, _shape_text = RANKS[3]


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]
