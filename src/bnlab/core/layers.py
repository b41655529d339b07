"""The minimal layers to train an MLP from scratch, with the batch norm classes' protocol.

Every layer has ``forward(x)`` / ``layer(x)``, ``backward(dy) -> dx`` (which fills
``grads``), ``params()`` (the arrays an optimizer updates in place), ``state_dict()`` /
``load_state_dict()`` under PyTorch's keys, and ``train()`` / ``eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from bnlab.core._module import Module
from bnlab.core._state import checked_arrays
from bnlab.core.functional import check_float_array

_S = TypeVar("_S", bound="Sequential")

__all__ = [
    "SGD",
    "Dropout",
    "Layer",
    "Linear",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "softmax_cross_entropy",
]


@runtime_checkable
class Layer(Protocol):
    training: bool
    grads: dict[str, np.ndarray]

    def forward(self, x: np.ndarray) -> np.ndarray: ...
    def __call__(self, x: np.ndarray) -> np.ndarray: ...
    def backward(self, dy: np.ndarray) -> np.ndarray: ...
    def params(self) -> dict[str, np.ndarray]: ...
    def state_dict(self) -> dict[str, np.ndarray]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...


class _Module(Module):
    """A layer that keeps what its forward saw (input or output) for its backward."""

    def __init__(self) -> None:
        super().__init__()
        self._saved: np.ndarray | None = None

    def _saved_for(self, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        dy = check_float_array(dy, "dy")
        if dy.shape != self._saved.shape and not isinstance(self, Linear):
            raise ValueError(
                f"{type(self).__name__}.backward: dy has shape {dy.shape}, expected "
                f"{self._saved.shape} (the output of the last forward)"
            )
        return dy, self._saved


class Linear(_Module):
    """``y = x · weightᵀ + bias`` over the last axis, initialised like ``torch.nn.Linear``.

    weight (out_features, in_features) and bias (out_features,) are drawn from
    U(−1/sqrt(in_features), 1/sqrt(in_features)): torch's kaiming_uniform(a=sqrt(5)) for the
    weight and its fan-in bound for the bias. ``rng``: a ``np.random.Generator`` or seed.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Any = np.float32,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = gen.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        self.bias = gen.uniform(-bound, bound, out_features).astype(dtype) if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_float_array(x, "input")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear({self.in_features}, {self.out_features}) expected input with "
                f"{self.in_features} features on the last axis, got shape {x.shape}"
            )
        self._saved = x
        y = x @ self.weight.T.astype(x.dtype, copy=False)
        if self.bias is not None:
            y += self.bias.astype(x.dtype, copy=False)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dy, x = self._saved_for(dy)
        if dy.shape != (*x.shape[:-1], self.out_features):
            raise ValueError(
                f"Linear.backward: dy has shape {dy.shape}, expected "
                f"{(*x.shape[:-1], self.out_features)}"
            )
        dy2 = dy.reshape(-1, self.out_features)
        self.grads = {"weight": (dy2.T @ x.reshape(-1, self.in_features)).astype(self.weight.dtype)}
        if self.bias is not None:
            self.grads["bias"] = dy2.sum(axis=0).astype(self.bias.dtype)
        return dy @ self.weight.astype(dy.dtype, copy=False)

    def params(self) -> dict[str, np.ndarray]:
        p = {"weight": self.weight}
        if self.bias is not None:
            p["bias"] = self.bias
        return p


class ReLU(_Module):
    """``y = max(x, 0)``; the gradient is 0 where x <= 0 (as torch)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_float_array(x, "input")
        self._saved = x
        return np.maximum(x, 0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dy, x = self._saved_for(dy)
        return np.where(x > 0, dy, 0).astype(dy.dtype, copy=False)


class Sigmoid(_Module):
    """``y = 1 / (1 + exp(−x))``, computed without overflow; ``dx = dy · y · (1 − y)``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_float_array(x, "input")
        z = np.exp(-np.abs(x))  # never overflows: exp of a non-positive number
        y = np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z)).astype(x.dtype, copy=False)
        self._saved = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dy, y = self._saved_for(dy)
        return dy * y * (1 - y)


