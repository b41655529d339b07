"""Flax side: ``flax.linen.BatchNorm`` (module + variables) and ``flax.nnx.BatchNorm``.

Flax' ``momentum`` is the old value's share (0.99 ↔ torch's 0.01), its default epsilon
1e-5, its running variance tracks the biased batch variance; ``use_scale``/``use_bias``
replace torch's ``affine``, and ``use_running_average=False`` fixed in the constructor is
torch's ``track_running_stats=False`` (batch statistics in eval too). A linen layer's state
is the pair ``(module, {"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}})``.
:func:`unbiased_linen` gives ``UnbiasedBatchNorm``: linen's layer with torch's variance
update (batch variance × n/(n−1)), same fields and variables.
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


def unbiased_linen() -> type:
    """``UnbiasedBatchNorm``: a linen BatchNorm whose running variance tracks torch's estimator."""
    if _UNBIASED:
        return _UNBIASED[0]
    linen = require("flax.linen")
    jnp = require("jax.numpy")

    base: Any = linen.Module

    class UnbiasedBatchNorm(base):
        """``flax.linen.BatchNorm`` with PyTorch's running-variance update.

        Normalises like linen's layer (biased batch variance in training, the running
        statistics when ``use_running_average``), with the same variables
        (``params``: scale, bias; ``batch_stats``: mean, var); in training the running
        variance adds ``var_batch · n/(n−1)`` (n = values per channel), as torch's does.
        Statistics are two-pass, in at least float32.
        """

        use_running_average: bool | None = None
        axis: int = -1
        momentum: float = 0.99
        epsilon: float = 1e-5
        dtype: Any = None
        param_dtype: Any = jnp.float32
        use_bias: bool = True
        use_scale: bool = True

        @linen.compact
        def __call__(self, x: Any, use_running_average: bool | None = None) -> Any:
            use_ra = linen.merge_param("use_running_average", self.use_running_average,
                                       use_running_average)
            axis = self.axis % x.ndim
            c = x.shape[axis]
            red = tuple(i for i in range(x.ndim) if i != axis)
            shape = [1] * x.ndim
            shape[axis] = c
            ra_mean = self.variable("batch_stats", "mean",
                                    lambda: jnp.zeros((c,), self.param_dtype))
            ra_var = self.variable("batch_stats", "var",
                                   lambda: jnp.ones((c,), self.param_dtype))
            compute = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32),
                                        self.param_dtype)
            xs = jnp.asarray(x, compute)
            if use_ra:
                mean, var = ra_mean.value.astype(compute), ra_var.value.astype(compute)
            else:
                mean = jnp.mean(xs, axis=red)
                var = jnp.mean(jnp.square(xs - mean.reshape(shape)), axis=red)
                if not self.is_initializing():
                    n = math.prod(x.shape[i] for i in red)
                    if n < 2:
                        raise ValueError("Expected more than 1 value per channel when "
                                         f"training, got input shape {x.shape}")
                    d = self.momentum
                    ra_mean.value = (d * ra_mean.value + (1 - d) * mean).astype(
                        self.param_dtype)
                    ra_var.value = (d * ra_var.value + (1 - d) * var * (n / (n - 1))).astype(
                        self.param_dtype)
            y = (xs - mean.reshape(shape)) * jnp.reciprocal(
                jnp.sqrt(var.reshape(shape) + self.epsilon))
            if self.use_scale:
                scale = self.param("scale", linen.initializers.ones, (c,), self.param_dtype)
                y = y * scale.reshape(shape)
            if self.use_bias:
                bias = self.param("bias", linen.initializers.zeros, (c,), self.param_dtype)
                y = y + bias.reshape(shape)
            out_dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
            return jnp.asarray(y, out_dtype)

    _UNBIASED.append(UnbiasedBatchNorm)
    return UnbiasedBatchNorm


def is_linen_bn(obj: Any) -> bool:
    linen = require("flax.linen")
    return isinstance(obj, linen.BatchNorm) or bool(_UNBIASED and isinstance(obj, _UNBIASED[0]))


def variance_update_of(module: Any) -> str:
    return "unbiased" if _UNBIASED and isinstance(module, _UNBIASED[0]) else "biased"


def _np(a: Any) -> np.ndarray:
    return np.array(a, copy=True)


