"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017) for inputs of any rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bnlab.nn._base import RANKS, GuardedBatchNorm, rank_doc

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

    The chunks are normalised in at most two vectorised groups (the k' equal chunks in one
    call of torch's BatchNorm kernel on a (V, k'·C, ...) rearrangement, and the odd last
    chunk); there is no Python loop over chunks.

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
        groups: list[Tensor] = []
        if not tail:
            # No slicing: autograd's backward of x[:n] allocates a zero tensor of x's size
            # and copies the gradient into it, an extra two passes over memory.
            groups.append(x.view(k, v, *x.shape[1:]) if x.is_contiguous()
                          else x.reshape(k, v, *x.shape[1:]))
        else:
            if k:
                groups.append(x[: k * v].reshape(k, v, *x.shape[1:]))
            groups.append(x[k * v :].unsqueeze(0))
        outs, means, variances, counts = [], [], [], []
        for xg in groups:  # at most two vectorised groups, never one per chunk
            out, mean, var = self._normalise_chunks(xg)
            outs.append(out)
            means.append(mean)
            variances.append(var)
            counts.extend([xg.shape[1] * per_sample] * xg.shape[0])
        if self.track_running_stats:
            with torch.no_grad():
                self._update_from_chunks(torch.cat(means), torch.cat(variances), counts)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _normalise_chunks(self, xg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalise m equal chunks (m, size, C, ...) at once; (output, means, biased vars).

        (m, size, C, ...) is rearranged to (size, m·C, ...): chunk j's channel c becomes
        channel j·C + c of one batch, and torch's own BatchNorm kernel (with γ, β repeated
        m times) normalises every chunk in one call. This costs a transpose copy in and out
        (none for m = 1) and is much faster than composing the normalisation from
        elementwise ops. The kernel returns each chunk's mean and 1/sqrt(σ² + eps); σ² is
        recovered as invstd⁻² − eps (clamped at 0) for the running statistics.
        """
        m, size, c = xg.shape[0], xg.shape[1], self.num_features
        spatial = xg.shape[3:]
        xt = xg.transpose(0, 1).reshape(size, m * c, *spatial)
        weight = self.weight.repeat(m) if self.weight is not None else None
        bias = self.bias.repeat(m) if self.bias is not None else None
        out, mean, invstd = torch.native_batch_norm(
            xt, weight, bias, None, None, True, 0.0, self.eps
        )
        out = out.view(size, m, c, *spatial).transpose(0, 1).reshape(m * size, c, *spatial)
        with torch.no_grad():
            var = (invstd.double().pow(-2) - self.eps).clamp_min(0.0).view(m, c)
        return out, mean.detach().view(m, c), var

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
