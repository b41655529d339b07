"""Noisy batch norm (Santurkar et al. 2018, §2.1): BN followed, in training only, by a
random per-channel scale and shift whose distribution itself changes at every step.

Training, one forward = one step; ``a`` = ``noise_mean``, ``v`` = ``noise_var``, C channels::

    y0 = BN(x)                                        (torch's BatchNorm, unchanged)
    m_γ ~ U(1 − a, 1 + a),  m_β ~ U(−a, a)            this step's means of the noise
    s²_γ ~ U(0, v),         s²_β ~ U(0, v)            this step's variances of the noise
    γ_c ~ N(m_γ, s²_γ),     β_c ~ N(m_β, s²_β)        one scale and shift per channel
    y = γ_c · y0 + β_c

so the distribution the next layer sees moves from step to step even though BN has just
normalised it. With ``a = v = 0`` every γ_c is exactly 1 and every β_c exactly 0: the
layer is ``nn.BatchNorm{1,2,3}d`` bit for bit (outputs and gradients). The noise is a
constant of the step (no gradient flows into it).

Eval: plain BatchNorm with the running statistics (no noise). The state dict is BN's.

The noise comes from the layer's own ``torch.Generator`` (never from
torch's global generator, so the noise changes neither the initialisation nor anything else
a run draws); :func:`reseed_noise` gives every noisy layer of a model its own stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _NoisyBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The noise, added to one of torch's BatchNorm classes (see the module docstring).

    Args: ``num_features``, torch's BatchNorm options, ``noise_mean`` (a, default 0.5) and
    ``noise_var`` (v, default 0.5). The layer's generator starts from seed 0;
    :func:`reseed_noise` (which :func:`bnlab.train.build` calls with the run's seed) or
    ``layer.generator.manual_seed`` gives it another.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 noise_mean: float = 0.5, noise_var: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        for name, value in (("noise_mean", noise_mean), ("noise_var", noise_var)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"noisy_bn: {name} must be a number >= 0, got {value!r}")
        self.noise_mean = float(noise_mean)
        self.noise_var = float(noise_var)
        self.generator = torch.Generator().manual_seed(0)

    def noise(self) -> tuple[Tensor, Tensor]:
        """One step's per-channel scale γ and shift β, (C,) each, float64 on the CPU."""
        a, v, g = self.noise_mean, self.noise_var, self.generator
        u = torch.rand(4, generator=g, dtype=torch.float64)
        z = torch.randn(2, self.num_features, generator=g, dtype=torch.float64)
        scale = 1.0 + a * (2.0 * u[0] - 1.0) + torch.sqrt(v * u[2]) * z[0]
        shift = a * (2.0 * u[1] - 1.0) + torch.sqrt(v * u[3]) * z[1]
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if not self.training:
            return out
        scale, shift = self.noise()
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out * scale.to(out).view(shape) + shift.to(out).view(shape)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise_mean={self.noise_mean}, "
                f"noise_var={self.noise_var}")


class NoisyBatchNorm1d(_NoisyBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` followed by per-step noise in training (:mod:`bnlab.nn.noisy`)."""


class NoisyBatchNorm2d(_NoisyBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by per-step noise in training (:mod:`bnlab.nn.noisy`)."""


class NoisyBatchNorm3d(_NoisyBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` followed by per-step noise in training (:mod:`bnlab.nn.noisy`)."""


NOISY_CLASSES: dict[int, type[_NoisyBatchNorm]] = {
    1: NoisyBatchNorm1d, 2: NoisyBatchNorm2d, 3: NoisyBatchNorm3d,
}


def reseed_noise(model: nn.Module, seed: int) -> int:
    """Seed the k-th noisy layer of ``model`` (in ``modules()`` order) with
    ``seed * 1000 + k``, so that each layer draws its own noise and a run is
    deterministic for ``seed``; returns the number of noisy layers."""
    layers = [m for m in model.modules() if isinstance(m, _NoisyBatchNorm)]
    for k, layer in enumerate(layers):
        layer.generator.manual_seed(int(seed) * 1000 + k)
    return len(layers)