def from_flax(module: Any, variables: Any) -> BNState:
    """Read a linen BatchNorm from its module and its own variables (params, batch_stats)."""
    if not is_linen_bn(module):
        raise BnlabError(f"expected flax.linen.BatchNorm, got {type(module).__name__}")
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    if "mean" not in stats or "var" not in stats:
        raise BnlabError("flax BatchNorm variables need batch_stats/mean and batch_stats/var")
    tracks = module.use_running_average is not False
    if getattr(module, "axis_name", None) is not None:
        warn(f"{module.name}: axis_name={module.axis_name!r} averages statistics across "
             "devices in training: the converted layer does not")
    return BNState(
        weight=_np(params["scale"]) if module.use_scale else None,
        bias=_np(params["bias"]) if module.use_bias else None,
        mean=_np(stats["mean"]) if tracks else None,
        var=_np(stats["var"]) if tracks else None,
        eps=float(module.epsilon),
        momentum=momentum_from_decay(module.momentum),
        variance_update=variance_update_of(module),
        source=f"Flax {type(module).__name__}",
    )


def _flax_momentum(state: BNState, target: str) -> float:
    if state.momentum is None:
        m, msg = cumulative_message(state, target)
        warn(msg)
        return decay(m)
    return decay(state.momentum)


def _check_identity_affine(module: Any, w: np.ndarray, b: np.ndarray, says: str) -> None:
    """A Flax BN without scale (bias) can hold only a scale of 1 (offset of 0)."""
    for present, arr, flag, identity in ((module.use_scale, w, "use_scale", 1),
                                         (module.use_bias, b, "use_bias", 0)):
        if not present and not np.all(arr == identity):
            raise BnlabError(f"{says} {flag}=False but the state's values are not {identity}")


def layer_variables(module: Any, state: BNState, *, label: str = "") -> dict[str, Any]:
    """The variables ``{"params", "batch_stats"}`` of ``module`` holding ``state``.

    Checks that the module's hyperparameters (which a linen module fixes) match the state.
    """
    jnp = require("jax.numpy")
    label = label or module.name or type(module).__name__
    if not is_linen_bn(module):
        raise BnlabError(f"{label}: expected flax.linen.BatchNorm, got {type(module).__name__}")
    check_float64("Flax", state.dtype)
    if module.epsilon != state.eps:
        raise BnlabError(f"{label}: the Flax module has epsilon={module.epsilon:g}, the "
                         f"state eps={state.eps:g} (rebuild the module with epsilon="
                         f"{state.eps:g}: eval would differ)")
    want = _flax_momentum(state, "Flax")
    if not math.isclose(module.momentum, want, rel_tol=1e-12, abs_tol=1e-15):
        warn(f"{label}: the Flax module has momentum={module.momentum:g} (old value's share); "
             f"the state needs {want:g} (torch momentum {1 - want:g}): continued training "
             "differs, eval is exact")
    tracks = module.use_running_average is not False
    if tracks != state.tracks_stats:
        raise BnlabError(
            f"{label}: use_running_average={module.use_running_average} but the state "
            f"{'has' if state.tracks_stats else 'has no'} running statistics (Flax expresses "
            "track_running_stats=False as use_running_average=False in the constructor)"
        )
    w, b = state.filled()
    _check_identity_affine(module, w, b, f"{label}: the Flax module has")
    pdt = state.dtype
    params: dict[str, Any] = {}
    if module.use_scale:
        params["scale"] = jnp.asarray(w, pdt)
    if module.use_bias:
        params["bias"] = jnp.asarray(b, pdt)
    c = state.num_features
    stats = {"mean": jnp.zeros((c,), pdt), "var": jnp.ones((c,), pdt)}
    if state.tracks_stats:
        stats = {"mean": jnp.asarray(state.mean, pdt), "var": jnp.asarray(state.var, pdt)}
    check_same_estimator(state, f"Flax {type(module).__name__}", variance_update_of(module))
    out: dict[str, Any] = {"batch_stats": stats}
    if params:
        out["params"] = params
    return out


