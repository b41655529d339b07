r"""Batch normalization as three functions, for inputs of any rank with channels on axis 1.

:func:`batch_norm_forward` and :func:`update_running_stats` are pure (they return new
arrays and change nothing passed in). :func:`batch_norm_backward` spends a training cache:
it computes dx in the buffer the forward kept, so one forward serves one backward, as a
torch graph does (a second call raises).

For an input ``x`` of shape (N, C, *) every channel c is normalised over the N·M values it
has in the batch (M = product of the trailing sizes)::

    training:   mu_c = mean(x[:, c])         var_c = mean((x[:, c] - mu_c)²)  (biased)
    eval:       mu_c = running_mean[c]       var_c = running_var[c]
    both:       xhat = (x - mu_c) / sqrt(var_c + eps)
                y    = weight_c · xhat + bias_c

    backward (training, n = N·M):
        dbias  = Σ dy                dweight = Σ dy · xhat
        dx     = weight_c / sqrt(var_c + eps) · (dy − dbias/n − xhat · dweight/n)
    backward (eval):
        dx     = weight_c / sqrt(var_c + eps) · dy      (the statistics are constants)

    running update (PyTorch's convention, m = momentum, default 0.1):
        running_mean ← m · mu + (1 − m) · running_mean
        running_var  ← m · var · n/(n − 1) + (1 − m) · running_var      (unbiased)

Numerics, where they happen:

- Never ``E[x²] − E[x]²``: that difference cancels catastrophically when the mean is large
  against the spread (mean 1e4, std 1e-2 in float32 loses every digit). We centre first:
  ``d = x − k`` with ``k`` the mean of the first few samples (a shift close to the mean,
  read from a sliver of the batch), then ``mean = k + r`` and ``var = E[d²] − r²`` with
  ``r = E[d]`` small against the spread ("shifted data", Chan, Golub & LeVeque 1983). ``d``
  is exact in floating point when x is close to k, so nothing is lost to the offset.
- ``d`` (not xhat) is what forward keeps for backward: ``xhat = (d − r)·invstd`` is folded
  into per-channel coefficients, which saves a pass over the tensor each way.
- float16 input is computed in float32 (statistics and all), and the output is cast back to
  float16, like PyTorch's CPU and CUDA kernels.
- Everything else runs in the input's own dtype (float32 or float64).

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift", ICML 2015, Algorithm 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from bnlab.core import _kernels

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "compute_dtype",
    "update_running_stats",
]

FloatArray = NDArray[np.floating]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(kw_only=True)
class BatchNormCache:
    """What :func:`batch_norm_backward` needs from one forward call (and the batch stats).

    ``centred`` is ``d = x − shift`` as (N, C, M) when the batch statistics were used
    (``xhat = (d − residual)·invstd``); in eval, ``x`` itself is kept instead.
    """

    shape: tuple[int, ...]
    dtype: np.dtype  # the input's dtype: backward returns dx in it
    training: bool  # True: batch statistics (gradient flows through them)
    invstd: FloatArray  # (C,) 1 / sqrt(var + eps), compute dtype
    weight: FloatArray | None
    centred: FloatArray | None  # (N, C, M) d = x − shift, training only
    residual: FloatArray | None  # (C,) r = mean − shift, training only
    x: FloatArray | None  # (N, C, M), eval only
    mean: FloatArray  # (C,) the mean used (batch or running)
    var: FloatArray  # (C,) the variance used: biased batch variance, or running_var
    count: int  # n = N·M values per channel
    channels_last: bool = False  # arrays above are (N·M, C, 1): the input was channels-last

    @property
    def var_unbiased(self) -> FloatArray:
        """Bessel-corrected batch variance ``var · n / (n − 1)``: what running_var tracks."""
        return self.var * (self.count / (self.count - 1))


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the arithmetic runs in: float32 for float16 input, else the input's."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def check_float_array(x: object, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray of float16/32/64, or raise TypeError naming what it was."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {arr.dtype}"
        )
    return arr


def _is_channels_last(x: np.ndarray) -> bool:
    """True for channels-last memory seen as (N, C, *): e.g. NHWC data moved to NCHW."""
    return x.ndim > 2 and not x.flags.c_contiguous and np.moveaxis(x, 1, -1).flags.c_contiguous


def _as_ncm(x: np.ndarray, dtype: np.dtype, channels_last: bool) -> FloatArray:
    """(N, C, *) -> contiguous (N, C, M) in ``dtype``, a view when nothing needs to change.

    Channels-last data becomes (N·M, C, 1) instead (the statistics are over N and the
    positions alike), so it is normalised in place without a transposing copy.
    """
    if channels_last:
        last = np.ascontiguousarray(np.moveaxis(x, 1, -1), dtype=dtype)
        return last.reshape(-1, x.shape[1], 1)
    positions = int(np.prod(x.shape[2:]))  # explicit: -1 is ambiguous for an empty batch
    return np.ascontiguousarray(x, dtype=dtype).reshape(x.shape[0], x.shape[1], positions)


def _from_ncm(a: FloatArray, shape: tuple[int, ...], channels_last: bool) -> FloatArray:
    """Inverse of :func:`_as_ncm`: (N, C, *) again, channels-last memory kept as it was."""
    if channels_last:
        return np.moveaxis(a.reshape(shape[0], *shape[2:], shape[1]), -1, 1)
    return a.reshape(shape)


def batch_norm_forward(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    *,
    eps: float,
    training: bool,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Normalise ``x`` (N, C, *) per channel; return ``(y, cache)``, y with x's dtype.

    Two steps: the statistics (the batch's with ``training=True``, which ``cache.mean``,
    ``cache.var`` and ``cache.var_unbiased`` then hold for :func:`update_running_stats`;
    ``running_mean`` / ``running_var`` with ``training=False``), then the normalisation
    ``y = (x − mean)·invstd·weight + bias``. Nothing passed in is modified.
    """
    x = _check_forward_args(x, weight, bias, eps)
    cdt = compute_dtype(x.dtype)
    channels_last = _is_channels_last(x)
    x3 = _as_ncm(x, cdt, channels_last)
    n = x3.shape[0] * x3.shape[2]
    if training and not eps > 0:
        raise ValueError(f"eps must be > 0 in training (batch statistics), got {eps}")
    if training and n == 0:
        return _empty_batch_forward(x, weight, eps, cdt, channels_last)

    w, b = _scale_and_shift(weight, bias, x.shape[1], cdt)
    if training:
        stats = _batch_statistics(x3, eps, x.shape)
        # y = (d − r)·invstd·w + b: centred data, so no precision is lost to the offset.
        y = _normalise(stats.centred, stats.residual, stats.invstd, w, b)
        cache = BatchNormCache(
            shape=x.shape, dtype=x.dtype, training=True, invstd=stats.invstd, weight=weight,
            centred=stats.centred, residual=stats.residual, x=None, mean=stats.mean,
            var=stats.var, count=n, channels_last=channels_last,
        )
    else:
        mean, var = _running_statistics(running_mean, running_var, cdt)
        invstd = 1.0 / np.sqrt(var + cdt.type(eps))
        # One fused scale and shift of x itself, as torch's eval (with a huge offset this
        # rounds like torch's eval; training is exact).
        y = _normalise(x3, mean, invstd, w, b)
        cache = BatchNormCache(
            shape=x.shape, dtype=x.dtype, training=False, invstd=invstd, weight=weight,
            centred=None, residual=None, x=x3, mean=mean, var=var, count=n,
            channels_last=channels_last,
        )
    return _from_ncm(y, x.shape, channels_last).astype(x.dtype, copy=False), cache


