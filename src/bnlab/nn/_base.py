"""Shared machinery of bnlab's batch-norm modules: state, input checks and guarded statistics.

Every module here keeps torch's BatchNorm state exactly (``weight``, ``bias`` as parameters;
``running_mean``, ``running_var``, ``num_batches_tracked`` as buffers), so a checkpoint of
``torch.nn.BatchNorm2d`` loads into ``BatchRenorm2d`` / ``GhostBatchNorm2d`` unchanged and
back. One implementation serves every rank: statistics reduce over every axis except 1, and
the 1d/2d/3d classes only differ in the input ranks they accept.

Two guards protect the running statistics (torch has neither):

* ``skip_nonfinite=True`` (default): when a training batch's mean or variance is not finite
  (a NaN/Inf in the input), the running-stat update of that step is skipped and a
  ``RuntimeWarning`` naming the layer is issued once per layer. ``num_batches_tracked`` is
  not incremented either. The output is still computed from the batch, so the NaN propagates
  exactly as with torch and the loss shows it. One bad batch therefore cannot poison
  ``running_mean``/``running_var`` for good (pytorch issue 88474).
* ``small_batch="error"`` (default) raises torch's "Expected more than 1 value per channel"
  message with a hint; ``small_batch="skip"`` treats such a training batch (e.g. the leftover
  batch of one) as an eval batch: it is normalised with the running statistics and does not
  update them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SMALL_BATCH_POLICIES = ("error", "skip")

bn_backward = torch.ops.aten.native_batch_norm_backward
"""torch's BN backward kernel, for the custom autograd Functions that reuse it."""

# Accepted ranks and the shape wording for each class family (shared by the docstrings).
RANKS: dict[int, tuple[tuple[int, ...], str]] = {
    1: ((2, 3), "(N, C) or (N, C, L)"),
    2: ((4,), "(N, C, H, W)"),
    3: ((5,), "(N, C, D, H, W)"),
}

SMALL_BATCH_HINT = (
    "A training batch needs more than one value per channel for batch statistics. Drop the "
    "last incomplete batch (DataLoader(..., drop_last=True)), evaluate this input in "
    "model.eval(), or construct the layer with small_batch='skip' to normalise such a batch "
    "with the running statistics instead."
)


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis except the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector (C,) as (1, C, 1, ...) to broadcast against an ndim input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def is_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_num_features_and_eps(num_features: int, eps: float) -> None:
    """The constructor checks every bnlab BN module shares: C a positive int, eps > 0."""
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


class GuardedBatchNorm(nn.Module):
    """Base of ``BatchRenorm*`` and ``GhostBatchNorm*``: torch's BatchNorm state plus guards.

    Subclasses implement :meth:`_train_forward`; eval (with running statistics) is torch's own
    ``F.batch_norm`` in inference mode, so it equals ``nn.BatchNorm*d.eval()`` exactly.
    """

    _ranks: ClassVar[tuple[int, ...]] = ()
    _shape_text: ClassVar[str] = "(N, C, ...)"

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        small_batch: str = "error",
        skip_nonfinite: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_num_features_and_eps(num_features, eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative), got {momentum!r}")
        if small_batch not in SMALL_BATCH_POLICIES:
            raise ValueError(
                f"small_batch must be one of {SMALL_BATCH_POLICIES}, got {small_batch!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.small_batch = small_batch
        self.skip_nonfinite = skip_nonfinite
        # Name used in warnings; set by replace_norm / name_bn_layers, else class name + id.
        self.layer_name: str | None = None
        self._warned_nonfinite = False
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # ----------------------------------------------------------------- helpers

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"small_batch={self.small_batch!r}, skip_nonfinite={self.skip_nonfinite}"
        )

    def display_name(self) -> str:
        return self.layer_name or f"{type(self).__name__}@{id(self):#x}"

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expected a torch.Tensor, got {type(x)!r}")
        if self._ranks and x.dim() not in self._ranks:
            raise ValueError(
                f"{type(self).__name__} expected input of shape {self._shape_text} "
                f"({' or '.join(f'{r}-D' for r in self._ranks)}), got {x.dim()}-D input of "
                f"shape {tuple(x.shape)}"
            )
        if x.dim() < 2:
            raise ValueError(f"expected input with a channel axis 1, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                f"channels on axis 1, got input of shape {tuple(x.shape)}"
            )

    def _small_batch(self, x: Tensor, values_per_channel: int) -> bool:
        """Apply the ``small_batch`` policy; True means: normalise with running stats."""
        if values_per_channel > 1:
            return False
        if self.small_batch == "error":
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{torch.Size(x.shape)} (layer {self.display_name()}). {SMALL_BATCH_HINT}"
            )
        if not self.track_running_stats:
            raise ValueError(
                f"small_batch='skip' normalises a batch of one with the running statistics, "
                f"but layer {self.display_name()} has track_running_stats=False; got input "
                f"size {torch.Size(x.shape)}"
            )
        return True

    def _eval_forward(self, x: Tensor) -> Tensor:
        """Plain BN with the running statistics (torch's own inference kernel)."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var_unbiased: Tensor) -> bool:
        """``new = (1 - m)·old + m·batch`` (torch's convention; m = 1/t when momentum is None).

        ``var_unbiased`` is the batch variance with Bessel's correction, as torch stores it.
        Returns False (and changes nothing) when the statistics are not finite and
        ``skip_nonfinite`` is on.
        """
        rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        if rm is None or rv is None or nbt is None:
            return False
        if self.skip_nonfinite and not is_finite(mean, var_unbiased):
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"non-finite batch statistics in layer {self.display_name()}: this step's "
                    "running-statistics update was skipped (skip_nonfinite=True); further "
                    "skips in this layer are silent",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        nbt.add_(1)
        factor = 1.0 / float(nbt) if self.momentum is None else self.momentum
        rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(var_unbiased.to(rv.dtype), alpha=factor)
        return True

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training or not self.track_running_stats:
            return self._train_forward(x)
        return self._eval_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def differentiable_grads(forward: Callable[[], Tensor], inputs: Sequence[Tensor | None],
                         needs: Sequence[bool], dy: Tensor) -> list[Tensor | None]:
    """Gradients of ``forward()`` with respect to ``inputs``, as differentiable tensors.

    For the custom autograd Functions here under ``create_graph=True`` (double backward):
    their fast backward is not differentiable, so they recompute the forward from
    differentiable ops and differentiate that. ``needs`` is ``ctx.needs_input_grad`` for
    ``inputs``; an input that is not needed (or None) gets None.
    """
    needed = [bool(need) and t is not None for t, need in zip(inputs, needs, strict=True)]
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need and t is not None]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(forward(), wanted, dy, create_graph=True))
    return [next(grads) if need else None for need in needed]


def rank_doc(template: str, dim: int, name: str, **extra: str) -> str:
    """Fill a family docstring for the ``dim``-d class (one text for 1d/2d/3d)."""
    return template.format(name=name, shape=RANKS[dim][1], dim=dim, **extra)