def to_flax(state: BNState, *, axis: int = -1, update_rule: str = "source") -> tuple[Any, Any]:
    """``(module, variables)``: a linen BatchNorm holding ``state`` (channels on ``axis``).

    Call it as ``module.apply(variables, x, use_running_average=...)`` (with
    ``mutable=["batch_stats"]`` in training). ``update_rule="source"`` (default) gives
    ``UnbiasedBatchNorm`` for a torch state so that continued training matches torch's;
    ``"target"`` gives linen's own layer and warns. A state without running statistics
    gives ``use_running_average=False``: batch statistics in eval, as torch's.
    """
    linen = require("flax.linen")
    if update_rule not in ("source", "target"):
        raise BnlabError(f"update_rule must be 'source' or 'target', got {update_rule!r}")
    cls = (unbiased_linen() if update_rule == "source" and state.variance_update == "unbiased"
           else linen.BatchNorm)
    # The module fixes its momentum; layer_variables below warns once when it is inexact.
    m = cumulative_message(state, "Flax")[0] if state.momentum is None else state.momentum
    momentum = decay(m)
    module = cls(use_running_average=None if state.tracks_stats else False, axis=axis,
                 momentum=momentum, epsilon=state.eps, use_bias=state.bias is not None,
                 use_scale=state.weight is not None, param_dtype=state.dtype)
    return module, layer_variables(module, state)


# --------------------------------------------------------------------------- nnx


def is_nnx_bn(obj: Any) -> bool:
    try:
        nnx = require("flax.nnx")
    except BnlabError:
        return False
    return isinstance(obj, nnx.BatchNorm)


def _get(v: Any) -> np.ndarray:
    return np.array(v.get_value() if hasattr(v, "get_value") else v.value, copy=True)


def from_nnx(bn: Any) -> BNState:
    """Read a ``flax.nnx.BatchNorm``."""
    if not is_nnx_bn(bn):
        raise BnlabError(f"expected flax.nnx.BatchNorm, got {type(bn).__name__}")
    tracks = bn.use_running_average is not False
    return BNState(
        weight=_get(bn.scale) if bn.use_scale else None,
        bias=_get(bn.bias) if bn.use_bias else None,
        mean=_get(bn.mean) if tracks else None,
        var=_get(bn.var) if tracks else None,
        eps=float(bn.epsilon),
        momentum=momentum_from_decay(bn.momentum),
        variance_update="biased",
        source="Flax nnx.BatchNorm",
    )


def _set(v: Any, value: Any) -> None:
    if hasattr(v, "set_value"):
        v.set_value(value)
    else:
        v.value = value


def load_nnx(bn: Any, state: BNState, *, name: str = "") -> None:
    """Write ``state`` into a ``flax.nnx.BatchNorm`` (in place)."""
    jnp = require("jax.numpy")
    label = name or "nnx.BatchNorm"
    if not is_nnx_bn(bn):
        raise BnlabError(f"{label}: expected flax.nnx.BatchNorm, got {type(bn).__name__}")
    check_float64("Flax nnx", state.dtype)
    if int(bn.num_features) != state.num_features:
        raise BnlabError(f"{label}: has {bn.num_features} channels, the state "
                         f"{state.num_features}")
    w, b = state.filled()
    _check_identity_affine(bn, w, b, f"{label}: use")
    momentum = _flax_momentum(state, "Flax nnx")
    dt = state.dtype
    if bn.use_scale:
        _set(bn.scale, jnp.asarray(w, dt))
    if bn.use_bias:
        _set(bn.bias, jnp.asarray(b, dt))
    if state.tracks_stats:
        _set(bn.mean, jnp.asarray(state.mean, dt))
        _set(bn.var, jnp.asarray(state.var, dt))
    else:
        bn.use_running_average = False
    bn.epsilon = float(state.eps)
    bn.momentum = float(momentum)
    check_same_estimator(state, "Flax nnx.BatchNorm", "biased")


def to_nnx(state: BNState, *, axis: int = -1) -> Any:
    """A new ``flax.nnx.BatchNorm`` holding ``state`` (its variance update is Flax's)."""
    nnx = require("flax.nnx")
    bn = nnx.BatchNorm(state.num_features, axis=axis, use_bias=state.bias is not None,
                       use_scale=state.weight is not None, param_dtype=state.dtype,
                       rngs=nnx.Rngs(0))
    load_nnx(bn, state)
    return bn
