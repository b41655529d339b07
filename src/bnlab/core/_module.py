"""The base of every core layer: the mode flag, the gradients, parameters and state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from bnlab.core._state import checked_arrays

__all__ = ["Module"]

_M = TypeVar("_M", bound="Module")


class Module:
    """``layer(x)`` runs ``forward``; ``backward(dy)`` fills ``grads``; ``train()`` /
    ``eval()`` set ``training``; ``params()`` are the arrays an optimizer updates in place,
    and ``state_dict()`` / ``load_state_dict()`` copy them under PyTorch's keys (a layer
    with buffers adds them)."""

    def __init__(self) -> None:
        self.training = True
        self.grads: dict[str, np.ndarray] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def train(self: _M, mode: bool = True) -> _M:
        self.training = bool(mode)
        return self

    def eval(self: _M) -> _M:
        return self.train(False)

    def params(self) -> dict[str, np.ndarray]:
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check every key and shape first, then copy in place (an optimizer's references to
        the arrays stay valid; values are cast to the layer's dtype)."""
        params = self.params()
        for key, value in checked_arrays(type(self).__name__, state, params).items():
            params[key][...] = value