def _empty_batch_forward(x: np.ndarray, weight: np.ndarray | None, eps: float,
                         cdt: np.dtype, channels_last: bool) -> tuple[np.ndarray, BatchNormCache]:
    """An empty training batch, as torch: an empty output, and a cache whose backward gives
    an empty dx and zero parameter gradients (``count == 0``: no statistics to record)."""
    channels = x.shape[1]
    zeros = np.zeros(channels, cdt)
    cache = BatchNormCache(
        shape=x.shape, dtype=x.dtype, training=True,
        invstd=np.full(channels, 1.0 / np.sqrt(eps), cdt), weight=weight,
        centred=_as_ncm(x, cdt, channels_last), residual=zeros, x=None, mean=zeros,
        var=zeros, count=0, channels_last=channels_last,
    )
    return x.astype(x.dtype, copy=True), cache


def _check_forward_args(
    x: object, weight: np.ndarray | None, bias: np.ndarray | None, eps: float
) -> np.ndarray:
    """``x`` as a float array of rank >= 2, with ``weight``/``bias`` of shape (C,) and
    ``eps >= 0``; a ValueError/TypeError naming the argument otherwise."""
    arr = check_float_array(x, "x")
    if arr.ndim < 2:
        raise ValueError(f"x must have shape (N, C, ...), got shape {arr.shape}")
    if not eps >= 0:  # also refuses NaN
        raise ValueError(f"eps must be a number >= 0, got {eps}")
    num_channels = arr.shape[1]
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and np.shape(v) != (num_channels,):
            raise ValueError(f"{name} must have shape ({num_channels},), got {np.shape(v)}")
    return arr


