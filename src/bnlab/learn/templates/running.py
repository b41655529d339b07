# bnlab exercise: running
"""Batch norm, the running statistics that inference uses.

Complete both functions and grade them with ``bnlab learn check FILE``.

During training a BN layer keeps running averages of the batch statistics, with
PyTorch's convention (momentum is the share of the new batch, default 0.1)::

    running_mean ← (1 − momentum) · running_mean + momentum · mean
    running_var  ← (1 − momentum) · running_var  + momentum · var · N / (N − 1)

``var · N/(N − 1)`` is the unbiased variance of the batch: the layer normalises with the
biased one but stores the unbiased one. ``torch.nn.BatchNorm1d`` starts with
running_mean = 0 and running_var = 1.
"""

import numpy as np


def init_running_stats(num_features):
    """Return (running_mean, running_var), each of shape (num_features,), as torch starts."""
    raise NotImplementedError("init_running_stats")


def update_running_stats(running_mean, running_var, x, momentum=0.1):
    """Return (new_running_mean, new_running_var) after the training batch x (N, D)."""
    raise NotImplementedError("update_running_stats")
