# bnlab exercise: backward
"""Reference solution: the backward pass through the computational graph, step by step."""

import numpy as np


def batchnorm_backward(dout, x, gamma, eps=1e-5):
    n = x.shape[0]
    # forward, one node at a time
    mean = x.sum(axis=0) / n
    xc = x - mean
    var = (xc**2).sum(axis=0) / n
    std = np.sqrt(var + eps)
    inv = 1.0 / std
    xhat = xc * inv
    # backward, in reverse order
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    dinv = (dxhat * xc).sum(axis=0)
    dxc = dxhat * inv
    dstd = -dinv / std**2
    dvar = dstd * 0.5 / std
    dxc += 2.0 * xc * dvar / n  # var = Σ xc² / n
    dmean = -dxc.sum(axis=0)
    dx = dxc + dmean / n  # mean = Σ x / n
    return dx, dgamma, dbeta
