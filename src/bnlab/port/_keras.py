"""Keras 3 side: ``keras.layers.BatchNormalization`` (any backend; TensorFlow not needed).

Keras' ``momentum`` is the old value's share (0.99 ↔ torch's 0.01), its default ``epsilon``
is 1e-3, its running variance tracks the biased batch variance, and ``center``/``scale``
replace torch's ``affine``. Keras has no counter, no cumulative average and no
``track_running_stats=False``. :func:`unbiased_class` gives ``UnbiasedBatchNormalization``:
the same layer with torch's variance update (batch variance × n/(n−1)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bnlab.errors import BnlabError
from bnlab.port._deps import check_float64, require
from bnlab.port._state import (
    BNState,
    check_same_estimator,
    cumulative_message,
    decay,
    momentum_from_decay,
    warn,
)

_UNBIASED: list[type] = []


def unbiased_class() -> type:
    """``UnbiasedBatchNormalization``: Keras BN whose moving variance tracks torch's estimator."""
    if _UNBIASED:
        return _UNBIASED[0]
    keras = require("keras")
    ops = keras.ops

    base: Any = keras.layers.BatchNormalization

    @keras.saving.register_keras_serializable(package="bnlab")
    class UnbiasedBatchNormalization(base):
        """``BatchNormalization`` whose moving variance tracks the unbiased batch variance.

        In training the moving variance adds ``var_batch · n/(n−1)`` (n = values per channel
        in the batch), as PyTorch's running_var does; normalisation uses the biased
        variance, as both frameworks do. Everything else is Keras' layer.
        """

        def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if not (training and self.trainable):
                return super().call(inputs, training=training, mask=mask)
            if mask is not None or self.renorm:
                raise ValueError("UnbiasedBatchNormalization supports neither mask nor renorm")
            x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
            n = math.prod(int(x.shape[a]) for a in self._reduction_axes)
            if n < 2:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input shape "
                    f"{tuple(x.shape)} (the unbiased variance needs n >= 2)"
                )
            mean, variance = self._moments(x, None)
            d = self.momentum
            mm = ops.cast(self.moving_mean, x.dtype)
            mv = ops.cast(self.moving_variance, x.dtype)
            self.moving_mean.assign(mm * d + mean * (1.0 - d))
            self.moving_variance.assign(mv * d + variance * (n / (n - 1)) * (1.0 - d))
            gamma = ops.cast(self.gamma, x.dtype) if self.scale else None
            beta = ops.cast(self.beta, x.dtype) if self.center else None
            out = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta,
                                          scale=gamma, epsilon=self.epsilon)
            return ops.cast(out, self.compute_dtype)

    _UNBIASED.append(UnbiasedBatchNormalization)
    return UnbiasedBatchNormalization


def is_keras_bn(obj: Any) -> bool:
    keras = require("keras")
    return isinstance(obj, keras.layers.BatchNormalization)


def variance_update_of(layer: Any) -> str:
    return "unbiased" if _UNBIASED and isinstance(layer, _UNBIASED[0]) else "biased"


def _np(var: Any) -> np.ndarray:
    keras = require("keras")
    return np.array(keras.ops.convert_to_numpy(var.value), copy=True)


def _check_built(layer: Any, label: str) -> None:
    if not layer.built or layer.moving_mean is None:
        raise BnlabError(f"{label}: the Keras layer is not built yet (call it on an input "
                         "or layer.build(input_shape) first)")


def from_keras(layer: Any) -> BNState:
    """Read a built ``keras.layers.BatchNormalization``."""
    if not is_keras_bn(layer):
        raise BnlabError(f"expected keras.layers.BatchNormalization, got {type(layer).__name__}")
    _check_built(layer, layer.name)
    if layer.renorm:
        warn(f"{layer.name}: Keras batch renorm trains with renormalised statistics: the "
             "converted layer is plain batch norm, exact in eval but not in training")
    return BNState(
        weight=_np(layer.gamma) if layer.scale else None,
        bias=_np(layer.beta) if layer.center else None,
        mean=_np(layer.moving_mean),
        var=_np(layer.moving_variance),
        eps=float(layer.epsilon),
        momentum=momentum_from_decay(layer.momentum),
        num_batches_tracked=None,
        variance_update=variance_update_of(layer),
        source=f"Keras {type(layer).__name__}",
    )


