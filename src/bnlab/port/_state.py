"""One batch-norm layer's state in framework-neutral form, and the conventions that differ.

Every adapter reads a layer into a :class:`BNState` and builds or loads a layer from one.
The state uses PyTorch's conventions (bnlab's: STYLE §5), whatever framework it came from:

* ``momentum`` is the share the new batch gets: ``running ← (1 − m)·running + m·batch``.
  Keras', Flax' and ONNX's ``momentum`` is the share the *old* value keeps, ``1 − m``.
  ``None`` is PyTorch's cumulative average (factor ``1 / num_batches_tracked``).
* ``var`` is the stored running variance, used as it is in eval by every framework: a
  conversion copies it unchanged (no n/(n−1) factor; the conformance tests prove it).
* ``variance_update`` is what the running variance *tracks* in training: ``"unbiased"``
  (PyTorch adds the batch variance times n/(n−1), n = values per channel in the batch)
  or ``"biased"`` (Keras, Flax and ONNX Runtime add the batch variance itself), or ``None``
  for a layer that never trains (an ONNX eval graph). It only matters for continued
  training, and it is the one convention no momentum can fix.
* ``weight``/``bias`` are ``None`` when the layer has no scale/offset (affine off);
  ``mean``/``var`` are ``None`` when it keeps no statistics (``track_running_stats=False``:
  batch statistics in eval too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from bnlab.errors import BnlabError

VARIANCE_UPDATES = ("unbiased", "biased")


class PortWarning(UserWarning):
    """A conversion that is not exact: the message names the quantity and its error."""


@dataclass
class BNState:
    """A batch-norm layer's parameters, statistics and hyperparameters (torch's conventions).

    Attributes:
        weight, bias: the scale γ and offset β, shape (C,), or None when absent.
        mean, var: the running mean and variance (C,), or None when not tracked.
        eps: added to the variance before the square root.
        momentum: the new batch's share in the running average (torch's), or None for a
            cumulative average.
        num_batches_tracked: training steps counted (None when the framework keeps no count).
        variance_update: ``"unbiased"`` or ``"biased"``: the batch variance the running
            variance tracks in training; None when the source has no training rule.
        source: where the state came from (framework and layer), for messages.
    """

    weight: np.ndarray | None
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    eps: float = 1e-5
    momentum: float | None = 0.1
    num_batches_tracked: int | None = None
    variance_update: str | None = "unbiased"
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        arrays = {k: v for k, v in self.arrays().items() if v is not None}
        if not arrays:
            raise BnlabError("a BN state needs at least one of weight, bias, mean, var")
        shapes = {k: np.shape(v) for k, v in arrays.items()}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
            raise BnlabError(f"BN state arrays must all have shape (C,), got {shapes}")
        if (self.mean is None) != (self.var is None):
            raise BnlabError("a BN state has both running mean and variance, or neither")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise BnlabError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise BnlabError(
                f"momentum (torch's convention: the new batch's share) must be in [0, 1] or "
                f"None, got {self.momentum!r}"
            )
        if self.variance_update is not None and self.variance_update not in VARIANCE_UPDATES:
            raise BnlabError(
                f"variance_update must be one of {VARIANCE_UPDATES}, got {self.variance_update!r}"
            )

    def arrays(self) -> dict[str, np.ndarray | None]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "var": self.var}

    @property
    def num_features(self) -> int:
        return int(next(np.shape(v)[0] for v in self.arrays().values() if v is not None))

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*(v for v in self.arrays().values() if v is not None))

    @property
    def tracks_stats(self) -> bool:
        return self.mean is not None

    @property
    def affine(self) -> bool:
        return self.weight is not None or self.bias is not None

    def filled(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) with the identity (ones, zeros) where the layer has none."""
        c, dt = self.num_features, self.dtype
        w = np.ones(c, dt) if self.weight is None else np.asarray(self.weight)
        b = np.zeros(c, dt) if self.bias is None else np.asarray(self.bias)
        return w, b


def decay(momentum: float) -> float:
    """Keras', Flax' and ONNX's ``momentum`` (the old value's share) from torch's."""
    return 1.0 - momentum


def momentum_from_decay(value: float) -> float:
    """torch's momentum (the new batch's share) from Keras', Flax' or ONNX's."""
    return 1.0 - float(value)


def warn(message: str) -> None:
    warnings.warn(message, PortWarning, stacklevel=3)


def variance_update_message(state: BNState, target: str, target_update: str) -> str | None:
    """The warning for continued training when the two variance estimators differ."""
    if state.variance_update in (None, target_update) or not state.tracks_stats:
        return None
    m = state.momentum
    m_txt = "the cumulative factor" if m is None else f"momentum {m:g}"
    return (
        f"running variance in continued training: {target} adds the {target_update} batch "
        f"variance, {state.source or 'the source'} the {state.variance_update} one (they "
        f"differ by the factor n/(n-1), n = values per channel in a batch); eval is exact, "
        f"but after t further training steps at {m_txt} the running variances differ by "
        f"up to (1-(1-m)^t)/(n-1) relative, 1/n at steady state (0.78% for n = 128). "
        f"bnlab.port's {'Unbiased' if state.variance_update == 'unbiased' else 'Biased'}* "
        f"layers reproduce the source's rule exactly"
    )


def cumulative_message(state: BNState, target: str) -> tuple[float, str]:
    """(constant momentum to use, warning) for a cumulative average in a framework without one.

    The next training step of the source would use the factor 1/(N+1) (N batches tracked);
    the constant momentum reproduces that step and drifts after it.
    """
    n = state.num_batches_tracked or 0
    m = 1.0 / (n + 1)
    t = 100
    kept_const, kept_cum = (1 - m) ** t, n / (n + t)
    return m, (
        f"momentum=None (a cumulative average over num_batches_tracked={n} batches) has no "
        f"equivalent in {target}, whose momentum is constant: converted with torch-momentum "
        f"{m:g} (1/(N+1), exact for the next step only); after t further steps the weight on "
        f"the converted statistics is (1-m)^t instead of N/(N+t) (t=100: {kept_const:.4g} vs "
        f"{kept_cum:.4g}). Eval is exact"
    )


def check_same_estimator(state: BNState, target: str, target_update: str) -> None:
    msg = variance_update_message(state, target, target_update)
    if msg is not None:
        warn(msg)
