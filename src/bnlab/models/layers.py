"""The building block every bnlab model uses: a weight layer, a norm and an activation.

``placement="before"`` computes ``act(norm(layer(x)))`` (the BN paper's and the seeds'
order); ``"after"`` computes ``norm(act(layer(x)))``. Norm layers come only from the
registry (:func:`bnlab.models.norms.make_norm`), so ``norm="none"`` gives an identity.
The submodules are named ``layer``, ``norm`` and ``act`` in every model, so a forward
(pre-)hook on ``<block>.act`` sees exactly the activation's input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnlab.errors import BnlabError
from bnlab.models.norms import make_norm

PLACEMENTS = ("before", "after")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise BnlabError(
            f"unknown placement {placement!r}; expected one of: {', '.join(PLACEMENTS)}"
        )


class Block(nn.Module):
    """``layer`` → ``norm`` → ``act`` (placement "before") or ``layer`` → ``act`` → ``norm``."""

    def __init__(
        self,
        layer: nn.Module,
        num_features: int,
        dim: int,
        *,
        norm: str,
        placement: str,
        act: nn.Module,
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_placement(placement)
        self.placement = placement
        self.layer = layer
        self.norm = make_norm(norm, num_features, dim, **(norm_kwargs or {}))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        if self.placement == "before":
            return self.act(self.norm(x))
        return self.norm(self.act(x))

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}"
