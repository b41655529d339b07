"""Batch normalization from scratch in NumPy, with exactly PyTorch's semantics.

NumPy only: importing this package never imports torch.

- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: the layers.
- :mod:`bnlab.core.functional`: the math as three functions (forward and the running
  statistics update are pure; backward spends the forward's cache), for any rank with
  channels on axis 1.
- :class:`Linear`, :class:`ReLU`, :class:`Sigmoid`, :class:`Dropout`, :class:`Sequential`,
  :func:`softmax_cross_entropy`, :class:`SGD`: enough to train an MLP from scratch. Every
  layer derives from one small base (mode, gradients, parameters, state dict).
- :func:`set_num_threads` / :func:`get_num_threads`: threads used by the kernels.
"""

from bnlab.core import functional
from bnlab.core._threads import get_num_threads, set_num_threads
from bnlab.core.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.core.layers import (
    SGD,
    Dropout,
    Layer,
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    softmax_cross_entropy,
)

__all__ = [
    "SGD",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Layer",
    "Linear",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "functional",
    "get_num_threads",
    "set_num_threads",
    "softmax_cross_entropy",
]