class Dropout(_Module):
    """Zero each value with probability ``p`` in training and scale the rest by 1/(1 − p).

    Eval is the identity. ``rng`` (a Generator or a seed) makes the masks reproducible.
    """

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator | int | None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_float_array(x, "input")
        if not self.training or self.p == 0.0:
            self._mask = np.ones((), dtype=x.dtype)
        elif self.p == 1.0:
            self._mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            keep = self.rng.random(x.shape) >= self.p
            self._mask = keep.astype(x.dtype) / x.dtype.type(1.0 - self.p)
        self._saved = x
        return x * self._mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dy, _ = self._saved_for(dy)
        if self._mask is None:
            raise RuntimeError("Dropout.backward() called before forward()")
        return dy * self._mask


class Sequential(Module):
    """Layers applied in order; parameters and state under torch-style keys ``"0.weight"``.

    ``forward(x, record=True)`` keeps every layer's output in ``outputs`` (the input to a
    sigmoid is ``outputs[i - 1]`` for ``layers[i]``), for looking inside a network.
    """

    def __init__(self, *layers: Any) -> None:
        # Module.__init__ is not called: it would assign ``grads``, which here is the
        # layers' gradients, read-only.
        self.training = True
        self.layers: list[Any] = list(layers)
        self.outputs: list[np.ndarray] = []

    def forward(self, x: np.ndarray, *, record: bool = False) -> np.ndarray:
        self.outputs = []
        for layer in self.layers:
            x = layer(x)
            if record:
                self.outputs.append(x)
        return x

    def __call__(self, x: np.ndarray, *, record: bool = False) -> np.ndarray:
        return self.forward(x, record=record)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def _named(self, what: str) -> dict[str, np.ndarray]:
        return {
            f"{i}.{k}": v
            for i, layer in enumerate(self.layers)
            for k, v in getattr(layer, what)().items()
        }

    def params(self) -> dict[str, np.ndarray]:
        return self._named("params")

    @property
    def grads(self) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Every layer's gradients under the state-dict keys (a read-only view)."""
        return {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.grads.items()
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        return self._named("state_dict")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check every key and shape first, then load each layer (all or nothing)."""
        arrays = checked_arrays("Sequential", state, self.state_dict())
        for i, layer in enumerate(self.layers):
            prefix = f"{i}."
            own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            layer.load_state_dict(own)

    def train(self: _S, mode: bool = True) -> _S:
        super().train(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Any:
        return self.layers[i]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and d loss / d logits.

    ``loss = mean_i(logsumexp(logits_i) − logits_i[label_i])``;
    ``dlogits = (softmax(logits) − onehot(labels)) / N``. Like ``torch.nn.CrossEntropyLoss``.
    """
    logits = check_float_array(logits, "logits")
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, classes), got {logits.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
    k = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"labels must be in [0, {k}), got values in [{labels.min()}, {labels.max()}]"
        )
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp never overflows
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    rows = np.arange(logits.shape[0])
    loss = float(-log_probs[rows, labels].mean())
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= logits.shape[0]
    return loss, dlogits


def _leaf_layers(model: Any) -> Iterator[Any]:
    if hasattr(model, "layers"):
        for layer in model.layers:
            yield from _leaf_layers(layer)
    elif isinstance(model, (list, tuple)):
        for layer in model:
            yield from _leaf_layers(layer)
    else:
        yield model


class SGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) over every layer's ``params()``::

        g ← grad + weight_decay · p;   buf ← g (first step) or momentum · buf + g;
        p ← p − lr · (buf if momentum else g)

    Parameters are updated in place; a parameter without a gradient is skipped.
    """

    def __init__(
        self,
        layers_or_model: Any | Sequence[Any] | Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.layers = list(_leaf_layers(layers_or_model))
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._buffers: dict[tuple[int, str], np.ndarray] = {}

    def step(self) -> None:
        for layer in self.layers:
            for name, p in layer.params().items():
                grad = layer.grads.get(name)
                if grad is None:
                    continue
                g = grad + self.weight_decay * p if self.weight_decay else grad
                if self.momentum:
                    key = (id(layer), name)
                    buf = self._buffers.get(key)
                    if buf is None:
                        buf = self._buffers[key] = np.array(g, copy=True)
                    else:
                        buf *= self.momentum
                        buf += g
                    g = buf
                p -= self.lr * g

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.grads = {}
