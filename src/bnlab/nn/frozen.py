"""Frozen batch norm: a fixed per-channel affine map from saved statistics, and converters."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bnlab.nn._base import (
    RANKS,
    accumulation_dtype,
    channel_view,
    check_input,
    check_options,
    load_missing_num_batches_tracked,
    rank_doc,
)

_DOC = """BatchNorm frozen into a fixed affine map over a {shape} input.

    In training *and* in eval (``model.train()`` cannot unfreeze it)::

        y = (x − running_mean) / sqrt(running_var + eps) · weight + bias
          = x · a + b,    a = weight / sqrt(running_var + eps),   b = bias − running_mean · a

    Everything is a buffer: there are no parameters, so no optimizer touches it and
    forward never changes it. The input still receives the exact gradient ``dL/dx = dL/dy · a``.
    State-dict keys are exactly torch's BatchNorm keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``; no ``weight``/``bias`` when ``affine=False``), so
    a ``nn.BatchNorm{dim}d`` checkpoint loads directly and back (one written before torch
    had ``num_batches_tracked`` too, as torch loads it). It is deliberately not a subclass of
    torch's ``_BatchNorm``: ``torch.optim.swa_utils.update_bn`` would reset its statistics
    and, since frozen statistics never update, leave them at 0 and 1. Use :func:`freeze_bn`
    to convert a model's BN layers in place, :func:`unfreeze_bn` to undo it.

    Args:
        num_features: C.
        eps: added to running_var (default 1e-5).
        affine: whether ``weight``/``bias`` buffers exist (default True; else 1 and 0).
        momentum: kept only so that :func:`unfreeze_bn` can restore it (default 0.1).

    Shape: input and output {shape}.

    Example::

        >>> import torch
        >>> from bnlab.nn import {name}
        >>> m = {name}(4)
        >>> y = m(torch.randn(*{example}))
    """

_EXAMPLES = {1: "(8, 4)", 2: "(8, 4, 5, 5)", 3: "(8, 4, 2, 5, 5)"}


class _FrozenBatchNorm(nn.Module):
    _version = 2  # torch's BatchNorm state-dict version: num_batches_tracked is saved
    _ranks: ClassVar[tuple[int, ...]] = ()
    _shape_text: ClassVar[str] = "(N, C, ...)"
    _dim: ClassVar[int] = 0

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float | None = 0.1,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_options(num_features, eps)  # momentum is only carried, never used
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = affine
        self.momentum = momentum
        if affine:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory))
        else:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def reset_running_stats(self) -> None:
        """running_mean 0, running_var 1, num_batches_tracked 0 (torch's fresh state)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any,
                              *args: Any) -> None:
        load_missing_num_batches_tracked(self, state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(a, b) with y = x·a + b, per channel."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self._ranks, self._shape_text)
        scale, shift = self.scale_shift()
        y = torch.addcmul(channel_view(shift, x.dim()), x, channel_view(scale, x.dim()))
        # A float16/bfloat16 input (CPU autocast) is computed against the float32 buffers
        # and rounded once, back to the input's dtype, as torch's BN returns it.
        return y.to(x.dtype) if accumulation_dtype(x.dtype) != x.dtype else y


def _doc(dim: int) -> str:
    return rank_doc(_DOC, dim, f"FrozenBatchNorm{dim}d", example=_EXAMPLES[dim])


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _doc(1)
    _ranks, _shape_text = RANKS[1]
    _dim = 1


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _doc(2)
    _ranks, _shape_text = RANKS[2]
    _dim = 2


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _doc(3)
    _ranks, _shape_text = RANKS[3]
    _dim = 3


__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]
