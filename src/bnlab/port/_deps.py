"""Lazy imports of the optional frameworks: a missing one is a one-line BnlabError."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from bnlab.errors import BnlabError

EXTRA_HINT = "pip install 'bnlab[port]'"


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"keras"``, ``"flax.linen"``) or say which extra provides it."""
    if module.split(".")[0] == "keras":
        # Keras 3 picks its backend once, at import; TensorFlow is not part of the extra.
        os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BnlabError(
            f"bnlab.port needs {module.split('.')[0]} ({exc.msg}): {EXTRA_HINT}"
        ) from None


def jax_float64_ok() -> bool:
    jax = require("jax")
    return bool(jax.config.jax_enable_x64)


def check_float64(framework: str, dtype: Any) -> None:
    """JAX computes in float32 unless x64 is enabled: refuse float64 rather than downcast."""
    import numpy as np

    if np.dtype(dtype) == np.float64 and not jax_float64_ok():
        raise BnlabError(
            f"{framework} in float64 needs JAX's 64-bit mode "
            "(jax.config.update('jax_enable_x64', True)); without it the state would be "
            "silently cast to float32"
        )