@dataclass(frozen=True, kw_only=True)
class _BatchStatistics:
    """Per-channel batch statistics of a (N, C, M) array, and the centred data they leave.

    ``centred = x − shift`` for a shift near the mean, ``residual = mean − shift`` (small),
    ``var`` the biased variance, ``invstd = 1 / sqrt(var + eps)``.
    """

    mean: FloatArray
    var: FloatArray
    invstd: FloatArray
    centred: FloatArray
    residual: FloatArray


def _batch_statistics(x3: FloatArray, eps: float, shape: tuple[int, ...]) -> _BatchStatistics:
    """The statistics step of training: shifted-data moments (see the module docstring).

    ``shape`` is the caller's input shape, for the error when a channel has one value.
    """
    n = x3.shape[0] * x3.shape[2]
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(shape)}: drop the last incomplete batch (drop_last=True) or "
            f"call eval() to use the running statistics"
        )
    shift = _kernels.shift_estimate(x3)
    d, sum_d, sum_d2 = _kernels.centre_and_moments(x3, shift)
    residual = sum_d / n
    if np.any(residual * residual > 0.25 * (sum_d2 / n)):
        # The first samples were far from the batch mean (sorted data): E[d²] − r² would
        # cancel, so centre again on the mean just found (one more pass, rarely taken).
        shift = shift + residual
        d, sum_d, sum_d2 = _kernels.centre_and_moments(x3, shift)
        residual = sum_d / n
    var = np.maximum(sum_d2 / n - residual * residual, 0)
    invstd = 1.0 / np.sqrt(var + x3.dtype.type(eps))
    return _BatchStatistics(mean=shift + residual, var=var, invstd=invstd, centred=d,
                           residual=residual)


def _running_statistics(
    running_mean: np.ndarray | None, running_var: np.ndarray | None, cdt: np.dtype
) -> tuple[FloatArray, FloatArray]:
    """The statistics step of eval: the running statistics in the compute dtype."""
    if running_mean is None or running_var is None:
        raise ValueError(
            "training=False normalises with running statistics, but running_mean or "
            "running_var is None: pass both, or use training=True (batch statistics)"
        )
    return np.asarray(running_mean).astype(cdt), np.asarray(running_var).astype(cdt)


def _normalise(
    values: FloatArray, centre: FloatArray, invstd: FloatArray, w: FloatArray, b: FloatArray
) -> FloatArray:
    """The normalisation step: ``(values − centre)·invstd·w + b`` as one scale and one
    shift per channel (a single pass over the tensor)."""
    scale = w * invstd
    return _kernels.affine(values, scale, b - centre * scale)


def _scale_and_shift(
    weight: np.ndarray | None, bias: np.ndarray | None, channels: int, cdt: np.dtype
) -> tuple[FloatArray, FloatArray]:
    """weight and bias in the compute dtype; ones and zeros when the layer has none."""
    scale = np.ones(channels, cdt) if weight is None else np.asarray(weight).astype(cdt)
    shift = np.zeros(channels, cdt) if bias is None else np.asarray(bias).astype(cdt)
    return scale, shift


