"""Convolutional networks: the two seed CNNs and a plain deep CNN."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnlab.models.layers import Block


def _check_in_shape(in_shape: tuple[int, ...], min_hw: int, model: str) -> tuple[int, int, int]:
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise ValueError(f"{model}: in_shape must be (C, H, W) with positive sizes, "
                         f"got {in_shape}")
    c, h, w = (int(s) for s in in_shape)
    if h < min_hw or w < min_hw:
        raise ValueError(f"{model}: needs inputs of at least {min_hw}x{min_hw}, got {h}x{w}")
    return c, h, w


class SeedCNN(nn.Module):
    """The seed-001 CNN: two conv blocks with 2x2 max-pooling, one hidden fc layer.

    ``conv1``: Conv2d(C, 32, 3, padding=1) → norm → ReLU → max-pool 2;
    ``conv2``: Conv2d(32, 64, 3, padding=1) → norm → ReLU → max-pool 2;
    ``fc1``: Linear(64·⌊H/4⌋·⌊W/4⌋, 128) → norm (1d) → ReLU → dropout;
    ``fc2``: Linear(128, num_classes), logits.

    The seed writes ``nn.Linear(64*28*28, 128)``, which does not fit: after two 2x
    poolings a 28x28 input is 7x7, so the flattened size is 64·7·7 = 3136. It is computed
    here from ``in_shape`` (64·2·2 = 256 for the 8x8 digits). ``dropout`` (default 0, as in
    the seed) is applied after ``fc1``.
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        placement: str = "before",
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        norm_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = _check_in_shape(in_shape, 4, "seed_cnn")
        nk = norm_kwargs
        self.conv1 = Block(nn.Conv2d(c, 32, 3, padding=1), 32, 2, norm=norm,
                           placement=placement, act=nn.ReLU(), norm_kwargs=nk)
        self.conv2 = Block(nn.Conv2d(32, 64, 3, padding=1), 64, 2, norm=norm,
                           placement=placement, act=nn.ReLU(), norm_kwargs=nk)
        self.pool = nn.MaxPool2d(2)
        self.flat_features = 64 * (h // 2 // 2) * (w // 2 // 2)
        self.fc1 = Block(nn.Linear(self.flat_features, 128), 128, 1, norm=norm,
                         placement=placement, act=nn.ReLU(), norm_kwargs=nk)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = self.dropout(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class MnistNet(nn.Module):
    """The seed-002 network (PyTorch's MNIST example with BN added).

    ``conv1``: Conv2d(C, 32, 3) → norm → ReLU; ``conv2``: Conv2d(32, 64, 3) → norm →
    ReLU; max-pool 2; dropout 0.25; ``fc1``: Linear(64·⌊(H−4)/2⌋·⌊(W−4)/2⌋, 128) → norm
    (1d) → ReLU; ``fc2``: Linear(128, num_classes). No padding, so 28x28 → 24x24 → 12x12
    and the flattened size is 9216, the seed's number. Returns logits (the seed returns
    ``log_softmax``; cross-entropy on logits is the same loss).
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        placement: str = "before",
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        norm_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c, h, w = _check_in_shape(in_shape, 6, "mnist_net")
        nk = norm_kwargs
        self.conv1 = Block(nn.Conv2d(c, 32, 3), 32, 2, norm=norm, placement=placement,
                           act=nn.ReLU(), norm_kwargs=nk)
        self.conv2 = Block(nn.Conv2d(32, 64, 3), 64, 2, norm=norm, placement=placement,
                           act=nn.ReLU(), norm_kwargs=nk)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.flat_features = 64 * ((h - 4) // 2) * ((w - 4) // 2)
        self.fc1 = Block(nn.Linear(self.flat_features, 128), 128, 1, norm=norm,
                         placement=placement, act=nn.ReLU(), norm_kwargs=nk)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        x = self.dropout(x)
        return self.fc2(self.fc1(torch.flatten(x, 1)))


class DeepCNN(nn.Module):
    """``depth`` conv blocks of ``width`` channels, for the depth claims.

    ``blocks[0]``: Conv2d(C, width, 3, padding=1) → norm → ReLU, then a 2x2 max-pool;
    ``blocks[1..depth-1]``: Conv2d(width, width, 3, padding=1) → norm → ReLU; then global
    average pooling and ``head``: Linear(width, num_classes).
    """

    def __init__(
        self,
        *,
        norm: str = "bn",
        placement: str = "before",
        in_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        norm_kwargs: dict[str, Any] | None = None,
        depth: int = 8,
        width: int = 16,
    ) -> None:
        super().__init__()
        if int(depth) < 1 or int(width) < 1:
            raise ValueError(f"deep_cnn: depth and width must be >= 1, got {depth}, {width}")
        c, _, _ = _check_in_shape(in_shape, 2, "deep_cnn")
        self.blocks = nn.ModuleList()
        for i in range(int(depth)):
            conv = nn.Conv2d(c if i == 0 else width, width, 3, padding=1)
            self.blocks.append(Block(conv, width, 2, norm=norm, placement=placement,
                                     act=nn.ReLU(), norm_kwargs=norm_kwargs))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks[0](x))
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))