def _keras_momentum(state: BNState) -> float:
    if state.momentum is None:
        m, msg = cumulative_message(state, "Keras")
        warn(msg)
        return decay(m)
    return decay(state.momentum)


def load_keras(layer: Any, state: BNState, *, name: str = "") -> None:
    """Write ``state`` into a built Keras BatchNormalization (in place)."""
    label = name or getattr(layer, "name", "layer")
    if not is_keras_bn(layer):
        raise BnlabError(f"{label}: expected keras.layers.BatchNormalization, got "
                         f"{type(layer).__name__}")
    _check_built(layer, label)
    if not state.tracks_stats:
        raise BnlabError(
            f"{label}: the state keeps no running statistics (track_running_stats=False: "
            "batch statistics in eval too), which Keras' BatchNormalization cannot express: "
            "its inference always uses the moving statistics"
        )
    assert state.mean is not None and state.var is not None  # for mypy: tracks_stats
    c = int(layer.moving_mean.shape[0])
    if c != state.num_features:
        raise BnlabError(f"{label}: has {c} channels, the state {state.num_features}")
    w, b = state.filled()
    for present, arr, what, flag in ((layer.scale, w, "scale", "weight"),
                                     (layer.center, b, "offset", "bias")):
        identity = 1 if what == "scale" else 0
        if not present and not np.all(arr == identity):
            raise BnlabError(f"{label}: the Keras layer has no {what} "
                             f"({'scale' if what == 'scale' else 'center'}=False) but the "
                             f"state's {flag} is not {identity}")
    if np.dtype(state.dtype) == np.float64 and \
            require("keras").backend.result_type("float64", "float32") != "float64":
        warn(f"{label}: Keras' BatchNormalization computes in float32 whatever its dtype "
             "(keras.backend.result_type('float64', 'float32') is 'float32'): a float64 "
             "state keeps its values, but outputs and updates are float32-accurate (~1e-7)")
    momentum = _keras_momentum(state)
    if layer.scale:
        layer.gamma.assign(w.astype(layer.gamma.dtype))
    if layer.center:
        layer.beta.assign(b.astype(layer.beta.dtype))
    layer.moving_mean.assign(np.asarray(state.mean, layer.moving_mean.dtype))
    layer.moving_variance.assign(np.asarray(state.var, layer.moving_variance.dtype))
    layer.epsilon = float(state.eps)
    layer.momentum = float(momentum)
    check_same_estimator(state, f"Keras {type(layer).__name__}", variance_update_of(layer))


def to_keras(state: BNState, *, axis: int = -1, rank: int = 4,
             update_rule: str = "source") -> Any:
    """A new, built Keras BatchNormalization holding ``state`` (channels on ``axis``).

    ``rank`` is the input rank it is built for (2 for (N, C); 4 for images). With
    ``update_rule="source"`` (default) a state from torch (unbiased variance update) gives
    ``UnbiasedBatchNormalization``, so continued training matches torch's; ``"target"``
    gives Keras' own layer and warns.
    """
    keras = require("keras")
    if update_rule not in ("source", "target"):
        raise BnlabError(f"update_rule must be 'source' or 'target', got {update_rule!r}")
    if not state.tracks_stats:
        raise BnlabError(
            "track_running_stats=False (batch statistics in eval too) has no Keras "
            "equivalent: BatchNormalization's inference always uses the moving statistics"
        )
    dtype = np.dtype(state.dtype).name
    if keras.backend.backend() == "jax":
        check_float64("Keras", dtype)
    cls = (unbiased_class() if update_rule == "source" and state.variance_update == "unbiased"
           else keras.layers.BatchNormalization)
    # momentum (and the cumulative-average warning) are set by load_keras below.
    layer = cls(axis=axis, epsilon=state.eps, center=state.bias is not None,
                scale=state.weight is not None, dtype=dtype)
    shape: list[int | None] = [None] * rank
    shape[axis] = state.num_features
    layer.build(tuple(shape))
    load_keras(layer, state)
    return layer
