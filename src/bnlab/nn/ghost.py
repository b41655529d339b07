"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017) for inputs of any rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnlab.nn._base import (
    RANKS,
    GuardedBatchNorm,
    accumulation_dtype,
    bn_backward,
    check_training_eps,
    differentiable_grads,
    rank_doc,
    tracks_running_stats,
)

_DOC = """Ghost Batch Normalization over a {shape} input (Hoffer et al. 2017, arXiv:1705.08741).

    Training: the batch of N samples is split along axis 0 into consecutive *ghost batches*
    of ``virtual_batch_size`` (V) samples, and each is normalised with its own statistics
    (over the chunk's samples and every axis except C)::

        y = γ · (x − μ_chunk) / sqrt(σ²_chunk + eps) + β        (σ² biased)

    Chunking rule for N not a multiple of V (k = N // V, rest = N mod V):

    * rest == 0: k chunks of V;
    * rest == 1: the leftover sample is merged into the previous chunk, so the last chunk
      has V + 1 samples (a chunk of one would have no batch statistics);
    * rest ≥ 2: k chunks of V plus one smaller chunk of ``rest`` samples;
    * V ≥ N: one chunk, and the layer is exactly BatchNorm (forward, backward, running stats).

    Vectorised: there is no Python loop over chunks. Every (sample, channel) row's mean and
    variance over its L positions (L = 1, the length, H·W or D·H·W) are computed at once,
    merged exactly into each chunk's statistics (Chan's formula), and one broadcast
    multiply-add normalises the whole batch; backward reduces Σdy and Σdy·(x − μ_chunk) per
    row, sums them per chunk, and forms dx in two broadcast passes. From 8 positions the row
    reductions are torch's BN kernels on a (1, N·C, L) view; below, composite ops. A
    contiguous input is never copied (a channels-last one is, once), so a training step
    costs about what ``nn.BatchNorm{dim}d`` costs; the output keeps a channels-last input's
    memory format, as torch's BN does. Double backward (``create_graph=True``) works: it
    differentiates the same maths written with differentiable ops; so does forward-mode AD
    (``torch.autograd.forward_ad``). A float16/bfloat16 input (CPU autocast) is normalised
    in float32 and rounded once, as torch's BN does.

    Running statistics: one update per training forward, from the *whole* batch — the
    count-weighted mean of the chunk means and the unbiased variance of all N samples, merged
    exactly from the chunk statistics (Chan et al.'s parallel formula). That is what
    ``nn.BatchNorm{dim}d`` would record for the same batch, so eval uses population-style
    statistics and momentum keeps torch's meaning (``new = (1 − momentum)·old +
    momentum·batch``; ``None`` is a cumulative average).

    Eval: plain BatchNorm with the running statistics, for any batch size (no chunking)::

        y = γ · (x − running_mean) / sqrt(running_var + eps) + β

    Args:
        num_features: C.
        virtual_batch_size: samples per ghost batch, ≥ 1.
        eps: added to variances (default 1e-5).
        momentum: running-stat momentum (default 0.1), ``None`` for a cumulative average.
        affine: learnable γ, β (default True).
        track_running_stats: keep running statistics (default True); without them eval
            normalises with the whole batch's statistics, as torch does.
        small_batch: ``"error"`` (default) or ``"skip"``: see :mod:`bnlab.nn` (applies when
            a chunk has one value per channel).
        skip_nonfinite: skip the running update on a non-finite batch (default True).

    Shape: input and output {shape}; state-dict keys exactly torch's BatchNorm.

    Example::

        >>> import torch
        >>> from bnlab.nn import {name}
        >>> m = {name}(4, virtual_batch_size=16)
        >>> y = m(torch.randn(*{example}))
    """

_EXAMPLES = {1: "(50, 4)", 2: "(50, 4, 5, 5)", 3: "(50, 4, 2, 5, 5)"}


def ghost_chunks(n: int, virtual_batch_size: int) -> tuple[int, int]:
    """(number of equal chunks of V, size of the odd last chunk or 0) for a batch of n."""
    if virtual_batch_size >= n:
        return 1, 0  # one chunk of n (the caller treats it as plain BN)
    k, rest = divmod(n, virtual_batch_size)
    if rest == 0:
        return k, 0
    if rest == 1:
        return k - 1, virtual_batch_size + 1
    return k, rest


