# bnlab exercise: spatial
"""Reference solution: spatial batch norm, statistics per channel over N, H and W."""

import numpy as np


def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return gamma.reshape(1, -1, 1, 1) * xhat + beta.reshape(1, -1, 1, 1)
