"""BatchNorm1d/2d/3d: thin classes over :mod:`bnlab.core.functional` holding the state.

Parameters (``weight``, ``bias``: what SGD updates) and buffers (``running_mean``,
``running_var``, ``num_batches_tracked``: what forward updates) live apart, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bnlab.core import functional as F
from bnlab.core._state import checked_arrays

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_DOC = r"""Batch normalization over {inputs}, from scratch in NumPy with PyTorch's semantics.

    Per channel c (statistics over the batch and every position)::

        training: y = (x − mean_c) / sqrt(var_c + eps) · weight_c + bias_c
                  with the batch mean and the *biased* batch variance, and then
                  running_mean ← (1 − momentum) · running_mean + momentum · mean_c
                  running_var  ← (1 − momentum) · running_var  + momentum · var_c · n/(n−1)
        eval:     the same y with running_mean / running_var (batch statistics when
                  track_running_stats=False)

    ``momentum`` is PyTorch's: the share the new batch gets (0.1), not Keras' 0.99 "decay";
    ``momentum=None`` is a cumulative average (factor 1 / num_batches_tracked).
    ``num_batches_tracked`` counts training calls when statistics are tracked.

    Args:
        num_features: C, the number of channels (axis 1).
        eps: added to the variance for stability (default 1e-5).
        momentum: running-average factor in [0, 1], or None (default 0.1).
        affine: learn ``weight`` (ones) and ``bias`` (zeros) (default True).
        track_running_stats: keep running statistics for eval (default True).
        dtype: dtype of parameters and buffers (default float32). float16 input is
            computed in float32 and returned as float16.

    Shapes: input {shapes}, output the same.

    Example::

        >>> import numpy as np
        >>> from bnlab.core import {name}
        >>> bn = {name}(3)
        >>> x = np.random.default_rng(0).normal(5.0, 2.0, size={example}).astype(np.float32)
        >>> y = bn(x)
        >>> bool(abs(y.mean()) < 1e-5)
        True
        >>> dx = bn.backward(np.ones_like(y))   # fills bn.grads["weight"], bn.grads["bias"]

    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.
    """


class _BatchNorm:
    _ranks: tuple[int, ...] = ()
    _shapes = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features <= 0:
            raise ValueError(f"num_features must be > 0, got {num_features}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        dt = np.dtype(dtype)
        if dt not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dt
        self.training = True
        self.weight: np.ndarray | None = np.ones(num_features, dt) if affine else None
        self.bias: np.ndarray | None = np.zeros(num_features, dt) if affine else None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: int | None = None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, dt)
            self.running_var = np.ones(num_features, dt)
            self.num_batches_tracked = 0
        self.grads: dict[str, np.ndarray] = {}
        self._cache: F.BatchNormCache | None = None

    # ----------------------------------------------------------------- forward / backward

    def _check_input(self, x: object) -> np.ndarray:
        arr = F.check_float_array(x, "input")
        name = type(self).__name__
        if arr.ndim not in self._ranks:
            raise ValueError(
                f"{name} expected {' or '.join(f'{r}D' for r in self._ranks)} input "
                f"{self._shapes}, got {arr.ndim}D input of shape {arr.shape}"
            )
        if arr.shape[1] != self.num_features:
            raise ValueError(
                f"{name}({self.num_features}) expected {self.num_features} channels on "
                f"axis 1, got input of shape {arr.shape}"
            )
        return arr

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise ``x``; in training, also update the running statistics (if tracked)."""
        x = self._check_input(x)
        use_batch_stats = self.training or self.running_mean is None
        y, cache = F.batch_norm_forward(
            x, self.weight, self.bias, eps=self.eps, training=use_batch_stats,
            running_mean=self.running_mean, running_var=self.running_var,
        )
        # Buffers change only after the forward succeeded (an error leaves everything as is).
        if self.training and self.track_running_stats:
            if self.running_mean is None or self.running_var is None:
                raise RuntimeError("running statistics are tracked but missing")
            self.num_batches_tracked = (self.num_batches_tracked or 0) + 1
            if cache.count:  # an empty batch is counted, its statistics unused (as torch)
                factor = 1.0 / self.num_batches_tracked if self.momentum is None \
                    else self.momentum
                new_mean, new_var = F.update_running_stats(
                    self.running_mean, self.running_var, cache.mean, cache.var_unbiased, factor
                )
                self.running_mean[...] = new_mean  # in place: references to the buffer stay
                self.running_var[...] = new_var  # valid
        self._cache = cache
        return y

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the last forward's input; fills ``grads`` (weight, bias)."""
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward(): run forward first"
            )
        dx, dweight, dbias = F.batch_norm_backward(dy, self._cache)
        self.grads = {} if dweight is None or dbias is None else {
            "weight": dweight, "bias": dbias
        }
        return dx

    # ----------------------------------------------------------------- mode and state

    def train(self, mode: bool = True) -> _BatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> _BatchNorm:
        return self.train(False)

    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays (what an optimizer updates in place)."""
        if self.weight is None or self.bias is None:
            return {}
        return {"weight": self.weight, "bias": self.bias}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of parameters and buffers under PyTorch's keys."""
        state = {k: v.copy() for k, v in self.params().items()}
        if self.running_mean is not None and self.running_var is not None:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load arrays or torch tensors under PyTorch's keys; all checked before any is set."""
        arrays = checked_arrays(type(self).__name__, state, self.state_dict())
        for key, value in arrays.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = int(value)
            else:
                getattr(self, key)[...] = value  # in place, cast to the layer's dtype

    def reset_running_stats(self) -> None:
        """running_mean 0, running_var 1, num_batches_tracked 0, in place (torch's method;
        nothing to reset without tracked statistics)."""
        if self.track_running_stats and self.running_mean is not None \
                and self.running_var is not None:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats})"
        )


def _make_doc(name: str, inputs: str, shapes: str, example: str) -> str:
    return _DOC.format(name=name, inputs=inputs, shapes=shapes, example=example)


class BatchNorm1d(_BatchNorm):
    __doc__ = _make_doc("BatchNorm1d", "(N, C) or (N, C, L) input", "(N, C) or (N, C, L)",
                        "(8, 3)")
    _ranks = (2, 3)
    _shapes = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    __doc__ = _make_doc("BatchNorm2d", "(N, C, H, W) input", "(N, C, H, W)", "(8, 3, 4, 4)")
    _ranks = (4,)
    _shapes = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    __doc__ = _make_doc("BatchNorm3d", "(N, C, D, H, W) input", "(N, C, D, H, W)",
                        "(8, 3, 2, 4, 4)")
    _ranks = (5,)
    _shapes = "(N, C, D, H, W)"
