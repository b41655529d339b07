"""The seed networks, the BN paper's MLP and deep nets, all with a pluggable norm.

``build_model(name, *, norm="bn", placement="before", in_shape=(1, 28, 28),
num_classes=10, norm_kwargs=None, **model_kwargs)``; ``MODELS`` maps names to builders:

- ``seed_cnn`` (:class:`~bnlab.models.cnn.SeedCNN`, kwargs ``dropout=0.0``),
- ``mnist_net`` (:class:`~bnlab.models.cnn.MnistNet`, ``dropout=0.25``),
- ``paper_mlp`` (:class:`~bnlab.models.mlp.PaperMLP`, ``width=100``),
- ``deep_mlp`` (:class:`~bnlab.models.mlp.DeepMLP`, ``depth=4, width=100, dropout=0.0,
  residual=False``; ``residual=True``: pre-activation residual blocks),
- ``deep_cnn`` (:class:`~bnlab.models.cnn.DeepCNN`, ``depth=8, width=16``).

Every norm layer is made by :func:`bnlab.models.norms.make_norm`; every model is built
from :class:`~bnlab.models.layers.Block` (submodules ``layer``, ``norm``, ``act``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from bnlab.errors import BnlabError
from bnlab.models.cnn import DeepCNN, MnistNet, SeedCNN
from bnlab.models.layers import PLACEMENTS, Block, check_placement
from bnlab.models.mlp import DeepMLP, PaperMLP
from bnlab.models.norms import make_norm, norm_names, norm_spec

MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": SeedCNN,
    "mnist_net": MnistNet,
    "paper_mlp": PaperMLP,
    "deep_mlp": DeepMLP,
    "deep_cnn": DeepCNN,
}

DESCRIPTIONS: dict[str, str] = {
    "seed_cnn": "seed-001 CNN: 2x(conv3x3, norm, ReLU, pool), fc 128 + norm, fc",
    "mnist_net": "seed-002 CNN: conv32, conv64 (no padding), pool, dropout .25, fc 128 + norm",
    "paper_mlp": "Ioffe & Szegedy 2015 §4.1: 3 hidden layers of 100 sigmoids",
    "deep_mlp": "depth x (Linear width, norm, ReLU), for the depth claim; residual=true: "
                "x + Linear(ReLU(norm(x))) blocks",
    "deep_cnn": "depth x (conv3x3 width, norm, ReLU), global average pool, fc",
}

_COMMON = ("norm", "placement", "in_shape", "num_classes", "norm_kwargs")


def model_kwargs_of(name: str) -> dict[str, Any]:
    """The model-specific keyword arguments of ``name`` with their defaults."""
    check_model_name(name)
    sig = inspect.signature(MODELS[name])
    return {k: p.default for k, p in sig.parameters.items() if k not in _COMMON}


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise BnlabError(f"unknown model {name!r}; expected one of: {', '.join(MODELS)}")


def build_model(
    name: str,
    *,
    norm: str = "bn",
    placement: str = "before",
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    norm_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build model ``name`` with norm ``norm`` placed ``placement`` its activations.

    Unknown model, norm, placement or model kwarg: :class:`BnlabError` listing the
    valid choices.
    """
    check_model_name(name)
    norm_spec(name=norm)
    check_placement(placement)
    accepted = model_kwargs_of(name)
    unknown = sorted(set(model_kwargs) - set(accepted))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise BnlabError(
            f"model {name!r} does not take {', '.join(unknown)}; its options: {valid}"
        )
    try:
        return MODELS[name](
            norm=norm,
            placement=placement,
            in_shape=tuple(in_shape),
            num_classes=num_classes,
            norm_kwargs=norm_kwargs,
            **model_kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise BnlabError(f"cannot build {name} (norm={norm!r}): {exc}") from None


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_init(model: nn.Module, scale: float) -> None:
    """Multiply every Conv/Linear weight by ``scale`` (after the default init)."""
    if scale == 1.0:
        return
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            m.weight.data.mul_(scale)


def model_table(
    in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10
) -> list[dict[str, Any]]:
    """One row per model: name, description, options and parameter counts ± BN."""
    rows = []
    for name in MODELS:
        rows.append({
            "name": name,
            "description": DESCRIPTIONS[name],
            "options": model_kwargs_of(name),
            "params_bn": count_params(build_model(name, norm="bn", in_shape=in_shape,
                                                  num_classes=num_classes)),
            "params_none": count_params(build_model(name, norm="none", in_shape=in_shape,
                                                    num_classes=num_classes)),
        })
    return rows


__all__ = [
    "DESCRIPTIONS",
    "MODELS",
    "PLACEMENTS",
    "Block",
    "DeepCNN",
    "DeepMLP",
    "MnistNet",
    "PaperMLP",
    "SeedCNN",
    "build_model",
    "count_params",
    "make_norm",
    "model_kwargs_of",
    "model_table",
    "norm_names",
    "scale_init",
]

