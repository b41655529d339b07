"""bnlab.port: move batch-norm state between PyTorch, Keras 3, Flax and ONNX, exactly.

One layer at a time (``from_torch``/``to_keras``/…) or a whole model's BN layers by name
(:func:`convert_bn_layers`). Every convention is converted explicitly (see
:class:`BNState`): momentum direction (torch's ``m`` is Keras', Flax' and ONNX's ``1 − m``),
eps, the variance the running statistics track (torch: unbiased; the others: biased),
``momentum=None`` and the batch counter, affine off, tracking off, channel axis, dtype. What
cannot be exact raises a :class:`~bnlab.errors.BnlabError` or issues a
:class:`PortWarning` naming the quantity and its error.

The frameworks are the optional extra ``pip install 'bnlab[port]'`` (jax, flax, keras,
onnx, onnxruntime); each is imported only when a function needs it, and Keras gets the JAX
backend unless ``KERAS_BACKEND`` says otherwise. ``import bnlab.port`` needs NumPy only.

Layers that keep a source's training rule in another framework (built on first use):
``BiasedBatchNorm1d/2d/3d`` (torch, Keras'/Flax' variance update),
``UnbiasedBatchNormalization`` (Keras, torch's), ``UnbiasedBatchNorm`` (Flax linen, torch's).
"""

from __future__ import annotations

from typing import Any

from bnlab.port._deps import EXTRA_HINT, require
from bnlab.port._flax import from_flax, from_nnx, layer_variables, load_nnx, to_flax, to_nnx
from bnlab.port._keras import from_keras, load_keras, to_keras
from bnlab.port._model import (
    convert_bn_layers,
    framework_of,
    load_bn_layers,
    read_bn_layers,
)
from bnlab.port._onnx import bn_nodes, from_onnx, load_onnx, session, to_onnx
from bnlab.port._state import BNState, PortWarning
from bnlab.port._torch import from_torch, load_torch, to_torch

__all__ = [
    "EXTRA_HINT",
    "BNState",
    "PortWarning",
    "bn_nodes",
    "convert_bn_layers",
    "framework_of",
    "from_flax",
    "from_keras",
    "from_nnx",
    "from_onnx",
    "from_torch",
    "layer_variables",
    "load_bn_layers",
    "load_keras",
    "load_nnx",
    "load_onnx",
    "load_torch",
    "read_bn_layers",
    "require",
    "session",
    "to_flax",
    "to_keras",
    "to_nnx",
    "to_onnx",
    "to_torch",
]


def __getattr__(name: str) -> Any:
    if name in ("BiasedBatchNorm1d", "BiasedBatchNorm2d", "BiasedBatchNorm3d"):
        from bnlab.port._torch import biased_class

        return biased_class(int(name[-2]))
    if name == "UnbiasedBatchNormalization":
        from bnlab.port._keras import unbiased_class

        return unbiased_class()
    if name == "UnbiasedBatchNorm":
        from bnlab.port._flax import unbiased_linen

        return unbiased_linen()
    raise AttributeError(f"module 'bnlab.port' has no attribute {name!r}")
