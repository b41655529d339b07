# bnlab exercise: inference
"""Batch norm as a layer: training, running statistics, and inference with them.

Complete the class and grade it with ``bnlab learn check FILE``.

- ``__init__``: gamma = ones, beta = zeros, running_mean = zeros, running_var = ones,
  and the layer starts in training mode (``self.training = True``), like torch's.
- ``__call__(x)`` for x of shape (N, D):
    - training: normalise with the batch mean and the biased batch variance, then update
      the running statistics (PyTorch's momentum convention; the unbiased variance);
    - eval: normalise with running_mean and running_var, and change nothing.
- ``train()`` / ``eval()`` switch the mode (and return self).

The grader sets ``gamma`` and ``beta`` to its own arrays after construction.
"""

import numpy as np


class BatchNorm1d:
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps = eps
        self.momentum = momentum
        raise NotImplementedError("BatchNorm1d.__init__")

    def __call__(self, x):
        raise NotImplementedError("BatchNorm1d.__call__")

    def train(self):
        raise NotImplementedError("BatchNorm1d.train")

    def eval(self):
        raise NotImplementedError("BatchNorm1d.eval")
