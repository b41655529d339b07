"""Per-channel moments of BN inputs, merged exactly: the statistics recalibration, gradient
accumulation and the doctor compute.

A :class:`Moments` holds, per channel (axis 1), the count ``n``, the ``mean`` and
``m2`` = Σ(x − mean)², in float64. Two of them merge with Chan, Golub & LeVeque's pairwise
update: with δ = mean_b − mean_a and n = n_a + n_b, mean = mean_a + δ·n_b/n and
M2 = M2_a + M2_b + δ²·n_a·n_b/n. Exact for any counts, and free of the cancellation of the
Σx² − n·mean² form. :class:`StopForward` ends a measuring forward at the measured layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from bnlab.nn._base import channel_view, reduce_dims

_FAST_DTYPES = (torch.float32, torch.float64)
_FAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Moments:
    """Per-channel count ``n``, ``mean`` and ``m2`` = Σ(x − mean)² (float64, detached or not)."""

    n: int
    mean: Tensor
    m2: Tensor

    @staticmethod
    def of(x: Tensor) -> Moments:
        """The moments of ``x`` over every axis except 1, in float64 (two passes; as
        differentiable as ``x``)."""
        x = x.double()
        dims = reduce_dims(x)
        mean = x.mean(dim=dims)
        m2 = ((x - channel_view(mean, x.dim())) ** 2).sum(dim=dims)
        return Moments(x.numel() // x.shape[1], mean, m2)

    @staticmethod
    def measure(x: Tensor) -> Moments:
        """The moments of ``x.detach()``, fast: torch's BN statistics kernel for contiguous
        float32/float64 inputs on CPU or CUDA, else :meth:`of`.

        torch's kernel computes the mean and biased variance in two passes over x, without
        copies (measured on (512, 32, 28, 28) float32 with mean 3, std 0.5: relative error
        8e-8, i.e. float32 rounding; 10x faster than :meth:`of`). It is less accurate on
        channels-last (5e-5 relative), so any other layout or dtype (channels-last,
        float16, ...) takes the float64 two passes.
        """
        x = x.detach()
        if x.is_contiguous() and x.dtype in _FAST_DTYPES and x.device.type in _FAST_DEVICES:
            n = x.numel() // x.shape[1]
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return Moments(n, mean.double(), var.double() * n)
        return Moments.of(x)

    def merge(self, other: Moments) -> Moments:
        """Chan's pairwise update: exact for any counts, no Σx² − n·mean² cancellation."""
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> Tensor:
        """Biased variance (the one BN normalises with)."""
        return self.m2 / self.n


def merge_all(parts: Iterable[Moments]) -> Moments:
    """The moments of the concatenation of everything ``parts`` describe."""
    it = iter(parts)
    try:
        total = next(it)
    except StopIteration:
        raise ValueError("no statistics to merge") from None
    for m in it:
        total = total.merge(m)
    return total



class StopForward(BaseException):
    """Raised by a hook once its layer's input is measured, to skip the rest of the forward
    (the measuring pass suppresses it). A BaseException, so that a model's own
    ``except Exception`` lets it through."""
