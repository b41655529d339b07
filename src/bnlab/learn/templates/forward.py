# bnlab exercise: forward
"""Batch norm, the forward pass in training mode.

Complete ``batchnorm_forward`` and grade it with ``bnlab learn check FILE``.

For x of shape (N, D), each feature (column) d is normalised with the statistics of
the batch::

    mean_d = (1/N) Σ_i x[i, d]
    var_d  = (1/N) Σ_i (x[i, d] − mean_d)²        (the biased variance: ÷ N)
    xhat   = (x − mean) / sqrt(var + eps)
    out    = gamma · xhat + beta                  (gamma, beta: shape (D,))

This is what ``torch.nn.BatchNorm1d`` computes in training mode (Ioffe & Szegedy 2015,
Algorithm 1). Use NumPy only; the grader runs your function in its own process.
"""

import numpy as np


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Return out, of x's shape (N, D), normalised with the batch's mean and variance."""
    raise NotImplementedError("batchnorm_forward")
