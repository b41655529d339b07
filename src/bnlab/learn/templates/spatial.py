# bnlab exercise: spatial
"""Spatial (2-D) batch norm: what torch.nn.BatchNorm2d computes in training mode.

Complete ``spatial_batchnorm_forward`` and grade it with ``bnlab learn check FILE``.

For x of shape (N, C, H, W) every channel c has one mean and one (biased) variance,
taken over all N · H · W values it has in the batch: a feature map shares its
normalisation across positions, as it shares its convolution weights. gamma and beta
have shape (C,).
"""

import numpy as np


def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Return out, of x's shape (N, C, H, W)."""
    raise NotImplementedError("spatial_batchnorm_forward")