def batch_norm_backward(
    dy: np.ndarray, cache: BatchNormCache
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of the forward call that produced ``cache``: ``(dx, dweight, dbias)``.

    A training cache serves one backward (dx is computed in its buffer), like a torch graph.

    ``dweight``/``dbias`` are None when the forward had no weight (affine=False); they are
    in the weight's dtype, ``dx`` in the input's dtype.
    """
    dy = check_float_array(dy, "dy")
    if dy.shape != cache.shape:
        raise ValueError(
            f"dy must have the shape of the forward input {cache.shape}, got {dy.shape}"
        )
    cdt = compute_dtype(cache.dtype)
    dy3 = _as_ncm(dy, cdt, cache.channels_last)
    if cache.count == 0:  # an empty batch: an empty dx and zero gradients, as torch
        zero = None if cache.weight is None else np.zeros_like(cache.weight)
        return dy.astype(cache.dtype, copy=True), zero, None if zero is None else zero.copy()
    weight = cache.weight
    gain = cache.invstd if weight is None else cache.invstd * weight.astype(cdt)

    sums: tuple[FloatArray, FloatArray] | None
    if cache.training:
        dx, sums = _backward_through_batch_stats(dy3, cache, gain)
    else:
        dx, sums = _backward_through_constants(dy3, cache, gain, need_sums=weight is not None)
    dx = _from_ncm(dx, cache.shape, cache.channels_last).astype(cache.dtype, copy=False)
    if weight is None or sums is None:
        return dx, None, None
    sum_dy, sum_dy_xhat = sums
    return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)


def _backward_through_batch_stats(
    dy3: FloatArray, cache: BatchNormCache, gain: FloatArray
) -> tuple[FloatArray, tuple[FloatArray, FloatArray]]:
    """Training: dx (the statistics depend on x), written into the cache's buffer, which
    is then spent; and (Σdy, Σdy·xhat)."""
    d = cache.centred
    if d is None or cache.residual is None:
        raise RuntimeError(
            "backward() was already called for this forward (its buffer now holds dx): "
            "run forward again"
        )
    n, r, invstd = cache.count, cache.residual, cache.invstd
    sum_dy, sum_dy_d = _kernels.sum_and_dot(dy3, d)
    sum_dy_xhat = invstd * (sum_dy_d - r * sum_dy)  # Σ dy·(d − r)·invstd
    # dx = gain·(dy − Σdy/n − xhat·Σdy·xhat/n) with xhat = (d − r)·invstd, computed in
    # d's own memory (so the cache is spent: one backward per forward, as in torch).
    k = -invstd * sum_dy_xhat / n
    cache.centred = None
    return _kernels.batch_norm_dx(dy3, d, gain, k, -k * r - sum_dy / n), (sum_dy, sum_dy_xhat)


def _backward_through_constants(
    dy3: FloatArray, cache: BatchNormCache, gain: FloatArray, *, need_sums: bool
) -> tuple[FloatArray, tuple[FloatArray, FloatArray] | None]:
    """Eval: dx = gain·dy (the statistics are constants); (Σdy, Σdy·xhat) if ``need_sums``."""
    if cache.x is None:
        raise RuntimeError("internal error: an eval cache without x")
    dx = _kernels.affine(dy3, gain, np.zeros_like(gain))
    if not need_sums:
        return dx, None
    # The weight's gradient needs xhat, which eval does not keep: recompute it.
    d, _, _ = _kernels.centre_and_moments(cache.x, cache.mean)
    sum_dy, sum_dy_d = _kernels.sum_and_dot(dy3, d)
    return dx, (sum_dy, sum_dy_d * cache.invstd)


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var_unbiased: np.ndarray,
    momentum_factor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's update, returned as new arrays in the running statistics' dtype::

        new = momentum_factor · batch + (1 − momentum_factor) · old

    ``momentum_factor`` is the layer's ``momentum`` (0.1 by default: the batch's share), or
    ``1 / num_batches_tracked`` for ``momentum=None`` (a cumulative average). Note the
    convention: Keras' ``momentum=0.99`` is this ``momentum_factor=0.01``.
    """
    if not 0.0 <= momentum_factor <= 1.0:
        raise ValueError(f"momentum_factor must be in [0, 1], got {momentum_factor}")
    m = float(momentum_factor)
    new_mean = m * batch_mean.astype(np.float64) + (1.0 - m) * running_mean.astype(np.float64)
    new_var = m * batch_var_unbiased.astype(np.float64) + (1.0 - m) * running_var.astype(
        np.float64
    )
    return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)
