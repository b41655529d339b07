"""The norm registry: every model picks its normalisation by name through :func:`make_norm`.

A *norm factory* takes ``(num_features, dim, **kwargs)`` and returns an ``nn.Module`` for
inputs with channels on axis 1: ``dim=1`` for (N, C) or (N, C, L), ``dim=2`` for
(N, C, H, W), ``dim=3`` for (N, C, D, H, W). ``kwargs`` are the norm's own options
(``momentum``, ``virtual_batch_size`` …), passed through from ``TrainConfig.norm_kwargs``.

Built in: ``none`` (identity), ``bn`` (torch's BatchNorm1d/2d/3d), ``gn`` (GroupNorm) and
``ln`` (layer norm). The toolkit's modules (``bnlab.nn``) register under their own names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnlab.errors import BnlabError

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    name: str
    description: str
    factory: NormFactory


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(name: str, description: str) -> Callable[[NormFactory], NormFactory]:
    """Decorator: register ``factory(num_features, dim, **kwargs) -> nn.Module`` as ``name``."""

    def decorate(factory: NormFactory) -> NormFactory:
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is already registered")
        _REGISTRY[name] = NormSpec(name, description, factory)
        return factory

    return decorate


def norm_names() -> list[str]:
    """The registered norm names, in registration order."""
    return list(_REGISTRY)


def norm_spec(name: str) -> NormSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BnlabError(
            f"unknown norm {name!r}; expected one of: {', '.join(norm_names())}"
        ) from None


def make_norm(name: str, num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels of a ``dim``-d feature map."""
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (spatial dims of the input), got {dim}")
    return norm_spec(name).factory(num_features, dim, **kwargs)


_TORCH_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@register_norm("none", "no normalisation (identity)")
def _none(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


@register_norm("bn", "torch.nn.BatchNorm1d/2d/3d")
def _bn(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    return _TORCH_BN[dim](num_features, **kwargs)


@register_norm("gn", "torch.nn.GroupNorm, 32 groups (or fewer, dividing the channels)")
def _gn(num_features: int, dim: int, groups: int = 32, **kwargs: Any) -> nn.Module:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"gn: groups must be a whole number >= 1, got {groups!r}")
    groups = min(groups, num_features)
    while num_features % groups:
        groups -= 1
    return nn.GroupNorm(groups, num_features, **kwargs)


@register_norm("ln", "layer norm: statistics over all of a sample's features (GroupNorm(1, C))")
def _ln(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    # GroupNorm with one group normalises each sample over (C, *spatial), which is layer
    # norm with a per-channel (not per-element) affine, and needs no spatial size upfront.
    return nn.GroupNorm(1, num_features, **kwargs)


# --------------------------------------------------------------- the toolkit's (bnlab.nn)


@register_norm("renorm", "Batch Renorm (Ioffe 2017): bnlab.nn.BatchRenorm1d/2d/3d")
def _renorm(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    from bnlab.nn import renorm

    cls = {1: renorm.BatchRenorm1d, 2: renorm.BatchRenorm2d, 3: renorm.BatchRenorm3d}[dim]
    return cls(num_features, **kwargs)


@register_norm(
    "ghost", "Ghost BN (Hoffer 2017): bnlab.nn.GhostBatchNorm1d/2d/3d, virtual batch 32"
)
def _ghost(num_features: int, dim: int, virtual_batch_size: int = 32, **kwargs: Any) -> nn.Module:
    from bnlab.nn import ghost

    cls = {1: ghost.GhostBatchNorm1d, 2: ghost.GhostBatchNorm2d, 3: ghost.GhostBatchNorm3d}[dim]
    return cls(num_features, virtual_batch_size, **kwargs)


@register_norm("frozen", "frozen BN (fixed affine map): bnlab.nn.FrozenBatchNorm1d/2d/3d")
def _frozen(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    from bnlab.nn import frozen

    return frozen.FROZEN[dim](num_features, **kwargs)
