# bnlab exercise: backward
"""Batch norm, the backward pass in training mode, step by step.

Complete ``batchnorm_backward`` and grade it with ``bnlab learn check FILE``.

Recompute the forward pass from x as a chain of small steps (mean, centred x, variance,
1/sqrt(var + eps), xhat, out = gamma · xhat + beta), then walk it backwards, one local
derivative at a time, summing the gradient of every quantity used more than once (the
mean and the variance both depend on x). Check yourself numerically first:
(f(x + h) − f(x − h)) / 2h with f = Σ dout · out.

dgamma = Σ_i dout · xhat and dbeta = Σ_i dout (sums over the batch, shape (D,)).
"""

import numpy as np


def batchnorm_backward(dout, x, gamma, eps=1e-5):
    """Return (dx, dgamma, dbeta) for out = batchnorm_forward(x, gamma, beta, eps)."""
    raise NotImplementedError("batchnorm_backward")
