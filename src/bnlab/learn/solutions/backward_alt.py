# bnlab exercise: backward_alt
"""Reference solution: the simplified backward pass."""

import numpy as np


def batchnorm_backward_alt(dout, x, gamma, eps=1e-5):
    mean, var = x.mean(axis=0), x.var(axis=0)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dx = gamma * inv * (dout - dout.mean(axis=0) - xhat * (dout * xhat).mean(axis=0))
    return dx, dgamma, dbeta
