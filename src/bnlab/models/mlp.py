"""Fully connected networks: the BN paper's MNIST MLP and a deep MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bnlab.models.layers import Block
from bnlab.models.norms import make_norm


def _in_features(in_shape: tuple[int, ...], model: str) -> int:
    if len(in_shape) == 0 or any(int(s) <= 0 for s in in_shape):
        raise ValueError(f"{model}: in_shape must hold positive sizes, got {in_shape}")
    return math.prod(int(s) for s in in_shape)


class PaperMLP(nn.Module):
    """Ioffe & Szegedy 2015, §4.1: three fully connected hidden layers of 100 sigmoids.

    ``hidden1``, ``hidden2``, ``hidden3``: each a :class:`~bnlab.models.layers.Block` with
    submodules ``layer`` (Linear), ``norm`` and ``act`` (Sigmoid); with ``norm="bn"`` and
    ``placement="before"`` BN sits before each nonlinearity, as in the paper. ``out``:
    Linear(100, num_classes), logits.

    The paper's Figure 1 (b, c) tracks the input to one sigmoid of the last hidden layer:
    hook it with ``model.hidden3.act.register_forward_pre_hook`` (the hook's ``args[0]``
    is that input, (N, 100)).
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        placement: str = "before",
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        norm_kwargs: dict[str, Any] | None = None,
        width: int = 100,
    ) -> None:
        super().__init__()
        features = _in_features(in_shape, "paper_mlp")
        kw: dict[str, Any] = {"norm": norm, "placement": placement, "norm_kwargs": norm_kwargs}
        self.hidden1 = Block(nn.Linear(features, width), width, 1, act=nn.Sigmoid(), **kw)
        self.hidden2 = Block(nn.Linear(width, width), width, 1, act=nn.Sigmoid(), **kw)
        self.hidden3 = Block(nn.Linear(width, width), width, 1, act=nn.Sigmoid(), **kw)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.out(self.hidden3(self.hidden2(self.hidden1(x))))


class ResidualBlock(nn.Module):
    """A pre-activation residual block, ``x + layer(act(norm(x)))`` (norm → ReLU → Linear
    on the branch, the identity on the skip path).

    The submodules are named ``norm``, ``act`` and ``layer`` as in
    :class:`~bnlab.models.layers.Block`, so a hook on ``<block>.act`` sees the activation's
    input. The branch's Linear keeps PyTorch's default init (weight variance
    ``1 / (3 · fan_in)``); nothing rescales it with depth.
    """

    def __init__(self, width: int, *, norm: str, norm_kwargs: dict[str, Any] | None) -> None:
        super().__init__()
        self.norm = make_norm(norm, width, 1, **(norm_kwargs or {}))
        self.act = nn.ReLU()
        self.layer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.act(self.norm(x)))


class DeepMLP(nn.Module):
    """``depth`` hidden layers of ``width`` ReLU units (Linear → norm → ReLU), for depth claims.

    ``blocks[i]``: Linear → norm → ReLU (``placement`` decides the order); dropout after
    each block when ``dropout > 0``; ``head``: Linear(width, num_classes).

    ``residual=True``: ``blocks[0]`` stays the plain input block (Linear(in, width) → norm
    → ReLU) and ``blocks[1:]`` are :class:`ResidualBlock` s, ``x + Linear(ReLU(norm(x)))``
    (pre-activation; ``placement`` applies to the input block only). ``depth`` counts the
    hidden Linear layers either way, so both nets have ``depth + 1`` weight layers. With
    the default ``residual=False`` the model is built exactly as without the option.
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        placement: str = "before",
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        norm_kwargs: dict[str, Any] | None = None,
        depth: int = 4,
        width: int = 100,
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if int(depth) < 1 or int(width) < 1:
            raise ValueError(f"deep_mlp: depth and width must be >= 1, got {depth}, {width}")
        if not isinstance(residual, bool):
            raise ValueError(f"deep_mlp: residual must be true or false, got {residual!r}")
        features = _in_features(in_shape, "deep_mlp")
        blocks: list[nn.Module] = []
        for i in range(int(depth)):
            if residual and i > 0:
                blocks.append(ResidualBlock(width, norm=norm, norm_kwargs=norm_kwargs))
            else:
                blocks.append(Block(nn.Linear(features if i == 0 else width, width), width, 1,
                                    norm=norm, placement=placement, act=nn.ReLU(),
                                    norm_kwargs=norm_kwargs))
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for block in self.blocks:
            x = self.dropout(block(x))
        return self.head(x)
