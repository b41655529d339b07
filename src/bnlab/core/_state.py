"""State-dict helpers shared by every layer: accept NumPy arrays or torch tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_keys", "checked_arrays", "to_numpy"]


def to_numpy(value: Any, what: str) -> np.ndarray:
    """``value`` (ndarray, torch tensor, number) as a NumPy array; torch is never imported."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, duck-typed
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what} must be a numeric array or tensor, got dtype {arr.dtype}")
    return arr


def check_keys(owner: str, state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse a state dict with missing or unexpected keys, naming both lists."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}.load_state_dict expected a mapping, got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{owner}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
            f"expected exactly {sorted(expected)}"
        )


def checked_arrays(
    owner: str, state: Mapping[str, Any], expected: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Validate keys and shapes of ``state`` against ``expected``; return NumPy arrays."""
    check_keys(owner, state, expected)
    arrays = {}
    for key, ref in expected.items():
        value = to_numpy(state[key], f"{owner}.load_state_dict[{key!r}]")
        if value.shape != ref.shape:
            raise ValueError(
                f"{owner}.load_state_dict: {key!r} has shape {value.shape}, expected {ref.shape}"
            )
        arrays[key] = value
    return arrays
