"""The norm registry: every model picks its normalisation by name through :func:`make_norm`.

A *norm factory* takes ``(num_features, dim, **kwargs)`` and returns an ``nn.Module`` for
inputs with channels on axis 1: ``dim=1`` for (N, C) or (N, C, L), ``dim=2`` for
(N, C, H, W), ``dim=3`` for (N, C, D, H, W). ``kwargs`` are the norm's own options
(``momentum``, ``virtual_batch_size`` …), passed through from ``TrainConfig.norm_kwargs``.

Built in: ``none`` (identity), every batch-norm kind of :data:`bnlab.nn.kinds.BN_KINDS`
(``bn``: torch's BatchNorm1d/2d/3d, and bnlab's ``renorm``, ``ghost``, ``frozen``,
``sync``), ``gn`` (GroupNorm), ``ln`` (layer norm) and ``noisy_bn`` (BN followed, in
training, by per-step random scales and shifts: :mod:`bnlab.nn.noisy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnlab.errors import BnlabError
from bnlab.nn.kinds import BN_KINDS
from bnlab.nn.noisy import NOISY_CLASSES

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


@register_norm("none", "no normalisation (identity)")
def _none(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


for _kind in BN_KINDS.values():  # every batch-norm kind, from the one table of kinds
    register_norm(_kind.name, _kind.description)(_kind.build)


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


@register_norm("noisy_bn", "BN + per-step random per-channel scale/shift in training "
                           "(Santurkar et al. 2018): bnlab.nn.NoisyBatchNorm1d/2d/3d")
def _noisy_bn(num_features: int, dim: int, **kwargs: Any) -> nn.Module:
    return NOISY_CLASSES[dim](num_features, **kwargs)
