"""Frozen batch norm: a fixed per-channel affine map from saved statistics, and converters."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bnlab.nn._base import (
    RANKS,
    GuardedBatchNorm,
    channel_view,
    check_num_features_and_eps,
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
    a ``nn.BatchNorm{dim}d`` checkpoint loads directly and back. Use :func:`freeze_bn` to
    convert a model's BN layers in place, :func:`unfreeze_bn` to undo it.

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
        super().__init__()
        check_num_features_and_eps(num_features, eps)
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
        GuardedBatchNorm._check_input(self, x)  # type: ignore[arg-type]
        scale, shift = self.scale_shift()
        return torch.addcmul(
            channel_view(shift, x.dim()), x, channel_view(scale, x.dim())
        )


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


FROZEN: dict[int, type[_FrozenBatchNorm]] = {
    1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d,
}

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]
