"""The table of batch-norm kinds: kind × input rank → class, read by every user of kinds.

The model registry (:mod:`bnlab.models.norms`, the ``norm=`` of every model) and
:func:`bnlab.nn.replace_norm` both look kinds up here, so adding a kind is one entry in
:data:`BN_KINDS`. ``dim`` is the number of spatial axes, as in the registry: 1 for (N, C) or
(N, C, L), 2 for (N, C, H, W), 3 for (N, C, D, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bnlab.nn.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
)
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, _GhostBatchNorm
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, _BatchRenorm
from bnlab.nn.sync import SyncBatchNorm

__all__ = ["BN_KINDS", "BNKind", "bn_kind"]


@dataclass(frozen=True)
class BNKind:
    """One kind of batch norm.

    Attributes:
        name: the kind's name (``norm=`` of the models, ``kind`` of ``replace_norm``).
        description: one line for ``bnlab models``.
        classes: ``dim`` (1, 2, 3) → the class for that input rank.
        any_rank: the class for a source layer whose rank is unknown (a SyncBatchNorm), or
            None when the kind has only rank-specific classes.
        takes_track_running_stats: the constructor has a ``track_running_stats`` argument.
        model_defaults: options the model registry fills in when a config leaves them out.
    """

    name: str
    description: str
    classes: Mapping[int, type[nn.Module]]
    any_rank: type[nn.Module] | None
    takes_track_running_stats: bool
    model_defaults: Mapping[str, Any] = field(default_factory=dict)

    def class_for(self, dim: int | None) -> type[nn.Module] | None:
        """The class for ``dim`` (None: the rank-agnostic class, if the kind has one)."""
        return self.any_rank if dim is None else self.classes.get(dim)

    def build(self, num_features: int, dim: int, **kwargs: Any) -> nn.Module:
        """A new layer of this kind for ``num_features`` channels of a ``dim``-d input."""
        return self.classes[dim](num_features, **{**self.model_defaults, **kwargs})


def _ranked(c1: type[nn.Module], c2: type[nn.Module], c3: type[nn.Module]
            ) -> dict[int, type[nn.Module]]:
    return {1: c1, 2: c2, 3: c3}


BN_KINDS: dict[str, BNKind] = {kind.name: kind for kind in (
    BNKind("bn", "torch.nn.BatchNorm1d/2d/3d",
           _ranked(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), None, True),
    BNKind("renorm", "Batch Renorm (Ioffe 2017): bnlab.nn.BatchRenorm1d/2d/3d",
           _ranked(BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), _BatchRenorm, False),
    BNKind("ghost", "Ghost BN (Hoffer 2017): bnlab.nn.GhostBatchNorm1d/2d/3d, virtual batch 32",
           _ranked(GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d), _GhostBatchNorm, True,
           {"virtual_batch_size": 32}),
    BNKind("frozen", "frozen BN (fixed affine map): bnlab.nn.FrozenBatchNorm1d/2d/3d",
           _ranked(FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d), _FrozenBatchNorm,
           False),
    BNKind("sync", "bnlab.nn.SyncBatchNorm: statistics over every rank (one process: BN)",
           _ranked(SyncBatchNorm, SyncBatchNorm, SyncBatchNorm), SyncBatchNorm, True),
)}
"""Every batch-norm kind, in the order the registry lists them."""


def bn_kind(name: str) -> BNKind:
    """The kind ``name``, or a ValueError listing the kinds."""
    try:
        return BN_KINDS[name]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(BN_KINDS)}; got {name!r}") from None
