"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017) for inputs of any rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bnlab.nn._base import RANKS, GuardedBatchNorm, differentiable_grads, rank_doc

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

    Vectorised: there is no Python loop over chunks. With at least 8 positions per channel
    (L = H·W, D·H·W or the length), every (sample, channel) row's mean and variance come
    from one call of torch's BN statistics kernel, are merged into each chunk's statistics
    exactly (Chan's formula), and one broadcast multiply-add normalises the whole batch;
    backward reduces Σdy and Σdy·(x − μ_chunk) per row in one call of torch's BN backward
    kernel. A contiguous input is never copied, so a training step costs about what
    ``nn.BatchNorm{dim}d`` costs (a channels-last input is copied once). With fewer
    positions (BatchNorm1d on (N, C), say) the equal chunks are instead rearranged to
    (V, k·C, ...) and normalised in one call of torch's BN kernel, the odd last chunk in a
    second (also on devices other than CPU and CUDA, whose kernels the first route needs).
    Both routes give the same numbers (tested to 1e-10 in float64), and both support double
    backward (``create_graph=True``).

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
        if not self.training:
            # Eval without running statistics: the whole batch's statistics, as torch does
            # (ghost batches are a training-time regulariser; eval never chunks).
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        n, c = x.shape[0], self.num_features
        per_sample = x[0].numel() // c if n else 0
        v = self.virtual_batch_size
        k, tail = ghost_chunks(n, v)
        smallest = n if v >= n else (min(v, tail) if tail else v)
        if self._small_batch(x, smallest * per_sample):
            return self._eval_forward(x)
        if v >= n:
            k, v = 1, n  # one chunk: exactly BatchNorm
        if per_sample >= ROWS_MIN_LENGTH and x.device.type in ("cpu", "cuda"):
            chunk = _chunk_ids(n, v, k + (1 if tail else 0), x.device)
            out, means, variances = _GhostRows.apply(x, self.weight, self.bias, chunk, self.eps,
                                                     (v, k, tail))
        else:
            out, means, variances = _ghost_by_rearranging(
                x, self.weight, self.bias, v, k, tail, self.eps)
        sizes = [v] * k + ([tail] if tail else [])
        if self.track_running_stats:
            with torch.no_grad():
                self._update_from_chunks(means, variances, [s * per_sample for s in sizes])
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
"""Positions per channel from which the row-statistics route is used (see the class doc).

Measured (2 threads, forward+backward against nn.BatchNorm*): the row route is 1.1x on
(64, 64, 28, 28) against 2.2x by rearranging, and equal at 4 positions; on (4096, 1024) (one
position) the per-row kernel overhead makes it 9x against 2.1x."""

_bn_backward = torch.ops.aten.native_batch_norm_backward


def _chunk_ids(n: int, v: int, num_chunks: int, device: Any) -> Tensor:
    """Each sample's chunk: consecutive runs of v, the last chunk taking any leftover."""
    return (torch.arange(n, device=device) // v).clamp_(max=num_chunks - 1)


def _per_sample(per_chunk: Tensor, chunk: Tensor, dtype: torch.dtype) -> Tensor:
    """(K, C) per-chunk values as (N, C, 1) in ``dtype``, to broadcast over each sample's
    positions."""
    return per_chunk.index_select(0, chunk).unsqueeze(2).to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and per-chunk coefficients of float16/bfloat16 inputs are kept in float32
    (as torch's BN keeps its statistics); the elementwise passes stay in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_sum(per_row: Tensor, chunk: Tensor, num_chunks: int) -> Tensor:
    """Sum (N, C) per-sample values over each chunk's samples: (K, C)."""
    out = per_row.new_zeros(num_chunks, per_row.shape[1])
    return out.index_add_(0, chunk, per_row)


class _GhostRows(torch.autograd.Function):
    """Ghost BN from per-(sample, channel) row statistics, for contiguous (N, C, L) views.

    Forward: each row's mean m_r and biased variance s_r over its L positions (torch's BN
    statistics kernel on the (1, N·C, L) view, no copy); chunk j's mean and variance are
    μ_j = mean of its rows' m_r and σ_j² = mean of s_r + mean of (m_r − μ_j)² (exact); then
    y = x·scale + shift with scale = γ/sqrt(σ_j² + eps), shift = β − μ_j·scale per sample.

    Backward: torch's BN backward kernel on the same view, given μ_j as each row's mean and
    1 as its invstd, returns each row's Σdy and Σdy·(x − μ_j) in one pass; summed per chunk
    they give dγ, dβ and dx = a·dy + b·x + c with per-chunk a, b, c. Under
    ``create_graph=True`` the gradients are instead taken through the rearranging route, so
    double backward is exact too.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                chunk: Tensor, eps: float, layout: tuple[int, int, int]
                ) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        x3 = x.contiguous().view(n, c, -1)  # channels-last and other strides: one copy
        num_chunks = layout[1] + (1 if layout[2] else 0)
        acc = _accumulation_dtype(x.dtype)
        size = torch.bincount(chunk, minlength=num_chunks).to(acc).unsqueeze(1)
        row_mean, row_var = torch.batch_norm_update_stats(
            x3.view(1, n * c, -1), None, None, 0.0)
        row_mean, row_var = row_mean.view(n, c).to(acc), row_var.view(n, c).to(acc)
        mean = _chunk_sum(row_mean, chunk, num_chunks) / size
        spread = (row_mean - mean.index_select(0, chunk)).square_()
        var = _chunk_sum(row_var + spread, chunk, num_chunks) / size
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        y = torch.addcmul(_per_sample(shift, chunk, x.dtype), x3,
                          _per_sample(scale, chunk, x.dtype))
        ctx.save_for_backward(x, x3, weight, bias, chunk, mean, invstd, size)
        ctx.eps, ctx.layout = eps, layout  # (v, k, tail) of ghost_chunks, for double backward
        ctx.mark_non_differentiable(mean, var)
        return y.view(x.shape), mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Any, _dvar: Any) -> tuple[Any, ...]:
        x, x3, weight, bias, chunk, mean, invstd, size = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a differentiable form
            v, k, tail = ctx.layout
            first = differentiable_grads(
                lambda: _ghost_by_rearranging(x, weight, bias, v, k, tail, ctx.eps)[0],
                (x, weight, bias), ctx.needs_input_grad[:3], dy)
            return (*first, None, None, None)
        n, c = x.shape[0], x.shape[1]
        dy3 = dy.contiguous().view(n, c, -1)
        num_chunks = mean.shape[0]
        row_mu = mean.index_select(0, chunk).reshape(-1).to(x.dtype)
        _, row_dot, row_sum = _bn_backward(
            dy3.view(1, n * c, -1), x3.view(1, n * c, -1), None, None, None, row_mu,
            torch.ones_like(row_mu), True, 0.0, [False, True, True])
        acc = mean.dtype
        sum_dy = _chunk_sum(row_sum.view(n, c).to(acc), chunk, num_chunks)
        sum_dy_xmu = _chunk_sum(row_dot.view(n, c).to(acc), chunk, num_chunks)
        m = size * x3.shape[2]  # values per chunk and channel
        # dx = γ·invstd·(dy − Σdy/m − (x − μ)·invstd²·Σdy(x − μ)/m) = a·dy + b·x + c
        a = invstd if weight is None else invstd * weight
        b = -a * invstd.square() * sum_dy_xmu / m
        cc = -a * sum_dy / m - b * mean
        dx = torch.addcmul(_per_sample(cc, chunk, x.dtype), dy3, _per_sample(a, chunk, x.dtype))
        dx.addcmul_(x3, _per_sample(b, chunk, x.dtype))
        dweight = (sum_dy_xmu * invstd).sum(0).to(weight.dtype) if weight is not None else None
        dbias = sum_dy.sum(0).to(bias.dtype) if bias is not None else None
        return dx.view(x.shape), dweight, dbias, None, None, None


def _ghost_by_rearranging(x: Tensor, weight: Tensor | None, bias: Tensor | None, v: int,
                          k: int, tail: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost BN from differentiable ops: k chunks of v, then one of ``tail`` (0: none).

    Returns (output, per-chunk means, per-chunk biased variances).
    """
    groups: list[Tensor] = []
    if not tail:
        # No slicing: autograd's backward of x[:n] allocates a zero tensor of x's size
        # and copies the gradient into it, an extra two passes over memory.
        groups.append(x.reshape(k, v, *x.shape[1:]))
    else:
        if k:
            groups.append(x[: k * v].reshape(k, v, *x.shape[1:]))
        groups.append(x[k * v :].unsqueeze(0))
    outs, means, variances = [], [], []
    for xg in groups:  # at most two vectorised groups, never one per chunk
        out, mean, var = _normalise_equal_chunks(xg, weight, bias, eps)
        outs.append(out)
        means.append(mean)
        variances.append(var)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out, torch.cat(means), torch.cat(variances)


def _normalise_equal_chunks(xg: Tensor, weight: Tensor | None, bias: Tensor | None,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise m equal chunks (m, size, C, ...) at once; (output, means, biased vars).

    (m, size, C, ...) is rearranged to (size, m·C, ...): chunk j's channel c becomes
    channel j·C + c of one batch, and torch's own BatchNorm kernel (with γ, β repeated
    m times) normalises every chunk in one call. This costs a transpose copy in and out
    (none for m = 1). The kernel returns each chunk's mean and 1/sqrt(σ² + eps); σ² is
    recovered as invstd⁻² − eps (clamped at 0) for the running statistics.
    """
    m, size, c = xg.shape[0], xg.shape[1], xg.shape[2]
    spatial = xg.shape[3:]
    xt = xg.transpose(0, 1).reshape(size, m * c, *spatial)
    w = weight.repeat(m) if weight is not None else None
    b = bias.repeat(m) if bias is not None else None
    out, mean, invstd = torch.native_batch_norm(xt, w, b, None, None, True, 0.0, eps)
    out = out.view(size, m, c, *spatial).transpose(0, 1).reshape(m * size, c, *spatial)
    with torch.no_grad():
        var = (invstd.double().pow(-2) - eps).clamp_min(0.0).view(m, c)
    return out, mean.detach().view(m, c), var


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