class _GhostBatchNorm(GuardedBatchNorm):
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        small_batch: str = "error",
        skip_nonfinite: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, small_batch=small_batch,
            skip_nonfinite=skip_nonfinite, device=device, dtype=dtype,
        )
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
                or virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size must be an int >= 1, got {virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _train_forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[0], self.num_features
        per_sample = x[0].numel() // c
        v = self.virtual_batch_size
        k, tail = ghost_chunks(n, v)
        smallest = n if v >= n else (min(v, tail) if tail else v)
        if self._small_batch(x, smallest * per_sample):
            return self._eval_forward(x)
        check_training_eps(self)
        if v >= n:
            k, v = 1, n  # one chunk: exactly BatchNorm
        chunks = _Chunks(n, v, k, tail)
        out, means, variances, _ = _GhostFunction.apply(x, self.weight, self.bias, chunks,
                                                        self.eps)
        if tracks_running_stats(self):
            with torch.no_grad():
                self._update_from_chunks(means, variances,
                                         [s * per_sample for s in chunks.sizes])
        return out

    def _update_from_chunks(self, means: Tensor, variances: Tensor, counts: list[int]) -> None:
        """Merge per-chunk (mean, biased var) into the whole batch's mean and unbiased var.

        μ = Σ nᵢμᵢ / n,  M2 = Σ nᵢσᵢ² + Σ nᵢ(μᵢ − μ)²  (exact; float64 for the merge).
        """
        n_i = torch.tensor(counts, dtype=torch.float64, device=means.device).unsqueeze(1)
        mu_i = means.double()
        total = float(sum(counts))
        mean = (n_i * mu_i).sum(0) / total
        m2 = (n_i * variances.double()).sum(0) + (n_i * (mu_i - mean) ** 2).sum(0)
        self._update_running(mean, m2 / (total - 1))


ROWS_MIN_LENGTH = 8
"""Positions per channel from which the row reductions use torch's BN kernels (CPU, CUDA).

Measured (2 threads, forward+backward against nn.BatchNorm*, kernels / composite):
(64, 64, 28, 28) 1.08x / 1.41x; (512, 256, 8) 1.11x / 1.36x; (512, 256, 4) 1.12x / 0.92x;
(4096, 1024), one position, 10.7x / 2.3x (the kernels' cost per row dominates)."""


class _Chunks:
    """A batch's chunks as at most two groups of equal chunks: k of v samples, then one of
    ``tail`` (0: none). A (N, C, L) tensor is seen group by group as (m, size, C, L) views,
    and a (K, C) per-chunk value as (m, 1, C, 1), so per-chunk work broadcasts without
    gathering anything per sample."""

    def __init__(self, n: int, v: int, k: int, tail: int) -> None:
        self.groups = [(0, k * v, k, v)] if k else []  # (first sample, end, chunks, size)
        if tail:
            self.groups.append((k * v, n, 1, tail))
        self.sizes = [v] * k + ([tail] if tail else [])

    def views(self, t: Tensor) -> list[Tensor]:
        """(N, C, ...) as one (m, size, C, ...) view per group."""
        return [t[a:b].view(m, size, *t.shape[1:]) for a, b, m, size in self.groups]

    def per_chunk(self, values: Tensor, ndim: int = 4) -> list[Tensor]:
        """(K, C) as one (m, 1, C, 1, ...) view per group (``ndim`` dimensions)."""
        out, j = [], 0
        for _, _, m, _ in self.groups:
            out.append(values[j:j + m].view(m, 1, -1, *([1] * (ndim - 3))))
            j += m
        return out

    def sum(self, per_sample: Tensor) -> Tensor:
        """(N, C) summed over each chunk's samples: (K, C)."""
        parts = [g.sum(1) for g in self.views(per_sample)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def row_values(self, values: Tensor) -> Tensor:
        """(K, C) repeated for each sample: (N, C)."""
        parts = [g.expand(-1, size, -1).reshape(-1, g.shape[2])
                 for g, (_, _, _, size) in zip(self.per_chunk(values, 3), self.groups,
                                               strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _use_kernels(x3: Tensor) -> bool:
    return x3.shape[2] >= ROWS_MIN_LENGTH and x3.device.type in ("cpu", "cuda")


def _chunk_moments(x3: Tensor, chunks: _Chunks, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each chunk's per-channel mean and biased variance: two (K, C) tensors in ``acc``."""
    n, c, length = x3.shape
    if _use_kernels(x3):
        # Each (sample, channel) row's mean and variance from torch's BN statistics kernel
        # on the (1, N·C, L) view (no copy), merged per chunk exactly (Chan).
        row_mean, row_var = torch.batch_norm_update_stats(
            x3.view(1, n * c, length), None, None, 0.0)
        row_mean, row_var = row_mean.view(n, c).to(acc), row_var.view(n, c).to(acc)
        size = row_mean.new_tensor(chunks.sizes).unsqueeze(1)
        mean = chunks.sum(row_mean) / size
        spread = [(g - mu).square().sum(1) for g, mu in
                  zip(chunks.views(row_mean), chunks.per_chunk(mean, 3), strict=True)]
        return mean, (chunks.sum(row_var) + torch.cat(spread)) / size
    # Few positions: two passes over each group, reducing over samples and positions.
    means, variances = [], []
    for g in chunks.views(x3):
        mu = g.mean((1, 3), keepdim=True, dtype=acc)
        means.append(mu.view(-1, c))
        variances.append((g - mu).square_().mean((1, 3), dtype=acc))
    return torch.cat(means), torch.cat(variances)


def _chunk_grad_sums(dy3: Tensor, x3: Tensor, mean: Tensor, chunks: _Chunks
                     ) -> tuple[Tensor, Tensor]:
    """Each chunk's per-channel Σdy and Σdy·(x − μ): two (K, C) tensors in mean's dtype."""
    n, c, length = x3.shape
    acc = mean.dtype
    if _use_kernels(x3):
        # torch's BN backward kernel, given μ as each row's mean and 1 as its invstd:
        # grad_weight is Σdy·(x − μ) and grad_bias Σdy per row, in one pass over x and dy.
        mu = chunks.row_values(mean).to(x3.dtype).reshape(-1)
        _, dot, total = bn_backward(
            dy3.view(1, n * c, length), x3.view(1, n * c, length), None, None, None, mu,
            torch.ones_like(mu), True, 0.0, [False, True, True])
        return chunks.sum(total.view(n, c).to(acc)), chunks.sum(dot.view(n, c).to(acc))
    sums, dots = [], []
    for dg, xg, mu in zip(chunks.views(dy3), chunks.views(x3),
                          chunks.per_chunk(mean.to(x3.dtype)), strict=True):
        sums.append(dg.sum((1, 3), dtype=acc))
        dots.append((xg - mu).mul_(dg).sum((1, 3), dtype=acc))
    return torch.cat(sums), torch.cat(dots)


def _broadcast_affine(t3: Tensor, a: Tensor, b: Tensor, chunks: _Chunks) -> Tensor:
    """A new ``t3·a + b`` with per-chunk (K, C) coefficients, group by group."""
    out = torch.empty_like(t3)
    for tg, og, ag, bg in zip(chunks.views(t3), chunks.views(out),
                              chunks.per_chunk(a.to(t3.dtype)), chunks.per_chunk(b.to(t3.dtype)),
                              strict=True):
        torch.addcmul(bg, tg, ag, out=og)
    return out


def _rows(x: Tensor) -> Tensor:
    """x as (N, C, L) in the accumulation dtype: a view of a contiguous float32/float64
    input; a copy for channels-last and other strides, and for half precision (normalised
    in float32, as torch's BN does, and rounded once at the end)."""
    n, c = x.shape[0], x.shape[1]
    return x.detach().contiguous().view(n, c, -1).to(accumulation_dtype(x.dtype))


def _like_input(t3: Tensor, x: Tensor) -> Tensor:
    """A (N, C, L) result as x's shape, dtype and memory format (channels-last kept, as
    torch's BN keeps it)."""
    t = t3.view(x.shape).to(x.dtype)
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == ndim and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return t.contiguous(memory_format=fmt)
    return t


class _GhostFunction(torch.autograd.Function):
    """Ghost BN from per-chunk statistics, without copying or gathering per sample.

    Forward: chunk j's mean μ_j and biased variance σ_j² (:func:`_chunk_moments`); then
    y = x·scale + shift with scale = γ/sqrt(σ_j² + eps), shift = β − μ_j·scale.

    Backward: each chunk's Σdy and Σdy·(x − μ_j) (:func:`_chunk_grad_sums`) give dγ, dβ
    and dx = a·dy + b·x + c with per-chunk a, b, c. Under ``create_graph=True`` the
    gradients are taken through :func:`_ghost_differentiable`, the same maths in
    differentiable ops.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, chunks: _Chunks,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x3 = _rows(x)
        mean, var = _chunk_moments(x3, chunks, x3.dtype)
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.to(x3.dtype)
        shift = -mean * scale if bias is None else bias.to(x3.dtype) - mean * scale
        y = _broadcast_affine(x3, scale, shift, chunks)
        # x3 is returned only so that setup_context can keep it without a second copy.
        return _like_input(y, x), mean, var, x3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, weight, bias, chunks, eps = inputs
        _, mean, var, x3 = output
        invstd = (var + eps).rsqrt()
        ctx.save_for_backward(x, x3, weight, bias, mean, invstd)
        ctx.save_for_forward(x, x3, weight, mean, invstd)
        ctx.eps, ctx.chunks = eps, chunks
        ctx.mark_non_differentiable(mean, var, x3)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_constants: Any) -> tuple[Any, ...]:
        x, x3, weight, bias, mean, invstd = ctx.saved_tensors
        chunks: _Chunks = ctx.chunks
        if torch.is_grad_enabled():  # create_graph=True: differentiate a differentiable form
            first = differentiable_grads(
                lambda: _ghost_differentiable(x, weight, bias, chunks, ctx.eps),
                (x, weight, bias), ctx.needs_input_grad[:3], dy)
            return (*first, None, None)
        n, c = x.shape[0], x.shape[1]
        dy3 = dy.contiguous().view(n, c, -1).to(x3.dtype)
        sum_dy, sum_dy_xmu = _chunk_grad_sums(dy3, x3, mean, chunks)
        m = mean.new_tensor(chunks.sizes).unsqueeze(1) * x3.shape[2]  # values per chunk
        # dx = γ·invstd·(dy − Σdy/m − (x − μ)·invstd²·Σdy(x − μ)/m) = a·dy + b·x + c
        a = invstd if weight is None else invstd * weight.to(invstd.dtype)
        b = -a * invstd.square() * sum_dy_xmu / m
        cc = -a * sum_dy / m - b * mean
        dx = _broadcast_affine(dy3, a, cc, chunks)
        for dg, xg, bg in zip(chunks.views(dx), chunks.views(x3),
                              chunks.per_chunk(b.to(x3.dtype)), strict=True):
            dg.addcmul_(xg, bg)
        dweight = (sum_dy_xmu * invstd).sum(0).to(weight.dtype) if weight is not None else None
        dbias = sum_dy.sum(0).to(bias.dtype) if bias is not None else None
        return _like_input(dx, x), dweight, dbias, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *_constant_tangents: Any) -> tuple[Tensor, None, None, None]:
        """Forward-mode AD, with x̂ = (x − μ_j)·invstd_j and E the mean over chunk j::

            x̂' = invstd_j·(x' − E[x'] − x̂·E[x̂·x']),    y' = γ·x̂' + γ'·x̂ + β'
        """
        x, x3, weight, mean, invstd = ctx.saved_tensors
        chunks: _Chunks = ctx.chunks
        n, c = x3.shape[0], x3.shape[1]
        xt3 = None if x_t is None else x_t.contiguous().view(n, c, -1).to(x3.dtype)
        tangent_views = [None] * len(chunks.groups) if xt3 is None else chunks.views(xt3)
        parts = []
        for xg, tg, mu, inv in zip(chunks.views(x3), tangent_views, chunks.per_chunk(mean),
                                   chunks.per_chunk(invstd), strict=True):
            xhat = (xg - mu) * inv
            part = torch.zeros_like(xhat)
            if tg is not None:
                xhat_t = (tg - tg.mean((1, 3), keepdim=True)
                          - xhat * (xhat * tg).mean((1, 3), keepdim=True)) * inv
                part = part + (xhat_t if weight is None
                               else xhat_t * weight.to(x3.dtype).view(c, 1))
            if weight_t is not None:
                part = part + xhat * weight_t.to(x3.dtype).view(c, 1)
            if bias_t is not None:
                part = part + bias_t.to(x3.dtype).view(c, 1)
            parts.append(part.reshape(-1, c, x3.shape[2]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return _like_input(out, x), None, None, None


def _ghost_differentiable(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                          chunks: _Chunks, eps: float) -> Tensor:
    """Ghost BN's forward written with differentiable ops (two-pass, group by group)."""
    n, c = x.shape[0], x.shape[1]
    outs = []
    for g in chunks.views(x.reshape(n, c, -1)):
        mu = g.mean((1, 3), keepdim=True)
        centred = g - mu
        var = centred.square().mean((1, 3), keepdim=True)
        outs.append((centred * (var + eps).rsqrt()).reshape(-1, c, g.shape[3]))
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    if weight is not None:
        y = y * weight.view(1, c, 1)
    if bias is not None:
        y = y + bias.view(1, c, 1)
    return y.view(x.shape)


def _doc(dim: int) -> str:
    return rank_doc(_DOC, dim, f"GhostBatchNorm{dim}d", example=_EXAMPLES[dim])


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = _doc(1)
    _ranks, _shape_text = RANKS[1]


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = _doc(2)
    _ranks, _shape_text = RANKS[2]


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = _doc(3)
    _ranks, _shape_text = RANKS[3]


__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_chunks"]
